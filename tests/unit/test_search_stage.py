"""launcher.search_stage on a temporary SQLite MLflow store: ending the runs ASHA stopped, choosing a cell's best
search trial, recording the choice (also when a resume chooses differently), and Table 1 without the search runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launcher.identity import PHASE, ROLE, SWEEP, TRIAL_ID
from launcher.report import build_report
from launcher.search_stage import CHOSEN_TRIAL, STOPPED_EARLY, best_sample, end_stopped, record_choice
from launcher.spec import expand, load_spec
from launcher.tracking import param_values
from trainer.config import flatten

SPEC = {
    "name": "unit",
    "base": {"data": {"name": "synthetic", "train_size": 100, "quiz_size": 16, "validation_size": 20,
                      "test_size": 20}},
    "teachers": {"bert": {"checkpoint": "bert-base-uncased", "label": "BERT"}},
    "teacher_sets": {"bert": ["bert"]},
    "students": {"distil": {"name": "distilbert-base-uncased", "label": "DistilBERT"}},
    "grid": {"algorithm": ["kd"], "seed": [1]},
    "search": {"space": {"optim.lr": "loguniform(1e-5, 1e-3)"}, "num_samples": 3},
    "confirm": {"seeds": [1, 2]},
}


@pytest.fixture
def plan(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "storage_path": str(tmp_path / "storage")}))
    return expand(*load_spec(path))


@pytest.fixture
def store(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client, client.create_experiment("metadistil", (tmp_path / "artifacts").as_uri())


def run(store, tags, metrics=None, status="FINISHED", parent=None, params=None):
    from mlflow.entities import Metric, Param

    client, exp = store
    run_id = client.create_run(exp, tags={**tags, **({"mlflow.parentRunId": parent} if parent else {})}).info.run_id
    client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in (metrics or {}).items()])
    for start in range(0, len(params or {}), 100):  # a trial's config params, logged as its MLflowLogger does
        client.log_batch(run_id, params=[Param(k, v) for k, v in list((params or {}).items())[start:start + 100]])
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


def children(store, parent):
    client, exp = store
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")


def test_runs_asha_stopped_end_finished_and_their_checkpoints_go(plan, store):
    client, _ = store
    cell = plan.search.cells[0]
    cell_run = run(store, {ROLE: "cell"}, status="RUNNING")
    ids = [t.id for t in cell.trials]
    run(store, {TRIAL_ID: ids[0]}, {"best_val_accuracy": 0.7, "test_accuracy": 0.6}, parent=cell_run)
    killed = run(store, {TRIAL_ID: ids[1]}, {"best_val_accuracy": 0.8}, status="RUNNING", parent=cell_run)
    # Tune ends a stopped trial's thread with SystemExit at its next report: run_trial then marks the run FAILED
    exited = run(store, {TRIAL_ID: ids[2], "error": "SystemExit: 0"}, {"best_val_accuracy": 0.5}, status="FAILED",
                 parent=cell_run)
    checkpoint = Path(cell.trials[1].config.output.dir) / "checkpoint"
    checkpoint.mkdir(parents=True)
    assert end_stopped(client, children(store, cell_run), cell.trials) == ids[1:]
    for run_id in (killed, exited):
        ended = client.get_run(run_id)
        assert ended.info.status == "FINISHED" and ended.data.tags[STOPPED_EARLY] == "true"
        assert "error" not in ended.data.tags
    assert not checkpoint.exists()
    assert best_sample(cell, children(store, cell_run)) == 1  # a stopped trial competes with its last scores


def test_the_best_finished_search_trial_is_chosen_the_first_of_a_tie(plan, store):
    cell = plan.search.cells[0]
    cell_run = run(store, {ROLE: "cell"}, status="RUNNING")
    ids = [t.id for t in cell.trials]
    run(store, {TRIAL_ID: ids[0]}, {"best_val_accuracy": 0.6}, parent=cell_run)
    run(store, {TRIAL_ID: ids[1]}, {"best_val_accuracy": 0.6}, parent=cell_run)
    run(store, {TRIAL_ID: ids[2]}, {"best_val_accuracy": 0.9}, status="FAILED", parent=cell_run)
    run(store, {TRIAL_ID: "some__other__trial"}, {"best_val_accuracy": 1.0}, parent=cell_run)
    assert best_sample(cell, children(store, cell_run)) == 0
    assert best_sample(cell, []) is None


def test_the_choice_is_recorded_and_a_changed_choice_moves_to_a_new_cell_run(plan, store):
    client, exp = store
    cell = plan.search.cells[0]
    parent = run(store, {SWEEP: "unit", ROLE: "sweep"}, status="RUNNING")
    cell_run = run(store, {ROLE: "cell"}, status="RUNNING", parent=parent)
    ids = [t.id for t in cell.trials]
    searched = [run(store, {TRIAL_ID: t}, {"best_val_accuracy": v}, parent=cell_run) for t, v in zip(ids, (.5, .7, .6))]
    assert record_choice(client, exp, plan, cell, cell_run, 1, children(store, cell_run), parent) == cell_run
    recorded = client.get_run(cell_run)
    assert recorded.info.status == "FINISHED" and recorded.data.tags[CHOSEN_TRIAL] == ids[1]
    assert recorded.data.params == {"chosen.optim.lr": str(cell.samples[1]["optim.lr"])}
    assert recorded.data.metrics == {"best_val_accuracy": 0.7}
    # the same choice again (a resume): nothing changes
    assert record_choice(client, exp, plan, cell, cell_run, 1, children(store, cell_run), parent) == cell_run
    # a resume that chooses sample 2: params cannot change, so a new cell run takes over the search runs
    new = record_choice(client, exp, plan, cell, cell_run, 2, children(store, cell_run), parent)
    assert new != cell_run and client.get_run(cell_run).info.lifecycle_stage == "deleted"
    moved = client.get_run(new)
    assert moved.data.params == {"chosen.optim.lr": str(cell.samples[2]["optim.lr"])}
    assert moved.data.tags[CHOSEN_TRIAL] == ids[2] and moved.data.tags["mlflow.parentRunId"] == parent
    assert {r.info.run_id for r in children(store, new)} == set(searched)


def test_table_1_is_built_from_the_confirm_runs_only(store, tmp_path):
    parent = run(store, {SWEEP: "unit", ROLE: "sweep"})
    axes = {"algorithm": "kd", "teacher_set": "bert", "teachers": "BERT", "student": "DistilBERT", "warmup": "0",
            "noise": "off"}
    cell_run = run(store, {ROLE: "cell", **axes}, {"best_val_accuracy": 0.99}, parent=parent)
    for seed, score in ((1, 0.8), (2, 0.9)):
        run(store, {ROLE: "trial", PHASE: "confirm", TRIAL_ID: f"kd__bert__distil__w0__off__s{seed}", "seed": str(seed),
                    **axes}, {"test_accuracy": score}, parent=parent)
    # a search trial, even one read as a child of the sweep, never counts: its values were not the cell's choice
    run(store, {ROLE: "trial", PHASE: "search", TRIAL_ID: "kd__bert__distil__w0__off__search0", "seed": "1", **axes},
        {"test_accuracy": 0.1}, parent=parent)
    run(store, {ROLE: "trial", PHASE: "search", TRIAL_ID: "kd__bert__distil__w0__off__search1", "seed": "1", **axes},
        {"test_accuracy": 0.2}, parent=cell_run)
    report = build_report(f"sqlite:///{tmp_path / 'mlflow.db'}", "unit", tmp_path / "report", attach=False)
    (row,) = report.rows
    assert row["n_seeds"] == 2 and row["score_mean"] == pytest.approx(85.0) and row["by_seed"] == {1: 80.0, 2: 90.0}


def test_run_search_chooses_per_cell_and_a_resume_runs_nothing(plan, store, tmp_path):
    """The stage's bookkeeping without Ray: a fake Tune stage logs each search trial's run the way a trial does."""
    from launcher.search_stage import run_search

    client, _ = store
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = run(store, {SWEEP: "unit", ROLE: "sweep"}, status="RUNNING")
    calls = []

    def stage(name, trials, common, scheduler):
        calls.append((name, [t.id for t in trials], scheduler))
        for i, trial in enumerate(trials):  # sample 1 scores best, sample 2 is stopped early (left RUNNING)
            run(store, {TRIAL_ID: trial.id, ROLE: "trial", PHASE: "search"}, {"best_val_accuracy": (.5, .8, .6)[i]},
                status="RUNNING" if i == 2 else "FINISHED", parent=common["parent"],
                params=param_values(flatten(trial.config)))
        return {}

    common = {"uri": uri, "experiment": "metadistil", "parent": parent}
    (cell,) = plan.search.cells
    out = run_search(plan, common, resume=False, run_stage=stage)
    assert calls == [(f"search-{cell.id}", [t.id for t in cell.trials], None)]  # no scheduler asked for
    assert out.chosen == {cell.id: cell.trials[1].id} and out.stopped == [cell.trials[2].id]
    assert out.ran == [t.id for t in cell.trials] and out.failed == {}
    assert [(t.id, t.phase, t.config.seed, t.config.optim.lr) for t in out.confirm] == \
        [(f"{cell.id}__s{s}", "confirm", s, cell.samples[1]["optim.lr"]) for s in (1, 2)]
    (cell_run,) = client.search_runs([store[1]], f"tags.`{ROLE}` = 'cell'")
    assert cell_run.data.tags["mlflow.parentRunId"] == parent and cell_run.data.tags[CHOSEN_TRIAL] == cell.trials[1].id

    again = run_search(plan, common, resume=True, run_stage=stage)
    assert calls[-1] == (f"search-{cell.id}", [], None)  # every search trial finished: nothing to run
    assert again.chosen == out.chosen and sorted(again.skipped) == sorted(out.ran) and again.ran == []
    assert [t.config for t in again.confirm] == [t.config for t in out.confirm]
    assert len(client.search_runs([store[1]], f"tags.`{ROLE}` = 'cell'")) == 1


def test_a_cell_without_a_scored_search_trial_confirms_nothing(plan, store, tmp_path):
    from launcher.search_stage import run_search

    parent = run(store, {SWEEP: "unit", ROLE: "sweep"}, status="RUNNING")
    (cell,) = plan.search.cells
    out = run_search(plan, {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "metadistil",
                            "parent": parent}, resume=False,
                     run_stage=lambda name, trials, common, scheduler: {t.id: "OOM" for t in trials})
    assert out.confirm == [] and out.chosen == {}
    assert out.failed == {**{t.id: "OOM" for t in cell.trials},
                          cell.id: "no search trial of the cell has best_val_accuracy; its confirm trials did not run"}
