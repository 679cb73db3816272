"""The one validated configuration of a trial.

Every key has a default and a help text (``metadistil validate --explain`` prints them). Validation happens before any
model or dataset is loaded, and every error names the dotted key, the offending value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer import registry
from trainer.errors import ConfigError, ConfigKeyError
from trainer.overrides import apply_overrides
from trainer.strict_yaml import read_yaml
from trainer.tasks import TASKS, TaskName, config_problem

# A registered algorithm's name (trainer/registry.py); a trial config's and a sweep grid's.
AlgorithmName = Annotated[str, BeforeValidator(registry.known)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    task: TaskName | None = Field(None, description="A GLUE task: fixes the text columns (a sentence or a pair), "
                                  "labels and metrics (trainer/tasks.py), read from the hub subset of that name or, "
                                  "with path, from a folder in GLUE's raw layout (train.tsv, dev.tsv). null: the "
                                  "columns below, scored by accuracy.")
    name: str = Field("nyu-mll/glue", min_length=1, description="Hugging Face hub dataset, used when path is null; "
                      "'synthetic' generates a small, learnable sentiment set offline.")
    subset: str | None = Field("sst2", description="Configuration (subset) of the hub dataset; null for none.")
    path: str | None = Field(None, description="Local labelled file (tsv/csv/jsonl/json/parquet) or a folder holding "
                             "train.* and validation.* (and optionally test.*) files. Overrides name.")
    text_column: str = Field("sentence", description="Column holding the text.")
    text_pair_column: str | None = Field(None, description="Column holding the second text of a sentence pair "
                                         "(every tokenizer reads the two as a pair); null for single texts.")
    label_column: str = Field("label", description="Column holding integer class labels 0..num_labels-1.")
    train_size: int | None = Field(30_000, ge=1, description="Training examples drawn from the train split; null "
                                   "takes every example left after test, quiz and carved validation (GLUE tasks "
                                   "of every size in one sweep).")
    quiz_size: int = Field(100, ge=1, description="Held-out quiz examples (MetaDistil's meta objective), drawn from "
                           "the train split, disjoint from train and test.")
    validation_size: int | None = Field(None, ge=1, description="Validation examples; null keeps the whole split. "
                                        "Required when the data has no validation split (a single local file): "
                                        "validation is then carved from train, disjoint from train, quiz and test.")
    test_size: int = Field(2_000, ge=0, description="Test examples. Taken from a labelled test split when the data has "
                           "one, else carved from the train split (disjoint from train and quiz).")
    max_length: int = Field(128, ge=8, le=4096, description="Tokens per text after truncation; batches pad to their "
                            "longest text.")
    split_seed: int | None = Field(None, ge=0, description="Seed of the split draw; null uses the trial seed.")
    token_cache: str | None = Field(None, description="Folder of texts tokenized once per tokenizer (a sweep writes "
                                    "it before its trials); texts not in it are tokenized on the fly. null = none.")
    logit_cache: str | None = Field(None, description="Folder of teacher logits shared by KD trials without teacher "
                                    "noise: the first trial computes a teacher's logits on its train split, later "
                                    "ones with the same weights, tokenizer and texts load them and skip the teacher's "
                                    "forward pass (a sweep sets <storage_path>/teacher_logits). null = none.")
    train_subset_seed: int | None = Field(None, ge=0, description="Draw the train examples from the pool left after "
                                          "test, quiz and carved validation with this seed (teachers fine-tuned on "
                                          "different subsets); null takes the split draw's next train_size examples.")

    @model_validator(mode="before")
    @classmethod
    def _task_subset(cls, raw: Any) -> Any:
        # GLUE's hub subsets are named after the tasks; written out, the subset reads back the same
        if isinstance(raw, dict) and raw.get("task") in TASKS and "subset" not in raw:
            return {**raw, "subset": raw["task"]}
        return raw

    @model_validator(mode="after")
    def _task_fixes_columns(self) -> DataConfig:
        if self.train_size is None and self.path is None and self.name == "synthetic":
            raise ConfigKeyError("train_size", "synthetic data has no size of its own; give a number")
        problem = config_problem(self, {k: f.default for k, f in DataConfig.model_fields.items()})
        if problem:
            raise ConfigKeyError(*problem)
        return self


class ModelConfig(_Section):
    name: str = Field(..., min_length=1, description="Hugging Face model id, local folder, or 'package:<module>' for a "
                      "model shipped inside an installed Python package (module.get_model_path()).")
    tokenizer: str | None = Field(None, description="Tokenizer id or folder; null uses the model's own.")
    label: str | None = Field(None, description="Short display name used in reports; null derives one from name.")


class StudentConfig(ModelConfig):
    name: str = Field("distilbert-base-uncased", min_length=1, description=ModelConfig.model_fields["name"].description)
    init_layers: list[int] | None = Field(None, min_length=1, description="Keep only these layers of the model in "
                                          "name, in this order (DistilBERT-style initialisation from a deeper model, "
                                          "e.g. a teacher's checkpoint: name=<teacher folder>, init_layers=[0, 2, 4]); "
                                          "null keeps every layer.")

    @model_validator(mode="after")
    def _distinct_layers(self) -> StudentConfig:
        if self.init_layers is not None:
            negative = sorted({i for i in self.init_layers if i < 0})
            repeated = sorted({i for i in self.init_layers if self.init_layers.count(i) > 1})
            if negative or repeated:
                # ConfigKeyError (not ValueError) so that the message names student.init_layers, not just "student".
                raise ConfigKeyError("init_layers", f"must be distinct non-negative layer indices, got "
                                     f"{self.init_layers}" + (f" (negative: {negative})" if negative else "")
                                     + (f" (repeated: {repeated})" if repeated else ""))
        return self


class HiddenConfig(_Section):
    beta: float = Field(100.0, ge=0, description="Weight of the hidden-state term: beta * MSE between the "
                        "L2-normalised [CLS] states of the mapped layers (mean over layers, examples and hidden "
                        "units, as in the official MetaDistil/PKD code, whose value 100 this is). 0 turns the term "
                        "off, so that a sweep can vary it: grid.extra {distill.hidden.beta: [0, 100]}.")
    layers: Literal["auto"] | list[tuple[int, int]] = Field(
        "auto", description="Which layers are compared: [student_layer, teacher_layer] pairs, numbered 1.. over the "
        "encoder layers (0 would be the embeddings), the same for every teacher; 'auto' maps student layer i of S "
        "(i = 1..S-1: the last is distilled through the logits) to teacher layer i*(T//S) of T, as PKD's skip "
        "strategy and the official MetaDistil do.")

    @field_validator("layers", mode="before")
    @classmethod
    def _pairs(cls, value: Any) -> Any:
        pairs = value if isinstance(value, list) else []
        if value != "auto" and (not pairs or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(type(i) is int and i >= 1 for i in p)
                for p in pairs)):
            # one message, not pydantic's one per union member
            raise ValueError("must be 'auto' or a non-empty list of [student_layer, teacher_layer] pairs of layer "
                             "numbers >= 1")
        return value


class DistillConfig(_Section):
    temperature: float = Field(2.0, gt=0, description="Softmax temperature T of the KL distillation term.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the distillation term; 1-alpha weighs cross-entropy "
                         "on the labels. Loss = alpha*T^2*KL(teacher||student) + (1-alpha)*CE.")
    hidden: HiddenConfig | None = Field(None, description="Intermediate-layer distillation (PKD) added to the loss, "
                                        "inside MetaDistil's meta-gradient too; the teachers' [CLS] states are "
                                        "averaged (they must share a hidden size), and a linear projection trained "
                                        "with the student maps a student of another size to theirs. null = off.")

    @field_validator("hidden")
    @classmethod
    def _beta_zero_is_off(cls, hidden: HiddenConfig | None) -> HiddenConfig | None:
        # a zero-weight term would still cost the hidden states' compute and switch shared teacher logits off
        return None if hidden is not None and hidden.beta == 0 else hidden


class MetaDistilConfig(_Section):
    pilot_lr: float = Field(6e-5, gt=0, description="Step size of the pilot (differentiable SGD) update of the "
                            "student copy.")
    teacher_lr: float = Field(2e-6, gt=0, description="AdamW learning rate of the teacher meta-update. Small on "
                              "purpose: Adam moves every teacher weight by about this much per meta step whatever the "
                              "meta-gradient's size; at 6e-5 a fine-tuned MiniLM teacher lost 11 points of accuracy in "
                              "10 steps (bench/meta_probe.py, BENCHMARKS.md).")
    quiz_batch_size: int = Field(16, ge=1, description="Quiz examples per meta step.")
    meta_interval: int = Field(1, ge=1, description="Meta-update the teachers every k steps; plain KD steps in "
                               "between (k=1 is the paper).")
    meta_gradient: Literal["forward_ad", "finite_difference", "double_backward"] = Field(
        "forward_ad", description="How the teacher's meta-gradient is computed. 'forward_ad': exact, first order, one "
        "forward-mode Jacobian-vector product of the student. 'finite_difference': that product as a one-sided "
        "difference, one extra forward beside the pilot's (approximate, about 1e-4 relative error in fp32; cheapest; "
        "ReLU kinks can bias it; not for bf16). 'double_backward': the naive second-order reference through the "
        "whole student (slower; its models use eager attention).")
    quiz_dropout: bool = Field(False, description="Evaluate the stepped student on the quiz batch with dropout on. "
                               "false (the official MetaDistil's choice): the quiz loss the teachers learn from is a "
                               "deterministic function of the step, not a dropout sample of it.")
    teacher_schedule: Literal["linear", "constant"] = Field(
        "linear", description="The teachers' learning-rate schedule over their meta-updates (one per meta step): "
        "'linear' or 'constant', as optim.schedule.")
    teacher_warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of the meta-updates over which the "
                                        "teachers' learning rate rises linearly from 0.")
    update: Literal["exact", "lagged"] = Field(
        "exact", description="The real student step of a meta step. 'exact' (the paper): a KD step with the teachers "
        "just meta-updated. 'lagged': the pilot's own KD gradient (teachers from before this step's meta-update), so "
        "the teachers' second forward and the student's backward are saved (about 10 pass-equivalents instead of 13); "
        "the teachers' update reaches the student one step later. Not with meta_gradient 'double_backward'.")

    @model_validator(mode="after")
    def _lagged_needs_first_order(self) -> MetaDistilConfig:
        if self.update == "lagged" and self.meta_gradient == "double_backward":
            raise ValueError("metadistil.update 'lagged' reuses the pilot's first-order gradient; it cannot run with "
                             "metadistil.meta_gradient 'double_backward' (use forward_ad or finite_difference)")
        return self


class WarmupConfig(_Section):
    epochs: float = Field(0.0, ge=0, description="Epochs (fractions allowed) of plain student fine-tuning on the "
                          "train split before distillation; 0 = off.")


class NoiseSide(_Section):
    p: float = Field(0.0, ge=0, lt=1, description="Probability that a word is replaced by a noise word.")
    mode: Literal["vocab", "token"] = Field("vocab", description="'vocab': a random word from the training texts; "
                                            "'token': the fixed string in token.")
    token: str = Field("[UNK]", min_length=1, description="The noise word when mode is 'token'; '[UNK]' and "
                       "'[MASK]' stand for each tokenizer's own unknown and mask token (RoBERTa's '<unk>').")


class NoiseConfig(_Section):
    teacher: NoiseSide = Field(default_factory=NoiseSide, description="Noise on the teachers' inputs.")
    student: NoiseSide = Field(default_factory=NoiseSide, description="Noise on the student's inputs.")


class OptimConfig(_Section):
    lr: float = Field(6e-5, gt=0, description="AdamW learning rate of the student.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (student and teachers); biases and "
                                "LayerNorm weights are not decayed (the transformers convention).")
    schedule: Literal["linear", "constant"] = Field(
        "linear", description="The student's learning-rate schedule over all its optimizer steps (warm-up "
        "fine-tuning, then training): 'linear' rises linearly over optim.warmup_ratio of them, then decays linearly "
        "to 0 (transformers' get_linear_schedule_with_warmup, the official MetaDistil's); 'constant' stays at "
        "optim.lr after the same rise.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of the student's optimizer steps over which "
                                "its learning rate rises linearly from 0 (rounded up to whole steps).")
    batch_size: int = Field(32, ge=1, description="Training examples per step.")
    epochs: float = Field(3.0, gt=0, description="Training epochs after warm-up (fractions allowed).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many training steps (after warm-up); "
                                  "null = run all epochs.")
    grad_clip: float | None = Field(1.0, gt=0, description="Max gradient norm; null = no clipping.")


class DeepSpeedConfig(_Section):
    enabled: bool = Field(True, description="Wrap the student and trainable teachers with deepspeed.initialize.")
    zero_stage: int = Field(0, ge=0, le=3, description="ZeRO stage; 3 is refused for metadistil (its meta step "
                            "needs whole parameters).")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Training precision; fp16 needs a GPU and is refused for metadistil. Under bf16 the meta "
        "step keeps fp32 weights and computes in bf16 (autocast), its quiz in fp32.")
    config_path: str | None = Field(None, description="A DeepSpeed JSON file merged over the generated config "
                                    "(batch sizes and the optimizer stay the trainer's).")


class EvalConfig(_Section):
    every_steps: int = Field(200, ge=1, description="Evaluate on validation every N training steps (and at the end).")
    batch_size: int = Field(64, ge=1, description="Examples per evaluation batch.")


class OutputConfig(_Section):
    dir: str = Field("runs/trial", min_length=1, description="Folder for the saved student, metrics and config.")
    save_teachers: bool = Field(False, description="Also save the teachers of an algorithm that trains them "
                                "(metadistil: the meta-updated teachers).")


class TrackingConfig(_Section):
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI; null reads MLFLOW_TRACKING_URI, and "
                                   "MLflow is off when neither is set.")
    experiment: str = Field("metadistil", min_length=1, description="MLflow experiment name.")
    run_name: str | None = Field(None, description="MLflow run name; null derives one from the config.")


class TrialConfig(_Section):
    # ge=0: numpy's SeedSequence (splits, batch order, noise) rejects negative seeds deep inside a run.
    seed: int = Field(42, ge=0, description="Seed of model heads, batch order, dropout, noise and (by default) the "
                      "splits.")
    algorithm: AlgorithmName = Field("metadistil", description=f"{' | '.join(registry.names())} (or an algorithm "
                                     "registered in trainer/registry.py).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' picks cuda when available.")
    data: DataConfig = Field(default_factory=DataConfig, description="Dataset and splits.")
    student: StudentConfig = Field(default_factory=StudentConfig, description="The model being trained.")
    teachers: list[ModelConfig] = Field(default_factory=list, description="Teacher models; their logits are "
                                        "averaged before the softmax. Required by kd and metadistil.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Distillation loss (kd, metadistil).")
    metadistil: MetaDistilConfig = Field(default_factory=MetaDistilConfig, description="Meta-learning settings.")
    warmup: WarmupConfig = Field(default_factory=WarmupConfig, description="Student fine-tuning before distillation.")
    noise: NoiseConfig = Field(default_factory=NoiseConfig, description="Word-level input noise.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimisation.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="DeepSpeed wrapping.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Outputs.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Experiment tracking.")

    @model_validator(mode="after")
    def _consistent(self) -> TrialConfig:
        # Each check raises with the key it concerns so that the message can name it.
        registry.get(self.algorithm).validate(self)
        if self.deepspeed.precision != "fp32" and not self.deepspeed.enabled:
            raise ConfigKeyError("deepspeed.precision", f"{self.deepspeed.precision} needs deepspeed.enabled: true "
                                 "(without DeepSpeed the trainer runs in fp32)")
        if self.deepspeed.precision == "fp16" and self.device == "cpu":
            raise ConfigKeyError("deepspeed.precision", "fp16 is not supported on CPU; use fp32 or bf16")
        if self.data.train_size is not None and self.optim.batch_size > self.data.train_size:
            raise ConfigKeyError("optim.batch_size", f"{self.optim.batch_size} exceeds data.train_size="
                                 f"{self.data.train_size}: a batch cannot hold more examples than the training set; "
                                 "lower it")
        return self


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        ctx_err = (e.get("ctx") or {}).get("error")
        if isinstance(ctx_err, ConfigKeyError):
            # the key is relative to the raising model (e.g. StudentConfig): prefix its location ("student")
            lines.append(f"{key + '.' if key else ''}{ctx_err.key}: {ctx_err.message}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            section = _section_of(e["loc"][:-1])
            allowed = ", ".join(section.model_fields) if section else "?"
            lines.append(f"{key}: unknown key (allowed here: {allowed})")
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            lines.append(f"{key or '<root>'}: {msg} (got {e['input']!r})")
    # one line, however many: the CLI shows a bad input as one line
    return "invalid trial config: " + "; ".join(lines)


def _section_of(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] | None = TrialConfig
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model


def parse_config(raw: dict[str, Any]) -> TrialConfig:
    """Validate a plain dict; raise ConfigError naming each offending key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid trial config: the top level must be a mapping, got {type(raw).__name__}")
    try:
        return TrialConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrialConfig:
    """Read a YAML trial config, apply overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):  # checked before overrides, which would otherwise fail obscurely on a list
        raise ConfigError(f"{path}: the top level must be a mapping of config keys, got {type(raw).__name__}")
    return parse_config(apply_overrides(raw, overrides or []))


def digest(payload: Any, length: int = 12) -> str:
    """A stable short hash of JSON-able data (keys sorted): config hashes, cache folder names, checkpoint keys."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:length]


def flatten(config: TrialConfig) -> dict[str, Any]:
    """Flat ``section.key`` params for trackers, the same keys for every trial: the teachers, however many, are
    ``teachers.count`` and one list per teacher field (``teachers.name: [a, b]``, ``teachers.label``, ...), so that
    trials of 0, 1 or 2 teachers line up in a comparison, and a changed teacher still changes a param; likewise
    ``distill.hidden`` off is its keys, each null."""
    dumped = config.model_dump(mode="json")
    if dumped["distill"]["hidden"] is None:
        dumped["distill"]["hidden"] = dict.fromkeys(HiddenConfig.model_fields)
    teachers = dumped.pop("teachers")
    flat: dict[str, Any] = {"teachers.count": len(teachers)}
    flat.update({f"teachers.{key}": [t[key] for t in teachers] for key in ModelConfig.model_fields})

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = value

    walk("", dumped)
    return flat


def explain(model: type[BaseModel] = TrialConfig, prefix: str = "") -> list[str]:
    """One line per key: dotted name, default, help."""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        sub = next((c for c in (ann, *getattr(ann, "__args__", ()))
                    if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if sub is not None and name != "teachers":
            lines.append(f"{key}: {field.description}")
            lines.extend(explain(sub, f"{key}."))
        else:
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            lines.append(f"{key} = {default}: {field.description}")
    if model is TrialConfig:
        # list items are named with dotted indices everywhere (errors, overrides, flatten): teachers.0.name
        lines.extend(explain(ModelConfig, "teachers.<i>."))
    return lines
