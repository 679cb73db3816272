"""The builtin training algorithms: each a small class whose ``train_step(batch, step)`` returns named losses, and a
``build(trial, quiz)`` that trainer/registry.py names. The trainer finds them through the registry; these names are
for code that drives a class itself (tests, bench/)."""

from trainer.algorithms.finetune import FineTune
from trainer.algorithms.kd import KD
from trainer.algorithms.metadistil import MetaDistil

__all__ = ["KD", "FineTune", "MetaDistil"]
