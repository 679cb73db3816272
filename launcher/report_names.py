"""What Table 1 calls its blocks and rows: "BERT + RoBERTa DistilBERT" under "Student Model with KD", as in the
paper's Table 1, and the chart's "KD: BERT + RoBERTa → DistilBERT"."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import TYPE_CHECKING

from launcher.identity import OFF
from trainer import registry
from trainer.tasks import TITLES

if TYPE_CHECKING:
    from launcher.report import Cell

BLOCKS = ("Teachers", "Fine-Tuned Models", "Student Model with KD", "Student Model with MetaDistil",
          "Student Model with MetaDistil + Additional Teacher", "With Noise", "With Warm-up")
NOISE, WARMUP = BLOCKS[5:]  # the blocks of distillation with noise, and after a warm-up, whatever the algorithm


def blocks() -> tuple[str, ...]:
    """The report's blocks in order: the paper's, with any block a registered algorithm adds before the noise and
    warm-up blocks (which mix the distillation algorithms)."""
    named = [b for spec in map(registry.get, registry.names())
             for b in (spec.block, spec.several_teachers_block) if b]
    added = [b for b in dict.fromkeys(named) if b not in BLOCKS]
    return (*BLOCKS[:5], *added, *BLOCKS[5:])


def name_cells(cells: list[Cell]) -> None:
    """Give each cell its table name (``method``) and chart name (``label``)."""
    _name_extras(cells)
    several_tasks = len({c.task for c in cells}) > 1
    for c in cells:
        c.method, c.label = _method(c), _label(c)
        if several_tasks:  # the table has a section per task; the chart, one axis for all
            c.label = f"{TITLES.get(c.task or '', 'no task')} · {c.label}"
    _disambiguate(cells)


def _name_extras(cells: list[Cell]) -> None:
    """A grid.extra value names a row only where it tells the row apart: where rows otherwise alike (same block,
    algorithm, teachers, student, warm-up, noise) differ in that key, or where it is not the key's usual value in
    the task's table (the value most rows have). ``distill.hidden.beta: [0, 100]`` on MetaDistil only: the fine-tuning
    and KD rows read plainly, MetaDistil's two rows carry their beta."""
    by_task: dict[str | None, list[tuple[Cell, dict[str, str]]]] = defaultdict(list)
    for c in cells:
        by_task[c.task].append((c, dict(map(_split, c.extras))))
    for table in by_task.values():
        counts: dict[str, Counter[str]] = defaultdict(Counter)
        for _, values in table:
            for key, value in values.items():
                counts[key][value] += 1
        usual = {key: _most_common(n) for key, n in counts.items()}
        alike: dict[tuple, list[tuple[Cell, dict[str, str]]]] = defaultdict(list)
        for c, values in table:
            alike[c.setting].append((c, values))
        for group in alike.values():
            varying = {key for key in counts if len({values.get(key) for _, values in group}) > 1}
            for c, values in group:
                c.named_extras = tuple(f"{key}={value}" for key, value in values.items()
                                       if key in varying or usual[key] != value)


def _most_common(values: Counter[str]) -> str | None:
    """The value most rows have; None when two tie."""
    ranked = values.most_common(2)
    return ranked[0][0] if len(ranked) == 1 or ranked[0][1] > ranked[1][1] else None


def _split(extra: str) -> tuple[str, str]:
    key, _, value = extra.partition("=")
    return key, value


def _method(c: Cell) -> str:
    """The table's name, as in the paper's Table 1: "BERT + RoBERTa DistilBERT", under a block header."""
    if c.block == 0:
        return c.student
    name = " ".join([" + ".join(c.teachers), c.student]).strip() + _variant(c)
    if blocks()[c.block] in (NOISE, WARMUP):  # these blocks mix the distillation algorithms
        name += f" [{_algorithm_name(c)}]"
    return name


def _label(c: Cell) -> str:
    """The chart's name, "KD: BERT + RoBERTa → DistilBERT": without block headers, KD's and MetaDistil's rows of
    the same teachers and student would read alike."""
    if c.block == 0:
        return f"Teacher: {c.student}"
    models = f"{' + '.join(c.teachers)} → {c.student}" if c.teachers else c.student
    return f"{_algorithm_name(c)}: {models}{_variant(c)}"


def _variant(c: Cell) -> str:
    return ((f" (with noise: {c.noise})" if c.noise != OFF else "")
            + (f" (warm-up {_epochs(c.warmup)})" if c.warmup > 0 else "")
            + (f" ({', '.join(c.named_extras)})" if c.named_extras else ""))


def _algorithm_name(c: Cell) -> str:
    # MLflow may hold runs of an algorithm that is no longer registered: its name stands for its label
    return registry.get(c.algorithm).label if c.algorithm in registry.names() else c.algorithm


def _disambiguate(cells: list[Cell]) -> None:
    """Two cells of a block with the same name (e.g. two teacher sets with the same labels) get the set's name."""
    seen: dict[tuple[int, str, str | None], list[Cell]] = defaultdict(list)
    for c in cells:
        seen[(c.block, c.method, c.task)].append(c)
    for same in seen.values():
        if len(same) > 1:
            for c in same:
                c.method += f" [{c.teacher_set or c.algorithm}]"
                c.label += f" [{c.teacher_set or c.algorithm}]"


def _epochs(value: float) -> str:
    return f"{value:g} epoch" + ("" if value == 1 else "s")
