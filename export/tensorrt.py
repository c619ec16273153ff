"""`reir export trt BUNDLE`: TensorRT engines (*.plan) from a bundle's ONNX graphs.

TensorRT 10 (JetPack 6 = 10.3) is weakly typed: FP16 is a builder flag on an fp32 graph.
TensorRT 11 removed the precision flags; networks are strongly typed, so FP16 must already
be in the ONNX: there we build from an fp16 bundle (`reir export --precision fp16`, whose
conversion passed the accuracy gates). Engines are tied to the GPU, TensorRT and CUDA
versions: each plan gets a sidecar JSON saying which, and with which profiles.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reir.engine.errors import ReirError
from reir.engine.fsutil import write_bytes_atomic
from reir.engine.runtime.bundle import Bundle

Shape = tuple[int, ...]


class TensorRTUnavailable(ReirError):
    pass


@dataclass(frozen=True)
class Profile:
    """min/opt/max shape per dynamic input (kernels are tuned for opt)."""

    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def to_dict(self) -> dict[str, dict[str, list[int]]]:
        return {n: {"min": list(a), "opt": list(b), "max": list(c)} for n, (a, b, c) in self.shapes.items()}


def profiles(manifest: dict[str, Any], opt_batch: int = 8, opt_length: int = 16) -> dict[str, Profile]:
    """Optimisation profiles for both graphs from the manifest's input contract.

    Static bundles get min = opt = max (what DLA requires)."""
    max_batch = int(manifest["max_batch"])
    max_len = int(manifest["text"]["max_length"])
    h, w = int(manifest["image"]["height"]), int(manifest["image"]["width"])
    if manifest["static"]:
        text = ((max_batch, max_len),) * 3
        image = ((max_batch, h, w, 3),) * 3
    else:
        ob, ol = min(opt_batch, max_batch), min(opt_length, max_len)
        text = ((1, 1), (ob, ol), (max_batch, max_len))
        image = ((1, h, w, 3), (ob, h, w, 3), (max_batch, h, w, 3))
    return {
        "text_encoder": Profile({"input_ids": text, "attention_mask": text}),
        "visual_encoder": Profile({"images": image}),
    }


def build_mode(trt_version: str, precision: str, bundle_precision: str) -> str:
    """'weak' (TensorRT <= 10: flags) or 'strong' (11+: types from the ONNX). Refuses what cannot work."""
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"--precision must be fp32 or fp16 for TensorRT, got {precision!r}")
    major = int(trt_version.split(".")[0])
    if major < 10:
        raise TensorRTUnavailable(f"TensorRT {trt_version} is too old: 10.x or newer is needed")
    if major == 10:
        if bundle_precision == "int8":
            raise ValueError("build TensorRT engines from an fp32 or fp16 bundle, not int8 (a CPU format)")
        return "weak"
    if precision == "fp16" and bundle_precision != "fp16":
        raise ValueError(
            f"TensorRT {trt_version} builds strongly typed networks: FP16 must be in the ONNX. "
            "Export an fp16 bundle first (reir export CKPT --out B --precision fp16)"
        )
    if precision == "fp32" and bundle_precision not in ("fp32", "w16"):  # w16 computes in fp32
        raise ValueError(f"an fp32 engine needs an fp32 bundle (this one is {bundle_precision})")
    return "strong"


def gpu_info() -> dict[str, str]:
    """Name, compute capability and driver of GPU 0 via nvidia-smi; refuses without a GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise TensorRTUnavailable("no NVIDIA GPU here (nvidia-smi not found); build engines on the target GPU")
    res = subprocess.run(
        [smi, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if res.returncode != 0 or not res.stdout.strip():
        raise TensorRTUnavailable(f"nvidia-smi found no usable GPU ({res.stderr.strip()[:200]})")
    name, cap, driver = (x.strip() for x in res.stdout.splitlines()[0].split(","))
    return {"name": name, "compute_capability": cap, "driver": driver}


def import_tensorrt():
    try:
        import tensorrt as trt  # GPU hosts only: it does not install on the build machines
    except ImportError as e:
        raise TensorRTUnavailable(
            f"TensorRT not installed ({e}); on a GPU host: pip install tensorrt (11.x) or 'tensorrt<11' (JetPack 6 "
            "parity); on Jetson it comes with JetPack"
        ) from None
    return trt


def build_engines(
    bundle_path: Path,
    precision: str = "fp16",
    workspace_gib: float = 4.0,
    timing_cache: Path | None = None,
    opt_batch: int = 8,
    log=print,
) -> list[Path]:
    bundle = Bundle.open(bundle_path)
    trt = import_tensorrt()
    gpu = gpu_info()
    mode = build_mode(trt.__version__, precision, bundle.manifest["precision"])
    profs = profiles(bundle.manifest, opt_batch)
    written = []
    for name, prof in profs.items():
        onnx_path = bundle.graph(name)
        plan = bundle.path / f"{name}.{precision}.plan"
        log(f"building {plan.name} (TensorRT {trt.__version__}, {mode} typing, {gpu['name']})")
        data = _build(trt, onnx_path, prof, mode, precision, workspace_gib, timing_cache)
        write_bytes_atomic(plan, bytes(data))
        sidecar = {
            "plan": plan.name,
            "onnx": onnx_path.name,
            "precision": precision,
            "typing": mode,
            "tensorrt": trt.__version__,
            "cuda_driver": gpu["driver"],
            "gpu": gpu["name"],
            "compute_capability": gpu["compute_capability"],
            "profiles": prof.to_dict(),
            "bundle_sha256": bundle.manifest["files"][onnx_path.name]["sha256"],
        }
        write_bytes_atomic(plan.with_suffix(".plan.json"), (json.dumps(sidecar, indent=2) + "\n").encode())
        written.append(plan)
    return written


def _build(trt, onnx_path: Path, prof: Profile, mode: str, precision: str, workspace_gib: float, cache_path):
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if mode == "strong" else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT's ONNX parser refused the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if mode == "weak" and precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in prof.shapes.items():
        profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(profile)
    cache = None
    if cache_path is not None:
        blob = Path(cache_path).read_bytes() if Path(cache_path).is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    data = builder.build_serialized_network(network, config)
    if data is None:
        raise RuntimeError(f"{onnx_path}: TensorRT failed to build an engine (see the log above)")
    if cache is not None:
        write_bytes_atomic(Path(cache_path), bytes(cache.serialize()))
    return data
