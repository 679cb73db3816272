"""Labelled text: loading, the deterministic train/quiz/validation/test splits, and aligned multi-tokenizer batches.

torch is imported where batches are made, not at the top: ``metadistil validate`` draws the splits (trainer.preflight)
without paying for it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trainer.config import ConfigError, DataConfig, NoiseConfig
from trainer.datafiles import FORMATS, Example, TextSet, read_labelled, verbatim, whole_number
from trainer.noise import add_noise, build_vocabulary, noise_rng, noise_token
from trainer.tasks import TASKS, from_hub, read_raw

if TYPE_CHECKING:
    import torch

_SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "dev", "valid", "val"), "test": ("test",)}
# Example indices: a list, or a numpy array (permutations, index batches).
Indices = Sequence[int] | np.ndarray


@dataclass
class Splits:
    train: TextSet
    quiz: TextSet
    validation: TextSet
    test: TextSet
    num_labels: int
    metrics: tuple[str, ...] = ("accuracy",)  # trainer.metrics names; the first picks the best checkpoint
    # further dev sets the kept weights are scored on at the end, by name (MNLI's "mismatched")
    extra: dict[str, TextSet] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {**{name: len(getattr(self, name)) for name in ("train", "quiz", "validation", "test")},
                **{f"validation_{name}": len(part) for name, part in self.extra.items()}}


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Load the raw splits and draw train/quiz/test (disjoint, deterministic for a seed) and validation."""
    raw = load_raw(cfg)
    source_name = cfg.path or cfg.name
    rng = np.random.default_rng(cfg.split_seed if cfg.split_seed is not None else seed)
    source = raw["train"]
    order = rng.permutation(len(source))
    test_labelled = "test" in raw and min(raw["test"].labels, default=-1) >= 0
    task = TASKS[cfg.task] if cfg.task else None
    # a task's labels were checked against its classes as they were read
    num_labels = task.num_labels if task else _label_count(
        {name: part for name, part in raw.items() if name != "test" or test_labelled}, source_name)
    carved_test = 0 if test_labelled else cfg.test_size
    # A single local file (documented as allowed) has no validation split: it used to be refused outright. Now
    # validation is carved from train as well, disjoint from the rest, and then its size must be given.
    carved_validation = 0
    if "validation" not in raw:
        if cfg.validation_size is None:
            raise ConfigError(f"data.validation_size: {source_name} has no validation split (no "
                              f"validation/dev file), so validation is carved from train; set data.validation_size")
        carved_validation = cfg.validation_size
    _check_sizes(cfg, raw, carved_test, carved_validation, source_name)
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
    extra = {split.removeprefix("validation_"): raw[split] for split in (task.extra_splits() if task else [])
             if split in raw}
    return Splits(train, quiz, validation, test, num_labels=num_labels,
                  metrics=task.metrics if task else ("accuracy",), extra=extra)


def _label_count(labelled: dict[str, TextSet], source_name: str) -> int:
    """The task's classes, from every labelled split of the source (not only the examples a seed draws)."""
    for split, part in labelled.items():
        if min(part.labels, default=0) < 0:
            raise ConfigError(f"data.label_column: labels must be whole numbers >= 0; the {split} split of "
                              f"{source_name} has {min(part.labels)}")
    return max(2, 1 + int(max(max(part.labels, default=0) for part in labelled.values())))


def _check_sizes(cfg: DataConfig, raw: dict[str, TextSet], carved_test: int, carved_validation: int,
                 source_name: str) -> None:
    """A split asked larger than the data used to come out smaller without a word (validation, a test file)."""
    # a null train_size takes what is left, at least one example
    carved = [("data.train_size", cfg.train_size or 1), ("data.quiz_size", cfg.quiz_size)]
    carved += [("data.test_size", carved_test)] if carved_test else []
    carved += [("data.validation_size", carved_validation)] if carved_validation else []
    needed = sum(size for _, size in carved)
    if needed > len(raw["train"]):
        keys = " + ".join(key for key, _ in carved)
        sizes = " + ".join(str(size) for _, size in carved)
        raise ConfigError(f"{keys}: {sizes} = {needed} examples are drawn from the train split, which has "
                          f"{len(raw['train'])} ({source_name}); lower them")
    given = {"validation": None if carved_validation else cfg.validation_size,
             "test": None if carved_test else cfg.test_size}
    for split, size in given.items():
        if size and size > len(raw[split]):  # 0 asks for none: a source may then have no such split
            raise ConfigError(f"data.{split}_size: {size} exceeds the {len(raw[split])} examples of the {split} split "
                              f"of {source_name}; lower it")


def has_pairs(cfg: DataConfig) -> bool:
    """Whether the examples are sentence pairs (tokenized as pairs, cached under their own key)."""
    return TASKS[cfg.task].raw.pair is not None if cfg.task else cfg.text_pair_column is not None


def all_texts(cfg: DataConfig) -> list[Example]:
    """Every text (or sentence pair) of the data source, whichever split a seed puts it in (what a token cache must
    hold)."""
    return [key for part in load_raw(cfg).values() for key in part.examples()]


def load_raw(cfg: DataConfig) -> dict[str, TextSet]:
    """The data source's own splits (train, validation, test where it has them), before any split is drawn."""
    task = TASKS[cfg.task] if cfg.task else None
    if cfg.path is not None:
        if task:
            return read_raw(task, Path(cfg.path))
        return {split: read_labelled(file, cfg.text_column, cfg.label_column, pair_column=cfg.text_pair_column)
                for split, file in _local_files(Path(cfg.path)).items()}
    if cfg.name == "synthetic":
        # DataConfig refuses a null train_size for synthetic data
        return synthetic_sentiment((cfg.train_size or 0) + cfg.quiz_size + cfg.test_size, cfg.validation_size or 872)
    import datasets

    subset = task.name if task else cfg.subset  # GLUE's hub subsets are named after the tasks
    try:
        loaded = datasets.load_dataset(cfg.name, subset)
    except Exception as err:  # noqa: BLE001 - the hub raises many types; the user needs the name and the cause
        raise ConfigError(f"data.name: could not load {cfg.name!r} from the Hugging Face hub "
                          f"({' '.join(str(err).split())}); set data.path to a local labelled file or folder") from None
    if task:
        return from_hub(task, loaded, f"{cfg.name}/{subset}")
    return {split: _to_textset(ds, cfg, f"{cfg.name}:{split}") for split, ds in loaded.items()}


def _local_files(path: Path) -> dict[str, Path]:
    if path.is_file():
        return {"train": path}
    if not path.is_dir():
        raise ConfigError(f"data.path: {str(path)!r} does not exist")
    files = {}
    for split, stems in _SPLIT_NAMES.items():
        found = [p for p in sorted(path.iterdir()) if p.stem in stems and p.suffix in FORMATS]
        if found:
            files[split] = found[0]
    if "train" not in files:
        raise ConfigError(f"data.path: no train.{{tsv,csv,jsonl,json,parquet}} file in {path}")
    return files


def _to_textset(ds, cfg: DataConfig, where: str) -> TextSet:
    wanted = [("data.text_column", cfg.text_column), ("data.label_column", cfg.label_column)]
    wanted += [("data.text_pair_column", cfg.text_pair_column)] if cfg.text_pair_column else []
    for key, column in wanted:
        if column not in ds.column_names:
            raise ConfigError(f"{key}: column {column!r} not in {where} (columns: {', '.join(ds.column_names)})")
    # Whole columns via Arrow: with datasets>=4, ds[column] iterates row by row in Python (~10 s for SST-2's 65k rows
    # on a busy 2-core machine); the Arrow column converts in milliseconds and respects any index mapping.
    columns = ds.with_format("arrow")
    texts = [verbatim(t) for t in columns[cfg.text_column].to_pylist()]
    pairs = [verbatim(t) for t in columns[cfg.text_pair_column].to_pylist()] if cfg.text_pair_column else None
    setting = f"data.label_column: {cfg.label_column!r} in {where}"
    labels: list[float] = [whole_number(v, setting, f"row {i + 1}")
                           for i, v in enumerate(columns[cfg.label_column].to_pylist())]
    return TextSet(texts, labels, pairs)


def synthetic_sentiment(n_train: int, n_validation: int, seed: int = 0) -> dict[str, TextSet]:
    """A small generated sentiment task: learnable from word identity, with distractor words, no download."""
    rng = np.random.default_rng(seed)
    positive = "good great wonderful superb lovely brilliant charming moving delightful fine".split()
    negative = "bad awful boring dull terrible weak tedious clumsy dreadful poor".split()
    filler = "the a this that movie film story plot acting cast script it was is quite very rather truly".split()

    def make(n: int) -> TextSet:
        texts: list[str] = []
        labels: list[float] = []
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
    indices: np.ndarray | None = None  # the examples' positions in their split (shared teacher logits look them up)

    def to(self, device: torch.device | str) -> Batch:
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        moved: dict[int, dict] = {}
        teachers = [moved.setdefault(id(t), move(t)) for t in self.teachers]
        return Batch(self.labels.to(device), move(self.student), teachers, self.indices)


class Collator:
    """Turns example indices into a Batch: noise per role, then one tokenization per distinct tokenizer and text."""

    def __init__(self, student_tokenizer, teacher_tokenizers: Sequence, max_length: int, noise: NoiseConfig,
                 seed: int, vocabulary: Sequence[str] = (), token_cache: str | None = None, pairs: bool = False,
                 segments: Sequence[bool] = ()):
        """``segments``: for the student's tokenizer, then each teacher's, whether its model reads the segment ids of
        sentence pairs (``trainer.tokenized.takes_segments``); none does where it is shorter."""
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizers = list(teacher_tokenizers)
        self.max_length = max_length
        self.noise = noise
        self.seed = seed
        self.vocabulary = list(vocabulary)
        self.segmented = {id(t) for t, wanted in zip([student_tokenizer, *self.teacher_tokenizers], segments) if wanted}
        self.caches = {}
        if token_cache:
            from trainer.tokenized import TokenCache

            for tokenizer in [student_tokenizer, *self.teacher_tokenizers]:
                found = TokenCache.load(token_cache, tokenizer, max_length, pairs)
                if found:
                    self.caches[id(tokenizer)] = found

    @classmethod
    def for_training(cls, student_tokenizer, teacher_tokenizers, max_length, noise, seed, train: TextSet,
                     token_cache: str | None = None, segments: Sequence[bool] = ()) -> Collator:
        needs_vocab = any(side.p > 0 and side.mode == "vocab" for side in (noise.teacher, noise.student))
        vocabulary = build_vocabulary([*train.texts, *(train.pairs or [])]) if needs_vocab else ()
        return cls(student_tokenizer, teacher_tokenizers, max_length, noise, seed, vocabulary, token_cache,
                   pairs=train.pairs is not None, segments=segments)

    def _segments(self, tokenizer, data: TextSet, indices: Indices, role: str, epoch: int | None
                  ) -> tuple[list[str], list[str] | None]:
        """The examples' texts and second sentences (None for single texts) as ``tokenizer`` reads them in ``role``."""
        side = getattr(self.noise, role)
        texts = [data.texts[i] for i in indices]
        pairs = None if data.pairs is None else [data.pairs[i] for i in indices]
        if epoch is None or side.p <= 0:
            return texts, pairs
        # the same words are hit for every tokenizer (the draw depends on the example only); the noise token is
        # spelled as each tokenizer spells its own unknown token
        token, glue = noise_token(side.token, tokenizer) if side.mode == "token" else (None, False)
        noisy, noisy_pairs = [], []
        for k, i in enumerate(indices):
            rng = noise_rng(self.seed, role, epoch, int(i))
            noisy.append(add_noise(texts[k], side.p, rng, token, self.vocabulary, glue))
            if pairs is not None:  # the same generator goes on: the second sentence draws after the first
                noisy_pairs.append(add_noise(pairs[k], side.p, rng, token, self.vocabulary, glue))
        return noisy, None if pairs is None else noisy_pairs

    def _tokenize(self, tokenizer, texts: list[str], pairs: list[str] | None) -> dict[str, torch.Tensor]:
        cache = self.caches.get(id(tokenizer))
        enc = cache.encode(texts if pairs is None else list(zip(texts, pairs))) if cache else None
        if enc is None:
            full = tokenizer(texts, pairs, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
            enc = {k: full[k] for k in ("input_ids", "attention_mask")}
        # segment ids only for pairs, and only to a model that reads them (takes_segments): a single text's are all 0,
        # the model's default. They come from the ids, cached or not: the token cache holds ids only
        if pairs is not None and self.takes_segments(tokenizer):
            from trainer.tokenized import segment_ids

            enc["token_type_ids"] = segment_ids(enc["input_ids"], enc["attention_mask"], tokenizer.sep_token_id)
        return enc

    def takes_segments(self, tokenizer) -> bool:
        """Whether the model read through ``tokenizer`` gets the segment ids of sentence pairs."""
        return id(tokenizer) in self.segmented

    def __call__(self, data: TextSet, indices: Indices, epoch: int | None = None,
                 with_teachers: bool = True) -> Batch:
        """epoch=None means no noise (evaluation)."""
        encoded: dict[tuple[int, str], dict[str, torch.Tensor]] = {}

        def encode(tokenizer, role: str) -> dict[str, torch.Tensor]:
            key = (id(tokenizer), role)
            if key not in encoded:
                encoded[key] = self._tokenize(tokenizer, *self._segments(tokenizer, data, indices, role, epoch))
            return encoded[key]

        student = encode(self.student_tokenizer, "student")
        teachers = []
        if with_teachers and self.teacher_tokenizers:
            same_noise = epoch is None or (self.noise.teacher.p <= 0 and self.noise.student.p <= 0)
            teachers = [encode(tok, "student" if same_noise else "teacher") for tok in self.teacher_tokenizers]
        import torch

        labels = torch.tensor([data.labels[i] for i in indices], dtype=torch.float if data.regression else torch.long)
        return Batch(labels, student, teachers, np.asarray(indices))


def index_batches(n: int, batch_size: int, seed: int | None, epoch: int = 0) -> Iterator[np.ndarray]:
    """Index batches over n examples; shuffled by (seed, epoch) when seed is given, in order otherwise."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if seed is not None else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start: start + batch_size]
