"""A trial interrupted after a checkpoint continues from it and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from test_trial import trial
from test_trial_features import Recorder
from trainer.loop import run_trial


class Crash(RuntimeError):
    pass


def crash_at(step_to_crash: int):
    def on_eval(step, metrics):
        if step == step_to_crash:
            raise Crash(f"simulated node loss after step {step}")
    return on_eval


@pytest.mark.parametrize("deepspeed", [
    pytest.param({"enabled": False}, id="torch"),
    pytest.param({"enabled": True, "zero_stage": 1}, id="deepspeed-zero1", marks=pytest.mark.slow),
])
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, model_dirs, deepspeed):
    def cfg(out):
        return trial(tmp_path, algorithm="metadistil", student={"name": model_dirs["distilbert"]},
                     teachers=[{"name": model_dirs["bert"]}, {"name": model_dirs["roberta"]}],
                     metadistil={"quiz_batch_size": 8, "pilot_lr": 1e-2, "meta_interval": 2},
                     optim={"max_steps": 12}, eval={"every_steps": 4}, deepspeed=deepspeed,
                     output={"dir": str(tmp_path / out), "save_teachers": True})

    whole = Recorder()
    reference = run_trial(cfg("whole"), [whole], progress=False)

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Crash):
        run_trial(cfg("resumed"), progress=False, on_eval=crash_at(8), checkpoint_dir=ckpt)
    assert (ckpt / "state.json").is_file()
    log = Recorder()
    resumed = run_trial(cfg("resumed"), [log], progress=False, checkpoint_dir=ckpt)

    trained = [step for step, m in log.metrics if "train/kd" in m]
    assert trained == [8, 9, 10, 11], "the resumed trial must run only the steps after its checkpoint"
    # The learning-rate schedule (linear decay by default) continues where it stopped.
    lrs = {step: m["train/lr"] for step, m in whole.metrics if "train/lr" in m}
    assert [m["train/lr"] for step, m in log.metrics if "train/lr" in m] == [lrs[s] for s in trained]
    assert lrs[8] < lrs[0], "the schedule did not decay"
    assert not ckpt.exists(), "a finished trial removes its checkpoint"
    assert resumed.metrics["best_val_accuracy"] == reference.metrics["best_val_accuracy"]
    for part in ("student", "teacher_0", "teacher_1"):
        a = load_file(reference.output_dir / part / "model.safetensors")
        b = load_file(resumed.output_dir / part / "model.safetensors")
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        assert worst <= 1e-6, f"{part} differs from the uninterrupted run by {worst}"


def test_a_checkpoint_of_another_config_is_not_continued(tmp_path, model_dirs):
    """A sweep rerun with a changed config reuses trial ids, hence checkpoint folders: the old state is not resumed."""
    def cfg(teacher_lr):
        return trial(tmp_path, algorithm="metadistil", student={"name": model_dirs["distilbert"]},
                     teachers=[{"name": model_dirs["bert"]}],
                     metadistil={"quiz_batch_size": 8, "pilot_lr": 1e-2, "teacher_lr": teacher_lr},
                     optim={"max_steps": 8}, eval={"every_steps": 4})

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Crash):
        run_trial(cfg(1e-4), progress=False, on_eval=crash_at(4), checkpoint_dir=ckpt)
    log = Recorder()
    with pytest.warns(UserWarning, match="written for a different trial config"):
        run_trial(cfg(2e-6), [log], progress=False, checkpoint_dir=ckpt)
    assert [step for step, m in log.metrics if "train/kd" in m] == list(range(8))
