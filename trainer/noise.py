"""Word-level noise injection (Liu et al. 2021, as the report applies it).

Each whitespace-separated word is replaced by a noise word with probability p. The draw for one text depends only on
(seed, role, epoch, example index), so it is reproducible, independent of batching, and fresh every epoch.

The noise tokens "[UNK]" and "[MASK]" name each tokenizer's own unknown and mask token: written as BERT spells them,
a RoBERTa tokenizer reads "[UNK]" as six pieces of text, not as its "<unk>".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

ROLES = {"teacher": 1, "student": 2}
_SPECIAL = {"[UNK]": ("unk_token", "mask_token"), "[MASK]": ("mask_token", "unk_token")}  # each with its fallback


def noise_rng(seed: int, role: str, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, ROLES[role], epoch, index])


def noise_token(token: str, tokenizer) -> tuple[str, bool]:
    """How ``tokenizer`` is given the noise token: (its text, whether it is a special token). "[UNK]" and "[MASK]"
    become the tokenizer's own unknown and mask token (the other one where it lacks one); other words stay as they are.
    """
    for attribute in _SPECIAL.get(token, ()):
        special = getattr(tokenizer, attribute, None)
        if special:
            return str(special), True
    return token, False


def add_noise(text: str, p: float, rng: np.random.Generator, token: str | None = None,
              vocabulary: Sequence[str] = (), glue: bool = False) -> str:
    """Replace each word with probability p by ``token``, or by a random word of ``vocabulary`` when token is None.

    ``glue`` writes the token against the word before it: a byte-level BPE tokenizer (RoBERTa's) reads the space
    before a special token as a token of its own, and a special token is split off its neighbours anyway.
    """
    if p <= 0:
        return text
    words = text.split()
    hits = rng.random(len(words)) < p
    if not hits.any():
        return text
    if token is None:
        if not vocabulary:
            raise ValueError("noise needs a token or a non-empty vocabulary")
        picks = rng.integers(len(vocabulary), size=int(hits.sum()))
        replacements: Iterator[str] = iter(vocabulary[i] for i in picks)
    else:
        replacements = iter([token] * int(hits.sum()))
    out: list[str] = []
    for word, hit in zip(words, hits):
        if hit and glue and out:
            out[-1] += next(replacements)
        else:
            out.append(next(replacements) if hit else word)
    return " ".join(out)


def build_vocabulary(texts: Sequence[str], max_words: int = 50_000) -> list[str]:
    """Distinct words of the texts in first-seen order (deterministic), capped."""
    seen: dict[str, None] = {}
    for text in texts:
        for word in text.split():
            seen.setdefault(word, None)
            if len(seen) >= max_words:
                return list(seen)
    return list(seen)
