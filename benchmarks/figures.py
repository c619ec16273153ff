"""The report's figures (matplotlib, PNG). Each names the machine it was measured on."""

from __future__ import annotations

from pathlib import Path


def figures(report: dict, out: Path) -> list[Path]:
    import matplotlib  # the Agg backend is chosen before pyplot loads

    matplotlib.use("Agg")
    paths = []
    for draw in (_gallery_size, _recall_latency, _stages, _serving, _under_load):
        p = draw(report, out)
        if p is not None:
            paths.append(p)
    return paths


def _save(fig, report: dict, out: Path, what: str) -> Path:
    fig.suptitle(f"{fig._suptitle.get_text() if fig._suptitle else ''}\n{report['machine_label']}", fontsize=9)
    path = out / f"{report['name']}-{what}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _gallery_size(report: dict, out: Path) -> Path | None:
    """Latency and accuracy of CLARE vs two-stage by gallery size, and one search by gallery
    size: one panel for each that the report measured."""
    import matplotlib.pyplot as plt

    rows, idx = report.get("two_stage") or [], (report.get("indexes") or {}).get("rows") or []
    scored = [r for r in rows if r["accuracy"]]
    panels = [p for p, data in ((_latency_panel, rows), (_accuracy_panel, scored), (_ann_panel, idx)) if data]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        panel(ax, report)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("cost and accuracy vs gallery size")
    return _save(fig, report, out, "gallery-size")


def _methods(rows: list[dict]) -> tuple[tuple[str, str], ...]:
    return (("clare", "CLARE: text + one gallery search"), ("two_stage", f"two-stage (m = {rows[0]['m']})"))


def _latency_panel(ax, report: dict) -> None:
    rows = report["two_stage"]
    x = [r["images"] for r in rows]
    for key, label in _methods(rows):
        ax.plot(x, [r["latency"][key]["p50_ms"] for r in rows], "o-", label=label)
    ax.set(xscale="log", yscale="log", xlabel="gallery images", ylabel="query latency p50 (ms)")
    ax.set_title("query latency vs gallery size", fontsize=10)


def _accuracy_panel(ax, report: dict) -> None:
    rows = [r for r in report["two_stage"] if r["accuracy"]]
    x = [r["images"] for r in rows]
    for (key, label), color in zip(_methods(rows), ("C0", "C1"), strict=True):
        for k, style in (("1", "o-"), ("10", "s--")):
            y = [r["accuracy"][key][f"mBR@{k}(0.5)"] for r in rows]
            ax.plot(x, y, style, color=color, label=f"{label.split(':')[0]} mBR@{k}")
    ax.set(xscale="log", xlabel="gallery images", ylabel="multi-positive BR@k, τ 0.5 (%)")
    ax.set_title("accuracy vs gallery size (synthetic test queries)", fontsize=10)


def _ann_panel(ax, report: dict) -> None:
    idx = report["indexes"]["rows"]
    for design in ("gallery (default)", "exact scan (faiss f16)"):
        pts = sorted((r["vectors"], r["p50_ms"]) for r in idx if r["design"] == design)
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=design)
    for n, ms in ((250_000, 1.0), (1_000_000, 2.0), (10_000_000, 5.0)):
        ax.plot([n], [ms], "k_", markersize=14)
    ax.plot([], [], "k_", label="target p50")
    ax.set(xscale="log", yscale="log", xlabel="instances (448-d)", ylabel="search p50, k = 10 (ms, one thread)")
    ax.set_title("one search vs gallery size", fontsize=10)


def _recall_latency(report: dict, out: Path) -> Path | None:
    """Agreement with the exact ranking against latency, per design and setting: the curves."""
    import matplotlib.pyplot as plt

    idx = (report.get("indexes") or {}).get("rows")
    if not idx:
        return None
    sizes = sorted({r["vectors"] for r in idx})[-3:]
    names = list(dict.fromkeys(r["design"] for r in idx))
    color = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(names)}  # one colour per design in every panel
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.4), squeeze=False)
    for ax, n in zip(axes[0], sizes, strict=True):
        for name in names:
            pts = sorted((r["p50_ms"], r["top10"]) for r in idx if r["vectors"] == n and r["design"] == name)
            if pts:
                style = "*" if name == "gallery (default)" else ("o-" if len(pts) > 1 else "s")
                ax.plot(
                    *zip(*pts, strict=True), style, label=name, color=color[name], markersize=10 if style == "*" else 5
                )
        ax.axhline(0.98, color="grey", lw=0.8, ls="--")
        ax.set(xscale="log", xlabel="search p50, k = 10 (ms, one thread)", ylabel="top-10 images agreeing with exact")
        ax.set_title(f"{n:,} instances (dashed: the 0.98 target)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("agreement with the exact ranking vs latency, per design and setting")
    return _save(fig, report, out, "agreement-latency")


def _stages(report: dict, out: Path) -> Path | None:
    import matplotlib.pyplot as plt

    st, rows = report.get("stages"), report.get("two_stage")
    if not st:
        return None
    q = st["query"]
    bars = [
        (
            f"CLARE query ({q['gallery_images']:,} images)",
            {
                "tokenize": q["tokenize_ms"],
                "text encoder": q["text_encoder_ms"],
                "index search": q["ann_search_ms"],
                "hit metadata": q["hit_metadata_ms"],
            },
        )
    ]
    if rows:
        r = rows[-1]
        s = r["latency"]["two_stage"]["stages_p50_ms"]
        bars.append(
            (
                f"two-stage query ({r['images']:,} images, m = {r['m']})",
                {
                    "text encoder": s["text"],
                    "image search": s["search"],
                    "read images": s["read"],
                    "grounding": s["ground"],
                },
            )
        )
    im = st["image"]
    bars.append(
        (
            "indexing, per image",
            {"read + resize": im["read_resize_ms_per_image"], "visual encoder": im["visual_encoder_ms_per_image"]},
        )
    )
    colors = {}
    palette = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(10, 1.8 + 0.8 * len(bars)))
    for y, (_label, parts) in enumerate(bars):
        left = 0.0
        for part, ms in parts.items():
            c = colors.setdefault(part, palette(len(colors)))
            ax.barh(y, ms, left=left, color=c, label=part if part not in ax.get_legend_handles_labels()[1] else None)
            left += ms
        ax.text(left, y, f" {left:.1f} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.set_xlabel("ms (median per stage, stacked)")
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    fig.suptitle("latency breakdown per stage")
    return _save(fig, report, out, "stages")


def _serving(report: dict, out: Path) -> Path | None:
    """p50 and p99 against concurrency, per server: the embedded engine, Triton, Ray Serve."""
    rows = {**(report.get("end_to_end") or {}).get("rows", {}), **(report.get("cluster") or {}).get("rows", {})}
    if not rows:
        return None
    import matplotlib.pyplot as plt

    servers = sorted({k.rsplit("_c", 1)[0] for k in rows}, key=lambda s: (not s.startswith("embedded"), s))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for server in servers:
        cs = sorted(int(k.rsplit("_c", 1)[1]) for k in rows if k.rsplit("_c", 1)[0] == server)
        for ax, key in zip(axes, ("p50_ms", "p99_ms"), strict=True):
            ax.plot(cs, [rows[f"{server}_c{c}"][key] for c in cs], marker="o", label=server)
    for ax, key in zip(axes, ("p50", "p99"), strict=True):
        ax.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel=f"{key} latency (ms)")
        ax.set_xticks([1, 4, 16], labels=["1", "4", "16"])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Query latency by server and concurrency (text in, ranked hits out)")
    return _save(fig, report, out, "serving")


def _under_load(report: dict, out: Path) -> Path | None:
    """Queries/s against clients (closed loop), and p99 against offered rate (open loop), per path."""
    sv = report.get("serving")
    if not sv:
        return None
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, p in sv["paths"].items():
        cs = sorted(p["closed"], key=int)
        line = axes[0].plot([int(c) for c in cs], [p["closed"][c]["qps"] for c in cs], marker="o", label=name)[0]
        pts = [(r["offered_qps"], r["p99_ms"]) for r in p.get("open", []) if r["p99_ms"] is not None]
        if pts:
            axes[1].plot(*zip(*pts, strict=True), marker="o", label=name, color=line.get_color())
        if p.get("knee_qps"):
            axes[1].axvline(p["knee_qps"], ls=":", alpha=0.5, color=line.get_color())
    axes[0].set(xscale="log", xlabel="concurrent clients (closed loop)", ylabel="answered queries/s")
    axes[0].set_xticks([1, 4, 16, 64], labels=["1", "4", "16", "64"])
    axes[1].set(yscale="log", xlabel="offered queries/s (open loop)", ylabel="p99 from scheduled send (ms)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Serving under load (dotted: each path's knee)")
    return _save(fig, report, out, "under-load")
