"""``distill.hidden.layers`` against the models' depths: the one check of a layer map, with its message.

A trial makes it on the loaded models (trainer.hidden, the depths read from their hidden states); ``metadistil
validate`` and a sweep's grid check make it before any weights load, from each model's config.json (trainer.preflight).
torch-free for that reason.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from trainer.errors import ConfigError

_UNREAD = sys.maxsize  # the depth of a model whose config cannot be read: no layer lies beyond it, none is refused


def layer_pairs(layers: str | Sequence[tuple[int, int]], student_depth: int, teacher_depth: int,
                teacher: str) -> list[tuple[int, int]]:
    """The (student layer, teacher layer) pairs of ``distill.hidden.layers`` for one teacher, checked against both."""
    key = "distill.hidden.layers"
    if isinstance(layers, str):  # "auto", the one string the config allows
        if student_depth < 2:
            raise ConfigError(f"{key}: auto pairs the student's layers 1..S-1 (its last is distilled through the "
                              f"logits), and the student has {student_depth}; list the pairs instead")
        if teacher_depth < student_depth:
            raise ConfigError(f"{key}: auto spaces the student's {student_depth} layers over the teacher's, and "
                              f"{teacher} has only {teacher_depth}; list the pairs instead")
        return [(i, i * (teacher_depth // student_depth)) for i in range(1, student_depth)]
    for s, t in layers:
        if s > student_depth:
            raise ConfigError(f"{key}: student layer {s} does not exist; the student has {student_depth} layers "
                              f"(1..{student_depth})")
        if t > teacher_depth:
            raise ConfigError(f"{key}: teacher layer {t} does not exist; {teacher} has {teacher_depth} layers "
                              f"(1..{teacher_depth})")
    return [(s, t) for s, t in layers]


def check_depths(layers: str | Sequence[tuple[int, int]], student: int | None, teachers: Sequence[int | None]) -> None:
    """``layer_pairs`` for each teacher, before the models load; None is a depth that could not be read (a hub model
    not in the local cache), whose layers are left to the check after loading."""
    if student is None and isinstance(layers, str):
        return  # auto spaces the student's layers over the teacher's: nothing to check without them
    for i, depth in enumerate(teachers):
        if student is not None or depth is not None:
            layer_pairs(layers, _UNREAD if student is None else student, _UNREAD if depth is None else depth,
                        f"teachers.{i}")
