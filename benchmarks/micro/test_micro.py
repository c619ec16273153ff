"""Micro-benchmarks (pytest-benchmark): `reir bench micro`, or
`pytest benchmarks/micro --benchmark-only`. Not part of the default test run.

Each result records the machine, threads and package versions (conftest). PyTorch eager
runs use the same module the exporter traces (`training/postprocess`)."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import TEXT


def _ort(path, threads: int):
    from reir.engine.runtime.encoders import session

    return session(path, "cpu", threads)


def test_tokenize(benchmark, tokenizer):
    benchmark(tokenizer, [TEXT])


def _torch_runner(module, inputs: tuple, device: str, half: bool):
    """Eager PyTorch on `device`; on CUDA, fp16 autocast when `half` and a sync per call (the
    result is on the host when timing stops, as for ONNX Runtime)."""
    import torch

    module = module.to(device).eval()
    inputs = tuple(torch.from_numpy(x).to(device) for x in inputs)

    def run():
        with torch.inference_mode(), torch.autocast(device, torch.float16, enabled=half):
            out = module(*inputs)
        return [o.cpu() for o in (out if isinstance(out, tuple) else (out,))]

    return run


TORCH = ["torch", "torch-fp16"]


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("runtime", [*TORCH, "ort-fp32", "ort-fp16", "ort-int8"])
def test_text_encode(benchmark, runtime, batch, synth_model, graphs, tokenizer, threads, device):
    ids, mask, _ = tokenizer([TEXT] * batch)
    benchmark.extra_info.update(runtime=runtime, batch=batch, threads=threads)
    if runtime in TORCH:
        import torch

        from reir.training.postprocess import TextQuery

        if runtime == "torch-fp16" and device == "cpu":
            pytest.skip("fp16 autocast is a GPU mode (REIR_BENCH_DEVICE=cuda)")
        torch.set_num_threads(threads)
        benchmark.extra_info["device"] = device
        benchmark(_torch_runner(TextQuery(synth_model[1]), (ids, mask), device, runtime == "torch-fp16"))
        return
    sess = _ort(graphs[f"text_{runtime[4:]}"], threads)
    benchmark(sess.run, None, {"input_ids": ids, "attention_mask": mask})


@pytest.mark.parametrize("batch", [1, 8, 32])
@pytest.mark.parametrize("runtime", [*TORCH, "ort-fp32", "ort-fp16"])
def test_visual_encode(benchmark, runtime, batch, synth_model, graphs, images, threads, device):
    x = images[batch]
    benchmark.extra_info.update(runtime=runtime, batch=batch, threads=threads, per="batch")
    if runtime in TORCH:
        import torch

        from reir.training.postprocess import Detector

        if runtime == "torch-fp16" and device == "cpu":
            pytest.skip("fp16 autocast is a GPU mode (REIR_BENCH_DEVICE=cuda)")
        torch.set_num_threads(threads)
        benchmark.extra_info["device"] = device
        run = _torch_runner(Detector(synth_model[1]), (x,), device, runtime == "torch-fp16")
        benchmark.pedantic(run, rounds=5 if batch == 32 and device == "cpu" else 15, warmup_rounds=2)
        return
    sess = _ort(graphs[f"visual_{runtime[4:]}"], threads)
    benchmark.pedantic(sess.run, (None, {"images": x}), rounds=5 if batch == 32 else 15, warmup_rounds=1)


def _nms_numpy(boxes: np.ndarray, scores: np.ndarray, iou: float = 0.7, topk: int = 30) -> np.ndarray:
    """Greedy class-agnostic NMS of one image, best first (what the graph's NonMaxSuppression does)."""
    order = np.argsort(-scores)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep: list[int] = []
    while len(order) and len(keep) < topk:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        lt = np.maximum(boxes[i, :2], boxes[rest, :2])
        rb = np.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        order = rest[inter / (area[i] + area[rest] - inter + 1e-9) <= iou]
    return np.array(keep, dtype=np.int64)


@pytest.mark.parametrize("where", ["in-graph", "python"])
def test_nms_and_gather(benchmark, where, graphs, images, threads):
    """Batch 8: the exported graph with NMS + gather inside vs the raw graph + numpy NMS + gather."""
    x = images[8]
    benchmark.extra_info.update(where=where, batch=8, threads=threads)
    if where == "in-graph":
        sess = _ort(graphs["visual_fp32"], threads)
        benchmark.pedantic(sess.run, (None, {"images": x}), rounds=15, warmup_rounds=1)
        return
    sess = _ort(graphs["visual_raw"], threads)

    def run():
        boxes, scores, emb = sess.run(None, {"images": x})
        out = []
        for b in range(len(x)):
            keep = _nms_numpy(boxes[b], scores[b])
            out.append((boxes[b, keep], scores[b, keep], emb[b, keep]))
        return out

    benchmark.pedantic(run, rounds=15, warmup_rounds=1)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    from reir.engine.gallery.gallery import Gallery

    sample = np.random.default_rng(7).standard_normal((1024, 128)).astype(np.float32)  # queries to fit the index to
    return Gallery.create(tmp_path_factory.mktemp("gal") / "g", 128, "f16", model="bench", queries=sample)


def _new_images(n: int, start: int, rng):
    from reir.engine.gallery.records import NewImage
    from reir.engine.runtime.detections import Detections

    out = []
    for i in range(start, start + n):
        dets = Detections(rng.random((25, 4)) * 128, rng.random(25), rng.standard_normal((25, 128)).astype(np.float32))
        out.append(NewImage(f"img{i}.png", f"{i:064x}", 128, 128, 1000, dets))
    return out


def test_gallery_add(benchmark, gallery):
    """One transaction of 32 images x 25 instances (SQLite + the index + its commit)."""
    rng = np.random.default_rng(0)
    counter = iter(range(0, 10**9, 32))
    benchmark.pedantic(lambda: gallery.add(_new_images(32, next(counter), rng)), rounds=20, warmup_rounds=1)


@pytest.mark.parametrize("per_image", [False, True])
def test_gallery_search(benchmark, gallery, per_image):
    rng = np.random.default_rng(1)
    if gallery.shards[0].index.store.live < 20_000:
        gallery.add(_new_images(800, 10**8, rng))
    q = rng.standard_normal((1, 128)).astype(np.float32)
    benchmark.extra_info.update(instances=gallery.shards[0].index.store.live, per_image=per_image)
    benchmark(gallery.search, q, 10, per_image)
