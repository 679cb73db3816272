"""The report of bench/step_cost.py: seconds per step, ratios to KD, targets, MetaDistil's phases, a markdown table."""

from __future__ import annotations

import statistics
from collections import defaultdict

# The project's targets, all at quiz batch 16 (BENCHMARKS.md): k=1 time, k=4 time, peak memory, each against KD.
TARGET_K1, TARGET_K4, TARGET_MEMORY = 3.0, 1.5, 1.8
TARGET_LAGGED_K1, TARGET_LAGGED_K4 = 2.6, 1.4  # metadistil.update: lagged
TARGET_SHARED = 1 / 1.25  # KD with shared teacher logits: at least 1.25x faster than KD
# The MetaDistil step's timer phases and the sub-phases it times inside them ("teacher_update/student_jvp"). Sub-phases
# the timer does not have print as 0; phases it has beyond these print too.
PHASES = {
    "pilot": ("master_weights",),
    "quiz": (),
    "teacher_update": ("student_jvp", "logit_cross_term", "apply_gradients", "teacher_step"),
    "student_update": ("teacher_logits", "apply_gradients", "student_step"),
}
REST = {
    "pilot": "rest: student and teacher forwards, pilot backward",
    "teacher_update": "rest: quiz-loss backward + teacher VJP (or double bwd)",
    "student_update": "rest: student backward (retained pilot graph)",
}
OUTSIDE_PHASES = ("kd_step",)  # the plain KD steps of k > 1: not part of a meta step


def say(*parts) -> None:
    print(*parts, flush=True)


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


def time_target(v) -> float | None:
    if v.shared_logits:
        return TARGET_SHARED
    if v.algorithm != "metadistil" or v.small_quiz or v.method == "double_backward":
        return None
    k1, k4 = (TARGET_LAGGED_K1, TARGET_LAGGED_K4) if v.update == "lagged" else (TARGET_K1, TARGET_K4)
    return k1 if v.k == 1 else k4 if v.k == 4 else None


def memory_label(args) -> str:
    if args.device == "cuda":
        return ("peak GPU memory: torch.cuda.max_memory_allocated over the variant's steps, one variant on the GPU at "
                "a time, less what was allocated before it was built")
    return "peak resident memory: ru_maxrss of one child process per variant"


def report(args, shape, state: dict, memory: dict, header: dict) -> dict:
    interrupted = state.pop("_interrupted", False)
    if not state["kd"]["steps"]:
        say("no complete timed round: nothing to report")
        return {"header": header, "rows": [], "phases": {}, "memory": memory, "interrupted": True}
    kd = per_step(state["kd"])
    kd_by_round = {rec["round"]: rec["s"] for rec in state["kd"]["steps"]}
    kd_mem = memory.get("kd", {}).get("peak_mb")
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
        mem = memory.get(name, {}).get("peak_mb")
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
        say(f"\n== ratios to KD ({memory_label(args)})")
        for row in rows[1:]:
            if row["memory_ratio"] is not None:
                target = time_target(state[row["variant"]]["variant"])
                say(f"ratio memory_{row['variant']} {row['memory_ratio']:.3f}"
                    + (f"  {verdict(row['memory_ratio'], TARGET_MEMORY)}" if target else ""))

    say(f"\n== targets (quiz batch {shape.quiz}): k=1 <= {TARGET_K1}x KD, k=4 <= {TARGET_K4}x KD (lagged: "
        f"{TARGET_LAGGED_K1}x, {TARGET_LAGGED_K4}x), peak memory <= {TARGET_MEMORY}x KD")
    for row in rows:
        t = time_target(state[row["variant"]]["variant"])
        if t:
            mem = (f"memory {row['memory_ratio']:.2f}x {'PASS' if row['memory_ratio'] <= TARGET_MEMORY else 'MISS'}"
                   if row["memory_ratio"] is not None else "memory n/a")
            say(f"  {row['variant']:36s} time {row['ratio']:.2f}x {'PASS' if row['ratio'] <= t else 'MISS'}"
                f" (<= {t})   {mem}")

    phases = {name: report_phases(name, s, kd) for name, s in state.items()
              if s["variant"].algorithm == "metadistil" and s["variant"].k == 1}
    markdown_table(args, shape, header, rows, len(kd_steps), interrupted, kd_mem is not None)
    return {"header": header, "rows": rows, "phases": phases, "memory": memory, "interrupted": interrupted}


def report_phases(name: str, s: dict, kd: float) -> dict[str, float]:
    """Median seconds of each timer phase of a k=1 variant's steps, sub-phases indented under their phase."""
    steps = s["steps"]
    total = per_step(s)
    seen = {phase for rec in steps for phase in rec["phases"]}
    outer = [*PHASES, *sorted(p for p in seen if "/" not in p and p not in PHASES and p not in OUTSIDE_PHASES)]
    say(f"\n== phases of {name} (median seconds over {len(steps)} steps; % of the median step {total:.3f} s; "
        f"kd step {kd:.3f} s)")
    out = {}

    def line(label: str, t: float, indent: int) -> None:
        say(f"{' ' * indent}{label[:58 - indent]:{58 - indent}s} {t:7.3f} s  {100 * t / total:5.1f}%  "
            f"{t / kd:5.2f}x kd")

    for phase in outer:
        out[phase] = median([rec["phases"].get(phase, 0.0) for rec in steps])
        line(phase, out[phase], 2)
        subs = [f"{phase}/{sub}" for sub in PHASES.get(phase, ())]
        subs += sorted(p for p in seen if p.startswith(phase + "/") and p not in subs)
        for sub in subs:
            out[sub] = median([rec["phases"].get(sub, 0.0) for rec in steps])
            line(sub.removeprefix(phase + "/"), out[sub], 4)
        if subs:
            out[f"{phase}/rest"] = median([rec["phases"].get(phase, 0.0) - sum(rec["phases"].get(sub, 0.0)
                                                                               for sub in subs) for rec in steps])
            line(REST.get(phase, "rest"), out[f"{phase}/rest"], 4)
    out["other"] = median([rec["s"] - sum(rec["phases"].get(p, 0.0) for p in outer) for rec in steps])
    line("other (outside the phases)", out["other"], 2)
    return out


def markdown_table(args, shape, header: dict, rows: list[dict], rounds_done: int, interrupted: bool,
                   with_memory: bool) -> None:
    say("\n== markdown table")
    if args.pretrained:
        models = "pretrained all-MiniLM-L6-v2 as teacher and student"
    else:
        models = (f"random-weight BERT teacher (hidden {shape.hidden}, {shape.layers} layers, {shape.heads} heads, "
                  f"intermediate {shape.intermediate}, vocab {shape.vocab}) and student ({shape.student_layers} "
                  f"layers, otherwise the same)")
    engines = "DeepSpeed bf16 engines (ZeRO 0)" if args.precision == "bf16" else "fp32 plain-torch engines"
    say(f"Shape {shape.name}: {models}; seq {shape.seq}, batch {shape.batch}, quiz batch {shape.quiz} "
        f"(`_q{shape.small_quiz}`: {shape.small_quiz}); {engines} on {header['device']}; {args.threads} threads; "
        f"torch {header['torch']}; {rounds_done} interleaved rounds{' (interrupted)' if interrupted else ''}. "
        f"Peak MB = {memory_label(args)}.\n")
    say("| variant | median s/step | ratio to KD | peak MB | memory ratio |")
    say("|---|---:|---:|---:|---:|")
    for row in rows:
        peak = f"{row['peak_mb']:.0f}" if row["peak_mb"] else "–"
        mratio = f"{row['memory_ratio']:.2f}" if row["memory_ratio"] is not None else (
            "1.00" if row["variant"] == "kd" and with_memory else "–")
        say(f"| {row['variant']} | {row['median_s']:.3f} | {row['ratio']:.2f} | {peak} | {mratio} |")
