"""A trial's data splits as MLflow dataset inputs: what the trainer describes (sizes, a digest of the examples, the
source) and what a run in a temporary SQLite store shows (no Ray, no training)."""

from __future__ import annotations

import json

import pytest

from launcher.tracking import MLflowLogger
from trainer.config import DataConfig
from trainer.data import TextSet, load_splits
from trainer.logging import DataSplit
from trainer.loop import data_splits

SIZES = {"train_size": 60, "quiz_size": 10, "validation_size": 20, "test_size": 15}


@pytest.fixture()
def labelled_file(tmp_path):
    """A single local file, every line of which lands in one of the splits (validation and test are carved too)."""
    lines = [f"{'good fine' if i % 2 else 'bad dull'} film number {i}\t{i % 2}" for i in range(sum(SIZES.values()))]
    path = tmp_path / "reviews.tsv"
    path.write_text("sentence\tlabel\n" + "\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One store for the module: creating a SQLite store's tables takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def describe(path) -> list[DataSplit]:
    data = DataConfig(path=str(path), **SIZES)
    return data_splits(data, load_splits(data, seed=0))


def logged_inputs(uri: str, splits: list[DataSplit]) -> dict[str, tuple]:
    """name -> (digest, size, context, source type, source) as the run shows them."""
    from mlflow.tracking import MlflowClient

    logger = MLflowLogger(uri, "datasets")
    logger.log_datasets(splits)
    logger.finish("FINISHED")
    shown = {}
    for item in MlflowClient(uri).get_run(logger.run_id).inputs.dataset_inputs:
        d, tags = item.dataset, {t.key: t.value for t in item.tags}
        shown[d.name] = (d.digest, json.loads(d.profile)["num_rows"], tags["mlflow.data.context"], d.source_type,
                         json.loads(d.source))
    return shown


def test_the_four_splits_are_described_by_size_digest_context_and_source(labelled_file):
    splits = describe(labelled_file)
    assert [(s.name, s.context, s.size) for s in splits] == [
        ("reviews/train", "training", 60), ("reviews/quiz", "quiz", 10), ("reviews/validation", "validation", 20),
        ("reviews/test", "testing", 15)]
    assert {(s.source, s.source_type) for s in splits} == {(str(labelled_file.resolve()), "local")}
    assert len({s.digest for s in splits}) == 4
    assert describe(labelled_file) == splits, "the same data must give the same digests"


def test_a_digest_changes_with_a_text_or_a_label_and_only_there():
    def digest_of(texts, labels):
        splits = load_splits(DataConfig(name="synthetic", **SIZES), seed=0)
        splits.train = TextSet(texts, labels)
        return {s.name: s.digest for s in data_splits(DataConfig(name="synthetic"), splits)}

    base = digest_of(["a good film", "a bad film"], [1, 0])
    for changed in (digest_of(["a good film", "a bad film"], [1, 1]), digest_of(["a good film!", "a bad film"], [1, 0]),
                    digest_of(["a bad film", "a good film"], [0, 1])):
        assert changed["synthetic/train"] != base["synthetic/train"]
        assert {k: v for k, v in changed.items() if k != "synthetic/train"} == \
            {k: v for k, v in base.items() if k != "synthetic/train"}


def test_hub_data_is_named_by_dataset_and_subset():
    data = DataConfig(name="nyu-mll/glue", subset="sst2", **SIZES)
    splits = data_splits(data, load_splits(DataConfig(name="synthetic", **SIZES), seed=0))
    assert [s.name for s in splits] == ["glue/sst2/train", "glue/sst2/quiz", "glue/sst2/validation", "glue/sst2/test"]
    assert {(s.source, s.source_type, s.subset) for s in splits} == {("nyu-mll/glue", "hub", "sst2")}


def test_a_run_shows_the_four_inputs_and_new_digests_when_the_data_changes(labelled_file, uri):
    before = describe(labelled_file)
    shown = logged_inputs(uri, before)
    assert shown == {s.name: (s.digest, s.size, s.context, "local", {"uri": str(labelled_file.resolve())})
                     for s in before}

    lines = labelled_file.read_text().splitlines()
    lines[2] = lines[2].replace("\t1", "\t0")  # one example's label, in whichever split it landed
    labelled_file.write_text("\n".join(lines) + "\n")
    after = describe(labelled_file)
    changed = logged_inputs(uri, after)
    assert [s.size for s in after] == [s.size for s in before]
    assert sum(changed[s.name][0] != shown[s.name][0] for s in before) == 1


def test_hub_and_generated_sources_are_logged_with_credentials_masked(uri):
    splits = [DataSplit("corpus/train", "training", 3, "abc123", "https://alice:pw-123@hub.example/corpus", "hub",
                        "en"),
              DataSplit("synthetic/test", "testing", 2, "def456", "synthetic", "synthetic")]
    shown = logged_inputs(uri, splits)
    source_type, source = shown["corpus/train"][3:]
    assert source_type == "hugging_face"
    assert (source["path"], source["config_name"]) == ("https://***@hub.example/corpus", "en")
    assert shown["synthetic/test"][1:] == (2, "testing", "code", {"tags": {"generator": "synthetic"}})
    assert "pw-123" not in json.dumps(shown)
