"""GLUE tasks (data.task): the raw GLUE layout with its traps (CoLA's missing header, MRPC's byte-order mark and
unbalanced quotes, RTE's string labels, STS-B's scores), the hub's subsets, how the splits are drawn from them, the
config keys a task fixes, and one-line errors for files that do not fit their task."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from trainer.config import ConfigError, DataConfig, parse_config
from trainer.data import all_texts, has_pairs, load_raw, load_splits
from trainer.tasks import METRIC_NAMES, TASKS, TITLES, TaskName, main_metric

GLUE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "glue"


def write(path: Path, lines: list[str], bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((("\ufeff" if bom else "") + "\n".join(lines) + "\n").encode())
    return path.parent


def cola(folder: Path, n: int = 40, dev: int = 10) -> Path:
    rows = [f"gj04\t{i % 2}\t{'' if i % 2 else '*'}\tsentence {i} , with \"a quote" for i in range(n)]
    write(folder / "dev.tsv", [f"clc95\t{i % 2}\t\tdev sentence {i}" for i in range(dev)])
    return write(folder / "train.tsv", rows)


def mrpc(folder: Path, n: int = 40) -> Path:
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    rows = [f"{i % 2}\t{i}\t{i + 1000}\tHe called him \" the witness , {i} .\tA second \" sentence {i}"
            for i in range(n)]
    write(folder / "dev.tsv", [header, *rows[:8]], bom=True)
    return write(folder / "train.tsv", [header, *rows], bom=True)


def rte(folder: Path, labels: tuple[str, ...] = ("entailment", "not_entailment"), n: int = 40) -> Path:
    rows = [f"{i}\tpremise {i}\thypothesis {i}\t{labels[i % len(labels)]}" for i in range(n)]
    return write(folder / "train.tsv", ["index\tsentence1\tsentence2\tlabel", *rows])


def stsb(folder: Path, n: int = 40) -> Path:
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    rows = [f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\tA plane {i}.\tAn air plane {i}."
            f"\t{i % 6 * 0.8:.3f}" for i in range(n)]
    write(folder / "dev.tsv", [header, *rows[:10]])
    return write(folder / "train.tsv", [header, *rows])


def task_data(task: str, folder: Path, **sizes) -> DataConfig:
    return DataConfig(task=task, path=str(folder), **{"train_size": 20, "quiz_size": 5, "test_size": 5, **sizes})


def test_the_task_names_are_the_table():
    assert set(get_args(TaskName)) == set(TASKS)
    assert {t: TASKS[t].main_metric for t in ("cola", "mrpc", "qqp", "stsb", "rte")} == \
        {"cola": "mcc", "mrpc": "f1", "qqp": "f1", "stsb": "pearson", "rte": "accuracy"}
    assert TASKS["mnli"].num_labels == 3 and TASKS["stsb"].num_labels == 1 and TASKS["stsb"].regression


def test_cola_has_no_header_row_and_keeps_quotes(tmp_path):
    raw = load_raw(task_data("cola", cola(tmp_path)))
    assert len(raw["train"]) == 40 and len(raw["validation"]) == 10  # the first row is an example, not a header
    assert raw["train"].texts[0] == 'sentence 0 , with "a quote' and raw["train"].labels[:3] == [0, 1, 0]
    assert raw["train"].pairs is None


def test_mrpc_reads_pairs_past_its_byte_order_mark_and_unbalanced_quotes(tmp_path):
    data = task_data("mrpc", mrpc(tmp_path))
    raw = load_raw(data)
    assert len(raw["train"]) == 40  # a CSV reader with quoting would have merged rows at the unbalanced quotes
    assert raw["train"].texts[1] == 'He called him " the witness , 1 .'
    assert raw["train"].pairs[1] == 'A second " sentence 1' and raw["train"].labels[:2] == [0, 1]
    assert has_pairs(data) and all_texts(data)[0] == (raw["train"].texts[0], raw["train"].pairs[0])


def test_rte_string_labels_become_the_hub_class_indices(tmp_path):
    raw = load_raw(task_data("rte", rte(tmp_path)))
    assert raw["train"].labels[:2] == [0, 1]  # entailment 0, not_entailment 1, as nyu-mll/glue numbers them
    assert "validation" not in raw  # no dev.tsv: validation is carved from train (data.validation_size)


def test_stsb_scores_are_float_labels_of_one_output(tmp_path):
    data = task_data("stsb", stsb(tmp_path))
    splits = load_splits(data, seed=0)
    assert splits.num_labels == 1 and splits.metrics == ("pearson", "spearman")
    assert splits.train.regression and splits.test.regression
    assert isinstance(splits.train.labels[0], float) and {round(v, 1) for v in load_raw(data)["train"].labels} == \
        {0.0, 0.8, 1.6, 2.4, 3.2, 4.0}


def test_raw_splits_dev_is_validation_and_test_is_carved_from_train(tmp_path):
    data = task_data("cola", cola(tmp_path))
    splits = load_splits(data, seed=3)
    assert splits.sizes() == {"train": 20, "quiz": 5, "validation": 10, "test": 5}
    assert splits.num_labels == 2 and splits.metrics == ("mcc", "accuracy")
    assert all(t.startswith("dev ") for t in splits.validation.texts)
    assert not any(t.startswith("dev ") for t in [*splits.test.texts, *splits.train.texts, *splits.quiz.texts])
    assert len(set(splits.test.texts) | set(splits.train.texts) | set(splits.quiz.texts)) == 30  # disjoint
    assert load_splits(data, seed=3).train.texts == splits.train.texts


def test_pairs_stay_with_their_examples_through_the_splits(tmp_path):
    splits = load_splits(task_data("mrpc", mrpc(tmp_path), validation_size=4), seed=0)
    for part in (splits.train, splits.quiz, splits.validation, splits.test):
        for text, pair in zip(part.texts, part.pairs):
            assert text.split()[-2] == pair.split()[-1]  # the example number in both sentences


class FakeHub(dict):
    """What datasets.load_dataset returns for a subset: its splits by name."""


@pytest.fixture
def hub(monkeypatch):
    import datasets

    calls = []

    def load(name, subset):
        calls.append((name, subset))
        rows = {"premise": [f"p {i}" for i in range(30)], "hypothesis": [f"h {i}" for i in range(30)],
                "label": [i % 3 for i in range(30)], "idx": list(range(30))}
        hidden = {**rows, "label": [-1] * 30}
        return FakeHub(train=datasets.Dataset.from_dict(rows), validation_matched=datasets.Dataset.from_dict(rows),
                       test_matched=datasets.Dataset.from_dict(hidden))

    monkeypatch.setattr(datasets, "load_dataset", load)
    return calls


def test_hub_subset_reads_the_task_columns_and_skips_hidden_test_labels(hub):
    data = DataConfig(task="mnli", train_size=10, quiz_size=5, test_size=5)
    assert data.subset == "mnli"  # the task names its subset
    splits = load_splits(data, seed=0)
    assert hub == [("nyu-mll/glue", "mnli")]
    assert splits.num_labels == 3 and splits.sizes() == {"train": 10, "quiz": 5, "validation": 30, "test": 5}
    assert splits.train.pairs is not None and min(splits.test.labels) >= 0  # the test split is carved from train


def test_hub_subset_without_the_task_columns_names_them(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda name, subset: FakeHub(
        train=datasets.Dataset.from_dict({"text": ["a"], "label": [0]}),
        validation=datasets.Dataset.from_dict({"text": ["a"], "label": [0]})))
    with pytest.raises(ConfigError, match=r"^data\.task: rte expects columns sentence1, sentence2, label in "
                                          r"nyu-mll/glue/rte:train; sentence1, sentence2 missing \(columns found: "
                                          r"text, label\)$"):
        load_raw(DataConfig(task="rte"))


def test_missing_task_columns_name_the_task_file_and_columns_found(tmp_path):
    folder = write(tmp_path / "train.tsv", ["index\tsentence\tlabel", "0\ta\tentailment"])
    with pytest.raises(ConfigError) as err:
        load_raw(task_data("rte", folder))
    message = str(err.value)
    assert message.startswith("data.task: rte expects columns sentence1, sentence2, label in ")
    assert str(folder / "train.tsv") in message and "(columns found: index, sentence, label)" in message
    assert "\n" not in message


def test_a_headed_file_for_cola_says_what_layout_it_expects(tmp_path):
    folder = write(tmp_path / "train.tsv", ["sentence\tlabel", "a\t1"])
    with pytest.raises(ConfigError, match=r"line 1 of .*train\.tsv has 2 fields, expected 4 \(source, label, mark, "
                                          r"sentence; the file has no header row\)"):
        load_raw(task_data("cola", folder))


def test_a_score_on_a_classification_task_names_the_task_and_the_row(tmp_path):
    rte(tmp_path, labels=("entailment", "3.800"))
    with pytest.raises(ConfigError, match=r"^data\.task: rte is a classification task \(labels entailment, "
                                          r"not_entailment in column 'label'\); line 3 of .*train\.tsv has '3\.800'$"):
        load_raw(task_data("rte", tmp_path))
    write(tmp_path / "train.tsv", ["gj04\t1\t\ta", "gj04\t2.5\t\tb"])
    with pytest.raises(ConfigError, match=r"^data\.task: cola is a classification task \(labels 0, 1 in column "
                                          r"'label'\); line 2 of .*train\.tsv has '2\.5'$"):
        load_raw(task_data("cola", tmp_path))


def test_a_class_label_on_the_regression_task_is_refused(tmp_path):
    folder = stsb(tmp_path)
    text = (folder / "train.tsv").read_text().replace("\t0.800\n", "\tentailment\n", 1)
    (folder / "train.tsv").write_text(text)
    data = task_data("stsb", folder)
    with pytest.raises(ConfigError, match=r"^data\.task: stsb is a regression task \(a number in column 'score'\); "
                                          r"line 3 of .*train\.tsv has 'entailment'$"):
        load_raw(data)


def test_a_folder_without_train_tsv_names_the_layout(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.path: no train\.tsv in .*GLUE's raw layout: train\.tsv, "
                                          r"dev_matched\.tsv\)$"):
        load_raw(task_data("mnli", tmp_path))


@pytest.mark.parametrize("data, message", [
    ({"task": "mrpc", "text_column": "#1 String"}, (r"data\.text_column: is fixed by data\.task mrpc \(columns "
     r"sentence1, sentence2, label on the hub, #1 String, #2 String, Quality in raw GLUE files\); remove it")),
    ({"task": "rte", "text_pair_column": "b"}, r"data\.text_pair_column: is fixed by data\.task rte"),
    ({"task": "cola", "subset": "sst2"}, r"data\.subset: 'sst2' is not the hub subset of data\.task cola"),
    ({"task": "cola", "name": "synthetic"}, r"data\.name: 'synthetic' has no GLUE task"),
    ({"task": "glue"}, r"data\.task: Input should be 'cola', 'sst2', "),
])
def test_config_refuses_what_the_task_fixes(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"algorithm": "finetune", "data": data})


def test_a_task_config_reads_back_the_same():
    cfg = parse_config({"algorithm": "finetune", "data": {"task": "qnli"}})
    assert cfg.data.subset == "qnli"
    assert parse_config(cfg.model_dump(mode="json")) == cfg


def test_custom_files_read_pairs_through_text_pair_column(tmp_path):
    write(tmp_path / "train.csv", ["a,b,y", *[f"first {i},second {i},{i % 2}" for i in range(20)]])
    data = DataConfig(path=str(tmp_path / "train.csv"), text_column="a", text_pair_column="b", label_column="y",
                      train_size=10, quiz_size=2, validation_size=4, test_size=4)
    splits = load_splits(data, seed=0)
    assert has_pairs(data) and splits.metrics == ("accuracy",)
    assert [p.replace("second", "first") for p in splits.train.pairs] == splits.train.texts
    with pytest.raises(ConfigError, match=r"^data\.text_pair_column: column 'c' not in .*train\.csv \(columns: a, b, "
                                          r"y\)$"):
        load_raw(data.model_copy(update={"text_pair_column": "c"}))


@pytest.mark.skipif(not GLUE.is_dir(), reason="no ../shared/data/glue")
@pytest.mark.parametrize("task, train, dev, dev_labels", [
    ("cola", 8051, 1043, {0: 322, 1: 721}), ("mrpc", 3367, 408, {0: 129, 1: 279}),
    ("rte", 2290, 277, {0: 146, 1: 131}), ("stsb", 5449, 1500, None)])
def test_real_glue_files(task, train, dev, dev_labels):
    raw = load_raw(task_data(task, GLUE / task))
    assert (len(raw["train"]), len(raw["validation"])) == (train, dev)
    if dev_labels:
        labels = raw["validation"].labels
        assert {c: labels.count(c) for c in set(labels)} == dev_labels
    else:
        assert 0 <= min(raw["validation"].labels) < max(raw["validation"].labels) <= 5
    assert (raw["train"].pairs is not None) == (task != "cola")


def test_a_glue_data_folder_serves_every_task_by_glue_names(tmp_path):
    cola(tmp_path / "CoLA")
    stsb(tmp_path / "STS-B")
    assert load_raw(task_data("cola", tmp_path))["train"].pairs is None
    scores = load_raw(task_data("stsb", tmp_path))["train"]
    assert scores.pairs is not None and scores.regression
    with pytest.raises(ConfigError, match=r"^data\.path: no train\.tsv in .* \(data\.task rte reads GLUE's raw "
                                          r"layout: train\.tsv, dev\.tsv\)$"):
        load_raw(task_data("rte", tmp_path))


def test_the_main_metric_of_no_task_is_accuracy():
    assert [main_metric(t) for t in (None, "cola", "stsb", "mrpc", "sst2")] == \
        ["accuracy", "mcc", "pearson", "f1", "accuracy"]
    assert set(METRIC_NAMES) == {m for t in TASKS.values() for m in t.metrics} and set(TITLES) == set(TASKS)


def test_a_null_train_size_takes_every_example_left(tmp_path):
    splits = load_splits(task_data("cola", cola(tmp_path, n=40), train_size=None, quiz_size=5, test_size=5), seed=1)
    assert (len(splits.train), len(splits.quiz), len(splits.test), len(splits.validation)) == (30, 5, 5, 10)
    with pytest.raises(ConfigError, match=r"data\.train_size: synthetic data has no size of its own; give a number"):
        parse_config({"data": {"name": "synthetic", "train_size": None}})


def test_mnli_keeps_its_mismatched_dev_set_apart(tmp_path):
    header = "index\tpromptID\tpairID\tgenre\ts1bp\ts2bp\ts1p\ts2p\tsentence1\tsentence2\tlabel1\tgold_label"
    labels = ("entailment", "neutral", "contradiction")

    def rows(n, tag):
        return [header, *(f"{i}\t1\t1\tfiction\t-\t-\t-\t-\t{tag} premise {i}\t{tag} hypothesis {i}\t-\t{labels[i % 3]}"
                          for i in range(n))]

    write(tmp_path / "train.tsv", rows(40, "train"))
    write(tmp_path / "dev_matched.tsv", rows(9, "matched"))
    write(tmp_path / "dev_mismatched.tsv", rows(12, "mismatched"))
    splits = load_splits(task_data("mnli", tmp_path), seed=0)
    assert splits.sizes() == {"train": 20, "quiz": 5, "validation": 9, "test": 5, "validation_mismatched": 12}
    mismatched = splits.extra["mismatched"]
    assert mismatched.texts[0] == "mismatched premise 0" and mismatched.labels[:3] == [0, 1, 2]
    assert all(t.startswith("matched") for t in splits.validation.texts)
