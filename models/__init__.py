"""The default model shipped with the package: models/synth (see README.md)."""
