"""Accuracy of a classifier on a labelled text set."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from trainer.config import ConfigError, NoiseConfig
from trainer.data import Collator, TextSet, index_batches
from trainer.preflight import one_line


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
    from transformers.utils import logging as hf_logging

    # Weights that do not fit are refused below in one line; transformers' own report of them is dozens of lines.
    verbosity, progress_bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(model_dir, output_loading_info=True,
                                                                         ignore_mismatched_sizes=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as err:  # noqa: BLE001 - truncated or mismatched files: OSError, RuntimeError, SafetensorError...
        raise ConfigError(f"model folder {str(model_dir)!r} cannot be loaded: {one_line(err)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress_bar:
            hf_logging.enable_progress_bar()
    # transformers fills weights missing from the file (or of another shape) with random ones, and scores them
    unfit = sorted(info["missing_keys"]) + sorted(str(k[0]) for k in info["mismatched_keys"])
    if unfit:
        raise ConfigError(f"model folder {str(model_dir)!r}: its weights do not fit its config.json ({len(unfit)} "
                          f"missing or of another shape, e.g. {unfit[0]}); it is not a saved classifier")
    collate = Collator(tokenizer, [], max_length, NoiseConfig(), seed=0)
    return accuracy(model.to(device), data, collate, batch_size, device)
