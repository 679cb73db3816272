"""A model's metrics on a labelled text set, and which evaluation is the best so far."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from trainer.config import ConfigError, NoiseConfig
from trainer.data import Collator, TextSet, index_batches
from trainer.metrics import score
from trainer.preflight import one_line
from trainer.tokenized import takes_segments


@torch.no_grad()
def predict(model: nn.Module, data: TextSet, collate: Collator, batch_size: int, device: torch.device) -> list[float]:
    """Argmax classes (a regression head's score), without noise or dropout; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    out: list[float] = []
    for indices in index_batches(len(data), batch_size, seed=None):
        logits = model(**collate(data, indices, epoch=None, with_teachers=False).to(device).student).logits
        out.extend((logits[:, 0] if data.regression else logits.argmax(dim=-1)).tolist())
    model.train(was_training)
    return out


def scores_on(model: nn.Module, data: TextSet, collate: Collator, batch_size: int, device: torch.device,
             metrics: Sequence[str] = ("accuracy",)) -> dict[str, float]:
    """The named metrics (trainer.metrics) of the model's predictions on ``data``; nan when it is empty."""
    return score(metrics, predict(model, data, collate, batch_size, device), data.labels)


def accuracy(model: nn.Module, data: TextSet, collate: Collator, batch_size: int, device: torch.device) -> float:
    """Fraction of correct argmax predictions."""
    return scores_on(model, data, collate, batch_size, device)["accuracy"]


def improves(scores: Mapping[str, float], best: Mapping[str, float], main: str) -> bool:
    """Whether an evaluation's ``scores`` beat the ``best`` so far (empty: none yet) by the ``main`` metric.

    The first evaluation always does, whatever its value (an MCC may be -1, an empty split nan): the trial then
    keeps weights it has scored rather than none.
    """
    if not best:
        return True
    return scores[main] > best[main] or (math.isnan(best[main]) and not math.isnan(scores[main]))


def score_saved(model_dir: str | Path, data: TextSet, max_length: int, batch_size: int, device: torch.device,
                metrics: Sequence[str] = ("accuracy",)) -> dict[str, float]:
    """The named metrics (trainer.metrics) of a saved classifier or regression model (a ``save_pretrained`` folder
    with its tokenizer) on clean text; sentence pairs are tokenized as pairs."""
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
    collate = Collator(tokenizer, [], max_length, NoiseConfig(), seed=0,
                       segments=[takes_segments(tokenizer, model.config)])
    return scores_on(model.to(device), data, collate, batch_size, device, metrics)
