"""Search, then confirm, on a local Ray: cell runs with the chosen values, confirm trials that use them, Table 1 from
the confirm runs only, and a --resume that reruns nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launcher import runs
from launcher.driver import run_sweep
from launcher.identity import PHASE
from launcher.report import build_report
from launcher.search_stage import CELL_ID, CHOSEN_TRIAL, STOPPED_EARLY
from launcher.spec import expand, load_spec

pytestmark = pytest.mark.slow  # about two minutes on 2 busy CPUs: eight tiny trials through Ray and MLflow


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def spec_file(tmp_path, model_dirs):
    spec = {
        "name": "searched",
        "base": {"data": {"name": "synthetic", "train_size": 160, "quiz_size": 16, "validation_size": 64,
                          "test_size": 32, "max_length": 32},
                 "optim": {"batch_size": 16, "max_steps": 6}, "eval": {"every_steps": 3},
                 "deepspeed": {"enabled": False},
                 "tracking": {"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}},
        "teachers": {"bert": {"checkpoint": model_dirs["bert"], "label": "BERT"}},
        "teacher_sets": {"bert": ["bert"]},
        "students": {"distil": {"name": model_dirs["distilbert"], "label": "DistilBERT"}},
        "grid": {"algorithm": ["finetune", "kd"], "seed": [1]},
        # Students this small score as a constant predictor after 6 steps: the finetune cell also draws validation
        # sizes, whose class balance differs (sample 0: 32 examples, 0.5625 positive; sample 1: 64, 0.53125), so that
        # ASHA has a worse second sample to stop at its first evaluation.
        "search": {"space": {"optim.lr": "loguniform(1e-6, 3e-2)", "distill.alpha": "uniform(0.2, 0.8)",
                             "data.validation_size": {"algorithms": ["finetune"], "dist": "choice(16, 32, 64)"}},
                   "num_samples": 2, "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2}},
        "confirm": {"seeds": [1, 2]},
        "resources": {"cpus": 1}, "max_concurrent_trials": 1, "max_failures": 0,
        "storage_path": str(tmp_path / "storage"),
    }
    path = tmp_path / "searched.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def all_runs(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name("metadistil").experiment_id], "", max_results=1000)


def test_search_then_confirm_then_resume(tmp_path, model_dirs, local_ray):
    plan = expand(*load_spec(spec_file(tmp_path, model_dirs)))
    assert (len(plan.search.trials), len(plan.trials)) == (4, 4)
    first = run_sweep(plan, verbose=0)
    assert first.failed == {} and len(first.finished) == 8
    assert "finetune__none__distil__w0__off__search1" in first.stopped  # (KD's lr draws may stop one too)

    found = all_runs(first.tracking_uri)
    cells = {r.data.tags[CELL_ID]: r for r in found if r.data.tags.get(runs.ROLE) == "cell"}
    assert set(cells) == {c.id for c in plan.search.cells}
    trials = {r.data.tags[runs.TRIAL_ID]: r for r in found if r.data.tags.get(runs.ROLE) == "trial"}
    for cell in plan.search.cells:
        cell_run = cells[cell.id]
        assert cell_run.info.status == "FINISHED"
        assert cell_run.data.tags["mlflow.parentRunId"] == first.parent_run_id
        searched = [trials[t.id] for t in cell.trials]
        assert all(r.data.tags["mlflow.parentRunId"] == cell_run.info.run_id for r in searched)
        assert all(r.data.tags[PHASE] == "search" and r.info.status == "FINISHED" for r in searched)
        # a trial ASHA stopped ended cleanly, without the test score only the end of a trial logs
        assert all((r.data.tags.get(STOPPED_EARLY) == "true") == ("test_accuracy" not in r.data.metrics)
                   for r in searched)
        best = max(range(2), key=lambda i: (searched[i].data.metrics["best_val_accuracy"], -i))
        assert cell_run.data.tags[CHOSEN_TRIAL] == cell.trials[best].id
        chosen = cell.samples[best]
        assert dict(cell_run.data.params) == {f"chosen.{k}": str(v) for k, v in chosen.items()}
        for confirm in cell.confirm:
            run = trials[confirm.id]
            assert run.data.tags[PHASE] == "confirm"
            assert run.data.tags["mlflow.parentRunId"] == first.parent_run_id
            assert {k: run.data.params[k] for k in chosen} == {k: str(v) for k, v in chosen.items()}
            assert run.data.params["seed"] == str(confirm.config.seed)
    assert sorted(cell.id for cell in plan.search.cells if "distill.alpha" in cell.space) == \
        ["kd__bert__distil__w0__off"]
    assert sorted(first.stopped) == sorted(t for t, r in trials.items() if r.data.tags.get(STOPPED_EARLY) == "true")
    stopped = trials["finetune__none__distil__w0__off__search1"]
    assert stopped.data.metrics["best_val_accuracy"] == 0.53125 and "error" not in stopped.data.tags
    assert not (Path(plan.search.cells[0].trials[1].config.output.dir) / "checkpoint").exists()
    assert cells["finetune__none__distil__w0__off"].data.tags[CHOSEN_TRIAL].endswith("__search0")

    report = build_report(first.tracking_uri, "searched", tmp_path / "report", attach=False)
    assert sorted(r["n_seeds"] for r in report.rows) == [2, 2]  # two cells, each from its two confirm runs
    assert report.failed == []
    registered = first.best["metadistil-searched"][0]
    assert registered in {t.id for t in plan.trials}, "the best student is a confirm trial's"

    resumed = run_sweep(expand(*load_spec(spec_file(tmp_path, model_dirs))), resume=True, verbose=0)
    assert resumed.finished == [] and resumed.failed == {} and resumed.replaced == []
    assert sorted(resumed.skipped) == sorted([*(t.id for t in plan.search.trials), *(t.id for t in plan.trials)])
    again = all_runs(first.tracking_uri)
    assert len(again) == len(found), "a resume duplicated runs"
    assert {r.data.tags[CELL_ID]: r.data.tags[CHOSEN_TRIAL] for r in again if r.data.tags.get(runs.ROLE) == "cell"} \
        == {c: r.data.tags[CHOSEN_TRIAL] for c, r in cells.items()}
