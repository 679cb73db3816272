"""distill.hidden's layer map is checked against each model's config.json before any weights load: by `metadistil
validate`, by a trial before it loads, and by a sweep (--dry-run too), where a teacher still to be fine-tuned has the
depth of the model its recipe starts from. The message is the one the check after loading gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers
import yaml

from launcher.cli import main
from trainer.config import parse_config
from trainer.errors import ConfigError
from trainer.layer_map import layer_pairs

DATA = {"name": "synthetic", "train_size": 60, "quiz_size": 8, "validation_size": 10, "test_size": 10}


def config(tmp_path, model_dirs, layers, student="distilbert", teachers=("bert4", "bert"), **student_keys) -> str:
    raw = {"algorithm": "kd", "data": DATA, "deepspeed": {"enabled": False}, "output": {"dir": str(tmp_path / "out")},
           "student": {"name": model_dirs.get(student, student), **student_keys},
           "teachers": [{"name": model_dirs.get(t, t)} for t in teachers],
           "distill": {"hidden": {"layers": layers}}}
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def no_weights_load(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for cls in (transformers.AutoModelForSequenceClassification, transformers.AutoModel):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


@pytest.mark.parametrize(("layers", "keys", "depths", "who"), [
    ([[3, 1]], {}, (2, 4), "student layer 3 does not exist; the student has 2 layers (1..2)"),
    # a student cut from the 4-layer BERT keeps 2 of its layers
    ([[1, 1], [3, 3]], {"init_layers": [0, 3]}, (2, 4), "student layer 3 does not exist; the student has 2 layers"),
    ([[1, 3]], {}, (2, 2), "teacher layer 3 does not exist; teachers.1 has 2 layers (1..2)"),
    ("auto", {}, (2, 2), None),
])
def test_validate_and_train_refuse_a_layer_beyond_a_models_depth(tmp_path, model_dirs, capsys, no_weights_load,
                                                                 layers, keys, depths, who):
    student = "bert4" if keys else "distilbert"
    path = config(tmp_path, model_dirs, layers, student, **keys)
    if who is None:  # auto fits any pair of depths with a teacher at least as deep as the student
        assert main(["validate", path]) == 0
        return
    expected = f"error: distill.hidden.layers: {who}"
    # the message a trial gives after loading, from the same function
    with pytest.raises(ConfigError) as raised:
        layer_pairs(parse_config(yaml.safe_load(Path(path).read_text())).distill.hidden.layers, *depths,
                    "teachers.1" if "teacher" in who else "teachers.0")
    assert f"error: {raised.value}".startswith(expected)
    assert refused(capsys, ["validate", path]).startswith(expected)
    assert refused(capsys, ["train", path]).startswith(expected)  # before any weights load: no_weights_load


def test_a_model_whose_config_cannot_be_read_is_not_checked(tmp_path, model_dirs, capsys):
    """A hub id that is not in the local cache: loading checks it; the other teacher is still checked."""
    hub = "some-org/not-cached-model"
    assert main(["validate", config(tmp_path, model_dirs, [[1, 9]], teachers=(hub,))]) == 0
    capsys.readouterr()
    err = refused(capsys, ["validate", config(tmp_path, model_dirs, [[1, 3]], teachers=(hub, "bert"))])
    assert "teacher layer 3 does not exist; teachers.1 has 2 layers" in err
    assert main(["validate", config(tmp_path, model_dirs, [[5, 1]], student=hub, teachers=("bert",))]) == 0


def spec(tmp_path, model_dirs, layers) -> str:
    raw = {"name": "layers", "storage_path": str(tmp_path / "storage"),
           "base": {"data": DATA, "optim": {"max_steps": 2}, "deepspeed": {"enabled": False},
                    "distill": {"hidden": {"layers": layers}}},
           # "tuned" is fine-tuned by the sweep from the 4-layer BERT: its folder does not exist at --dry-run
           "teachers": {"tuned": {"finetune": {"model": model_dirs["bert4"]}},
                        "ready": {"checkpoint": model_dirs["bert"]}},
           "teacher_sets": {"tuned": ["tuned"], "ready": ["ready"]},
           "students": {"distil": {"name": model_dirs["distilbert"]}},
           "grid": {"algorithm": ["kd"], "seed": [1]}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_a_sweep_checks_its_trials_maps_with_teachers_still_to_fine_tune(tmp_path, model_dirs, capsys):
    # teacher layer 4: within the fine-tuned teacher's recipe model (4 layers), beyond the ready teacher (2)
    path = spec(tmp_path, model_dirs, [[1, 4]])
    assert main(["sweep", path, "--dry-run", "grid.teacher_set=[tuned]"]) == 0
    assert "to fine-tune" in capsys.readouterr().out
    err = refused(capsys, ["sweep", path, "--dry-run"])
    assert "distill.hidden.layers: teacher layer 4 does not exist; teachers.0 has 2 layers (1..2)" in err
    assert "trial kd__ready" in err
    err = refused(capsys, ["sweep", spec(tmp_path, model_dirs, [[1, 5]]), "--dry-run", "grid.teacher_set=[tuned]"])
    assert "teacher layer 5 does not exist; teachers.0 has 4 layers (1..4)" in err
