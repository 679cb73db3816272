"""Texts tokenized once per tokenizer: the cached batches equal the tokenizer's own, and a sweep's preparation writes
one file per distinct tokenizer (by content) that trials find again."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoTokenizer

from trainer.config import NoiseConfig, parse_config
from trainer.data import Collator, synthetic_sentiment
from trainer.tokenized import TokenCache, cache_key, prepare_token_caches

TEXTS = ["a good film", "the plot was dull and the acting was quite weak", "fine", "moving , charming and lovely"]


@pytest.mark.parametrize("name", ["wordpiece", "bpe"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_cached_encoding_equals_the_tokenizer(tokenizers, name, side):
    tokenizer = copy.deepcopy(tokenizers[name])
    tokenizer.padding_side = side
    cache = TokenCache.build(tokenizer, TEXTS * 2, max_length=8)  # 8 truncates the long text
    assert len(cache.ids) == len(TEXTS)
    got = cache.encode(TEXTS[::-1])
    want = tokenizer(TEXTS[::-1], padding=True, truncation=True, max_length=8, return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    assert cache.encode(["a text it never saw"]) is None


def test_key_follows_content_not_name(tokenizers, tmp_path):
    tokenizers["wordpiece"].save_pretrained(tmp_path / "copy")
    copied = AutoTokenizer.from_pretrained(tmp_path / "copy")
    assert cache_key(copied, 32) == cache_key(tokenizers["wordpiece"], 32)
    assert cache_key(tokenizers["wordpiece"], 32) != cache_key(tokenizers["wordpiece"], 64)
    assert cache_key(tokenizers["wordpiece"], 32) != cache_key(tokenizers["wordpiece_cased"], 32)


def test_collator_batches_are_the_same_with_the_cache(tokenizers, tmp_path):
    data = synthetic_sentiment(24, 4)["train"]
    student, teachers = tokenizers["wordpiece_cased"], [tokenizers["wordpiece"], tokenizers["bpe"]]
    for tok in [student, *teachers]:
        TokenCache.build(tok, data.texts, 16).save(tmp_path / f"{cache_key(tok, 16)}.pt")
    noise = NoiseConfig(student={"p": 0.3})
    plain = Collator(student, teachers, 16, noise, seed=0, vocabulary=["noise"])
    cached = Collator(student, teachers, 16, noise, seed=0, vocabulary=["noise"], token_cache=str(tmp_path))
    assert len(cached.caches) == 3
    for epoch in (None, 0):  # clean (all from the cache) and noisy student texts (tokenized on the fly)
        a, b = plain(data, range(8), epoch), cached(data, range(8), epoch)
        for x, y in zip([a.student, *a.teachers], [b.student, *b.teachers]):
            assert all(torch.equal(x[k], y[k]) for k in ("input_ids", "attention_mask"))


def test_prepare_writes_one_file_per_tokenizer_and_extends_it(model_dirs, tmp_path):
    def config(size, teachers):
        return parse_config({"data": {"name": "synthetic", "train_size": size, "quiz_size": 8, "validation_size": 8,
                                      "test_size": 8, "max_length": 16, "token_cache": str(tmp_path / "tok")},
                             "algorithm": "kd", "student": {"name": model_dirs["distilbert"]},
                             "teachers": [{"name": model_dirs.get(t, t)} for t in teachers]})
    untrained = str(tmp_path / "teacher-the-sweep-has-not-fine-tuned-yet")
    written = prepare_token_caches([config(40, ["bert"]), config(40, ["bert", "roberta"]), config(40, [untrained])])
    assert len(written) == 3 and all(p.is_file() for p in written)  # distilbert, bert, roberta; the untrained skipped
    size_before = {p: len(torch.load(p, weights_only=True)["ids"]) for p in written}
    prepare_token_caches([config(80, ["bert"])])  # more texts: the caches of its two tokenizers grow
    grown = [p for p in written if len(torch.load(p, weights_only=True)["ids"]) > size_before[p]]
    assert len(grown) == 2


def test_the_key_of_a_tokenizer_does_not_change_when_it_is_used(tokenizers):
    from trainer.tokenized import cache_key

    tok = copy.deepcopy(tokenizers["bpe"])
    before = cache_key(tok, 32)
    tok(["a good film", "bad"], padding=True, truncation=True, max_length=8)
    assert cache_key(tok, 32) == before != cache_key(tok, 16)
