"""Word-level noise: p=0 is the identity, the replaced fraction matches p, draws are reproducible per
(seed, role, epoch, index), and the two modes draw their noise words from the right place."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.noise import add_noise, build_vocabulary, noise_rng

WORDS = [f"w{i}" for i in range(40)]
TEXT = " ".join(WORDS)


def test_p_zero_returns_the_text_unchanged():
    text = "  an   odd\tspacing , kept  exactly "
    for token in (None, "[UNK]"):
        assert add_noise(text, 0.0, noise_rng(0, "student", 0, 0), token, ["x"]) is text
    # p=0 consumes no randomness either
    rng = noise_rng(0, "student", 0, 0)
    add_noise(TEXT, 0.0, rng, "[UNK]")
    assert rng.random() == noise_rng(0, "student", 0, 0).random()


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.6, 0.9])
def test_replaced_fraction_matches_p(p):
    """Over 200 texts x 40 words the fraction of replaced words is within 4 standard errors of p."""
    n_texts = 200
    replaced = 0
    for index in range(n_texts):
        noisy = add_noise(TEXT, p, noise_rng(7, "teacher", 0, index), token="<noise>").split()
        assert len(noisy) == len(WORDS)
        for original, out in zip(WORDS, noisy):
            assert out in (original, "<noise>")
        replaced += sum(out == "<noise>" for out in noisy)
    n = n_texts * len(WORDS)
    fraction = replaced / n
    se = math.sqrt(p * (1 - p) / n)
    assert abs(fraction - p) < 4 * se, (fraction, p, se)


def test_replacement_happens_per_word_independently():
    """Every position gets replaced sometimes (not a fixed subset of positions)."""
    hits = np.zeros(len(WORDS))
    for index in range(300):
        noisy = add_noise(TEXT, 0.2, noise_rng(0, "student", 3, index), token="#").split()
        hits += [w == "#" for w in noisy]
    assert (hits > 0).all()
    # and each position's rate is plausible (binomial 300, 0.2: mean 60, sd ~7)
    assert hits.min() > 25 and hits.max() < 100


def test_same_key_same_draw():
    vocab = [f"v{i}" for i in range(1000)]
    for token in ("[UNK]", None):
        a = add_noise(TEXT, 0.5, noise_rng(3, "student", 2, 17), token, vocab)
        b = add_noise(TEXT, 0.5, noise_rng(3, "student", 2, 17), token, vocab)
        assert a == b and a != TEXT


@pytest.mark.parametrize("other", [(4, "student", 2, 17), (3, "teacher", 2, 17), (3, "student", 3, 17),
                                   (3, "student", 2, 18)], ids=["seed", "role", "epoch", "index"])
def test_different_key_different_draw(other):
    vocab = [f"v{i}" for i in range(1000)]
    reference = add_noise(TEXT, 0.5, noise_rng(3, "student", 2, 17), None, vocab)
    assert add_noise(TEXT, 0.5, noise_rng(*other), None, vocab) != reference
    # also which positions are hit differs (not just which vocabulary words)
    hit_ref = [w.startswith("v") for w in reference.split()]
    hit_other = [w.startswith("v") for w in add_noise(TEXT, 0.5, noise_rng(*other), None, vocab).split()]
    assert hit_ref != hit_other


def test_unknown_role_is_refused():
    with pytest.raises(KeyError):
        noise_rng(0, "pilot", 0, 0)


def test_token_mode_uses_the_token():
    noisy = add_noise(TEXT, 0.5, noise_rng(0, "teacher", 0, 0), token="[MASK]").split()
    replaced = [w for w, o in zip(noisy, WORDS) if w != o]
    assert replaced and set(replaced) == {"[MASK]"}


def test_vocab_mode_draws_from_the_vocabulary():
    vocab = [f"noise{i}" for i in range(50)]
    seen = set()
    for index in range(50):
        noisy = add_noise(TEXT, 0.5, noise_rng(0, "student", 0, index), None, vocab).split()
        for original, out in zip(WORDS, noisy):
            assert out == original or out in vocab
            if out != original:
                seen.add(out)
    # ~1000 draws over 50 words: all of them appear (a draw that ignored the vocabulary would not)
    assert seen == set(vocab)


def test_vocab_mode_needs_a_vocabulary():
    with pytest.raises(ValueError, match="vocabulary"):
        add_noise(TEXT, 0.9, noise_rng(0, "student", 0, 0), None, [])


def test_build_vocabulary_is_ordered_distinct_and_capped():
    texts = ["b a b", "c a", "d e f"]
    assert build_vocabulary(texts) == ["b", "a", "c", "d", "e", "f"]
    assert build_vocabulary(texts, max_words=4) == ["b", "a", "c", "d"]
