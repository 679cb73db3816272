"""The MetaDistil step: its teacher meta-gradient against finite differences and the double-backward reference (with
and without distill.hidden's intermediate-layer term), the pilot's isolation from the real student, and the real
step's use of the updated teacher."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import tiny
from trainer.algorithms import MetaDistil
from trainer.config import DistillConfig, HiddenConfig, MetaDistilConfig, NoiseConfig
from trainer.data import Collator, TextSet, synthetic_sentiment
from trainer.engine import TorchEngine
from trainer.hidden import HiddenMap, prepare
from trainer.losses import average_logits, cross_entropy, distillation_loss, task_loss
from trainer.models import Loaded

DISTILL = DistillConfig(temperature=2.0, alpha=0.7)
PILOT_LR = 0.5  # large, so that the meta-gradient is far from zero and finite differences see it
TEACHER_TOKENIZERS = ["wordpiece", "bpe"]
# distill.hidden cases (the student has 2 layers of size 32): the teachers' models, and the hidden config
HIDDEN = {
    None: ({}, None),
    # auto: student layer 1 <-> teacher layer 2 of 4, one hidden size
    "auto": ({"teacher_layers": 4}, HiddenConfig()),
    # both student layers, the last one too, through a trained 32 -> 48 projection
    "projected": ({"teacher_hidden": 48}, HiddenConfig(beta=30.0, layers=[(1, 1), (2, 2)])),
}


class Recording(TorchEngine):
    """A plain engine that remembers the gradients it was asked to step on."""

    def __init__(self, module, lr=1e-2):
        super().__init__(module, torch.optim.SGD(module.parameters(), lr=lr), grad_clip=None)
        self.seen: list[dict[str, torch.Tensor]] = []

    def step(self):
        self.seen.append({n: p.grad.detach().clone() for n, p in self.module.named_parameters()})
        super().step()


def make_setup(tokenizers, n_teachers: int, dtype=torch.float64, dropout: float = 0.0,
               student_builder=tiny.tiny_distilbert, teacher_hidden: int = 32, teacher_layers: int = 2):
    builders = list(zip([tiny.tiny_bert, tiny.tiny_roberta], TEACHER_TOKENIZERS))
    teachers = [builder(tokenizers[tok], hidden=teacher_hidden, layers=teacher_layers, dropout=dropout,
                        seed=10 + i).to(dtype).eval()
                for i, (builder, tok) in enumerate(builders[:n_teachers])]
    student = student_builder(tokenizers["wordpiece_cased"], dropout=dropout, seed=3).to(dtype).train()
    data = synthetic_sentiment(12, 4)["train"]
    collate = Collator(tokenizers["wordpiece_cased"], [tokenizers[tok] for _, tok in builders[:n_teachers]],
                       max_length=32, noise=NoiseConfig(), seed=0)
    return student, teachers, collate(data, range(8)), collate(data, range(8, 12))


def hidden_setup(tokenizers, n_teachers: int, case: str | None, **kwargs):
    """make_setup's models for a distill.hidden case, and the case's resolved layer map (None: off); the student gets
    its projection where the case needs one."""
    models, cfg = HIDDEN[case]
    student, teachers, batch, quiz = make_setup(tokenizers, n_teachers, **models, **kwargs)
    hidden = prepare(cfg, Loaded(student, tokenizers["wordpiece_cased"], "student"),
                     [Loaded(t, tokenizers[tok], f"t{i}") for i, (t, tok) in enumerate(zip(teachers,
                                                                                          TEACHER_TOKENIZERS))])
    return student, teachers, batch, quiz, hidden


def pilot_loss_of(student, theta, teachers, teacher_params, batch, hidden: HiddenMap | None):
    """ℓ(θ, φ) written out from its definition: KD on the logits, plus β × MSE of the L2-normalised [CLS] states of
    the mapped layers, the student's projected where it has a projection, the teachers' averaged."""
    with_states = {"output_hidden_states": hidden is not None}
    out_s = functional_call(student, theta, kwargs={**batch.student, **with_states})
    out_t = [functional_call(t, phi, kwargs={**x, **with_states}) for t, phi, x in zip(teachers, teacher_params,
                                                                                      batch.teachers)]
    loss = distillation_loss(out_s.logits, average_logits([o.logits for o in out_t]), batch.labels,
                             DISTILL.temperature, DISTILL.alpha)
    if hidden is None:
        return loss
    h_s = torch.stack([out_s.hidden_states[i][:, 0] for i in hidden.student_layers])
    if "hidden_projection.weight" in theta:
        h_s = h_s @ theta["hidden_projection.weight"].T + theta["hidden_projection.bias"]
    h_t = sum(torch.stack([o.hidden_states[i][:, 0] for i in layers])
              for o, layers in zip(out_t, hidden.teacher_layers)) / len(out_t)
    return loss + hidden.beta * ((F.normalize(h_s, dim=-1) - F.normalize(h_t, dim=-1)) ** 2).mean()


def quiz_loss_of_teachers(student, teachers, batch, quiz, teacher_params, hidden: HiddenMap | None = None):
    """L_quiz(θ − λ ∇θ ℓ(θ, φ)) as a plain function of the teachers' parameters φ (the definition)."""
    theta = {n: p.detach().requires_grad_() for n, p in student.named_parameters()}
    loss = pilot_loss_of(student, theta, teachers, teacher_params, batch, hidden)
    grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
    stepped = {n: p - PILOT_LR * g for (n, p), g in zip(theta.items(), grads)}
    return task_loss(functional_call(student, stepped, kwargs=quiz.student).logits, quiz.labels)


def meta_gradients(student, teachers, batch, quiz, method: str, hidden: HiddenMap | None = None):
    engines = [Recording(t) for t in teachers]
    algo = MetaDistil(Recording(student), engines, DISTILL,
                      MetaDistilConfig(pilot_lr=PILOT_LR, meta_gradient=method, quiz_batch_size=4),
                      quiz_batches=itertools.repeat(quiz), hidden=hidden)
    algo.train_step(batch, step=0)
    return [e.seen[0] for e in engines], algo


@pytest.mark.parametrize("hidden_case", list(HIDDEN))
@pytest.mark.parametrize("n_teachers", [1, 2])
@pytest.mark.parametrize("method", ["forward_ad", "double_backward"])
def test_meta_gradient_matches_finite_differences(tokenizers, n_teachers, method, hidden_case):
    student, teachers, batch, quiz, hidden = hidden_setup(tokenizers, n_teachers, hidden_case)
    check_finite_differences(student, teachers, batch, quiz, method, hidden)


@pytest.mark.parametrize("method", ["forward_ad", "double_backward"])
def test_meta_gradient_of_pairs_with_segment_ids(tokenizers, method):
    """A BERT student and teacher on sentence pairs read segment ids: the meta step's functional calls of the
    student (pilot, JVP, quiz) get them as the definition's plain calls do."""
    source = synthetic_sentiment(24, 4)["train"]
    data = TextSet(source.texts[:12], source.labels[:12], pairs=source.texts[12:])
    student = tiny.tiny_bert(tokenizers["wordpiece_cased"], seed=3).to(torch.float64).train()
    teachers = [tiny.tiny_bert(tokenizers["wordpiece"], seed=10, init_std=0.2).to(torch.float64).eval()]
    collate = Collator(tokenizers["wordpiece_cased"], [tokenizers["wordpiece"]], max_length=32, noise=NoiseConfig(),
                       seed=0, segments=[True, True])
    batch, quiz = collate(data, range(8)), collate(data, range(8, 12))
    assert all(enc["token_type_ids"].sum() > 0 for enc in (batch.student, batch.teachers[0], quiz.student))
    check_finite_differences(student, teachers, batch, quiz, method, None)


def check_finite_differences(student, teachers, batch, quiz, method: str, hidden: HiddenMap | None) -> None:
    base = [{n: p.detach().clone() for n, p in t.named_parameters()} for t in teachers]
    student_before = {n: p.detach().clone() for n, p in student.state_dict().items()}
    grads, _ = meta_gradients(student, teachers, batch, quiz, method, hidden)
    student.load_state_dict(student_before)  # the step's real update moved it; the definition is at the old θ
    torch.manual_seed(0)
    direction = [{n: torch.randn_like(p) for n, p in phi.items()} for phi in base]
    eps = 1e-5
    with torch.no_grad():
        plus = [{n: p + eps * d[n] for n, p in phi.items()} for phi, d in zip(base, direction)]
        minus = [{n: p - eps * d[n] for n, p in phi.items()} for phi, d in zip(base, direction)]
    finite = (quiz_loss_of_teachers(student, teachers, batch, quiz, plus, hidden)
              - quiz_loss_of_teachers(student, teachers, batch, quiz, minus, hidden)).item() / (2 * eps)
    analytic = sum((g[n] * d[n]).sum().item() for g, d in zip(grads, direction) for n in g)
    assert abs(finite) > 1e-6
    assert abs(analytic - finite) / abs(finite) < 1e-4
    for i, g in enumerate(grads):
        zero = [n for n, t in g.items() if t.abs().max() == 0]
        assert not zero, f"teacher {i}: no meta-gradient for {zero}"


@pytest.mark.parametrize("hidden_case", list(HIDDEN))
@pytest.mark.parametrize("n_teachers", [1, 2])
@pytest.mark.parametrize(("method", "student_builder", "tolerance"), [
    ("forward_ad", tiny.tiny_distilbert, 1e-10),
    # A central difference needs a smooth student: DistilBERT's ReLU head has kinks that a difference quotient can
    # straddle (seen as ~7e-3 error for some tokenizer vocabularies); BERT's GELU/tanh path has none.
    ("finite_difference", tiny.tiny_bert, 1e-6),
])
def test_first_order_route_equals_double_backward(tokenizers, n_teachers, method, student_builder, tolerance,
                                                  hidden_case):
    """With dropout on, both routes see the same masks: the first-order route replays the pilot's RNG. With
    distill.hidden the JVP covers the student's [CLS] states (and projection) and the cross term the teachers'."""
    student, teachers, batch, quiz, hidden = hidden_setup(tokenizers, n_teachers, hidden_case, dropout=0.1,
                                                          student_builder=student_builder)
    results = {}
    for route in (method, "double_backward"):
        torch.manual_seed(123)
        copies = [copy.deepcopy(t) for t in teachers]
        results[route] = meta_gradients(copy.deepcopy(student), copies, batch, quiz, route, hidden)[0]
    for got, ref in zip(results[method], results["double_backward"]):
        num = sum(((got[n] - ref[n]) ** 2).sum() for n in ref).sqrt()
        den = sum((ref[n] ** 2).sum() for n in ref).sqrt()
        assert num / den < tolerance, f"{method}: relative error {num / den:.2e}"


def _regression_head(model) -> None:
    """One output, as a regression task's classifier has (STS-B); float64 like the rest of the model."""
    head = model.classifier.out_proj if hasattr(model.classifier, "out_proj") else model.classifier
    one = torch.nn.Linear(head.in_features, 1, dtype=head.weight.dtype)
    if hasattr(model.classifier, "out_proj"):
        model.classifier.out_proj = one
    else:
        model.classifier = one
    model.config.num_labels = model.num_labels = 1


@pytest.mark.parametrize("n_teachers", [1, 2])
def test_meta_gradient_of_a_regression_head(tokenizers, n_teachers):
    """MSE distillation and an MSE quiz: the first-order route still equals double backward and the definition."""
    student, teachers, batch, quiz = make_setup(tokenizers, n_teachers, student_builder=tiny.tiny_bert)
    torch.manual_seed(5)
    for model in (student, *teachers):
        _regression_head(model)
    batch.labels = torch.linspace(0, 5, len(batch.labels), dtype=torch.float64)  # similarity scores
    quiz.labels = torch.linspace(1, 4, len(quiz.labels), dtype=torch.float64)
    base = [{n: p.detach().clone() for n, p in t.named_parameters()} for t in teachers]
    results = {}
    for route in ("forward_ad", "double_backward"):
        results[route], _ = meta_gradients(copy.deepcopy(student), [copy.deepcopy(t) for t in teachers], batch, quiz,
                                           route)
    for got, ref in zip(results["forward_ad"], results["double_backward"]):
        num = sum(((got[n] - ref[n]) ** 2).sum() for n in ref).sqrt()
        den = sum((ref[n] ** 2).sum() for n in ref).sqrt()
        assert den > 0 and num / den < 1e-10
    torch.manual_seed(0)
    direction = [{n: torch.randn_like(p) for n, p in phi.items()} for phi in base]
    eps = 1e-5
    plus = [{n: p + eps * d[n] for n, p in phi.items()} for phi, d in zip(base, direction)]
    minus = [{n: p - eps * d[n] for n, p in phi.items()} for phi, d in zip(base, direction)]
    finite = (quiz_loss_of_teachers(student, teachers, batch, quiz, plus)
              - quiz_loss_of_teachers(student, teachers, batch, quiz, minus)).item() / (2 * eps)
    analytic = sum((g[n] * d[n]).sum().item() for g, d in zip(results["forward_ad"], direction) for n in g)
    assert abs(finite) > 1e-6 and abs(analytic - finite) / abs(finite) < 1e-4


@pytest.mark.parametrize("hidden_case", [None, "projected"])
def test_pilot_leaves_student_alone_and_real_step_uses_updated_teacher(tokenizers, hidden_case):
    student, teachers, batch, quiz, hidden = hidden_setup(tokenizers, 2, hidden_case)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    seen_during_meta = {}

    engines = [Recording(t, lr=0.5) for t in teachers]
    student_engine = Recording(student, lr=0.1)
    original_step = engines[-1].step

    def spy_step():  # the last teacher's step runs after the pilot and the quiz, before the real step
        seen_during_meta.update({n: p.detach().clone() for n, p in student.named_parameters()})
        original_step()

    engines[-1].step = spy_step
    algo = MetaDistil(student_engine, engines, DISTILL, MetaDistilConfig(pilot_lr=PILOT_LR, quiz_batch_size=4),
                      quiz_batches=itertools.repeat(quiz), hidden=hidden)
    losses = algo.train_step(batch, step=0)
    assert all(torch.equal(before[n], seen_during_meta[n]) for n in before), "the pilot changed the real student"

    # Reference real step: the plain KD gradient of the original student against the *updated* teachers.
    fresh = copy.deepcopy(student)
    fresh.load_state_dict(before)
    theta = dict(fresh.named_parameters())
    updated = [{n: p.detach() for n, p in t.named_parameters()} for t in teachers]
    loss = pilot_loss_of(fresh, theta, teachers, updated, batch, hidden)
    loss.backward()
    expected = {n: p.grad for n, p in fresh.named_parameters()}
    got = student_engine.seen[0]
    assert all(torch.allclose(got[n], expected[n], rtol=1e-9, atol=1e-12) for n in expected)
    assert losses["kd"] == pytest.approx(loss.item(), rel=1e-12)
    assert ("hidden" in losses) is (hidden is not None)
    assert any(not torch.equal(before[n], p) for n, p in student.named_parameters()), "the real step did not update"



@pytest.mark.parametrize("hidden_case", [None, "projected"])
@pytest.mark.parametrize("method", ["forward_ad", "finite_difference"])
def test_lagged_step_is_the_exact_step_on_the_teachers_before_their_update(tokenizers, monkeypatch, method,
                                                                           hidden_case):
    """update=lagged: the student steps on the pilot's gradient, i.e. an exact step whose teachers had not moved yet.
    Dropout is on, so the reference also checks that the lagged step reuses the pilot's masks."""
    student, teachers, batch, quiz, hidden = hidden_setup(tokenizers, 2, hidden_case, dropout=0.1,
                                                          student_builder=tiny.tiny_bert)

    def run(update: str, pre_update_teachers: bool):
        s, ts = copy.deepcopy(student), [copy.deepcopy(t) for t in teachers]
        engines, student_engine = [Recording(t, lr=0.5) for t in ts], Recording(s, lr=0.1)
        algo = MetaDistil(student_engine, engines, DISTILL,
                          MetaDistilConfig(pilot_lr=PILOT_LR, quiz_batch_size=4, meta_gradient=method, update=update),
                          quiz_batches=itertools.repeat(quiz), hidden=hidden)
        if pre_update_teachers:  # the teachers are in eval mode: their logits before the update are deterministic
            frozen = algo.teacher_outputs(batch)
            monkeypatch.setattr(algo, "teacher_outputs", lambda _batch: frozen)
        torch.manual_seed(5)
        losses = algo.train_step(batch, step=0)
        after = {n: p.detach() for n, p in s.named_parameters()}
        return losses, student_engine.seen[0], [e.seen[0] for e in engines], after

    lagged, reference, exact = run("lagged", False), run("exact", True), run("exact", False)

    def distance(a: dict, b: dict) -> float:
        return float(sum(((a[n] - b[n]) ** 2).sum() for n in b).sqrt() / sum((b[n] ** 2).sum() for n in b).sqrt())

    assert distance(lagged[1], reference[1]) < 1e-10, "student gradient"
    assert all(distance(g, r) < 1e-10 for g, r in zip(lagged[2], reference[2])), "teacher meta-gradients"
    assert distance(lagged[3], reference[3]) < 1e-12, "student after the step"
    assert lagged[0] == pytest.approx(reference[0], rel=1e-10)
    assert lagged[0]["kd"] == lagged[0]["pilot_kd"]
    # ... and the exact step on the updated teachers is a different step (so the comparison above can fail)
    assert distance(exact[1], reference[1]) > 1e-4


def test_lagged_update_needs_a_first_order_meta_gradient():
    with pytest.raises(ValueError, match=r"lagged.*double_backward"):
        MetaDistilConfig(update="lagged", meta_gradient="double_backward")


def test_one_sided_difference_is_accurate_in_float32(tokenizers):
    """meta_gradient=finite_difference in the precision it is used in: an fp32 student with dropout on, the tangent
    a real quiz gradient, the base logits those of a grad-mode forward (as the pilot's are). A step scaled by |θ|
    was 25-40% off at MiniLM size; the sqrt(eps) step along the unit tangent stays near 1e-4."""
    from torch.func import jvp

    from trainer.algorithms.metadistil import finite_difference_jvp, forward, replay_rng, rng_state

    student, _, batch, quiz = make_setup(tokenizers, 1, dtype=torch.float32, dropout=0.1,
                                         student_builder=tiny.tiny_bert)
    theta = {n: p.detach().requires_grad_() for n, p in student.named_parameters()}
    state = rng_state(batch.labels.device)
    pilot_logits = forward(student, theta, batch.student)
    v = torch.autograd.grad(cross_entropy(forward(student, theta, quiz.student)[0], quiz.labels), list(theta.values()))
    primal, tangents = {n: p.detach() for n, p in theta.items()}, dict(zip(theta, v))
    logits_at = lambda params: forward(student, params, batch.student)  # noqa: E731
    with replay_rng(state), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        (exact,) = jvp(logits_at, (primal,), (tangents,))[1]
    (approx,) = finite_difference_jvp(logits_at, primal, tangents, tuple(o.detach() for o in pilot_logits), state)
    error = ((approx - exact).norm() / exact.norm()).item()
    assert exact.norm() > 0
    assert error < 2e-3, f"relative error {error:.2e}"


def _spy_forward(monkeypatch, record):
    """Record (inputs, the module's training flag, flash attention allowed, the logits) for every functional forward
    of the meta step."""
    from trainer.algorithms import metadistil

    forward = metadistil.forward

    def spy(module, params, inputs, states=None):
        outputs = forward(module, params, inputs, states)
        record.append((inputs, module.training, torch.backends.cuda.flash_sdp_enabled(), params, outputs[0]))
        return outputs

    monkeypatch.setattr(metadistil, "forward", spy)


@pytest.mark.parametrize("quiz_dropout", [False, True])
def test_quiz_is_evaluated_without_dropout_unless_asked(tokenizers, monkeypatch, quiz_dropout):
    student, teachers, batch, quiz = make_setup(tokenizers, 1, dropout=0.3, student_builder=tiny.tiny_bert)
    calls = []
    _spy_forward(monkeypatch, calls)
    meta = MetaDistilConfig(pilot_lr=PILOT_LR, quiz_batch_size=4, quiz_dropout=quiz_dropout)
    algo = MetaDistil(Recording(student), [Recording(t) for t in teachers], DISTILL, meta, itertools.repeat(quiz))
    losses = algo.train_step(batch, step=0)
    (quiz_call,) = [c for c in calls if c[0] is quiz.student]
    _, training, _, stepped, _ = quiz_call
    assert training is quiz_dropout
    assert student.training, "the student must be back in training mode after the quiz"
    # The logged quiz loss is the eval-mode cross-entropy of the stepped student (deterministic), or, with
    # quiz_dropout, a dropout sample of it that differs.
    student.eval()
    eval_ce = cross_entropy(functional_call(student, stepped, kwargs=quiz.student).logits, quiz.labels).item()
    student.train()
    if quiz_dropout:
        assert abs(losses["quiz_ce"] - eval_ce) > 1e-6
    else:
        assert losses["quiz_ce"] == pytest.approx(eval_ce, rel=1e-12)


@pytest.mark.parametrize("method", ["forward_ad", "finite_difference"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_pilot_runs_on_the_jvp_kernel_while_attention_draws_masks(tokenizers, monkeypatch, method, dropout):
    """Fused attention kernels draw dropout masks their own way (on CUDA), so a JVP on the math kernel could not
    replay them: with attention dropout on, every student forward on the training batch (pilot and JVP) must run
    with the fused kernels off; with no dropout the pilot keeps the fast default."""
    student, teachers, batch, quiz = make_setup(tokenizers, 1, dtype=torch.float32, dropout=dropout,
                                                student_builder=tiny.tiny_bert)
    calls = []
    _spy_forward(monkeypatch, calls)
    meta = MetaDistilConfig(pilot_lr=PILOT_LR, quiz_batch_size=4, meta_gradient=method)
    MetaDistil(Recording(student), [Recording(t) for t in teachers], DISTILL, meta,
               itertools.repeat(quiz)).train_step(batch, step=0)
    student_calls = [flash for inputs, _, flash, _, _ in calls if inputs is batch.student]
    assert len(student_calls) == 2  # the pilot, then the JVP's (forward-mode or difference) forward
    pilot_flash, jvp_flash = student_calls
    assert pilot_flash is (dropout == 0)
    if dropout:
        assert not jvp_flash


@pytest.mark.gpu
@pytest.mark.parametrize("n_teachers", [1, 2])
def test_first_order_route_equals_double_backward_on_cuda_with_dropout(tokenizers, cuda, n_teachers):
    """On CUDA the default attention kernel for fp32 draws its dropout masks inside the kernel. The pilot must run
    on the JVP's kernel, or forward_ad differentiates another function than the pilot's (an O(1) error)."""
    student, teachers, batch, quiz = make_setup(tokenizers, n_teachers, dtype=torch.float32, dropout=0.1,
                                                student_builder=tiny.tiny_bert)
    batch, quiz = batch.to(cuda), quiz.to(cuda)
    results = {}
    for route in ("forward_ad", "double_backward"):
        torch.manual_seed(123)
        copies = [copy.deepcopy(t).to(cuda) for t in teachers]
        results[route] = meta_gradients(copy.deepcopy(student).to(cuda), copies, batch, quiz, route)[0]
    for got, ref in zip(results["forward_ad"], results["double_backward"]):
        num = sum(((got[n] - ref[n]) ** 2).sum() for n in ref).sqrt()
        den = sum((ref[n] ** 2).sum() for n in ref).sqrt()
        assert num / den < 1e-3, f"forward_ad vs double_backward on CUDA: relative error {num / den:.2e}"
