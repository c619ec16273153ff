"""The embedded engine: real ONNX Runtime sessions of the shipped bundle, a real search
index, a real SQLite file."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image as PILImage

from reir.datasets.synth import SynthConfig, generate
from reir.engine.gallery.database import GalleryError, GalleryLocked
from reir.engine.gallery.gallery import Gallery


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    ds, _ = generate(tmp_path_factory.mktemp("imgs") / "d", SynthConfig(images=60, seed=99), progress=False)
    return ds, [ds.image_path(i) for i in sorted(ds.images)]


def _reir(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reir.cli", *args], capture_output=True, text=True, timeout=600, **kw)


def test_text_cache_and_cleaning(engine):
    a = engine.encode_text(["The red circle.", "the red circle", "a blue star"])
    assert a.shape == (3, engine.dim) and np.array_equal(a[0], a[1])  # cleaned to the same text
    again = engine.encode_text(["a blue star"])
    assert np.array_equal(again[0], a[2]) and len(engine._cache) >= 2


def test_detect_paths_arrays_and_original_pixels(engine, images, tmp_path):
    _, paths = images
    from_path = engine.detect([paths[0]])[0]
    arr = np.asarray(PILImage.open(paths[0]).convert("RGB"))
    from_array = engine.detect([arr])[0]
    np.testing.assert_allclose(from_path.boxes, from_array.boxes, atol=1e-4)
    big = tmp_path / "big.png"  # the same picture at 2x: the boxes come back in its own pixels
    PILImage.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2), PILImage.NEAREST).save(big)
    d2 = engine.detect([big])[0]
    assert len(d2.scores) >= 1 and d2.boxes.max() > arr.shape[0]  # scaled past the small image's size
    assert (d2.boxes[:, 2] <= 2 * arr.shape[1] + 1).all()


def test_gallery_search_equals_brute_force(engine, images, tmp_path):
    from reir.engine.serving.retriever import Retriever

    ds, paths = images
    g = Gallery.create(tmp_path / "g", engine.dim, "f32", model=engine.model_id)
    rep = g.add_images(paths[:40], engine, tags={"set": "a"}, batch=8)
    g.add_images(paths[40:], engine, tags={"set": "b"}, batch=8)
    assert rep.added == 40 and rep.skipped == 0 and g.info().images == 60 and g.check() == []
    r = Retriever(engine, g)
    texts = [e.text for e in list(ds.expressions.values())[:20]]
    q = engine.encode_text(texts)
    db = g.shards[0].db
    emb = np.stack(
        [np.frombuffer(b, np.float32) for (b,) in db.execute("SELECT embedding FROM instances ORDER BY key")]
    )
    keys = [k for (k,) in db.execute("SELECT key FROM instances ORDER BY key")]
    for text, vec in zip(texts, q, strict=True):
        hits = r.search(text, k=5, per_image=False).hits
        exact = [keys[i] for i in np.argsort(-(emb @ vec), kind="stable")[:5]]
        assert [h.instance_key for h in hits] == exact
        np.testing.assert_allclose([h.score for h in hits], [float(emb[keys.index(e)] @ vec) for e in exact], atol=1e-4)
        scan = g.search(vec, k=5, per_image=False, exact=True)[0]  # the reference scan: the same answer
        assert [h.instance_key for h in scan] == exact
        per_image = r.search(text, k=10).hits
        assert len({h.image_id for h in per_image}) == len(per_image) == 10
        only_b = r.search(text, k=5, tags={"set": "b"}).hits
        assert only_b and all(g.image(h.image_id)["tags"] == {"set": "b"} for h in only_b)
    first = r.search(texts[0], k=1).hits[0]
    assert g.remove_images([first.image_id]) == 1
    assert first.image_id not in {h.image_id for h in r.search(texts[0], k=59).hits}
    g.close()
    with Gallery.open(tmp_path / "g") as again:  # reopened read-only: same answers, consistent
        assert again.check() == [] and again.info().images == 59


def test_one_writer_and_readers_during_an_add(engine, images, tmp_path):
    _, paths = images
    g = Gallery.create(tmp_path / "g", engine.dim, model=engine.model_id)
    g.add_images(paths[:10], engine)
    with pytest.raises(GalleryLocked, match=rf"being written by pid {os.getpid()}"):
        Gallery.open(tmp_path / "g", writable=True)
    q = engine.encode_text(["the red circle"])
    errors, counts = [], []

    def reader():
        try:
            for _ in range(30):
                counts.append(len(g.search(q, k=5)[0]))
        except Exception as e:  # pragma: no cover - the assertion below reports it
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    g.add_images(paths[10:], engine, batch=4)
    for t in threads:
        t.join()
    assert not errors and counts and min(counts) == 5
    assert g.check() == []
    g.close()


def _source(paths, n: int, where):
    """A directory holding copies of the first `n` images: what `reir index` is pointed at."""
    src = where / "src"
    src.mkdir()
    for p in paths[:n]:
        (src / p.name).write_bytes(p.read_bytes())
    return src


def test_bad_images_are_reported_by_path_and_skipped(engine, images, tmp_path):
    _, paths = images
    src = _source(paths, 3, tmp_path)
    (src / "empty.png").write_bytes(b"")
    (src / "truncated.png").write_bytes(paths[3].read_bytes()[:200])
    (src / "text.png").write_text("not an image")
    (src / "notes.xyz").write_text("hello")
    PILImage.new("1", (8200, 8200)).save(src / "huge.png")  # 67 M pixels, a few KB on disk
    res = _reir("index", str(src), "--gallery", str(tmp_path / "g"), "--bundle", str(engine.bundle.path), "--quiet")
    assert res.returncode == 1, res.stderr
    for name, why in [
        ("empty.png", "empty file"),
        ("truncated.png", "corrupt or truncated"),
        ("text.png", "not an image"),
        ("notes.xyz", "unsupported format"),
        ("huge.png", "too large"),
    ]:
        assert any(name in line and why in line for line in res.stderr.splitlines()), (name, res.stderr)
    assert "added 3 image(s)" in res.stdout and "5 skipped" in res.stdout and "Traceback" not in res.stderr


def test_index_design_is_chosen_at_creation_and_an_unknown_one_writes_nothing(engine, images, tmp_path):
    _, paths = images
    src = _source(paths, 3, tmp_path)
    bundle = str(engine.bundle.path)
    res = _reir("index", str(src), "--gallery", str(tmp_path / "bad"), "--bundle", bundle, "--design", "hnsw")
    assert res.returncode == 2 and "unknown candidate index design 'hnsw'" in res.stderr, res.stderr
    assert "ivf-pq" in res.stderr and "Traceback" not in res.stderr and not (tmp_path / "bad").exists()
    res = _reir(
        "index", str(src), "--gallery", str(tmp_path / "g"), "--bundle", bundle, "--design", "ivf-pq", "--quiet"
    )
    assert res.returncode == 0, res.stderr
    with Gallery.open(tmp_path / "g") as g:  # too small for an index yet: the design waits in SQLite
        assert g.shards[0].index.kind == "ivf-pq"


def test_killed_indexing_loses_nothing_and_resumes(engine, tmp_path):
    ds, _ = generate(tmp_path / "d", SynthConfig(images=240, seed=5), progress=False)
    gallery = tmp_path / "g"
    cmd = [sys.executable, "-m", "reir.cli", "index", str(ds.root / "images"), "--gallery", str(gallery)]
    cmd += ["--bundle", str(engine.bundle.path), "--batch", "4", "--quiet", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    committed = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            with sqlite3.connect(f"file:{gallery / 'gallery.sqlite'}?mode=ro", uri=True) as db:
                committed = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        except sqlite3.Error:
            continue
        if committed >= 12:
            break
    assert proc.poll() is None, "indexing finished before it could be killed; make the job longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Gallery.open(gallery, progress=False) as g:  # stale index files: brought up to date from SQLite
        assert g.check() == []
        n = g.info().images
        assert n >= committed
        rows = g.shards[0].db.execute("SELECT image_id, embedding FROM instances GROUP BY image_id").fetchall()
        for image_id, blob in rows:  # every committed image is searchable
            hits = g.search(np.frombuffer(blob, np.float32)[None], k=3)[0]
            assert image_id in {h.image_id for h in hits}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert f"{n} already indexed" in res.stdout
    with Gallery.open(gallery, progress=False) as g:
        assert g.info().images == 240 and g.check() == []
        assert g.shards[0].db.execute("SELECT COUNT(DISTINCT sha256) FROM images").fetchone()[0] == 240


def test_gallery_errors_name_the_problem(engine, tmp_path):
    from reir.engine.serving.retriever import Retriever

    with pytest.raises(GalleryError, match="no gallery here"):
        Gallery.open(tmp_path / "nothing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "gallery.sqlite").write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(GalleryError, match="not a readable gallery database"):
        Gallery.open(tmp_path / "junk")
    g = Gallery.create(tmp_path / "other", engine.dim, model="some-other-model")
    with pytest.raises(GalleryError, match="indexed with another model"):
        Retriever(engine, g)
    with pytest.raises(GalleryError, match="indexed with another model"):  # nor extended with this one
        g.add_images([], engine)
    g.close()
    res = _reir("search", "a red circle", "--gallery", str(tmp_path / "nothing"))
    assert res.returncode == 2 and "no gallery here" in res.stderr


def test_unpad_scales_to_original_pixels_and_clips_to_the_image():
    """A box reaching past the border (a predicted centre and size can) comes back inside the
    picture; padding rows are dropped; the others scale from input to original pixels."""
    from reir.engine.runtime.detections import unpad

    boxes = np.array([[[10.0, 20.0, 70.0, 60.0], [-5.0, 100.0, 140.0, 133.0], [0.0, 0.0, 1.0, 1.0]]], np.float32)
    scores, emb, num = np.array([[0.9, 0.8, 0.0]]), np.ones((1, 3, 4), np.float32), np.array([2])
    (d,) = unpad((boxes, scores, emb, num), [(256, 64)], (128, 128))  # original 256 wide, 64 high
    np.testing.assert_allclose(d.boxes, [[20.0, 10.0, 140.0, 30.0], [0.0, 50.0, 256.0, 64.0]])
    assert d.scores.tolist() == [0.9, 0.8] and d.embeddings.shape == (2, 4)


def test_search_refuses_k_out_of_range_by_name(engine, images, tmp_path):
    _, paths = images
    with Gallery.for_bundle(tmp_path / "g", engine.bundle) as g:
        g.add_images(paths[:3], engine)
    for k in ("0", "-5", "101"):
        res = _reir("search", "the red circle", "--gallery", str(tmp_path / "g"), "-k", k)
        assert res.returncode == 2 and f"k: must be an integer in [1, 100], got {k}" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and "rank" not in res.stdout


def test_truncation_comes_from_the_one_encoding(engine, images, tmp_path):
    """The engine cleans and tokenizes each text once; the truncation flag comes with the vector
    and with each expression's result."""
    from reir.engine.serving.retriever import Retriever

    _, paths = images
    long = "the small red circle left of the blue star " * 20
    vecs, cut = engine.encode(["The red circle.", long])
    assert cut == [False, True] and np.array_equal(vecs[0], engine.encode_text(["the red circle"])[0])
    with Gallery.for_bundle(tmp_path / "g", engine.bundle) as g:
        g.add_images(paths[:3], engine)
        r = Retriever(engine, g)
        assert [x.truncated for x in r.search(long, k=2).results] == [True]
        assert [x.truncated for x in r.search(["a red circle", long], k=2).results] == [False, True]


def test_decoded_images_are_detected_as_their_files(engine, images):
    """The indexer hands the decoded image straight to the engine (no array round trip)."""
    from reir.engine.runtime.image import read_rgb

    _, paths = images
    a = engine.detect([paths[1]])[0]
    b = engine.detect([read_rgb(paths[1])])[0]
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)


def test_a_text_query_never_loads_the_detector(tmp_path):
    """A search front end pays for the text graph only: the visual session is made on first use."""
    from reir.engine.runtime.bundle import default_bundle
    from reir.engine.runtime.engine import Engine

    e = Engine.open(default_bundle(), threads=1)
    e.encode_text(["the red circle"])
    assert e._visual is None and e._text is not None
    e.detect([np.zeros((40, 40, 3), np.uint8)])
    assert e._visual is not None
