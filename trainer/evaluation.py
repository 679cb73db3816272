"""Accuracy of a classifier on a labelled text set."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from trainer.config import NoiseConfig
from trainer.data import Collator, TextSet, index_batches


@torch.no_grad()
def accuracy(model: nn.Module, data: TextSet, collate: Collator, batch_size: int, device: torch.device) -> float:
    """Fraction of correct argmax predictions, without noise or dropout; the model's mode is restored after."""
    if len(data) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = 0
    for indices in index_batches(len(data), batch_size, seed=None):
        batch = collate(data, indices, epoch=None, with_teachers=False).to(device)
        correct += (model(**batch.student).logits.argmax(dim=-1) == batch.labels).sum().item()
    model.train(was_training)
    return correct / len(data)


def score_saved(model_dir: str | Path, data: TextSet, max_length: int, batch_size: int, device: torch.device) -> float:
    """Accuracy of a saved classifier (a ``save_pretrained`` folder with its tokenizer) on clean text."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(device)
    collate = Collator(AutoTokenizer.from_pretrained(model_dir), [], max_length, NoiseConfig(), seed=0)
    return accuracy(model, data, collate, batch_size, device)
