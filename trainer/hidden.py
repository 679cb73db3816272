"""Intermediate-layer distillation (``distill.hidden``; PKD, Sun et al. 2019, as the official MetaDistil runs it):
which [CLS] states the loss compares, the projection of the student's into the teachers' size, the checks of the
models.

Layers are numbered as a Hugging Face encoder's ``hidden_states``: 0 is the embeddings, i the output of layer i. A
student and its teachers are probed once, right after loading, so that a model without hidden states or a layer map
outside a model is refused before training, naming the key (``metadistil validate`` makes the same check earlier, from
each model's config.json: trainer.layer_map). The teachers' states are averaged (as their logits are),
so the teachers must share a hidden size; a student of another size gets a Linear(student size, teacher size) as a
submodule named ``hidden_projection``, added before the engine wraps the student, so its optimizer, its checkpoints and
the meta step's θ include it. The saved student leaves it out (``without_projection``): it is a plain classifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call

from trainer.config import HiddenConfig
from trainer.errors import ConfigError
from trainer.layer_map import layer_pairs

if TYPE_CHECKING:
    from trainer.models import Loaded

PROJECTION = "hidden_projection"


@dataclass(frozen=True)
class HiddenMap:
    """The resolved ``distill.hidden``: the student's layers and, per teacher, the layers paired with them."""

    beta: float
    student_layers: tuple[int, ...]
    teacher_layers: tuple[tuple[int, ...], ...]

    def student_states(self, model: nn.Module, hidden_states: Sequence[torch.Tensor] | None,
                       params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The student's [CLS] states at its mapped layers, projected to the teachers' size where it has a projection;
        ``params`` in place of the projection's own (the meta step's functional copies of θ)."""
        states = cls_states(hidden_states, self.student_layers, "student")
        projection = getattr(model, PROJECTION, None)
        if projection is None:
            return states
        if params is None:
            return projection(states)
        own = {name: params[f"{PROJECTION}.{name}"] for name, _ in projection.named_parameters()}
        return functional_call(projection, own, (states,))

    def teacher_states(self, index: int, hidden_states: Sequence[torch.Tensor] | None) -> torch.Tensor:
        return cls_states(hidden_states, self.teacher_layers[index], f"teachers.{index}")


def cls_states(hidden_states: Sequence[torch.Tensor] | None, layers: Sequence[int], key: str) -> torch.Tensor:
    """[layers, batch, hidden]: the first token's state ([CLS], RoBERTa's <s>) of each layer."""
    if hidden_states is None:
        raise ConfigError(f"distill.hidden: {key} returned no hidden states")
    return torch.stack([hidden_states[i][:, 0] for i in layers])


def prepare(cfg: HiddenConfig | None, student: Loaded, teachers: Sequence[Loaded]) -> HiddenMap | None:
    """The layer map of a trial's loaded models, after checking them; adds the student's projection where the hidden
    sizes differ. None when ``distill.hidden`` is off."""
    if cfg is None:
        return None
    student_depth, student_size = probe(student, "student")
    shapes = [probe(t, f"teachers.{i}") for i, t in enumerate(teachers)]
    sizes = sorted({size for _, size in shapes})
    if len(sizes) > 1:
        listed = ", ".join(f"teachers.{i}: {size}" for i, (_, size) in enumerate(shapes))
        raise ConfigError(f"distill.hidden: the teachers' [CLS] states are averaged, so their hidden sizes must agree "
                          f"(got {listed}); remove distill.hidden or use teachers of one size")
    maps = [layer_pairs(cfg.layers, student_depth, depth, f"teachers.{i}") for i, (depth, _) in enumerate(shapes)]
    if sizes and sizes[0] != student_size:
        attach_projection(student.model, student_size, sizes[0])
    return HiddenMap(cfg.beta, tuple(s for s, _ in maps[0]), tuple(tuple(t for _, t in pairs) for pairs in maps))


def probe(loaded: Loaded, key: str) -> tuple[int, int]:
    """(layers, hidden size) of a model, read from the hidden states of one forward on a one-word input."""
    model = loaded.model
    inputs = loaded.tokenizer("a", return_tensors="pt").to(next(model.parameters()).device)
    was_training = model.training
    try:
        with torch.no_grad():
            states = getattr(model.eval()(**inputs, output_hidden_states=True), "hidden_states", None)
    finally:
        model.train(was_training)
    if not states:
        raise ConfigError(f"distill.hidden: {key} ({type(model).__name__}) returns no hidden states to distil; "
                          "remove distill.hidden or use an encoder that returns them (BERT, RoBERTa, DistilBERT, ...)")
    return len(states) - 1, int(states[-1].shape[-1])


def attach_projection(model: nn.Module, student_size: int, teacher_size: int) -> None:
    like = next(model.parameters())
    model.add_module(PROJECTION, nn.Linear(student_size, teacher_size).to(like.device, like.dtype))


def without_projection(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A student's state without its projection: what is saved as the trained classifier."""
    return {k: v for k, v in state.items() if not k.startswith(f"{PROJECTION}.")}
