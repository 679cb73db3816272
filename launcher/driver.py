"""The Ray Tune driver: teacher fine-tuning stage, then the grid's trials, each a nested MLflow run of the sweep.

Trials are Tune function trainables that call the trainer directly. A trial's outputs, its checkpoint and its
teacher-cache entry live under the sweep's storage path, so a retried trial (FailureConfig) or a resumed sweep
continues from the trial's last evaluation; ``--resume`` continues the sweep's latest parent run and skips every
trial whose MLflow run under it already FINISHED with the trial's current config.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from launcher import runs
from launcher.identity import NODE, PHASE, RUN_NAME, SEP, TrialIdentity, of_plan, run_names
from launcher.spec import Plan, Trial
from launcher.spec_checks import prepare_storage
from launcher.tracking import local_store, resolve_tracking
from trainer.config import TrackingConfig, flatten
from trainer.tasks import main_metric
from trainer.tokenized import prepare_token_caches

# A multi-worker trial's own (Tune) process needs a non-zero CPU request; it is taken from its workers' share, so the
# trial fits in exactly workers x resources.cpus (else 2 workers x 1 CPU never fit on a 2-CPU node beside it).
DRIVER_CPU = 0.01
# The sweep's status table: a trial's axes, then what it reported (an evaluation, then its final metrics)
CONSOLE_COLUMNS = ("algorithm", "teachers", "student", "warmup", "noise", "seed", "task")


def console_metrics(trials: list[Trial]) -> dict[str, str]:
    """The status table's metric columns: each main metric of the trials' tasks (accuracy without a task)."""
    metrics = {main_metric(t.config.data.task): None for t in trials}
    short = {m: "acc" if m == "accuracy" else m for m in metrics}
    return {"step": "step", **{f"{kind}{m}": f"{kind.replace('_', ' ')}{short[m]}" for kind in
                               ("val_", "best_val_", "test_") for m in metrics}, "time_total_s": "time (s)"}


@dataclass
class SweepResult:
    parent_run_id: str
    tracking_uri: str
    finished: list[str]
    failed: dict[str, str]
    skipped: list[str]
    replaced: list[str] = field(default_factory=list)  # resumed trials whose earlier run had another config
    # registered model name -> (trial id, its version) of the best student: one, or one per task
    best: dict[str, tuple[str, str]] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds: startup, data preparation, training
    runs_view: str = ""  # where the MLflow UI shows the sweep's runs (runs.runs_view)
    stopped: list[str] = field(default_factory=list)  # search trials ASHA stopped early (also in finished)


def trial_tags(plan: Plan, trial: Trial) -> dict[str, str]:
    """The tags of a trial's MLflow run: its identity, its run name (short and unique in the sweep, so names of the
    whole plan are made together; a search trial's is its cell's and its sample), its phase in a sweep with a search,
    and MLflow's source tags."""
    identity = TrialIdentity.of_trial(plan, trial)
    names = run_names(of_plan(plan).values())
    name = names.get(trial.id) or f"{identity.cell_name()}{SEP}{trial.id.rpartition('__')[2]}"
    return {**identity.to_tags(), RUN_NAME: name, **({PHASE: trial.phase} if trial.phase else {}),
            **runs.source_tags()}


def run_sweep(plan: Plan, resume: bool = False, verbose: int = 1) -> SweepResult:
    clock = time.perf_counter()
    phases: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[f"sweep_{name}_s"] = now - clock
        clock = now

    base_tracking = plan.trials[0].config.tracking if plan.trials else TrackingConfig()
    tracking = resolve_tracking(base_tracking.mlflow_uri, base_tracking.experiment, local_store())
    prepare_storage(plan.spec.storage_path)  # an unwritable storage fails here, before any MLflow run and Ray
    uri, experiment = tracking.uri, tracking.experiment
    parent = runs.parent_run(uri, experiment, plan.spec.name, plan.config_hash, resume)
    everything = [*plan.teacher_trials.values(), *(plan.search.trials if plan.search else []), *plan.trials]
    # confirm trials have their configs once the search chose: reconciled then (search trials: under their cells)
    known = [*plan.teacher_trials.values(), *([] if plan.search else plan.trials)]
    done, replaced = runs.reconcile_trials(uri, experiment, parent, {t.id: t.config for t in known}) \
        if resume else (set(), [])
    _init_ray()
    lap("startup")
    prepare_token_caches([t.config for t in everything])
    lap("data_preparation")

    common = {"uri": uri, "experiment": experiment, "parent": parent}
    teachers = []
    for teacher in plan.teacher_trials.values():
        if teacher_cached(teacher):
            _log_cached_teacher(plan, teacher, common)
        elif teacher.id not in done:
            teachers.append(teacher)
    failed: dict[str, str] = {}
    failed.update(_run_stage(plan, "teachers", teachers, common, verbose))
    lap("teacher_training")
    if failed:
        runs.end_parent(uri, parent, len(failed), phases)
        raise RuntimeError(f"teacher fine-tuning failed, no student trial was started: {failed}")
    trials, searched = plan.trials, None
    if plan.search:
        from launcher.search_stage import run_search

        searched = run_search(plan, common, resume, partial(_run_stage, plan, verbose=verbose))
        failed.update(searched.failed)
        trials = searched.confirm
        if resume:
            confirmed, changed = runs.reconcile_trials(uri, experiment, parent, {t.id: t.config for t in trials})
            done, replaced = done | confirmed, replaced + changed
        lap("search")
    pending = [t for t in trials if t.id not in done]
    failed.update(_run_stage(plan, "trials", pending, common, verbose))
    lap("trial_training")
    best = _register_best_students(plan, uri, experiment, parent)
    runs.end_parent(uri, parent, len(failed), phases)
    ran = [t.id for t in teachers if t.id not in failed] + (searched.ran if searched else []) + \
        [t.id for t in pending if t.id not in failed]
    if searched:
        done, replaced = done | set(searched.skipped), sorted(replaced + searched.replaced)
    return SweepResult(parent, uri, ran, failed, sorted(done), replaced, best, phases, runs.runs_view(uri, parent),
                       searched.stopped if searched else [])


def _register_best_students(plan: Plan, uri: str, experiment: str, parent: str) -> dict[str, tuple[str, str]]:
    tasks = list(dict.fromkeys(t.config.data.task for t in plan.trials))
    best = {}
    for task in tasks:
        name = runs.best_model_name(plan.spec.name, task if len(tasks) > 1 else None)
        found = runs.register_best_student(uri, experiment, parent, plan.spec.name, task, name)
        if found:
            best[name] = found
    return best


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
    logger = MLflowLogger(common["uri"], common["experiment"], parent_run_id=common["parent"],
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


def _run_stage(plan: Plan, stage: str, trials: list[Trial], common: dict[str, Any], verbose: int,
               scheduler=None) -> dict[str, str]:
    """Run trials as one Tune grid (under ``scheduler``, e.g. a search's ASHA); return {trial id: error} of those that
    failed after their retries."""
    if not trials:
        return {}
    from ray import tune

    spec = plan.spec
    storage = str(Path(spec.storage_path).resolve())  # a local or mounted folder: spec loading refuses URIs
    # The grid varies only the trial id; the full configs travel once, through the object store.
    by_id = {t.id: {"id": t.id, "config": t.config.model_dump(mode="json"), "tags": trial_tags(plan, t),
                    "workers": t.workers, "cpus": spec.resources.cpus, "gpus": spec.resources.gpus,
                    "storage": storage, "sweep": spec.name, **common} for t in trials}

    def resources(config: dict[str, Any]) -> tune.PlacementGroupFactory:
        if by_id[config["trial_id"]]["workers"] > 1:
            # the trial only drives its Ray Train workers, which request the rest
            return tune.PlacementGroupFactory([{"CPU": DRIVER_CPU}])
        return tune.PlacementGroupFactory([{"CPU": spec.resources.cpus, "GPU": spec.resources.gpus}])

    # The trial's axes come along with its id (resolved from it, so the grid stays one value per trial) for the
    # status table's columns. Tune's newer console infers its columns and ignores a reporter; its classic one
    # (RAY_AIR_NEW_OUTPUT=0) shows the columns asked for.
    columns = {t.id: _console_columns(by_id[t.id]["tags"], t.config.data.task) for t in trials}
    axes = {c: tune.sample_from(partial(_column_of, columns, c)) for c in CONSOLE_COLUMNS}
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ctrl+C stops the sweep (KeyboardInterrupt; the CLI then stops its Ray), not only this stage, after which the
    # driver would carry on with the next stage and count the interrupted trials as run
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    reporter = tune.CLIReporter(parameter_columns=list(CONSOLE_COLUMNS), metric_columns=console_metrics(trials),
                                max_report_frequency=30, print_intermediate_tables=True)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(tune_trial, params_by_id=by_id), resources),
        param_space={"trial_id": tune.grid_search(list(by_id)), **axes},
        tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent_trials, scheduler=scheduler,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=f"{spec.name}-{stage}", storage_path=storage, verbose=verbose,
                                  progress_reporter=reporter,
                                  failure_config=tune.FailureConfig(max_failures=spec.max_failures)),
    )
    results = tuner.fit()
    # ResultGrid iterates through __getitem__, which Python accepts and mypy does not
    return {r.config["trial_id"]: _root_cause(r.error) for r in results if r.error}  # type: ignore[attr-defined]


def _column_of(columns: dict[str, dict[str, str]], column: str, config: dict[str, Any]) -> str:
    return columns[config["trial_id"]][column]


def _console_columns(tags: dict[str, str], task: str | None) -> dict[str, str]:
    """A trial's axes in the status table: its MLflow tags (a teacher's fine-tuning trains that teacher)."""
    shown = {**tags, "student": tags.get("student") or tags.get("teacher"), "task": task}
    return {column: shown.get(column) or "-" for column in CONSOLE_COLUMNS}


def _root_cause(error: BaseException) -> str:
    """The trial's own exception, not Ray's wrapper with its remote traceback."""
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}"[:2000]


def _trial_name(trial) -> str:
    return trial.config["trial_id"][:120]


def tune_trial(config: dict[str, Any], params_by_id: dict[str, dict[str, Any]]) -> None:
    """One Tune trial: the trainer, reporting each evaluation to Tune and everything to the trial's MLflow run.

    With several workers the trial builds a Ray Train ``TorchTrainer`` whose workers run the same trainer as DeepSpeed
    data parallel (gloo on CPU, NCCL on GPU); their reports reach Tune through ``TuneReportCallback``.
    """
    from ray import tune

    p = params_by_id[config["trial_id"]]
    if p["workers"] == 1:
        _run_worker(p, tune.report)
        return
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(
        _train_loop_per_worker, train_loop_config=p,
        scaling_config=ScalingConfig(num_workers=p["workers"], use_gpu=p["gpus"] > 0, resources_per_worker={
            "CPU": p["cpus"] - DRIVER_CPU / p["workers"], **({"GPU": p["gpus"]} if p["gpus"] else {})}),
        torch_config=TorchConfig(backend="nccl" if p["gpus"] > 0 else "gloo"),
        run_config=RunConfig(name=f"{p['sweep']}-workers-{p['id']}"[:200], storage_path=p["storage"],
                             # ray.train's RunConfig is Ray Train V2's at runtime; mypy reads the V1 one
                             callbacks=[TuneReportCallback()]),  # type: ignore[list-item]
    )
    trainer.fit()


def _train_loop_per_worker(p: dict[str, Any]) -> None:
    import ray.train

    _run_worker(p, ray.train.report, main=ray.train.get_context().get_world_rank() == 0)


def _run_worker(p: dict[str, Any], report, main: bool = True) -> None:
    """The trainer on one worker; only the first worker logs to MLflow (every worker reports, as Ray Train needs)."""
    import ray

    from launcher.tracking import MLflowLogger
    from trainer.config import parse_config
    from trainer.loop import run_trial

    cfg = parse_config(p["config"])
    loggers = []
    if main:
        existing = runs.child_run(p["uri"], p["experiment"], p["parent"], p["id"])
        # the run name comes with the tags (mlflow.runName), and renames a run that an older version named; the node
        # says where the trial ran (on a cluster, a retry may run elsewhere)
        tags = {**p["tags"], NODE: ray.get_runtime_context().get_node_id()}
        loggers.append(MLflowLogger(p["uri"], p["experiment"], parent_run_id=p["parent"], tags=tags,
                                    run_id=existing))
    # The checkpoint lives with the trial's outputs (shared storage on a cluster): a retry on another node, or a
    # resumed sweep, continues from the last evaluation.
    evaluated: dict[str, float] = {}

    def on_eval(step: int, metrics: dict[str, float]) -> None:
        evaluated.update(metrics)
        report({**metrics, "step": step})

    result = run_trial(cfg, loggers, progress=False, checkpoint_dir=Path(cfg.output.dir) / "checkpoint", name=p["id"],
                       on_eval=on_eval)
    # the last evaluation's val_* too: a scheduler's metric (a search's ASHA) must be in every report
    report({**evaluated, **result.metrics, "step": result.metrics["warmup_steps"] + result.metrics["train_steps"]})
