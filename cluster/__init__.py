"""reir.cluster: indexing and serving across hosts on Ray (Ray Data, Ray Serve).

Installed with the `cluster` extra; the embedded engine never imports it or Ray."""
