"""The sweep spec: a base trial config plus grid axes, expanded by rule into validated trial configs.

Axes: teacher sets, students, warm-up epochs, noise settings, algorithms, seeds, and any other trial key (``extra``).
Combinations that mean nothing are dropped by rule: an algorithm without teachers (trainer/registry.py) takes no
teacher set, and warm-up and noise variants apply to distillation only. ``include`` adds combinations, ``exclude``
removes them. Names and values that become folder names, repeated values and the storage folder are checked by
``launcher.spec_checks``. A ``search`` section (``launcher.search``) turns each cell of the grid into search trials
and confirm trials; teacher recipes and their fine-tuning trials are ``launcher.teachers``'.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from launcher.identity import trial_id
from launcher.search import ConfirmSpec, SearchPlan, SearchSpec, check_search, plan_search
from launcher.spec_checks import (
    NAME,
    check_extra_axes,
    check_folder_part,
    check_names,
    check_no_repeats,
    check_outputs_inside,
    check_storage,
    refuse_storage_uri,
    warn_unmatched_excludes,
)
from launcher.teachers import TeacherRecipe, teacher_model, teacher_trial, teacher_variant
from launcher.trials import Trial, absolute, check_trial_workers, token_cache_dir, validated
from trainer import registry
from trainer.config import (
    AlgorithmName,
    ConfigError,
    NoiseConfig,
    StudentConfig,
    digest,
)
from trainer.overrides import apply_overrides
from trainer.strict_yaml import read_yaml

AXES = ("algorithm", "teacher_set", "student", "warmup", "noise", "seed", "workers")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GridSpec(_Section):
    algorithm: list[AlgorithmName] = Field(default_factory=lambda: list(registry.names()), min_length=1,
                                           description="Algorithms; the default is every registered one.")
    teacher_set: list[str] | None = Field(None, min_length=1, description="Teacher-set names; null = all of "
                                          "teacher_sets.")
    student: list[str] | None = Field(None, min_length=1, description="Student names; null = all of students.")
    warmup: list[float] = Field([0.0], min_length=1, description="Warm-up epochs (distillation algorithms only).")
    noise: list[str] | None = Field(None, min_length=1, description="Noise setting names (distillation only); "
                                    "null = no noise.")
    seed: list[int] = Field([42], min_length=1, description="Trial seeds.")
    workers: list[int] | None = Field(None, min_length=1, description="Data-parallel workers per trial (Ray Train "
                                      "DeepSpeed data parallel when > 1); null = resources.workers.")
    extra: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(
        default_factory=dict, description="Any other dotted trial key and its values.")


# The default of a field that may be left out but not given as null: not validated, so None is safe; typed Any to say so
NOT_GIVEN: Any = None


class Combination(BaseModel):
    """An include item or exclude pattern: axis values (typed as the grid's) and values of grid.extra keys."""

    model_config = ConfigDict(extra="allow")

    # None defaults mean "not given" (include: the grid's first value; exclude: any); a given null is refused
    algorithm: AlgorithmName = NOT_GIVEN
    teacher_set: str | None = None  # null: no teachers (an algorithm without teachers)
    student: str = NOT_GIVEN
    warmup: float = Field(NOT_GIVEN, ge=0)
    noise: str = NOT_GIVEN
    seed: int = Field(NOT_GIVEN, ge=0)
    workers: int = Field(NOT_GIVEN, ge=1)

    def axes(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)


class ResourceSpec(_Section):
    cpus: float = Field(1.0, gt=0, description="CPUs per trial worker.")
    gpus: float = Field(0.0, ge=0, description="GPUs per trial worker.")
    workers: int = Field(1, ge=1, description="Data-parallel workers per trial (Ray Train when > 1); the grid's "
                         "workers axis overrides it per trial.")


class SweepSpec(_Section):
    name: str = Field(..., pattern=NAME, description="Sweep name: MLflow parent run, Ray experiment folder.")
    base: dict[str, Any] | str = Field(default_factory=dict, description="Base trial config: a mapping, or a trial "
                                       "YAML path relative to the spec file.")
    teachers: dict[str, TeacherRecipe] = Field(default_factory=dict, description="Teachers by name.")
    teacher_sets: dict[str, list[str]] = Field(default_factory=dict, description="Named lists of teacher names.")
    students: dict[str, StudentConfig] = Field(..., min_length=1, description="Students by name.")
    noise: dict[str, NoiseConfig] = Field(default_factory=lambda: {"off": NoiseConfig()},
                                          description="Named noise settings.")
    grid: GridSpec = Field(default_factory=GridSpec, description="The axes.")
    include: list[Combination] = Field(default_factory=list, description="Extra combinations (axis: value).")
    exclude: list[Combination] = Field(default_factory=list, description="Combinations to drop; a partial "
                                          "mapping drops every combination that matches it.")
    resources: ResourceSpec = Field(default_factory=ResourceSpec, description="Resources per trial.")
    max_concurrent_trials: int | None = Field(None, ge=1, description="Trials at once; null = as resources allow.")
    max_failures: int = Field(1, ge=0, description="Retries of a failed trial (from its last checkpoint).")
    storage_path: str = Field("runs/sweeps", min_length=1, description="Sweep results, checkpoints and the teacher "
                              "cache: a local folder; on a cluster a folder every node mounts (NFS, EFS...).")
    search: SearchSpec | None = Field(None, description="Search each cell's values of some trial keys first "
                                      "(launcher/search.py); null runs the grid as given.")
    confirm: ConfirmSpec | None = Field(None, description="The seeds each cell's chosen values run on; null = "
                                        "grid.seed. Needs search.")

    @field_validator("storage_path")
    @classmethod
    def _local_folder(cls, storage_path: str) -> str:
        return refuse_storage_uri(storage_path)

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        for section in ("teachers", "teacher_sets", "students", "noise"):
            check_names(section, getattr(self, section))
        self._check_teacher_sets()
        self._check_grid()
        self._check_combinations()
        check_search(self)
        return self

    def _check_teacher_sets(self) -> None:
        for set_name, members in self.teacher_sets.items():
            unknown = [m for m in members if m not in self.teachers]
            if unknown or not members:
                raise ValueError(f"teacher_sets.{set_name}: unknown teachers {unknown} (defined: "
                                 f"{', '.join(self.teachers)})" if unknown else f"teacher_sets.{set_name}: empty")
            check_no_repeats(f"teacher_sets.{set_name}", members)

    def _check_grid(self) -> None:
        for axis in AXES:
            check_no_repeats(f"grid.{axis}", getattr(self.grid, axis) or [])
        check_extra_axes(self.grid.extra, AXES)
        for axis, names, defined in (("teacher_set", self.grid.teacher_set, self.teacher_sets),
                                     ("student", self.grid.student, self.students),
                                     ("noise", self.grid.noise, self.noise)):
            unknown = [n for n in names or [] if n not in defined]
            if unknown:
                raise ValueError(f"grid.{axis}: unknown names {unknown} (defined: {', '.join(defined)})")
        distilling = [a for a in self.grid.algorithm if a in registry.distilling()]
        if distilling and not self.teacher_sets:
            raise ValueError(f"teacher_sets: the grid's {', '.join(distilling)} distil from teachers; define at "
                             "least one teacher set")

    def _check_combinations(self) -> None:
        for kind, combos in (("include", self.include), ("exclude", self.exclude)):
            for i, item in enumerate(combos):
                unknown = [k for k in item.axes() if k not in AXES and k not in self.grid.extra]
                if unknown:
                    raise ValueError(f"{kind}.{i}: unknown axes {unknown} (axes: {', '.join(AXES)}, and the keys "
                                     "of grid.extra)")
        defined: dict[str, dict[str, Any]] = {"teacher_set": self.teacher_sets, "student": self.students,
                                              "noise": dict.fromkeys([*self.noise, _off_name(self)])}
        for i, combo in enumerate(c.axes() for c in self.include):
            for axis, names in defined.items():
                if combo.get(axis) is not None and combo[axis] not in names:
                    raise ValueError(f"include.{i}.{axis}: {combo[axis]!r} is not defined (defined: "
                                     f"{', '.join(names)})")
            for key in [k for k in combo if k not in AXES]:
                check_folder_part(f"include.{i}.{key}", combo[key])


@dataclass
class Plan:
    spec: SweepSpec
    teacher_trials: dict[str, Trial]  # trial id -> a teacher's fine-tuning (recipes with finetune only), per task
    trials: list[Trial]  # with a search: the confirm trials, their searched keys at the base's values until chosen
    dropped: list[tuple[dict[str, Any], str]]  # (combination, reason)
    search: SearchPlan | None = None

    @property
    def config_hash(self) -> str:
        searched = self.search.trials if self.search else []
        payload = [t.config.model_dump(mode="json") for t in [*self.teacher_trials.values(), *searched, *self.trials]]
        return digest(payload)


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> tuple[SweepSpec, dict[str, Any]]:
    """Read a sweep spec, apply dotted ``KEY=VALUE`` overrides (as for trial configs: values are YAML, e.g.
    ``base.optim.max_steps=4``, ``grid.seed=[1]``), validate; return it with its resolved base trial mapping.

    Overrides change the spec before validation, so they reach the trial configs and the plan's config hash.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec not found: {path}")
    raw = read_yaml(path) or {}
    if overrides:
        raw = _overridden(raw, path, overrides)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        lines = [_error_line(e) for e in err.errors()]
        joined = f" {lines[0]}" if len(lines) == 1 else "\n  " + "\n  ".join(lines)
        raise ConfigError(f"invalid sweep spec {path}:{joined}") from None
    base = _read_base(path, spec.base) if isinstance(spec.base, str) else spec.base
    return spec, base


def _overridden(raw: Any, path: Path, overrides: Sequence[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of spec keys, got {type(raw).__name__}")
    # base.* keys address the base trial config, also when the spec names it by file
    if isinstance(raw.get("base"), str) and any(item.strip().startswith("base.") for item in overrides):
        raw = {**raw, "base": _read_base(path, raw["base"])}
    return apply_overrides(raw, list(overrides))


def _read_base(spec_path: Path, base: str) -> dict[str, Any]:
    base_path = (spec_path.parent / base).resolve()
    if not base_path.is_file():
        raise ConfigError(f"base: trial config {base_path} not found")
    return read_yaml(base_path) or {}


def _error_line(error: ErrorDetails) -> str:
    key = ".".join(map(str, error["loc"]))
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error" and not key:
        return message  # the spec's own checks name their key in the message
    if error["type"] in ("missing", "extra_forbidden"):
        return f"{key}: {message}"
    value = repr(error["input"])
    return f"{key or '<root>'}: {message} (got {value if len(value) <= 80 else value[:77] + '...'})"


def expand(spec: SweepSpec, base: dict[str, Any]) -> Plan:
    """Every trial of the grid, validated; teacher fine-tuning trials first.

    Local paths become absolute: Tune runs each trial in its own working folder, and on a cluster only absolute
    paths on shared storage mean the same thing on every node.
    """
    spec = spec.model_copy(update={"storage_path": absolute(spec.storage_path, must_exist=False)})
    storage = Path(spec.storage_path)
    check_storage(storage)
    base = apply_overrides(base, [])
    if base.get("data", {}).get("path"):
        base["data"]["path"] = absolute(base["data"]["path"])
    g = spec.grid
    # a finetune-only spec needs no teacher set: its one teacher_set value is none
    axes_values: dict[str, list[Any]] = {
        "algorithm": g.algorithm, "teacher_set": g.teacher_set or list(spec.teacher_sets) or [None],
        "student": g.student or list(spec.students), "warmup": g.warmup,
        "noise": g.noise or [_off_name(spec)], "seed": g.seed,
        "workers": g.workers or [spec.resources.workers], **g.extra}
    grid = [dict(zip(axes_values, values)) for values in itertools.product(*axes_values.values())]
    included = [c for c in (item.axes() for item in spec.include) if c not in grid]
    patterns = [item.axes() for item in spec.exclude]
    matched: set[int] = set()
    kept: list[dict[str, Any]] = []
    dropped: list[tuple[dict[str, Any], str]] = []
    for given, explicit in [(c, False) for c in grid] + [(c, True) for c in included]:
        combo = _normalise({**{axis: values[0] for axis, values in axes_values.items()}, **given}, spec)
        # an explicit include wins over exclude patterns
        hits = [] if explicit else [i for i, pattern in enumerate(patterns) if _matches(combo, pattern)]
        matched.update(hits)
        if hits:
            dropped.append((combo, f"excluded by {patterns[hits[0]]}"))
        else:
            kept.append(combo)
    teacher_trials = {t.id: t for t in (teacher_trial(name, recipe, variant, base, storage, spec.resources.workers)
                                        for variant in dict.fromkeys(map(teacher_variant, kept))
                                        for name, recipe in spec.teachers.items() if recipe.finetune)}
    warn_unmatched_excludes(patterns, matched)
    if not kept:
        raise ConfigError(f"exclude: drops all {len(dropped)} combinations of the grid; the sweep would run no trial")
    search, built = plan_search(spec, kept, partial(_trial, spec=spec, base=base, teacher_trials=teacher_trials)) \
        if spec.search else (None, [_trial(combo, spec, base, teacher_trials) for combo in kept])
    trials: dict[str, Trial] = {}
    for trial in built:
        _add(trials, trial)
    searched = search.trials if search else []
    check_outputs_inside(storage, {t.id: t.config.output.dir
                                   for t in [*teacher_trials.values(), *searched, *trials.values()]})
    return Plan(spec, teacher_trials, list(trials.values()), dropped, search)


def _add(trials: dict[str, Trial], trial: Trial) -> None:
    earlier = trials.setdefault(trial.id, trial)
    # the same id with the same config: a rule collapsed the combination onto an earlier one
    if earlier.config != trial.config:
        axis = next(k for k in trial.axes if trial.axes[k] != earlier.axes.get(k))
        raise ConfigError(f"grid.{axis if axis in AXES else 'extra.' + axis}: {earlier.axes[axis]!r} and "
                          f"{trial.axes[axis]!r} make the same trial id {trial.id!r} but different configs; give "
                          "values that differ in the trial id (warm-up shows 6 significant digits)")


def _normalise(combo: dict[str, Any], spec: SweepSpec) -> dict[str, Any]:
    """Apply the rules that make combinations meaningful (an algorithm without teachers: no teacher set, no warm-up,
    no noise). Axes an include item leaves out take the grid's first value."""
    combo = dict(combo)
    if registry.get(combo["algorithm"]).teachers == "none":
        combo.update(teacher_set=None, warmup=0.0, noise=_off_name(spec))
    return combo


def _off_name(spec: SweepSpec) -> str:
    """The name of the spec's no-noise setting ('off' when it defines none)."""
    return next((n for n, cfg in spec.noise.items() if cfg == NoiseConfig()), "off")


def _matches(combo: dict[str, Any], pattern: dict[str, Any]) -> bool:
    return all(combo.get(k) == v for k, v in pattern.items())


def _trial(combo: dict[str, Any], spec: SweepSpec, base: dict[str, Any], teacher_trials: dict[str, Trial],
           searched: dict[str, Any] | None = None, tid: str | None = None) -> Trial:
    """The combination's trial; a search trial has its drawn values (``searched``) and its own id."""
    tid = tid or trial_id(combo)
    members = spec.teacher_sets[combo["teacher_set"]] if combo.get("teacher_set") else []
    raw = apply_overrides(base, [])
    raw.update(algorithm=combo["algorithm"], seed=combo["seed"])
    raw["student"] = spec.students[combo["student"]].model_dump(exclude_none=True)
    raw["student"]["name"] = absolute(raw["student"]["name"])
    raw["teachers"] = [teacher_model(name, spec.teachers[name], teacher_trials, teacher_variant(combo))
                       for name in members]
    raw["warmup"] = {"epochs": combo["warmup"]}
    raw["noise"] = spec.noise.get(combo["noise"], NoiseConfig()).model_dump()
    values = {**{k: v for k, v in combo.items() if k not in AXES}, **(searched or {})}
    raw = apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in values.items()])
    raw.setdefault("output", {})["dir"] = str(Path(spec.storage_path) / spec.name / "trials" / tid)
    raw.setdefault("data", {}).setdefault("token_cache", token_cache_dir(spec.storage_path))
    raw["data"].setdefault("logit_cache", str(Path(spec.storage_path) / "teacher_logits"))
    config = validated(raw, tid)
    check_trial_workers(config, combo["workers"], tid)
    return Trial(tid, combo, config, members, combo["workers"])


