"""Size and CPU latency of exported bundles, side by side in one run (no torch needed).

    python -m reir.benchmarks.variants BUNDLE [BUNDLE ...] [--threads 2] [--json out.json]

Latency is the median of repeated runs after a warm-up, per graph, at text batch 1 and 32
and image batch 1 and 8, through the same `reir.engine` sessions the server uses.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import numpy as np

from reir.engine.fsutil import write_json_atomic
from reir.engine.runtime.bundle import Bundle

from .common import time_each


def _median_ms(fn, arg, repeat: int) -> float:
    return round(1000 * float(np.median(time_each(fn, [arg] * repeat, warmup=1))), 2)


def measure(path: Path, threads: int, repeat: int = 30) -> dict:
    b = Bundle.open(path)
    m = b.manifest
    text, visual = b.text_encoder(threads=threads), b.visual_encoder(threads=threads)
    h, w = b.input_hw
    rng = np.random.default_rng(0)
    phrase = "the small red circle left of the large blue star"
    row = {
        "bundle": str(path),
        "precision": m["precision"],
        "text_MB": round(m["files"]["text_encoder.onnx"]["bytes"] / 1e6, 2),
        "visual_MB": round(m["files"]["visual_encoder.onnx"]["bytes"] / 1e6, 2),
        "bundle_MB": round(sum(f["bytes"] for f in m["files"].values()) / 1e6, 2),
    }
    for n in (1, 32):
        row[f"text_b{n}_ms"] = _median_ms(text, [phrase] * n, repeat)
    for n in (1, 8):
        imgs = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
        row[f"visual_b{n}_ms"] = _median_ms(visual, imgs, max(5, repeat // 3))
    row["probe_mBR@1"] = m["probe"]["onnx"]["mBR@1(0.5)"]
    row["probe_BR@1"] = m["probe"]["onnx"]["BR@1(0.5)"]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = [measure(p, args.threads) for p in args.bundles]
    keys = list(rows[0])
    print(
        f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"ORT threads {args.threads}"
    )
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    if args.json:
        write_json_atomic(args.json, {"threads": args.threads, "cores": os.cpu_count(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
