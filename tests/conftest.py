from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import tiny

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


@pytest.fixture
def cuda() -> torch.device:
    """The CUDA device for `gpu` tests; DeepSpeed must use its CUDA accelerator too (bench/gpu_check.sh sets it)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if os.environ.get("DS_ACCELERATOR") != "cuda":
        pytest.skip("run gpu tests with DS_ACCELERATOR=cuda (bench/gpu_check.sh does)")
    return torch.device("cuda", 0)
