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

INT8 is for CPU and for size: dynamic quantisation of the text encoder's MatMul/Gemm
weights and of its embedding table (Gather: 4x smaller, the largest tensor of a BERT-style
encoder); quantised convolutions have no ORT CPU kernel, so the visual graph stays fp32.
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


def to_int8(src: Path, dst: Path) -> None:
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm", "Gather"],
        per_channel=False,
    )


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
