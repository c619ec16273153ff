"""A capacity plan for sharded serving, computed from measured figures (not guessed):

    python -m reir.benchmarks.capacity REPORT.json CLUSTER_REPORT.json [GPU_MICRO.json]
        [--instances INSTANCES_REPORT.json --min-score 0.1]

REPORT: a `reir bench report --full` (search at scale: the gallery's latency and bytes per
instance at its largest tier, instances per image, per-image decode cost). CLUSTER_REPORT:
its "cluster" section (what Ray Serve adds to a query). GPU_MICRO: `reir bench micro
--device cuda` on a GPU host (visual encoder images/s). INSTANCES_REPORT: `python -m
reir.benchmarks.instances`; with `--min-score` the plan is for galleries created with that
score cut, at the instances per image it measured (the search figures are per instance,
so they carry over). Prints a markdown table.

Model, stated so it can be argued with: a shard holds the largest measured tier; a shard
replica uses one core and answers 1000 / p50 queries/s; every query visits every shard, so
replicas per shard = ceil(target qps / per-replica qps), at least 2 for availability; a
node has `--node-cores` cores and `--node-gib` GiB, of which 85 % is usable; a shard
replica needs its hot bytes in RAM, and one copy of its mapped vectors per node sits in
the page cache. The query's p99 is taken as the shard's p99 plus Ray's added p99: with
many shards the slowest of S shards sets it, so expect more at thousands of shards.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

IMAGES = (1_000_000, 100_000_000, 1_000_000_000)
GIB = 1 << 30


def measured(report: dict, cluster: dict, micro: dict | None) -> dict:
    rows = [r for r in report["indexes"]["rows"] if r["design"] == "gallery (default)"]
    shard = max(rows, key=lambda r: r["vectors"])
    g = report["gallery"]
    c = cluster["cluster"]["rows"]
    out = {
        "shard_instances": shard["vectors"],
        "shard_p50_ms": shard["p50_ms"],
        "shard_p99_ms": shard["p99_ms"],
        "hot_bytes": shard["bytes_resident"],
        "vector_bytes": report["bundle"]["dim"] * 2,
        "disk_bytes": shard["bytes_disk"],
        "instances_per_image": g["instances"] / g["images"],
        "ray_added_p99_ms": max(0.0, c["serve_1shard_c1"]["p99_ms"] - c["embedded_c1"]["p99_ms"]),
        "decode_ms_per_image": report["stages"]["image"]["read_resize_ms_per_image"],
    }
    if micro:
        best = max(
            (b for b in micro["benchmarks"] if b["name"].startswith("test_visual_encode[torch-")),
            key=lambda b: b["extra_info"]["batch"] / b["stats"]["median"],
        )
        out["gpu_images_per_s"] = best["extra_info"]["batch"] / best["stats"]["median"]
    return out


def with_cut(m: dict, instances: dict, min_score: float) -> dict:
    """`m` for galleries created with the score cut `min_score`: the instances per image that
    an instances report measured at that cut (KeyError: it measured no such cut)."""
    rows = {r["min_score"]: r for r in instances["instances"]["rows"]}
    if min_score not in rows:
        raise KeyError(f"no cut {min_score} measured (it has {sorted(rows)})")
    return m | {"instances_per_image": rows[min_score]["per_image"]}


def plan(m: dict, qps: float, node_cores: int, node_gib: float, gpus: tuple[int, ...]) -> list[dict]:
    rows = []
    per_replica_qps = 1000.0 / m["shard_p50_ms"]
    for images in IMAGES:
        instances = images * m["instances_per_image"]
        shards = max(1, math.ceil(instances / m["shard_instances"]))
        per_shard = instances / shards
        replicas = max(2, math.ceil(qps / per_replica_qps))
        hot = per_shard * m["hot_bytes"]
        vectors = per_shard * m["vector_bytes"]
        usable = 0.85 * node_gib * GIB
        fit = max(1, min(node_cores, int(usable // (hot + vectors))))  # replicas of distinct shards per node
        nodes = math.ceil(shards * replicas / fit)
        row = {
            "images": f"{images:,}",
            "instances": f"{instances / 1e6:,.0f}M",
            "shards": shards,
            "replicas/shard": replicas,
            "RAM/shard (hot + mapped)": f"{(hot + vectors) / GIB:.1f} GiB",
            "disk/shard": f"{per_shard * m['disk_bytes'] / GIB:.0f} GiB",
            "nodes": nodes,
            "p50 / p99 (ms)": f"{m['shard_p50_ms']:.0f} / {m['shard_p99_ms'] + m['ray_added_p99_ms']:.0f}",
        }
        if "gpu_images_per_s" in m:
            for n in gpus:
                hours = images / (m["gpu_images_per_s"] * n) / 3600
                row[f"index on {n} GPUs"] = f"{hours:,.1f} h" if hours >= 1 else f"{hours * 60:.0f} min"
        rows.append(row)
    return rows


def markdown(m: dict, rows: list[dict], qps: float, node_cores: int, node_gib: float) -> str:
    head = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    body = "".join("| " + " | ".join(str(v) for v in r.values()) + " |\n" for r in rows)
    feed = m["decode_ms_per_image"] * m.get("gpu_images_per_s", 0) / 1000
    notes = [
        f"Inputs: a shard of {m['shard_instances']:,} instances answers in p50 {m['shard_p50_ms']:.1f} ms / "
        f"p99 {m['shard_p99_ms']:.1f} ms on one core; {m['hot_bytes']:.0f} B/instance hot, "
        f"{m['vector_bytes']} B mapped, {m['disk_bytes']:,.0f} B on disk; "
        f"{m['instances_per_image']:.1f} instances per image; Ray Serve adds {m['ray_added_p99_ms']:.0f} ms at p99.",
        f"Sized for {qps:.0f} queries/s on nodes of {node_cores} cores and {node_gib:.0f} GiB.",
    ]
    if "gpu_images_per_s" in m:
        notes.append(
            f"Indexing: {m['gpu_images_per_s']:.0f} images/s per GPU (visual encoder, batch 32), fed by about "
            f"{feed:.0f} CPU cores per GPU for decoding ({m['decode_ms_per_image']:.1f} ms per image per core)."
        )
    return head + body + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("cluster_report", type=Path)
    ap.add_argument("gpu_micro", type=Path, nargs="?")
    ap.add_argument("--qps", type=float, default=100.0)
    ap.add_argument("--node-cores", type=int, default=32)
    ap.add_argument("--node-gib", type=float, default=256.0)
    ap.add_argument("--gpus", default="8,64", help="GPU counts for the indexing-time columns")
    ap.add_argument("--instances", type=Path, help="an instances report (benchmarks/instances.py)")
    ap.add_argument("--min-score", type=float, help="with --instances: plan for galleries with this score cut")
    args = ap.parse_args(argv)
    load = lambda p: json.loads(p.read_text(encoding="utf-8"))  # noqa: E731
    m = measured(load(args.report), load(args.cluster_report), load(args.gpu_micro) if args.gpu_micro else None)
    if (args.instances is None) != (args.min_score is None):
        ap.error("--instances and --min-score go together")
    if args.instances is not None:
        try:
            m = with_cut(m, load(args.instances), args.min_score)
        except KeyError as e:
            ap.error(f"{args.instances}: {e.args[0]}")
    gpus = tuple(int(x) for x in args.gpus.split(","))
    print(
        markdown(m, plan(m, args.qps, args.node_cores, args.node_gib, gpus), args.qps, args.node_cores, args.node_gib)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
