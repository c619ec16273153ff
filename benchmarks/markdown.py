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


def best_at_recall(idx: list[dict], n: int, name: str, recall: float) -> dict | None:
    """The fastest setting of index `name` at `n` vectors that reaches `recall`."""
    ok = [r for r in idx if r["vectors"] == n and r["index"] == name and r["recall@10"] >= recall]
    return min(ok, key=lambda r: r["k10_p50_ms"]) if ok else None


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
        scored = [r for r in rows if r["accuracy"]]
        if scored:
            r = scored[-1]
            ca, ta = r["accuracy"]["clare"], r["accuracy"]["two_stage"]
            out.append(
                f"accuracy at {r['images']:,} images (multi-positive, τ 0.5): BR@1 {ca['mBR@1(0.5)']:.1f} vs "
                f"{ta['mBR@1(0.5)']:.1f}, BR@10 {ca['mBR@10(0.5)']:.1f} vs {ta['mBR@10(0.5)']:.1f} (CLARE vs two-stage)"
            )
    idx = report.get("indexes") or []
    if idx:
        n = max(r["vectors"] for r in idx)
        compared = False
        for size in sorted({r["vectors"] for r in idx}, reverse=True):
            for target in (0.95, 0.9):
                u = best_at_recall(idx, size, "usearch f16", target)
                f = best_at_recall(idx, size, "faiss HNSWFlat", target)
                if u and f and not compared:
                    compared = True
                    ratio = f["k10_p50_ms"] / u["k10_p50_ms"]
                    who = "usearch" if ratio >= 1 else "FAISS"
                    out.append(
                        f"usearch f16 vs FAISS HNSW at recall@10 ≥ {target} ({size:,} vectors): "
                        f"{u['k10_p50_ms']:.3f} ms (ef {u['expansion_search']}) vs {f['k10_p50_ms']:.3f} ms "
                        f"(ef {f['expansion_search']}): **{who} {max(ratio, 1 / ratio):.1f}x faster**; "
                        f"memory {u['memory_MB']:.0f} vs {f['memory_MB']:.0f} MB; "
                        f"build {u['build_s']:.0f} vs {f['build_s']:.0f} s"
                    )
        best = {
            name: max((r for r in idx if r["vectors"] == n and r["index"] == name), key=lambda r: r["recall@10"])
            for name in ("usearch f16", "faiss HNSWFlat")
            if any(r["vectors"] == n and r["index"] == name for r in idx)
        }
        if best and max(r["recall@10"] for r in best.values()) < 0.9:
            out.append(
                f"at {n:,} vectors no HNSW setting reaches recall@10 0.9: best "
                + ", ".join(
                    f"{k} {r['recall@10']:.3f} (ef {r['expansion_search']}, {r['k10_p50_ms']:.2f} ms)"
                    for k, r in best.items()
                )
                + " (text queries searching image-instance vectors by raw dot product: a hard case for graph indexes)"
            )
        out += _connectivity_lines(idx)
        ex = [r for r in idx if r["vectors"] == n and r["index"] == "numpy exact"]
        u = best_at_recall(idx, n, "usearch f16", 0.95) or best_at_recall(idx, n, "usearch f16", 0.9)
        if ex and u:
            out.append(
                f"exact numpy search at {n:,} vectors: {ex[0]['k10_p50_ms']:.1f} ms per query, "
                f"{ex[0]['k10_p50_ms'] / u['k10_p50_ms']:.0f}x usearch f16 at recall {u['recall@10']:.3f}"
            )
        i8 = [r["recall@10"] for r in idx if r["vectors"] == n and r["index"] == "usearch i8"]
        if i8:
            out.append(
                f"usearch i8 tops out at recall@10 {max(i8):.3f} at {n:,} vectors: its int8 scaling assumes unit-norm "
                "(cosine) vectors and CLARE scores raw dot products, so galleries refuse i8"
            )
    e2e = (report.get("end_to_end") or {}).get("rows", {})
    if "embedded_c1" in e2e and "triton_grpc_c1" in e2e:
        out.append(
            f"serving at concurrency 1: embedded {e2e['embedded_c1']['p50_ms']:.1f} ms, Triton gRPC "
            f"{e2e['triton_grpc_c1']['p50_ms']:.1f} ms, HTTP {e2e['triton_http_c1']['p50_ms']:.1f} ms p50"
        )
    return out


def _connectivity_lines(idx: list[dict]) -> list[str]:
    """Denser graphs (M > 16) against the default, per size: best recall and its cost."""
    out = []
    for name in sorted({r["index"] for r in idx if " M" in r["index"]}):
        base = name.rsplit(" M", 1)[0]
        for n in sorted({r["vectors"] for r in idx if r["index"] == name}):
            pair = [[r for r in idx if r["vectors"] == n and r["index"] == x] for x in (base, name)]
            if not all(pair):
                continue
            (b, d) = (max(rows, key=lambda r: (r["recall@10"], -r["k10_p50_ms"])) for rows in pair)
            out.append(
                f"{name} vs M16 at {n:,} vectors: best recall@10 {d['recall@10']:.3f} vs {b['recall@10']:.3f} "
                f"({d['k10_p50_ms']:.2f} vs {b['k10_p50_ms']:.2f} ms at ef {d['expansion_search']} / "
                f"{b['expansion_search']}); memory {d['memory_MB']:.0f} vs {b['memory_MB']:.0f} MB, "
                f"build {d['build_s']:.0f} vs {b['build_s']:.0f} s"
            )
    return out


def render(report: dict) -> str:
    m = report["machine"]
    lines = [
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
                + ", ".join(f"`{r}`" for r in report["reused"])
                + "."
            ]
            if report.get("reused")
            else []
        ),
        "",
        "## Headlines",
        "",
        *[f"- {h}" for h in headlines(report)],
        "",
    ]
    lines += [f"![{f}]({f})" for f in report.get("figures", [])]
    st = report.get("stages")
    if st:
        lines += [
            "",
            "## Where the time goes",
            "",
            "One query, median per stage:",
            "",
            _table([st["query"]], list(st["query"])),
        ]
        lines += ["One indexed image:", "", _table([st["image"]], list(st["image"]))]
        lines += ["Indexing throughput (`Gallery.add_images`: hash, read, detect, SQLite + ANN):", ""]
        lines += [_table(st["indexing"], ["threads", "batch", "images_per_s"])]
    idx = report.get("indexes")
    if idx:
        lines += ["", "## Vector indexes (256-d, the model's embedding distribution)", ""]
        lines += [
            "Build on all cores; search one query at a time on one thread; recall@10 against exact search. "
            "usearch `memory_MB` is its reserved memory (capacity included); FAISS HNSW its serialised size.",
            "",
            _table(
                idx,
                [
                    "vectors",
                    "index",
                    "expansion_search",
                    "build_s",
                    "memory_MB",
                    "k10_p50_ms",
                    "k10_p99_ms",
                    "k100_p50_ms",
                    "k100_p99_ms",
                    "recall@10",
                ],
            ),
        ]
    rows = report.get("two_stage")
    if rows:
        lines += ["", "## CLARE vs two-stage by gallery size", ""]
        table = []
        for r in rows:
            for method in ("clare", "two_stage"):
                a, lat = (r["accuracy"] or {}).get(method, {}), r["latency"][method]
                table.append(
                    {
                        "images": r["images"],
                        "method": method if method == "clare" else f"two-stage (m={r['m']})",
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
        lines += [
            "Accuracy over a sample of test expressions whose image is in the gallery (τ = 0.5; mBR = multi-positive; "
            "– where the gallery has no exact answer sets); latency over 100 single queries.",
            "",
            _table(table, list(table[0])),
        ]
    e2e = report.get("end_to_end")
    if e2e:
        lines += ["", f"## End to end ({e2e['images']:,}-image gallery, {e2e['requests']} requests per row)", ""]
        table = [
            {"server": k.rsplit("_c", 1)[0], "concurrency": int(k.rsplit("_c", 1)[1]), **v}
            for k, v in e2e["rows"].items()
        ]
        lines += [_table(table, ["server", "concurrency", "p50_ms", "p95_ms", "p99_ms", "qps"])]
        if e2e.get("triton_skipped"):
            lines += [f"Triton rows skipped: {e2e['triton_skipped']}", ""]
    lines += ["", "Section wall times (s): " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()), ""]
    return "\n".join(lines)
