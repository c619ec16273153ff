"""`reir triton export BUNDLE --out REPO --gallery G`: a Triton model repository.

    tokenizer        python, TYPE_STRING -> input_ids, attention_mask, truncated
    text_encoder     input_ids, attention_mask -> query             (onnxruntime / TensorRT / python+ORT)
    encode_query     ensemble: tokenizer -> text_encoder
    visual_encoder   uint8 images -> boxes, scores, embeddings, num_detections (NMS in the graph)
    retrieve         python BLS: a search request (JSON) -> encode_query -> gallery search -> its answer (JSON)

One repository serves every host; pick the variant with `--model-config-name`:
`config.pbtxt` = GPU (onnxruntime backend, CUDA), `configs/gpu-trt.pbtxt` = onnxruntime with
its TensorRT accelerator (FP16), `configs/cpu.pbtxt` = onnxruntime on CPU,
`configs/pyort.pbtxt` = ONNX Runtime inside python models (servers without the
onnxruntime backend, e.g. nvidia-pytriton's), `configs/jetson.pbtxt` = TensorRT plans.
A bundle with an int8 CPU text graph (`reir export cpu-text`) has it as
text_encoder/1/model.cpu.onnx, and the two CPU configs run it, as the engine does on CPU.
Every config is built as a `ModelConfig` protobuf here and written with `text_format`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from reir.engine.fsutil import atomic_directory
from reir.engine.runtime.bundle import Bundle

MODELS_SRC = Path(__file__).resolve().parents[1] / "triton_models"
PYTHON_MODELS = ("tokenizer", "text_encoder", "visual_encoder", "retrieve")
CPU_TEXT = "model.cpu.onnx"


def _pb():
    from tritonclient.grpc import model_config_pb2  # the triton extra

    return model_config_pb2


def _tensor(coll, name: str, dtype: str, dims: list[int], optional: bool = False, reshape: list[int] | None = None):
    pb = _pb()
    t = coll.add(name=name, data_type=getattr(pb, f"TYPE_{dtype}"), dims=dims)
    if optional:
        t.optional = True
    if reshape is not None:
        t.reshape.SetInParent()
        t.reshape.shape.extend(reshape)
    return t


def _batching(mc, max_batch: int, delay_us: int, preferred: list[int]) -> None:
    mc.max_batch_size = max_batch
    mc.dynamic_batching.max_queue_delay_microseconds = delay_us
    mc.dynamic_batching.preferred_batch_size.extend([p for p in preferred if p <= max_batch])
    mc.version_policy.latest.num_versions = 1


def _instances(mc, kind: str, count: int) -> None:
    pb = _pb()
    g = mc.instance_group.add(count=count, kind=getattr(pb.ModelInstanceGroup, f"KIND_{kind}"))
    if kind == "GPU":
        g.gpus.append(0)


def _warmup(mc, name: str, inputs: dict[str, tuple[str, list[int]]], batch: int = 1) -> None:
    pb = _pb()
    w = mc.model_warmup.add(name=name, batch_size=batch)
    for n, (dtype, dims) in inputs.items():
        w.inputs[n].data_type = getattr(pb, f"TYPE_{dtype}")
        w.inputs[n].dims.extend(dims)
        w.inputs[n].zero_data = True


def text_encoder_config(m: dict[str, Any], variant: str):
    pb = _pb()
    mc = pb.ModelConfig(name="text_encoder")
    _backend(mc, variant)
    _batching(mc, m["max_batch"], 500, [4, 8, 16, 32])
    seq = m["text"]["max_length"] if m["static"] else -1
    _tensor(mc.input, "input_ids", "INT64", [seq])
    _tensor(mc.input, "attention_mask", "INT64", [seq])
    _tensor(mc.output, "query", "FP32", [m["embedding_dim"]])
    _instances(mc, "CPU" if variant in ("cpu", "pyort") else "GPU", 2 if variant == "cpu" else 1)
    if variant in ("cpu", "pyort") and m["graphs"]["text_encoder"].get("cpu"):  # its int8 CPU graph
        if variant == "cpu":
            mc.default_model_filename = CPU_TEXT
        else:  # a python model's default_model_filename names its .py file
            mc.parameters["graph"].string_value = CPU_TEXT
    _warmup(
        mc,
        "ids",
        {"input_ids": ("INT64", [m["text"]["max_length"]]), "attention_mask": ("INT64", [m["text"]["max_length"]])},
    )
    return mc


def visual_encoder_config(m: dict[str, Any], variant: str):
    pb = _pb()
    mc = pb.ModelConfig(name="visual_encoder")
    _backend(mc, variant)
    _batching(mc, m["max_batch"], 2000, [8, 16, 32])
    h, w, k, d = m["image"]["height"], m["image"]["width"], m["topk"], m["embedding_dim"]
    _tensor(mc.input, "images", "UINT8", [h, w, 3])
    _tensor(mc.output, "boxes", "FP32", [k, 4])
    _tensor(mc.output, "scores", "FP32", [k])
    _tensor(mc.output, "embeddings", "FP32", [k, d])
    _tensor(mc.output, "num_detections", "INT64", [1], reshape=[] if variant != "pyort" else None)
    _instances(mc, "CPU" if variant in ("cpu", "pyort") else "GPU", 1)
    _warmup(mc, "zeros", {"images": ("UINT8", [h, w, 3])})
    return mc


def _backend(mc, variant: str) -> None:
    if variant == "pyort":
        mc.backend = "python"
    elif variant == "jetson":
        mc.platform = "tensorrt_plan"
        mc.default_model_filename = "model.plan"
    else:
        mc.platform = "onnxruntime_onnx"
        if variant == "cpu":
            mc.parameters["intra_op_thread_count"].string_value = "1"
        if variant == "gpu-trt":
            acc = mc.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            acc.parameters["precision_mode"] = "FP16"
            acc.parameters["max_workspace_size_bytes"] = str(1 << 31)
            acc.parameters["trt_engine_cache_enable"] = "1"


def tokenizer_config(m: dict[str, Any]):
    pb = _pb()
    mc = pb.ModelConfig(name="tokenizer", backend="python")
    _batching(mc, m["max_batch"], 200, [])
    _tensor(mc.input, "TEXT", "STRING", [1])
    _tensor(mc.output, "input_ids", "INT64", [m["text"]["max_length"]])
    _tensor(mc.output, "attention_mask", "INT64", [m["text"]["max_length"]])
    _tensor(mc.output, "truncated", "BOOL", [1])
    t = m["text"]
    for key in ("max_length", "pad_id", "pad_token"):
        mc.parameters[key].string_value = str(t[key])
    _instances(mc, "CPU", 1)
    return mc


def encode_query_config(m: dict[str, Any]):
    pb = _pb()
    mc = pb.ModelConfig(name="encode_query", platform="ensemble", max_batch_size=m["max_batch"])
    _tensor(mc.input, "TEXT", "STRING", [1])
    _tensor(mc.output, "query", "FP32", [m["embedding_dim"]])
    _tensor(mc.output, "truncated", "BOOL", [1])
    s = mc.ensemble_scheduling.step.add(model_name="tokenizer", model_version=-1)
    s.input_map["TEXT"] = "TEXT"
    s.output_map.update({"input_ids": "ids", "attention_mask": "mask", "truncated": "truncated"})
    s = mc.ensemble_scheduling.step.add(model_name="text_encoder", model_version=-1)
    s.input_map.update({"input_ids": "ids", "attention_mask": "mask"})
    s.output_map["query"] = "query"
    return mc


def retrieve_config(m: dict[str, Any], gallery_root: str, default_gallery: str):
    """The search contract's JSON in a string tensor, out in another (triton_models/README.md)."""
    pb = _pb()
    mc = pb.ModelConfig(name="retrieve", backend="python")
    _batching(mc, m["max_batch"], 200, [])
    # admission: past one full batch waiting, a request is refused at once with UNAVAILABLE
    # (the client's Unavailable) instead of joining an unbounded queue
    mc.dynamic_batching.default_queue_policy.max_queue_size = m["max_batch"]
    _tensor(mc.input, "REQUEST", "STRING", [1])
    _tensor(mc.output, "RESPONSE", "STRING", [1])
    params = {
        "gallery_root": gallery_root,
        "default_gallery": default_gallery,
        "model_id": m["source"]["sha256"],
        "dim": str(m["embedding_dim"]),
    }
    for key, v in params.items():
        mc.parameters[key].string_value = v
    _instances(mc, "CPU", 2)
    return mc


VARIANTS = ("gpu-trt", "cpu", "pyort", "jetson")


def configs(m: dict[str, Any], gallery_root: str, default_gallery: str) -> dict[str, Any]:
    """{relative path: ModelConfig} for the whole repository."""
    out = {
        "tokenizer/config.pbtxt": tokenizer_config(m),
        "encode_query/config.pbtxt": encode_query_config(m),
        "retrieve/config.pbtxt": retrieve_config(m, gallery_root, default_gallery),
    }
    for name, build in (("text_encoder", text_encoder_config), ("visual_encoder", visual_encoder_config)):
        out[f"{name}/config.pbtxt"] = build(m, "gpu")
        for v in VARIANTS:
            out[f"{name}/configs/{v}.pbtxt"] = build(m, v)
    return out


REFERENCE_GALLERY_ROOT = "/srv/reir/galleries"  # the checked-in reference layout's placeholder


def write_configs(manifest: dict[str, Any], out: Path, gallery_root: str, default_gallery: str) -> None:
    """Only the config files (what the checked-in `triton_models/` layout holds)."""
    from google.protobuf import text_format  # the triton extra

    for rel, mc in configs(manifest, gallery_root, default_gallery).items():
        path = Path(out) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text_format.MessageToString(mc), encoding="utf-8")


def write_repository(
    bundle_path: Path, out: Path, gallery_root: Path, default_gallery: str = "", overwrite: bool = False
) -> Path:
    bundle = Bundle.open(bundle_path)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_configs(bundle.manifest, tmp, str(Path(gallery_root).resolve()), default_gallery)
        for name in PYTHON_MODELS:
            (tmp / name / "1").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(MODELS_SRC / name / "1" / "model.py", tmp / name / "1" / "model.py")
        (tmp / "encode_query" / "1").mkdir(parents=True)
        shutil.copyfile(bundle.path / "tokenizer.json", tmp / "tokenizer" / "1" / "tokenizer.json")
        for name in ("text_encoder", "visual_encoder"):
            shutil.copyfile(bundle.graph(name), tmp / name / "1" / "model.onnx")
            if bundle.manifest["graphs"][name].get("cpu"):  # what the CPU configs run, as in process
                shutil.copyfile(bundle.graph(name, optimized=True), tmp / name / "1" / CPU_TEXT)
            for plan in bundle.path.glob(f"{name}.*.plan"):  # engines built by `reir export trt`
                shutil.copyfile(plan, tmp / name / "1" / "model.plan")
    return out
