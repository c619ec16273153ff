"""Every file under G/index/ is a cache: garbage, truncated or missing, it costs speed, never
an answer. A reader serves the exact scan (the same answers as an undamaged gallery's exact
search, no traceback, the damage named in `info()`); a writer rebuilds the index from SQLite.

The files are listed from a real gallery's index directory, not from a list kept here, so
a file a new candidate design adds is covered by the same tests. `reir search` on a damaged
gallery of the shipped model: tests/test_search_at_scale.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from random_gallery import exact_keys, images, sample

from reir.engine.gallery.gallery import Gallery

DIM = 256
DAMAGES = ("garbage", "truncated", "missing")


# what a gallery of each design writes (checked against the real directory below)
FILES = {
    "projected-pq": ["codes.i8", "images.i64", "keys.i64", "manifest.json", "pq.faiss", "space.npz", "vectors.f16"],
    "ivf-pq": ["codes.i8", "images.i64", "ivf.faiss", "keys.i64", "manifest.json", "space.npz", "vectors.f16"],
}
CASES = [(design, name) for design in FILES for name in FILES[design]]


@pytest.fixture(scope="module")
def pristines(tmp_path_factory):
    """One pristine gallery per design, built on first use."""
    built = {}

    def get(design: str):
        if design not in built:
            built[design] = _pristine(tmp_path_factory.mktemp(f"damage-{design}") / "g", design)
        return built[design]

    return get


def _pristine(path: Path, design: str):
    """30,000 rows of 256-d: large enough that its index serves (measured faster than the scan)."""
    rng = np.random.default_rng(0)
    with Gallery.create(path, DIM, queries=sample(rng, dim=DIM), candidates=design) as g:
        for start in range(0, 1250, 250):
            g.add(images(rng, 250, start, per=24, dim=DIM), save_index=False)
        g.save()
        assert g.shards[0].index.uses_candidates, "the index must serve, or damage to it would go unseen"
        queries = sample(np.random.default_rng(1), 12, dim=DIM)
        expected = [exact_keys(g, q, 5) for q in queries]
    files = sorted(p.name for p in (path / "index").iterdir() if p.is_file())
    return path, files, queries, expected


def test_every_design_is_covered():
    from reir.engine.search.candidates import DESIGNS

    assert sorted(FILES) == sorted(DESIGNS)


@pytest.mark.parametrize("design", FILES)
def test_the_file_list_is_the_real_one(pristines, design):
    assert pristines(design)[1] == FILES[design]


def _damaged(pristine, tmp_path: Path, name: str, damage: str) -> Path:
    src = pristine[0]
    copy = tmp_path / "g"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("writer.lock"))
    f = copy / "index" / name
    if damage == "missing":
        f.unlink()
    elif damage == "truncated":
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    else:
        size = f.stat().st_size
        f.write_bytes(np.random.default_rng(7).integers(0, 256, max(size, 64), np.uint8).tobytes())
    return copy


def _answers(g: Gallery, queries) -> list[list[int]]:
    return [[h.instance_key for h in g.search(q, k=5, per_image=False)[0]] for q in queries]


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize(("design", "name"), CASES)
def test_a_reader_serves_the_exact_scan(pristines, tmp_path, design, name, damage):
    pristine = pristines(design)
    _, _, queries, expected = pristine
    copy = _damaged(pristine, tmp_path, name, damage)
    with Gallery.open(copy, progress=False) as g:
        index = g.info().per_shard[0].index
        assert index.kind == "exact scan" and index.damage, index
        assert _answers(g, queries) == expected
        assert any("unusable" in p for p in g.check())  # `reir gallery check` names it


@pytest.mark.parametrize(("design", "name"), CASES)
def test_a_writer_rebuilds_it(pristines, tmp_path, design, name):
    pristine = pristines(design)
    _, _, queries, expected = pristine
    copy = _damaged(pristine, tmp_path, name, "garbage")
    with Gallery.open(copy, writable=True, progress=False) as g:
        index = g.info().per_shard[0].index
        assert index.kind == design and index.damage is None and g.check() == []
        assert _answers(g, queries) == expected
    manifest = json.loads((copy / "index" / "manifest.json").read_text())
    assert manifest["rows"] == 30_000 and manifest["candidates"]["kind"] == design
    with Gallery.open(copy, progress=False) as again:  # and the rebuilt files serve the next reader
        assert again.shards[0].index.uses_candidates and _answers(again, queries) == expected
