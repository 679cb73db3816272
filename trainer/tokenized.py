"""Texts tokenized once per tokenizer: a sweep prepares them before its trials, which then look them up.

A cache file holds, for one tokenizer (identified by its content, not its name: a teacher fine-tuned by the sweep saves
a copy of its base model's tokenizer) and one ``max_length``, the truncated token ids of every text of the sweep's data,
or of every sentence pair (encoded as a pair, truncated longest first, in a file of its own key). Batches are padded
from it exactly as the tokenizer would pad them. Texts it does not hold (noisy texts, which change every epoch) are
tokenized on the fly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from trainer.datafiles import Example


def cache_key(tokenizer, max_length: int, pairs: bool = False) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # a call with padding or truncation stores them in the backend's JSON: the same tokenizer, before and after
        state = json.loads(backend.to_str())
        identity = json.dumps({k: v for k, v in state.items() if k not in ("truncation", "padding")}, sort_keys=True)
    else:
        identity = repr(sorted(tokenizer.get_vocab().items()))
    # "|pairs" only for pairs: the caches of single texts written before pairs existed keep their names
    digest = hashlib.sha256(f"{identity}|{max_length}|{tokenizer.padding_side}{'|pairs' if pairs else ''}"
                            .encode()).hexdigest()
    return f"{digest[:16]}-len{max_length}"


class TokenCache:
    def __init__(self, ids: dict[Example, list[int]], pad_id: int, padding_side: str):
        self.ids = ids
        self.pad_id = pad_id
        self.padding_side = padding_side

    @classmethod
    def build(cls, tokenizer, texts: Sequence[Example], max_length: int) -> TokenCache:
        """The ids of ``texts``: all single texts, or all (text, pair) tuples."""
        unique = list(dict.fromkeys(texts))
        firsts, pairs = ([t[0] for t in unique], [t[1] for t in unique]) if unique and isinstance(unique[0], tuple) \
            else (unique, None)
        encoded = tokenizer(firsts, pairs, truncation=True, max_length=max_length)["input_ids"]
        return cls(dict(zip(unique, encoded)), tokenizer.pad_token_id, tokenizer.padding_side)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")  # trials of a resumed sweep must never see half a file
        torch.save({"ids": self.ids, "pad_id": self.pad_id, "padding_side": self.padding_side}, partial)
        partial.replace(path)

    @classmethod
    def load(cls, folder: str | Path, tokenizer, max_length: int, pairs: bool = False) -> TokenCache | None:
        path = Path(folder) / f"{cache_key(tokenizer, max_length, pairs)}.pt"
        if not path.is_file():
            return None
        state = torch.load(path, weights_only=True)
        return cls(state["ids"], state["pad_id"], state["padding_side"])

    def encode(self, texts: Sequence[Example]) -> dict[str, torch.Tensor] | None:
        """Padded input_ids and attention_mask, as the tokenizer returns them; None if a text is not cached."""
        try:
            rows = [self.ids[t] for t in texts]
        except KeyError:
            return None
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(0, len(row)) if self.padding_side == "right" else slice(width - len(row), width)
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return {"input_ids": ids, "attention_mask": mask}


def takes_segments(tokenizer, config) -> bool:
    """Whether a model reads the segment ids (``token_type_ids``) of sentence pairs: its tokenizer returns them and
    the model has a segment embedding for each sentence (BERT, MiniLM-BERT). DistilBERT has none, RoBERTa's
    tokenizer does not return them; a DistilBERT with a BERT tokenizer (the same vocabulary) must not get them."""
    names = getattr(tokenizer, "model_input_names", ())
    has_sep = getattr(tokenizer, "sep_token_id", None) is not None  # segment_ids finds the second sentence by it
    return "token_type_ids" in names and has_sep and (getattr(config, "type_vocab_size", None) or 0) >= 2


def segment_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, sep_id: int) -> torch.Tensor:
    """The ``token_type_ids`` a BERT tokenizer gives encoded pairs: 0 up to and including the first separator, 1 after
    it, 0 on padding. Derived from the ids, so that cached ids (the cache holds no segment ids) and fresh ones get the
    same."""
    sep = (input_ids == sep_id).long()
    return ((sep.cumsum(dim=1) - sep) > 0).long() * attention_mask


def prepare_token_caches(configs: Sequence) -> list[Path]:
    """Write the token cache of every tokenizer the trials (``TrialConfig``s with ``data.token_cache``) will use.

    A tokenizer that cannot be loaded yet (a teacher the sweep has still to fine-tune) is skipped: it is a copy of its
    base model's, which is prepared for the fine-tuning trial and found again by content. An existing cache is
    extended with texts it lacks, never rebuilt from scratch.
    """
    from trainer.config import ConfigError
    from trainer.data import all_texts, has_pairs
    from trainer.models import load_tokenizer

    texts: dict[str, list[Example]] = {}  # data config -> its texts (or pairs), loaded once
    tokenizers: dict[str, object] = {}  # tokenizer source -> tokenizer (None: not loadable yet)
    # cache file -> (tokenizer, max_length, pairs, data configs)
    wanted: dict[Path, tuple[object, int, bool, set[str]]] = {}
    for cfg in configs:
        if not cfg.data.token_cache:
            continue
        data_key = cfg.data.model_dump_json(exclude={"token_cache", "logit_cache", "train_subset_seed", "split_seed"})
        for i, spec in enumerate([cfg.student, *cfg.teachers]):
            source = spec.tokenizer or spec.name
            if source not in tokenizers:
                try:
                    tokenizers[source] = load_tokenizer(spec, "student" if i == 0 else f"teachers.{i - 1}")
                except ConfigError:
                    tokenizers[source] = None
            if tokenizers[source] is None:
                continue
            if data_key not in texts:
                texts[data_key] = all_texts(cfg.data)
            pairs = has_pairs(cfg.data)
            path = Path(cfg.data.token_cache) / f"{cache_key(tokenizers[source], cfg.data.max_length, pairs)}.pt"
            wanted.setdefault(path, (tokenizers[source], cfg.data.max_length, pairs, set()))[3].add(data_key)
    for path, (tokenizer, max_length, pairs, data_keys) in wanted.items():
        needed = [t for k in sorted(data_keys) for t in texts[k]]
        cache = TokenCache.load(path.parent, tokenizer, max_length, pairs)
        missing = needed if cache is None else [t for t in needed if t not in cache.ids]
        if missing:
            fresh = TokenCache.build(tokenizer, missing, max_length)
            fresh.ids = {**(cache.ids if cache else {}), **fresh.ids}
            fresh.save(path)
    return list(wanted)
