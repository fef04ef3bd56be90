"""The GPU suite's files: atomic JSON writes, the header every file carries, the correctness table and
``summary.md`` (one table a reader compares with the peers' published numbers) with its plot. Split from
``gpu_suite.py`` (the sections and the driver) to keep each file one story.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from . import harness


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)  # a kill never leaves half a file


def _header(meta: dict) -> list[str]:
    v = meta["versions"]
    c = meta.get("ceilings")
    lines = [f"- Command: `{meta['command']}`", f"- Commit: {meta['git_commit'] or 'unknown'}; date {meta['date']}",
             f"- Device: {meta.get('device_name') or '?'}" + ("  (DRY RUN on CPU: tiny shapes, no GPU figure)"
                                                            if meta["dry_run"] else ""),
             "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val)]  # fmt: skip
    if c:
        lines.append(f"- Ceilings (measured): copy {c['copy_gbps']:.1f} GB/s (read + write of "
                     f"{c['copy_bytes'] / 2**20:.0f} MiB), bf16 matmul {c['bf16_matmul_tflops']:.2f} TFLOP/s "
                     f"({c['matmul_size']}^3)")  # fmt: skip
    return lines


def correctness_table(rows: list[dict]) -> list[str]:
    from .gpu_correctness import INJECT_ENV

    counts = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAIL", "ERROR", "NOT RUN")}
    out = [", ".join(f"{n} {s}" for s, n in counts.items()) + ". Bar: error against float64 at most 1.25x plain "
           "PyTorch's in the same dtype plus a margin (tests/reference.py assert_no_worse); float32 also within "
           "the tests' absolute bar.", ""]  # fmt: skip
    if any(r.get("injected_error") for r in rows):
        out += [f"**{INJECT_ENV} was set: a deliberately wrong reference (test hook), not a real result.**", ""]
    out += ["| status | case | shape | dtype | worst quantity | error | bar | kernels |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = r["shape_label"] + " " + harness.format_shape(r["shape"])
        if r.get("rows_checked"):
            shape += f" ({r['rows_checked']} rows)"
        if r["status"] in ("PASS", "FAIL"):
            cells = [r["worst"], f"{r['worst_err']:.3g}", f"{r['worst_bar']:.3g}"]
        else:
            cells = [r.get("reason", ""), "", ""]
        out.append(f"| {r['status']} | {r['case']} | {shape} | {r['dtype']} | " + " | ".join(cells)
                   + f" | {', '.join(r.get('kernels', []))} |")  # fmt: skip
    return out


# -------------------------------------------------------------------------------------------- 5. summary


def write_summary(out: Path, suite: dict) -> None:
    """``summary.md``, ``summary.json`` (every section's raw figures) and ``summary.png`` from the files."""
    env = _read(out / "environment.json")
    corr = _read(out / "correctness.json")
    ops_index = _read(out / "ops.json")
    trainer = _read(out / "trainer.json")
    if not trainer.get("results"):  # killed mid-way: the runs that finished were saved by the benchmark itself
        partial = _read(out / "trainer" / "ppo_trainer.json")
        if partial.get("results"):
            trainer.update(results=partial["results"], preset=partial["meta"]["preset"], shape=partial["meta"]["shape"])
    if not trainer.get("trl_grpo", {}).get("results"):  # the same for the TRL GRPO item
        partial = _read(out / "trainer" / "trl_grpo.json")
        if partial.get("results"):
            trainer.setdefault("trl_grpo", {"status": "killed or unfinished"}).update(
                results=partial["results"], preset=partial["meta"]["preset"], shape=partial["meta"]["shape"],
                same_start=partial["meta"].get("same_start"))  # fmt: skip
    ops = {name: _read(out / "ops" / f"{name}.json") for name in ops_index.get("ops", {})}
    meta = suite["meta"]
    lines = ["# rlhf_fast GPU suite", "", *_header(meta), "", "## Sections", "",
             "| section | planned s | time box s | took s | status |", "|---|---|---|---|---|"]  # fmt: skip
    for s in suite["sections"]:
        lines.append(f"| {s['name']} | {s['planned_s']:.0f} | {s['box_s']:.0f} | {s.get('seconds', 0):.1f} | "
                     f"{s['status']} |")
    lines += ["", "## Correctness", ""]
    lines += correctness_table(corr.get("rows", [])) if corr else ["not run"]
    lines += ["", "## Ops (median ms; forward = one call, full = forward + backward)", ""]
    rows = []
    for name, payload in ops.items():
        note = ops_index["ops"][name].get("note", "")
        for r in payload.get("results", []):
            if "mode" not in r:
                rows.append(f"| {name} | | | {r['method']} | not run: {r.get('reason', '')} | | | | |")
                continue
            if r["status"] != "ok":
                rows.append(f"| {name} | {harness.format_shape(r['shape'])} | {r['mode']} | {r['method']} | "
                            f"{r['status']}: {r.get('reason', '')} | | | | |")
                continue
            rate = (f"{r['gbps']:.0f} GB/s" if r.get("gbps") else "") + (f" {r['tflops']:.1f} TFLOP/s"
                                                                      if r.get("tflops") else "")
            frac = r.get("copy_bw_fraction") or r.get("matmul_fraction")
            rows.append(f"| {name} | {harness.format_shape(r['shape'])} | {r['mode']} | {r['method']} | "
                        f"{r['median_ms']:.3f} | {rate.strip()} | {f'{100 * frac:.0f}%' if frac else '-'} | "
                        f"{r['peak_extra_mib']:.0f} | {harness.format_ratio(r.get('time_vs_baseline'))} |")
        baseline = importlib.import_module(f"{harness.PACKAGE}.bench_{name}").BENCHMARK.baseline
        rows.append(f"| {name} | | | | (baseline: {baseline}{'; ' + note if note else ''}) | | | | |")
    for name, o in ops_index.get("ops", {}).items():
        if o.get("status") != "done":
            rows.append(f"| {name} | | | | not run: {o.get('reason', '')} | | | | |")
    lines += ["| op | shape | mode | method | median ms | rate | % ceiling | peak extra MiB | time ÷ baseline |",
              "|---|---|---|---|---|---|---|---|---|", *rows] if rows else ["not run"]
    lines += ["", "Per-op tables, formulas and plots: `ops/<op>.md`.", "", "## Trainer", ""]
    if trainer.get("results"):
        p = trainer["shape"]
        lines += [f"preset {trainer['preset']}: V={p['vocab']}, H={p['hidden']}, {p['layers']} layers, "
                  f"{p['prompts_per_step']} prompts x {p['new_tokens']} new tokens, {p['steps']} step(s)", "",
                  "| ops | tokens/s (whole steps) | tokens/s (update) | peak extra MiB |", "|---|---|---|---|"]
        for r in trainer["results"]:
            if r.get("status") == "ok":
                lines.append(f"| {r['ops']} | {r['tokens_per_s']:.1f} | {r['update_tokens_per_s']:.1f} | "
                             f"{r['peak_memory']['peak_extra_mib']:.0f} |")
            else:
                lines.append(f"| {r['ops']} | {r.get('status')}: {r.get('reason', '')} | | |")
    else:
        lines.append(f"not run ({trainer.get('status', 'no result')})")
    lines += ["", "### TRL GRPO step, stock trl.GRPOTrainer vs rlhf_fast.integrations.trl.GRPOTrainer", ""]
    grpo = trainer.get("trl_grpo", {})
    if grpo.get("results"):
        p = grpo["shape"]
        check = grpo.get("same_start")
        lines += [f"preset {grpo['preset']}: V={p['vocab']}, H={p['hidden']}, {p['layers']} layers, "
                  f"{p['prompts_per_step']} prompts x {p['num_generations']} generations x {p['new_tokens']} tokens, "
                  f"{'bf16' if p['bf16'] else 'float32'}; status {grpo.get('status')}; same start "
                  + (f"checked (first-step loss / grad norm differ by {check['abs_diff']['first_loss']:.2g} / "
                     f"{check['abs_diff']['first_grad_norm']:.2g})" if check else "NOT checked"), "",
                  "| trainer | step s (after the first) | compute_loss s | backward s | peak extra MiB |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in grpo["results"]:
            if r.get("status") == "ok":
                lines.append(f"| {r['trainer']} | {r['step_s']:.3f} | {r['compute_loss_s']:.3f} | {r['backward_s']:.3f} "
                             f"| {r['peak_memory']['peak_extra_mib']:.0f} |")  # fmt: skip
            else:
                lines.append(f"| {r['trainer']} | {r.get('status')}: {r.get('reason', '')} | | | |")
    else:
        lines.append(f"not run ({grpo.get('status', 'no result')})")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    _write(out / "summary.json", {"meta": meta, "suite": suite, "environment": env, "correctness": corr,
                                  "ops": ops, "trainer": trainer})  # fmt: skip
    _plot_summary(out / "summary.png", ops, meta)


def _plot_summary(path: Path, ops: dict, meta: dict) -> None:
    """Each op's forward+backward (or forward) time per method, relative to eager: below 1 is faster."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []
    for name, payload in ops.items():
        for r in payload.get("results", []):
            if r.get("status") == "ok" and r.get("time_vs_baseline") and r["mode"] in ("full", "forward"):
                bars.append((f"{name} {r['mode']}\n{r['method']}", r["time_vs_baseline"]))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(bars)), 5))
    if bars:
        ax.bar(range(len(bars)), [b[1] for b in bars], color="tab:blue")
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=90, fontsize=6)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("time / the op's baseline (eager PyTorch or its loop; lower is better)")
    ax.set_title(f"{meta.get('device_name') or ''} {meta['git_commit'] or ''}"[:80], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


