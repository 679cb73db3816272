"""Malformed trial configs, overrides, data files and model folders: `metadistil validate` refuses each with one line
naming the key or file and exits 2, before any model loads; `metadistil train` refuses them the same way."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from launcher.cli import main

ROWS = [("a good movie", 1), ("a bad film", 0)] * 20  # 40 examples


class Work:
    """A valid kd trial on tiny local models and a 40-row tsv, and the means to break one piece of it."""

    def __init__(self, root: Path, model_dirs: dict[str, str]):
        self.root = root
        self.bert, self.distil = model_dirs["bert"], model_dirs["distilbert"]
        self.data = self.tsv("data.tsv")
        self.base = {
            "algorithm": "kd", "device": "cpu",
            "data": {"path": self.data, "train_size": 20, "quiz_size": 4, "validation_size": 5, "test_size": 5,
                     "max_length": 32},
            "student": {"name": self.distil}, "teachers": [{"name": self.bert}],
            "metadistil": {"quiz_batch_size": 2}, "optim": {"batch_size": 4, "max_steps": 1},
            "deepspeed": {"enabled": False}, "output": {"dir": str(root / "out")},
        }

    def file(self, name: str, content: str | bytes) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def tsv(self, name: str, rows=ROWS, header: str = "sentence\tlabel") -> str:
        return self.file(name, header + "\n" + "".join(f"{t}\t{y}\n" for t, y in rows))

    def folder(self, name: str, **splits) -> str:
        """A data folder holding one tsv per split (train=rows, validation=rows, ...)."""
        for split, rows in splits.items():
            self.tsv(f"{name}/{split}.tsv", rows)
        return str(self.root / name)

    def config(self, data: dict | None = None, **sections) -> str:
        """The base config with sections replaced (``data`` updates data's keys); written as trial.yaml."""
        raw = json.loads(json.dumps(self.base))
        raw["data"].update(data or {})
        raw.update(sections)
        return self.file("trial.yaml", yaml.safe_dump(raw))

    def with_data(self, path: str, **sizes) -> list[str]:
        return [self.config(data={"path": path, **sizes})]

    def model(self, change: Callable[[Path], object], source: str | None = None) -> str:
        """A copy of the tiny BERT (or ``source``) with ``change`` applied to its folder."""
        folder = self.root / f"model{len(list(self.root.glob('model*')))}"
        shutil.copytree(source or self.bert, folder)
        change(folder)
        return str(folder)

    def student(self, change: Callable[[Path], object]) -> list[str]:
        return [self.config(student={"name": self.model(change)})]


def truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def remove(*names: str) -> Callable[[Path], None]:
    return lambda folder: [(folder / name).unlink() for name in names]


def write(name: str, content: str | bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())


def three_labels(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {str(i): f"L{i}" for i in range(3)}
    (folder / "config.json").write_text(json.dumps(config))


def bin_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a zip archive cut short")


def sharded_without_shard(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


# (id, the command line after `validate` built from a Work, what the one line must contain)
CASES: list[tuple[str, Callable[[Work], list[str]], str]] = [
    # the config file
    ("config-not-utf8", lambda w: [w.file("trial.yaml", b"algorithm: kd\nseed: \xff\n")],
     "trial.yaml: not UTF-8 text (byte 0xff at offset 20)"),
    ("config-missing", lambda w: [str(w.root / "absent.yaml")], "config file not found: "),
    ("config-is-a-folder", lambda w: [str(w.root)], "config file not found: "),
    ("config-invalid-yaml", lambda w: [w.file("trial.yaml", "algorithm: kd\nteachers: [\n")],
     "trial.yaml: not valid YAML at line 3"),
    ("config-top-level-list", lambda w: [w.file("trial.yaml", "- algorithm: kd\n")],
     "trial.yaml: the top level must be a mapping"),
    ("config-key-twice", lambda w: [w.file("trial.yaml", "seed: 1\nseed: 2\n")],
     "seed: key given twice (lines 1 and 2)"),
    # overrides
    ("override-without-equals", lambda w: [w.config(), "optim.lr"], "override 'optim.lr': expected dotted.key=value"),
    ("override-bad-yaml", lambda w: [w.config(), "optim.lr=[1"], "override optim.lr: value '[1' is not valid YAML"),
    ("override-index-out-of-range", lambda w: [w.config(), "teachers.3.name=x"],
     "override teachers.3.name: '3' is not an index into teachers (allowed: 0..0)"),
    ("override-into-a-value", lambda w: [w.config(), "algorithm.x=1"],
     "override algorithm.x: algorithm is a value ('kd'), not a section"),
    ("override-index-into-no-list", lambda w: [w.config(), "student.init_layers.0=1"],
     "override student.init_layers.0: student.init_layers has no items to index"),
    # keys and types
    ("unknown-top-level-key", lambda w: [w.config(), "colour=red"], "colour: unknown key (allowed here: seed,"),
    ("unknown-nested-key", lambda w: [w.config(), "optim.lrr=1"], "optim.lrr: unknown key (allowed here: lr,"),
    ("unknown-teacher-key", lambda w: [w.config(), "teachers.0.nme=x"], "teachers.0.nme: unknown key"),
    ("lr-not-a-number", lambda w: [w.config(), "optim.lr=fast"], "optim.lr: Input should be a valid number"),
    ("train-size-fraction", lambda w: [w.config(), "data.train_size=1.5"],
     "data.train_size: Input should be a valid int"),
    ("section-not-a-mapping", lambda w: [w.config(), "data=5"], "data: Input should be a valid dictionary"),
    ("negative-seed", lambda w: [w.config(), "seed=-1"], "seed: Input should be greater than or equal to 0"),
    ("unknown-algorithm", lambda w: [w.config(), "algorithm=distil"], "algorithm: Input should be 'finetune'"),
    ("unknown-device", lambda w: [w.config(), "device=tpu"], "device: Input should be 'auto', 'cpu' or 'cuda'"),
    ("noise-p-above-1", lambda w: [w.config(), "noise.student.p=1.5"], "noise.student.p: Input should be less than 1"),
    ("unknown-noise-mode", lambda w: [w.config(), "noise.teacher.mode=word"], "noise.teacher.mode: Input should be"),
    ("zero-temperature", lambda w: [w.config(), "distill.temperature=0"],
     "distill.temperature: Input should be greater"),
    ("alpha-above-1", lambda w: [w.config(), "distill.alpha=2"], "distill.alpha: Input should be less than or equal"),
    ("hidden-layers-not-pairs", lambda w: [w.config(), "distill.hidden.layers=[[1]]"],
     "distill.hidden.layers: must be 'auto' or a non-empty list of [student_layer, teacher_layer] pairs"),
    ("hidden-layer-zero", lambda w: [w.config(), "distill.hidden.layers=[[0, 1]]"],
     "distill.hidden.layers: must be 'auto' or a non-empty list"),
    ("hidden-negative-beta", lambda w: [w.config(), "distill.hidden.beta=-1"],
     "distill.hidden.beta: Input should be greater than or equal to 0"),
    ("zero-stage-5", lambda w: [w.config(), "deepspeed.zero_stage=5"], "deepspeed.zero_stage: Input should be less"),
    ("unknown-precision", lambda w: [w.config(), "deepspeed.precision=fp8"], "deepspeed.precision: Input should be"),
    ("zero-eval-interval", lambda w: [w.config(), "eval.every_steps=0"], "eval.every_steps: Input should be greater"),
    ("zero-max-steps", lambda w: [w.config(), "optim.max_steps=0"], "optim.max_steps: Input should be greater"),
    ("max-length-4", lambda w: [w.config(), "data.max_length=4"], "data.max_length: Input should be greater"),
    ("repeated-init-layers", lambda w: [w.config(), "student.init_layers=[0, 0]"],
     "student.init_layers: must be distinct non-negative layer indices"),
    ("missing-teacher-name", lambda w: [w.config(), "teachers=[{label: x}]"],
     "teachers.0.name: required key is missing"),
    # combinations
    ("finetune-with-teachers", lambda w: [w.config(), "algorithm=finetune"], "teachers: finetune trains without"),
    ("kd-without-teachers", lambda w: [w.config(), "teachers=[]"], "teachers: algorithm 'kd' needs at least one"),
    ("metadistil-zero-3", lambda w: [w.config(), "algorithm=metadistil", "deepspeed.enabled=true",
                                     "deepspeed.zero_stage=3"], "deepspeed.zero_stage: ZeRO-3 partitions parameters"),
    ("quiz-batch-above-quiz", lambda w: [w.config(), "algorithm=metadistil", "metadistil.quiz_batch_size=8"],
     "metadistil.quiz_batch_size: 8 exceeds data.quiz_size=4"),
    ("bf16-without-deepspeed", lambda w: [w.config(), "deepspeed.precision=bf16"],
     "deepspeed.precision: bf16 needs deepspeed.enabled: true"),
    ("fp16-on-cpu", lambda w: [w.config(), "deepspeed.enabled=true", "deepspeed.precision=fp16"],
     "deepspeed.precision: fp16 is not supported on CPU"),
    ("finite-difference-in-bf16", lambda w: [w.config(), "algorithm=metadistil", "deepspeed.enabled=true",
                                             "deepspeed.precision=bf16", "metadistil.meta_gradient=finite_difference"],
     "metadistil.meta_gradient: finite_difference needs fp32 compute"),
    ("batch-above-training-set", lambda w: [w.config(), "optim.batch_size=64"],
     "optim.batch_size: 64 exceeds data.train_size=20"),
    # the machine and the output folder
    ("fp16-without-a-gpu", lambda w: [w.config(), "device=auto", "deepspeed.enabled=true", "deepspeed.precision=fp16"],
     "deepspeed.precision: fp16 needs a CUDA device, and device 'auto' finds none"),
    ("cuda-without-a-gpu", lambda w: [w.config(), "device=cuda"], "device: 'cuda' was asked for but no CUDA device"),
    ("output-dir-is-a-file", lambda w: [w.config(output={"dir": w.file("taken", "")})],
     "output.dir: '{root}/taken' is a file; give a folder"),
    ("output-dir-under-a-file", lambda w: [w.config(output={"dir": w.file("taken", "") + "/out"})],
     "output.dir: '{root}/taken/out' cannot be created: {root}/taken is a file"),
    # data files
    ("data-not-utf8", lambda w: w.with_data(w.file("latin1.tsv", b"sentence\tlabel\ncaf\xe9\t1\n")),
     "data.path: {root}/latin1.tsv is not UTF-8 text (line 2: byte 0xe9"),
    ("data-empty", lambda w: w.with_data(w.file("empty.tsv", "")), "data.path: {root}/empty.tsv has no rows"),
    ("data-header-only", lambda w: w.with_data(w.tsv("header.tsv", [])),
     "data.path: {root}/header.tsv has a header but no rows"),
    ("data-no-text-column", lambda w: w.with_data(w.tsv("t.tsv", header="text\tlabel")),
     "data.text_column: column 'sentence' not in {root}/t.tsv (columns: text, label)"),
    ("data-no-label-column", lambda w: w.with_data(w.tsv("t.tsv", header="sentence\ty")),
     "data.label_column: column 'label' not in {root}/t.tsv (columns: sentence, y)"),
    ("data-fractional-label", lambda w: w.with_data(w.tsv("t.tsv", [("a", 1), ("b", 0.5)] * 20)),
     "data.label_column: 'label' in {root}/t.tsv must hold whole-number class labels (0, 1, ...); line 3 has '0.5'"),
    ("data-word-label", lambda w: w.with_data(w.tsv("t.tsv", [("a", "pos")] * 40)), "line 2 has 'pos'"),
    ("data-empty-label", lambda w: w.with_data(w.tsv("t.tsv", [("a", 1), ("b", "")] * 20)), "line 3 has ''"),
    ("data-negative-label", lambda w: w.with_data(w.tsv("t.tsv", [("a", 1), ("b", -1)] * 20)),
     "data.label_column: labels must be whole numbers >= 0; the train split of {root}/t.tsv has -1"),
    ("data-label-beyond-the-models", lambda w: w.with_data(w.tsv("t.tsv", [("a", 0), ("b", 1), ("c", 2)] * 14)),
     "data.label_column: the labels of {root}/t.tsv go up to 2, out of range for student.name"),
    ("model-with-more-labels", lambda w: [w.config(teachers=[{"name": w.model(three_labels)}])],
     "teachers.0.name: '{root}/model0' is a classifier with 3 labels but the data ({root}/data.tsv) has 2"),
    ("data-row-with-extra-field", lambda w: w.with_data(w.file("t.tsv", "sentence\tlabel\na\t1\nb\t0\t7\n")),
     "data.path: line 3 of {root}/t.tsv has 3 fields, the header has 2"),
    ("data-path-missing", lambda w: w.with_data(str(w.root / "absent")), "data.path: '{root}/absent' does not exist"),
    ("data-folder-without-train", lambda w: w.with_data(w.folder("d", dev=ROWS)),
     "data.path: no train.{{tsv,csv,jsonl,json,parquet}} file in {root}/d"),
    ("data-unsupported-type", lambda w: w.with_data(w.file("t.txt", "a 1\n")),
     "data.path: unsupported file type '.txt'"),
    ("data-jsonl-broken-line", lambda w: w.with_data(w.file("t.jsonl", '{"sentence": "a", "label": 1}\n{"sent\n')),
     "data.path: line 2 of {root}/t.jsonl is not valid JSON"),
    ("data-jsonl-not-objects", lambda w: w.with_data(w.file("t.jsonl", "[1, 2]\n")),
     "data.path: line 1 of {root}/t.jsonl is not a JSON object of columns, got list"),
    ("data-json-record-without-label", lambda w: w.with_data(w.file(
        "t.json", json.dumps([{"sentence": "a", "label": 1}, {"sentence": "b"}]))),
     "data.path: item 1 of {root}/t.json has no 'label'"),
    ("data-parquet-corrupt", lambda w: w.with_data(w.file("t.parquet", b"PAR1 not really")),
     "data.path: {root}/t.parquet is not a readable parquet file"),
    ("data-no-validation-size", lambda w: w.with_data(w.data, validation_size=None),
     "data.validation_size: {root}/data.tsv has no validation split"),
    # sizes larger than the data
    ("validation-size-above-file", lambda w: w.with_data(w.folder("f", train=ROWS, validation=ROWS),
                                                          validation_size=41),
     "data.validation_size: 41 exceeds the 40 examples of the validation split of {root}/f"),
    ("test-size-above-file", lambda w: w.with_data(w.folder("f", train=ROWS, validation=ROWS, test=ROWS), test_size=41),
     "data.test_size: 41 exceeds the 40 examples of the test split of {root}/f"),
    ("validation-size-above-data", lambda w: w.with_data(w.data, validation_size=100),
     ("data.train_size + data.quiz_size + data.test_size + data.validation_size: 20 + 4 + 5 + 100 = 129 examples "
      "are drawn from the train split, which has 40")),
    ("train-size-above-data", lambda w: w.with_data(w.data, train_size=40),
     "data.train_size + data.quiz_size + data.test_size + data.validation_size: 40 + 4 + 5 + 5 = 54"),
    ("quiz-size-above-data", lambda w: w.with_data(w.data, quiz_size=30), "20 + 30 + 5 + 5 = 60 examples are drawn"),
    ("test-size-above-data", lambda w: w.with_data(w.data, test_size=30), "20 + 4 + 30 + 5 = 59 examples are drawn"),
    ("validation-file-negative-label", lambda w: w.with_data(w.folder("f", train=ROWS, validation=[("a", -1)])),
     "data.label_column: labels must be whole numbers >= 0; the validation split of {root}/f has -1"),
    # local model folders
    ("model-folder-missing", lambda w: [w.config(student={"name": str(w.root / "absent")})],
     "student.name: model folder '{root}/absent' does not exist"),
    ("model-folder-is-a-file", lambda w: [w.config(teachers=[{"name": w.data}])],
     "teachers.0.name: model folder '{root}/data.tsv' is a file"),
    ("model-without-config", lambda w: w.student(remove("config.json")),
     "student.name: '{root}/model0' has no config.json"),
    ("model-config-corrupt", lambda w: w.student(write("config.json", "{oops")),
     "student.name: {root}/model0/config.json is not valid JSON"),
    ("model-config-not-utf8", lambda w: w.student(write("config.json", b"{\"a\": \"\xff\"}")),
     "student.name: {root}/model0/config.json is not valid JSON"),
    ("model-config-without-model-type", lambda w: w.student(write("config.json", "[]")),
     "student.name: {root}/model0/config.json has no model_type"),
    ("model-without-weights", lambda w: w.student(remove("model.safetensors")),
     "student.name: '{root}/model0' has no weights (model.safetensors,"),
    ("model-weights-truncated", lambda w: w.student(truncate),
     "student.name: weights file {root}/model0/model.safetensors is truncated or corrupt ("),
    ("model-weights-garbage", lambda w: w.student(write("model.safetensors", b"\x10" * 64)),
     "student.name: weights file {root}/model0/model.safetensors is truncated or corrupt"),
    ("model-bin-weights-truncated", lambda w: w.student(bin_weights),
     "pytorch_model.bin is truncated or corrupt (not a complete PyTorch zip archive)"),
    ("model-shard-missing", lambda w: w.student(sharded_without_shard),
     "student.name: weights file {root}/model0/model-00002-of-00002.safetensors (listed in "),
    ("model-without-tokenizer", lambda w: w.student(remove("tokenizer.json", "tokenizer_config.json")),
     "student.name: '{root}/model0' has no tokenizer (none of tokenizer.json,"),
    ("model-with-only-tokenizer-config", lambda w: w.student(remove("tokenizer.json")),
     "student.name: '{root}/model0' has no tokenizer"),
    ("model-tokenizer-corrupt", lambda w: w.student(write("tokenizer.json", "{")),
     "student.name: {root}/model0/tokenizer.json is not valid JSON"),
    ("tokenizer-folder-missing", lambda w: [w.config(teachers=[{"name": w.bert, "tokenizer": str(w.root / "tok")}])],
     "teachers.0.tokenizer: tokenizer folder '{root}/tok' does not exist"),
    ("init-layers-beyond-the-model", lambda w: [w.config(student={"name": w.distil, "init_layers": [0, 5]})],
     "student.init_layers: layers [5] do not exist;"),
    ("package-not-installed", lambda w: [w.config(), "student.name=package:md_no_such_module_xyz"],
     "Python package module 'md_no_such_module_xyz' is not installed"),
]


@pytest.fixture
def work(tmp_path, model_dirs, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answers on a GPU machine
    return Work(tmp_path, model_dirs)


def refused(capsys, argv: list[str]) -> str:
    """The one stderr line of a refused command (exit 2, no traceback)."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    return err


def test_the_base_trial_is_valid(work, capsys):
    """Each case breaks one thing of this trial, so each refusal below is about the thing the case broke."""
    assert main(["validate", work.config()]) == 0
    assert "valid (kd; student" in capsys.readouterr().out


def test_there_are_at_least_60_distinct_cases():
    assert len({case_id for case_id, _, _ in CASES}) == len(CASES) >= 60


@pytest.mark.parametrize(("build", "expected"), [pytest.param(b, e, id=i) for i, b, e in CASES])
def test_validate_refuses_with_one_line_naming_the_key_or_file(work, capsys, build, expected):
    err = refused(capsys, ["validate", *build(work)])
    assert expected.format(root=work.root) in err


@pytest.mark.parametrize("case_id", ["output-dir-is-a-file", "data-fractional-label", "fp16-without-a-gpu",
                                     "validation-size-above-file",
                                     "model-weights-truncated", "model-without-tokenizer"])
def test_train_refuses_them_before_loading_a_model(work, capsys, monkeypatch, case_id):
    """A trial (the CLI's, or a sweep's on its worker) runs the same checks first: these used to end in a traceback
    after the models loaded, or after training, or not at all."""
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", no_loading)
    build, expected = next((b, e) for i, b, e in CASES if i == case_id)
    err = refused(capsys, ["train", "--no-progress", *build(work)])
    assert expected.format(root=work.root) in err
    assert not (work.root / "out").exists()


@pytest.mark.parametrize(("layers", "expected"), [
    ("[[1, 3]]", "distill.hidden.layers: teacher layer 3 does not exist; teachers.0 has 2 layers (1..2)"),
    ("[[1, 1], [5, 2]]", "distill.hidden.layers: student layer 5 does not exist; the student has 2 layers (1..2)"),
])
def test_train_refuses_a_hidden_layer_map_outside_a_model_before_training(work, capsys, layers, expected):
    """The models' depths are known once they load (a hub model, a student cut by init_layers): the trial checks the
    map right after loading, before any step."""
    code = main(["train", "--no-progress", work.config(), f"distill.hidden.layers={layers}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    # (the models' loading progress comes first on stderr)
    assert err.splitlines()[-1] == f"error: {expected}"
    assert not (work.root / "out").exists()
