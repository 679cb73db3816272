"""The GLUE tasks: the one table of what each task's data looks like and how it is scored.

A task fixes its text columns (one sentence or a sentence pair), its labels (class names in the hub's label order, or
a regression score), and its metrics, the first of which picks the best checkpoint. Its data is the hub's
``nyu-mll/glue`` subset or a folder in GLUE's raw layout (``train.tsv``, ``dev.tsv``), read so that both give the
same examples: the hub's validation split is GLUE's dev file. GLUE's test labels are hidden (the hub writes -1, the
raw test files have no label column), so test sets are never read: the trial's test split is carved from train, as
for any source without a labelled test split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from trainer.datafiles import Keys, TextSet, read_records, verbatim
from trainer.errors import ConfigError

TaskName = Literal["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]


@dataclass(frozen=True)
class Columns:
    text: str
    pair: str | None
    label: str

    def names(self) -> list[str]:
        return [c for c in (self.text, self.pair, self.label) if c is not None]


@dataclass(frozen=True)
class Task:
    name: str
    hub: Columns  # the columns of the hub subset named after the task
    raw: Columns  # the columns of GLUE's raw tsv files
    metrics: tuple[str, ...]  # trainer.metrics names; the first is the main metric
    classes: tuple[str, ...] = ("0", "1")  # the raw files' labels in label order; () for a regression score
    raw_header: tuple[str, ...] | None = None  # the column names of raw files that have no header row
    raw_dev: str = "dev.tsv"
    hub_validation: str = "validation"
    # further dev sets the kept weights are scored on, as (name, raw file, hub split): MNLI's mismatched genres
    extra_dev: tuple[tuple[str, str, str], ...] = ()

    def extra_splits(self) -> list[str]:
        """The split names (``validation_<name>``) under which readers return the extra dev sets."""
        return [f"validation_{name}" for name, _, _ in self.extra_dev]

    @property
    def regression(self) -> bool:
        return not self.classes

    @property
    def num_labels(self) -> int:
        return len(self.classes) or 1  # a regression head has one output

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    def label(self, value: Any, column: str, where: str) -> float:
        """The label ``value`` of a row (``where``): a class index, or a score. The wrong kind is refused."""
        if self.regression:
            score = _number(value)
            if score is None:
                raise ConfigError(f"data.task: {self.name} is a regression task (a number in column {column!r}); "
                                  f"{where} has {value!r}")
            return score
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(self.classes):
            return value  # the hub's class index
        if isinstance(value, str) and value.strip() in self.classes:
            return self.classes.index(value.strip())
        raise ConfigError(f"data.task: {self.name} is a classification task (labels {', '.join(self.classes)} in "
                          f"column {column!r}); {where} has {value!r}")


_PAIR = Columns("sentence1", "sentence2", "label")
# accuracy rides along with MCC and F1: it is GLUE's second metric for MRPC and QQP, and the sweep report ranks
# trials by test_accuracy
TASKS: dict[str, Task] = {task.name: task for task in (
    Task("cola", Columns("sentence", None, "label"), Columns("sentence", None, "label"), ("mcc", "accuracy"),
         raw_header=("source", "label", "mark", "sentence")),
    Task("sst2", Columns("sentence", None, "label"), Columns("sentence", None, "label"), ("accuracy",)),
    Task("mrpc", _PAIR, Columns("#1 String", "#2 String", "Quality"), ("f1", "accuracy")),
    Task("qqp", Columns("question1", "question2", "label"), Columns("question1", "question2", "is_duplicate"),
         ("f1", "accuracy")),
    Task("stsb", _PAIR, Columns("sentence1", "sentence2", "score"), ("pearson", "spearman"), classes=()),
    Task("mnli", Columns("premise", "hypothesis", "label"), Columns("sentence1", "sentence2", "gold_label"),
         ("accuracy",), classes=("entailment", "neutral", "contradiction"), raw_dev="dev_matched.tsv",
         hub_validation="validation_matched",
         extra_dev=(("mismatched", "dev_mismatched.tsv", "validation_mismatched"),)),
    Task("qnli", Columns("question", "sentence", "label"), Columns("question", "sentence", "label"), ("accuracy",),
         classes=("entailment", "not_entailment")),
    Task("rte", _PAIR, _PAIR, ("accuracy",), classes=("entailment", "not_entailment")),
    Task("wnli", _PAIR, _PAIR, ("accuracy",)),
)}


def config_problem(data: Any, defaults: dict[str, Any]) -> tuple[str, str] | None:
    """(key, why) where a DataConfig with a task sets what the task fixes; ``defaults`` are DataConfig's."""
    if data.task is None:
        return None
    task = TASKS[data.task]
    changed = [k for k in ("text_column", "text_pair_column", "label_column") if getattr(data, k) != defaults[k]]
    if changed:
        return changed[0], (f"is fixed by data.task {task.name} (columns {', '.join(task.hub.names())} on the hub, "
                            f"{', '.join(task.raw.names())} in raw GLUE files); remove it")
    if data.subset != task.name:
        return "subset", f"{data.subset!r} is not the hub subset of data.task {task.name} ({task.name!r}); remove it"
    if data.path is None and data.name == "synthetic":
        return "name", "'synthetic' has no GLUE task; remove data.task, or read nyu-mll/glue or a data.path"
    return None


# how reports name the tasks and metrics (GLUE's spelling)
TITLES = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B", "mnli": "MNLI",
          "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}
METRIC_NAMES = {"accuracy": "accuracy", "mcc": "Matthews correlation", "f1": "F1", "pearson": "Pearson correlation",
                "spearman": "Spearman correlation"}


def main_metric(task: str | None) -> str:
    """The metric a trial of ``task`` (None: a custom file or dataset, scored by accuracy) is chosen and ranked by."""
    return TASKS[task].main_metric if task else "accuracy"


def read_raw(task: Task, folder: Path) -> dict[str, TextSet]:
    """train.tsv and, when there, the dev file (the validation split) of a folder in GLUE's raw layout: the task's
    own folder, or a ``glue_data`` folder holding it (``CoLA/``, ``STS-B/``: GLUE's names, any case, dashes or not),
    so one data.path serves every task of a sweep."""
    folder = _task_folder(task, folder)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise ConfigError(f"data.path: {str(folder)!r} {what}; data.task {task.name} reads a folder in GLUE's raw "
                          f"layout (train.tsv, {task.raw_dev})")
    if not (folder / "train.tsv").is_file():
        raise ConfigError(f"data.path: no train.tsv in {folder} (data.task {task.name} reads GLUE's raw layout: "
                          f"train.tsv, {task.raw_dev})")
    files = {"train": folder / "train.tsv", "validation": folder / task.raw_dev,
             **{f"validation_{name}": folder / file for name, file, _ in task.extra_dev}}
    return {split: _raw_file(task, file) for split, file in files.items() if file.is_file()}


def _task_folder(task: Task, folder: Path) -> Path:
    if (folder / "train.tsv").is_file() or not folder.is_dir():
        return folder
    named = [f for f in folder.iterdir() if f.is_dir() and f.name.lower().replace("-", "") == task.name]
    return named[0] if len(named) == 1 else folder


def _raw_file(task: Task, file: Path) -> TextSet:
    columns, records = read_records(file, Keys(), task.raw_header)
    _check_columns(task, task.raw, columns, str(file))
    return _text_set(task, task.raw, [(f"{where} of {file}", record) for where, record in records])


def from_hub(task: Task, loaded: Any, source: str) -> dict[str, TextSet]:
    """The train and validation splits (and extra dev sets, when there) of the hub subset ``loaded`` (a
    ``datasets.DatasetDict``)."""
    out = {}
    extra = [(f"validation_{name}", hub) for name, _, hub in task.extra_dev if hub in loaded]
    for split, hub_split in (("train", "train"), ("validation", task.hub_validation), *extra):
        if hub_split not in loaded:
            raise ConfigError(f"data.task: {source} has no {hub_split!r} split for task {task.name} (splits: "
                              f"{', '.join(loaded)})")
        ds = loaded[hub_split]
        _check_columns(task, task.hub, ds.column_names, f"{source}:{hub_split}")
        # whole columns via Arrow: row by row, datasets>=4 iterates in Python (seconds for 65k rows)
        columns = {c: ds.with_format("arrow")[c].to_pylist() for c in task.hub.names()}
        rows = [{c: values[i] for c, values in columns.items()} for i in range(len(ds))]
        out[split] = _text_set(task, task.hub, [(f"row {i + 1} of {source}:{hub_split}", row)
                                                for i, row in enumerate(rows)])
    return out


def _check_columns(task: Task, expected: Columns, found: list[str], where: str) -> None:
    missing = [c for c in expected.names() if c not in found]
    if missing:
        raise ConfigError(f"data.task: {task.name} expects columns {', '.join(expected.names())} in {where}; "
                          f"{', '.join(missing)} missing (columns found: {', '.join(map(str, found))})")


def _text_set(task: Task, columns: Columns, rows: list[tuple[str, dict]]) -> TextSet:
    texts = [verbatim(row[columns.text]) for _, row in rows]
    pairs = None if columns.pair is None else [verbatim(row[columns.pair]) for _, row in rows]
    labels = [task.label(row[columns.label], columns.label, where) for where, row in rows]
    return TextSet(texts, labels, pairs, task.regression)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
