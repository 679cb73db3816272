"""The checks a trial's inputs get before anything heavy loads: the device, the output folder, the data files and
local model folders. ``metadistil validate`` runs them, and so does every trial (``metadistil train`` and each sweep
trial, on the machine that runs it) before it loads a model: a bad file fails in seconds, not after training.

Model folders are checked without loading their weights: config.json is read as JSON, a safetensors file's header is
compared with its size (a truncated copy fails), a PyTorch archive's index is looked up. Hub model ids and hub
datasets cannot be checked offline; loading them reports its own errors. ``check_evaluation`` does the same for
``metadistil evaluate``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from trainer import registry
from trainer.config import DataConfig, EvalConfig, StudentConfig, TrialConfig
from trainer.data import Splits, load_splits
from trainer.datafiles import EVALUATE_KEYS, TextSet, read_labelled, read_records, verbatim
from trainer.errors import ConfigError
from trainer.layer_map import check_depths
from trainer.tasks import TASKS, Task

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# tokenizer_config.json alone is not a tokenizer: transformers builds one with an empty vocabulary from it
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
# what the hub accepts as a model id ("bert-base-uncased", "org/name"); anything else names a local folder
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class ModelFolder:
    """A saved Hugging Face model folder whose config.json has been read."""

    path: Path
    config: dict[str, Any]

    @property
    def num_labels(self) -> int | None:
        """The label count of a saved classifier; None for a base model (its head is created at load)."""
        if not any(str(a).endswith("ForSequenceClassification") for a in self.config.get("architectures") or []):
            return None
        id2label = self.config.get("id2label")
        return len(id2label) if isinstance(id2label, dict) and id2label else int(self.config.get("num_labels", 2))

    @property
    def layers(self) -> int | None:
        count = self.config.get("num_hidden_layers", self.config.get("n_layers"))  # n_layers: DistilBERT
        return count if isinstance(count, int) else None


def check_trial(cfg: TrialConfig) -> Splits | None:
    """Everything about a valid config that only the files and this machine can tell; the drawn splits of local data."""
    _check_device(cfg)
    check_output_folder("output.dir", Path(cfg.output.dir))
    folders = {}
    for key, spec in [("student", cfg.student), *((f"teachers.{i}", t) for i, t in enumerate(cfg.teachers))]:
        folder = model_folder(spec.name, f"{key}.name")
        check_tokenizer(spec.tokenizer or spec.name, f"{key}.tokenizer" if spec.tokenizer else f"{key}.name")
        if folder is not None:
            folders[key] = folder
    splits = load_splits(cfg.data, cfg.seed) if cfg.data.path is not None else None
    num_labels = splits.num_labels if splits else TASKS[cfg.data.task].num_labels if cfg.data.task else \
        2 if cfg.data.name == "synthetic" else None
    for key, folder in folders.items():
        _check_label_count(folder, key, num_labels, cfg.data.path or cfg.data.name)
    student = folders.get("student")
    if cfg.student.init_layers and student is not None and student.layers is not None:
        missing = [i for i in cfg.student.init_layers if i >= student.layers]
        if missing:
            raise ConfigError(f"student.init_layers: layers {missing} do not exist; {cfg.student.name!r} has "
                              f"{student.layers} (indices 0..{student.layers - 1})")
    check_layer_map(cfg)
    return splits


def check_layer_map(cfg: TrialConfig, planned: Mapping[str, StudentConfig] | None = None) -> None:
    """``distill.hidden.layers`` against the depth in the student's and each teacher's config.json, before any weights
    load (the check a trial makes on its loaded models, with its message). ``planned``: for a teacher a sweep has still
    to fine-tune (by its name in ``cfg``, a folder not written yet), the model it is fine-tuned from."""
    if cfg.distill.hidden is None or registry.get(cfg.algorithm).teachers == "none":
        return
    planned = planned or {}

    def depth(spec: StudentConfig) -> int | None:  # a student cut by init_layers keeps as many layers as it lists
        return len(spec.init_layers) if spec.init_layers else config_depth(spec.name)

    teachers = [config_depth(t.name) if t.name not in planned or Path(t.name).exists() else depth(planned[t.name])
                for t in cfg.teachers]
    check_depths(cfg.distill.hidden.layers, depth(cfg.student), teachers)


def config_depth(name: str) -> int | None:
    """A model's layer count from its config.json (a local folder, or a hub id's copy in the local cache) without
    loading it; None where there is none to read (loading then checks)."""
    try:
        path = resolve_name(name)
    except ConfigError:  # a package that is not installed: check_trial, or loading, names it
        return None
    file = Path(path) / "config.json"
    if not file.is_file() and _HUB_ID.match(path):
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(path, "config.json")
        except ValueError:  # not a valid repo id after all
            cached = None
        file = Path(cached) if isinstance(cached, str) else file
    try:
        config = json.loads(file.read_bytes())
    except (OSError, ValueError):
        return None
    return ModelFolder(file.parent, config).layers if isinstance(config, dict) else None


@dataclass(frozen=True)
class EvalColumns:
    """``metadistil evaluate``'s --text-column, --label-column and --text-pair-column; None where not given."""

    text: str | None = None
    label: str | None = None
    pair: str | None = None

    def given(self) -> str | None:
        """The first option given, as the command line spells it."""
        named = (("--text-column", self.text), ("--label-column", self.label), ("--text-pair-column", self.pair))
        return next((option for option, value in named if value is not None), None)


def check_evaluation(model: str, data: str, task_name: str | None, columns: EvalColumns, max_length: int,
                     batch_size: int, json_path: str | None) -> tuple[TextSet, tuple[str, ...]]:
    """``metadistil evaluate``'s inputs, all before the model loads; the labelled examples to score and the metrics
    (trainer.metrics names) to score them by."""
    task = evaluation_task(task_name, columns, f"--task {task_name}")
    folder = check_classifier(model, max_length, batch_size)
    if json_path:
        check_output_file("--json", Path(json_path))
    examples = read_evaluation_data(Path(data), task, columns)
    check_label_range(folder, examples, model, data, task)
    return examples, task.metrics if task else ("accuracy",)


def evaluation_task(name: str | None, columns: EvalColumns, source: str) -> Task | None:
    """The task ``name`` (None: none), refused with the column options it fixes (``source`` says who names it)."""
    if name is None:
        return None
    if name not in TASKS:
        raise ConfigError(f"--task: {name!r} is not a GLUE task (allowed: {', '.join(TASKS)})")
    task = TASKS[name]
    given = columns.given()
    if given:
        raise ConfigError(f"{given}: is fixed by {source} (columns {', '.join(task.raw.names())} in raw GLUE files, "
                          f"{', '.join(task.hub.names())} on the hub); remove it")
    return task


def read_evaluation_data(data: Path, task: Task | None, columns: EvalColumns) -> TextSet:
    """The examples to score: ``columns`` of a file without a task; with one, a file with the task's raw GLUE or hub
    columns, or the dev file of a folder in GLUE's raw layout, labelled as a trial of the task reads them."""
    if task is None:
        return read_labelled(data, columns.text or "sentence", columns.label or "label", EVALUATE_KEYS, columns.pair)
    file = data / task.raw_dev if data.is_dir() else data
    if data.is_dir() and not file.is_file():
        raise ConfigError(f"--data: no {task.raw_dev} in {data} (--task {task.name} reads a labelled file, or the "
                          f"dev file of a folder in GLUE's raw layout)")
    names, records = read_records(file, EVALUATE_KEYS)
    found = next((c for c in (task.raw, task.hub) if set(c.names()) <= set(names)), None)
    if found is None and task.raw_header and file.suffix in (".tsv", ".csv"):
        names, records = read_records(file, EVALUATE_KEYS, task.raw_header)  # GLUE's raw CoLA has no header row
        found = task.raw
    if found is None:
        raise ConfigError(f"--data: {file} has neither the columns of --task {task.name} in raw GLUE files "
                          f"({', '.join(task.raw.names())}) nor those on the hub ({', '.join(task.hub.names())}); "
                          f"columns found: {', '.join(map(str, names))}")
    texts, pairs, labels = [], [], []
    for where, record in records:
        missing = next((c for c in found.names() if c not in record), None)
        if missing:  # a JSON object without one of the columns
            raise ConfigError(f"--data: {where} of {file} has no {missing!r}")
        texts.append(verbatim(record[found.text]))
        if found.pair:
            pairs.append(verbatim(record[found.pair]))
        try:
            labels.append(task.label(record[found.label], found.label, f"{where} of {file}"))
        except ConfigError as err:  # the trial's message names data.task, the setting of a trial config
            raise ConfigError(f"--task: {str(err).removeprefix('data.task: ')}") from None
    return TextSet(texts, labels, pairs if found.pair else None, task.regression)


def check_classifier(model: str, max_length: int, batch_size: int) -> ModelFolder:
    """A saved classifier with its tokenizer, to score at these settings (before it loads)."""
    try:  # the trial config's own limits for the same settings
        DataConfig(max_length=max_length)
        EvalConfig(batch_size=batch_size)
    except ValidationError as err:
        error = err.errors()[0]
        option = "--max-length" if error["loc"][0] == "max_length" else "--batch-size"
        raise ConfigError(f"{option}: {error['msg']} (got {error['input']!r})") from None
    folder = model_folder(model, "--model", hub=False)
    assert folder is not None  # hub=False: a local folder, or a ConfigError
    check_tokenizer(str(folder.path), "--model")
    if folder.num_labels is None:
        raise ConfigError(f"--model: {model!r} is not a saved classifier (architectures: "
                          f"{folder.config.get('architectures')}); its head would score at random. Give a trial's "
                          f"saved student folder")
    return folder


def check_label_range(folder: ModelFolder, examples: TextSet, model: str, data: str,
                      task: Task | None = None) -> None:
    """The model predicts what the examples are labelled with: scores for a regression head (one output), else
    classes in its range, and as many as ``task`` has."""
    n = folder.num_labels
    assert n is not None  # check_classifier refused a folder without a classifier head
    if n == 1 and not examples.regression:
        raise ConfigError(f"--model: {model!r} is a regression model (one output) and {data} is scored by class "
                          f"labels; score it with a regression task (--task stsb)")
    if examples.regression:
        if n != 1:
            raise ConfigError(f"--task: the labels of {data} are scores (a regression task) and {model!r} is a "
                              f"classifier with {n} labels; give a regression model")
        return
    if task is not None and n != task.num_labels:
        raise ConfigError(f"--task: {task.name} has {task.num_labels} classes ({', '.join(task.classes)}) and "
                          f"{model!r} is a classifier with {n} labels; give a model trained on {task.name}")
    bad = next((i for i, label in enumerate(examples.labels) if not 0 <= label < n), None)
    if bad is not None:
        raise ConfigError(f"--label-column: label {examples.labels[bad]} (example {bad + 1} of {data}) is out of "
                          f"range for {model}, a classifier with {n} labels (0..{n - 1})")


def resolve_name(name: str) -> str:
    """'package:<module>' names a model shipped inside an installed package; anything else is passed through."""
    if not name.startswith("package:"):
        return name
    module_name = name.removeprefix("package:")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # only the named module (or a parent package) missing means "not installed"; a missing dependency inside it
        # is a different problem and used to be reported as this one
        if err.name is None or not (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ConfigError(f"model {name!r}: importing {module_name!r} failed: {err}") from None
        raise ConfigError(f"model {name!r}: Python package module {module_name!r} is not installed") from None
    except ImportError as err:
        raise ConfigError(f"model {name!r}: importing {module_name!r} failed: {err}") from None
    if not hasattr(module, "get_model_path"):
        raise ConfigError(f"model {name!r}: module {module_name!r} has no get_model_path()")
    return str(module.get_model_path())


def model_folder(name: str, key: str, hub: bool = True) -> ModelFolder | None:
    """The checked local folder ``name`` points to; None for a hub id (with ``hub``), which only loading can check."""
    path = resolve_name(name)
    if hub and not Path(path).exists() and _HUB_ID.match(path):
        return None
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{key}: model folder {path!r} " + ("is a file" if folder.exists() else "does not exist"))
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{key}: {path!r} has no config.json; give a folder saved by save_pretrained")
    config = _read_json(folder / "config.json", key)
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ConfigError(f"{key}: {folder / 'config.json'} has no model_type; it is not a Hugging Face model config")
    _check_weights(folder, key)
    return ModelFolder(folder, config)


def check_tokenizer(name: str, setting: str) -> None:
    """A local tokenizer folder (a model's own, or a model's ``tokenizer``) holds a vocabulary."""
    path = resolve_name(name)
    if not Path(path).exists() and _HUB_ID.match(path):
        return
    if not Path(path).is_dir():
        raise ConfigError(f"{setting}: tokenizer folder {path!r} does not exist")
    found = [name for name in TOKENIZER_FILES if (Path(path) / name).is_file()]
    if not found:
        raise ConfigError(f"{setting}: {path!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the "
                          f"tokenizer with the model")
    if "tokenizer.json" in found:
        _read_json(Path(path) / "tokenizer.json", setting)


def check_output_folder(key: str, folder: Path) -> None:
    """The folder can be created (or is one) and written: a file in its place used to fail only after training."""
    existing = next(p for p in (folder, *folder.parents) if os.path.exists(p))
    if not os.path.isdir(existing):
        what = "is a file" if existing == folder else f"cannot be created: {existing} is a file"
        raise ConfigError(f"{key}: {str(folder)!r} {what}; give a folder (it is created when missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {str(folder)!r} cannot be written: folder {str(existing)!r} is not writable by "
                          f"this user")


def one_line(err: BaseException) -> str:
    """A library's error message on one line (the CLI shows a bad input as one line)."""
    return " ".join(str(err).split()) or type(err).__name__


def check_output_file(key: str, file: Path) -> None:
    if file.is_dir():
        raise ConfigError(f"{key}: {str(file)!r} is a folder; give a file name")
    if not file.parent.is_dir():
        raise ConfigError(f"{key}: folder {str(file.parent)!r} does not exist")
    if not os.access(file.parent, os.W_OK | os.X_OK) or (file.exists() and not os.access(file, os.W_OK)):
        raise ConfigError(f"{key}: {str(file)!r} is not writable by this user")


def _check_device(cfg: TrialConfig) -> None:
    fp16 = cfg.deepspeed.enabled and cfg.deepspeed.precision == "fp16"
    if cfg.device == "cpu" or not (fp16 or cfg.device == "cuda"):
        return
    from trainer.models import pick_device  # torch, imported only for a config that asks for a GPU

    if pick_device(cfg.device).type == "cpu":  # device auto without a GPU; fp16 on cpu is refused by the config
        raise ConfigError(f"deepspeed.precision: fp16 needs a CUDA device, and device {cfg.device!r} finds none on "
                          f"this machine (fp16 is not supported on CPU); use fp32 or bf16")


def _check_label_count(folder: ModelFolder, key: str, num_labels: int | None, source: str) -> None:
    count = folder.num_labels
    if count is None or num_labels is None or count == num_labels:
        return
    if num_labels > count:
        raise ConfigError(f"data.label_column: the labels of {source} go up to {num_labels - 1}, out of range for "
                          f"{key}.name {str(folder.path)!r}, a classifier with {count} labels (0..{count - 1})")
    raise ConfigError(f"{key}.name: {str(folder.path)!r} is a classifier with {count} labels but the data ({source}) "
                      f"has {num_labels}; all models must agree on the label count")


def _read_json(file: Path, key: str) -> Any:
    try:
        return json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{key}: {file} is not valid JSON ({one_line(err)})") from None
    except OSError as err:
        raise ConfigError(f"{key}: {file} cannot be read ({err.strerror})") from None


def _check_weights(folder: Path, key: str) -> None:
    found = next((name for name in WEIGHTS if (folder / name).is_file()), None)
    if found is None:
        raise ConfigError(f"{key}: {str(folder)!r} has no weights ({', '.join(WEIGHTS)})")
    shards = [folder / found]
    if found.endswith(".index.json"):
        index = _read_json(folder / found, key)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{key}: {folder / found} has no weight_map; it is not a sharded-weights index")
        shards = [folder / str(name) for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise ConfigError(f"{key}: weights file {shard} (listed in {found}) is missing")
        problem = _safetensors_problem(shard) if shard.suffix == ".safetensors" else \
            None if zipfile.is_zipfile(shard) else "not a complete PyTorch zip archive"
        if problem:
            raise ConfigError(f"{key}: weights file {shard} is truncated or corrupt ({problem}); save or copy the "
                              f"model again")


def _safetensors_problem(file: Path) -> str | None:
    """Why the file cannot be a whole safetensors file: an 8-byte header length, a JSON header, then exactly the
    bytes the header's last data offset says."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            return f"{size} bytes, too short for its header"
        try:
            header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            end = None
    if not isinstance(end, int):
        return "its header is not a safetensors header"
    if 8 + length + end != size:
        return f"{size} bytes where its header describes {8 + length + end}"
    return None
