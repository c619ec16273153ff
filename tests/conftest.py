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


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """A small synthetic benchmark shared by the tests that only read it."""
    from reir.datasets.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth") / "data"
    generate(out, SynthConfig(images=120, seed=7), progress=False)
    return out


TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synth_tiny.yaml"


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
