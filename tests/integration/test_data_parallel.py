"""Data parallelism: two DeepSpeed workers (gloo, one process each) taking MetaDistil steps on halves of each batch
must end where one plain-torch process ends after the same steps on the whole batches.

This checks every averaging the trainer relies on: DeepSpeed's for the student's and the teachers' gradients, the
meta step's own for the pilot gradient and the quiz gradient (without it each worker's pilot would step on half a
batch and the teachers' meta-gradients would be biased), and the trainer's slicing of batches and quiz batches.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from trainer.algorithms import MetaDistil
from trainer.config import DeepSpeedConfig, DistillConfig, MetaDistilConfig, NoiseConfig
from trainer.data import Collator, synthetic_sentiment
from trainer.distributed import shard
from trainer.engine import wrap

pytest.importorskip("deepspeed")

DISTILL = DistillConfig(temperature=2.0, alpha=0.7)
META = MetaDistilConfig(pilot_lr=0.5, teacher_lr=1e-2, quiz_batch_size=4)
LR, BATCH, STEPS = 1e-2, 8, 2


def _steps(model_dirs: dict[str, str], ds: DeepSpeedConfig, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """STEPS MetaDistil steps (student DistilBERT, teachers BERT + RoBERTa); the models' parameters afterwards.

    Without a process group this is one worker on whole batches; inside one, this worker's slices."""
    load = AutoModelForSequenceClassification.from_pretrained
    student = load(model_dirs["distilbert"]).eval()  # the saved tiny models have no dropout: masks cannot differ
    teachers = [load(model_dirs["bert"]).eval(), load(model_dirs["roberta"]).eval()]
    collate = Collator(AutoTokenizer.from_pretrained(model_dirs["distilbert"]),
                       [AutoTokenizer.from_pretrained(model_dirs[k]) for k in ("bert", "roberta")], max_length=32,
                       noise=NoiseConfig(), seed=0)
    data = synthetic_sentiment(32, 4)["train"]
    batches = [collate(data, shard(np.arange(i * BATCH, (i + 1) * BATCH))) for i in range(STEPS)]
    quiz_start = STEPS * BATCH
    quizzes = [collate(data, shard(np.arange(quiz_start + 4 * i, quiz_start + 4 * (i + 1))), with_teachers=False)
               for i in range(STEPS)]
    student_engine = wrap(student, LR, 0.0, ds, batch_size, None)
    teacher_engines = [wrap(t, META.teacher_lr, 0.0, ds, batch_size, None) for t in teachers]
    algo = MetaDistil(student_engine, teacher_engines, DISTILL, META, quiz_batches=iter(quizzes))
    for step, batch in enumerate(batches):
        algo.train_step(batch, step)
    return [{n: p.detach().clone() for n, p in m.named_parameters()} for m in [student, *teachers]]


def _worker(rank: int, world: int, port: int, model_dirs: dict[str, str], zero_stage: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    params = _steps(model_dirs, DeepSpeedConfig(enabled=True, zero_stage=zero_stage), BATCH // world)
    if rank == 0:
        torch.save(params, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("zero_stage", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_two_workers_step_like_one_worker_on_the_whole_batch(tmp_path, model_dirs, zero_stage):
    out = tmp_path / "params.pt"
    mp.spawn(_worker, args=(2, _free_port(), model_dirs, zero_stage, str(out)), nprocs=2, join=True)
    two_workers = torch.load(out, weights_only=True)
    one_worker = _steps(model_dirs, DeepSpeedConfig(enabled=False), BATCH)

    initial = AutoModelForSequenceClassification.from_pretrained(model_dirs["bert"]).state_dict()
    assert any(not torch.equal(one_worker[1][n], initial[n]) for n in one_worker[1]), "the teacher did not move"
    for name, got, ref in zip(["student", "bert", "roberta"], two_workers, one_worker):
        worst = max((got[n] - ref[n]).abs().max().item() for n in ref)
        # fp32; the two sides differ only in summation order (halves, then all-reduce). A missing average moves
        # parameters by about the learning rate (1e-2).
        assert worst < 1e-5, f"{name}: parameters differ by {worst:.2e}"
