"""Data: local files in every supported format, deterministic disjoint splits, errors naming the key, real SST-2,
and the Collator's aligned multi-tokenizer batches with per-role noise."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch

from trainer.config import ConfigError, DataConfig, NoiseConfig, NoiseSide
from trainer.data import Collator, TextSet, index_batches, load_splits, synthetic_sentiment
from trainer.datafiles import read_labelled

SST2 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sst2"
N = 80


def rows(n: int, prefix: str = "train", label=lambda i: i % 2) -> pd.DataFrame:
    return pd.DataFrame({"sentence": [f"{prefix} sentence number {i} ." for i in range(n)],
                         "label": [label(i) for i in range(n)]})


def write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")))
    elif path.suffix == ".parquet":
        frame.to_parquet(path)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    write(rows(N), tmp_path / "train.tsv")
    write(rows(20, "validation"), tmp_path / "validation.tsv")
    return tmp_path


def cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **{"train_size": 40, "quiz_size": 10, "test_size": 15, **kw})


def assert_disjoint(*parts: TextSet):
    seen = [t for part in parts for t in part.texts]
    assert len(seen) == len(set(seen)), "splits overlap"


def test_folder_splits_have_the_requested_sizes_and_are_disjoint(folder):
    splits = load_splits(cfg(folder), seed=0)
    assert splits.sizes() == {"train": 40, "quiz": 10, "validation": 20, "test": 15}
    assert_disjoint(splits.train, splits.quiz, splits.test)
    # train, quiz and test come from train.tsv, validation from validation.tsv
    assert all(t.startswith("train ") for p in (splits.train, splits.quiz, splits.test) for t in p.texts)
    assert all(t.startswith("validation ") for t in splits.validation.texts)
    assert splits.num_labels == 2
    # labels stay attached to their texts
    for part in (splits.train, splits.quiz, splits.validation, splits.test):
        for text, label in zip(part.texts, part.labels):
            assert label == int(text.split()[3]) % 2


def test_splits_are_deterministic_for_a_seed(folder):
    a, b = load_splits(cfg(folder), seed=3), load_splits(cfg(folder), seed=3)
    for name in ("train", "quiz", "validation", "test"):
        assert getattr(a, name) == getattr(b, name)
    # split_seed, when set, wins over the trial seed
    c, d = load_splits(cfg(folder, split_seed=9), seed=3), load_splits(cfg(folder, split_seed=9), seed=4)
    assert c.train == d.train and c.quiz == d.quiz and c.test == d.test


def test_train_subset_seed_changes_only_the_train_examples(folder):
    base = DataConfig(path=str(folder), train_size=30, quiz_size=10, test_size=10)
    a = load_splits(base, seed=5)
    b = load_splits(base.model_copy(update={"train_subset_seed": 1}), seed=5)
    assert a.quiz.texts == b.quiz.texts and a.test.texts == b.test.texts and a.validation.texts == b.validation.texts
    assert len(b.train) == 30 and set(a.train.texts) != set(b.train.texts)
    assert not set(b.train.texts) & (set(b.quiz.texts) | set(b.test.texts))


def test_different_split_seed_gives_different_splits(folder):
    a, b = load_splits(cfg(folder, split_seed=1), seed=0), load_splits(cfg(folder, split_seed=2), seed=0)
    assert set(a.quiz.texts) != set(b.quiz.texts)
    assert set(a.train.texts) != set(b.train.texts)
    assert load_splits(cfg(folder), seed=1).train != load_splits(cfg(folder), seed=2).train


def test_validation_size_subsamples_the_validation_split(folder):
    splits = load_splits(cfg(folder, validation_size=5), seed=0)
    assert len(splits.validation) == 5 and len(set(splits.validation.texts)) == 5


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl", ".parquet"])
def test_reads_each_file_type_as_a_folder(tmp_path, suffix):
    write(rows(N), tmp_path / f"train{suffix}")
    write(rows(20, "validation"), tmp_path / f"dev{suffix}")  # 'dev' is accepted as the validation name
    splits = load_splits(cfg(tmp_path), seed=0)
    assert splits.sizes() == {"train": 40, "quiz": 10, "validation": 20, "test": 15}
    assert sorted(splits.validation.texts) == sorted(rows(20, "validation").sentence)


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl", ".parquet"])
def test_reads_a_single_file_carving_validation_from_train(tmp_path, suffix):
    path = write(rows(N), tmp_path / f"data{suffix}")
    splits = load_splits(cfg(path, validation_size=12), seed=0)
    assert splits.sizes() == {"train": 40, "quiz": 10, "validation": 12, "test": 15}
    assert_disjoint(splits.train, splits.quiz, splits.validation, splits.test)
    everything = sorted(t for p in (splits.train, splits.quiz, splits.validation, splits.test) for t in p.texts)
    assert set(everything) <= set(rows(N).sentence)


def test_single_file_needs_validation_size(tmp_path):
    path = write(rows(N), tmp_path / "data.csv")
    with pytest.raises(ConfigError, match=r"^data\.validation_size: .*no validation split"):
        load_splits(cfg(path), seed=0)


def test_tsv_keeps_quotes_and_custom_columns(tmp_path):
    (tmp_path / "train.tsv").write_text("id\ttext\ty\n" + "".join(f'{i}\t"quoted" it\'s {i}\t{i % 3}\n'
                                                                  for i in range(30)))
    (tmp_path / "validation.tsv").write_text("id\ttext\ty\n0\t\"a\" b\t2\n")
    splits = load_splits(cfg(tmp_path, text_column="text", label_column="y", train_size=10, quiz_size=5,
                             test_size=5), seed=0)
    assert all(t.startswith('"quoted" it\'s ') for t in splits.train.texts)
    assert splits.validation.texts == ['"a" b'] and splits.num_labels == 3


def test_labelled_test_file_is_the_test_split(folder):
    write(rows(30, "test"), folder / "test.tsv")
    splits = load_splits(cfg(folder, test_size=12), seed=0)
    assert len(splits.test) == 12
    assert all(t.startswith("test ") for t in splits.test.texts)
    assert len(set(splits.test.texts)) == 12
    # nothing is carved from train for test, so train + quiz can use all of it
    whole = load_splits(cfg(folder, train_size=N - 10, test_size=12), seed=0)
    assert len(whole.train) == N - 10 and len(whole.test) == 12


def test_unlabelled_test_file_is_ignored(folder):
    write(rows(30, "test", label=lambda i: -1), folder / "test.tsv")  # GLUE-style hidden labels
    splits = load_splits(cfg(folder), seed=0)
    assert len(splits.test) == 15 and all(t.startswith("train ") for t in splits.test.texts)
    assert_disjoint(splits.train, splits.quiz, splits.test)


def test_missing_column_names_the_key(folder):
    with pytest.raises(ConfigError, match=r"^data\.text_column: column 'text' not in .*train\.tsv.*sentence, label"):
        load_splits(cfg(folder, text_column="text"), seed=0)
    with pytest.raises(ConfigError, match=r"^data\.label_column: column 'y' not in"):
        load_splits(cfg(folder, label_column="y"), seed=0)


def test_non_integer_labels_name_the_key(tmp_path):
    write(rows(N, label=lambda i: "pos"), tmp_path / "train.csv")
    write(rows(5, "validation"), tmp_path / "validation.csv")
    with pytest.raises(ConfigError, match=r"^data\.label_column: 'label' in .*train\.csv must hold whole-number class "
                       r"labels \(0, 1, \.\.\.\); line 2 has 'pos'$"):
        load_splits(cfg(tmp_path), seed=0)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_fractional_labels_are_refused_and_whole_floats_are_labels(tmp_path, suffix):
    """0.5 used to become the label 0 without a word; 1.0 (a float column of whole numbers) is the label 1."""
    write(rows(N, label=lambda i: float(i % 2)), tmp_path / f"train{suffix}")
    write(rows(5, "validation", label=lambda i: 0.5 if i == 3 else 1), tmp_path / f"validation{suffix}")
    with pytest.raises(ConfigError, match=r"^data\.label_column: 'label' in .*validation\S* must hold whole-number "
                                          r"class labels .* has '?0\.5'?$"):
        load_splits(cfg(tmp_path), seed=0)
    write(rows(5, "validation"), tmp_path / f"validation{suffix}")
    assert set(load_splits(cfg(tmp_path), seed=0).train.labels) == {0, 1}


def test_texts_are_read_verbatim(tmp_path):
    """A pandas reader turned the sentence 'null' into a missing value and '007' into 7."""
    texts = ["null", "007", "NA", " padded ", "1.50", ""]
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(texts)))
    assert read_labelled(path, "sentence", "label") == TextSet(texts, [0, 1, 0, 1, 0, 1])


def test_too_large_train_size_names_the_key(folder):
    with pytest.raises(ConfigError, match=r"^data\.train_size \+ data\.quiz_size \+ data\.test_size: 70 \+ 10 \+ 15 = "
                                          r"95 examples are drawn from the train split, which has 80 \("):
        load_splits(cfg(folder, train_size=70), seed=0)
    load_splits(cfg(folder, train_size=55), seed=0)  # exactly all 80


@pytest.mark.parametrize(("split", "change"), [("validation", {"validation_size": 21}), ("test", {"test_size": 31})])
def test_a_split_larger_than_its_file_names_the_key(folder, split, change):
    """validation_size and a labelled test file's test_size used to give fewer examples than asked, silently."""
    write(rows(30, "test"), folder / "test.tsv")
    size, available = next(iter(change.values())), {"validation": 20, "test": 30}[split]
    with pytest.raises(ConfigError, match=rf"^data\.{split}_size: {size} exceeds the {available} examples of the "
                                          rf"{split} split of .*; lower it$"):
        load_splits(cfg(folder, **change), seed=0)
    assert len(getattr(load_splits(cfg(folder, **{k: v - 1 for k, v in change.items()}), seed=0), split)) == size - 1


def test_the_label_count_comes_from_every_labelled_split(folder):
    """A class no drawn example has is still a class of the task: the count used to come from the drawn examples."""
    write(rows(20, "validation", label=lambda i: 4 if i == 0 else i % 2), folder / "validation.tsv")
    assert load_splits(cfg(folder, validation_size=1, split_seed=0), seed=0).num_labels == 5


def test_missing_path_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.path: .*absent.* does not exist"):
        load_splits(cfg(tmp_path / "absent"), seed=0)


def test_folder_without_train_file_names_the_key(tmp_path):
    write(rows(5), tmp_path / "validation.tsv")
    with pytest.raises(ConfigError, match=r"^data\.path: no train\."):
        load_splits(cfg(tmp_path), seed=0)


def test_unsupported_single_file_names_the_key(tmp_path):
    (tmp_path / "data.txt").write_text("hello\n")
    with pytest.raises(ConfigError, match=r"^data\.path: unsupported file type '\.txt'"):
        load_splits(cfg(tmp_path / "data.txt", validation_size=1), seed=0)


def test_unreachable_hub_dataset_names_the_key(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"data.name: could not load 'nyu-mll/glue' .*set data.path"):
        load_splits(DataConfig(), seed=0)


def test_synthetic_data():
    splits = load_splits(DataConfig(name="synthetic", train_size=50, quiz_size=10, test_size=20,
                                    validation_size=30), seed=0)
    assert splits.sizes() == {"train": 50, "quiz": 10, "validation": 30, "test": 20}
    assert set(splits.train.labels) == {0, 1}


def test_a_split_of_size_zero_needs_no_such_split_in_the_source(folder):
    # the folder has train and validation files only; test_size 0 asks for no test split (bench/step_cost.py does)
    splits = load_splits(DataConfig(path=str(folder), train_size=20, quiz_size=4, test_size=0), seed=0)
    assert splits.sizes()["test"] == 0 and splits.sizes()["train"] == 20


def test_real_sst2_default_sizes():
    if not (SST2 / "train.tsv").is_file():
        pytest.skip(f"real SST-2 not found at {SST2} (train.tsv/validation.tsv); only this machine's shared data "
                    f"has it")
    splits = load_splits(DataConfig(path=str(SST2)), seed=42)
    assert splits.sizes() == {"train": 30_000, "quiz": 100, "validation": 872, "test": 2_000}
    assert splits.num_labels == 2
    # disjoint by example: no sentence is used more often than train.tsv holds it (SST-2 repeats a few sentences)
    source = pd.read_csv(SST2 / "train.tsv", sep="\t", quoting=3, keep_default_na=False)
    available = Counter(source.sentence)
    used = Counter(t for p in (splits.train, splits.quiz, splits.test) for t in p.texts)
    assert all(used[t] <= available[t] for t in used)
    assert sum(used.values()) == 32_100
    # validation is the whole GLUE dev file
    dev = pd.read_csv(SST2 / "validation.tsv", sep="\t", quoting=3, keep_default_na=False)
    assert sorted(splits.validation.texts) == sorted(dev.sentence)
    assert Counter(splits.validation.labels) == Counter(dev.label)


# --- Collator -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data() -> TextSet:
    return synthetic_sentiment(40, 4)["train"]


def words(tokenizer, ids) -> list[str]:
    ids = [int(i) for i in ids if int(i) not in tokenizer.all_special_ids]
    if tokenizer.backend_tokenizer.decoder is not None:
        return tokenizer.decode(ids).split()
    # tests/tiny.py's tokenizers have no decoder: undo WordPiece's "##" / byte-level BPE's space marker by hand
    tokens = tokenizer.convert_ids_to_tokens(ids)
    if type(tokenizer.backend_tokenizer.model).__name__ == "WordPiece":
        return " ".join(tokens).replace(" ##", "").split()
    return "".join(tokens).replace("\u0120", " ").split()


def expected_words(tokenizer, text: str) -> list[str]:
    return text.lower().split() if getattr(tokenizer, "do_lower_case", False) else text.split()


def test_collator_aligns_teachers_with_different_tokenizers(tokenizers, data):
    student_tok, t1, t2 = tokenizers["wordpiece_cased"], tokenizers["wordpiece"], tokenizers["bpe"]
    collate = Collator(student_tok, [t1, t2], max_length=64, noise=NoiseConfig(), seed=0)
    indices = [5, 0, 17, 3]
    batch = collate(data, indices)
    assert torch.equal(batch.labels, torch.tensor([data.labels[i] for i in indices]))
    assert len(batch.teachers) == 2
    for tok, enc in [(student_tok, batch.student), (t1, batch.teachers[0]), (t2, batch.teachers[1])]:
        assert set(enc) == {"input_ids", "attention_mask"}
        assert enc["input_ids"].shape[0] == len(indices) == enc["attention_mask"].shape[0]
        for row, i in enumerate(indices):
            assert words(tok, enc["input_ids"][row]) == expected_words(tok, data.texts[i])
            assert enc["attention_mask"][row].sum() == len(tok(data.texts[i])["input_ids"])
    # the tokenizers really differ
    assert batch.teachers[0]["input_ids"].shape != batch.teachers[1]["input_ids"].shape or \
        not torch.equal(batch.teachers[0]["input_ids"], batch.teachers[1]["input_ids"])


def test_collator_truncates_to_max_length(tokenizers, data):
    collate = Collator(tokenizers["wordpiece_cased"], [tokenizers["bpe"]], max_length=8, noise=NoiseConfig(), seed=0)
    batch = collate(data, range(10))
    assert batch.student["input_ids"].shape[1] <= 8 and batch.teachers[0]["input_ids"].shape[1] <= 8


def test_teachers_sharing_a_tokenizer_share_one_tokenization(tokenizers, data):
    wp, bpe = tokenizers["wordpiece"], tokenizers["bpe"]
    collate = Collator(tokenizers["wordpiece_cased"], [wp, bpe, wp], max_length=64, noise=NoiseConfig(), seed=0)
    batch = collate(data, [1, 2, 3])
    assert batch.teachers[0] is batch.teachers[2]
    assert batch.teachers[0]["input_ids"] is batch.teachers[2]["input_ids"]
    assert batch.teachers[1] is not batch.teachers[0]
    moved = batch.to("cpu")
    assert moved.teachers[0] is moved.teachers[2] and moved.teachers[1] is not moved.teachers[0]
    # a teacher with the student's tokenizer shares the student's tokenization when there is no noise
    same = Collator(wp, [wp], max_length=64, noise=NoiseConfig(), seed=0)(data, [1, 2])
    assert same.teachers[0] is same.student


def test_with_teachers_false_skips_them(tokenizers, data):
    collate = Collator(tokenizers["wordpiece_cased"], [tokenizers["bpe"]], 64, NoiseConfig(), seed=0)
    assert collate(data, [0, 1], with_teachers=False).teachers == []


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


NOISE_WORD = "unrelated"  # in the tokenizers' vocabularies, never in synthetic_sentiment texts


def noisy_collator(tokenizers, student_p: float, teacher_p: float, seed: int = 0) -> Collator:
    noise = NoiseConfig(student=NoiseSide(p=student_p, mode="token", token=NOISE_WORD),
                        teacher=NoiseSide(p=teacher_p, mode="token", token=NOISE_WORD))
    return Collator(tokenizers["wordpiece_cased"], [tokenizers["wordpiece"], tokenizers["bpe"]], 64, noise, seed)


def hit_positions(tokenizer, enc, row) -> list[bool]:
    return [w == NOISE_WORD for w in words(tokenizer, enc["input_ids"][row])]


def test_zero_noise_changes_nothing(tokenizers, data):
    clean = Collator(tokenizers["wordpiece_cased"], [tokenizers["wordpiece"], tokenizers["bpe"]], 64, NoiseConfig(),
                     seed=0)(data, range(12))
    for epoch in (0, 5):
        batch = noisy_collator(tokenizers, 0.0, 0.0)(data, range(12), epoch=epoch)
        assert _equal(batch.student, clean.student)
        for a, b in zip(batch.teachers, clean.teachers):
            assert _equal(a, b)


def test_epoch_none_means_no_noise(tokenizers, data):
    clean = noisy_collator(tokenizers, 0.0, 0.0)(data, range(12))
    batch = noisy_collator(tokenizers, 0.5, 0.5)(data, range(12), epoch=None)
    assert _equal(batch.student, clean.student)
    assert all(_equal(a, b) for a, b in zip(batch.teachers, clean.teachers))


def test_student_and_teacher_noise_are_independent(tokenizers, data):
    collate = noisy_collator(tokenizers, 0.4, 0.4)
    indices = list(range(20))
    batch = collate(data, indices, epoch=1)
    student_tok, t1, t2 = tokenizers["wordpiece_cased"], tokenizers["wordpiece"], tokenizers["bpe"]
    same_rows = 0
    for row, i in enumerate(indices):
        s_hits = hit_positions(student_tok, batch.student, row)
        t_hits = hit_positions(t1, batch.teachers[0], row)
        assert len(s_hits) == len(t_hits) == len(data.texts[i].split())
        # both teachers see the same noisy text
        assert t_hits == hit_positions(t2, batch.teachers[1], row)
        same_rows += s_hits == t_hits
    assert same_rows < len(indices) // 2, "teacher and student noise look identical"
    total_s = sum(sum(hit_positions(student_tok, batch.student, r)) for r in range(len(indices)))
    assert total_s > 0


def test_one_sided_noise(tokenizers, data):
    clean = noisy_collator(tokenizers, 0.0, 0.0)(data, range(12))
    student_only = noisy_collator(tokenizers, 0.5, 0.0)(data, range(12), epoch=0)
    assert not _equal(student_only.student, clean.student)
    assert all(_equal(a, b) for a, b in zip(student_only.teachers, clean.teachers))
    teacher_only = noisy_collator(tokenizers, 0.0, 0.5)(data, range(12), epoch=0)
    assert _equal(teacher_only.student, clean.student)
    assert not _equal(teacher_only.teachers[0], clean.teachers[0])


def test_noise_is_per_example_and_epoch(tokenizers, data):
    collate = noisy_collator(tokenizers, 0.4, 0.4)
    tok = tokenizers["wordpiece_cased"]
    together = collate(data, [3, 7, 9], epoch=2)
    alone = collate(data, [7], epoch=2)
    # example 7's noise does not depend on which batch it is in
    assert words(tok, together.student["input_ids"][1]) == words(tok, alone.student["input_ids"][0])
    again = collate(data, [3, 7, 9], epoch=2)
    assert _equal(again.student, together.student)
    other_epoch = collate(data, list(range(20)), epoch=3)
    this_epoch = collate(data, list(range(20)), epoch=2)
    assert not _equal(other_epoch.student, this_epoch.student)


def test_for_training_builds_a_vocabulary_only_when_needed(tokenizers, data):
    vocab_noise = NoiseConfig(student=NoiseSide(p=0.5, mode="vocab"))
    collate = Collator.for_training(tokenizers["wordpiece_cased"], [], 64, vocab_noise, 0, data)
    assert set(collate.vocabulary) == {w for t in data.texts for w in t.split()}
    batch = collate(data, range(10), epoch=0)
    for row in range(10):
        assert set(words(tokenizers["wordpiece_cased"], batch.student["input_ids"][row])) <= set(collate.vocabulary)
    assert Collator.for_training(tokenizers["wordpiece_cased"], [], 64, NoiseConfig(), 0, data).vocabulary == []


def test_index_batches():
    assert [b.tolist() for b in index_batches(5, 2, None)] == [[0, 1], [2, 3], [4]]
    a = [b.tolist() for b in index_batches(10, 4, seed=1, epoch=0)]
    assert sorted(i for batch in a for i in batch) == list(range(10))
    assert a == [b.tolist() for b in index_batches(10, 4, seed=1, epoch=0)]
    assert a != [b.tolist() for b in index_batches(10, 4, seed=1, epoch=1)]
