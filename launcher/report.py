"""Rebuild the report's Table 1 ("Experimental Results") from a sweep's MLflow runs.

``build_report`` finds the sweep's parent run (the most recent run tagged ``metadistil.sweep`` = NAME and
``metadistil.role`` = ``sweep``), reads its child runs (``metadistil.role`` = ``teacher`` or ``trial``), groups them
into cells (block, algorithm, teacher set, student, warm-up, noise, plus any grid.extra keys: the identity that
``launcher.identity`` reads from the runs' tags) and averages the cells over seeds. It writes ``report.md``,
``report.csv`` and ``report.png`` to ``out_dir`` and, with ``attach``, logs them to the parent run under ``report/``.

Blocks, in the report's order (empty ones are skipped):

1. Teachers (the teacher fine-tuning runs);
2. Fine-Tuned Models (algorithm finetune);
3. Student Model with KD (kd, warm-up 0, no noise; several teachers too, named "A + B Student");
4. Student Model with MetaDistil (metadistil, one teacher, warm-up 0, no noise);
5. Student Model with MetaDistil + Additional Teacher (metadistil, several teachers, warm-up 0, no noise);
6. With Noise (kd or metadistil, warm-up 0, a noise setting other than ``off``);
7. With Warm-up (kd or metadistil, warm-up > 0).

Accuracy is the test accuracy in percent (mean ± sample std over seeds when a cell has several). A run that did not
finish (or finished without ``test_accuracy``) is left out of the means and listed under "Failed trials"; a cell whose
seeds all failed reads ``failed``. When a trial was retried, its latest finished attempt counts and earlier failed
attempts are not listed.

Times Smaller: a distillation row shows the ``times_smaller`` its trials logged (the mean teacher parameter count of
its own teacher set over the student's). Fine-tuned rows have no teachers, so, as in the report (DistilBERT 1.7,
TinyBERT 8.2), they are measured against the mean parameter count of the reference teachers: those used as single
teachers in the sweep (all known teachers when none is). Teachers' rows leave it blank.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from launcher.identity import CONFIG_HASH, OFF, ROLE, SWEEP, TrialIdentity
from launcher.tracking import client as mlflow_client
from trainer.logging import redact_uri

PARENT_TAG = "mlflow.parentRunId"
DISTILL = ("kd", "metadistil")

BLOCKS = ("Teachers", "Fine-Tuned Models", "Student Model with KD", "Student Model with MetaDistil",
          "Student Model with MetaDistil + Additional Teacher", "With Noise", "With Warm-up")
ALGORITHM_NAMES = {"finetune": "Fine-tune", "kd": "KD", "metadistil": "MetaDistil"}
CSV_COLUMNS = ("block", "method", "algorithm", "teachers", "student", "warmup", "noise", "n_seeds", "accuracy_mean",
               "accuracy_std", "params", "times_smaller", "failed_seeds")


class ReportError(ValueError):
    """The sweep cannot be reported (no parent run, no experiment)."""


@dataclass
class Report:
    sweep: str
    parent_run_id: str
    markdown: str
    rows: list[dict[str, Any]]  # one per cell: the CSV's columns (accuracy in percent; None where blank), "label"
    failed: list[dict[str, str]]  # trial_id, status, error, block, method
    csv_path: Path
    png_path: Path
    md_path: Path
    attached: list[str] = field(default_factory=list)  # artifact paths logged to the parent run


@dataclass
class _Attempt:
    run_id: str
    identity: TrialIdentity
    status: str
    start_time: int
    tags: dict[str, str]
    metrics: dict[str, float]

    @property
    def ok(self) -> bool:
        return self.status == "FINISHED" and _finite(self.metrics.get("test_accuracy"))

    @property
    def trial_id(self) -> str:
        return self.identity.trial_id or self.run_id


@dataclass
class _Cell:
    block: int
    algorithm: str
    teacher_set: str
    teachers: list[str]
    student: str
    warmup: float
    noise: str
    extras: tuple[str, ...]
    ok: list[_Attempt] = field(default_factory=list)
    failed: list[_Attempt] = field(default_factory=list)
    method: str = ""  # the table's name of the row, under its block's header
    label: str = ""  # the chart's, which has no block headers: names the algorithm too


def build_report(tracking_uri: str, sweep: str, out_dir: Path, experiment: str = "metadistil",
                 attach: bool = True) -> Report:
    """Read the sweep ``sweep`` from MLflow at ``tracking_uri`` and write its Table 1 to ``out_dir``."""
    client = mlflow_client(tracking_uri)
    parent = _parent_run(client, tracking_uri, sweep, experiment)
    children = _children(client, parent.info.experiment_id, parent.info.run_id)
    attempts = _latest_attempts(children)

    cells = _cells(attempts)
    reference = _reference_teacher_params(attempts)
    rows = [_row(cell, reference) for cell in cells]
    failed = [{"trial_id": a.trial_id, "status": a.status, "error": _error(a), "block": BLOCKS[cell.block],
               "method": cell.method} for cell in cells for a in cell.failed]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path, md_path = out_dir / "report.csv", out_dir / "report.png", out_dir / "report.md"
    markdown = _markdown(sweep, parent, rows, failed, reference, len(attempts))
    _write_csv(csv_path, rows)
    _write_png(png_path, sweep, rows)
    md_path.write_text(markdown)

    attached: list[str] = []
    if attach:
        for path in (md_path, csv_path, png_path):
            client.log_artifact(parent.info.run_id, str(path), artifact_path="report")
            attached.append(f"report/{path.name}")
    return Report(sweep, parent.info.run_id, markdown, rows, failed, csv_path, png_path, md_path, attached)


# ---------------------------------------------------------------------------------------------------- reading runs

def _parent_run(client, uri: str, sweep: str, experiment: str):
    where = f"at tracking URI {redact_uri(uri)}"
    if "'" in sweep or "\\" in sweep:
        raise ReportError(f"invalid sweep name {sweep!r}")
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ReportError(f"no sweep {sweep!r} found: experiment {experiment!r} does not exist {where}")
    runs = client.search_runs([found.experiment_id],
                              filter_string=f"tags.`{SWEEP}` = '{sweep}' and tags.`{ROLE}` = 'sweep'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ReportError(f"no sweep {sweep!r} found: no run tagged {SWEEP}={sweep} and {ROLE}=sweep in "
                          f"experiment {experiment!r} {where}")
    return runs[0]


def _children(client, experiment_id: str, parent_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _latest_attempts(runs: list) -> list[_Attempt]:
    """One attempt per trial id: the latest finished one, else the latest attempt."""
    by_trial: dict[str, list[_Attempt]] = defaultdict(list)
    for run in runs:
        tags = dict(run.data.tags)
        if tags.get(ROLE) not in ("teacher", "trial"):
            continue
        attempt = _Attempt(run.info.run_id, TrialIdentity.from_tags(tags), run.info.status, run.info.start_time or 0,
                           tags, dict(run.data.metrics))
        by_trial[attempt.trial_id].append(attempt)
    chosen = []
    for attempts in by_trial.values():
        attempts.sort(key=lambda a: a.start_time)
        finished = [a for a in attempts if a.ok]
        chosen.append(finished[-1] if finished else attempts[-1])
    return chosen


# ---------------------------------------------------------------------------------------------------------- cells

def _cells(attempts: list[_Attempt]) -> list[_Cell]:
    cells: dict[tuple, _Cell] = {}
    for a in attempts:
        cell = _cell_of(a)
        key = (cell.block, cell.algorithm, cell.teacher_set, cell.student, cell.warmup, cell.noise, cell.extras)
        cell = cells.setdefault(key, cell)
        (cell.ok if a.ok else cell.failed).append(a)
    ordered = sorted(cells.values(), key=lambda c: (c.block, len(c.teachers), " + ".join(c.teachers).lower(),
                                                    c.student.lower(), c.warmup, c.noise != OFF, c.noise,
                                                    c.algorithm, c.teacher_set, c.extras))
    for c in ordered:
        c.method, c.label = _method(c), _label(c)
    _disambiguate(ordered)
    return ordered


def _cell_of(a: _Attempt) -> _Cell:
    i = a.identity
    if i.role == "teacher":
        return _Cell(0, "finetune", "", [], i.student, 0.0, OFF, ())
    algorithm, teacher_set, student, warmup, noise = i.algorithm, i.teacher_set or "none", i.student, i.warmup, i.noise
    # a run without a teachers tag: its set's name stands for its teachers
    teachers = list(i.teachers) or ([teacher_set] if algorithm in DISTILL and i.teacher_set else [])
    extras = tuple(f"{key}={value}" for key, value in i.extra)
    if algorithm not in DISTILL:  # finetune (or an unknown algorithm): no teachers, warm-up or noise
        return _Cell(1, algorithm, teacher_set, [], student, warmup, noise, extras)
    if warmup > 0:
        block = 6
    elif noise != OFF:
        block = 5
    elif algorithm == "kd":
        block = 2
    else:
        block = 3 if len(teachers) <= 1 else 4
    return _Cell(block, algorithm, teacher_set, teachers, student, warmup, noise, extras)


def _method(c: _Cell) -> str:
    """The table's name, as in the paper's Table 1: "BERT + RoBERTa DistilBERT", under a block header."""
    if c.block == 0:
        return c.student
    name = " ".join([" + ".join(c.teachers), c.student]).strip() + _variant(c)
    if c.block >= 5:  # these blocks mix KD and MetaDistil
        name += f" [{_algorithm_name(c)}]"
    return name


def _label(c: _Cell) -> str:
    """The chart's name, "KD: BERT + RoBERTa → DistilBERT": without block headers, KD's and MetaDistil's rows of
    the same teachers and student would read alike."""
    if c.block == 0:
        return f"Teacher: {c.student}"
    models = f"{' + '.join(c.teachers)} → {c.student}" if c.teachers else c.student
    return f"{_algorithm_name(c)}: {models}{_variant(c)}"


def _variant(c: _Cell) -> str:
    return ((f" (with noise: {c.noise})" if c.noise != OFF else "")
            + (f" (warm-up {_epochs(c.warmup)})" if c.warmup > 0 else "")
            + (f" ({', '.join(c.extras)})" if c.extras else ""))


def _algorithm_name(c: _Cell) -> str:
    return ALGORITHM_NAMES.get(c.algorithm, c.algorithm)


def _disambiguate(cells: list[_Cell]) -> None:
    """Two cells of a block with the same name (e.g. two teacher sets with the same labels) get the set's name."""
    seen: dict[tuple[int, str], list[_Cell]] = defaultdict(list)
    for c in cells:
        seen[(c.block, c.method)].append(c)
    for same in seen.values():
        if len(same) > 1:
            for c in same:
                c.method += f" [{c.teacher_set or c.algorithm}]"
                c.label += f" [{c.teacher_set or c.algorithm}]"


def _epochs(value: float) -> str:
    return f"{value:g} epoch" + ("" if value == 1 else "s")


# ----------------------------------------------------------------------------------------------------------- rows

def _row(c: _Cell, reference: float | None) -> dict[str, Any]:
    acc = [100.0 * a.metrics["test_accuracy"] for a in c.ok]
    params = _common([a.metrics.get("student_params") for a in c.ok] or
                     [a.metrics.get("student_params") for a in c.failed])
    times = None
    if c.block == 1:
        logged = _common([a.metrics.get("times_smaller") for a in c.ok])
        times = logged if logged is not None else (reference / params if reference and params else None)
    elif c.block > 1:
        times = _common([a.metrics.get("times_smaller") for a in c.ok] or
                        [a.metrics.get("times_smaller") for a in c.failed])
    return {
        "block": BLOCKS[c.block],
        "method": c.method,
        "algorithm": "teacher" if c.block == 0 else c.algorithm,
        "teachers": ",".join(c.teachers),
        "student": c.student,
        "warmup": c.warmup,
        "noise": c.noise,
        "n_seeds": len(acc),
        "accuracy_mean": float(np.mean(acc)) if acc else None,
        "accuracy_std": float(np.std(acc, ddof=1)) if len(acc) > 1 else None,
        "params": round(params) if params is not None else None,
        "times_smaller": times,
        "failed_seeds": len(c.failed),
        "label": c.label,
    }


def _reference_teacher_params(attempts: list[_Attempt]) -> float | None:
    """Mean parameter count of the teachers used alone (else of all known teachers): fine-tuned rows' baseline."""
    params: dict[str, float] = {}
    single: set[str] = set()
    for a in attempts:
        i = a.identity
        if i.role == "teacher" and _finite(a.metrics.get("student_params")):
            params[i.student] = a.metrics["student_params"]
        elif i.role == "trial" and i.algorithm in DISTILL:
            teachers = i.teachers
            if len(teachers) == 1:
                single.add(teachers[0])
                if _finite(a.metrics.get("teacher_params_mean")):
                    params.setdefault(teachers[0], a.metrics["teacher_params_mean"])
    chosen = [params[n] for n in sorted(single) if n in params] or list(params.values())
    return sum(chosen) / len(chosen) if chosen else None


def _common(values: list[float | None]) -> float | None:
    finite = [v for v in values if _finite(v)]
    return float(np.median(finite)) if finite else None


def _finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _error(a: _Attempt) -> str:
    if a.tags.get("error"):
        return a.tags["error"]
    if a.status == "FINISHED":
        return "finished without a test_accuracy metric"
    return f"run {a.status.lower()} (no error tag)"


# -------------------------------------------------------------------------------------------------------- outputs

def accuracy_text(row: dict[str, Any]) -> str:
    if row["accuracy_mean"] is None:
        return "failed" if row["failed_seeds"] else ""
    if row["accuracy_std"] is None:
        return f"{row['accuracy_mean']:.2f}"
    return f"{row['accuracy_mean']:.2f} ± {row['accuracy_std']:.2f}"


def _seeds_text(row: dict[str, Any]) -> str:
    return str(row["n_seeds"]) + (f" (+{row['failed_seeds']} failed)" if row["failed_seeds"] else "")


def _cell_text(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _markdown(sweep: str, parent, rows: list[dict[str, Any]], failed: list[dict[str, str]],
              reference: float | None, n_trials: int) -> str:
    tags = parent.data.tags
    lines = [f"# Sweep {sweep}: experimental results", ""]
    meta = [f"parent run `{parent.info.run_id}`"]
    if tags.get(CONFIG_HASH):
        meta.append(f"config hash `{tags[CONFIG_HASH]}`")
    meta.append(f"{n_trials} teacher and trial runs, {len(failed)} failed")
    lines += ["; ".join(meta) + ".", ""]
    if not rows:
        return "\n".join([*lines, "No teacher or trial runs found under this sweep.", ""])
    seeds = any(r["n_seeds"] > 1 or r["failed_seeds"] for r in rows)
    header = ["Methods", "Accuracy", "No. of Parameters", "Times Smaller"] + (["Seeds"] if seeds else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    block = None
    for r in rows:
        if r["block"] != block:
            block = r["block"]
            lines.append("| " + " | ".join([f"*{block}*"] + [""] * (len(header) - 1)) + " |")
        cells = [_cell_text(r["method"]), accuracy_text(r), "" if r["params"] is None else str(r["params"]),
                 "" if r["times_smaller"] is None else f"{r['times_smaller']:.1f}"]
        if seeds:
            cells.append(_seeds_text(r))
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "Accuracy: test accuracy in percent" + (", mean ± sample standard deviation over seeds" if seeds
                                                          else "") + ".",
             "Times Smaller: mean teacher parameter count over the student's (a distillation row: its own teachers"]
    notes[-1] += ("; a fine-tuned row: the teachers used alone, "
                  f"{reference:,.0f} parameters on average)." if reference else ").")
    lines += notes
    if failed:
        lines += ["", "## Failed trials", "", "| Trial | Method | Status | Error |", "|---|---|---|---|"]
        for f in failed:
            error = _cell_text(f["error"])
            error = error if len(error) <= 300 else error[:297] + "..."
            lines.append(f"| `{f['trial_id']}` | {_cell_text(f['method'])} | {f['status']} | {error} |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r[k] is None else r[k] for k in CSV_COLUMNS})


def _write_png(path: Path, sweep: str, rows: list[dict[str, Any]]) -> None:
    chart(sweep, rows).savefig(path, dpi=100)


def chart(sweep: str, rows: list[dict[str, Any]]):
    """The report's bar chart (a matplotlib Figure): one bar per finished cell, labelled with its algorithm, coloured
    by block; error bars (std over seeds) only where a cell has several seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    shown = [r for r in rows if r["accuracy_mean"] is not None]
    fig = Figure(figsize=(10, 1.5 + 0.38 * max(len(shown), 1)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(f"Sweep {sweep}: test accuracy")
    if not shown:
        ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    means = np.array([r["accuracy_mean"] for r in shown])
    stds = np.array([r["accuracy_std"] or 0.0 for r in shown])
    spread = any(r["accuracy_std"] is not None for r in shown)
    blocks = list(dict.fromkeys(r["block"] for r in shown))
    colours = {b: f"C{i}" for i, b in enumerate(blocks)}
    y = np.arange(len(shown))
    # a cell of one seed gets no error bar (NaN draws none), not a bar of zero width
    errors = [np.nan if r["accuracy_std"] is None else r["accuracy_std"] for r in shown]
    ax.barh(y, means, xerr=errors if spread else None, color=[colours[r["block"]] for r in shown], capsize=3,
            height=0.7)
    ax.set_yticks(y, [r["label"] for r in shown], fontsize=8)
    ax.invert_yaxis()
    low = max(0.0, math.floor(float(np.min(means - stds)) / 5) * 5 - 5)
    high = min(100.0, float(np.max(means + stds)) + 3)
    ax.set_xlim(low, max(high, low + 1))
    for yi, (m, s) in enumerate(zip(means, stds)):
        ax.text(m + s + 0.1, yi, f"{m:.2f}", va="center", fontsize=7)
    ax.set_xlabel("test accuracy (%)" + (f", axis from {low:g}" if low > 0 else "")
                  + ("; error bars: std over seeds" if spread else ""))
    fig.legend(handles=[Patch(color=colours[b], label=b) for b in blocks], fontsize=7, loc="outside lower center",
               ncols=min(len(blocks), 3))
    return fig
