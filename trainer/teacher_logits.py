"""Teacher logits computed once and shared by a sweep's KD trials.

A frozen teacher in eval mode gives the same logits for the same clean tokens in every KD trial: only the student's
side (its model, its noise, its seed) differs between them. So the first KD trial that needs a teacher's logits on its
train split computes them (a no-grad pass in order, batched as training batches are) and saves them to
``data.logit_cache`` (a sweep sets ``<storage>/teacher_logits``); every later trial with the same teacher weights,
tokenizer, texts, max_length and precision loads them and runs the student alone. Files are safetensors (no pickle),
written to a temporary name and renamed, so a concurrent or killed trial never leaves half a file; two trials that
compute the same file at once write the same values.

The key is the content (weights, tokenizer, texts), not names: a teacher fine-tuned again under the same name, or the
same texts drawn in another order, get a file of their own.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from trainer.data import Collator, TextSet, index_batches
from trainer.losses import average_logits
from trainer.tokenized import cache_key as tokenizer_key

if TYPE_CHECKING:
    from trainer.build import Trial

FORMAT = "v1"  # part of every key: a change of what is stored, or how, must not read old files


def shared_logits(trial: Trial, frozen: list[torch.nn.Module]) -> SharedLogits | None:
    """The frozen teachers' logits on the trial's train split from ``data.logit_cache``, computed there by the first
    trial that needs them; None without a cache folder, with teacher-side noise (the teachers' inputs then change
    every epoch) or with distill.hidden (the loss reads the teachers' hidden states too, so they run anyway). Only
    algorithms with frozen teachers ask: MetaDistil's teachers learn."""
    cfg = trial.cfg
    folder = cfg.data.logit_cache
    if not folder or cfg.noise.teacher.p > 0 or cfg.distill.hidden is not None:
        return None
    per_teacher = []
    with trial.timer("teacher_logits"):
        for i, (loaded, module) in enumerate(zip(trial.teachers, frozen)):
            key = logits_key(weights_digest(module), loaded.tokenizer, trial.splits.train.examples(),
                             cfg.data.max_length, trial.device.type, trial.collate.takes_segments(loaded.tokenizer))
            make = partial(compute, module, i, trial.collate, trial.splits.train, cfg.eval.batch_size, trial.device)
            per_teacher.append(load_or_compute(folder, key, make, rows=len(trial.splits.train))[0])
    return SharedLogits(per_teacher, trial.device)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), on CPU: about a second per 100 M params."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def logits_key(weights: str, tokenizer, examples: Sequence[str | tuple[str, str]], max_length: int,
               precision: str, segments: bool = False) -> str:
    """``examples``: the train split as tokenizers read it (``TextSet.examples``: texts, or sentence pairs);
    ``segments``: whether the teacher reads the pairs' segment ids (files of pairs computed before it did differ)."""
    flat = ["\x1e".join(e) if isinstance(e, tuple) else e for e in examples]
    pairs = any(isinstance(e, tuple) for e in examples)
    kind = ("pairs+segments:" if segments else "pairs:") if pairs else ""
    texts_digest = hashlib.sha256(kind.encode() + "\x1f".join(flat).encode()).hexdigest()
    identity = "|".join([FORMAT, weights, tokenizer_key(tokenizer, max_length), texts_digest, precision])
    return hashlib.sha256(identity.encode()).hexdigest()[:24]


def compute(teacher: torch.nn.Module, teacher_index: int, collate: Collator, data: TextSet, batch_size: int,
            device: torch.device) -> torch.Tensor:
    """Teacher ``teacher_index``'s logits for every example of ``data``, in order (float32, on CPU), from the clean
    inputs the collator gives that teacher during training."""
    rows = []
    with torch.no_grad():
        for indices in index_batches(len(data), batch_size, seed=None):
            batch = collate(data, indices, epoch=None, with_teachers=True).to(device)
            rows.append(teacher(**batch.teachers[teacher_index]).logits.float().cpu())
    return torch.cat(rows)


def load_or_compute(folder: str | Path, key: str, make, rows: int) -> tuple[torch.Tensor, bool]:
    """The saved logits of ``key``, else ``make()``'s, saved; and whether they were loaded. A file that is not
    a safetensors file of ``rows`` logits (truncated, or planted) is computed again and replaced."""
    from safetensors.torch import load_file, save_file

    path = Path(folder) / f"{key}.safetensors"
    if path.is_file():
        try:
            saved = load_file(path).get("logits")
        except Exception:  # noqa: BLE001 - SafetensorError, OSError, ...: any unreadable file is recomputed
            saved = None
        if saved is not None and saved.dim() == 2 and len(saved) == rows and saved.dtype == torch.float32:
            return saved, True
    logits = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    save_file({"logits": logits.contiguous()}, partial, metadata={"format": FORMAT})
    partial.replace(path)
    return logits, False


class SharedLogits:
    """The teachers' averaged logits for a batch of train-split indices, from the saved per-teacher logits."""

    def __init__(self, per_teacher: list[torch.Tensor], device: torch.device):
        self.per_teacher = [t.to(device) for t in per_teacher]

    def __call__(self, indices: np.ndarray | torch.Tensor) -> torch.Tensor:
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long, device=self.per_teacher[0].device)
        return average_logits([t[index] for t in self.per_teacher])
