"""Sentence pairs go through every tokenizer as pairs (teachers and student, different tokenizers) and through the
token cache under a key of their own; noise hits both sentences, and token-mode noise is each tokenizer's own
unknown token: one token per noised word, for WordPiece and byte-level BPE alike."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from trainer.config import NoiseConfig, parse_config
from trainer.data import Collator, TextSet, synthetic_sentiment
from trainer.noise import add_noise, noise_rng, noise_token
from trainer.tokenized import TokenCache, cache_key, prepare_token_caches

NAMES = ("wordpiece_cased", "wordpiece", "bpe")


@pytest.fixture(scope="module")
def pairs() -> TextSet:
    source = synthetic_sentiment(48, 4)["train"]
    return TextSet(source.texts[:24], source.labels[:24], pairs=source.texts[24:])


def reference(tokenizer, data: TextSet, indices, max_length: int = 24) -> torch.Tensor:
    texts, second = [data.texts[i] for i in indices], [data.pairs[i] for i in indices]
    return tokenizer(texts, second, padding=True, truncation=True, max_length=max_length,
                     return_tensors="pt")["input_ids"]


def test_every_tokenizer_reads_the_examples_as_pairs(tokenizers, pairs):
    student, *teachers = (tokenizers[n] for n in NAMES)
    batch = Collator(student, teachers, 24, NoiseConfig(), seed=0)(pairs, [3, 0, 7])
    for tok, enc in zip([student, *teachers], [batch.student, *batch.teachers]):
        assert torch.equal(enc["input_ids"], reference(tok, pairs, [3, 0, 7]))
        separators = (enc["input_ids"] == tok.sep_token_id).sum(dim=1)
        assert separators.tolist() == [2 if tok.sep_token == "[SEP]" else 3] * 3  # RoBERTa: </s></s> between


def test_pair_caches_have_their_own_key_and_equal_the_tokenizer(tokenizers, pairs, tmp_path):
    # caches are written before any padded call: on this branch a call with padding changes a tokenizer's cache key
    # (main ignores that state since 6740e48)
    for name in NAMES:
        tok = tokenizers[name]
        TokenCache.build(tok, pairs.examples(), 24).save(tmp_path / f"{cache_key(tok, 24, pairs=True)}.pt")
        TokenCache.build(tok, pairs.texts, 24).save(tmp_path / f"{cache_key(tok, 24)}.pt")
        assert cache_key(tok, 24, pairs=True) != cache_key(tok, 24)
    student, *teachers = (tokenizers[n] for n in NAMES)
    cached = Collator(student, teachers, 24, NoiseConfig(), seed=0, token_cache=str(tmp_path), pairs=True)
    assert len(cached.caches) == 3
    assert all(isinstance(key, tuple) for c in cached.caches.values() for key in c.ids)  # the pair files
    for name in NAMES:
        cache = TokenCache.load(tmp_path, tokenizers[name], 24, pairs=True)
        got = cache.encode([(pairs.texts[i], pairs.pairs[i]) for i in (5, 1)])
        assert torch.equal(got["input_ids"], reference(tokenizers[name], pairs, [5, 1]))
        assert cache.encode([pairs.texts[5]]) is None  # a single text is not a pair
    plain = Collator(student, teachers, 24, NoiseConfig(), seed=0)
    a, b = plain(pairs, range(8)), cached(pairs, range(8))
    for x, y in zip([a.student, *a.teachers], [b.student, *b.teachers]):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["attention_mask"], y["attention_mask"])


def test_prepare_writes_pair_caches_for_a_pair_task(model_dirs, tmp_path):
    folder = tmp_path / "rte"
    folder.mkdir()
    rows = [f"{i}\tthe film {i} was good\tit was {'good' if i % 2 else 'bad'}\t"
            f"{'entailment' if i % 2 else 'not_entailment'}" for i in range(40)]
    (folder / "train.tsv").write_text("\n".join(["index\tsentence1\tsentence2\tlabel", *rows]) + "\n")
    cfg = parse_config({"algorithm": "kd", "student": {"name": model_dirs["distilbert"]},
                        "teachers": [{"name": model_dirs["roberta"]}], "optim": {"batch_size": 8},
                        "data": {"task": "rte", "path": str(folder), "train_size": 20, "quiz_size": 4,
                                 "validation_size": 4, "test_size": 4, "max_length": 24,
                                 "token_cache": str(tmp_path / "tok")}})
    written = prepare_token_caches([cfg])
    tokenizers = [AutoTokenizer.from_pretrained(model_dirs[name]) for name in ("distilbert", "roberta")]
    assert sorted(p.name for p in written) == sorted(f"{cache_key(t, 24, pairs=True)}.pt" for t in tokenizers)
    for path in written:
        assert ("the film 0 was good", "it was bad") in torch.load(path, weights_only=True)["ids"]


@pytest.mark.parametrize("name, unknown", [("wordpiece", "[UNK]"), ("bpe", "<unk>")])
def test_noise_token_is_each_tokenizers_own_and_one_token_per_word(tokenizers, pairs, name, unknown):
    tok = tokenizers[name]
    assert noise_token("[UNK]", tok) == (unknown, True)
    assert noise_token("[MASK]", tok) == (tok.mask_token, True) and noise_token("xyz", tok) == ("xyz", False)
    noise = NoiseConfig(student={"p": 0.4, "mode": "token"})
    batch = Collator(tok, [], 64, noise, seed=3)(pairs, range(12), epoch=1)
    for row, i in enumerate(range(12)):
        rng = noise_rng(3, "student", 1, i)  # the same draws, with a marker word: which words were hit
        hits = sum(add_noise(s, 0.4, rng, "<hit>").split().count("<hit>") for s in (pairs.texts[i], pairs.pairs[i]))
        ids = batch.student["input_ids"][row][batch.student["attention_mask"][row].bool()]
        assert int((ids == tok.unk_token_id).sum()) == hits
        clean = tok(pairs.texts[i], pairs.pairs[i])["input_ids"]
        assert len(ids) <= len(clean)  # a noised word is one token, never more pieces than the word had
        if name == "bpe":  # the space before a special token would be a token of its own
            assert tok.convert_tokens_to_ids("\u0120") not in ids.tolist()
    assert int((batch.student["input_ids"] == tok.unk_token_id).sum()) > 0


def test_the_bert_spelling_used_to_be_six_pieces_for_bpe(tokenizers):
    """Why the noise token is resolved per tokenizer: written literally, RoBERTa's tokenizer splits it."""
    tok = tokenizers["bpe"]
    assert len(tok("a [UNK] film", add_special_tokens=False)["input_ids"]) > 3
    assert tok("a<unk> film", add_special_tokens=False)["input_ids"] == \
        [tok.convert_tokens_to_ids("a"), tok.unk_token_id, *tok(" film", add_special_tokens=False)["input_ids"]]


def test_teachers_with_other_tokenizers_see_the_same_noised_words(tokenizers, pairs):
    student, *teachers = (tokenizers[n] for n in NAMES)
    noise = NoiseConfig(student={"p": 0.3, "mode": "token"}, teacher={"p": 0.3, "mode": "token"})
    batch = Collator(student, teachers, 64, noise, seed=5)(pairs, range(10), epoch=0)
    counts = [(enc["input_ids"] == tok.unk_token_id).sum(dim=1).tolist()
              for tok, enc in zip(teachers, batch.teachers)]
    assert counts[0] == counts[1] and sum(counts[0]) > 0  # WordPiece and BPE teachers: the same words hit


def test_glued_special_token_and_both_segments_noised():
    rng = noise_rng(0, "student", 0, 0)
    assert add_noise("a b c", 0.99, rng, "<unk>", glue=True) == "<unk><unk><unk>"
    text = add_noise("w0 w1 w2 w3 w4 w5", 0.5, noise_rng(1, "teacher", 0, 2), "<unk>", glue=True)
    assert " <unk>" not in text and "<unk>" in text
