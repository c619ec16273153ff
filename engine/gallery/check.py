"""`reir gallery check`: is a shard consistent, and does its index still agree with the
exact scan? Everything is measured from what is stored, nothing is taken on trust."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the shard calls the check, not the other way round
    from reir.engine.gallery.shard import Shard


def check_shard(s: Shard) -> list[str]:
    """Problems found (empty = consistent)."""
    problems = []
    ok = s.db.execute("PRAGMA integrity_check").fetchone()[0]
    if ok != "ok":
        problems.append(f"{s.path / 'gallery.sqlite'}: integrity check: {ok}")
    db_keys = np.array([r[0] for r in s.db.execute("SELECT key FROM instances ORDER BY key")], np.int64)
    with s._lock:
        store = s.index.store
        live = np.sort(store.keys.array[store.alive.array])
        damage = s.index.damage
    extra, missing = np.setdiff1d(live, db_keys), np.setdiff1d(db_keys, live)
    if len(extra):
        problems.append(f"the index holds {len(extra)} vector(s) with no instance row")
    if len(missing):
        problems.append(f"{len(missing)} instance(s) missing from the index")
    orphans = s.db.execute("SELECT COUNT(*) FROM instances WHERE image_id NOT IN (SELECT id FROM images)").fetchone()[0]
    if orphans:
        problems.append(f"{orphans} instance row(s) whose image is gone")
    if damage:
        problems.append(f"the index files are unusable ({damage}); searches scan every vector")
    measured = s.measure()
    if measured.agreement is not None and not measured.met:
        a = measured.agreement
        problems.append(
            f"the index agrees with the exact scan less than its targets (top1 {a.top1:.4f}, top10 {a.top10:.4f}, "
            f"recall10 {a.recall10:.4f}); rebuild it"
        )
    return problems
