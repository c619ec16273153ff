"""FP16 and INT8 variants of the fp32 graphs (deployment.md §5).

FP16 is a GPU format (slower on ORT CPU): ops whose precision the result depends on stay
fp32 — the converter's default block list (NonMaxSuppression, TopK, Resize, ...), plus
`Cast` (BERT-style masks otherwise fail to load) and `Sigmoid` (scores that feed NMS).
Inputs and outputs keep their fp32/int types so clients do not change.

INT8 is for CPU and for size: dynamic quantisation of the text encoder's MatMul/Gemm
weights and of its embedding table (Gather: 4x smaller, the largest tensor of a BERT-style
encoder); quantised convolutions have no ORT CPU kernel, so the visual graph stays fp32.
"""

from __future__ import annotations

from pathlib import Path

FP16_EXTRA_BLOCK = ["Cast", "Sigmoid"]


def to_fp16(src: Path, dst: Path, extra_block: list[str] | None = None) -> None:
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    block = float16.DEFAULT_OP_BLOCK_LIST + FP16_EXTRA_BLOCK + list(extra_block or [])
    fp16 = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    onnx.save(fp16, str(dst))


def to_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm", "Gather"],
        per_channel=False,
    )
