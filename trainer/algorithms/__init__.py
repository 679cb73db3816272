"""The training algorithms: each a small class whose ``train_step(batch, step)`` returns named losses."""

from trainer.algorithms.finetune import FineTune
from trainer.algorithms.kd import KD
from trainer.algorithms.metadistil import MetaDistil

__all__ = ["KD", "FineTune", "MetaDistil"]
