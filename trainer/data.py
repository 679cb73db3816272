"""Labelled text: loading, the deterministic train/quiz/validation/test splits, and aligned multi-tokenizer batches."""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trainer.config import ConfigError, DataConfig, NoiseConfig
from trainer.noise import add_noise, build_vocabulary, noise_rng
from trainer.tokenized import TokenCache

_FORMATS = {".tsv": "csv", ".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "dev", "valid", "val"), "test": ("test",)}
# Example indices: a list, or a numpy array (permutations, index batches).
Indices = Sequence[int] | np.ndarray


@dataclass
class TextSet:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, indices: Indices) -> TextSet:
        return TextSet([self.texts[i] for i in indices], [self.labels[i] for i in indices])


@dataclass
class Splits:
    train: TextSet
    quiz: TextSet
    validation: TextSet
    test: TextSet
    num_labels: int

    def sizes(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in ("train", "quiz", "validation", "test")}


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Load the raw splits and draw train/quiz/test (disjoint, deterministic for a seed) and validation."""
    raw = load_raw(cfg)
    rng = np.random.default_rng(cfg.split_seed if cfg.split_seed is not None else seed)
    source = raw["train"]
    order = rng.permutation(len(source))
    test_labelled = "test" in raw and min(raw["test"].labels, default=-1) >= 0
    carved_test = 0 if test_labelled else cfg.test_size
    # A single local file (documented as allowed) has no validation split: it used to be refused outright. Now
    # validation is carved from train as well, disjoint from the rest, and then its size must be given.
    carved_validation = 0
    if "validation" not in raw:
        if cfg.validation_size is None:
            raise ConfigError(f"data.validation_size: {cfg.path or cfg.name} has no validation split (no "
                              f"validation/dev file), so validation is carved from train; set data.validation_size")
        carved_validation = cfg.validation_size
    needed = cfg.train_size + cfg.quiz_size + carved_test + carved_validation
    if needed > len(source):
        raise ConfigError(f"data.train_size: train {cfg.train_size} + quiz {cfg.quiz_size} + test carved from train "
                          f"{carved_test} + validation carved from train {carved_validation} = {needed} exceeds the "
                          f"{len(source)} examples of the train split")
    test = raw["test"].take(rng.permutation(len(raw["test"]))[: cfg.test_size]) if test_labelled \
        else source.take(order[:carved_test])
    quiz = source.take(order[carved_test: carved_test + cfg.quiz_size])
    start = carved_test + cfg.quiz_size
    if carved_validation:
        validation = source.take(order[start: start + carved_validation])
        start += carved_validation
    else:
        validation = raw["validation"]
        if cfg.validation_size is not None:
            validation = validation.take(rng.permutation(len(validation))[: cfg.validation_size])
    pool = order[start:]
    if cfg.train_subset_seed is not None:
        pool = np.random.default_rng([cfg.train_subset_seed, 1]).permutation(pool)
    train = source.take(pool[: cfg.train_size])
    all_labels = [lab for part in (train, quiz, validation, test) for lab in part.labels]
    if min(all_labels) < 0:
        raise ConfigError(f"data.label_column: labels must be integers >= 0, found {min(all_labels)}")
    return Splits(train, quiz, validation, test, num_labels=max(2, max(all_labels) + 1))


def all_texts(cfg: DataConfig) -> list[str]:
    """Every text of the data source, whichever split a seed puts it in (what a token cache must hold)."""
    return [t for part in load_raw(cfg).values() for t in part.texts]


def load_raw(cfg: DataConfig) -> dict[str, TextSet]:
    """The data source's own splits (train, validation, test where it has them), before any split is drawn."""
    if cfg.path is not None:
        return _load_local(cfg, Path(cfg.path))
    if cfg.name == "synthetic":
        return synthetic_sentiment(cfg.train_size + cfg.quiz_size + cfg.test_size, cfg.validation_size or 872)
    import datasets

    try:
        loaded = datasets.load_dataset(cfg.name, cfg.subset)
    except Exception as err:  # noqa: BLE001 - the hub raises many types; the user needs the name and the cause
        raise ConfigError(f"data.name: could not load {cfg.name!r} from the Hugging Face hub ({err}); "
                          f"set data.path to a local labelled file or folder") from None
    return {split: _to_textset(ds, cfg, f"{cfg.name}:{split}") for split, ds in loaded.items()}


def read_labelled_file(path: str, text_column: str = "sentence", label_column: str = "label") -> TextSet:
    """One labelled tsv/csv/jsonl/json/parquet file, whole (e.g. to score a saved student on unseen data)."""
    if not Path(path).is_file():
        raise ConfigError(f"data.path: {path!r} is not a file")
    return _load_local(DataConfig(path=path, text_column=text_column, label_column=label_column), Path(path))["train"]


def _load_local(cfg: DataConfig, path: Path) -> dict[str, TextSet]:
    import datasets

    if path.is_file():
        files = {"train": path}
    elif path.is_dir():
        files = {}
        for split, stems in _SPLIT_NAMES.items():
            found = [p for p in sorted(path.iterdir()) if p.stem in stems and p.suffix in _FORMATS]
            if found:
                files[split] = found[0]
        if "train" not in files:
            raise ConfigError(f"data.path: no train.{{tsv,csv,jsonl,json,parquet}} file in {path}")
    else:
        raise ConfigError(f"data.path: {cfg.path!r} does not exist")
    out = {}
    for split, file in files.items():
        if file.suffix not in _FORMATS:
            raise ConfigError(f"data.path: unsupported file type {file.suffix!r} (allowed: {', '.join(_FORMATS)})")
        kwargs = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if file.suffix == ".tsv" else {}
        ds = datasets.load_dataset(_FORMATS[file.suffix], data_files=str(file), split="train", **kwargs)
        out[split] = _to_textset(ds, cfg, str(file))
    return out


def _to_textset(ds, cfg: DataConfig, where: str) -> TextSet:
    for key, column in (("data.text_column", cfg.text_column), ("data.label_column", cfg.label_column)):
        if column not in ds.column_names:
            raise ConfigError(f"{key}: column {column!r} not in {where} (columns: {', '.join(ds.column_names)})")
    # Whole columns via Arrow: with datasets>=4, ds[column] iterates row by row in Python (~10 s for SST-2's 65k rows
    # on a busy 2-core machine); the Arrow column converts in milliseconds and respects any index mapping.
    columns = ds.with_format("arrow")
    texts = ["" if t is None else str(t) for t in columns[cfg.text_column].to_pylist()]
    try:
        labels = [int(v) for v in columns[cfg.label_column].to_pylist()]
    except (TypeError, ValueError):
        raise ConfigError(f"data.label_column: {cfg.label_column!r} in {where} must hold integer labels") from None
    return TextSet(texts, labels)


def synthetic_sentiment(n_train: int, n_validation: int, seed: int = 0) -> dict[str, TextSet]:
    """A small generated sentiment task: learnable from word identity, with distractor words, no download."""
    rng = np.random.default_rng(seed)
    positive = "good great wonderful superb lovely brilliant charming moving delightful fine".split()
    negative = "bad awful boring dull terrible weak tedious clumsy dreadful poor".split()
    filler = "the a this that movie film story plot acting cast script it was is quite very rather truly".split()

    def make(n: int) -> TextSet:
        texts, labels = [], []
        for _ in range(n):
            label = int(rng.integers(2))
            words = list(rng.choice(filler, size=int(rng.integers(4, 9))))
            for _ in range(int(rng.integers(1, 3))):
                words.insert(int(rng.integers(len(words) + 1)), rng.choice(positive if label else negative))
            texts.append(" ".join(words))
            labels.append(label)
        return TextSet(texts, labels)

    return {"train": make(n_train), "validation": make(n_validation)}


@dataclass
class Batch:
    """One step's inputs: labels, the student's tensors, and one tensor dict per teacher (aligned by example)."""

    labels: torch.Tensor
    student: dict[str, torch.Tensor]
    teachers: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def to(self, device: torch.device | str) -> Batch:
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        moved: dict[int, dict] = {}
        teachers = [moved.setdefault(id(t), move(t)) for t in self.teachers]
        return Batch(self.labels.to(device), move(self.student), teachers)


class Collator:
    """Turns example indices into a Batch: noise per role, then one tokenization per distinct tokenizer and text."""

    def __init__(self, student_tokenizer, teacher_tokenizers: Sequence, max_length: int, noise: NoiseConfig,
                 seed: int, vocabulary: Sequence[str] = (), token_cache: str | None = None):
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizers = list(teacher_tokenizers)
        self.max_length = max_length
        self.noise = noise
        self.seed = seed
        self.vocabulary = list(vocabulary)
        self.caches = {}
        if token_cache:
            for tokenizer in [student_tokenizer, *self.teacher_tokenizers]:
                found = TokenCache.load(token_cache, tokenizer, max_length)
                if found:
                    self.caches[id(tokenizer)] = found

    @classmethod
    def for_training(cls, student_tokenizer, teacher_tokenizers, max_length, noise, seed, train: TextSet,
                     token_cache: str | None = None) -> Collator:
        needs_vocab = any(side.p > 0 and side.mode == "vocab" for side in (noise.teacher, noise.student))
        return cls(student_tokenizer, teacher_tokenizers, max_length, noise, seed,
                   build_vocabulary(train.texts) if needs_vocab else (), token_cache)

    def _noisy(self, data: TextSet, indices: Indices, role: str, epoch: int | None) -> list[str]:
        side = getattr(self.noise, role)
        texts = [data.texts[i] for i in indices]
        if epoch is None or side.p <= 0:
            return texts
        token = side.token if side.mode == "token" else None
        return [add_noise(t, side.p, noise_rng(self.seed, role, epoch, int(i)), token, self.vocabulary)
                for t, i in zip(texts, indices)]

    def _tokenize(self, tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
        cache = self.caches.get(id(tokenizer))
        cached = cache.encode(texts) if cache else None
        if cached is not None:
            return cached
        enc = tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def __call__(self, data: TextSet, indices: Indices, epoch: int | None = None,
                 with_teachers: bool = True) -> Batch:
        """epoch=None means no noise (evaluation)."""
        student_texts = self._noisy(data, indices, "student", epoch)
        cache: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

        def encode(tokenizer, texts):
            key = (id(tokenizer), id(texts))
            if key not in cache:
                cache[key] = self._tokenize(tokenizer, texts)
            return cache[key]

        student = encode(self.student_tokenizer, student_texts)
        teachers = []
        if with_teachers and self.teacher_tokenizers:
            same_noise = epoch is None or (self.noise.teacher.p <= 0 and self.noise.student.p <= 0)
            teacher_texts = student_texts if same_noise else self._noisy(data, indices, "teacher", epoch)
            teachers = [encode(tok, teacher_texts) for tok in self.teacher_tokenizers]
        labels = torch.tensor([data.labels[i] for i in indices], dtype=torch.long)
        return Batch(labels, student, teachers)


def index_batches(n: int, batch_size: int, seed: int | None, epoch: int = 0) -> Iterator[np.ndarray]:
    """Index batches over n examples; shuffled by (seed, epoch) when seed is given, in order otherwise."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if seed is not None else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start: start + batch_size]
