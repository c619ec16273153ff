"""clare-reir: Referring Expression Instance Retrieval with CLARE, built for deployment."""

__version__ = "0.1.0"
