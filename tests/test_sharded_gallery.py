"""A gallery of S shards answers exactly what one of a single shard holding the same images
answers, and keeps a gallery's guarantees (no Ray here: the merge and the layout alone)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from reir.engine.gallery.database import GalleryError
from reir.engine.gallery.gallery import Gallery, shard_dir, shard_of

SHARDS = 3


@pytest.fixture(scope="module")
def pair(synth_small, tmp_path_factory):
    """The same 120 synthetic images in one gallery and in a 3-shard gallery, and held-out
    expressions encoded by the shipped bundle."""
    from reir.datasets import load_dataset
    from reir.engine.runtime.bundle import default_bundle
    from reir.engine.runtime.engine import Engine

    root = tmp_path_factory.mktemp("sharded")
    engine = Engine.open(default_bundle(), threads=2)
    ds = load_dataset(synth_small)
    paths = [ds.image_path(i) for i in sorted(ds.images)]
    made = dict(model=engine.model_id, bundle=str(engine.bundle.path))
    one = Gallery.create(root / "one", engine.dim, **made)
    many = Gallery.create(root / "many", engine.dim, **made, shards=SHARDS)
    for n, start in enumerate(range(0, len(paths), 40)):
        one.add_images(paths[start : start + 40], engine, tags={"part": str(n)})
        many.add_images(paths[start : start + 40], engine, tags={"part": str(n)})
    texts = sorted({e.text for e in ds.expressions.values()})[:60]
    queries = engine.encode_text(texts)
    yield one, many, queries, root
    one.close()
    many.close()


def _same(a, b):
    """Same paths, boxes and scores in the same order, except where scores tie."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert abs(x.score - y.score) <= 1e-5 * max(1.0, abs(y.score))
        if x.path != y.path:  # allowed only between equal scores
            assert any(abs(h.score - x.score) <= 1e-5 for h in b if h.path == x.path)
        else:
            np.testing.assert_allclose(x.box, y.box, atol=1e-3)


@pytest.mark.parametrize("per_image", [True, False])
@pytest.mark.parametrize("k", [1, 10, 100])
def test_sharded_search_equals_one_gallery(pair, per_image, k):
    one, many, queries, _ = pair
    for a, b in zip(many.search(queries, k, per_image), one.search(queries, k, per_image), strict=True):
        _same(a, b)


def test_images_spread_over_every_shard_by_content_hash(pair):
    _, many, _, _ = pair
    counts = [part.images for part in many.info().per_shard]
    assert sum(counts) == 120 and min(counts) > 20  # a hash spreads them; none is empty
    for s, g in enumerate(many.shards):
        for (sha,) in g.db.execute("SELECT sha256 FROM images"):
            assert shard_of(sha, SHARDS) == s


def test_filtered_search_and_ids_round_trip(pair):
    one, many, queries, _ = pair
    part = {"part": "1"}
    for a, b in zip(many.search(queries, 10, tags=part), one.search(queries, 10, tags=part), strict=True):
        _same(a, b)
    hit = many.search(queries[:1], 1)[0][0]
    row = many.image(hit.image_id)
    assert row["path"] == hit.path and row["tags"] == {"part": row["tags"]["part"]}
    assert row["id"] == hit.image_id and row["shard"] == hit.image_id % SHARDS


def test_resume_skips_what_every_shard_holds(pair, synth_small):
    from reir.datasets import load_dataset
    from reir.engine.runtime.bundle import default_bundle
    from reir.engine.runtime.engine import Engine

    _, many, _, _ = pair
    ds = load_dataset(synth_small)
    report = many.add_images([ds.image_path(i) for i in sorted(ds.images)], Engine.open(default_bundle()))
    assert report.added == 0 and report.already_indexed == 120


def test_remove_and_reopen(pair, tmp_path):
    _, many, queries, root = pair
    import shutil

    copy = tmp_path / "copy"
    many.save()
    shutil.copytree(root / "many", copy, ignore=shutil.ignore_patterns("writer.lock"))
    with Gallery.open(copy, writable=True, progress=False) as g:
        top = g.search(queries[:1], 1)[0][0]
        assert g.remove_images([top.image_id]) == 1
        assert all(h.image_id != top.image_id for h in g.search(queries[:1], 10)[0])
    with Gallery.open(copy, progress=False) as again:  # the removal was committed
        assert again.shard_count == SHARDS and again.info().images == 119
        assert again.check() == []


def test_one_shard_of_many_answers_in_global_ids(pair):
    """What a serving replica opens: one shard, searched alone, in the gallery's ids."""
    _, many, queries, root = pair
    with Gallery.open(root / "many", shard=1, progress=False) as one_shard:
        assert [s.number for s in one_shard.shards] == [1] and one_shard.shard_count == SHARDS
        mine = one_shard.search(queries[:5], 10)
    local = many.shards[1].search(queries[:5], 10, True, None, False)
    for hits, ref in zip(mine, local, strict=True):
        assert len(hits) == 10 and all(h.image_id % SHARDS == 1 for h in hits)
        assert hits == [many.globalise(h, 1) for h in ref]
        assert all(many.image(h.image_id)["path"] == h.path for h in hits)


def test_bad_layouts_are_named(tmp_path, pair):
    _, many, _, root = pair
    with pytest.raises(GalleryError, match="already exists"):
        Gallery.create(root / "many", many.dim, shards=2)
    with pytest.raises(GalleryError, match="shards must be a positive integer"):
        Gallery.create(tmp_path / "zero", many.dim, shards=0)
    with pytest.raises(GalleryError, match="has 3 shard\\(s\\), no shard 7"):
        Gallery.open(root / "many", shard=7)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "shards.json").write_text(json.dumps({"format": "x", "shards": 2}))
    with pytest.raises(GalleryError, match=r"bad/shards.json: not a sharded-gallery manifest"):
        Gallery.open(tmp_path / "bad")
    (tmp_path / "bad" / "shards.json").write_text("{")
    with pytest.raises(GalleryError, match="not a readable sharded-gallery manifest"):
        Gallery.open(tmp_path / "bad")


def test_a_missing_shard_is_refused_not_ignored(tmp_path):
    g = Gallery.create(tmp_path / "g", 8, shards=2)
    g.close()
    shard_dir(tmp_path / "g", 1, 2).rename(tmp_path / "elsewhere")
    with pytest.raises(GalleryError, match="shard 1 of 2 is missing"):
        Gallery.open(tmp_path / "g")


def test_a_killed_create_leaves_nothing_that_looks_like_a_gallery(tmp_path):
    """Creation builds under a temporary name: killed half-way, the target does not exist."""
    code = (
        "import os, reir.engine.gallery.shard as s, reir.engine.gallery.gallery as g\n"
        "real = s.Shard.create\n"
        "def create(path, *a, **k):\n"
        "    if path.name == 'shard-002': os._exit(9)\n"
        "    return real(path, *a, **k)\n"
        "g.Shard.create = create\n"
        f"g.Gallery.create({str(tmp_path / 'g')!r}, 8, shards=4)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 9
    assert not (tmp_path / "g").exists()
    g = Gallery.create(tmp_path / "g", 8, shards=4)  # and the next attempt succeeds
    assert g.info().shards == 4
    g.close()


def test_index_command_makes_a_sharded_gallery(tmp_path, synth_small):
    reir = [sys.executable, "-m", "reir.cli"]
    images = str(synth_small / "images")
    run = lambda *a: subprocess.run([*reir, *a], capture_output=True, text=True, timeout=600)  # noqa: E731
    res = run("index", images, "--gallery", str(tmp_path / "g"), "--shards", "2", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "120 images" in res.stdout
    res = run("index", images, "--gallery", str(tmp_path / "g"), "--shards", "3", "--quiet")
    assert res.returncode == 2 and "has 2 shard(s), not 3" in res.stderr
    res = run("search", "the red circle", "--gallery", str(tmp_path / "g"), "-k", "3", "--json")
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["results"][0]["hits"]) == 3
    res = run("gallery", "check", str(tmp_path / "g"))
    assert res.returncode == 0 and "consistent" in res.stdout, res.stdout
    assert "shard 1: every search scans all vectors: 15" in res.stdout and "too few for a candidate index" in res.stdout
    res = run("gallery", "rebuild", str(tmp_path / "g"))
    assert res.returncode == 0 and "rebuilt:" in res.stdout, res.stderr
