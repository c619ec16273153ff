"""The model shipped in models/synth: it opens, verifies, and retrieves as its manifest says."""

from __future__ import annotations

from pathlib import Path

from reir.datasets.synth import SynthConfig, generate
from reir.engine.runtime.bundle import Bundle, default_bundle
from reir.evaluation.protocol import evaluate_retrieval


def test_shipped_bundle_reaches_its_recorded_accuracy_on_a_fresh_gallery(tmp_path):
    b = Bundle.open(default_bundle())  # checksums of every file verified
    m = b.manifest
    assert all(g["passed"] for g in m["probe"]["gates"])
    from reir.training.config import architecture_diffs, load_config  # dataclasses + YAML, no torch

    recipe = load_config(Path(__file__).resolve().parents[1] / "configs" / "synth.yaml")
    # exported from the synth recipe's architecture (which text layers trained is not in the model)
    assert not architecture_diffs(m["source"]["config"]["model"], recipe.to_dict()["model"])
    # A gallery the export never saw (the probe set used seed 61), the same size and protocol.
    ds, _ = generate(tmp_path / "fresh", SynthConfig(images=300, seed=62, fractions=(0, 0, 1)), progress=False)
    report = evaluate_retrieval(
        b.visual_encoder(threads=2), b.text_encoder(threads=2), ds, "test", b.input_hw, progress=False
    )
    recorded = m["probe"]["onnx"]
    n = report.n_queries
    for key in ("mBR@1(0.5)", "mBR@10(0.5)", "REC@0.5"):
        p = recorded[key] / 100
        tolerance = 100 * 4 * (p * (1 - p) / n) ** 0.5 + 1  # 4 binomial standard errors + 1 point
        assert abs(report.metrics[key] - recorded[key]) <= tolerance, (key, report.metrics[key], recorded[key])
