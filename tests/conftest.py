"""Shared fixtures, and the test tiers (pyproject.toml lists the markers).

    make test-fast   everything but the marked tiers: the engine, galleries, the contract,
                     data, metrics, the layering (under 3 minutes on the 2-core machine)
    make test        every tier, what CI runs: + training (`train`), export (`export`),
                     a real tritonserver (`triton`), real Ray clusters (`cluster`), search
                     at scale (`scale`)

Engine, gallery, Triton and cluster tests use the bundle shipped with the package
(models/synth), so they need no torch and no training run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No network at run time: anything that tries a model hub fails instead of downloading.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Ray (tests/test_cluster.py) keeps every process on 127.0.0.1 only when this is set before
# it is imported, and sends no usage report (docs/cluster.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Under pytest-xdist each worker has a core to itself: one compute thread each (torch,
# BLAS, ONNX Runtime's and the subprocesses' defaults), not two workers fighting over both.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "synth_tiny.yaml"
SERVER_PYTHON = Path(os.environ.get("REIR_TRITON_PYTHON", ROOT / ".venv-triton" / "bin" / "python"))


FIXTURE_TIERS = {"tiny_run": "train", "tiny_bundle": "export", "triton": "triton"}
# `make test` runs pytest-xdist workers. A group runs on one worker, so an expensive session
# fixture is built once: the modules that use the tiny model share one group, the two that
# use the shared tritonserver another, every other module is its own. The longest groups
# come first, so that they start at once and the short ones fill in around them.
GROUPS = {
    "test_export": "tiny",
    "test_training_tiny": "tiny",
    "test_training_ema": "tiny",
    "test_triton": "servers",
    "test_conformance": "servers",
}
FIRST = ("tiny", "servers", "test_benchmarks", "test_cluster", "test_search_at_scale", "test_index_damage")


def group_of(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
    return GROUPS.get(module, module)


def pytest_collection_modifyitems(items):
    """A test that uses a tier's fixture is in that tier, whether or not its module says so;
    the longest groups run first (a stable sort: each module stays together)."""
    for item in items:
        for fixture, mark in FIXTURE_TIERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(getattr(pytest.mark, mark))
    rank = {g: i for i, g in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(group_of(item.nodeid), len(FIRST)))


def pytest_xdist_make_scheduler(config, log):
    """Whole groups to a worker (xdist's own `loadgroup` does not group under pytest 9)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return GroupScheduling(config, log)


def same_response(a, b, where: str = "") -> None:
    """Two SearchResponses with the same hits (ids, keys, paths, boxes exactly; scores to the
    last bits, as two processes' float32 text encodings may differ there), flags and shards."""
    import numpy as np

    assert (a.partial, a.missing_shards) == (b.partial, b.missing_shards), where
    assert [r.truncated for r in a.results] == [r.truncated for r in b.results], where
    for x, y in zip(a.results, b.results, strict=True):
        key = lambda r: [(h.image_id, h.instance_key, h.path, h.box) for h in r.hits]  # noqa: E731
        assert key(x) == key(y), where
        scores = [h.score for h in x.hits], [h.score for h in y.hits]
        np.testing.assert_allclose(*scores, rtol=1e-5, atol=1e-6, err_msg=where)


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """A small synthetic benchmark shared by the tests that only read it."""
    from reir.datasets.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth") / "data"
    generate(out, SynthConfig(images=120, seed=7), progress=False)
    return out


@pytest.fixture(scope="session")
def engine():
    """The shipped model in ONNX Runtime, one thread (tests run beside each other)."""
    from reir.engine.runtime.bundle import default_bundle
    from reir.engine.runtime.engine import Engine

    return Engine.open(default_bundle(), threads=1)


@pytest.fixture(scope="session")
def served_root(synth_small, engine, tmp_path_factory):
    """A gallery root holding `main` (the 120 images of synth_small, tagged by thirds) and
    `other` (three of them, indexed under another model's id): what the conformance and
    server tests serve. Returns (root, held-out expressions)."""
    from reir.datasets import load_dataset
    from reir.engine.gallery.gallery import Gallery

    root = tmp_path_factory.mktemp("served") / "galleries"
    ds = load_dataset(synth_small)
    paths = [ds.image_path(i) for i in sorted(ds.images)]
    with Gallery.for_bundle(root / "main", engine.bundle, progress=False) as g:
        for n, start in enumerate(range(0, len(paths), 40)):
            g.add_images(paths[start : start + 40], engine, tags={"part": str(n)})
    with (
        Gallery.open(root / "main", progress=False) as main,
        Gallery.create(root / "other", engine.dim, model="0" * 64) as g,
    ):
        g.add(list(main.stored(limit=3)))
    texts = sorted({e.text for e in ds.split_expressions("test")})
    return root, texts


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The synth_tiny recipe trained once (about 2 minutes): (config, trainer, final checkpoint)."""
    pytest.importorskip("torch", reason="torch not installed (training extra)")
    from reir.training.config import load_config
    from reir.training.trainer import Trainer

    root = tmp_path_factory.mktemp("tiny")
    cfg = load_config(TINY_CONFIG, {"out_dir": str(root / "runs"), "data.root": str(root / "data")})
    trainer = Trainer(cfg, progress=False)
    final = trainer.fit()
    return cfg, trainer, final


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory) -> Path:
    """The tiny model exported to an fp32 bundle (its accuracy gates ran during export)."""
    pytest.importorskip("onnx", reason="onnx not installed (export extra)")
    from reir.export.write_bundle import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    export_bundle(tiny_run[2], out, probe_images=300, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def triton(served_root, tmp_path_factory):
    """A real tritonserver (nvidia-pytriton's, CPU, `pyort` configs) on 127.0.0.1 serving the
    shipped bundle's repository over `served_root` (default gallery `main`)."""
    if not SERVER_PYTHON.exists():
        pytest.skip(f"Triton server environment not built ({SERVER_PYTHON}; run `make triton-env`)")
    pytest.importorskip("tritonclient.grpc", reason="tritonclient not installed (triton extra)")
    from reir.engine.runtime.bundle import default_bundle
    from reir.engine.serving.triton_server import TritonServer
    from reir.export.triton import write_repository

    root, _ = served_root
    repo = write_repository(default_bundle(), tmp_path_factory.mktemp("triton") / "repo", root, "main")
    server = TritonServer(repo, SERVER_PYTHON, "pyort")
    try:
        server.start(timeout=180)
    except Exception:
        server.stop()
        raise
    yield server
    server.stop()
    assert server.proc.poll() is not None  # stopped by its pid
