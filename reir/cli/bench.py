"""`reir bench micro|report`: the benchmarks from the command line."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path("benchmarks/results")


def _micro_dir() -> str:
    """The pytest-benchmark suite inside the installed package."""
    import reir.benchmarks  # its location only, for `reir bench micro`

    return str(Path(reir.benchmarks.__file__).resolve().parent / "micro")


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: `micro` (pytest-benchmark) or `report` (the full report)")
    bench = p.add_subparsers(dest="bench_command", required=True)
    r = bench.add_parser("report", help="measure everything; write <machine>-<date>.json/.md + figures")
    r.add_argument("--out", type=Path, default=RESULTS)
    r.add_argument("--bundle", type=Path, help="default: the shipped model")
    r.add_argument("--work", type=Path, help="keep generated galleries here (reused by the next run)")
    r.add_argument(
        "--full", action="store_true", help="add a 100k-image tier (BR@k on 2,000 drawn queries) and 10M instances"
    )
    r.add_argument(
        "--sections", default="stages,indexes,two_stage,end_to_end,cluster,serving", help="comma-separated subset"
    )
    r.add_argument("--name", default="", help="suffix of the report's name (a part run beside a full one)")
    r.add_argument(
        "--index-sizes", help="instances per search-at-scale tier (default 50000,250000,1000000; --full adds 10M)"
    )
    r.add_argument("--rerender", type=Path, metavar="JSON", help="redraw figures and markdown from a stored JSON")
    st = bench.add_parser("steps", help="training-step cost of a recipe vs a variant (--set), side by side")
    st.add_argument("config", type=Path)
    st.add_argument("--set", dest="variant", action="append", default=[], metavar="KEY=VALUE", required=True)
    st.add_argument("--steps", type=int, default=30, help="timed steps per stage and config")
    st.add_argument("--warmup", type=int, default=3)
    st.add_argument("--out", type=Path, help="write the JSON here")
    m = bench.add_parser("micro", help="pytest-benchmark micro-benchmarks; JSON to --out")
    m.add_argument("--out", type=Path, default=RESULTS)
    m.add_argument("--threads", type=int, default=0, help="ONNX Runtime / torch threads (0: all cores)")
    m.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the PyTorch eager rows run")
    m.add_argument("-k", dest="select", help="pytest -k expression, e.g. 'text_encode'")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.bench_command == "steps":
        from reir.benchmarks.recipe_steps import compare_steps  # torch: a training benchmark
        from reir.training.config import ConfigError  # torch: a training benchmark

        try:
            compare_steps(args.config, args.variant, args.steps, args.warmup, args.out)
        except ConfigError as e:
            print(f"reir: error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.bench_command == "report":
        from reir.benchmarks.run import SECTIONS, rerender, run_report  # faiss, usearch, matplotlib: bench extra

        if args.rerender:
            print(rerender(args.rerender))
            return 0
        sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
        if not sections or set(sections) - set(SECTIONS):
            bad = sorted(set(sections) - set(SECTIONS))
            print(f"reir: error: --sections: unknown {bad or 'none given'}; choose from {SECTIONS}", file=sys.stderr)
            return 2
        try:
            sizes = tuple(int(v) for v in args.index_sizes.split(",")) if args.index_sizes else None
        except ValueError:
            print("reir: error: --index-sizes takes comma-separated integers", file=sys.stderr)
            return 2
        if sizes and min(sizes) < 100:
            print("reir: error: --index-sizes must be >= 100", file=sys.stderr)
            return 2
        if args.name and not re.fullmatch(r"[a-z0-9-]+", args.name):
            print("reir: error: --name takes lower-case letters, digits and '-'", file=sys.stderr)
            return 2
        run_report(args.out, args.bundle, args.work, args.full, sections, index_sizes=sizes, suffix=args.name)
        return 0
    from reir.benchmarks.common import slug  # faiss, usearch, matplotlib: the bench extra

    args.out.mkdir(parents=True, exist_ok=True)
    from reir.benchmarks.common import machine

    name = f"micro-{slug(machine())}-{datetime.now(UTC).date().isoformat()}.json"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        _micro_dir(),
        "--benchmark-only",
        "-p",
        "no:cacheprovider",
        "-q",
        f"--benchmark-json={args.out / name}",
        "--benchmark-columns=median,iqr,ops,rounds",
        "--benchmark-sort=name",
    ]
    if args.select:
        cmd += ["-k", args.select]
    env = dict(os.environ, REIR_BENCH_THREADS=str(args.threads), REIR_BENCH_DEVICE=args.device)
    return subprocess.call(cmd, env=env)
