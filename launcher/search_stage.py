"""The search stage of a sweep with a search section (launcher/search.py), between its teachers and its trials.

Per cell: an MLflow cell run under the sweep's parent (role ``cell``) and the cell's search trials nested under it,
run as one Tune run, so that ASHA, when the spec asks for it, compares a cell's samples only with each other. A trial
ASHA stops is no failure: its run ends FINISHED, tagged ``metadistil.stopped_early``, with the scores of its last
evaluation. The cell's best search trial by the best value of the search metric so far (logged at every evaluation,
so a stopped trial has it) gives the values of the cell's confirm trials, recorded on the cell run as params
``chosen.<key>`` and the tag ``metadistil.chosen_trial``. A ``--resume`` finds the finished search trials under their
cell run, reruns the others and chooses again from the runs' metrics.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher import runs
from launcher.identity import RUN_NAME, SWEEP, TRIAL_ID, TrialIdentity
from launcher.search import Cell, SearchSpec, with_values
from launcher.spec import Plan, Trial
from launcher.tracking import client as mlflow_client
from launcher.tracking import experiment_id, param_values

CELL_ID, CHOSEN_TRIAL = "metadistil.cell_id", "metadistil.chosen_trial"
STOPPED_EARLY = "metadistil.stopped_early"
PARENT = "mlflow.parentRunId"
# ASHA stops every trial at max_t iterations (one per evaluation); a search trial ends by itself, so it must not bind
_ASHA_MAX_T = 1_000_000

# run_stage(stage, trials, common, scheduler=...) -> {trial id: error}: the driver's Tune stage
RunStage = Callable[..., dict[str, str]]


@dataclass
class SearchOutcome:
    confirm: list[Trial] = field(default_factory=list)  # with their cells' chosen values
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished before this --resume
    failed: dict[str, str] = field(default_factory=dict)  # search trial or cell id -> error
    replaced: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)  # stopped early by ASHA
    chosen: dict[str, str] = field(default_factory=dict)  # cell id -> its chosen search trial


def run_search(plan: Plan, common: dict[str, Any], resume: bool, run_stage: RunStage) -> SearchOutcome:
    assert plan.search is not None, "run_search is for a plan with a search"
    out = SearchOutcome()
    uri, experiment = common["uri"], common["experiment"]
    client = mlflow_client(uri)
    exp = experiment_id(client, experiment)
    for cell in plan.search.cells:
        if not cell.trials:  # its algorithm reads no searched key: its confirm trials are its trials as given
            out.confirm += cell.confirm
            continue
        cell_run = _cell_run(client, exp, plan, cell, common["parent"])
        done, replaced = runs.reconcile_trials(uri, experiment, cell_run, {t.id: t.config for t in cell.trials}) \
            if resume else (set(), [])
        pending = [t for t in cell.trials if t.id not in done]
        failed = run_stage(f"search-{cell.id}", pending, {**common, "parent": cell_run},
                           scheduler=_scheduler(plan.search.spec, cell.metric))
        out.stopped += end_stopped(client, _children(client, exp, cell_run), [t for t in pending if t.id not in failed])
        out.ran += [t.id for t in pending if t.id not in failed]
        out.skipped += sorted(done)
        out.failed.update(failed)
        out.replaced += replaced
        children = _children(client, exp, cell_run)
        index = best_sample(cell, children)
        if index is None:
            out.failed[cell.id] = f"no search trial of the cell has {cell.ranked_by}; its confirm trials did not run"
            client.set_terminated(cell_run, "FAILED")
            continue
        record_choice(client, exp, plan, cell, cell_run, index, children, common["parent"])
        out.chosen[cell.id] = cell.trials[index].id
        out.confirm += [with_values(t, cell.samples[index]) for t in cell.confirm]
    return out


def _scheduler(search: SearchSpec, metric: str):
    if search.scheduler is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", metric=metric, mode="max", max_t=_ASHA_MAX_T,
                         grace_period=search.scheduler.grace_period,
                         reduction_factor=search.scheduler.reduction_factor)


def _cell_tags(plan: Plan, cell: Cell, parent: str) -> dict[str, str]:
    identity = TrialIdentity.of_trial(plan, cell.trials[0])
    tags = {k: v for k, v in identity.to_tags().items() if k not in (TRIAL_ID, "seed")}
    return {**tags, runs.ROLE: "cell", CELL_ID: cell.id, SWEEP: plan.spec.name, RUN_NAME: identity.cell_name(),
            PARENT: parent, **runs.source_tags()}


def _cell_run(client, exp: str, plan: Plan, cell: Cell, parent: str) -> str:
    """The cell's run under the sweep's parent: the one a resumed sweep logged before, else a new one."""
    found = client.search_runs([exp], f"tags.`{PARENT}` = '{parent}' and tags.`{CELL_ID}` = '{cell.id}'",
                               max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    tags = _cell_tags(plan, cell, parent)
    return client.create_run(exp, run_name=tags[RUN_NAME], tags=tags).info.run_id


def _children(client, exp: str, cell_run: str) -> list:
    return client.search_runs([exp], f"tags.`{PARENT}` = '{cell_run}'", max_results=10_000)


def end_stopped(client, children: list, trials: list[Trial]) -> list[str]:
    """End the runs of trials that Tune ended without an error but that did not finish: ASHA stopped them. Tune ends
    such a trial's thread with SystemExit at its next report (its run then reads FAILED), or with its process (the
    run still reads RUNNING). Their checkpoints go: a finished search trial is never continued."""
    by_id = {r.data.tags.get(TRIAL_ID): r for r in children}
    stopped = []
    for trial in trials:
        run = by_id.get(trial.id)
        if run is None or run.info.status == "FINISHED":
            continue
        client.set_tag(run.info.run_id, STOPPED_EARLY, "true")
        if "error" in run.data.tags:
            client.delete_tag(run.info.run_id, "error")
        client.set_terminated(run.info.run_id, "FINISHED")
        shutil.rmtree(Path(trial.config.output.dir) / "checkpoint", ignore_errors=True)
        stopped.append(trial.id)
    return stopped


def best_sample(cell: Cell, children: list) -> int | None:
    """The index of the cell's best finished search trial by ``cell.ranked_by`` (the first sample of a tie)."""
    index = {t.id: i for i, t in enumerate(cell.trials)}
    scored = [(r.data.metrics[cell.ranked_by], -index[r.data.tags[TRIAL_ID]]) for r in children
              if r.data.tags.get(TRIAL_ID) in index and r.info.status == "FINISHED"
              and cell.ranked_by in r.data.metrics]
    return -max(scored)[1] if scored else None


def record_choice(client, exp: str, plan: Plan, cell: Cell, cell_run: str, index: int, children: list,
                  parent: str) -> str:
    """The choice on the cell run: params ``chosen.<key>``, the tag naming the chosen search trial, its score.

    MLflow params cannot change: when a resume chooses differently (a search trial that failed before finished
    better, or the search's configs changed), the cell run gives way to a new one that takes over its search runs
    (the old one is deleted, restorable with ``mlflow runs restore``). Returns the cell run that holds the choice.
    """
    chosen = param_values({f"chosen.{k}": v for k, v in cell.samples[index].items()})
    logged = {k: v for k, v in client.get_run(cell_run).data.params.items() if k.startswith("chosen.")}
    if logged and logged != chosen:
        old, tags = cell_run, _cell_tags(plan, cell, parent)
        cell_run = client.create_run(exp, run_name=tags[RUN_NAME], tags=tags).info.run_id
        for run in children:
            client.set_tag(run.info.run_id, PARENT, cell_run)
        client.set_tag(old, "metadistil.replaced", "a --resume chose other values for the cell")
        client.delete_run(old)
    if logged != chosen:
        for key, value in chosen.items():
            client.log_param(cell_run, key, value)
    best = next(r for r in children if r.data.tags.get(TRIAL_ID) == cell.trials[index].id)
    client.set_tag(cell_run, CHOSEN_TRIAL, cell.trials[index].id)
    client.log_metric(cell_run, cell.ranked_by, best.data.metrics[cell.ranked_by])
    client.set_terminated(cell_run, "FINISHED")
    return cell_run
