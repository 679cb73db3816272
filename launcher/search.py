"""Search, then confirm: a sweep spec's ``search`` draws values of trial keys for each cell of the grid (a grid
combination without its seed), and ``confirm`` runs each cell with its best draw on several seeds.

The spec side lives here: the distributions and their checks, the seeded draws and the plan of each cell (its search
trials, and its confirm trials, whose searched keys wait on the search). ``launcher.search_stage`` runs them.

Draws are seeded by the spec's name, the cell and the sample's index (and the key), so ``--dry-run``, the run and a
``--resume`` see the same values, and adding a key to the space leaves the other keys' draws as they were.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from launcher.identity import cell_id
from launcher.spec_checks import check_no_repeats
from launcher.teachers import TEACHER_DATA
from trainer import registry
from trainer.config import AlgorithmName, ConfigError, TrialConfig, digest, parse_config
from trainer.overrides import apply_overrides
from trainer.tasks import TASKS, main_metric

if TYPE_CHECKING:
    from launcher.spec import Plan, SweepSpec, Trial

FORMS = ("loguniform(a, b) with 0 < a < b, uniform(a, b) with a < b, choice(v1, v2, ...), or randint(a, b) with "
         "integers a < b (both ends included)")
_CALL = re.compile(r"^\s*([a-z]+)\s*\((.*)\)\s*$", re.DOTALL)
# Keys the sweep itself sets (axes, teacher sets, students, where a trial writes): a search over one would fight them
_SPEC_OWNED = ("seed", "algorithm", "teachers", "student", "output", "tracking")
# The sections an algorithm reads only when it distils (warm-up and noise apply to distillation, as the grid's rules
# say), or only when it trains its teachers through a quiz (MetaDistil's meta step): a searched key of such a section
# is drawn only for the algorithms that read it.
_SECTION_USERS: dict[str, Callable[[str], bool]] = {
    "distill": lambda a: registry.get(a).teachers != "none",
    "warmup": lambda a: registry.get(a).teachers != "none",
    "noise": lambda a: registry.get(a).teachers != "none",
    "metadistil": lambda a: registry.get(a).teachers == "trainable" or registry.get(a).quiz,
}


@dataclass(frozen=True)
class Distribution:
    kind: str
    args: tuple[Any, ...]

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(f'{a:g}' if isinstance(a, float) else str(a) for a in self.args)})"

    def draw(self, rng: np.random.Generator) -> Any:
        low, high = self.args[0], self.args[-1]
        if self.kind == "choice":
            return self.args[int(rng.integers(len(self.args)))]
        if self.kind == "randint":
            return int(rng.integers(low, high, endpoint=True))
        value = math.exp(rng.uniform(math.log(low), math.log(high))) if self.kind == "loguniform" else \
            rng.uniform(low, high)
        # 4 significant digits: finer than any search needs, and the values read well in params and the dry run
        return min(max(float(f"{value:.4g}"), low), high)

    def extremes(self) -> tuple[Any, ...]:
        """The values a trial config must accept for every draw to be valid: the ends of a range, each choice."""
        return self.args if self.kind == "choice" else (self.args[0], self.args[-1])


def parse_distribution(text: Any) -> Distribution:
    """``loguniform(1e-5, 1e-3)`` and the other ``FORMS``; a ValueError saying what is allowed otherwise."""
    found = _CALL.match(text) if isinstance(text, str) else None
    if not found or found[1] not in ("loguniform", "uniform", "choice", "randint"):
        raise ValueError(f"{text!r} is not a distribution; allowed: {FORMS}")
    kind, args = found[1], tuple(_value(a) for a in found[2].split(",")) if found[2].strip() else ()
    numbers = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    wrong = {
        "loguniform": len(args) != 2 or not numbers or not 0 < args[0] < args[1],
        "uniform": len(args) != 2 or not numbers or not args[0] < args[1],
        "randint": len(args) != 2 or not all(type(a) is int for a in args) or not args[0] < args[1],
        "choice": not args or any(isinstance(a, (list, dict)) or a is None for a in args),
    }[kind]
    if wrong:
        raise ValueError(f"{text!r} is not a valid {kind}; allowed: {FORMS}")
    if kind == "choice":
        check_no_repeats(text, list(args))
    return Distribution(kind, tuple(float(a) for a in args) if kind in ("loguniform", "uniform") else args)


def _value(text: str) -> Any:
    # YAML reads 1e-5 (no dot) as text: a number is meant
    value = yaml.safe_load(text.strip()) if text.strip() else None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpaceEntry(_Section):
    algorithms: list[AlgorithmName] = Field(..., min_length=1, description="Search the key for these algorithms "
                                            "only (of those that read it).")
    dist: str = Field(..., description=f"The distribution: {FORMS}.")


class SchedulerSpec(_Section):
    type: Literal["asha"] = Field(..., description="asha: Ray Tune's ASHAScheduler, per cell, on training "
                                  "iterations (one per evaluation).")
    grace_period: int = Field(1, ge=1, description="Evaluations every search trial gets before it can be stopped.")
    reduction_factor: float = Field(2, gt=1, description="At each rung, the best 1/reduction_factor continue.")


class SearchSpec(_Section):
    # entries are read by distributions(), which names the key in one line (a union's errors would be two)
    space: dict[str, Any] = Field(..., min_length=1, description="Dotted trial key -> distribution (or {algorithms, "
                                  "dist}).")
    num_samples: int = Field(..., ge=1, description="Search trials per cell.")
    metric: str | None = Field(None, description="What ASHA and the choice rank by: val_<m> or best_val_<m>; null "
                               "= val_<the task's main metric>. Higher is better.")
    scheduler: SchedulerSpec | None = Field(None, description="null: every sample runs to its end.")

    def distributions(self) -> dict[str, tuple[Distribution, tuple[str, ...] | None]]:
        """key -> (distribution, the algorithms it is restricted to, or None), checked; ValueError naming the key."""
        parsed = {}
        for key, entry in self.space.items():
            where = f"search.space.{key}"
            problem = _key_problem(key)
            if problem:
                raise ValueError(f"{where}: {problem}")
            try:
                given = SpaceEntry.model_validate(entry) if isinstance(entry, dict) else None
                dist = parse_distribution(given.dist if given else entry)
            except ValidationError as err:
                first = err.errors()[0]
                message = first["msg"].removeprefix("Value error, ")
                raise ValueError(f"{where}.{'.'.join(map(str, first['loc']))}: {message} (a restricted key is "
                                 "{algorithms: [...], dist: ...})") from None
            except (ValueError, ConfigError) as err:
                raise ValueError(f"{where}: {err}") from None
            algorithms = tuple(given.algorithms) if given else None
            unread = [a for a in algorithms or () if not _reads(a, key)]
            if unread:
                raise ValueError(f"{where}: {', '.join(unread)} does not read {key.partition('.')[0]}.* keys; "
                                 f"give algorithms that do")
            parsed[key] = (dist, algorithms)
        return parsed


class ConfirmSpec(_Section):
    seeds: list[Annotated[int, Field(ge=0)]] = Field(..., min_length=1, description="The seeds each cell's chosen "
                                                     "values run on.")


def check_search(spec: SweepSpec) -> None:
    """The spec's search and confirm sections beyond their types (for SweepSpec's validator)."""
    if spec.confirm is not None and spec.search is None:
        raise ValueError("confirm: needs a search section (it runs the values a search chose); add search or remove "
                         "confirm")
    if spec.search is None:
        return

    space = spec.search.distributions()
    both = [k for k in space if k in spec.grid.extra]
    if both:
        raise ValueError(f"search.space.{both[0]}: is a grid.extra axis too; give it in one place")
    # the teachers a sweep fine-tunes are fine-tuned per value of these, which a draw cannot ask for
    data = [k for k in space if k in TEACHER_DATA]
    if data:
        raise ValueError(f"search.space.{data[0]}: says which data the cell's teachers learn; give it as a grid.extra "
                         "axis")
    if spec.confirm:
        check_no_repeats("confirm.seeds", spec.confirm.seeds)


def _key_problem(key: str) -> str | None:
    """Why ``key`` is not a key a search can vary (None when it is one)."""
    parts = key.split(".")
    if parts[0] in _SPEC_OWNED:
        return f"{parts[0]} is set by the sweep spec (grid axes, teacher sets, students, outputs), not by a search"
    model: type[BaseModel] = TrialConfig
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:depth]) or "the top level"
            return f"unknown trial key (keys of {where}: {', '.join(fields)})"
        annotation = fields[part].annotation
        section = next((c for c in (annotation, *get_args(annotation))
                        if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if section is None and depth < len(parts) - 1:
            return f"unknown trial key ({'.'.join(parts[:depth + 1])} is a value, not a section)"
        if section is not None and depth == len(parts) - 1:
            return f"is a section; search one of its keys ({', '.join(section.model_fields)})"
        if section is not None:
            model = section
    return None


def _reads(algorithm: str, key: str) -> bool:
    users = _SECTION_USERS.get(key.partition(".")[0])
    return users is None or users(algorithm)


# ---------------------------------------------------------------------------------------------------------- plan

@dataclass
class Cell:
    id: str
    metric: str  # what ASHA and the choice rank by (val_<m> or best_val_<m>)
    space: dict[str, Distribution]  # the keys searched for the cell's algorithm
    samples: list[dict[str, Any]]  # the draws, one per search trial
    trials: list[Trial]  # the search trials, in sample order (none when the cell's algorithm reads no searched key)
    confirm: list[Trial]  # one per confirm seed, with the base's values of the searched keys until the choice

    @property
    def ranked_by(self) -> str:
        """The MLflow metric a search trial is chosen by: the best value so far of the metric, logged at every
        evaluation (so a trial ASHA stopped has it too)."""
        return "best_val_" + self.metric.removeprefix("best_").removeprefix("val_")


@dataclass
class SearchPlan:
    spec: SearchSpec
    cells: list[Cell]

    @property
    def trials(self) -> list[Trial]:
        return [t for c in self.cells for t in c.trials]


def plan_search(spec: SweepSpec, combos: list[dict[str, Any]],
                build: Callable[..., Trial]) -> tuple[SearchPlan, list[Trial]]:
    """The search plan of the grid's kept combinations, and every confirm trial (the plan's trials).

    ``build(combo, searched=..., tid=...)`` is the spec's trial builder: a combination's trial with searched values
    set over the base. Each draw is validated as the trial config it makes, and each key's ends beforehand, so that a
    range the config refuses is named as the search's.
    """
    search = spec.search
    assert search is not None, "plan_search is for a spec with a search section"
    space = search.distributions()
    seeds = spec.confirm.seeds if spec.confirm else spec.grid.seed
    cells: dict[str, Cell] = {}
    for combo in combos:
        cid = cell_id(combo)
        if cid in cells:  # another seed of a cell
            continue
        start = {**combo, "seed": spec.grid.seed[0]}
        keys = {k: d for k, (d, only) in space.items() if _reads(combo["algorithm"], k) and
                (only is None or combo["algorithm"] in only)}
        _check_extremes(keys, start, cid, build)
        samples = [{k: d.draw(_rng(spec.name, cid, i, k)) for k, d in keys.items()}
                   for i in range(search.num_samples)] if keys else []
        trials = [_search_trial(build, start, values, f"{cid}__search{i}") for i, values in enumerate(samples)]
        confirm = [replace(build({**combo, "seed": seed}), phase="confirm") for seed in seeds]
        cells[cid] = Cell(cid, _metric(search.metric, confirm[0].config.data.task, cid), keys, samples, trials,
                          confirm)
    return SearchPlan(search, list(cells.values())), [t for c in cells.values() for t in c.confirm]


def _search_trial(build: Callable[..., Trial], combo: dict[str, Any], values: dict[str, Any], tid: str) -> Trial:
    try:
        return replace(build(combo, searched=values, tid=tid), phase="search")
    except ConfigError as err:  # keys whose ends pass alone, but not together (metadistil.update and meta_gradient)
        raise ConfigError(f"search.space: the draw {values} of {tid} makes an invalid trial: "
                          f"{str(err).removeprefix(f'trial {tid}: ')}") from None


def _rng(sweep: str, cell: str, index: int, key: str) -> np.random.Generator:
    return np.random.default_rng(int(digest([sweep, cell, index, key]), 16))


def _check_extremes(keys: dict[str, Distribution], combo: dict[str, Any], cid: str,
                    build: Callable[..., Trial]) -> None:
    for key, dist in keys.items():
        for value in dist.extremes():
            try:
                build(combo, searched={key: value}, tid=cid)
            except ConfigError as err:
                reason = str(err).removeprefix(f"trial {cid}: ")
                raise ConfigError(f"search.space.{key}: {dist} reaches {value!r}, which cell {cid} refuses: "
                                  f"{reason}") from None


def _metric(metric: str | None, task: str | None, cid: str) -> str:
    names = TASKS[task].metrics if task else ("accuracy",)
    allowed = [f"{kind}{m}" for kind in ("val_", "best_val_") for m in names]
    if metric is None:
        return f"val_{main_metric(task)}"
    if metric not in allowed:
        raise ConfigError(f"search.metric: the trials of cell {cid} (task {task or 'none'}) never report "
                          f"{metric!r}; allowed: {', '.join(allowed)}")
    return metric


def with_values(trial: Trial, values: dict[str, Any]) -> Trial:
    """A confirm trial with the values its cell's search chose."""
    raw = apply_overrides(trial.config.model_dump(mode="json"), [f"{k}={json.dumps(v)}" for k, v in values.items()])
    return replace(trial, config=parse_config(raw))


def format_search(plan: Plan) -> list[str]:
    """The dry run's search section: the space, the scheduler, the budget and each cell's draws."""
    search = plan.search
    assert search is not None
    s = search.spec
    n_search, n_confirm = len(search.trials), sum(len(c.confirm) for c in search.cells)
    scheduler = (f"asha per cell (grace_period {s.scheduler.grace_period}, reduction_factor "
                 f"{s.scheduler.reduction_factor:g})" if s.scheduler else "none (every sample runs to its end)")
    lines = [(f"search then confirm: {n_search} search trials + {n_confirm} confirm trials (their searched values "
             f"chosen by search) = {n_search + n_confirm} trials"),
             f"  num_samples {s.num_samples} per cell; scheduler {scheduler}", "  space:"]
    for key, (dist, only) in s.distributions().items():
        lines.append(f"    {key}: {dist}" + (f" (for {', '.join(only)})" if only else ""))
    for cell in search.cells:
        seed = cell.trials[0].config.seed if cell.trials else None
        lines.append(f"  cell {cell.id}: " + (f"{len(cell.trials)} search trials (seed {seed}, by {cell.metric})"
                                              if cell.trials else "no searched key; confirm only")
                     + f", confirm seeds {', '.join(str(t.config.seed) for t in cell.confirm)}")
        lines += [f"    search{i}: " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in values.items()) for i, values in enumerate(cell.samples)]
    return [*lines, "  confirm trials (each cell's searched keys chosen by search):"]
