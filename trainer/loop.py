"""One trial, top to bottom: build it (trainer.build), warm up, train, evaluate, write the outputs.

``run_trial`` runs the same from a test, from the CLI and inside a Ray worker; trackers come in as loggers.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from trainer import checkpoint, registry
from trainer.algorithms.finetune import FineTune
from trainer.build import Trial, build_trial
from trainer.config import DataConfig, TrialConfig, digest, flatten
from trainer.data import Splits, index_batches
from trainer.distributed import is_main, shard
from trainer.evaluation import improves, scores_on
from trainer.hidden import without_projection
from trainer.logging import DataSplit, Logger, Loggers, StdoutLogger
from trainer.preflight import check_trial

_CONTEXTS = {"train": "training", "quiz": "quiz", "validation": "validation", "test": "testing"}

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message says at which step and which loss."""


@dataclass
class TrialResult:
    metrics: dict[str, float]
    output_dir: Path


def run_trial(cfg: TrialConfig, loggers: Sequence[Logger] | None = None, progress: bool = True,
              on_eval=None, checkpoint_dir: Path | None = None, name: str | None = None) -> TrialResult:
    """Train and evaluate one trial.

    ``on_eval(step, metrics)`` is called after each evaluation (e.g. a Tune reporter). With ``checkpoint_dir``, the
    trial checkpoints there at each evaluation and, when a checkpoint is already there, continues from it.
    ``name`` (a sweep trial's id) starts every line the trial prints.
    """
    log = Loggers([StdoutLogger(name=name), *(loggers or [])])
    log.log_params(flatten(cfg))
    log.set_tags({"algorithm": cfg.algorithm})
    try:
        result = _run(cfg, log, progress, on_eval, checkpoint_dir)
    except BaseException as err:
        log.finish("FAILED", f"{type(err).__name__}: {err}")
        raise
    log.finish("FINISHED")
    return result


def _run(cfg: TrialConfig, log: Loggers, progress: bool, on_eval, checkpoint_dir: Path | None) -> TrialResult:
    check_trial(cfg)  # what `metadistil validate` checks, on the machine that runs the trial, before models load
    trial = build_trial(cfg)
    log.log_metrics({**{f"data_{k}": v for k, v in trial.splits.sizes().items()}, **trial.sizes}, step=0)
    log.log_datasets(data_splits(cfg.data, trial.splits))
    student, splits = trial.engines["student"], trial.splits
    warmup_steps, total = trial.warmup_steps, trial.train_steps

    config_key = checkpoint.fingerprint(cfg)
    resumed = checkpoint.load(checkpoint_dir, trial.engines, config_key) if checkpoint_dir else None
    start, best = resumed or (0, None)
    started = time.perf_counter()
    if resumed:
        log.set_tags({"resumed_from_step": str(start)})
    elif warmup_steps:
        _train(FineTune(student), trial, warmup_steps, log, progress, phase="warmup", stream_seed=cfg.seed + 1,
               with_teachers=False)

    algorithm = trial.algorithm(start)
    save = (partial(checkpoint.save, checkpoint_dir, engines=trial.engines, config=config_key)
            if checkpoint_dir else None)
    evaluate = partial(scores_on, student.module, splits.validation, trial.collate, cfg.eval.batch_size, trial.device,
                       splits.metrics)
    best = _train(algorithm, trial, total, log, progress, phase="train", stream_seed=cfg.seed,
                  with_teachers=registry.get(cfg.algorithm).teachers != "none", evaluate=evaluate, on_eval=on_eval,
                  start=start, best=best, save=save)

    student.module.load_state_dict(best["state"])
    test = scores_on(student.module, splits.test, trial.collate, cfg.eval.batch_size, trial.device, splits.metrics)
    extra = {f"best_val_{name}_{k}": v for name, part in splits.extra.items()
             for k, v in scores_on(student.module, part, trial.collate, cfg.eval.batch_size, trial.device,
                                   splits.metrics).items()}
    phases = trial.timer.summary()
    # train_wall_time_s: this attempt's warm-up and training, evaluations included; peak_memory_mb: the most GPU
    # memory a phase allocated on CUDA, else the process's peak resident memory (one column for the runs list)
    peaks = [v for k, v in phases.items() if k.startswith("peak_memory_")]
    # best_val_<metric>: the validation scores of the weights kept (the best by the main metric, splits.metrics[0])
    metrics = {**{f"best_val_{k}": v for k, v in best["scores"].items()}, "best_step": best["step"],
               **{f"test_{k}": v for k, v in test.items()}, **extra,
               "warmup_steps": warmup_steps, "train_steps": total, "train_wall_time_s": time.perf_counter() - started,
               **({"peak_memory_mb": max(peaks)} if peaks else {}), **trial.sizes, **phases}
    log.log_metrics(metrics, step=warmup_steps + total)
    if is_main():
        _save(trial, metrics, log)
        if checkpoint_dir:
            checkpoint.remove(checkpoint_dir)  # the trial is complete; its outputs replace the checkpoint
    return TrialResult(metrics, Path(cfg.output.dir))


def _train(algorithm: registry.Algorithm, trial: Trial, steps: int, log: Loggers, progress: bool, phase: str,
           stream_seed: int, with_teachers: bool, evaluate=None, on_eval=None, start: int = 0, best: dict | None = None,
           save=None) -> dict:
    """Run training steps ``start``..``steps``-1; with ``evaluate``, keep the weights best by the main validation
    metric (returned) and, with ``save``, checkpoint after each evaluation."""
    cfg, train = trial.cfg, trial.splits.train
    best = best or {"scores": {}, "step": 0, "state": None}
    noisy = phase == "train"  # warm-up fine-tunes on clean text
    bar = tqdm(total=steps, initial=start, desc=phase, disable=not progress, dynamic_ncols=True)
    stream = itertools.islice(batch_stream(len(train), cfg.optim.batch_size, stream_seed, steps), start, None)
    for step, (epoch, indices) in enumerate(stream, start=start):
        batch = trial.collate(train, shard(indices), epoch if noisy else None, with_teachers).to(trial.device)
        lr = algorithm.student.get_lr()[0]  # the rate this step applies (the step then advances the schedule)
        with trial.timer(f"{phase}_step"):
            losses = algorithm.train_step(batch, step)
        bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
        if bad:
            raise NonFiniteLossError(f"{phase} step {step}: loss {', '.join(f'{k}={v}' for k, v in bad.items())} "
                                     f"is not finite")
        log.log_metrics({**{f"{phase}/{k}": v for k, v in losses.items()}, f"{phase}/lr": lr}, step=step)
        bar.update()
        bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()}, refresh=False)
        if evaluate and ((step + 1) % cfg.eval.every_steps == 0 or step + 1 == steps):
            scores = evaluate()
            if improves(scores, best["scores"], trial.splits.metrics[0]):
                best = {"scores": scores, "step": step + 1, "state": _cpu_copy(algorithm.student.module)}
            metrics = {**{f"val_{k}": v for k, v in scores.items()},
                       **{f"best_val_{k}": v for k, v in best["scores"].items()}, "epoch": epoch}
            log.log_metrics(metrics, step=step + 1)
            if save:
                save(step + 1, best)
            if on_eval:
                on_eval(step + 1, metrics)
    bar.close()
    return best


def batch_stream(n: int, batch_size: int, seed: int, steps: int) -> Iterator[tuple[int, np.ndarray]]:
    """``steps`` batches of indices, reshuffled every epoch."""
    step, epoch = 0, 0
    while True:
        for indices in index_batches(n, batch_size, seed, epoch):
            if step == steps:
                return
            yield epoch, indices
            step += 1
        epoch += 1


def _save(trial: Trial, metrics: dict, log: Loggers) -> None:
    out = Path(trial.cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    # engines wrap the Hugging Face models that build_trial loaded; saved without a distill.hidden projection, the
    # student loads as the plain classifier it is
    student = cast("PreTrainedModel", trial.engines["student"].module)
    student.save_pretrained(out / "student", state_dict=without_projection(student.state_dict()))
    trial.student.tokenizer.save_pretrained(out / "student")
    if trial.cfg.output.save_teachers and registry.get(trial.cfg.algorithm).teachers == "trainable":
        for i, loaded in enumerate(trial.teachers):
            cast("PreTrainedModel", trial.engines[f"teacher_{i}"].module).save_pretrained(out / f"teacher_{i}")
            loaded.tokenizer.save_pretrained(out / f"teacher_{i}")
    (out / "config.yaml").write_text(yaml.safe_dump(trial.cfg.model_dump(mode="json"), sort_keys=False))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    # The checkpoint (gigabytes with DeepSpeed) and any saved teachers stay in the trial's storage; trackers get the
    # config, the metrics and the student.
    log.log_artifacts([out / "config.yaml", out / "metrics.json"], "trial")
    log.log_student(out / "student")


def data_splits(data: DataConfig, splits: Splits) -> list[DataSplit]:
    """The trial's four splits as trackers record them. The digest covers texts and labels in order, so two runs
    share a digest exactly when they saw the same examples, however their configs drew them."""
    if data.path is not None:
        source, source_type, subset, label = str(Path(data.path).resolve()), "local", None, Path(data.path).stem
    elif data.name == "synthetic":
        source, source_type, subset, label = data.name, "synthetic", None, data.name
    else:
        source, source_type, subset = data.name, "hub", data.subset
        label = "/".join(part for part in (data.name.rsplit("/", 1)[-1], data.subset) if part)
    described = []
    for split, context in _CONTEXTS.items():
        part = getattr(splits, split)
        # pairs join the digest only where there are pairs: the digests of single-text splits stay as they were
        content = [part.texts, part.labels, *([part.pairs] if part.pairs is not None else [])]
        described.append(DataSplit(f"{label}/{split}", context, len(part), digest(content), source, source_type,
                                   subset))
    return described


def _cpu_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
