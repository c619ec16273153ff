"""`reir bench`: the report's machinery on the tiny model, at sizes a test can afford."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="matplotlib not installed (bench extra)")


def test_isometric_lift_keeps_every_inner_product():
    from reir.benchmarks.indexes import isometry, model_vectors

    rng = np.random.default_rng(0)
    base = rng.standard_normal((50, 16)).astype(np.float32)
    lift = isometry(16, 64, rng)
    a, b = base @ lift.T, base[::-1] @ lift.T
    assert np.allclose((a * b).sum(1), (base * base[::-1]).sum(1), atol=1e-4)
    v = model_vectors(base, 300, lift, rng)
    assert v.shape == (300, 64) and len(np.unique(v.round(5), axis=0)) == 300  # jittered: no duplicates


@pytest.fixture(scope="module")
def encoded(tiny_bundle, tmp_path_factory):
    from reir.benchmarks.common import encoded_gallery
    from reir.engine.bundle import Bundle

    b = Bundle.open(tiny_bundle)
    return b, encoded_gallery(b, 60, tmp_path_factory.mktemp("bench-work"))


def test_two_stage_with_every_image_in_stage_one_ranks_like_clare(encoded):
    from reir.benchmarks.two_stage import accuracy

    _, g = encoded
    sample = np.arange(len(g.expr_ids))
    same = accuracy(g, 60, m=60, sample=sample)
    assert same["clare"] == same["two_stage"]
    assert same["clare"]["mBR@10(0.5)"] > 0  # the tiny model finds something, so equality means something


def test_report_writes_json_markdown_and_figures(tiny_bundle, tmp_path):
    from reir.benchmarks.report import run_report

    out = tmp_path / "results"
    path = run_report(
        out,
        tiny_bundle,
        tmp_path / "work",
        sections=("stages", "indexes", "two_stage"),
        tiers=(30, 60),
        index_sizes=(500, 2000),
        connectivity=(16, 32),
    )
    report = json.loads(path.read_text())
    assert not list(out.glob("*.partial.json"))
    assert report["machine"]["cores"] and report["machine"]["versions"]["usearch"]
    exact = [r for r in report["indexes"] if r["index"] in ("numpy exact", "faiss IndexFlatIP")]
    assert exact and all(r["recall@10"] == 1.0 for r in exact)
    hnsw = [r for r in report["indexes"] if r["index"] == "usearch f16"]
    assert {r["expansion_search"] for r in hnsw} == {16, 32, 64, 128, 256}
    assert all(0 < r["recall@10"] <= 1 and r["k10_p50_ms"] > 0 for r in hnsw)
    dense = [r for r in report["indexes"] if r["index"] in ("usearch f16 M32", "faiss HNSWFlat M32")]
    assert len(dense) == 2 * 2 * 5 and all(r["connectivity"] == 32 for r in dense)  # 2 kinds x 2 sizes x 5 ef
    assert "--index-sizes 500,2000 --connectivity 16,32 --work" in report["command"]
    rows = report["two_stage"]
    assert [r["images"] for r in rows] == [30, 60]
    for r in rows:  # the two-stage query ran the visual encoder on its m images
        assert r["latency"]["two_stage"]["stages_p50_ms"]["ground"] > 0
        assert r["latency"]["clare"]["index_instances"] > 0
    md = path.with_suffix(".md").read_text()
    assert "## Headlines" in md and report["machine_label"] in md and "CLARE vs two-stage at 60 images" in md
    assert "accuracy at 60 images" in md
    assert "usearch f16 M32 vs M16 at 2,000 vectors: best recall@10" in md
    assert len(report["figures"]) == 3
    for name in report["figures"]:
        assert (out / name).stat().st_size > 10_000  # a drawn PNG, not an empty canvas


def test_step_comparison_times_both_configs_on_every_stage(tmp_path):
    pytest.importorskip("torch", reason="torch not installed (training extra)")
    from reir.benchmarks.recipe_steps import compare_steps

    tiny = Path(__file__).resolve().parents[1] / "configs" / "synth_tiny.yaml"

    shared = [f"out_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", "data.generate_images=48"]
    out = tmp_path / "steps.json"
    res = compare_steps(tiny, ["model.text.more.enabled=false"], steps=2, warmup=1, out=out, shared=shared)
    assert [r["stage"] for r in res["stages"]] == ["grounding", "clia"]
    for r in res["stages"]:
        assert r["recipe_s"]["n"] == r["variant_s"]["n"] == 2 and r["recipe_s"]["median"] > 0
        assert r["ratio_median"] == pytest.approx(r["variant_s"]["median"] / r["recipe_s"]["median"], rel=1e-3)
    assert json.loads(out.read_text()) == res and not list(tmp_path.glob(".steps.json.*"))  # no temp file left
