"""Accuracy of a classifier on a labelled text set."""

from __future__ import annotations

import torch
from torch import nn

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
