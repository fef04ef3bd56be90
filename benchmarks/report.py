"""The results as a printed table, Markdown, a plot and JSON. Part of the harness (benchmarks/harness.py)."""

from __future__ import annotations

import json
from pathlib import Path

from .spec import MODES, WARM_WARMUP, Benchmark, format_shape

# ------------------------------------------------------------------------------------------- reports


def _fmt_load(x: float | None) -> str:
    return "?" if x is None else f"{x:.2f}"


def format_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def _fmt_tflops(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}" if x < 1 else f"{x:.1f}"


def table_rows(bench: Benchmark, results: list[dict], gpu: bool) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per measurement, skipped methods left out) shared by terminal and markdown."""
    has_bytes, has_flops = bench.bytes_moved is not None, bench.flops is not None
    warm = any(r.get("warm_median_ms") is not None for r in results)
    mm_pct = has_flops and (gpu or any(r.get("matmul_rate_tflops") for r in results))
    headers = ["shape", "mode", "method", *(h for h, _ in bench.extra_columns), "median ms (p20–p80)"]
    headers += ["warm ms"] if warm else []
    headers += (["GB/s"] + (["% copy BW"] if gpu else [])) if has_bytes else []
    headers += (["TFLOP/s"] + ((["% bf16 mm"] if gpu else ["% mm"]) if mm_pct else [])) if has_flops else []
    headers += ["peak extra MiB", f"time ÷ {bench.baseline}"] + ([f"warm ÷ {bench.baseline}"] if warm else [])
    headers += [f"mem ÷ {bench.baseline}", "note"]
    rows = []
    for r in results:
        if "mode" not in r:  # a method skipped as a whole
            continue
        method = bench.method(r["method"])
        notes = [method.note] if method.note else []
        extra = [cell(r) for _, cell in bench.extra_columns]
        if r["status"] == "ok":
            if method.first_call_note and r.get("first_call_s") is not None:
                notes.append(f"1st call {r['first_call_s']:.1f} s ({method.first_call_note})")
            cells = [f"{r['median_ms']:.2f} ({r['p20_ms']:.2f}–{r['p80_ms']:.2f})"]
            if warm:
                cells += [f"{r['warm_median_ms']:.2f}" if r.get("warm_median_ms") is not None else "—"]
            if has_bytes:
                cells += [f"{r['gbps']:.1f}" if r.get("gbps") is not None else "—"]
                cells += [f"{100 * r['copy_bw_fraction']:.0f}%" if r.get("copy_bw_fraction") else "—"] if gpu else []
            if has_flops:
                cells += [_fmt_tflops(r.get("tflops"))]
                cells += [f"{100 * r['matmul_fraction']:.0f}%" if r.get("matmul_fraction") else "—"] if mm_pct else []
            cells += [f"{r['peak_extra_mib']:.1f}", format_ratio(r.get("time_vs_baseline"))]
            cells += [format_ratio(r.get("warm_time_vs_baseline"))] if warm else []
            cells += [format_ratio(r.get("mem_vs_baseline"))]
        else:
            notes.append(f"{r['status']}: {r.get('reason', '')}")
            cells = ["—"] * (len(headers) - 4 - len(extra))
        rows.append([format_shape(r["shape"]), r["mode"], r["method"], *extra, *cells, "; ".join(notes)])
    return headers, rows


def versus(results: list[dict], peers: tuple[str, ...], method: str = "rlhf_fast", mode: str | None = None):
    """For a benchmark's summary: ``(r, peer, p)``, each successful measurement ``r`` of ``method`` with the successful
    measurement ``p`` of each of ``peers`` at its shape and mode (``mode``: that mode only), in the results' order."""
    ok = {(tuple(r["shape"]), r["mode"], r["method"]): r for r in results
          if r.get("mode") and r["status"] == "ok" and mode in (None, r["mode"])}  # fmt: skip
    for (shape, m, name), r in ok.items():
        if name != method:
            continue
        for peer in peers:
            p = ok.get((shape, m, peer))
            if p is not None:
                yield r, peer, p


def verdict(met: bool, bar: str) -> str:
    """A summary's verdict on an acceptance bar: ``"meets <bar>"`` or ``"does NOT meet <bar>"``."""
    return f"{'meets' if met else 'does NOT meet'} {bar}"


def ranges_overlap(r: dict, p: dict) -> bool:
    """Whether two measurements' p20–p80 ranges overlap: a difference of medians within the run-to-run spread."""
    return r["p20_ms"] <= p["p80_ms"] and p["p20_ms"] <= r["p80_ms"]


def versus_baseline(results: list[dict], method: str, mode: str = "full"):
    """For a benchmark's summary: ``(r, time ratio, memory ratio)`` of each successful measurement ``r`` of ``method``
    in ``mode`` that has a time ratio to the baseline (the memory ratio may be None), in the results' order."""
    for r in results:
        if r.get("method") == method and r.get("mode") == mode and r["status"] == "ok":
            if r.get("time_vs_baseline") is not None:
                yield r, r["time_vs_baseline"], r.get("mem_vs_baseline")


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain aligned text table for the terminal."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: c.replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def skipped_lines(results: list[dict]) -> list[str]:
    return [f"{r['method']}: {r['reason']}" for r in results if "mode" not in r]


def ceiling_text(c: dict) -> str:
    """The measured ceilings in one line: GPU (copy, bf16 matmul) or CPU (copy, the op's matmul passes)."""
    if "bf16_matmul_tflops" in c:
        return (f"copy {c['copy_gbps']:.0f} GB/s ({c['copy_bytes'] >> 20} MiB copy, read + write), "
                f"bf16 matmul {c['bf16_matmul_tflops']:.0f} TFLOP/s ({c['matmul_size']}³)")  # fmt: skip
    text = f"copy {c['copy_gbps']:.1f} GB/s ({c['copy_bytes'] >> 20} MiB copy, read + write)"
    for shape, rates in c.get("cpu_matmul_gflops", {}).items():
        passes = ", ".join(f"{name} {g:.0f}" for name, g in rates.items())
        text += f"; fp32 matmul at {shape}, GFLOP/s: {passes}"
    return text + f" ({c.get('torch_threads', '?')} torch threads)"


def print_report(bench: Benchmark, results: list[dict], meta: dict) -> None:
    gpu = meta["device"] == "cuda"
    headers, rows = table_rows(bench, results, gpu)
    print()
    print(f"{bench.name} on {meta['device_name']}, {meta['dtype']}  ({meta['memory_note']})")
    if meta.get("ceilings"):
        print("ceilings (measured): " + ceiling_text(meta["ceilings"]))
    print(format_table(headers, rows))
    for line in skipped_lines(results):
        print(f"not run: {line}")
    for line in bench.summarize(results) if bench.summarize else []:
        print(line)


def write_markdown(bench: Benchmark, results: list[dict], meta: dict, path: Path, png_name: str) -> None:
    gpu = meta["device"] == "cuda"
    headers, rows = table_rows(bench, results, gpu)
    commit = (meta["git_commit"] or "unknown")[:12]
    if meta["git_dirty_paths"]:
        commit += " + uncommitted changes to " + ", ".join(meta["git_dirty_paths"])
    lines = [
        f"# {bench.name}: {meta['device_name']}",
        "",
        bench.title,
        "",
        f"- Device: {meta['device_name']} ({meta['device']}), {meta['dtype']}; "
        f"{meta['cpu_count']} CPU cores, {meta['torch_threads']} torch threads",
        f"- Software: python {meta['python']}, torch {meta['torch']}, triton {meta['triton']}; "
        + ", ".join(f"{k} {v}" for k, v in meta["peers"].items() if v),
        f"- Commit: {commit}; date {meta['date']}",
        f"- Load average (1 min) before / after the run: {_fmt_load(meta.get('load_average_start'))} / "
        f"{_fmt_load(meta.get('load_average_end'))} (other work on the machine skews CPU timings)",
        f"- Command: `{meta['command']}`",
        f"- Timing: {'; '.join(sorted({r['timing_method'] for r in results if r.get('timing_method')}))}. "
        "Median of the repeats, (20th–80th percentile).",
        f"- Memory: {meta['memory_note']}.",
    ]
    if bench.bytes_moved is not None:
        lines.append(
            f"- GB/s: bytes the op must move / median time, {bench.bytes_formula}."
            + (" % copy BW: that over the measured device-to-device copy bandwidth." if gpu else "")
        )
    if bench.flops is not None:
        lines.append(
            f"- TFLOP/s: floating-point operations the method performs / median time, {bench.flops_formula}."
            + (" % bf16 mm: that over the measured bf16 matmul rate." if gpu else "")
        )
    lines.append(
        f"- Ratios: this method's time (memory) over {bench.baseline}'s, same shape and mode; below 1 is better."
    )
    if bench.grad_inputs:
        lines.append(
            "- Modes: forward (inputs require grad), backward alone (fresh untimed forward before each repeat), "
            "full = forward + backward; gradients via torch.autograd.grad."
        )
    else:
        lines.append("- Mode: forward only (the op has no gradient; inputs do not require grad).")
    if meta.get("ceilings"):
        lines.append("- Ceilings (measured): " + ceiling_text(meta["ceilings"]))
    if any(r.get("warm_median_ms") is not None for r in results):
        lines.append(
            "- Cold: each (method, shape, mode) in a fresh subprocess after one untimed call; warm: all of them "
            f"again in one process after {WARM_WARMUP} untimed calls each (a training loop's steady state)."
        )
    lines += ["", markdown_table(headers, rows), "", f"![{bench.name}]({png_name})", "", "## Methods", ""]
    lines += [f"- `{m.name}`: {m.description}" for m in bench.methods if m.name in meta["methods"]]
    if skipped_lines(results):
        lines += ["", "## Not run", ""] + [f"- {line}" for line in skipped_lines(results)]
    if bench.summarize:
        lines += ["", "## Summary", ""] + [f"- {line}" for line in bench.summarize(results)]
    path.write_text("\n".join(lines) + "\n")


def plot_results(bench: Benchmark, results: list[dict], meta: dict, path: Path) -> None:
    """One row per shape: time per mode and method (bars p20–p80) on the left, peak extra memory right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["status"] == "ok"]
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in ok)) or [()]
    methods = [m.name for m in bench.methods if any(r["method"] == m.name for r in ok)]
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    by_key = {(tuple(r["shape"]), r["mode"], r["method"]): r for r in ok}
    colors = plt.get_cmap("tab10")
    color_of = {m.name: i for i, m in enumerate(bench.methods)}  # the same color for a method in every plot
    mem_label = "peak extra RSS (MiB)" if meta["device"] != "cuda" else "peak extra allocated (MiB)"
    fig, axes = plt.subplots(len(shapes), 2, figsize=(14, 4.6 * len(shapes)), squeeze=False)
    width = 0.8 / max(1, len(methods))
    for row, shape in enumerate(shapes):
        for col, (key, ylabel) in enumerate((("median_ms", "time per call (ms)"), ("peak_extra_mib", mem_label))):
            ax = axes[row][col]
            for j, name in enumerate(methods):
                xs, ys, lo, hi = [], [], [], []
                for i, mode in enumerate(modes):
                    r = by_key.get((shape, mode, name))
                    if r is None:
                        continue
                    xs.append(i + (j - (len(methods) - 1) / 2) * width)
                    ys.append(r[key])
                    lo.append(r[key] - r["p20_ms"] if key == "median_ms" else 0)
                    hi.append(r["p80_ms"] - r[key] if key == "median_ms" else 0)
                if not xs:
                    continue
                bars = ax.bar(xs, ys, width, color=colors(color_of[name] % 10), label=name,
                              yerr=[lo, hi] if key == "median_ms" else None, capsize=2)  # fmt: skip
                ax.bar_label(bars, fmt="%.0f" if max(ys) >= 100 else "%.2g", fontsize=7, rotation=90, padding=3)
            ax.set_xticks(range(len(modes)), modes)
            ax.set_ylabel(ylabel)
            ax.margins(y=0.2)
            ax.set_title(f"{format_shape(shape)} {meta['dtype']}: {ylabel}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=9)
    fig.suptitle(f"{bench.name} on {meta['device_name']} (lower is better)", fontsize=12)
    fig.tight_layout(rect=(0, 0.06 if len(shapes) == 1 else 0.03, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_results(bench: Benchmark, results: list[dict], meta: dict, out_dir: Path) -> list[Path]:
    """``<out_dir>/<name>.json`` (everything), ``.md`` (table and notes) and ``.png`` (plot)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (out_dir / f"{bench.name}.{ext}" for ext in ("json", "md", "png"))
    payload = {"benchmark": bench.name, "title": bench.title, "metadata": meta, "results": results}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    write_markdown(bench, results, meta, md_path, png_path.name)
    plot_results(bench, results, meta, png_path)
    return [json_path, md_path, png_path]


