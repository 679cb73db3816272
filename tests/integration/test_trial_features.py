"""Trial-level behaviour: warm-up, several teachers with different tokenizers, failure on a non-finite loss,
MLflow logging, the CLI on real SST-2 text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import SST2
from test_trial import trial
from trainer.algorithms import KD
from trainer.config import NoiseConfig
from trainer.data import Collator, synthetic_sentiment
from trainer.loop import NonFiniteLossError, run_trial

REPO = Path(__file__).resolve().parents[2]


class Recorder:
    """A logger that keeps every call, in order."""

    def __init__(self):
        self.metrics: list[tuple[int, dict]] = []
        self.params: dict = {}
        self.status = None
        self.error = None

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def set_tags(self, tags):
        pass

    def log_artifacts(self, files, name):
        pass

    def log_datasets(self, splits):
        pass

    def log_student(self, folder):
        pass

    def finish(self, status, error=None):
        self.status, self.error = status, error


def test_warmup_runs_the_requested_ce_steps_first(tmp_path, model_dirs):
    # 320 examples / batch 16 = 20 steps per epoch; 0.5 epochs of warm-up = 10 cross-entropy steps.
    cfg = trial(tmp_path, algorithm="kd", student={"name": model_dirs["distilbert"]},
                teachers=[{"name": model_dirs["bert"]}], warmup={"epochs": 0.5},
                data={"train_size": 320}, optim={"max_steps": 5})
    log = Recorder()
    result = run_trial(cfg, [log], progress=False)
    kinds = [key for _, m in log.metrics for key in m if key.startswith(("warmup/", "train/"))
             and not key.endswith("/lr")]
    first_kd = kinds.index("train/kd")
    assert kinds[:first_kd] == ["warmup/ce"] * 10
    assert kinds[first_kd:] == ["train/kd"] * 5
    assert result.metrics["warmup_steps"] == 10
    # One linear schedule (the default) over the student's 15 optimizer steps, warm-up fine-tuning included.
    lrs = [v for _, m in log.metrics for k, v in m.items() if k.endswith("/lr")]
    assert lrs == pytest.approx([cfg.optim.lr * (15 - s) / 15 for s in range(15)])


def test_two_teachers_with_different_tokenizers_are_averaged(model_dirs):
    """The student sees the mean of the teachers' logits, each teacher reading its own tokenization of the text."""
    names = ("bert", "roberta")
    teachers = [AutoModelForSequenceClassification.from_pretrained(model_dirs[n]).eval() for n in names]
    for i, t in enumerate(teachers):  # distinct, non-trivial heads so that the average is informative
        torch.manual_seed(i)
        t.classifier.out_proj.weight.data.normal_() if hasattr(t.classifier, "out_proj") else \
            t.classifier.weight.data.normal_()
    toks = [AutoTokenizer.from_pretrained(model_dirs[n]) for n in names]
    student_tok = AutoTokenizer.from_pretrained(model_dirs["distilbert"])
    data = synthetic_sentiment(6, 1)["train"]
    batch = Collator(student_tok, toks, 32, NoiseConfig(), seed=0)(data, range(6))
    assert batch.teachers[0]["input_ids"].shape != batch.teachers[1]["input_ids"].shape or \
        not torch.equal(batch.teachers[0]["input_ids"], batch.teachers[1]["input_ids"])
    (seen,) = KD(student=None, teachers=teachers, distill=None).teacher_outputs(batch)
    with torch.no_grad():
        for i, text in enumerate(data.texts):  # one example at a time, no padding: the reference
            each = [t(**tok(text, return_tensors="pt")).logits[0] for t, tok in zip(teachers, toks)]
            assert torch.allclose(seen[i], (each[0] + each[1]) / 2, atol=1e-5)
            assert not torch.allclose(each[0], each[1], atol=1e-3)


def test_metadistil_with_two_teachers_and_a_third_tokenizer(tmp_path, model_dirs):
    cfg = trial(tmp_path, algorithm="metadistil", student={"name": model_dirs["distilbert"]},
                teachers=[{"name": model_dirs["bert"]}, {"name": model_dirs["roberta"]}],
                metadistil={"quiz_batch_size": 8, "pilot_lr": 1e-2}, optim={"max_steps": 30},
                output={"dir": str(tmp_path / "out"), "save_teachers": True})
    result = run_trial(cfg, progress=False)
    assert result.metrics["train_steps"] == 30
    for i, name in enumerate(("bert", "roberta")):
        before = AutoModelForSequenceClassification.from_pretrained(model_dirs[name]).state_dict()
        after = AutoModelForSequenceClassification.from_pretrained(result.output_dir / f"teacher_{i}").state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), f"teacher {i} was never meta-updated"
    assert result.metrics["times_smaller"] == pytest.approx(
        result.metrics["teacher_params_mean"] / result.metrics["student_params"])


@pytest.mark.parametrize("algorithm", ["kd", "metadistil"])
def test_a_trial_with_hidden_distillation_logs_the_term_and_saves_a_plain_student(tmp_path, model_dirs, tokenizers,
                                                                                  algorithm):
    """distill.hidden through run_trial: KD with a wider teacher (the student learns a projection to its size), and
    MetaDistil with two teachers of one size and different depths (auto maps student layer 1 to layer 1 of one, 2 of
    the other)."""
    from safetensors.torch import load_file

    import tiny

    wide = tiny.save(tiny.tiny_bert(tokenizers["wordpiece"], hidden=48, layers=4, seed=2), tokenizers["wordpiece"],
                     tmp_path / "wide")
    teachers = [wide] if algorithm == "kd" else [model_dirs["bert"], model_dirs["bert4"]]
    cfg = trial(tmp_path, algorithm=algorithm, student={"name": model_dirs["distilbert"]},
                teachers=[{"name": t} for t in teachers], distill={"hidden": {"beta": 10}},
                metadistil={"quiz_batch_size": 8}, optim={"max_steps": 4}, eval={"every_steps": 4})
    log = Recorder()
    result = run_trial(cfg, [log], progress=False)
    hidden = [m["train/hidden"] for _, m in log.metrics if "train/hidden" in m]
    assert len(hidden) == 4 and all(0 < h < 1 for h in hidden)
    saved = load_file(result.output_dir / "student" / "model.safetensors")
    assert not [k for k in saved if "hidden_projection" in k]
    assert not hasattr(AutoModelForSequenceClassification.from_pretrained(result.output_dir / "student"),
                       "hidden_projection")


def test_non_finite_loss_stops_the_trial_naming_step_and_loss(tmp_path, model_dirs):
    broken = AutoModelForSequenceClassification.from_pretrained(model_dirs["bert"])
    broken.classifier.weight.data.fill_(float("nan"))
    broken.save_pretrained(tmp_path / "nan_teacher")
    AutoTokenizer.from_pretrained(model_dirs["bert"]).save_pretrained(tmp_path / "nan_teacher")
    cfg = trial(tmp_path, algorithm="kd", student={"name": model_dirs["distilbert"]},
                teachers=[{"name": str(tmp_path / "nan_teacher")}])
    log = Recorder()
    with pytest.raises(NonFiniteLossError, match=r"train step 0: loss kd=nan is not finite"):
        run_trial(cfg, [log], progress=False)
    assert log.status == "FAILED" and "kd=nan" in log.error


def all_artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= all_artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_mlflow_run_holds_params_metrics_data_and_student_but_no_checkpoint(tmp_path, model_dirs, monkeypatch):
    from mlflow.tracking import MlflowClient

    from launcher.tracking import STUDENT_MODEL, MLflowLogger

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = trial(tmp_path, algorithm="finetune", student={"name": model_dirs["distilbert"]},
                optim={"max_steps": 20}, eval={"every_steps": 10},
                tracking={"mlflow_uri": "http://alice:s3cret@mlflow.example:5000", "experiment": "t"})
    logger = MLflowLogger(uri, "t", run_name="trial-a", tags={"sweep": "unit"})
    checkpoint = tmp_path / "out" / "checkpoint"  # where a sweep's trial checkpoints: inside its output folder
    checkpointed = []
    result = run_trial(cfg, [logger], progress=False, checkpoint_dir=checkpoint,
                       on_eval=lambda step, metrics: checkpointed.append(any(checkpoint.rglob("*"))))
    assert checkpointed == [True, True]
    client = MlflowClient(uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["algorithm"] == "finetune" and run.data.params["optim.max_steps"] == "20"
    assert "s3cret" not in str(run.data.params) and run.data.params["tracking.mlflow_uri"] == \
        "http://***@mlflow.example:5000"
    assert run.data.metrics["test_accuracy"] == pytest.approx(result.metrics["test_accuracy"])
    history = client.get_metric_history(logger.run_id, "val_accuracy")
    assert [m.step for m in history] == [10, 20]
    assert run.data.tags["sweep"] == "unit" and run.data.tags["algorithm"] == "finetune"
    assert all_artifacts(client, logger.run_id) == {"trial/config.yaml", "trial/metrics.json"}
    inputs = {i.dataset.name: i.dataset for i in run.inputs.dataset_inputs}
    assert {name: json.loads(d.profile)["num_rows"] for name, d in inputs.items()} == {
        "synthetic/train": 600, "synthetic/quiz": 40, "synthetic/validation": 200, "synthetic/test": 200}
    model = client.get_logged_model(run.outputs.model_outputs[0].model_id)
    assert model.name == STUDENT_MODEL and model.source_run_id == logger.run_id


@pytest.mark.skipif(not SST2.is_dir(), reason=f"real SST-2 text not found at {SST2}")
def test_cli_trains_on_real_sst2(tmp_path, model_dirs):
    config = tmp_path / "trial.yaml"
    config.write_text(f"""
algorithm: kd
data: {{path: {SST2}, train_size: 512, quiz_size: 32, validation_size: 128, test_size: 128, max_length: 32}}
student: {{name: {model_dirs['distilbert']}}}
teachers: [{{name: {model_dirs['bert']}}}]
optim: {{batch_size: 32, max_steps: 8}}
eval: {{every_steps: 4}}
deepspeed: {{enabled: false}}
output: {{dir: {tmp_path / 'out'}}}
""")
    cli = [sys.executable, "-m", "launcher.cli"]
    done = subprocess.run([*cli, "train", str(config), "algorithm=metadistil", "noise.student.p=0.1",
                           "metadistil.quiz_batch_size=8", "--no-progress"],
                          capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test accuracy" in done.stdout
    saved = (tmp_path / "out" / "config.yaml").read_text()
    assert "algorithm: metadistil" in saved and "p: 0.1" in saved
    assert (tmp_path / "out" / "student" / "model.safetensors").is_file()

    bad = subprocess.run([*cli, "validate", str(config), "noise.student.p=1.5"], capture_output=True, text=True,
                         cwd=REPO, timeout=120, check=False)
    assert bad.returncode == 2 and "noise.student.p" in bad.stderr
