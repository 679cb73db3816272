"""Rebuild the report's Table 1 ("Experimental Results") from a sweep's MLflow runs.

``build_report`` finds the sweep's parent run (the most recent run tagged ``metadistil.sweep`` = NAME and
``metadistil.role`` = ``sweep``), reads its child runs (``metadistil.role`` = ``teacher`` or ``trial``), groups them
into cells (block, algorithm, teacher set, student, warm-up, noise, plus any grid.extra keys: the identity that
``launcher.identity`` reads from the runs' tags) and averages the cells over seeds. It writes ``report.md``,
``report.csv``, ``report.png`` (score per cell) and ``report_cost.png`` (train time against score) to
``out_dir`` (``launcher.report_render``) and, with ``attach``, logs them to the parent run under ``report/``.

Blocks, in the report's order (empty ones are skipped):

1. Teachers (the teacher fine-tuning runs);
2. Fine-Tuned Models (algorithm finetune);
3. Student Model with KD (kd, warm-up 0, no noise; several teachers too, named "A + B Student");
4. Student Model with MetaDistil (metadistil, one teacher, warm-up 0, no noise);
5. Student Model with MetaDistil + Additional Teacher (metadistil, several teachers, warm-up 0, no noise);
6. With Noise (kd or metadistil, warm-up 0, a noise setting other than ``off``);
7. With Warm-up (kd or metadistil, warm-up > 0).

A cell's score is its task's main metric on the test split in percent (accuracy; MCC for CoLA, F1 for MRPC and QQP,
Pearson for STS-B: ``trainer.tasks``), mean ± sample std over seeds when a cell has several; a sweep over several
tasks gets a table per task. A run that did not finish (or finished without its ``test_<metric>``) is left out of the
means and listed under "Failed trials"; a cell whose
seeds all failed reads ``failed``. When a trial was retried, its latest finished attempt counts and earlier failed
attempts are not listed.

Confidence: each cell's 95 % interval over seeds, and for each distillation cell a paired comparison over seeds
(``launcher.significance``) with its KD baseline (KD with the same teachers, student, warm-up and noise; else clean KD
without warm-up) and, for several teachers, with the best single-teacher cell of its teachers. Cost: mean train wall
time and step time over seeds, and the most memory any seed used.

Times Smaller: a distillation row shows the ``times_smaller`` its trials logged (the mean teacher parameter count of
its own teacher set over the student's). Fine-tuned rows have no teachers, so, as in the report (DistilBERT 1.7,
TinyBERT 8.2), they are measured against the mean parameter count of the reference teachers: those used as single
teachers in the sweep (all known teachers when none is). Teachers' rows leave it blank.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from launcher.identity import OFF, PHASE, ROLE, SWEEP, TrialIdentity
from launcher.report_names import BLOCKS, NOISE, WARMUP, blocks, name_cells
from launcher.report_render import CSV_COLUMNS, TEST, chart, cost_chart, markdown, write_csv
from launcher.significance import compare_cells, confidence_interval
from launcher.tracking import client as mlflow_client
from trainer import registry
from trainer.logging import redact_uri
from trainer.tasks import TITLES, main_metric

PARENT_TAG = "mlflow.parentRunId"

__all__ = ["BLOCKS", "CSV_COLUMNS", "Report", "ReportError", "build_report", "chart", "cost_chart", "sweep_attempts"]


class ReportError(ValueError):
    """The sweep cannot be reported (no parent run, no experiment)."""


@dataclass
class Report:
    sweep: str
    parent_run_id: str
    markdown: str
    # one per cell: the CSV's columns (score in percent; None where blank), "label", "by_seed" ({seed: score}),
    # "baselines" ({comparison: baseline method}) and the comparisons "vs_kd", "vs_one_teacher" (Comparison or None)
    rows: list[dict[str, Any]]
    failed: list[dict[str, str]]  # trial_id, status, error, block, method
    csv_path: Path
    png_path: Path
    md_path: Path
    cost_png_path: Path
    attached: list[str] = field(default_factory=list)  # artifact paths logged to the parent run

    @property
    def written(self) -> str:
        return f"wrote {self.md_path}, {self.csv_path}, {self.png_path} and {self.cost_png_path}"


@dataclass
class _Attempt:
    run_id: str
    identity: TrialIdentity
    status: str
    start_time: int
    tags: dict[str, str]
    metrics: dict[str, float]
    params: dict[str, str]
    model_ids: list[str]  # the run's logged models (the student)
    score_key: str = "test_accuracy"  # the metric the report scores the run by: its task's main metric

    @property
    def task(self) -> str | None:
        """The run's GLUE task (its ``data.task`` param); None for a custom dataset, or a run logged before tasks."""
        task = self.params.get("data.task")
        return task if task in TITLES else None

    @property
    def ok(self) -> bool:
        return self.status == "FINISHED" and _finite(self.metrics.get(self.score_key))

    @property
    def trial_id(self) -> str:
        return self.identity.trial_id or self.run_id


@dataclass
class Cell:
    block: int
    algorithm: str
    teacher_set: str
    teachers: list[str]
    student: str
    warmup: float
    noise: str
    extras: tuple[str, ...]  # grid.extra values but the task: "key=value"
    task: str | None = None
    ok: list[_Attempt] = field(default_factory=list)
    failed: list[_Attempt] = field(default_factory=list)
    method: str = ""  # the table's name of the row, under its block's header
    label: str = ""  # the chart's, which has no block headers: names the algorithm too
    named_extras: tuple[str, ...] = ()  # the extras its names show: those that tell it apart (report_names)

    @property
    def setting(self) -> tuple:
        """What the cell is but its grid.extra values and task: rows alike in it differ only in those."""
        return self.block, self.algorithm, self.teacher_set, self.student, self.warmup, self.noise

    @property
    def distills(self) -> bool:
        return self.block > 0 and self.algorithm in registry.distilling()


def build_report(tracking_uri: str, sweep: str, out_dir: Path, experiment: str = "metadistil",
                 attach: bool = True, prefix: str = "test_", scored: str = TEST,
                 artifact_dir: str = "report") -> Report:
    """Read the sweep ``sweep`` from MLflow at ``tracking_uri`` and write its Table 1 to ``out_dir``: each run
    scored by its metric ``prefix`` + its task's main metric (``test_mcc`` for CoLA), which ``scored`` describes
    (``launcher.rescore`` rebuilds the table on other data), attached under ``artifact_dir``."""
    client = mlflow_client(tracking_uri)
    parent, attempts = sweep_attempts(client, tracking_uri, sweep, experiment)
    for a in attempts:
        a.score_key = prefix + main_metric(a.task)

    cells = _cells(attempts)
    reference = _reference_teacher_params(attempts)
    rows = [_row(cell, reference) for cell in cells]
    compare_cells(cells, rows)
    order = blocks()
    failed = [{"trial_id": a.trial_id, "status": a.status, "error": _error(a), "block": order[cell.block],
               "method": cell.method} for cell in cells for a in cell.failed]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path, md_path = out_dir / "report.csv", out_dir / "report.png", out_dir / "report.md"
    cost_png_path = out_dir / "report_cost.png"
    text = markdown(sweep, parent, rows, failed, reference, len(attempts), scored)
    write_csv(csv_path, rows)
    chart(sweep, rows, scored).savefig(png_path, dpi=100)
    cost_chart(sweep, rows, scored).savefig(cost_png_path, dpi=100)
    md_path.write_text(text)

    attached: list[str] = []
    if attach:
        for path in (md_path, csv_path, png_path, cost_png_path):
            client.log_artifact(parent.info.run_id, str(path), artifact_path=artifact_dir)
            attached.append(f"{artifact_dir}/{path.name}")
    return Report(sweep, parent.info.run_id, text, rows, failed, csv_path, png_path, md_path, cost_png_path, attached)


# ---------------------------------------------------------------------------------------------------- reading runs

def sweep_attempts(client, uri: str, sweep: str, experiment: str) -> tuple[Any, list[_Attempt]]:
    """The sweep's parent run and, per teacher and trial id, the attempt that counts (``_latest_attempts``)."""
    parent = _parent_run(client, uri, sweep, experiment)
    return parent, _latest_attempts(_children(client, parent.info.experiment_id, parent.info.run_id))


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
        # a search's cell runs and search trials are not Table 1's: it is built from the confirm runs (the search
        # trials sit under their cell runs, and their phase tag keeps them out wherever they are read from)
        if tags.get(ROLE) not in ("teacher", "trial") or tags.get(PHASE) == "search":
            continue
        outputs = run.outputs.model_outputs if run.outputs else []
        attempt = _Attempt(run.info.run_id, TrialIdentity.from_tags(tags), run.info.status, run.info.start_time or 0,
                           tags, dict(run.data.metrics), dict(run.data.params), [o.model_id for o in outputs])
        by_trial[attempt.trial_id].append(attempt)
    chosen = []
    for attempts in by_trial.values():
        attempts.sort(key=lambda a: a.start_time)
        finished = [a for a in attempts if a.ok]
        chosen.append(finished[-1] if finished else attempts[-1])
    return chosen


# ---------------------------------------------------------------------------------------------------------- cells

def _cells(attempts: list[_Attempt]) -> list[Cell]:
    cells: dict[tuple, Cell] = {}
    for a in attempts:
        cell = _cell_of(a)
        cell = cells.setdefault((*cell.setting, cell.extras, cell.task), cell)
        (cell.ok if a.ok else cell.failed).append(a)
    ordered = sorted(cells.values(), key=lambda c: (c.block, len(c.teachers), " + ".join(c.teachers).lower(),
                                                    c.student.lower(), c.warmup, c.noise != OFF, c.noise,
                                                    c.algorithm, c.teacher_set, c.extras, c.task or ""))
    name_cells(ordered)
    return ordered


def _cell_of(a: _Attempt) -> Cell:
    i = a.identity
    extras = tuple(f"{key}={value}" for key, value in i.extra if key != "data.task")
    if i.role == "teacher":
        return Cell(0, "finetune", "", [], i.student, 0.0, OFF, extras, a.task)
    algorithm, teacher_set, student, warmup, noise = i.algorithm, i.teacher_set or "none", i.student, i.warmup, i.noise
    # a run without a teachers tag: its set's name stands for its teachers
    distilling = algorithm in registry.distilling()
    teachers = list(i.teachers) or ([teacher_set] if distilling and i.teacher_set else [])
    order = blocks()
    if not distilling:  # finetune-like (or no longer registered): no teachers, warm-up or noise
        block = registry.get(algorithm).block if algorithm in registry.names() else BLOCKS[1]
        return Cell(order.index(block), algorithm, teacher_set, [], student, warmup, noise, extras, a.task)
    if warmup > 0:
        block = WARMUP
    elif noise != OFF:
        block = NOISE
    else:
        block = registry.get(algorithm).report_block(len(teachers))
    return Cell(order.index(block), algorithm, teacher_set, teachers, student, warmup, noise, extras, a.task)


# ----------------------------------------------------------------------------------------------------------- rows

def _row(c: Cell, reference: float | None) -> dict[str, Any]:
    scores = [100.0 * a.metrics[a.score_key] for a in c.ok]
    interval = confidence_interval(scores)
    params = _common([a.metrics.get("student_params") for a in c.ok] or
                     [a.metrics.get("student_params") for a in c.failed])
    times = None
    if c.block > 0 and not c.distills:
        logged = _common([a.metrics.get("times_smaller") for a in c.ok])
        times = logged if logged is not None else (reference / params if reference and params else None)
    elif c.distills:
        times = _common([a.metrics.get("times_smaller") for a in c.ok] or
                        [a.metrics.get("times_smaller") for a in c.failed])
    return {
        "block": blocks()[c.block],
        "method": c.method,
        "algorithm": "teacher" if c.block == 0 else c.algorithm,
        "teachers": ",".join(c.teachers),
        "student": c.student,
        "warmup": c.warmup,
        "noise": c.noise,
        "task": c.task,
        "metric": main_metric(c.task),
        "n_seeds": len(scores),
        "score_mean": float(np.mean(scores)) if scores else None,
        "score_std": float(np.std(scores, ddof=1)) if len(scores) > 1 else None,
        "score_ci_low": interval[0] if interval else None,
        "score_ci_high": interval[1] if interval else None,
        "params": round(params) if params is not None else None,
        "times_smaller": times,
        "train_wall_time_s": _mean([a.metrics.get("train_wall_time_s") for a in c.ok]),
        "step_time_s": _mean([a.metrics.get("time_train_step_s") for a in c.ok]),
        "peak_memory_mb": max((m for a in c.ok if _finite(m := a.metrics.get("peak_memory_mb"))), default=None),
        "failed_seeds": len(c.failed),
        "label": c.label,
        "by_seed": {a.identity.seed: 100.0 * a.metrics[a.score_key] for a in c.ok if a.identity.seed is not None},
        "baselines": {},
        "vs_kd": None,
        "vs_one_teacher": None,
    }


def _reference_teacher_params(attempts: list[_Attempt]) -> float | None:
    """Mean parameter count of the teachers used alone (else of all known teachers): fine-tuned rows' baseline."""
    params: dict[str, float] = {}
    single: set[str] = set()
    for a in attempts:
        i = a.identity
        if i.role == "teacher" and _finite(a.metrics.get("student_params")):
            params[i.student] = a.metrics["student_params"]
        elif i.role == "trial" and i.algorithm in registry.distilling():
            teachers = i.teachers
            if len(teachers) == 1:
                single.add(teachers[0])
                if _finite(a.metrics.get("teacher_params_mean")):
                    params.setdefault(teachers[0], a.metrics["teacher_params_mean"])
    chosen = [params[n] for n in sorted(single) if n in params] or list(params.values())
    return sum(chosen) / len(chosen) if chosen else None


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if _finite(v)]
    return float(np.mean(finite)) if finite else None


def _common(values: list[float | None]) -> float | None:
    finite = [v for v in values if _finite(v)]
    return float(np.median(finite)) if finite else None


def _finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _error(a: _Attempt) -> str:
    if a.tags.get("error"):
        return a.tags["error"]
    if a.status == "FINISHED":
        return f"finished without a {a.score_key} metric"
    return f"run {a.status.lower()} (no error tag)"


