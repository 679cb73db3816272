"""bench/heldout.py: the held-out set shares no text with any trial's splits, and finished students are scored on it."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import yaml

from launcher.spec import expand, load_spec
from trainer.data import Collator, load_splits
from trainer.evaluation import accuracy

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import heldout


def make_plan(tmp_path, model_dir):
    data = tmp_path / "data"
    data.mkdir()
    rows = ["sentence\tlabel", *(f"{'good' if i % 2 else 'bad'} film number {i}\t{i % 2}" for i in range(400))]
    (data / "train.tsv").write_text("\n".join(rows) + "\n")
    (data / "validation.tsv").write_text("sentence\tlabel\nfine film\t1\npoor film\t0\n")
    spec = {"name": "heldout", "storage_path": str(tmp_path / "runs"),
            "base": {"data": {"path": str(data), "train_size": 60, "quiz_size": 10, "test_size": 20},
                     "metadistil": {"quiz_batch_size": 4}},
            "teachers": {"t": {"finetune": {"model": str(model_dir), "train_subset_seed": 5}}},
            "teacher_sets": {"t": ["t"]},
            "students": {"s": {"name": str(model_dir)}},
            "grid": {"algorithm": ["finetune", "kd"], "seed": [1, 2, 3]}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return expand(*load_spec(path))


def test_heldout_set_avoids_every_split_of_every_trial(tmp_path, model_dirs):
    plan = make_plan(tmp_path, model_dirs["bert"])
    used = set()
    for trial in [*plan.teacher_trials.values(), *plan.trials]:
        splits = load_splits(trial.config.data, trial.config.seed)
        used.update(t for part in (splits.train, splits.quiz, splits.test) for t in part.texts)
    assert len(used) > 90  # the teacher's own train subset and 3 seeds of students: more than one trial's 90

    whole = heldout.heldout_set(plan, size=10_000)
    assert len(whole) == 400 - len(used) and not used & set(whole.texts)
    some = heldout.heldout_set(plan, size=25, seed=3)
    assert len(some) == 25 and set(some.texts) <= set(whole.texts)
    assert heldout.heldout_set(plan, size=25, seed=3).texts == some.texts


def test_finished_trials_are_scored_by_cell(tmp_path, model_dirs, capsys):
    plan = make_plan(tmp_path, model_dirs["bert"])
    kd = [t for t in plan.trials if t.axes["algorithm"] == "kd"]
    for trial, own in zip(kd[:2], (0.5, 0.7)):  # two seeds "finished": a saved student and its metrics
        out = Path(trial.config.output.dir)
        shutil.copytree(model_dirs["bert"], out / "student")
        (out / "metrics.json").write_text(json.dumps({"test_accuracy": own}))
    data = heldout.heldout_set(plan, size=50)
    rows = heldout.score_trials(plan, data, batch_size=16, device="cpu")

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainer.config import NoiseConfig

    model = AutoModelForSequenceClassification.from_pretrained(model_dirs["bert"])
    collate = Collator(AutoTokenizer.from_pretrained(model_dirs["bert"]), [], 64, NoiseConfig(), seed=0)
    expected = accuracy(model, data, collate, 16, torch.device("cpu"))
    assert [r["trial"] for r in rows] == [t.id for t in kd[:2]]
    assert [r["run_name"] for r in rows] == ["kd · t→s · s1", "kd · t→s · s2"]  # as the sweep's MLflow runs are named
    assert all(r["heldout_accuracy"] == expected for r in rows)
    assert "not finished" in capsys.readouterr().err
    table = heldout.cell_table(rows, len(data))
    assert f"| kd__t__s__w0__off__s* | 2 | {100 * expected:.2f} ± 0.00 | 60.00 ± 14.14 |" in table


def test_a_rerun_cell_is_scored_on_the_full_grids_heldout_set(tmp_path, model_dirs, capsys):
    """--heldout-of: a spec cut down to one cell draws the examples of the full grid it came from (the cut spec alone
    would leave the other teachers' and cells' texts in its pool, and draw another set)."""
    full = make_plan(tmp_path, model_dirs["bert"])
    spec = yaml.safe_load((tmp_path / "sweep.yaml").read_text())
    spec["name"], spec["grid"] = "cell", {"algorithm": ["kd"], "seed": [1]}
    (tmp_path / "cell.yaml").write_text(yaml.safe_dump(spec))
    expected, alone = heldout.heldout_set(full, size=10_000), heldout.heldout_set(expand(*load_spec(
        tmp_path / "cell.yaml")), size=10_000)
    assert len(alone) > len(expected)
    assert heldout.main([str(tmp_path / "cell.yaml"), "--heldout-of", str(tmp_path / "sweep.yaml")]) == 0
    assert f"held-out set: {len(expected)} examples no trial of heldout used" in capsys.readouterr().err


def test_saved_heldout_set_reads_back_for_evaluate_sweep(tmp_path, model_dirs):
    from trainer.datafiles import read_labelled

    plan = make_plan(tmp_path, model_dirs["bert"])
    spec = tmp_path / "sweep.yaml"
    assert heldout.main([str(spec), "--size", "30", "--save-data", str(tmp_path / "out" / "heldout.tsv")]) == 0
    back = read_labelled(tmp_path / "out" / "heldout.tsv", "sentence", "label")
    expected = heldout.heldout_set(plan, size=30)
    assert (back.texts, back.labels) == (expected.texts, expected.labels) and len(back) == 30
