"""The one base of every error a user can fix.

Each layer raises its own kind (BundleError, GalleryError, RequestError, DataError, ...),
and each names the file, record or field and the problem. They all derive from
`ReirError`, so the command line (and any caller) can tell "your input is wrong" from a
bug with one `except`, without importing every layer to list their classes.
"""

from __future__ import annotations


class ReirError(Exception):
    """A problem with the user's input or set-up; the message says what and where."""
