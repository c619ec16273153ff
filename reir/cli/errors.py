"""Errors a user can fix: printed as one line naming the file, record or field, exit code 2."""

from __future__ import annotations

from reir.engine.errors import ReirError


class UsageError(ReirError, ValueError):
    """A wrong argument or input (a ValueError, so lower layers' checks are reported alike)."""
