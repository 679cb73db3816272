"""Regenerate data/sst2-sample/ from a GLUE SST-2 folder (train.tsv and validation.tsv, header sentence<TAB>label).

    python data/make_sst2_sample.py ../shared/data/sst2     # rewrites data/sst2-sample/{train,validation,test}.tsv

The same source files and arguments always give the same bytes. train.tsv: --train distinct phrases of the SST-2 train
split, half of each label, none equal to a validation sentence. validation.tsv and test.tsv: the SST-2 validation
(dev) split's 872 full sentences, shuffled and cut in two halves with each label split evenly between them (GLUE's test
split has no labels). Rows are copied byte for byte; nothing else is changed. Standard library only.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from collections import Counter
from pathlib import Path

HEADER = "sentence\tlabel"
OUT = Path(__file__).resolve().parent / "sst2-sample"


def read_rows(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header != ["sentence", "label"]:
            raise SystemExit(f"error: {path}: expected the header sentence<TAB>label, found {header}")
        rows = [tuple(row) for row in reader]
    bad = [row for row in rows if len(row) != 2 or row[1] not in ("0", "1")]
    if bad:
        raise SystemExit(f"error: {path}: {len(bad)} rows are not sentence<TAB>0|1, e.g. {bad[0]}")
    return rows


def balanced(rows: list[tuple[str, str]], per_label: int, rng: random.Random) -> list[tuple[str, str]]:
    """``per_label`` rows of each label, drawn in a seeded order, then shuffled together."""
    picked = []
    for label in ("0", "1"):
        of_label = [row for row in rows if row[1] == label]
        if len(of_label) < per_label:
            raise SystemExit(f"error: only {len(of_label)} usable rows with label {label}, {per_label} needed")
        picked += rng.sample(of_label, per_label)
    rng.shuffle(picked)
    return picked


def halves(rows: list[tuple[str, str]], rng: random.Random) -> tuple[list, list]:
    """Two disjoint halves, each label split evenly between them (the odd row of a label goes to the first)."""
    first, second = [], []
    for label in ("0", "1"):
        of_label = [row for row in rows if row[1] == label]
        rng.shuffle(of_label)
        cut = (len(of_label) + 1) // 2
        first += of_label[:cut]
        second += of_label[cut:]
    rng.shuffle(first)
    rng.shuffle(second)
    return first, second


def write(path: Path, rows: list[tuple[str, str]]) -> None:
    path.write_text("".join(f"{line}\n" for line in [HEADER, *("\t".join(row) for row in rows)]), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder with GLUE SST-2's train.tsv and validation.tsv")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    parser.add_argument("--train", type=int, default=2000, help="train rows, an even number (default 2000)")
    parser.add_argument("--seed", type=int, default=13, help="sampling seed (default 13)")
    args = parser.parse_args(argv)
    if args.train < 2 or args.train % 2:
        parser.error(f"--train must be an even number >= 2 (got {args.train})")
    dev = read_rows(args.source / "validation.tsv")
    dev_sentences = {sentence for sentence, _ in dev}
    # Distinct phrases only (SST-2's train split repeats a few hundred), and none that is also a dev sentence, so
    # that no validation or test sentence was seen in training.
    train_pool = sorted({row for row in read_rows(args.source / "train.tsv") if row[0] not in dev_sentences})
    counts = Counter(sentence for sentence, _ in train_pool)
    train_pool = [row for row in train_pool if counts[row[0]] == 1]  # a phrase found with both labels is dropped
    rng = random.Random(args.seed)
    train = balanced(train_pool, args.train // 2, rng)
    validation, test = halves(sorted(dev), rng)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("validation", validation), ("test", test)):
        write(args.out / f"{name}.tsv", rows)
        print(f"{args.out / name}.tsv: {len(rows)} rows, {sum(r[1] == '1' for r in rows)} positive")
    return 0


if __name__ == "__main__":
    sys.exit(main())
