"""Where Ray offers no supported way to do what reir needs: one shim, isolated here.

Ray Serve starts each replica's inter-deployment gRPC server on `[::]:0`, every interface
of the host, and offers no option or environment variable to bind it elsewhere (checked
in 2.58 to 2.60: `ray/serve/_private/replica.py`, `add_port_to_grpc_server(self._server,
"[::]:0")`). A replica would then accept connections from the network although every
other Ray process listens on the node's address only. `keep_replica_listener_on_node`
rebinds that one server to the node's address (127.0.0.1 on a local cluster).

It runs only on the Ray versions it was tested with, and fails loudly on any other, or if
the function it wraps is gone: a silent no-op would put the listener back on every
interface. tests/test_cluster.py shows both that it is needed (a replica without it
listens on a wildcard address) and that it works (with it, on loopback only).
"""

from __future__ import annotations

import ray

TESTED = ("2.58", "2.59", "2.60")  # minor versions this shim was tested with


class RayIncompatible(RuntimeError):
    pass


def check_version(version: str | None = None) -> None:
    minor = ".".join((version or ray.__version__).split(".")[:2])
    if minor not in TESTED:
        raise RayIncompatible(
            f"Ray {version or ray.__version__}: reir's replica-listener shim is tested with Ray {', '.join(TESTED)} "
            "only; install one of them (pip install 'clare-reir[cluster]') or check cluster/compat.py against this "
            "Ray's serve/_private/replica.py"
        )


def keep_replica_listener_on_node() -> None:
    """Call in a deployment's constructor: it runs in the replica's process before Serve
    starts the replica's gRPC server (Serve pickles a deployment class by value, so a
    module-level call would not run there)."""
    check_version()
    from ray.serve._private import replica  # the one private module reir touches

    if getattr(replica, "_reir_bound", False):
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None:
        raise RayIncompatible(
            f"Ray {ray.__version__}: ray.serve._private.replica.add_port_to_grpc_server is gone; "
            "cluster/compat.py must be updated before this Ray can serve"
        )

    def add_port(server, address: str):
        if address.startswith(("[::]:", "0.0.0.0:")):
            address = f"{ray.util.get_node_ip_address()}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    replica.add_port_to_grpc_server = add_port
    replica._reir_bound = True
