from __future__ import annotations

import os
from pathlib import Path

import pytest

# No network at run time: anything that tries a model hub fails instead of downloading.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """A small synthetic benchmark shared by the tests that only read it."""
    from reir.engine.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth") / "data"
    generate(out, SynthConfig(images=120, seed=7), progress=False)
    return out
