"""The MetaDistil step under DeepSpeed bf16 computes the fp32 algorithm to within bf16 rounding.

The engines' modules hold bf16 weights; the step works on fp32 master weights (so that the pilot step θ' = θ − λg is
not rounded away) and computes the training-batch passes in bf16 under autocast. References: the same step in fp32,
plain torch, from the same (bf16-representable) weights, with BERT-like initialisation (std 0.02) and a larger one
(0.2), at the default pilot rate (6e-5) and a large one (1e-3). Inputs are seeded random token ids, so the figures
do not depend on a trained tokenizer.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from trainer.algorithms import MetaDistil, metadistil
from trainer.config import DeepSpeedConfig, DistillConfig, MetaDistilConfig
from trainer.data import Batch
from trainer.engine import TorchEngine, wrap

pytest.importorskip("deepspeed")
from deepspeed.utils import safe_get_full_grad

DISTILL = DistillConfig(temperature=2.0, alpha=0.5)
VOCAB, SEQ, BATCH, QUIZ = 100, 24, 16, 8
# Measured on CPU (2026-12-02): relative error 2e-3..1e-2, cosine >= 1 - 4e-5 over these cases. Before the fix
# (the whole step in bf16) and with the quiz under autocast, errors reached 3.5e-2 (the quiz gradient's rounding, which
# the JVP amplifies) and most stepped entries equalled θ.
MAX_ERROR, MIN_COSINE = 1.5e-2, 0.9999


def bert(hidden: int, std: float, seed: int) -> BertForSequenceClassification:
    """A 2-layer BERT whose weights are bf16 values, so that bf16 engines and the fp32 reference start equal."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=4 * hidden, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, initializer_range=std, num_labels=2)
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


def random_batch(size: int, seed: int, device: torch.device, with_teacher: bool = True) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (size, SEQ), generator=gen)
    mask = (torch.arange(SEQ) < torch.randint(SEQ // 2, SEQ + 1, (size, 1), generator=gen)).long()
    inputs = {"input_ids": ids * mask, "attention_mask": mask}
    return Batch(torch.randint(0, 2, (size,), generator=gen), inputs, [inputs] if with_teacher else []).to(device)


def one_step(student, teacher, batch, quiz, pilot_lr: float, ds: DeepSpeedConfig, monkeypatch):
    """One meta step; returns the teacher gradient its engine received and the pilot's stepped parameters."""
    student, teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    student_engine, teacher_engine = (wrap(m, 1e-3, 0.0, ds, BATCH, None) for m in (student, teacher))
    seen = {}
    inner_step = teacher_engine.step

    def record_step():
        params = [p for p in teacher_engine.module.parameters() if p.requires_grad]
        grads = [p.grad if isinstance(teacher_engine, TorchEngine) else safe_get_full_grad(p) for p in params]
        seen["grad"] = torch.cat([g.detach().double().flatten() for g in grads])
        inner_step()

    teacher_engine.step = record_step
    forward = metadistil.forward

    def spy(module, params, inputs, states=None):
        if inputs is quiz.student:
            seen["stepped"] = {n: p.detach().clone() for n, p in params.items()}
        return forward(module, params, inputs, states)

    monkeypatch.setattr(metadistil, "forward", spy)
    meta = MetaDistilConfig(pilot_lr=pilot_lr, quiz_batch_size=QUIZ)
    MetaDistil(student_engine, [teacher_engine], DISTILL, meta, itertools.repeat(quiz)).train_step(batch, step=0)
    monkeypatch.setattr(metadistil, "forward", forward)
    return seen


def check_bf16_against_fp32(monkeypatch, std: float, pilot_lr: float, zero_stage: int, device: torch.device):
    student, teacher = bert(32, std, seed=3).to(device).train(), bert(32, std, seed=10).to(device).eval()
    batch, quiz = random_batch(BATCH, 1, device), random_batch(QUIZ, 2, device, with_teacher=False)
    theta = {n: p.detach().clone() for n, p in student.named_parameters()}
    ref = one_step(student, teacher, batch, quiz, pilot_lr, DeepSpeedConfig(enabled=False), monkeypatch)
    got = one_step(student, teacher, batch, quiz, pilot_lr,
                   DeepSpeedConfig(enabled=True, zero_stage=zero_stage, precision="bf16"), monkeypatch)

    g, r = got["grad"], ref["grad"]
    error = ((g - r).norm() / r.norm()).item()
    cosine = (g @ r / (g.norm() * r.norm())).item()
    moved_ref = sum(int((ref["stepped"][n] != theta[n]).sum()) for n in theta)
    moved_both = sum(int(((got["stepped"][n] != theta[n]) & (ref["stepped"][n] != theta[n])).sum()) for n in theta)
    print(f"\nstd {std} pilot_lr {pilot_lr} ZeRO {zero_stage}: relative error {error:.2e}, cosine 1-{1 - cosine:.1e}, "
          f"stepped entries {moved_both}/{moved_ref}")
    assert r.norm() > 0 and moved_ref > 0
    assert all(p.dtype == torch.float32 for p in got["stepped"].values()), "the pilot step must be formed in fp32"
    assert error <= MAX_ERROR, f"teacher meta-gradient relative error {error:.2e}"
    assert cosine >= MIN_COSINE, f"teacher meta-gradient cosine {cosine:.6f}"
    assert moved_both >= 0.99 * moved_ref, f"the bf16 pilot changed {moved_both} of the {moved_ref} entries fp32 did"


@pytest.mark.parametrize("zero_stage", [0, 1])
@pytest.mark.parametrize("std", [0.02, 0.2])
@pytest.mark.parametrize("pilot_lr", [6e-5, 1e-3])
def test_bf16_meta_step_matches_fp32(monkeypatch, std, pilot_lr, zero_stage):
    check_bf16_against_fp32(monkeypatch, std, pilot_lr, zero_stage, torch.device("cpu"))


def test_master_weights_are_the_engines_fp32_copy():
    """ZeRO 1 exposes its fp32 masters: the step starts from them, not from the rounded bf16 module weights."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    engine = wrap(model, 1e-2, 0.0, DeepSpeedConfig(enabled=True, zero_stage=1, precision="bf16"), 4, None)
    x = torch.randn(4, 8).bfloat16()
    engine.backward(engine(x).float().pow(2).sum())
    engine.step()  # the masters move by ~lr; the bf16 weights follow only to within their rounding
    masters = metadistil.master_copy(engine)
    from deepspeed.utils import safe_get_full_fp32_param

    for name, p in engine.module.named_parameters():
        assert masters[name].dtype == torch.float32 and masters[name].requires_grad
        assert torch.equal(masters[name], safe_get_full_fp32_param(p))
    assert any(not torch.equal(masters[n], p.float()) for n, p in engine.module.named_parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("zero_stage", [0, 1])
@pytest.mark.parametrize("std", [0.02, 0.2])
@pytest.mark.parametrize("pilot_lr", [6e-5, 1e-3])
def test_bf16_meta_step_matches_fp32_on_cuda(monkeypatch, cuda, std, pilot_lr, zero_stage):
    check_bf16_against_fp32(monkeypatch, std, pilot_lr, zero_stage, cuda)
