"""Teacher recipes of a sweep: a ready checkpoint, or a fine-tuning the sweep runs first (once per task when the
task is a grid axis), and the teacher entries of the trials that distil from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from launcher.trials import Trial, absolute, check_trial_workers, token_cache_dir, validated
from trainer.config import digest
from trainer.overrides import apply_overrides

# grid.extra keys that change what a teacher learns: a fine-tuned teacher is trained per value (per task, say)
TEACHER_DATA = ("data.task", "data.path", "data.name", "data.subset")


class FinetuneRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, description="Model to fine-tune into a teacher (hub id, folder, package:).")
    seed: int = Field(42, ge=0, description="Seed of the head initialisation and batch order.")
    train_subset_seed: int | None = Field(None, ge=0, description="Draw the teacher's training examples from the "
                                          "train pool with this seed (BERT vs BERT2: same model, different subsets); "
                                          "null trains on the students' own training examples.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted trial keys for the fine-tuning "
                                      "trial, e.g. {optim.lr: 5e-5, optim.max_steps: 500}.")


class TeacherRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(None, description="A ready teacher: hub id, folder or package:<module>.")
    finetune: FinetuneRecipe | None = Field(None, description="Fine-tune a teacher in the sweep's first stage; "
                                            "cached by the content of the recipe.")
    tokenizer: str | None = Field(None, description="Tokenizer, if not the model's own.")
    label: str | None = Field(None, description="Display name in reports; null uses the teacher's key.")

    @model_validator(mode="after")
    def _one_source(self) -> TeacherRecipe:
        if (self.checkpoint is None) == (self.finetune is None):
            raise ValueError("give exactly one of checkpoint or finetune")
        return self


def teacher_variant(combo: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The combination's values of grid.extra keys that say which data a teacher learns (TEACHER_DATA): a teacher
    the sweep fine-tunes is fine-tuned once per variant, e.g. once per GLUE task."""
    return tuple((k, combo[k]) for k in sorted(combo) if k in TEACHER_DATA)


def teacher_trial_id(name: str, variant: tuple[tuple[str, Any], ...] = ()) -> str:
    return "__".join([f"teacher__{name}", *(f"{k}={v}" for k, v in variant)])


def teacher_model(name: str, recipe: TeacherRecipe, teacher_trials: dict[str, Trial],
                   variant: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    source = absolute(recipe.checkpoint) if recipe.checkpoint else \
        str(Path(teacher_trials[teacher_trial_id(name, variant)].config.output.dir) / "student")
    return {k: v for k, v in {"name": source, "tokenizer": recipe.tokenizer, "label": recipe.label or name}.items()
            if v is not None}


def teacher_trial(name: str, recipe: TeacherRecipe, variant: tuple[tuple[str, Any], ...], base: dict[str, Any],
                   storage: Path, workers: int) -> Trial:
    ft = recipe.finetune
    assert ft is not None, "expand() passes only recipes with finetune"
    raw = apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in variant])
    for key in ("teachers", "warmup", "noise", "metadistil", "distill"):
        raw.pop(key, None)
    raw.update(algorithm="finetune", seed=ft.seed,
               student={"name": absolute(ft.model), **({"tokenizer": recipe.tokenizer} if recipe.tokenizer else {}),
                        "label": recipe.label or name})
    raw.setdefault("data", {})["train_subset_seed"] = ft.train_subset_seed
    raw = apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in ft.overrides.items()])
    raw.pop("output", None)
    raw.pop("tracking", None)
    raw["output"] = {"dir": str(storage / "teachers" / f"{name}-{digest(raw)}")}
    raw["data"].setdefault("token_cache", token_cache_dir(storage))
    tid = teacher_trial_id(name, variant)
    where = " ".join([f"teachers.{name}", *(f"{k}={v}" for k, v in variant)])
    config = validated(raw, where)
    check_trial_workers(config, workers, where)
    return Trial(tid, {"stage": "teacher", "teacher": name, **dict(variant)}, config, workers=workers)
