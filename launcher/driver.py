"""The Ray Tune driver: teacher fine-tuning stage, then the grid's trials, each a nested MLflow run of the sweep.

Trials are Tune function trainables that call the trainer directly. A trial's outputs, its checkpoint and its
teacher-cache entry live under the sweep's storage path, so a retried trial (FailureConfig) or a resumed sweep
continues from the trial's last evaluation; ``--resume`` skips every trial whose MLflow run already FINISHED under
the sweep's parent run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import runs
from launcher.spec import Plan, Trial
from trainer.config import ConfigError, NoiseConfig, flatten


@dataclass
class SweepResult:
    parent_run_id: str
    tracking_uri: str
    finished: list[str]
    failed: dict[str, str]
    skipped: list[str]


def trial_tags(plan: Plan, trial: Trial) -> dict[str, str]:
    spec = plan.spec
    if trial.axes.get("stage") == "teacher":
        name = trial.axes["teacher"]
        return {runs.ROLE: "teacher", runs.TRIAL_ID: trial.id, "teacher": spec.teachers[name].label or name}
    axes = trial.axes
    noise = axes["noise"]
    tags = {runs.ROLE: "trial", runs.TRIAL_ID: trial.id, "algorithm": axes["algorithm"],
            "teacher_set": axes.get("teacher_set") or "none",
            "teachers": ",".join(spec.teachers[t].label or t for t in trial.teachers),
            "student": spec.students[axes["student"]].label or axes["student"],
            "warmup": f"{axes['warmup']:g}", "noise": "off" if spec.noise.get(noise, NoiseConfig()) == NoiseConfig() else noise,
            "seed": str(axes["seed"])}
    tags.update({k: str(v) for k, v in axes.items() if k not in tags and k not in ("teacher_set",)})
    return tags


def run_sweep(plan: Plan, resume: bool = False, verbose: int = 1) -> SweepResult:
    base_tracking = plan.trials[0].config.tracking if plan.trials else None
    uri = runs.resolve_uri(base_tracking.mlflow_uri if base_tracking else None)
    experiment = base_tracking.experiment if base_tracking else "metadistil"
    runs.check_reachable(uri)
    parent = runs.parent_run(uri, experiment, plan.spec.name, plan.config_hash, resume)
    done = runs.finished_trials(uri, experiment, parent) if resume else set()
    _init_ray()

    common = {"uri": uri, "experiment": experiment, "parent": parent}
    teachers = []
    for teacher in plan.teacher_trials.values():
        if teacher_cached(teacher):
            _log_cached_teacher(plan, teacher, common)
        elif teacher.id not in done:
            teachers.append(teacher)
    failed: dict[str, str] = {}
    failed.update(_run_stage(plan, "teachers", teachers, common, verbose))
    if failed:
        runs.end_parent(uri, parent, len(failed))
        raise RuntimeError(f"teacher fine-tuning failed, no student trial was started: {failed}")
    pending = [t for t in plan.trials if t.id not in done]
    failed.update(_run_stage(plan, "trials", pending, common, verbose))
    runs.end_parent(uri, parent, len(failed))
    ran = [t.id for t in [*teachers, *pending] if t.id not in failed]
    return SweepResult(parent, uri, ran, failed, sorted(done))


def teacher_cached(teacher: Trial) -> bool:
    """A teacher whose recipe (hence cache folder) was fine-tuned before, by this sweep or another."""
    out = Path(teacher.config.output.dir)
    return (out / "metrics.json").is_file() and (out / "student" / "config.json").is_file()


def _log_cached_teacher(plan: Plan, teacher: Trial, common: dict[str, Any]) -> None:
    """Reuse the cached checkpoint; the sweep still gets a teacher run (for the report) with the cached metrics."""
    from launcher.tracking import MLflowLogger

    if runs.child_run(common["uri"], common["experiment"], common["parent"], teacher.id):
        return
    metrics = json.loads((Path(teacher.config.output.dir) / "metrics.json").read_text())
    logger = MLflowLogger(common["uri"], common["experiment"], run_name=teacher.id, parent_run_id=common["parent"],
                          tags={**trial_tags(plan, teacher), "metadistil.cached": "true"})
    logger.log_params(flatten(teacher.config))
    logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=0)
    logger.finish("FINISHED")


def _init_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster needs no token
    ray.init(log_to_driver=True)  # joins RAY_ADDRESS (a cluster, or inside `ray job submit`) or starts a local Ray


def _run_stage(plan: Plan, stage: str, trials: list[Trial], common: dict[str, Any], verbose: int) -> dict[str, str]:
    """Run trials as one Tune grid; return {trial id: error} of those that failed after their retries."""
    if not trials:
        return {}
    from ray import tune

    spec = plan.spec
    if spec.resources.workers > 1:
        raise ConfigError("resources.workers: multi-worker (Ray Train) trials are not supported yet; use 1")
    # The grid varies only the trial id; the full configs travel once, through the object store.
    by_id = {t.id: {"id": t.id, "config": t.config.model_dump(mode="json"), "tags": trial_tags(plan, t), **common}
             for t in trials}
    resources = {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus}
    storage = spec.storage_path if "://" in spec.storage_path else str(Path(spec.storage_path).resolve())
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(tune_trial, params_by_id=by_id), resources),
        param_space={"trial_id": tune.grid_search(list(by_id))},
        tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent_trials,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=f"{spec.name}-{stage}", storage_path=storage, verbose=verbose,
                                  failure_config=tune.FailureConfig(max_failures=spec.max_failures)),
    )
    results = tuner.fit()
    return {r.config["trial_id"]: _root_cause(r.error) for r in results if r.error}


def _root_cause(error: BaseException) -> str:
    """The trial's own exception, not Ray's wrapper with its remote traceback."""
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}"[:2000]


def _trial_name(trial) -> str:
    return trial.config["trial_id"][:120]


def tune_trial(config: dict[str, Any], params_by_id: dict[str, dict[str, Any]]) -> None:
    """One Tune trial: the trainer, reporting each evaluation to Tune and everything to the trial's MLflow run."""
    from ray import tune

    from launcher.tracking import MLflowLogger
    from trainer.config import parse_config
    from trainer.loop import run_trial

    p = params_by_id[config["trial_id"]]
    cfg = parse_config(p["config"])
    existing = runs.child_run(p["uri"], p["experiment"], p["parent"], p["id"])
    logger = MLflowLogger(p["uri"], p["experiment"], run_name=p["id"], parent_run_id=p["parent"], tags=p["tags"],
                          run_id=existing)
    # The checkpoint lives with the trial's outputs (shared storage on a cluster): a retry on another node, or a
    # resumed sweep, continues from the last evaluation.
    result = run_trial(cfg, [logger], progress=False, checkpoint_dir=Path(cfg.output.dir) / "checkpoint",
                       on_eval=lambda step, metrics: tune.report({**metrics, "step": step}))
    tune.report({**result.metrics, "step": result.metrics["warmup_steps"] + result.metrics["train_steps"]})
