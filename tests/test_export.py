"""Export: the tiny trained model becomes a gated bundle that ONNX Runtime runs like PyTorch."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch not installed (training extra)")
pytest.importorskip("onnx", reason="onnx not installed (export extra)")
pytestmark = pytest.mark.export

from reir.engine.runtime.bundle import Bundle, BundleError  # noqa: E402

PROBE = 300
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def bundles(tiny_run, tiny_bundle, tmp_path_factory):
    """fp32, fp16 and int8 bundles of the tiny model; each export ran its accuracy gates."""
    from reir.export.write_bundle import export_bundle

    _, _, ckpt = tiny_run
    root = tmp_path_factory.mktemp("bundles")
    out = {"fp32": tiny_bundle}
    for precision in ("fp16", "int8"):
        out[precision] = root / precision
        export_bundle(ckpt, out[precision], precision=precision, probe_images=PROBE, log=lambda *_: None)
    out["w16"] = root / "w16"
    export_bundle(ckpt, out["w16"], precision="w16", vocab=2000, probe_images=PROBE, log=lambda *_: None)
    return out


def test_fp32_bundle_passes_its_gates_and_describes_itself(bundles, tiny_run):
    cfg, _, _ = tiny_run
    b = Bundle.open(bundles["fp32"])
    m = b.manifest
    gates = m["probe"]["gates"]
    assert len(gates) == 10 and all(g["passed"] for g in gates)
    assert m["probe"]["images"] == PROBE and m["probe"]["onnx"] == m["probe"]["pytorch"]
    assert m["embedding_dim"] == cfg.model.d_model and m["topk"] == 30 and m["nms_iou"] == 0.7
    assert m["image"]["layout"] == "NHWC" and m["image"]["dtype"] == "uint8" and m["opset"] == 17
    assert set(m["files"]) >= {"text_encoder.onnx", "visual_encoder.onnx", "tokenizer.json"}
    assert m["files"]["text_encoder.onnx"]["bytes"] > 0 and m["source"]["sha256"]
    assert not list(bundles["fp32"].parent.glob(".*partial"))  # no temp directory left behind


def test_graphs_are_clean_and_nms_is_in_the_graph(bundles):
    import onnx

    for name in ("text_encoder.onnx", "visual_encoder.onnx"):
        model = onnx.load(str(bundles["fp32"] / name))
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version == 17
    ops = {n.op_type for n in onnx.load(str(bundles["fp32"] / "visual_encoder.onnx")).graph.node}
    assert "NonMaxSuppression" in ops and ops & {"GatherElements", "GatherND", "Gather"}


def test_visual_graph_pads_to_k_and_batches_dynamically(bundles):
    b = Bundle.open(bundles["fp32"])
    vis = b.visual_encoder(threads=1)
    h, w = b.input_hw
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, h, w, 3), dtype=np.uint8)
    boxes, scores, emb, num = vis(images)
    assert boxes.shape == (3, 30, 4) and scores.shape == (3, 30) and emb.shape == (3, 30, b.dim)
    assert num.dtype == np.int64 and ((num >= 1) & (num <= 30)).all()
    for i in range(3):
        n = int(num[i])
        assert (np.diff(scores[i, :n]) <= 0).all()  # descending, as NMS returns them
        assert not boxes[i, n:].any() and not emb[i, n:].any()  # padding is zero
        one = vis(images[i : i + 1])
        np.testing.assert_allclose(one[2][0, :n], emb[i, :n], rtol=0, atol=1e-5)  # batch-independent


def test_engine_tokenizer_matches_training_tokenizer(bundles, tiny_run):
    from reir.training.text_branch import load_tokenizer, tokenize

    cfg, _, _ = tiny_run
    tok = Bundle.open(bundles["fp32"]).tokenizer()
    texts = ["The small RED circle, left of the blue star!", "a", "the big square " * 30]
    ids, mask, truncated = tok(texts)
    ref = tokenize(load_tokenizer(cfg.model.text), texts, cfg.model.text.max_length)
    np.testing.assert_array_equal(ids, ref["input_ids"].numpy())
    np.testing.assert_array_equal(mask, ref["attention_mask"].numpy())
    assert truncated == [False, False, True] and ids.shape[1] == cfg.model.text.max_length


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_bundles_pass_their_gates(bundles, precision):
    m = Bundle.open(bundles[precision]).manifest
    assert m["precision"] == precision
    reduced = [g for g in m["probe"]["gates"] if "fp32" in g["name"]]
    assert len(reduced) == 4 and all(g["passed"] for g in reduced)
    cos = {g["name"]: g["value"] for g in reduced}
    limit = 0.999 if precision == "fp16" else 0.99
    assert cos["text query min cosine vs fp32"] >= limit
    if m["graph_precision"]["text_encoder"] != precision:  # fp16 text refused by its gate: said so
        assert precision == "fp16" and any("fp16 text encoder refused" in n for n in m["probe"]["notes"])
    if precision == "int8":  # only the text encoder is quantised; its MatMuls became integer ops
        import onnx

        ops = {n.op_type for n in onnx.load(str(bundles["int8"] / "text_encoder.onnx")).graph.node}
        assert ops & {"MatMulInteger", "DynamicQuantizeLinear"}
    else:
        import onnx

        types = {i.data_type for i in onnx.load(str(bundles["fp16"] / "visual_encoder.onnx")).graph.initializer}
        assert onnx.TensorProto.FLOAT16 in types


def test_w16_bundle_with_trimmed_vocabulary_is_smaller_and_answers_like_fp32(bundles):
    """fp16-stored weights + a trimmed vocabulary: the default model's size recipe."""
    import onnx

    from reir.datasets.synth.grammar import vocabulary

    full, small = Bundle.open(bundles["fp32"]), Bundle.open(bundles["w16"])
    m = small.manifest
    assert m["precision"] == "w16" and all(g["passed"] for g in m["probe"]["gates"])
    gates = {g["name"]: g["value"] for g in m["probe"]["gates"]}
    assert gates["text query min cosine vs fp32"] >= 0.999
    voc = m["text"]["vocabulary"]
    assert 2000 < voc["kept"] < voc["of"] and any("vocabulary trimmed" in n for n in m["probe"]["notes"])
    size = {k: m["files"][k]["bytes"] for k in ("text_encoder.onnx", "visual_encoder.onnx")}
    full_size = {k: full.manifest["files"][k]["bytes"] for k in size}
    # fp16 storage (small tensors, under 1024 elements, and the graph itself stay as they were)
    assert size["visual_encoder.onnx"] < 0.75 * full_size["visual_encoder.onnx"]
    assert size["text_encoder.onnx"] < 0.5 * full_size["text_encoder.onnx"]  # + fewer embedding rows
    visual = onnx.load(str(bundles["w16"] / "visual_encoder.onnx")).graph
    large = [t for t in visual.initializer if np.prod(t.dims) >= 1024]
    assert large and all(t.data_type == onnx.TensorProto.FLOAT16 for t in large)
    assert {"Cast", "Conv"} <= {n.op_type for n in visual.node}  # weights cast up: convolutions compute in fp32
    # In-domain text: the same pieces as the full vocabulary, so the same query.
    texts = [*sorted(vocabulary())[:40], "the crimson rhombus beneath the azure pentagram"]
    vocab_full = {
        i: t for t, i in json.loads((bundles["fp32"] / "tokenizer.json").read_text())["model"]["vocab"].items()
    }
    vocab_small = {
        i: t for t, i in json.loads((bundles["w16"] / "tokenizer.json").read_text())["model"]["vocab"].items()
    }
    ids_full, mask, _ = full.tokenizer()(texts)
    ids_small, mask_small, _ = small.tokenizer()(texts)
    assert (mask == mask_small).all()
    assert [[vocab_full[int(i)] for i in row] for row in ids_full] == [
        [vocab_small[int(i)] for i in row] for row in ids_small
    ]
    q_full, q_small = full.text_encoder()(texts), small.text_encoder()(texts)
    cos = (q_full * q_small).sum(1) / np.linalg.norm(q_full, axis=1) / np.linalg.norm(q_small, axis=1)
    assert cos.min() >= 0.999
    # A word outside the kept tokens splits into kept pieces, never [UNK].
    ids, mask, _ = small.tokenizer()(["the chihuahua on the sofa"])
    unk = json.loads((bundles["w16"] / "tokenizer.json").read_text())["model"]["vocab"]["[UNK]"]
    assert unk not in ids[0][mask[0] > 0]


def test_static_shape_bundle_for_jetson(tiny_run, tmp_path):
    from reir.export.write_bundle import export_bundle

    cfg, _, ckpt = tiny_run
    s = cfg.model.image_size
    export_bundle(ckpt, tmp_path / "static", static_shape=(s, s), max_batch=4, probe_images=100, log=lambda *_: None)
    b = Bundle.open(tmp_path / "static")
    assert b.manifest["static"] and b.manifest["text"]["pad_to_max"]
    vis, text = b.visual_encoder(), b.text_encoder()
    assert vis.sess.get_inputs()[0].shape == [4, s, s, 3]
    assert text.sess.get_inputs()[0].shape == [4, cfg.model.text.max_length]
    out = vis(np.zeros((5, s, s, 3), np.uint8))  # 5 images through a batch-4 graph: padded to 8
    assert out[2].shape[0] == 5 and text(["a red circle"] * 5).shape == (5, b.dim)


def test_tampered_bundle_is_refused_by_name(bundles, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundles["fp32"], copy)
    graph = copy / "text_encoder.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"text_encoder\.onnx: checksum mismatch"):
        Bundle.open(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"manifest\.json: missing"):
        Bundle.open(copy)


def test_failed_gate_refuses_the_export_and_leaves_nothing(tiny_run, tmp_path):
    """An outlier input feature in every product of the text tower: int8 rounds every output
    channel's other weights to a few levels, the products kept fp32 cannot save the rest, the
    int8 query drifts, the gate says so, and no bundle."""
    import torch

    from reir.export.gates import GateError
    from reir.export.write_bundle import export_bundle

    _, _, ckpt = tiny_run
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    poisoned = 0
    for k, w in state["model"].items():
        if k.startswith("text.model.encoder.") and k.endswith(".weight") and w.dim() == 2:
            w[:, 0] = 200 * w.abs().max()
            poisoned += 1
    assert poisoned >= 6, sorted(state["model"])[:20]  # the tiny tower: q, k, v, out, FFN in and out
    bad = tmp_path / "outlier.pt"
    torch.save(state, bad)
    with pytest.raises(GateError, match="FAIL  text query min cosine vs fp32"):
        export_bundle(bad, tmp_path / "out", precision="int8", probe_images=60, log=lambda *_: None)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_cpu_int8_text_graph_is_added_gated_and_run_on_cpu(bundles, tmp_path):
    """`reir export cpu-text`: the int8 graph is derived from the bundle's own, gated against
    it, checksummed in the manifest, and what the engine and Triton's CPU configs run on CPU;
    the portable graph (GPU, TensorRT) is untouched."""
    import shutil

    import onnx

    from reir.export.cpu_text import FILE, add_cpu_text
    from reir.export.triton import configs

    copy = tmp_path / "b"
    shutil.copytree(bundles["fp32"], copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.name != "manifest.json"}
    entry = add_cpu_text(copy, probe_images=100, log=lambda *_: None)
    assert all(g["passed"] for g in entry["gates"]) and len(entry["gates"]) == 4
    assert len(entry["kept_fp32"]) >= 1 and entry["int8"] >= 4 * len(entry["kept_fp32"])
    b = Bundle.open(copy)  # every checksum, the new file's included
    assert b.manifest["files"][FILE]["bytes"] == (copy / FILE).stat().st_size
    assert all((copy / n).read_bytes() == data for n, data in before.items())
    cpu, portable = b.graph("text_encoder", optimized=True), b.graph("text_encoder")
    assert cpu.name == FILE and portable.name == "text_encoder.onnx"
    ops = {n.op_type for n in onnx.load(str(cpu)).graph.node}
    kept = {n.name for n in onnx.load(str(cpu)).graph.node if n.op_type == "MatMul"}
    assert "MatMulInteger" in ops and set(entry["kept_fp32"]) <= kept
    texts = ["the red circle left of the blue star", "a small green square", "the big yellow triangle"]
    q_cpu, q_portable = b.text_encoder()(texts), b.text_encoder(optimized=False)(texts)
    cos = (q_cpu * q_portable).sum(1) / np.linalg.norm(q_cpu, axis=1) / np.linalg.norm(q_portable, axis=1)
    assert cos.min() >= 0.99 and not np.array_equal(q_cpu, q_portable)
    made = configs(b.manifest, str(tmp_path), "")
    assert made["text_encoder/configs/cpu.pbtxt"].default_model_filename == "model.cpu.onnx"
    assert made["text_encoder/configs/pyort.pbtxt"].parameters["graph"].string_value == "model.cpu.onnx"
    assert made["text_encoder/config.pbtxt"].default_model_filename == ""  # the GPU runs the portable graph


def _reir(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reir.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_bad_checkpoints_name_the_file(tmp_path):
    res = _reir("export", "bundle", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "b"))
    assert res.returncode == 2 and "nope.pt: checkpoint not found" in res.stderr and "Traceback" not in res.stderr
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(b"PK\x03\x04 not really a zip")
    res = _reir("export", "bundle", str(trunc), "--out", str(tmp_path / "b"))
    assert res.returncode == 2 and "trunc.pt: cannot read checkpoint" in res.stderr
    res = _reir("export", "bundle", str(trunc), "--out", str(tmp_path / "b"), "--static-shape", "12x")
    assert res.returncode == 2 and "--static-shape" in res.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here; the refusal is for hosts without it")
def test_trt_refuses_clearly_without_tensorrt(bundles):
    res = _reir("export", "trt", str(bundles["fp16"]))
    assert res.returncode == 2 and "TensorRT not installed" in res.stderr and "Traceback" not in res.stderr


def test_trt_profiles_and_build_modes():
    from reir.export.tensorrt import TensorRTUnavailable, build_mode, profiles

    m = {"max_batch": 32, "static": False, "text": {"max_length": 40}, "image": {"height": 128, "width": 96}}
    p = profiles(m, opt_batch=8)
    assert p["text_encoder"].shapes["input_ids"] == ((1, 1), (8, 16), (32, 40))
    assert p["visual_encoder"].shapes["images"] == ((1, 128, 96, 3), (8, 128, 96, 3), (32, 128, 96, 3))
    assert p["visual_encoder"].to_dict()["images"]["opt"] == [8, 128, 96, 3]
    s = profiles({**m, "static": True, "max_batch": 4})
    assert set(s["visual_encoder"].shapes["images"]) == {(4, 128, 96, 3)}  # min = opt = max (DLA)
    assert build_mode("10.3.0", "fp16", "fp32") == "weak"  # JetPack 6: FP16 builder flag
    assert build_mode("11.4.0.106", "fp16", "fp16") == "strong"
    assert build_mode("11.4.0", "fp32", "w16") == "strong"  # w16 computes in fp32
    with pytest.raises(ValueError, match="strongly typed"):
        build_mode("11.4.0", "fp16", "fp32")
    with pytest.raises(ValueError, match="not int8"):
        build_mode("10.7.0", "fp16", "int8")
    with pytest.raises(TensorRTUnavailable, match="too old"):
        build_mode("8.6.1", "fp16", "fp32")


@pytest.mark.skipif(not HAS_TRT, reason="TensorRT not installed (GPU hosts only)")
def test_trt_builds_engines_with_sidecars(bundles):  # pragma: no cover - runs where TensorRT exists
    from reir.export.tensorrt import build_engines

    plans = build_engines(bundles["fp16"], "fp16", log=lambda *_: None)
    for plan in plans:
        side = json.loads(plan.with_suffix(".plan.json").read_text())
        assert plan.stat().st_size > 0 and side["tensorrt"] and side["compute_capability"] and side["profiles"]


def test_engine_eval_matches_pytorch_eval(tiny_run, tiny_bundle, tmp_path):
    """`reir eval --bundle` (ONNX Runtime) against `reir eval CHECKPOINT` (PyTorch): same report."""

    from reir.datasets.synth import SynthConfig, generate

    _, _, ckpt = tiny_run
    generate(tmp_path / "d", SynthConfig(images=500, seed=321), progress=False)
    args = ["--data", str(tmp_path / "d"), "--split", "test", "--quiet"]
    a = _reir("eval", "--bundle", str(tiny_bundle), *args, "--json", str(tmp_path / "onnx.json"))
    b = _reir("eval", str(ckpt), *args, "--json", str(tmp_path / "torch.json"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    onnx = json.loads((tmp_path / "onnx.json").read_text())
    ma, mb = onnx["meta"]["exact_protocol"], json.loads((tmp_path / "torch.json").read_text())["metrics"]
    assert ma.keys() == mb.keys()
    for key in ma:  # the same protocol (every instance scored in memory): the export changes nothing
        assert abs(ma[key] - mb[key]) <= 0.5, (key, ma[key], mb[key])
    # the headline figures come through a real gallery (f16 vectors, its index): a near tie may
    # flip, nothing more (200 queries: one query is 0.5 points)
    assert "gallery's search" in onnx["meta"]["search"] and onnx["metrics"].keys() == ma.keys()
    for key in ma:
        assert abs(onnx["metrics"][key] - ma[key]) <= 1.0, (key, onnx["metrics"][key], ma[key])
