"""`Follower`: a server's read-only galleries kept in step with their writers.

A served gallery is opened read-only and never restarts to see new images: every `every_s`
seconds this thread calls `refresh()` on each (one SQLite read when nothing changed; the
new rows when something did), so an image indexed or removed while the server runs is
searched, or gone, within about that long. Searches go on meanwhile: they wait only while
a refresh applies its rows, and each answers from one committed generation.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from reir.engine.gallery.gallery import Gallery

log = logging.getLogger("reir")
EVERY_S = 1.0


class Follower:
    def __init__(self, galleries: Callable[[], Iterable[tuple[str, Gallery]]], every_s: float = EVERY_S):
        """`galleries()`: (name, gallery) pairs to follow, asked anew each round (a server
        opens galleries as requests name them)."""
        self.galleries, self.every_s = galleries, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reir-follower", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.round()

    def round(self) -> None:
        """Refresh each gallery once (what the thread does every `every_s`)."""
        for name, g in list(self.galleries()):
            try:
                g.refresh()
            except Exception:  # a damaged or vanished gallery must not stop the others following
                log.exception("%s: refresh failed; serving the generation it had", name)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
