"""The DeepSpeed path of the trainer, on CPU with world size 1.

* A DeepSpeed-wrapped step (ZeRO 0, 1, 2, fp32) must be numerically the plain-torch step: same gradients handed to
  every engine, same parameters afterwards, for MetaDistil (gradients computed outside the engines and handed in
  through ``apply_gradients``), KD and fine-tuning (the engine's own forward and backward).
* ZeRO-3 with metadistil is refused before anything is built.
* Whole trials run under DeepSpeed (fp32 matches the plain-torch trial; bf16 completes), and a user's DeepSpeed JSON
  is merged into the engine's config, with errors that name ``deepspeed.config_path``.

The first ``deepspeed.initialize`` of a machine JIT-compiles a comm op (about a minute, cached afterwards).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import tiny
from trainer.algorithms import KD, FineTune, MetaDistil
from trainer.config import (
    ConfigError,
    DeepSpeedConfig,
    DistillConfig,
    HiddenConfig,
    MetaDistilConfig,
    NoiseConfig,
    parse_config,
)
from trainer.data import Collator, synthetic_sentiment
from trainer.engine import Schedule, TorchEngine, deepspeed_config, wrap
from trainer.hidden import PROJECTION, prepare
from trainer.loop import run_trial
from trainer.models import Loaded

deepspeed = pytest.importorskip("deepspeed")
from deepspeed.utils import safe_get_full_grad  # noqa: E402

DISTILL = DistillConfig(temperature=2.0, alpha=0.7)
META = MetaDistilConfig(pilot_lr=0.5, teacher_lr=1e-2, quiz_batch_size=4, meta_gradient="forward_ad")
LR, WEIGHT_DECAY, BATCH = 1e-2, 0.01, 8
# Small enough that clipping is active on every engine at every step (asserted below), so that the clip is compared
# too: AdamW's first update is nearly scale-free, its second one is not.
GRAD_CLIP = 1e-3
STEPS = 2
# fp32, same kernels on both sides. What differs is rounding: DeepSpeed clips with its own formulas (its norm of the
# per-tensor norms, and grad * (1 / ((norm + 1e-6) / clip)) rather than grad * (clip / (norm + 1e-6))), and ZeRO 1/2
# run AdamW on one flat tensor. An ulp in a teacher's update moves the student's gradient by an ulp, and AdamW turns
# ulps in near-zero gradient entries into larger update differences. Observed over repeated runs: gradients within
# 2e-6 of their largest entry, parameters within 6e-7, losses within 2e-7 (relative); often exactly equal. A wrong
# gradient or a missing/wrong clip moves parameters by ~lr (1e-2) instead.
PARAM_TOL, GRAD_RTOL, LOSS_RTOL = 1e-5, 1e-4, 1e-5


def make_setup(tokenizers, teacher_hidden: int = 32):
    teachers = [tiny.tiny_bert(tokenizers["wordpiece"], hidden=teacher_hidden, seed=10).eval(),
                tiny.tiny_roberta(tokenizers["bpe"], hidden=teacher_hidden, seed=11).eval()]
    student = tiny.tiny_distilbert(tokenizers["wordpiece_cased"], seed=3).train()
    data = synthetic_sentiment(32, 4)["train"]
    collate = Collator(tokenizers["wordpiece_cased"], [tokenizers["wordpiece"], tokenizers["bpe"]], max_length=32,
                       noise=NoiseConfig(), seed=0)
    batches = [collate(data, range(i * BATCH, (i + 1) * BATCH)) for i in range(STEPS)]
    quizzes = [collate(data, range(2 * BATCH + 4 * i, 2 * BATCH + 4 * (i + 1)), with_teachers=False)
               for i in range(STEPS)]
    return student, teachers, batches, quizzes


@pytest.fixture(scope="module")
def setup(tokenizers):
    """fp32 tiny models (two teachers with different tokenizers, a student with a third) and fixed batches."""
    return make_setup(tokenizers)


@pytest.fixture(scope="module")
def wide_setup(tokenizers):
    """The same with wider teachers, distill.hidden on, the student given its projection; and the layer map."""
    student, teachers, batches, quizzes = make_setup(tokenizers, teacher_hidden=48)
    hidden = prepare(HiddenConfig(beta=30.0, layers=[(1, 1), (2, 2)]),
                     Loaded(student, tokenizers["wordpiece_cased"], "s"),
                     [Loaded(t, tokenizers[tok], "t") for t, tok in zip(teachers, ["wordpiece", "bpe"])])
    assert hasattr(student, PROJECTION)
    return (student, teachers, batches, quizzes), hidden


def _full_grads(engine) -> list[torch.Tensor]:
    params = [p for p in engine.module.parameters() if p.requires_grad]
    if isinstance(engine, TorchEngine):
        return [p.grad.detach().clone() for p in params]
    # Under ZeRO 1/2 the gradients live in the optimizer's partitioned buffers, not in p.grad.
    return [safe_get_full_grad(p).detach().clone() for p in params]


def _record_steps(engine, record: list) -> None:
    """Remember the (unclipped) gradients each step() is about to apply."""
    original = engine.step

    def step():
        record.append(_full_grads(engine))
        original()

    engine.step = step


def run_steps(setup, algorithm: str, ds: DeepSpeedConfig, hidden=None) -> dict:
    base_student, base_teachers, batches, quizzes = setup
    student = copy.deepcopy(base_student)
    teachers = [copy.deepcopy(t) for t in base_teachers]
    torch.manual_seed(0)
    # A decaying schedule: DeepSpeed must step it (and only on optimizer steps) exactly as the plain engine does.
    schedule = Schedule("linear", 2 * STEPS)
    student_engine = wrap(student, LR, WEIGHT_DECAY, ds, BATCH, GRAD_CLIP, schedule)
    engines = [student_engine]
    if algorithm == "metadistil":
        teacher_engines = [wrap(t, META.teacher_lr, WEIGHT_DECAY, ds, BATCH, GRAD_CLIP, schedule) for t in teachers]
        engines += teacher_engines
        algo = MetaDistil(student_engine, teacher_engines, DISTILL, META, quiz_batches=iter(quizzes), hidden=hidden)
    elif algorithm == "kd":
        algo = KD(student_engine, [t.requires_grad_(False) for t in teachers], DISTILL, hidden=hidden)
    else:
        algo = FineTune(student_engine)
    expected_type = type(student_engine).__name__
    assert (expected_type == "TorchEngine") != ds.enabled, expected_type
    grads: list[list] = [[] for _ in engines]
    for engine, record in zip(engines, grads):
        _record_steps(engine, record)
    losses = [algo.train_step(batch, step) for step, batch in enumerate(batches)]
    models = [student] + (teachers if algorithm == "metadistil" else [])
    params = [{n: p.detach().clone() for n, p in m.named_parameters()} for m in models]
    return {"losses": losses, "grads": grads, "params": params}


def _max_abs(a: dict | list, b: dict | list) -> float:
    pairs = zip(a.values(), b.values()) if isinstance(a, dict) else zip(a, b)
    return max((x - y).abs().max().item() for x, y in pairs)


@pytest.mark.parametrize("algorithm", ["metadistil", "kd", "finetune"])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_step_equals_torch_step(setup, stage, algorithm):
    compare_steps(setup, stage, algorithm)


@pytest.mark.parametrize("algorithm", ["metadistil", "kd"])
@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_step_with_hidden_distillation_equals_torch_step(wide_setup, stage, algorithm):
    """distill.hidden with a projection: the projection is one more student parameter to every engine."""
    setup, hidden = wide_setup
    compare_steps(setup, stage, algorithm, hidden)


def compare_steps(setup, stage: int, algorithm: str, hidden=None) -> None:
    torch_run = run_steps(setup, algorithm, DeepSpeedConfig(enabled=False), hidden)
    ds_run = run_steps(setup, algorithm, DeepSpeedConfig(enabled=True, zero_stage=stage, precision="fp32"), hidden)
    names = ["student", "teacher0 (bert)", "teacher1 (roberta)"]
    report = []

    assert len(ds_run["losses"]) == STEPS
    for ref, got in zip(torch_run["losses"], ds_run["losses"]):
        assert got.keys() == ref.keys()
        for key in ref:
            assert got[key] == pytest.approx(ref[key], rel=LOSS_RTOL), key

    for name, ref_steps, got_steps in zip(names, torch_run["grads"], ds_run["grads"]):
        assert len(ref_steps) == len(got_steps) == STEPS, f"{name}: every step must reach the engine"
        for step, (ref, got) in enumerate(zip(ref_steps, got_steps)):
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in ref)).item()
            assert norm > GRAD_CLIP, f"{name} step {step}: clipping inactive (norm {norm:.2e})"
            scale = max(g.abs().max().item() for g in ref)
            diff = _max_abs(ref, got)
            assert diff <= GRAD_RTOL * scale, f"{name} step {step}: gradient max |diff| {diff:.3e} (scale {scale:.2e})"
            report.append(f"{name} grad[{step}] {diff:.2e}")

    initial = [dict(setup[0].named_parameters())] + [dict(t.named_parameters()) for t in setup[1]]
    for name, ref, got, start in zip(names, torch_run["params"], ds_run["params"], initial):
        moved = _max_abs(ref, {n: p.detach() for n, p in start.items()})
        assert moved > 0.5 * LR, f"{name}: the step did not update the parameters ({moved:.2e})"
        diff = _max_abs(ref, got)
        assert diff <= PARAM_TOL, f"{name}: parameters differ by {diff:.3e} after {STEPS} steps"
        report.append(f"{name} params {diff:.2e} (moved {moved:.2e})")
    print(f"\nZeRO {stage} {algorithm}: " + "; ".join(report))


def test_zero3_with_metadistil_is_refused():
    raw = {"algorithm": "metadistil", "teachers": [{"name": "some-teacher"}],
           "deepspeed": {"enabled": True, "zero_stage": 3}}
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage") as err:
        parse_config(raw)
    assert "ZeRO-3" in str(err.value)
    # Only the combination is refused.
    assert parse_config({**raw, "deepspeed": {"enabled": False, "zero_stage": 3}}).deepspeed.zero_stage == 3
    assert parse_config({**raw, "algorithm": "kd"}).deepspeed.zero_stage == 3


# ----------------------------------------------------------------------------------------------- user JSON config

def _ds(tmp_path, content, **kwargs) -> DeepSpeedConfig:
    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return DeepSpeedConfig(enabled=True, config_path=str(path), **kwargs)


def test_user_config_reaches_the_engine(tmp_path):
    user = {"gradient_clipping": 0.25, "optimizer": {"type": "SGD", "params": {"lr": 5.0}}, "train_batch_size": 999,
            "zero_optimization": {"reduce_bucket_size": 12345}, "steps_per_print": 7}
    cfg = _ds(tmp_path, user, zero_stage=1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    engine = wrap(model, 1e-2, 0.0, cfg, batch_size=4, grad_clip=1.0)
    assert engine.gradient_clipping() == 0.25  # the file's value over optim.grad_clip
    assert engine.steps_per_print() == 7
    assert engine.zero_optimization_stage() == 1  # a partial zero_optimization section keeps the trial's stage
    assert engine.zero_reduce_bucket_size() == 12345
    assert engine.train_micro_batch_size_per_gpu() == 4 and engine.train_batch_size() == 4  # the trainer's
    # The optimizer is still the trainer's torch AdamW at its lr, not the file's SGD.
    assert type(engine.optimizer.optimizer).__name__ == "AdamW"
    assert engine.optimizer.optimizer.param_groups[0]["lr"] == 1e-2

    # And the file's clip is what the engine applies. AdamW is blind to a common scale of all gradients, so one
    # step is left unclipped (norm 0.05) and one is clipped by 0.25 but not by the trial's own 1.0 (norm 0.5).
    torch.manual_seed(0)
    references = {}
    for clip in (0.25, 1.0):
        plain = copy.deepcopy(model)
        references[clip] = TorchEngine(plain, torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.0), clip)
    probe = copy.deepcopy(model)
    for target in (0.05, 0.5):
        x = torch.randn(4, 4)
        probe.zero_grad()
        probe(x).pow(2).sum().backward()
        scale = target / torch.sqrt(sum((p.grad ** 2).sum() for p in probe.parameters())).item()
        for eng in (engine, *references.values()):
            eng.backward(scale * eng(x).pow(2).sum())
            eng.step()
    got = dict(model.named_parameters())
    assert _max_abs(dict(references[0.25].module.named_parameters()), got) < 1e-6
    assert _max_abs(dict(references[1.0].module.named_parameters()), got) > 1e-4


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ({"zero_optimization": {"stage": 7}}, "zero_optimization.stage must be 0..3"),
    ({"zero_optimization": {"stage": 3}}, "deepspeed.zero_stage"),
    ({"bf16": {"enabled": True}}, "deepspeed.precision"),
    ({"scheduler": {"type": "WarmupLR"}}, "optim.schedule"),
])
def test_bad_user_config_names_the_key(tmp_path, content, message):
    cfg = DeepSpeedConfig(enabled=True, config_path=str(tmp_path / "missing.json")) if content is None \
        else _ds(tmp_path, content)
    with pytest.raises(ConfigError, match=r"^deepspeed\.config_path: ") as err:
        deepspeed_config(cfg, batch_size=4, grad_clip=None)
    assert message in str(err.value)
    # wrap() validates the file the same way, before anything is initialised.
    with pytest.raises(ConfigError, match=r"^deepspeed\.config_path: "):
        wrap(torch.nn.Linear(2, 2), 1e-2, 0.0, cfg, 4, None)


# ----------------------------------------------------------------------------------------------- whole trials

# The trial tests are marked slow (deselect with -m "not slow"); the step-level tests above check the same
# equivalence more tightly and in seconds.
TRIAL_STEPS = 24


class Recorder:
    """A logger that keeps every metric by step."""

    def __init__(self):
        self.metrics: dict[int, dict[str, float]] = {}

    def log_metrics(self, metrics, step):
        self.metrics.setdefault(step, {}).update(metrics)

    def losses(self, key: str) -> list[float]:
        return [self.metrics[step][key] for step in range(TRIAL_STEPS)]

    def __getattr__(self, name):  # log_params, set_tags, log_artifacts, finish
        return lambda *args, **kwargs: None


def run(tmp_path, model_dirs, name: str, device: str = "cpu", steps: int = TRIAL_STEPS, **deepspeed):
    """A MetaDistil trial (meta steps and, in between, KD steps through the teacher engines' forward)."""
    cfg = parse_config({
        "seed": 0,
        "algorithm": "metadistil",
        "device": device,
        "data": {"name": "synthetic", "train_size": 8 * steps, "quiz_size": 16, "validation_size": 32,
                 "test_size": 32, "max_length": 32},
        "student": {"name": model_dirs["distilbert"]},
        "teachers": [{"name": model_dirs["bert"]}, {"name": model_dirs["roberta"]}],
        "metadistil": {"pilot_lr": 1e-2, "teacher_lr": 1e-3, "quiz_batch_size": 8, "meta_interval": 3},
        "optim": {"lr": 3e-3, "batch_size": 8, "epochs": 1, "max_steps": steps, "grad_clip": 1.0},
        "eval": {"every_steps": steps},  # evaluated once, at the end: the saved student is the final one
        "deepspeed": deepspeed,
        "output": {"dir": str(tmp_path / name), "save_teachers": True},
    })
    recorder = Recorder()
    result = run_trial(cfg, loggers=[recorder], progress=False)
    assert result.metrics["train_steps"] == steps
    for key in ("best_val_accuracy", "test_accuracy"):
        assert 0 <= result.metrics[key] <= 1, key
    return result, recorder


def _saved(result, model: str) -> dict[str, torch.Tensor]:
    path = result.output_dir / model / "model.safetensors"
    assert path.is_file(), path
    return load_file(path)


def _moved(saved: dict, initial: dict) -> float:
    return max((saved[k].float() - initial[k].float()).abs().max().item() for k in initial if k in saved)


@pytest.fixture(scope="module")
def torch_trial(tmp_path_factory, model_dirs):
    return run(tmp_path_factory.mktemp("trial"), model_dirs, "torch", enabled=False)


MODELS = {"student": "distilbert", "teacher_0": "bert", "teacher_1": "roberta"}


@pytest.mark.slow  # with the shared torch_trial fixture: three tiny trials, 1.5-2 min on a busy 2-core box
def test_trial_with_deepspeed_zero1_matches_plain_torch(tmp_path, model_dirs, torch_trial):
    plain, plain_log = torch_trial
    ds, ds_log = run(tmp_path, model_dirs, "ds", enabled=True, zero_stage=1)
    # Rounding-level differences (see PARAM_TOL) over 24 steps; at most one of 32 predictions may flip on a near-tie.
    for key in ("best_val_accuracy", "test_accuracy"):
        assert abs(ds.metrics[key] - plain.metrics[key]) <= 1 / 32 + 1e-9, key
    report = []
    loss_diff = 0.0
    for step in range(TRIAL_STEPS):  # kd every step; pilot_kd and quiz_ce on meta steps
        ref = {k: v for k, v in plain_log.metrics[step].items() if k.startswith("train/")}
        got = {k: v for k, v in ds_log.metrics[step].items() if k.startswith("train/")}
        assert got.keys() == ref.keys() and ref, step
        loss_diff = max(loss_diff, *(abs(ref[k] - got[k]) / abs(ref[k]) for k in ref))
    assert loss_diff < 1e-4, f"per-step losses differ by {loss_diff:.2e} (relative)"
    report.append(f"losses {loss_diff:.2e}")
    for folder, model in MODELS.items():
        saved, reference = _saved(ds, folder), _saved(plain, folder)
        assert saved.keys() == reference.keys()
        diff = _max_abs(reference, {k: saved[k] for k in reference})
        assert diff < 1e-4, f"saved {folder} differs by {diff:.2e}"
        moved = _moved(saved, load_file(f"{model_dirs[model]}/model.safetensors"))
        assert moved > 1e-3, f"the DeepSpeed trial did not train {folder}"
        report.append(f"{folder} {diff:.2e} (moved {moved:.2e})")
    print("\ntrial ZeRO 1 fp32 vs torch, max |diff|: " + "; ".join(report))


@pytest.mark.slow  # with the shared torch_trial fixture: three tiny trials, 1.5-2 min on a busy 2-core box
def test_trial_with_deepspeed_bf16(tmp_path, model_dirs, torch_trial):
    _, plain_log = torch_trial
    result, log = run(tmp_path, model_dirs, "bf16", enabled=True, zero_stage=1, precision="bf16")
    report = []
    for folder, model in MODELS.items():
        saved = _saved(result, folder)
        assert {t.dtype for t in saved.values()} == {torch.bfloat16}, "the engine did not train in bf16"
        assert all(torch.isfinite(t.float()).all() for t in saved.values())
        moved = _moved(saved, load_file(f"{model_dirs[model]}/model.safetensors"))
        assert moved > 1e-3, f"the bf16 trial did not train {folder}"
        report.append(f"{folder} moved {moved:.2e}")
    # Same data, same start: the bf16 losses follow the fp32 ones to within bf16's precision.
    ref, got = plain_log.losses("train/kd"), log.losses("train/kd")
    assert all(math.isfinite(v) for v in got)
    diff = max(abs(a - b) / abs(a) for a, b in zip(ref, got))
    assert diff < 0.05, f"bf16 KD losses depart from fp32 by {diff:.1%}"
    print(f"\ntrial ZeRO 1 bf16: max relative KD-loss diff to fp32 {diff:.2e}; " + "; ".join(report))


@pytest.mark.gpu
def test_bf16_metadistil_trial_with_two_teachers_on_cuda(tmp_path, model_dirs, cuda):
    """The product's GPU path end to end: 20 steps, DeepSpeed bf16, a BERT and a RoBERTa teacher, meta steps
    (every third step) and KD steps between them."""
    steps = 20
    result, log = run(tmp_path, model_dirs, "cuda-bf16", device="cuda", steps=steps, enabled=True, zero_stage=0,
                      precision="bf16")
    losses = [v for step in range(steps) for k, v in log.metrics[step].items() if k.startswith("train/")]
    assert len(losses) >= steps and all(math.isfinite(v) for v in losses)
    assert {"train/quiz_ce", "train/pilot_kd"} <= set(log.metrics[0])
    for folder, model in MODELS.items():
        saved = _saved(result, folder)
        assert {t.dtype for t in saved.values()} == {torch.bfloat16}
        moved = _moved(saved, load_file(f"{model_dirs[model]}/model.safetensors"))
        assert moved > 1e-3, f"the CUDA bf16 trial did not train {folder}"
    assert result.metrics["peak_memory_teacher_update_mb"] > 0
