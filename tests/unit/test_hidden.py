"""distill.hidden: the PKD term against a hand-computed reference, the layer maps and their refusals, the student's
projection (trained with it, left out of the saved classifier), KD's step with the term, shared logits turned off."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

import tiny
from test_metadistil_step import DISTILL, Recording, hidden_setup, pilot_loss_of
from trainer.algorithms import KD
from trainer.config import HiddenConfig, parse_config
from trainer.errors import ConfigError
from trainer.hidden import PROJECTION, layer_pairs, prepare, without_projection
from trainer.losses import average_outputs, hidden_loss
from trainer.models import Loaded
from trainer.overrides import apply_overrides


def test_the_config_is_off_by_default_and_on_with_an_empty_section():
    base = {"algorithm": "kd", "teachers": [{"name": "t"}]}
    assert parse_config(base).distill.hidden is None
    on = parse_config({**base, "distill": {"hidden": {}}}).distill.hidden
    assert on == HiddenConfig(beta=100.0, layers="auto")
    overridden = parse_config(apply_overrides(base, ["distill.hidden.layers=[[1, 2], [2, 4]]"])).distill.hidden
    assert overridden is not None and overridden.layers == [(1, 2), (2, 4)]


def test_hidden_loss_matches_a_hand_computed_example():
    student = torch.tensor([[[3.0, 4.0]]], dtype=torch.float64)  # normalised: (0.6, 0.8)
    teacher = torch.tensor([[[2.0, 0.0]]], dtype=torch.float64)  # normalised: (1, 0)
    assert hidden_loss(student, teacher).item() == pytest.approx(((0.6 - 1) ** 2 + 0.8**2) / 2, rel=1e-12)


def test_hidden_loss_matches_numpy_and_ignores_each_vectors_length():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)  # [layers, batch, hidden]
    teacher = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    s, t = student.numpy(), teacher.numpy()
    s, t = s / np.linalg.norm(s, axis=-1, keepdims=True), t / np.linalg.norm(t, axis=-1, keepdims=True)
    expected = float(((s - t) ** 2).mean())
    assert hidden_loss(student, teacher).item() == pytest.approx(expected, rel=1e-12)
    lengths = torch.rand(3, 5, 1, generator=g, dtype=torch.float64) + 0.5
    assert hidden_loss(student * lengths, teacher).item() == pytest.approx(expected, rel=1e-12)
    assert hidden_loss(student.float(), teacher.to(torch.bfloat16)).dtype == torch.float32


def test_teachers_outputs_are_averaged_part_by_part():
    a = (torch.tensor([[1.0, 3.0]]), torch.tensor([[[2.0]]]))
    b = (torch.tensor([[3.0, 5.0]]), torch.tensor([[[4.0]]]))
    logits, states = average_outputs([a, b])
    assert torch.equal(logits, torch.tensor([[2.0, 4.0]])) and torch.equal(states, torch.tensor([[[3.0]]]))


@pytest.mark.parametrize(("student", "teacher", "expected"), [
    (6, 12, [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10)]),  # BERT-base -> 6 layers, as the official MetaDistil
    (4, 12, [(1, 3), (2, 6), (3, 9)]),
    (5, 12, [(1, 2), (2, 4), (3, 6), (4, 8)]),  # T // S: the official "skip" selection
    (2, 2, [(1, 1)]),
])
def test_auto_spaces_the_students_layers_but_its_last_over_the_teachers(student, teacher, expected):
    assert layer_pairs("auto", student, teacher, "teachers.0") == expected


def test_listed_pairs_are_kept_in_order():
    assert layer_pairs([(2, 12), (1, 1)], 2, 12, "teachers.0") == [(2, 12), (1, 1)]


@pytest.mark.parametrize(("layers", "student", "teacher", "message"), [
    ([(7, 1)], 6, 12, "distill.hidden.layers: student layer 7 does not exist; the student has 6 layers (1..6)"),
    ([(1, 13)], 6, 12, "distill.hidden.layers: teacher layer 13 does not exist; teachers.1 has 12 layers (1..12)"),
    ("auto", 1, 12, ("distill.hidden.layers: auto pairs the student's layers 1..S-1 (its last is distilled through "
                    "the logits), and the student has 1; list the pairs instead")),
    ("auto", 6, 4, ("distill.hidden.layers: auto spaces the student's 6 layers over the teacher's, and teachers.1 "
                   "has only 4; list the pairs instead")),
])
def test_a_layer_map_outside_a_model_names_the_layer_and_the_depth(layers, student, teacher, message):
    with pytest.raises(ConfigError) as err:
        layer_pairs(layers, student, teacher, "teachers.1")
    assert str(err.value) == message


def loaded(tokenizers, model, tok="wordpiece"):
    return Loaded(model, tokenizers[tok], "m")


def test_a_student_of_another_size_gets_a_projection_to_the_teachers(tokenizers):
    student = tiny.tiny_distilbert(tokenizers["wordpiece_cased"]).train()
    teachers = [tiny.tiny_bert(tokenizers["wordpiece"], hidden=48, layers=4),
                tiny.tiny_roberta(tokenizers["bpe"], hidden=48, layers=6)]
    hidden = prepare(HiddenConfig(beta=7.0), loaded(tokenizers, student, "wordpiece_cased"),
                     [loaded(tokenizers, teachers[0]), loaded(tokenizers, teachers[1], "bpe")])
    assert hidden is not None
    assert (hidden.beta, hidden.student_layers, hidden.teacher_layers) == (7.0, (1,), ((2,), (3,)))
    projection = getattr(student, PROJECTION)
    assert (projection.in_features, projection.out_features) == (32, 48)
    assert student.training, "probing the model leaves its mode as it was"
    assert prepare(None, loaded(tokenizers, student, "wordpiece_cased"), []) is None


def test_a_student_of_the_teachers_size_gets_none(tokenizers):
    student = tiny.tiny_distilbert(tokenizers["wordpiece_cased"])
    teacher = tiny.tiny_bert(tokenizers["wordpiece"])
    prepare(HiddenConfig(), loaded(tokenizers, student, "wordpiece_cased"), [loaded(tokenizers, teacher)])
    assert not hasattr(student, PROJECTION)


def test_teachers_of_different_sizes_are_refused(tokenizers):
    teachers = [tiny.tiny_bert(tokenizers["wordpiece"]), tiny.tiny_bert(tokenizers["wordpiece"], hidden=48)]
    with pytest.raises(ConfigError, match=r"^distill.hidden: the teachers' \[CLS\] states are averaged, so their "
                                          r"hidden sizes must agree \(got teachers.0: 32, teachers.1: 48\)"):
        prepare(HiddenConfig(), loaded(tokenizers, tiny.tiny_bert(tokenizers["wordpiece"])),
                [loaded(tokenizers, t) for t in teachers])


class NoHiddenStates(torch.nn.Module):
    """A classifier whose outputs carry logits only."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        inputs.pop("output_hidden_states", None)
        return SequenceClassifierOutput(logits=self.model(**inputs).logits)


@pytest.mark.parametrize("which", ["student", "teachers.0"])
def test_a_model_without_hidden_states_is_refused(tokenizers, which):
    models = {key: tiny.tiny_bert(tokenizers["wordpiece"]) for key in ("student", "teachers.0")}
    models[which] = NoHiddenStates(models[which])
    with pytest.raises(ConfigError, match=rf"^distill.hidden: {which} \(NoHiddenStates\) returns no hidden states"):
        prepare(HiddenConfig(), loaded(tokenizers, models["student"]), [loaded(tokenizers, models["teachers.0"])])


def test_kd_steps_on_the_hidden_term_and_trains_the_projection(tokenizers):
    student, teachers, batch, _, hidden = hidden_setup(tokenizers, 2, "projected")
    before = copy.deepcopy(student)
    engine = Recording(student)
    losses = KD(engine, teachers, DISTILL, hidden=hidden).train_step(batch, step=0)
    theta = dict(before.named_parameters())
    reference = pilot_loss_of(before, theta, teachers, [dict(t.named_parameters()) for t in teachers], batch, hidden)
    reference.backward()
    got = engine.seen[0]
    assert got[f"{PROJECTION}.weight"].abs().max() > 0
    assert all(torch.allclose(got[n], p.grad, rtol=1e-9, atol=1e-12) for n, p in theta.items())
    assert losses["kd"] == pytest.approx(reference.item(), rel=1e-12)
    assert 0 < losses["hidden"] < losses["kd"] / hidden.beta


def test_the_saved_student_is_a_plain_classifier(tokenizers, tmp_path):
    student = tiny.tiny_distilbert(tokenizers["wordpiece_cased"]).eval()
    prepare(HiddenConfig(), loaded(tokenizers, student, "wordpiece_cased"),
            [loaded(tokenizers, tiny.tiny_bert(tokenizers["wordpiece"], hidden=48))])
    student.save_pretrained(tmp_path, state_dict=without_projection(student.state_dict()))
    assert not [k for k in load_file(tmp_path / "model.safetensors") if PROJECTION in k]
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert not hasattr(again, PROJECTION)
    inputs = tokenizers["wordpiece_cased"](["a good film", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, student(**inputs).logits)
