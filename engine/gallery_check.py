"""`reir gallery check`: is a gallery consistent, and does its index still agree with the
exact scan? Everything is measured from what is stored, nothing is taken on trust."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the gallery calls the check, not the other way round
    from .gallery import Gallery


def check_gallery(g: Gallery) -> list[str]:
    """Problems found (empty = consistent)."""
    problems = []
    ok = g.db.execute("PRAGMA integrity_check").fetchone()[0]
    if ok != "ok":
        problems.append(f"{g.path / 'gallery.sqlite'}: integrity check: {ok}")
    db_keys = np.array([r[0] for r in g.db.execute("SELECT key FROM instances ORDER BY key")], np.int64)
    with g._lock:
        store = g.index.store
        live = np.sort(store.keys.array[store.alive.array])
    extra, missing = np.setdiff1d(live, db_keys), np.setdiff1d(db_keys, live)
    if len(extra):
        problems.append(f"the index holds {len(extra)} vector(s) with no instance row")
    if len(missing):
        problems.append(f"{len(missing)} instance(s) missing from the index")
    orphans = g.db.execute("SELECT COUNT(*) FROM instances WHERE image_id NOT IN (SELECT id FROM images)").fetchone()[0]
    if orphans:
        problems.append(f"{orphans} instance row(s) whose image is gone")
    measured = g.measure()
    if measured is not None and not measured["met"]:
        a = ", ".join(f"{k} {measured[k]:.4f}" for k in ("top1", "top10", "recall10"))
        problems.append(f"the index agrees with the exact scan less than its targets ({a}); rebuild it")
    return problems
