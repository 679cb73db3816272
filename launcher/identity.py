"""Who a run of a sweep is: the trial id, the identity record the driver writes as MLflow tags (and the report and
bench/heldout.py read back), and the short run name shown in the MLflow UI.

The trial id names the trial's storage folder and finds its run again on retry or resume, so its format never
changes. The run name is for reading: ``metadistil · MiniLM-2L→MiniLM-1L · noisy · s1``, at most ``NAME_LIMIT``
characters and unique within the sweep (``run_names``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainer.config import NoiseConfig, digest

if TYPE_CHECKING:
    from launcher.spec import Plan, Trial

ROLE, SWEEP, TRIAL_ID = "metadistil.role", "metadistil.sweep", "metadistil.trial_id"
PHASE = "metadistil.phase"  # search or confirm: the stage of a sweep with a search section that ran the trial
CONFIG_HASH, PREVIOUS_HASH = "metadistil.config_hash", "metadistil.previous_config_hash"
NODE = "metadistil.ray_node"  # the Ray node a trial ran on (its latest attempt's), set by the trial itself
RUN_NAME = "mlflow.runName"  # MLflow's tag for the run name (mlflow/utils/mlflow_tags.py)
EXTRA = "grid."  # tag prefix of the values of grid.extra keys
OFF = "off"  # the noise tag of a setting without noise, whatever the spec calls it
NAME_LIMIT = 60
SEP = " · "


def trial_id(combo: dict[str, Any]) -> str:
    """The id of a combination of axis values (and grid.extra keys), e.g. ``kd__bert__distil__w0__clean__s1``."""
    return "__".join(_id_parts(combo, with_seed=True))


def cell_id(combo: dict[str, Any]) -> str:
    """The id of the combination's cell, the trial id without the seed (``kd__bert__distil__w0__clean``): what a
    search varies values within and then confirms on several seeds."""
    return "__".join(_id_parts(combo, with_seed=False))


def _id_parts(combo: dict[str, Any], with_seed: bool) -> list[str]:
    from launcher.spec import AXES  # spec imports this module

    parts = [combo["algorithm"], combo.get("teacher_set") or "none", combo["student"], f"w{combo['warmup']:g}",
             combo["noise"], *([f"s{combo['seed']}"] if with_seed else [])]
    if combo.get("workers", 1) != 1:
        parts.append(f"x{combo['workers']}")
    parts += [f"{k}={combo[k]}" for k in sorted(combo) if k not in AXES]
    return [str(p) for p in parts]


@dataclass(frozen=True)
class TrialIdentity:
    """A run of a sweep as the researcher names it. A teacher run (role ``teacher``, a teacher's fine-tuning) has
    the teacher's label as ``student``: the model it trains."""

    role: str  # "teacher" or "trial"
    trial_id: str
    sweep: str
    algorithm: str
    student: str  # label
    teacher_set: str | None = None  # the spec's name of the set; None without teachers
    teachers: tuple[str, ...] = ()  # labels of the set's members
    warmup: float = 0.0
    noise: str = OFF  # the spec's name of the noise setting; OFF for one without noise
    seed: int | None = None
    workers: int = 1
    extra: tuple[tuple[str, str], ...] = ()  # (key, value) of the grid.extra keys, by key

    @classmethod
    def of_trial(cls, plan: Plan, trial: Trial) -> TrialIdentity:
        from launcher.spec import AXES

        spec, axes = plan.spec, trial.axes
        if axes.get("stage") == "teacher":
            name = axes["teacher"]
            return cls("teacher", trial.id, spec.name, "finetune", spec.teachers[name].label or name,
                       seed=trial.config.seed, workers=trial.workers,
                       extra=tuple(sorted((k, str(v)) for k, v in axes.items() if k not in ("stage", "teacher"))))
        noiseless = spec.noise.get(axes["noise"], NoiseConfig()) == NoiseConfig()
        return cls("trial", trial.id, spec.name, axes["algorithm"], spec.students[axes["student"]].label or
                   axes["student"], axes.get("teacher_set"), tuple(spec.teachers[t].label or t for t in trial.teachers),
                   float(axes["warmup"]), OFF if noiseless else axes["noise"], axes["seed"], trial.workers,
                   tuple(sorted((k, str(v)) for k, v in axes.items() if k not in AXES)))

    def to_tags(self) -> dict[str, str]:
        """The record as MLflow tags: ``metadistil.*`` for the bookkeeping, plain names for the axes (what the UI's
        columns and searches show: ``tags.algorithm = 'kd'``), ``grid.<key>`` for grid.extra keys."""
        tags = {ROLE: self.role, TRIAL_ID: self.trial_id, SWEEP: self.sweep, "algorithm": self.algorithm}
        if self.role == "teacher":
            tags["teacher"] = self.student
        else:
            tags.update({"teacher_set": self.teacher_set or "none", "teachers": ",".join(self.teachers),
                         "student": self.student, "warmup": _number_text(self.warmup), "noise": self.noise})
        if self.seed is not None:
            tags["seed"] = str(self.seed)
        tags["workers"] = str(self.workers)
        tags.update({EXTRA + key: value for key, value in self.extra})
        return tags

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> TrialIdentity:
        """The record of a run's tags; tags an older run lacks take their defaults."""
        role, tid = tags.get(ROLE), tags.get(TRIAL_ID, "")
        if role not in ("teacher", "trial"):
            raise ValueError(f"tag {ROLE}: {role!r} is not a teacher or trial run")
        seed, workers = _number(tags.get("seed"), int), _number(tags.get("workers"), int)
        extra = tuple(sorted((k.removeprefix(EXTRA), v) for k, v in tags.items() if k.startswith(EXTRA)))
        if role == "teacher":
            return cls(role, tid, tags.get(SWEEP, ""), tags.get("algorithm", "finetune"),
                       tags.get("teacher") or tid.removeprefix("teacher__").partition("__")[0], seed=seed,
                       workers=workers or 1, extra=extra or _extra_of_id(tid))
        teachers = tuple(t.strip() for t in tags.get("teachers", "").split(",") if t.strip())
        teacher_set = tags.get("teacher_set", "none")
        return cls(role, tid, tags.get(SWEEP, ""), tags.get("algorithm", ""), tags.get("student", "?"),
                   None if teacher_set == "none" else teacher_set, teachers, _number(tags.get("warmup"), float) or 0.0,
                   tags.get("noise") or OFF, seed, workers or 1, extra or _extra_of_id(tid))

    def name_parts(self, compact: bool = False) -> list[str]:
        """The run name's parts: algorithm, teachers→student, then what sets the trial apart, seed last; ``compact``
        abbreviates the settings (``w0.5`` for warm-up 0.5, ``alpha=0.9`` for distill.alpha=0.9, ``x2`` workers)."""
        settings = [f"{key.rpartition('.')[2] if compact else key}={value}" for key, value in self.extra]
        if self.role == "teacher":
            return ["teacher", self.student, *settings]
        parts = [self.algorithm, "+".join(self.teachers) + "→" + self.student if self.teachers else self.student]
        if self.noise != OFF:
            parts.append(self.noise)
        if self.warmup:
            parts.append(("w" if compact else "warm-up ") + _number_text(self.warmup))
        parts += settings
        if self.workers != 1:
            parts.append(f"x{self.workers}" if compact else f"{self.workers} workers")
        if self.seed is not None:
            parts.append(f"s{self.seed}")
        return parts


    def cell_name(self) -> str:
        """The run name of the trial's cell (a search's cell run): its compact name parts but the seed."""
        parts = self.name_parts(compact=True)
        return SEP.join(parts[:-1] if self.seed is not None else parts)


def of_plan(plan: Plan) -> dict[str, TrialIdentity]:
    """Every run of the plan by trial id: the teachers' fine-tuning first, then the grid's trials."""
    return {t.id: TrialIdentity.of_trial(plan, t) for t in [*plan.teacher_trials.values(), *plan.trials]}


def run_names(identities: Iterable[TrialIdentity], limit: int = NAME_LIMIT) -> dict[str, str]:
    """A run name per trial id: its ``name_parts`` joined, compact when too long, then the longest parts cut (``…``)
    to fit ``limit``; names that still collide (labels shared by two teachers or students, cut parts) end in a
    digest of the trial id."""
    by_id = {i.trial_id: i for i in identities}
    names = {tid: _name(i, limit) for tid, i in by_id.items()}
    length = 4
    while clashes := _clashes(names):
        for tid in clashes:
            suffix = SEP + digest(tid, length)
            names[tid] = _name(by_id[tid], limit - len(suffix)) + suffix
        length += 2
    return names


def _clashes(names: dict[str, str]) -> list[str]:
    counts = Counter(names.values())
    return [tid for tid, name in names.items() if counts[name] > 1]


def _name(identity: TrialIdentity, limit: int) -> str:
    full = SEP.join(identity.name_parts())
    return full if len(full) <= limit else _fit(identity.name_parts(compact=True), limit)


def _fit(parts: list[str], limit: int) -> str:
    """Parts joined within ``limit``: the longest part but the first (the algorithm) is cut a character at a time, so
    that long parts end up about equally long, none below 4 characters; the whole name is cut when that is not
    enough."""
    sizes = [len(p) for p in parts]

    def joined() -> str:
        return SEP.join(p if len(p) <= n else p[: n - 1] + "…" for p, n in zip(parts, sizes))

    while len(joined()) > limit and max(sizes[1:]) > 4:
        longest = max(range(1, len(sizes)), key=sizes.__getitem__)
        sizes[longest] -= 1
    name = joined()
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _extra_of_id(tid: str) -> tuple[tuple[str, str], ...]:
    """grid.extra values of a run logged before they were tags: the ``key=value`` parts of its trial id."""
    return tuple(sorted((key, value) for key, _, value in (p.partition("=") for p in tid.split("__") if "=" in p)))


def _number_text(value: float) -> str:
    """0.5 as "0.5" and 1.0 as "1", exactly (the trial id's :g rounds to 6 digits)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def _number(text: str | None, kind: type) -> Any:
    try:
        return kind(text) if text not in (None, "") else None
    except ValueError:
        return None
