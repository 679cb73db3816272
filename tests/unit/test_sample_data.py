"""The SST-2 sample shipped in data/sst2-sample: small, balanced, disjoint, read as the demo reads it, and exactly what
data/make_sst2_sample.py draws from the source it names."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.spec import expand, load_spec
from trainer.data import load_splits

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sst2-sample"
SPLITS = ("train", "validation", "test")
SOURCE = ROOT.parent / "shared" / "data" / "sst2"  # the SST-2 copy the sample was drawn from, where it exists


def rows(split: str) -> list[tuple[str, str]]:
    with (SAMPLE / f"{split}.tsv").open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        assert next(reader) == ["sentence", "label"]
        return [tuple(row) for row in reader]


@pytest.mark.parametrize("split", SPLITS)
def test_every_row_is_a_sentence_and_a_binary_label(split):
    found = rows(split)
    assert len(found) >= 400
    assert all(len(row) == 2 and row[0].strip() and row[1] in ("0", "1") for row in found)


def test_the_sample_is_small():
    assert sum((SAMPLE / f"{split}.tsv").stat().st_size for split in SPLITS) < 250_000


@pytest.mark.parametrize("split", SPLITS)
def test_labels_are_balanced(split):
    labels = [label for _, label in rows(split)]
    assert 0.45 <= labels.count("1") / len(labels) <= 0.55


def test_no_sentence_is_in_two_files_or_twice_in_one():
    train, validation, test = ({sentence for sentence, _ in rows(split)} for split in SPLITS)
    assert len(train) == len(rows("train")) and len(validation) == len(rows("validation"))
    assert not train & validation and not train & test and not validation & test


def test_readme_row_counts_match_the_files():
    readme = (SAMPLE / "README.md").read_text()
    for split in SPLITS:
        found = re.search(rf"\| `{split}\.tsv` \| ([\d,]+) \| ([\d,]+) \|", readme)
        assert found, f"README.md has no row for {split}.tsv"
        positive = sum(label == "1" for _, label in rows(split))
        assert (int(found[1].replace(",", "")), int(found[2].replace(",", ""))) == (len(rows(split)), positive)


def test_the_demo_reads_train_validation_and_test_from_their_files(monkeypatch):
    monkeypatch.chdir(ROOT)  # data.path is relative to the repository root
    data = expand(*load_spec(ROOT / "configs" / "sweep" / "demo.yaml")).trials[0].config.data
    assert Path(data.path).resolve() == SAMPLE
    splits = load_splits(data, seed=1)
    assert splits.sizes() == {"train": data.train_size, "quiz": data.quiz_size, "validation": len(rows("validation")),
                              "test": min(data.test_size, len(rows("test")))}
    assert set(splits.test.texts) <= {sentence for sentence, _ in rows("test")}
    assert set(splits.train.texts) | set(splits.quiz.texts) <= {sentence for sentence, _ in rows("train")}
    assert not set(splits.train.texts) & set(splits.quiz.texts)


@pytest.mark.skipif(not (SOURCE / "train.tsv").is_file(), reason=f"no SST-2 source at {SOURCE}")
def test_the_script_redraws_the_sample_byte_for_byte(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "data" / "make_sst2_sample.py"), str(SOURCE), "--out",
                          str(tmp_path)], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for split in SPLITS:
        assert (tmp_path / f"{split}.tsv").read_bytes() == (SAMPLE / f"{split}.tsv").read_bytes(), split
