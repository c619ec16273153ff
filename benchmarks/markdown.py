"""The report as markdown: headline ratios first, then one table per section."""

from __future__ import annotations


def _table(rows: list[dict], keys: list[str]) -> str:
    head = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |\n" for r in rows)


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


TARGETS_MS = {250_000: 1.0, 1_000_000: 2.0, 10_000_000: 5.0}  # p50 of the search step, one thread


def _near(n: int, tiers) -> int | None:
    """The tier within 5 % of n (tiers hold whole images, so N is approximate)."""
    return next((t for t in tiers if abs(t - n) <= 0.05 * n), None)


def headlines(report: dict) -> list[str]:
    out = []
    rows = report.get("two_stage") or []
    if rows:
        r = rows[-1]
        c, t = r["latency"]["clare"], r["latency"]["two_stage"]
        out.append(
            f"CLARE vs two-stage at {r['images']:,} images: query p50 {c['p50_ms']:.1f} ms vs {t['p50_ms']:.1f} ms "
            f"(**{t['p50_ms'] / c['p50_ms']:.0f}x faster**)"
        )
        for r in [r for r in rows if r["accuracy"] and "clare" in r["accuracy"]]:
            ca, ce, ta = r["accuracy"]["clare"], r["accuracy"]["clare_exact"], r["accuracy"]["two_stage"]
            ks = ("mBR@1(0.5)", "mBR@5(0.5)", "mBR@10(0.5)")
            out.append(
                f"accuracy at {r['images']:,} images (multi-positive, τ 0.5, {r['queries_accuracy']:,} queries): "
                "through the gallery's search "
                + " / ".join(f"{ca[k]:.2f}" for k in ks)
                + " vs the exact protocol "
                + " / ".join(f"{ce[k]:.2f}" for k in ks)
                + f" (mBR@1/5/10; largest gap {max(abs(ca[k] - ce[k]) for k in ks):.2f} points); two-stage "
                + " / ".join(f"{ta[k]:.2f}" for k in ks)
            )
    idx = (report.get("indexes") or {}).get("rows") or []
    tiers = sorted({r["vectors"] for r in idx})
    for n in tiers:
        d = [r for r in idx if r["vectors"] == n and r["design"] == "gallery (default)"]
        e = [r for r in idx if r["vectors"] == n and r["design"].startswith("exact scan")]
        if not d or not e:
            continue
        d, e = d[0], e[0]
        target = next((v for t, v in TARGETS_MS.items() if _near(t, [n])), None)
        goal = f" (target ≤ {target:g} ms: {'met' if d['p50_ms'] <= target else 'missed'})" if target else ""
        out.append(
            f"search at {n:,} instances: the gallery agrees with the exact ranking on top-1 {d['top1']:.3f}, "
            f"top-10 {d['top10']:.3f} (instance recall@10 {d['recall10']:.3f}); p50 {d['p50_ms']:.2f} ms, "
            f"p99 {d['p99_ms']:.2f} ms{goal}; the exact scan {e['p50_ms']:.1f} ms "
            f"(**{e['p50_ms'] / d['p50_ms']:.1f}x**)"
        )
    before = [r for r in idx if r["design"].startswith("usearch")]
    if before:
        n = max(r["vectors"] for r in before)
        best = max((r for r in before if r["vectors"] == n), key=lambda r: r["top1"])
        out.append(
            f"the previous index (usearch HNSW, raw inner product) at {n:,}: top-1 {best['top1']:.3f}, top-10 "
            f"{best['top10']:.3f} at its best setting ({best['setting']}, {best['p50_ms']:.2f} ms)"
        )
    for f in (report.get("indexes") or {}).get("filtered") or []:
        out.append(
            f"filtered search at {f['vectors']:,} ({f['filter']}): top-1 {f['top1']:.3f}, top-10 {f['top10']:.3f}; "
            f"p50 {f['filtered_p50_ms']:.2f} ms = {f['ratio_p50']:.2f}x the unfiltered {f['unfiltered_p50_ms']:.2f} ms"
        )
    e2e = (report.get("end_to_end") or {}).get("rows", {})
    if "embedded_c1" in e2e and "triton_grpc_c1" in e2e:
        out.append(
            f"serving at concurrency 1: embedded {e2e['embedded_c1']['p50_ms']:.1f} ms, Triton gRPC "
            f"{e2e['triton_grpc_c1']['p50_ms']:.1f} ms, HTTP {e2e['triton_http_c1']['p50_ms']:.1f} ms p50"
        )
    return out


def render(report: dict) -> str:
    """The report as markdown: its header and headlines, then one part per section it ran."""
    lines = _header(report) + [f"![{f}]({f})" for f in report.get("figures", [])]
    for key, part in (
        ("stages", _stages),
        ("indexes", _indexes),
        ("two_stage", _two_stage),
        ("end_to_end", _end_to_end),
        ("cluster", _cluster),
        ("serving", _serving),
    ):
        if report.get(key):
            lines += part(report[key])
    lines += ["", "Section wall times (s): " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()), ""]
    return "\n".join(lines)


def _header(report: dict) -> list[str]:
    m = report["machine"]
    reused = report.get("reused")
    return [
        f"# Benchmark report: {report['name']}",
        "",
        f"Machine: {report['machine_label']}, {m['memory_GiB']} GiB, Python {m['python']}, {m['os']}.  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".  ",
        f"Command: `{report['command']}`; created {report['created']}; wall time "
        f"{report['seconds'].get('total', 0) / 60:.1f} min. Model: `{report['bundle']['path']}` "
        f"({report['bundle']['precision']}, {report['bundle']['dim']}-d).",
        *(
            [
                "Reused from `--work` (their generation and encoding time is not in the wall time): "
                + ", ".join(f"`{r}`" for r in reused)
                + "."
            ]
            if reused
            else []
        ),
        "",
        "## Headlines",
        "",
        *[f"- {h}" for h in headlines(report)],
        "",
    ]


def _stages(st: dict) -> list[str]:
    return [
        "",
        "## Where the time goes",
        "",
        "One query, median per stage:",
        "",
        _table([st["query"]], list(st["query"])),
        "One indexed image:",
        "",
        _table([st["image"]], list(st["image"])),
        "Indexing throughput (`Gallery.add_images`: hash, read, detect, SQLite + index):",
        "",
        _table(st["indexing"], ["threads", "batch", "images_per_s"]),
    ]


INDEX_COLUMNS = [
    "vectors",
    "design",
    "setting",
    "top1",
    "top10",
    "recall10",
    "p50_ms",
    "p99_ms",
    "build_s",
    "bytes_resident",
    "bytes_disk",
]


def _indexes(idx: dict) -> list[str]:
    lines = [
        "",
        "## Search at scale (the model's vectors at their real dimension)",
        "",
        f"{idx['queries']} held-out test expressions per tier; truth = the exact ranking over the stored f16 "
        "vectors; every design's candidates are scored exactly and reduced to the best instance per image. "
        "Latency: one query at a time, one thread. Bytes per instance: `resident` = what every query touches "
        "(for the gallery: its codes, keys and image ids; its f16 vectors are memory-mapped and only the "
        "re-ranked rows are read), `disk` = the whole gallery directory (SQLite included).",
        "",
        _table(idx["rows"], INDEX_COLUMNS),
    ]
    if idx.get("filtered"):
        lines += ["Filtered search (a tag on 1 % of the images), beside the unfiltered search in the same run:", ""]
        keys = ["vectors", "top1", "top10", "filtered_p50_ms", "filtered_p99_ms", "unfiltered_p50_ms", "ratio_p50"]
        lines += [_table(idx["filtered"], keys)]
    return lines + [line for s in idx.get("skipped", []) for line in (f"Not run: {s}.", "")]


def _two_stage(rows: list[dict]) -> list[str]:
    names = {"clare": "CLARE (gallery search)", "clare_exact": "CLARE (exact protocol)"}
    table = []
    for r in rows:
        for method in ("clare", "clare_exact", "two_stage"):
            a, lat = (r["accuracy"] or {}).get(method, {}), r["latency"][method.replace("_exact", "")]
            table.append(
                {
                    "images": r["images"],
                    "method": names.get(method, f"two-stage (m={r['m']})"),
                    "queries (accuracy)": r["queries_accuracy"] or None,
                    "p50_ms": lat["p50_ms"],
                    "p95_ms": lat["p95_ms"],
                    "BR@1": a.get("BR@1(0.5)"),
                    "BR@10": a.get("BR@10(0.5)"),
                    "mBR@1": a.get("mBR@1(0.5)"),
                    "mBR@5": a.get("mBR@5(0.5)"),
                    "mBR@10": a.get("mBR@10(0.5)"),
                    "stages (p50 ms)": ", ".join(f"{k} {v:.2f}" for k, v in lat["stages_p50_ms"].items()),
                }
            )
    return [
        "",
        "## CLARE vs two-stage by gallery size",
        "",
        "Accuracy over a sample of test expressions whose image is in the gallery (τ = 0.5; mBR = multi-positive; "
        "– where the gallery has no exact answer sets); latency over 100 single queries (CLARE: the gallery's "
        "search; the exact protocol row repeats it).",
        "",
        _table(table, list(table[0])),
    ]


def _serving_table(rows: dict) -> str:
    table = [{"server": k.rsplit("_c", 1)[0], "concurrency": int(k.rsplit("_c", 1)[1]), **v} for k, v in rows.items()]
    return _table(table, ["server", "concurrency", "p50_ms", "p95_ms", "p99_ms", "qps"])


def _end_to_end(e2e: dict) -> list[str]:
    lines = ["", f"## End to end ({e2e['images']:,}-image gallery, {e2e['requests']} requests per row)", ""]
    lines += [_serving_table(e2e["rows"])]
    if e2e.get("triton_skipped"):
        lines += [f"Triton rows skipped: {e2e['triton_skipped']}", ""]
    return lines


def _cluster(cl: dict) -> list[str]:
    ix = cl["indexing"]
    return [
        "",
        f"## On Ray ({cl['images']:,}-image gallery, {cl['instances']:,} instances, {cl['requests']} unique "
        f"requests per row, a local cluster of {cl['nodes']} nodes on this host)",
        "",
        "The embedded engine beside the Ray Serve app (front deployment + one deployment per shard, one replica "
        "each), closed-loop load. On this host every node shares the same cores: the rows measure what Ray adds "
        "(HTTP proxy, fan-out, serialisation), not a speed-up.",
        "",
        _serving_table(cl["rows"]),
        f"Indexing {ix['images']} images: one `reir index` process {ix['one_process_images_per_s']} images/s; "
        "`reir cluster index` with 1, 2, 4 encoder actors: "
        + ", ".join(f"{v} images/s" for v in ix["ray"].values())
        + " (more actors than cores only compete here).",
        "",
    ]


def _serving(sv: dict) -> list[str]:
    """The serving section: closed-loop table, the ceiling, open-loop knees, overload."""
    closed = [{"path": n, "clients": int(c), **row} for n, p in sv["paths"].items() for c, row in p["closed"].items()]
    lines = [
        "",
        f"## Serving under load ({sv['images']:,}-image gallery, {sv['instances']:,} instances, unique texts, "
        "no text cache)",
        "",
        "Closed loop: N clients, each sending when answered (a refused one waits its Retry-After).",
        "",
        _table(closed, ["path", "clients", "qps", "p50_ms", "p99_ms", "refused"]),
        f"Ceiling from CPU time per request (batches of 16, encode + search): "
        f"{sv['ceiling']['cpu_ms_per_request']} ms, so {sv['ceiling']['two_core_qps']} queries/s on 2 cores.",
        "",
        "Open loop: a fixed arrival rate, latency from each request's scheduled send time. Knee: the highest "
        "rate answered in full with p99 within 3x the lowest rate's. Overload: twice the knee.",
        "",
    ]
    rows = []
    for name, p in sv["paths"].items():
        if "open" in p:
            o = p.get("overload") or {}
            rows.append(
                {
                    "path": name,
                    "knee_qps": p["knee_qps"],
                    "overload_offered": o.get("offered_qps"),
                    "answered_qps": o.get("answered_qps"),
                    "refused": o.get("refused"),
                    "refusal_p99_ms": o.get("refusal_p99_ms"),
                    "admitted_p99_ms": o.get("p99_ms"),
                    "unloaded_p99_ms": o.get("unloaded_p99_ms"),
                }
            )
    if rows:
        lines += [_table(rows, list(rows[0]))]
    added = {n: p["one_client_added_ms"] for n, p in sv["paths"].items() if "one_client_added_ms" in p}
    if added:
        shown = ", ".join(f"{n} {v} ms" for n, v in added.items())
        lines += [f"At one client, p50 added to the embedded batched call: {shown}.", ""]
    floor = sv.get("serve_floor")
    if floor:
        f1, f16 = floor["1"], floor["16"]
        cost = ", ".join(f"{k} {v}" for k, v in f16["cpu_ms_per_request"].items())
        lines += [
            f"Ray Serve's own floor, an empty deployment behind its HTTP proxy on this host: {f1['p50_ms']:.1f} ms "
            f"p50 at one client, {f16['qps']} queries/s at 16 clients, CPU ms per request: {cost}.",
            "",
        ]
    cpu = {n: p["cpu_ms_per_request_16"] for n, p in sv["paths"].items() if "cpu_ms_per_request_16" in p}
    if cpu:
        lines += ["CPU ms per request by process at 16 clients (where a served path's time goes):", ""]
        lines += [_table([{"path": n, **c} for n, c in cpu.items()], ["path", *next(iter(cpu.values()))]), ""]
    vis = sv.get("visibility")
    if vis:
        shown = "; ".join(
            f"{n}: add {', '.join(map(str, v['add_s']))} s, removal {', '.join(map(str, v['remove_s']))} s"
            for n, v in vis.items()
        )
        lines += [f"Live gallery, seconds from a writer's commit to the first answer showing it: {shown}.", ""]
    return [*lines, sv.get("triton", ""), ""]
