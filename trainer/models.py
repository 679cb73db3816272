"""Loading teachers and students, building a student from a teacher's layers, counting parameters."""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainer.config import ConfigError, ModelConfig
from trainer.preflight import one_line, resolve_name

if TYPE_CHECKING:  # transformers takes seconds to import: loaded where a model is
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_LAYER_KEY = re.compile(r"\.layer\.(\d+)\.")


@dataclass
class Loaded:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    label: str


def display_label(spec: ModelConfig) -> str:
    return spec.label or Path(spec.name.removeprefix("package:").rstrip("/")).name


def load_model(spec: ModelConfig, num_labels: int, key: str, attn_implementation: str | None = None) -> Loaded:
    """Load an AutoModelForSequenceClassification and its tokenizer; ``key`` (e.g. 'teachers[1]') names it in errors."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    name = resolve_name(spec.name)
    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as err:  # noqa: BLE001 - hub and filesystem errors come in many types; the user needs the cause
        raise ConfigError(f"{key}.name: cannot load model {spec.name!r}: {one_line(err)}") from None
    is_classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if is_classifier and config.num_labels != num_labels:
        raise ConfigError(f"{key}.name: {spec.name!r} is a classifier with {config.num_labels} labels but the data "
                          f"has {num_labels}; all models must agree on the label count")
    kwargs: dict[str, Any] = {"num_labels": num_labels}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForSequenceClassification.from_pretrained(name, **kwargs)
    except Exception as err:  # noqa: BLE001 - truncated or mismatched weights: OSError, RuntimeError, SafetensorError...
        raise ConfigError(f"{key}.name: cannot load the weights of {spec.name!r}: {one_line(err)}") from None
    return Loaded(model, load_tokenizer(spec, key), display_label(spec))


def load_tokenizer(spec: ModelConfig, key: str):
    from transformers import AutoTokenizer

    tokenizer_name = resolve_name(spec.tokenizer or spec.name)
    try:
        return AutoTokenizer.from_pretrained(tokenizer_name)
    except Exception as err:  # noqa: BLE001 - as for the model above
        raise ConfigError(f"{key}.tokenizer: cannot load tokenizer {tokenizer_name!r}: {one_line(err)}") from None


def layer_count(model: PreTrainedModel) -> int:
    return int(model.config.num_hidden_layers)


def student_from_teacher(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A shallower copy of the teacher: its embeddings, head and the listed layers, in order (DistilBERT-style init)."""
    available = layer_count(teacher)
    # negative indices used to slip through and fail later as a strict load_state_dict error; repeats likewise
    missing = [i for i in layers if i < 0 or i >= available]
    if missing:
        raise ConfigError(f"student.init_layers: layers {missing} do not exist; the teacher has {available} "
                          f"(indices 0..{available - 1})")
    if not layers or len(set(layers)) != len(layers):
        raise ConfigError(f"student.init_layers: must be a non-empty list of distinct layer indices, got {layers}")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    # built in the teacher's dtype: a float32 default would silently round a float64/bf16 teacher's copied weights
    student = type(teacher)(config).to(next(teacher.parameters()).dtype)
    new_index = {old: new for new, old in enumerate(layers)}
    state = {}
    for name, tensor in teacher.state_dict().items():
        match = _LAYER_KEY.search(name)
        if match is None:
            state[name] = tensor.clone()
        elif int(match.group(1)) in new_index:
            state[_LAYER_KEY.sub(f".layer.{new_index[int(match.group(1))]}.", name, count=1)] = tensor.clone()
    student.load_state_dict(state, strict=True)
    return student


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def times_smaller(student_params: int, teacher_params: list[int]) -> float:
    """The report's Table 1 'times smaller': the average teacher's parameter count over the student's."""
    return sum(teacher_params) / len(teacher_params) / student_params


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is available")
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if choice == "auto" else choice
    if kind == "cuda":
        # each data-parallel worker of a node drives its own GPU (Ray Train and DeepSpeed's launcher set LOCAL_RANK)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(kind)
