"""``metadistil evaluate --sweep NAME --data FILE``: score every saved student of a sweep on one labelled file.

A trial's own test split is a few hundred to a few thousand examples, so one example can move a cell as much as the
gaps between methods; a larger labelled file that no trial trained on (``bench/heldout.py`` draws one) gives every
student the same, larger exam. For each teacher and trial of the sweep's latest parent run, the attempt that counts in
Table 1 (its latest finished one) is scored: its student is read from the sweep's storage (``<output.dir>/student``,
the run's ``output.dir`` param) or, where that folder is gone (another machine, a cleaned storage), downloaded from the
run's logged MLflow model. Each metric of the trial's GLUE task (``data.task``; accuracy without one) is logged to
that run as ``eval_<name>_<metric>`` (``name`` defaults to the file's stem), and Table 1 is rebuilt on the main
metric under ``runs/reports/<sweep>/eval_<name>/``, attached to the parent run under ``report/eval_<name>/``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from launcher.report import Report, build_report, sweep_attempts
from launcher.tracking import client as mlflow_client
from launcher.tracking import local_model_folder
from trainer.datafiles import TextSet
from trainer.errors import ConfigError
from trainer.preflight import EvalColumns
from trainer.tasks import TASKS

STUDENT = "student"  # the folder a trial saves its student to, under output.dir (trainer.loop)


@dataclass
class Rescored:
    prefix: str  # eval_<name>_: a run's metrics on the file are prefix + each metric of its task
    metric: str | None  # prefix + the main metric Table 1 is built on; None when the trials' tasks differ in it
    examples: int
    scores: dict[str, float]  # trial id -> its main metric on the file (accuracy without a task)
    metrics: dict[str, dict[str, float]]  # trial id -> every metric of its task on the file
    skipped: dict[str, str]  # trial id -> why it was not scored
    report: Report  # Table 1 on the file


def metric_prefix(data: str, name: str | None) -> str:
    """``eval_<name>_``: ``name`` (else the file's stem) lower-cased, anything but letters and digits as _."""
    given = name if name is not None else Path(data).stem
    slug = re.sub(r"[^a-z0-9]+", "_", given.lower()).strip("_")
    if not slug:
        raise ConfigError(f"--name: {given!r} has no letter or digit to name the metric by")
    return f"eval_{slug}_"


def rescore_sweep(tracking_uri: str, experiment: str, sweep: str, data: str, columns: EvalColumns,
                  max_length: int, batch_size: int, device: str, out_dir: Path, name: str | None = None,
                  attach: bool = True, echo: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
                  ) -> Rescored:
    """Score the sweep's students on ``data`` and rebuild Table 1 on it.

    A trial with a task (its ``data.task`` param) reads the file as ``evaluate --task`` does and is scored by the
    task's metrics; one without reads ``columns`` and is scored by accuracy. Each student's inputs are checked as
    ``evaluate --model`` checks them (labels in its range, a tokenizer); one that cannot be found, loaded or fed the
    file is skipped with its reason, and its cell reads as failed in the new table.
    """
    from trainer.evaluation import score_saved
    from trainer.models import pick_device
    from trainer.preflight import check_classifier, check_label_range, evaluation_task, read_evaluation_data

    prefix = metric_prefix(data, name)
    torch_device = pick_device(device)
    client = mlflow_client(tracking_uri)
    _, attempts = sweep_attempts(client, tracking_uri, sweep, experiment)
    finished = sorted((a for a in attempts if a.ok), key=lambda a: (a.identity.role != "teacher", a.trial_id))
    labelled: dict[str | None, TextSet] = {}  # by task: the file is read once per task, and a bad file fails here
    for attempt in finished:
        task_name = _task_of(attempt)
        if task_name not in labelled:
            task = evaluation_task(task_name, columns, f"the trials' data.task {task_name}")
            labelled[task_name] = read_evaluation_data(Path(data), task, columns)
    scores: dict[str, dict[str, float]] = {}
    mains: dict[str, str] = {}  # trial id -> its main metric
    skipped = {a.trial_id: f"not finished (run {a.status.lower()})" for a in attempts if not a.ok}
    for i, attempt in enumerate(finished, 1):
        task_name = _task_of(attempt)
        task = TASKS[task_name] if task_name else None
        metrics = task.metrics if task else ("accuracy",)
        try:
            folder = _student(attempt, tracking_uri)
            check_label_range(check_classifier(folder, max_length, batch_size), labelled[task_name], folder, data,
                              task)
            scored = score_saved(folder, labelled[task_name], max_length, batch_size, torch_device, metrics)
        except ConfigError as err:
            skipped[attempt.trial_id] = str(err)
            echo(f"  [{i}/{len(finished)}] {attempt.trial_id}: skipped: {err}")
            continue
        scores[attempt.trial_id], mains[attempt.trial_id] = scored, metrics[0]
        for metric, value in scored.items():
            client.log_metric(attempt.run_id, prefix + metric, value)
            client.set_tag(attempt.run_id, f"{prefix}{metric}.data", str(data))
        own = attempt.metrics.get(f"test_{metrics[0]}", float("nan"))
        echo(f"  [{i}/{len(finished)}] {attempt.trial_id}: {', '.join(f'{k} {v:.4f}' for k, v in scored.items())} "
             f"on {data} (own test {metrics[0]} {own:.4f})")
    if not scores:
        raise ConfigError(f"--sweep {sweep}: no student could be scored on {data} ({len(attempts)} teacher and trial "
                          f"runs, {len(finished)} finished)" + _first_reason(skipped))
    slug = prefix.removesuffix("_")
    examples = len(next(iter(labelled.values())))
    main = sorted(set(mains.values()))
    # each run is scored by prefix + its own task's main metric
    report = build_report(tracking_uri, sweep, out_dir / slug, experiment, attach, prefix=prefix,
                          scored=f"on {Path(data).name} ({examples} examples)",
                          artifact_dir=f"report/{slug}")
    return Rescored(prefix, prefix + main[0] if len(main) == 1 else None, examples,
                    {t: s[mains[t]] for t, s in scores.items()}, scores, skipped, report)


def _task_of(attempt) -> str | None:
    """The trial's ``data.task`` param (MLflow writes an unset one as None); None for runs without a task."""
    task = attempt.params.get("data.task")
    return task if task in TASKS else None


def _student(attempt, tracking_uri: str) -> str:
    """The attempt's student folder: in the sweep's storage, else its logged MLflow model, downloaded."""
    output = attempt.params.get("output.dir")
    if output and (Path(output) / STUDENT / "config.json").is_file():
        return str(Path(output) / STUDENT)
    if attempt.model_ids:
        return local_model_folder(f"models:/{attempt.model_ids[-1]}", tracking_uri)
    where = f"{Path(output) / STUDENT}" if output else "no output.dir param"
    raise ConfigError(f"its student is neither in the sweep's storage ({where}) nor logged to its MLflow run")


def _first_reason(skipped: dict[str, str]) -> str:
    if not skipped:
        return ""
    trial, reason = next(iter(skipped.items()))
    return f"; e.g. {trial}: {reason}"
