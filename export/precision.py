"""FP16 and INT8 variants of the fp32 graphs (docs/deployment.md).

FP16 is a GPU format (slower on ORT CPU): ops whose precision the result depends on stay
fp32 — the converter's default block list (NonMaxSuppression, TopK, Resize, ...) plus
`Sigmoid` (the scores that feed NMS), `Softmax` and `LayerNormalization`. Measured on the
tiny model's text graph: all-fp16 gave query cosine 0.9964 to fp32 (MORE's router and the
attention softmax), with Softmax kept fp32 0.99999994. Inputs and outputs keep their fp32/int types so
clients do not change. The converter is onnxruntime.transformers' (it handles the
BERT-style mask Cast); onnxconverter-common's took over 15 minutes on a 754-node text
graph here, ORT's 1.4 s.

W16 ("fp16 weights") stores every large float initializer as fp16 behind a Cast to fp32:
half the file size, and ORT folds the Casts at session start, so inference runs in fp32
with only the weights rounded. Measured on the synth model's text encoder: query cosine
0.9999997 to fp32 over 552 probe texts, where fp16 compute flipped MORE's routing (0.994)
and int8 embeddings did too (0.982). It is the size format for CPU serving.

INT8 is for CPU and for size: dynamic quantisation of the text tower's matrix products,
one scale per output channel, and of its embedding table (Gather: 4x smaller, the largest
tensor of a BERT-style encoder). What stays fp32:
- CLARE's text head after the tower (`TEXT_HEAD`: the pools, MORE, the relation code): under
  2 % of the work, and MORE's router is an argmax whose top-2 flips near ties;
- the sixth of the tower's products (`KEEP_SHARE`) whose rounding costs the worst texts most,
  measured one at a time on the caller's texts (`int8_sensitivity`).
One scale per tensor over every product (the recipe before) lost query cosine 0.963 on the
worst of 300 test expressions of the synth model; benchmarks/encoders.py measures the
variants side by side. Quantised convolutions have no ORT CPU kernel, so the visual graph
stays fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

FP16_EXTRA_BLOCK = ["Sigmoid", "Softmax", "LayerNormalization"]


def to_fp16(src: Path, dst: Path, extra_block: list[str] | None = None) -> None:
    """`extra_block`: more op types to keep fp32 (e.g. LayerNormalization, Softmax)."""
    model = onnx.load(str(src))
    block = DEFAULT_OP_BLOCK_LIST + FP16_EXTRA_BLOCK + list(extra_block or [])
    fp16 = convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    onnx.save(fp16, str(dst))


# CLARE's modules after the text tower (training/model.py), by their scope in the exported graph
TEXT_HEAD = ("/text_pools", "/text_proj", "/code", "/relation")
KEEP_SHARE = 1 / 6  # of the tower's products, the most sensitive stay fp32


def int8_candidates(model: onnx.ModelProto) -> list[str]:
    """The text tower's products with a constant weight: what `to_int8` may quantise."""
    weights = {i.name for i in model.graph.initializer}
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and n.input[1] in weights and not n.name.startswith(TEXT_HEAD)
    ]


def to_int8(src: Path, dst: Path, keep: tuple[str, ...] = ()) -> dict:
    """Dynamic int8 (per output channel) of the tower's products but `keep`, and of the token
    embedding table; what was quantised and kept, for the manifest."""
    model = onnx.load(str(src))
    products = [n for n in int8_candidates(model) if n not in keep]
    weights = {i.name for i in model.graph.initializer}
    tables = [
        n.name
        for n in model.graph.node
        if n.op_type == "Gather" and n.input[0] in weights and not n.name.startswith(TEXT_HEAD)
    ]
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gather"],
        nodes_to_quantize=products + tables,
        per_channel=True,
    )
    return {"int8": len(products), "tables": len(tables), "kept_fp32": list(keep)}


def int8_sensitivity(src: Path, feeds: list[dict], work: Path) -> list[tuple[str, float]]:
    """Each candidate product quantised alone: what it costs the texts it hurts most (1 -
    query cosine to `src`, the mean over the worst 3 % of `feeds`' texts), most costly first.
    The worst texts, not the mean: the gate is a minimum over texts, and the products that
    move the mean are not the ones that move the worst text. `work`: for the trial graphs."""
    from reir.engine.runtime.encoders import session  # ORT with the engine's settings

    def queries(path: Path) -> np.ndarray:
        sess = session(path, "cpu", 2)
        q = np.concatenate([sess.run(None, f)[0] for f in feeds]).astype(np.float64)
        return q / np.linalg.norm(q, axis=1, keepdims=True)

    ref = queries(src)
    worst = max(1, round(0.03 * len(ref)))
    trial, out = work / "int8_trial.onnx", []
    for name in int8_candidates(onnx.load(str(src))):
        quantize_dynamic(str(src), str(trial), weight_type=QuantType.QInt8, nodes_to_quantize=[name], per_channel=True)
        loss = np.sort(1 - (queries(trial) * ref).sum(1))[-worst:]
        out.append((name, float(loss.mean())))
    trial.unlink(missing_ok=True)
    return sorted(out, key=lambda t: -t[1])


def from_w16(src: Path, dst: Path) -> None:
    """The fp32 graph a w16 graph computes: each fp16 weight behind its Cast as the fp32
    initializer it is cast to (the values the session runs with, so nothing changes)."""
    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    casts = {n.output[0]: n for n in graph.node if n.op_type == "Cast" and n.input[0] in inits}
    casts = {o: n for o, n in casts.items() if inits[n.input[0]].data_type == TensorProto.FLOAT16}
    halves = {n.input[0] for n in casts.values()}
    keep = [i for i in graph.initializer if i.name not in halves]
    for out, n in casts.items():
        keep.append(numpy_helper.from_array(numpy_helper.to_array(inits[n.input[0]]).astype(np.float32), out))
    nodes = [n for n in graph.node if n.output[0] not in casts]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(dst))


def to_w16(src: Path, dst: Path, min_elements: int = 1024) -> None:
    """fp16 storage, fp32 compute: each float initializer of `min_elements` or more."""
    model = onnx.load(str(src))
    graph = model.graph
    casts, inits = [], []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < min_elements:
            inits.append(init)
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + "__fp16")
        inits.append(half)
        casts.append(
            helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT, name=init.name + "__cast")
        )
    del graph.initializer[:]
    graph.initializer.extend(inits)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(dst))
