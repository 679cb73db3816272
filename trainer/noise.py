"""Word-level noise injection (Liu et al. 2021, as the report applies it).

Each whitespace-separated word is replaced by a noise word with probability p. The draw for one text depends only on
(seed, role, epoch, example index), so it is reproducible, independent of batching, and fresh every epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

ROLES = {"teacher": 1, "student": 2}


def noise_rng(seed: int, role: str, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, ROLES[role], epoch, index])


def add_noise(text: str, p: float, rng: np.random.Generator, token: str | None = None,
              vocabulary: Sequence[str] = ()) -> str:
    """Replace each word with probability p by ``token``, or by a random word of ``vocabulary`` when token is None."""
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
    return " ".join(next(replacements) if hit else word for word, hit in zip(words, hits))


def build_vocabulary(texts: Sequence[str], max_words: int = 50_000) -> list[str]:
    """Distinct words of the texts in first-seen order (deterministic), capped."""
    seen: dict[str, None] = {}
    for text in texts:
        for word in text.split():
            seen.setdefault(word, None)
            if len(seen) >= max_words:
                return list(seen)
    return list(seen)
