from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import tiny  # noqa: E402

SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "wordpiece": tiny.wordpiece_tokenizer(root / "wordpiece"),
        "bpe": tiny.bpe_tokenizer(root / "bpe"),
        "wordpiece_cased": tiny.wordpiece_tokenizer(root / "wordpiece_cased", vocab_size=250, lowercase=False),
    }


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizers):
    """Saved tiny models: a BERT and a RoBERTa teacher (different tokenizers) and a DistilBERT student (a third)."""
    root = tmp_path_factory.mktemp("models")
    return {
        "bert": tiny.save(tiny.tiny_bert(tokenizers["wordpiece"]), tokenizers["wordpiece"], root / "bert"),
        "bert4": tiny.save(tiny.tiny_bert(tokenizers["wordpiece"], layers=4, seed=1), tokenizers["wordpiece"],
                           root / "bert4"),
        "roberta": tiny.save(tiny.tiny_roberta(tokenizers["bpe"]), tokenizers["bpe"], root / "roberta"),
        "distilbert": tiny.save(tiny.tiny_distilbert(tokenizers["wordpiece_cased"]), tokenizers["wordpiece_cased"],
                                root / "distilbert"),
    }
