"""`reir bench`: the report's machinery on the shipped model at its real dimension, at sizes a
test can afford: a model change cannot break the report without this failing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SERVER_PYTHON

pytest.importorskip("matplotlib", reason="matplotlib not installed (bench extra)")
pytestmark = pytest.mark.bench


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    from reir.benchmarks.common import encoded_gallery
    from reir.engine.runtime.bundle import Bundle, default_bundle

    b = Bundle.open(default_bundle())
    return b, encoded_gallery(b, 60, tmp_path_factory.mktemp("bench-work"))


def test_tiers_hold_whole_images_real_then_jittered(encoded):
    from reir.benchmarks.indexes import tier_images

    _, g = encoded
    n_real = len(g.embeddings)
    real = list(tier_images(g, n_real // 2))
    rows = np.concatenate([d.embeddings for d in real])
    assert n_real // 2 <= len(rows) <= n_real and np.array_equal(rows, g.embeddings[: len(rows)])
    big = list(tier_images(g, 3 * n_real))
    vecs = np.concatenate([d.embeddings for d in big])
    assert len(vecs) >= 3 * n_real and vecs.shape[1] == g.embeddings.shape[1]
    assert len(np.unique(vecs.round(3), axis=0)) == len(vecs)  # jittered: no two rows equal
    assert max(len(d.scores) for d in big) <= np.diff(g.offsets).max()  # whole images, as encoded


def test_two_stage_with_every_image_in_stage_one_ranks_like_clare(encoded):
    from reir.benchmarks.two_stage import accuracy

    _, g = encoded
    sample = np.arange(len(g.expr_ids))
    same = accuracy(g, 60, m=60, sample=sample)
    assert same["clare_exact"] == same["two_stage"]
    assert same["clare_exact"]["mBR@10(0.5)"] > 0  # the tiny model finds something, so equality means something


@pytest.mark.train
def test_encoder_variants_are_measured_side_by_side_through_the_gallery(encoded, tmp_path):
    """benchmarks/encoders.py on 60 images: fp32 is its own reference, int8 moves the queries a
    little (not at all would mean it was not quantised), and retrieval comes from the gallery."""
    from reir.benchmarks.encoders import markdown, run

    b, g = encoded
    out = run(b, g, tmp_path, ("fp32", "int8-channel"), n=40)
    fp32, int8 = out["rows"]
    assert fp32["cos_min"] == 1.0 and 0.9 < int8["cos_mean"] < 1.0
    import onnx

    from reir.export.precision import int8_candidates

    graph = onnx.load(str(tmp_path / "graphs" / "fp32.onnx"))
    sizes = {i.name: 4 * int(np.prod(i.dims)) for i in graph.graph.initializer}
    nodes = {n.name: n for n in graph.graph.node}
    tower_mb = sum(sizes.get(nodes[name].input[1], 0) for name in int8_candidates(graph)) / 1e6
    assert tower_mb > 1 and int8["mb"] < fp32["mb"] - 0.6 * tower_mb  # each tower product's weights in int8
    assert fp32["p50_ms"] > 0 and fp32["batch16_ms_per_text"] > 0
    assert 0 < fp32["mBR@10(0.5)"] <= 100 and abs(fp32["mBR@10(0.5)"] - int8["mBR@10(0.5)"]) < 30
    text = markdown({"machine_label": "test", "command": "c", "date": "d", "encoders": out})
    assert "| int8-channel |" in text and "(+0.0)" in text  # fp32's deltas to itself


def test_a_score_cut_is_measured_through_galleries_built_with_it(encoded, tmp_path):
    """benchmarks/instances.py on 60 images: a cut stores fewer rows, and its accuracy comes
    from a gallery that holds only them."""
    from reir.benchmarks.instances import markdown, run

    b, g = encoded
    out = run(b, g, tmp_path, cuts=(0.0, 0.1))
    full, cut = out["rows"]
    assert full["instances"] == len(g.embeddings) and full["share"] == 1.0
    assert len(g.image_ids) <= cut["instances"] < full["instances"]  # each image keeps at least one
    assert 0 < cut["mBR@10(0.5)"] <= 100 and 0 < full["REC@0.5"] <= 100
    text = markdown({"machine_label": "test", "command": "c", "date": "d", "instances": out})
    assert "| 0.1 |" in text and "(+0.0)" in text


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


def test_every_report_section_runs_and_writes_json_markdown_and_figures(tmp_path):
    """The whole report (every section, the shipped bundle) at sizes CI affords."""
    from reir.benchmarks import capacity, serving
    from reir.benchmarks.run import SECTIONS, run_report
    from reir.engine.runtime.bundle import default_bundle

    out = tmp_path / "results"
    path = run_report(out, default_bundle(), tmp_path / "work", tiers=(20, 40), index_sizes=(2500,), requests=24)
    report = json.loads(path.read_text())
    assert not list(out.glob("*.partial.json"))
    assert report["bundle"]["dim"] == 448 and set(SECTIONS) <= set(report)
    assert report["machine"]["cores"] and report["machine"]["versions"]["faiss-cpu"]
    rows = report["indexes"]["rows"]
    assert {r["vectors"] for r in rows} == {rows[0]["vectors"]}
    designs = {r["design"] for r in rows}
    assert {"gallery (default)", "gallery index, fixed", "exact scan (faiss f16)"} <= designs
    assert any(d.startswith("usearch HNSW") for d in designs) and any(d.startswith("faiss IVF") for d in designs)
    assert all(r["top1"] == 1.0 and r["top10"] == 1.0 for r in rows if r["design"].startswith("exact scan"))
    assert all(0 <= r["top10"] <= 1 and r["p50_ms"] > 0 for r in rows)
    for f in report["indexes"]["filtered"]:
        assert 0 <= f["top1"] <= 1 and f["ratio_p50"] > 0
    stage_rows = report["two_stage"]
    assert [r["images"] for r in stage_rows] == [20, 40]
    for r in stage_rows:  # the two-stage query ran the visual encoder on its m images; CLARE searched a real gallery
        assert r["latency"]["two_stage"]["stages_p50_ms"]["ground"] > 0
        assert r["latency"]["clare"]["index_instances"] > 0
        assert {"clare", "clare_exact", "two_stage"} <= set(r["accuracy"])
    assert report["end_to_end"]["rows"]["embedded_c1"]["p50_ms"] > 0
    cl = report["cluster"]
    assert {f"serve_{s}shard_c{c}" for s in (1, 2, 4) for c in (1, 4, 16)} <= set(cl["rows"])
    assert all(r["n"] == cl["requests"] and r["p50_ms"] > 0 for r in cl["rows"].values())
    assert set(cl["indexing"]["ray"]) == {"1", "2", "4"} and min(cl["indexing"]["ray"].values()) > 0
    sv = report["serving"]
    served = {"embedded_batched", "serve_1shard", "serve_2shard"}
    if SERVER_PYTHON.exists():  # make test builds it; without it the section says why Triton is missing
        served.add("triton_retrieve")
    else:
        assert "not measured" in sv["triton"]
    assert set(sv["paths"]) == {"embedded_threads", *served}
    for name in served:
        p = sv["paths"][name]
        assert set(p["closed"]) == {"1", "4", "16", "64"} and all(r["qps"] > 0 for r in p["closed"].values())
        assert len(p["open"]) == len(serving.RATES) and all(r["errors"] == 0 and r["sent"] > 0 for r in p["open"])
    for name in ("serve_1shard", "serve_2shard"):  # where a Serve path's CPU goes
        cpu = sv["paths"][name]["cpu_ms_per_request_16"]
        assert cpu["front"] > 0 and cpu["proxy"] > 0 and cpu["shards"] > 0
    assert sv["serve_floor"]["16"]["qps"] > 0 and sv["serve_floor"]["16"]["cpu_ms_per_request"]["proxy"] > 0
    for name in ("embedded_batched", "serve_1shard"):  # a commit was seen by a served search, in time
        assert 0 < sv["visibility"][name]["max_s"] < 30
    assert sv["ceiling"]["two_core_qps"] > 0
    md = path.with_suffix(".md").read_text()
    assert "## Serving under load" in md and f"{report['name']}-under-load.png" in report["figures"]
    assert "## Headlines" in md and report["machine_label"] in md and "CLARE vs two-stage at 40 images" in md
    assert "accuracy at 40 images" in md and "through the gallery's search" in md
    assert "## Search at scale" in md and "instances: the gallery agrees with the exact ranking" in md
    assert f"{report['name']}-serving.png" in report["figures"]
    for name in report["figures"]:
        assert (out / name).stat().st_size > 10_000  # a drawn PNG, not an empty canvas
    m = capacity.measured(report, report, None)
    plan = capacity.plan(m, qps=100, node_cores=32, node_gib=256, gpus=(8,))
    assert [r["shards"] for r in plan] == sorted(r["shards"] for r in plan) and plan[-1]["shards"] > plan[0]["shards"]
    assert capacity.main([str(path), str(path)]) == 0
    cut = capacity.with_cut(m, {"instances": {"rows": [{"min_score": 0.1, "per_image": 2.0}]}}, 0.1)
    with_cut = capacity.plan(cut, qps=100, node_cores=32, node_gib=256, gpus=(8,))
    assert with_cut[-1]["shards"] < plan[-1]["shards"]  # fewer rows per image, fewer shards
    with pytest.raises(KeyError, match=r"no cut 0\.2 measured"):
        capacity.with_cut(m, {"instances": {"rows": [{"min_score": 0.1, "per_image": 2.0}]}}, 0.2)
