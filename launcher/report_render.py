"""The report's outputs from its rows (``launcher.report`` builds them): Table 1 as markdown, the CSV, the bar chart
and the cost-versus-score chart.

The markdown table keeps the paper's columns (Methods, Accuracy, No. of Parameters, Times Smaller) and adds, where
the sweep has what they need: Seeds and the 95 % interval (several seeds), the paired comparisons (Δ vs KD, Δ vs one
teacher; ``launcher.significance``) and the cost columns (train time, step time, peak memory). The score column is
named after the task's main metric (Accuracy, MCC, F1, Pearson); a sweep over several tasks gets a table per task.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from launcher.identity import CONFIG_HASH
from launcher.significance import LEVEL, SIGNIFICANT, Comparison, comparison_text
from trainer.tasks import METRIC_NAMES, TITLES

COMPARISONS = ("vs_kd", "vs_one_teacher")  # the rows' Comparison entries, in the table's order
COMPARISON_FIELDS = ("baseline", "diff", "ci_low", "ci_high", "p", "seeds")
CSV_COLUMNS = ("block", "method", "algorithm", "teachers", "student", "warmup", "noise", "task", "metric", "n_seeds",
               "score_mean", "score_std", "score_ci_low", "score_ci_high",
               *(f"{c}_{f}" for c in COMPARISONS for f in COMPARISON_FIELDS),
               "params", "times_smaller", "train_wall_time_s", "step_time_s", "peak_memory_mb", "failed_seeds")
TEST = "test"  # the data the rows are scored on unless the report is rebuilt on other data (launcher.rescore)
HEADERS = {"accuracy": "Accuracy", "mcc": "MCC", "f1": "F1", "pearson": "Pearson", "spearman": "Spearman"}
COST = {"train_wall_time_s": ("Train time (s)", "{:.0f}"), "step_time_s": ("Step (ms)", "{:.0f}"),
        "peak_memory_mb": ("Peak memory (MB)", "{:.0f}")}


def scored_as(metrics: list[str], scored: str = TEST) -> str:
    """What the scores are, in words: "test accuracy", "test Matthews correlation", "F1 on dev.tsv (408 examples)"."""
    names = " / ".join(METRIC_NAMES[m] for m in dict.fromkeys(metrics)) or METRIC_NAMES["accuracy"]
    return f"test {names}" if scored == TEST else f"{names} {scored}"


def score_text(row: dict[str, Any]) -> str:
    if row["score_mean"] is None:
        return "failed" if row["failed_seeds"] else ""
    if row["score_std"] is None:
        return f"{row['score_mean']:.2f}"
    return f"{row['score_mean']:.2f} ± {row['score_std']:.2f}"


def _interval_text(row: dict[str, Any]) -> str:
    if row["score_ci_low"] is None:
        return ""
    return f"[{row['score_ci_low']:.2f}, {row['score_ci_high']:.2f}]"


def _comparison_cell(row: dict[str, Any], name: str) -> str:
    if name not in row["baselines"]:
        return ""  # no baseline cell in the sweep (or the row is the baseline)
    return comparison_text(row[name])


def _cost_cell(row: dict[str, Any], key: str) -> str:
    value = row[key]
    if value is None:
        return ""
    return COST[key][1].format(1000 * value if key == "step_time_s" else value)


def _seeds_text(row: dict[str, Any]) -> str:
    return str(row["n_seeds"]) + (f" (+{row['failed_seeds']} failed)" if row["failed_seeds"] else "")


def _cell_text(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown(sweep: str, parent, rows: list[dict[str, Any]], failed: list[dict[str, str]],
             reference: float | None, n_trials: int, scored: str = TEST) -> str:
    tags = parent.data.tags
    lines = [f"# Sweep {sweep}: experimental results"
             + ("" if scored == TEST else f", {scored_as([r['metric'] for r in rows], scored)}"), ""]
    meta = [f"parent run `{parent.info.run_id}`"]
    if tags.get(CONFIG_HASH):
        meta.append(f"config hash `{tags[CONFIG_HASH]}`")
    meta.append(f"{n_trials} teacher and trial runs, {len(failed)} failed")
    lines += ["; ".join(meta) + ".", ""]
    if not rows:
        return "\n".join([*lines, "No teacher or trial runs found under this sweep.", ""])
    seeds = any(r["n_seeds"] > 1 or r["failed_seeds"] for r in rows)
    compared = [c for c in COMPARISONS if any(c in r["baselines"] for r in rows)]
    costs = [k for k in COST if any(r[k] is not None for r in rows)]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for task in tasks:
        shown = [r for r in rows if r["task"] == task]
        if len(tasks) > 1:
            lines += [f"## {TITLES.get(task or '', 'Without a task')}: {scored_as([shown[0]['metric']], scored)}", ""]
        lines += [*_table(shown, seeds, compared, costs), ""]
    metrics = [r["metric"] for r in rows]
    correlations = " (correlations × 100)" if {"mcc", "pearson", "spearman"} & set(metrics) else ""
    lines += [f"{' / '.join(HEADERS[m] for m in dict.fromkeys(metrics))}: {scored_as(metrics, scored)} in "
              f"percent{correlations}" + (", mean ± sample standard deviation over seeds; "
                                          f"{LEVEL:.0%} CI: Student's t interval of the mean" if seeds else "") + "."]
    if compared:
        lines.append(_comparisons_note(compared))
    times = "Times Smaller: mean teacher parameter count over the student's (a distillation row: its own teachers"
    lines.append(times + ("; a fine-tuned row: the teachers used alone, "
                          f"{reference:,.0f} parameters on average)." if reference else ")."))
    if costs:
        lines.append("Cost, mean over seeds: train time is a trial's warm-up and training wall time (evaluations "
                     "included), step the mean training step, peak memory the most any seed used (GPU memory on "
                     "CUDA, else the process's resident memory).")
    if failed:
        lines += ["", "## Failed trials", "", "| Trial | Method | Status | Error |", "|---|---|---|---|"]
        for f in failed:
            error = _cell_text(f["error"])
            error = error if len(error) <= 300 else error[:297] + "..."
            lines.append(f"| `{f['trial_id']}` | {_cell_text(f['method'])} | {f['status']} | {error} |")
    return "\n".join(lines) + "\n"


def _table(rows: list[dict[str, Any]], seeds: bool, compared: list[str], costs: list[str]) -> list[str]:
    """One task's Table 1: its rows under block headers, the score column named after the task's main metric."""
    header = (["Methods", HEADERS[rows[0]["metric"]]] + ([f"{LEVEL:.0%} CI"] if seeds else [])
              + [{"vs_kd": "Δ vs KD", "vs_one_teacher": "Δ vs one teacher"}[c] for c in compared]
              + ["No. of Parameters", "Times Smaller"] + (["Seeds"] if seeds else []) + [COST[k][0] for k in costs])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    block = None
    for r in rows:
        if r["block"] != block:
            block = r["block"]
            lines.append("| " + " | ".join([f"*{block}*"] + [""] * (len(header) - 1)) + " |")
        cells = ([_cell_text(r["method"]), score_text(r)] + ([_interval_text(r)] if seeds else [])
                 + [_comparison_cell(r, c) for c in compared]
                 + ["" if r["params"] is None else str(r["params"]),
                    "" if r["times_smaller"] is None else f"{r['times_smaller']:.1f}"]
                 + ([_seeds_text(r)] if seeds else []) + [_cost_cell(r, k) for k in costs])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _comparisons_note(compared: list[str]) -> str:
    parts = []
    if "vs_kd" in compared:
        parts.append("Δ vs KD: against KD with the same teachers, student, warm-up and noise (clean KD without "
                     "warm-up where the sweep has no such cell)")
    if "vs_one_teacher" in compared:
        parts.append("Δ vs one teacher: a several-teacher row against the best single-teacher row of its teachers "
                     "(same algorithm, student, warm-up and noise)")
    return ("; ".join(parts) + f". Points of the score, mean difference over the seeds both rows have, with the paired "
            f"t-test's two-sided p; * marks p < {SIGNIFICANT:g}; n/a: fewer than two paired seeds. report.csv names "
            "each baseline and gives the interval of the difference.")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            flat = {k: r[k] for k in CSV_COLUMNS if k in r}
            for name in COMPARISONS:
                flat.update(_comparison_fields(name, r["baselines"].get(name), r[name]))
            writer.writerow({k: "" if flat.get(k) is None else flat[k] for k in CSV_COLUMNS})


def _comparison_fields(name: str, baseline: str | None, c: Comparison | None) -> dict[str, Any]:
    values = dict.fromkeys(COMPARISON_FIELDS)
    values["baseline"] = baseline
    if c is not None:
        values.update(diff=c.diff_mean, ci_low=c.ci_low, ci_high=c.ci_high, p=c.p_value,
                      seeds=" ".join(map(str, c.seeds)))
    return {f"{name}_{field}": value for field, value in values.items()}


def _figure(height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _empty(fig, ax, text: str):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    return fig


def _block_legend(fig, blocks: list[str], colours: dict[str, str]) -> None:
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=colours[b], label=b) for b in blocks], fontsize=7, loc="outside lower center",
               ncols=min(len(blocks), 3))


def chart(sweep: str, rows: list[dict[str, Any]], scored: str = TEST):
    """The report's bar chart (a matplotlib Figure): one bar per finished cell, labelled with its algorithm, coloured
    by block; error bars (std over seeds) only where a cell has several seeds."""
    shown = [r for r in rows if r["score_mean"] is not None]
    what = scored_as([r["metric"] for r in rows], scored)
    fig, ax = _figure(1.5 + 0.38 * max(len(shown), 1))
    ax.set_title(f"Sweep {sweep}: {what}")
    if not shown:
        return _empty(fig, ax, "no finished runs")
    means = np.array([r["score_mean"] for r in shown])
    stds = np.array([r["score_std"] or 0.0 for r in shown])
    spread = any(r["score_std"] is not None for r in shown)
    blocks = list(dict.fromkeys(r["block"] for r in shown))
    colours = {b: f"C{i}" for i, b in enumerate(blocks)}
    y = np.arange(len(shown))
    # a cell of one seed gets no error bar (NaN draws none), not a bar of zero width
    errors = [np.nan if r["score_std"] is None else r["score_std"] for r in shown]
    ax.barh(y, means, xerr=errors if spread else None, color=[colours[r["block"]] for r in shown], capsize=3,
            height=0.7)
    ax.set_yticks(y, [r["label"] for r in shown], fontsize=8)
    ax.invert_yaxis()
    # correlations can be negative (an MCC below chance)
    low = max(min(0.0, float(np.min(means - stds)) - 5), math.floor(float(np.min(means - stds)) / 5) * 5 - 5)
    high = min(100.0, float(np.max(means + stds)) + 3)
    ax.set_xlim(low, max(high, low + 1))
    for yi, (m, s) in enumerate(zip(means, stds)):
        ax.text(m + s + 0.1, yi, f"{m:.2f}", va="center", fontsize=7)
    ax.set_xlabel(f"{what} (%)" + (f", axis from {low:g}" if low > 0 else "")
                  + ("; error bars: std over seeds" if spread else ""))
    _block_legend(fig, blocks, colours)
    return fig


def cost_chart(sweep: str, rows: list[dict[str, Any]], scored: str = TEST):
    """Cost against score: one point per finished cell that logged its train time (x, log scale: teachers and
    students differ by orders of magnitude) and its score (y), coloured by block and labelled."""
    shown = [r for r in rows if r["score_mean"] is not None and r["train_wall_time_s"]]
    what = scored_as([r["metric"] for r in rows], scored)
    fig, ax = _figure(6.5)
    ax.set_title(f"Sweep {sweep}: cost against {what}")
    if not shown:
        return _empty(fig, ax, "no finished runs logged a train time")
    blocks = list(dict.fromkeys(r["block"] for r in shown))
    colours = {b: f"C{i}" for i, b in enumerate(blocks)}
    for r in shown:
        ax.scatter(r["train_wall_time_s"], r["score_mean"], color=colours[r["block"]], s=30, zorder=2)
        ax.annotate(r["label"], (r["train_wall_time_s"], r["score_mean"]), fontsize=6, xytext=(4, 2),
                    textcoords="offset points")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    # seconds as plain numbers (10, 20, 30), not matplotlib's 2×10^1 between powers of ten
    seconds = FuncFormatter(lambda x, _: f"{x:g}")
    ax.xaxis.set_major_formatter(seconds)
    ax.xaxis.set_minor_formatter(seconds)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.grid(alpha=0.3, zorder=0)
    ax.set_xlabel("train wall time per trial (s, mean over seeds, log scale)")
    ax.set_ylabel(f"{what} (%)")
    _block_legend(fig, blocks, colours)
    return fig
