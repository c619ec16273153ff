"""`reir triton validate REPO`: check a model repository offline, before a server sees it.

Triton has no offline validator; a bad config is found at load time, on the server. Here
every `config.pbtxt` and `configs/*.pbtxt` is parsed into `inference.ModelConfig` (typos
in field names fail), then checked: name = directory, numeric version directories holding
the model file the backend needs, dims against max_batch_size, ensemble maps against the
member models' tensors and types, and no instance groups on ensembles.
"""

from __future__ import annotations

from pathlib import Path


def _parse(path: Path):
    from google.protobuf import text_format  # protobuf and tritonclient: the triton extra
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def validate_repository(repo: Path) -> list[str]:
    """Problems found, each naming the file; empty when the repository is sound."""
    from google.protobuf.text_format import ParseError

    repo = Path(repo)
    if not repo.is_dir():
        return [f"{repo}: not a directory"]
    problems: list[str] = []
    models: dict[str, object] = {}
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [model_dir / "config.pbtxt", *sorted((model_dir / "configs").glob("*.pbtxt"))]
        if not files[0].is_file():
            problems.append(f"{files[0]}: missing")
            continue
        for f in files:
            if not f.is_file():
                continue
            try:
                mc = _parse(f)
            except ParseError as e:
                problems.append(f"{f}: {e}")
                continue
            problems += [f"{f}: {p}" for p in _check_model(model_dir, mc)]
            if f.name == "config.pbtxt":
                models[model_dir.name] = mc
    for name, mc in models.items():
        if mc.platform == "ensemble":
            problems += [f"{repo / name / 'config.pbtxt'}: {p}" for p in _check_ensemble(mc, models)]
    return problems


def _check_model(model_dir: Path, mc) -> list[str]:
    out = []
    if mc.name and mc.name != model_dir.name:
        out.append(f"name {mc.name!r} differs from its directory {model_dir.name!r}")
    if mc.max_batch_size < 0:
        out.append("max_batch_size must be >= 0")
    for t in [*mc.input, *mc.output]:
        if not t.dims:
            out.append(f"tensor {t.name}: no dims")
        if any(d == 0 or d < -1 for d in t.dims):
            out.append(f"tensor {t.name}: dims {list(t.dims)} (use -1 for a variable dim)")
        if mc.max_batch_size == 0 and t.dims and t.dims[0] == -1 and t.name in {"images"}:
            out.append(f"tensor {t.name}: max_batch_size 0 needs the full shape including the batch dim")
    if mc.platform == "ensemble":
        if mc.instance_group:
            out.append("an ensemble may not have instance_group")
        return out
    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        out.append("no numeric version directory (e.g. 1/)")
    wanted = mc.default_model_filename or (
        "model.py"
        if mc.backend == "python"
        else {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}.get(mc.platform, "")
    )
    if not wanted:
        out.append(f"unknown platform/backend {mc.platform or mc.backend!r}")
    for v in versions:
        if wanted and not (v / wanted).exists() and not _plan_may_be_built_later(mc):
            out.append(f"version {v.name}: {wanted} missing")
    return out


def _plan_may_be_built_later(mc) -> bool:
    """TensorRT plans are built on the target (`reir export trt`), so a missing plan is not an error."""
    return mc.platform == "tensorrt_plan"


def _check_ensemble(mc, models: dict) -> list[str]:
    out = []
    available = {t.name: t.data_type for t in mc.input}
    for n, step in enumerate(mc.ensemble_scheduling.step):
        member = models.get(step.model_name)
        if member is None:
            out.append(f"step {n}: model {step.model_name!r} is not in the repository")
            continue
        if member.max_batch_size < mc.max_batch_size:
            out.append(f"step {n}: {step.model_name} max_batch_size {member.max_batch_size} < {mc.max_batch_size}")
        ins = {t.name: t.data_type for t in member.input}
        outs = {t.name: t.data_type for t in member.output}
        for key, value in step.input_map.items():
            if key not in ins:
                out.append(f"step {n}: {step.model_name} has no input {key!r}")
            elif value not in available:
                out.append(f"step {n}: tensor {value!r} is not produced before this step")
            elif available[value] != ins[key]:
                out.append(f"step {n}: {value!r} type differs from {step.model_name}.{key}")
        for key, value in step.output_map.items():
            if key not in outs:
                out.append(f"step {n}: {step.model_name} has no output {key!r}")
            else:
                available[value] = outs[key]
    for t in mc.output:
        if t.name not in available:
            out.append(f"ensemble output {t.name!r} is produced by no step")
        elif available[t.name] != t.data_type:
            out.append(f"ensemble output {t.name!r} type differs from the step that produces it")
    return out
