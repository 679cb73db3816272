"""``metadistil evaluate --sweep NAME --data FILE``: score every saved student of a sweep on one labelled file.

A trial's own test split is a few hundred to a few thousand examples, so one example can move a cell as much as the
gaps between methods; a larger labelled file that no trial trained on (``bench/heldout.py`` draws one) gives every
student the same, larger exam. For each teacher and trial of the sweep's latest parent run, the attempt that counts in
Table 1 (its latest finished one) is scored: its student is read from the sweep's storage (``<output.dir>/student``,
the run's ``output.dir`` param) or, where that folder is gone (another machine, a cleaned storage), downloaded from the
run's logged MLflow model. The accuracy is logged to that run as ``eval_<name>_accuracy`` (``name`` defaults to the
file's stem), and Table 1 is rebuilt on it under ``runs/reports/<sweep>/eval_<name>/``, attached to the parent run
under ``report/eval_<name>/``.
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
from trainer.datafiles import EVALUATE_KEYS, read_labelled
from trainer.errors import ConfigError

STUDENT = "student"  # the folder a trial saves its student to, under output.dir (trainer.loop)


@dataclass
class Rescored:
    metric: str
    examples: int
    scores: dict[str, float]  # trial id -> accuracy on the file
    skipped: dict[str, str]  # trial id -> why it was not scored
    report: Report  # Table 1 on the file


def metric_name(data: str, name: str | None) -> str:
    """``eval_<name>_accuracy``: ``name`` (else the file's stem) lower-cased, anything but letters and digits as _."""
    given = name if name is not None else Path(data).stem
    slug = re.sub(r"[^a-z0-9]+", "_", given.lower()).strip("_")
    if not slug:
        raise ConfigError(f"--name: {given!r} has no letter or digit to name the metric by")
    return f"eval_{slug}_accuracy"


def rescore_sweep(tracking_uri: str, experiment: str, sweep: str, data: str, columns: tuple[str, str],
                  max_length: int, batch_size: int, device: str, out_dir: Path, name: str | None = None,
                  attach: bool = True, echo: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
                  ) -> Rescored:
    """Score the sweep's students on ``data`` (its text and label ``columns``) and rebuild Table 1 on it.

    Each student's inputs are checked as ``evaluate --model`` checks them (labels in its range, a tokenizer); one that
    cannot be found, loaded or fed the file is skipped with its reason, and its cell reads as failed in the new table.
    """
    from trainer.evaluation import score_saved
    from trainer.models import pick_device
    from trainer.preflight import check_classifier, check_label_range

    metric = metric_name(data, name)
    torch_device = pick_device(device)
    labelled = read_labelled(Path(data), *columns, EVALUATE_KEYS)  # a bad file fails once, here
    client = mlflow_client(tracking_uri)
    _, attempts = sweep_attempts(client, tracking_uri, sweep, experiment)
    scores: dict[str, float] = {}
    finished = sorted((a for a in attempts if a.ok), key=lambda a: (a.identity.role != "teacher", a.trial_id))
    skipped = {a.trial_id: f"not finished (run {a.status.lower()})" for a in attempts if not a.ok}
    for i, attempt in enumerate(finished, 1):
        try:
            folder = _student(attempt, tracking_uri)
            check_label_range(check_classifier(folder, max_length, batch_size), labelled, folder, data)
            accuracy = score_saved(folder, labelled, max_length, batch_size, torch_device)
        except ConfigError as err:
            skipped[attempt.trial_id] = str(err)
            echo(f"  [{i}/{len(finished)}] {attempt.trial_id}: skipped: {err}")
            continue
        scores[attempt.trial_id] = accuracy
        client.log_metric(attempt.run_id, metric, accuracy)
        client.set_tag(attempt.run_id, f"{metric}.data", str(data))
        echo(f"  [{i}/{len(finished)}] {attempt.trial_id}: {accuracy:.4f} on {data} "
             f"(own test {attempt.metrics['test_accuracy']:.4f})")
    if not scores:
        raise ConfigError(f"--sweep {sweep}: no student could be scored on {data} ({len(attempts)} teacher and trial "
                          f"runs, {len(finished)} finished)" + _first_reason(skipped))
    slug = metric.removesuffix("_accuracy")
    report = build_report(tracking_uri, sweep, out_dir / slug, experiment, attach, prefix=f"{slug}_",
                          scored=f"on {Path(data).name} ({len(labelled)} examples)",
                          artifact_dir=f"report/{slug}")
    return Rescored(metric, len(labelled), scores, skipped, report)


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
