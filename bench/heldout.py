"""Score a sweep's saved students on examples that no trial of the sweep used: a test set larger than each trial's own.

    python bench/heldout.py configs/sweep/sst2_cpu.yaml --size 10000 --csv runs/reports/sst2_cpu/heldout.csv
    python bench/heldout.py configs/sweep/sst2_cpu_metadistil.yaml --heldout-of configs/sweep/sst2_cpu.yaml
    python bench/heldout.py configs/sweep/sst2_cpu.yaml --save-data heldout.tsv   # for `metadistil evaluate --sweep`

A trial's own test split (1,000 examples in sst2_cpu) puts one example at 0.1 points of accuracy, about as large as the
gaps between cells. Every trial of the plan (the teachers' fine-tuning included) draws its train, quiz and test examples
from the data's train split; the held-out set is drawn (seeded) from the train-split examples whose text none of them
uses, so no student, and no teacher a student learnt from, trained on any of it. Each finished trial's saved student is
scored on it; the table gives, per cell, the mean ± std over seeds beside the trials' own test accuracy.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from launcher.identity import of_plan, run_names, trial_id  # noqa: E402
from launcher.spec import Plan, Trial, expand, load_spec  # noqa: E402
from trainer.data import TextSet, load_raw, load_splits  # noqa: E402
from trainer.evaluation import score_saved  # noqa: E402
from trainer.models import pick_device  # noqa: E402


def heldout_set(plan: Plan, size: int, seed: int = 0) -> TextSet:
    """``size`` train-split examples (all of them if fewer) whose text no split of any trial of ``plan`` contains."""
    configs = [t.config for t in [*plan.teacher_trials.values(), *plan.trials]]
    used: set[str] = set()
    for cfg in configs:
        splits = load_splits(cfg.data, cfg.seed)
        for part in (splits.train, splits.quiz, splits.validation, splits.test):
            used.update(part.texts)
    source = load_raw(configs[0].data)["train"]
    free = [i for i, text in enumerate(source.texts) if text not in used]
    picked = np.random.default_rng(seed).permutation(free)[:size]
    # By length: each batch pads to its longest text, and accuracy does not depend on the order.
    return source.take(sorted(picked.tolist(), key=lambda i: (len(source.texts[i]), i)))


def save_tsv(data: TextSet, path: Path) -> None:
    """The examples as a tsv that ``read_labelled`` reads back (columns sentence, label; tabs and newlines in a text
    become spaces, which no tokenizer tells apart)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [f"{' '.join(text.split())}\t{label}" for text, label in zip(data.texts, data.labels)]
    path.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")


def cell_of(trial: Trial) -> str:
    """The trial's id with its seed left open: the seeds of one grid cell share it."""
    return trial.id if trial.axes.get("stage") == "teacher" else trial_id({**trial.axes, "seed": "*"})


def score_trials(plan: Plan, data: TextSet, batch_size: int, device: str) -> list[dict]:
    """One row per finished trial: its id, its MLflow run name, its cell, seed and both accuracies."""
    rows, torch_device = [], pick_device(device)
    names = run_names(of_plan(plan).values())
    for trial in [*plan.teacher_trials.values(), *plan.trials]:
        out = Path(trial.config.output.dir)
        if not (out / "metrics.json").is_file():
            print(f"  {trial.id}: not finished (no {out / 'metrics.json'}), skipped", file=sys.stderr)
            continue
        own = _own_test_accuracy(out)
        acc = score_saved(out / "student", data, trial.config.data.max_length, batch_size, torch_device)["accuracy"]
        rows.append({"trial": trial.id, "run_name": names[trial.id], "cell": cell_of(trial),
                     "seed": trial.axes.get("seed", ""),
                     "heldout_accuracy": acc, "own_test_accuracy": own})
        print(f"  {trial.id}: held-out {acc:.4f} (own test {own:.4f})", file=sys.stderr)
    return rows


def _own_test_accuracy(out: Path) -> float:
    return float(json.loads((out / "metrics.json").read_text())["test_accuracy"])


def cell_table(rows: list[dict], examples: int) -> str:
    cells: dict[str, list[dict]] = {}
    for row in rows:
        cells.setdefault(row["cell"], []).append(row)
    lines = [f"| cell | seeds | held-out accuracy % ({examples} examples) | own test accuracy % |", "|---|---|---|---|"]
    for cell, group in cells.items():
        lines.append(f"| {cell} | {len(group)} | {_mean_std([r['heldout_accuracy'] for r in group])} | "
                     f"{_mean_std([r['own_test_accuracy'] for r in group])} |")
    return "\n".join(lines)


def _mean_std(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="the sweep spec whose trials to score")
    parser.add_argument("--size", type=int, default=10_000, help="held-out examples to score on")
    parser.add_argument("--seed", type=int, default=0, help="which held-out examples are drawn")
    parser.add_argument("--heldout-of", metavar="SPEC", help="draw the held-out examples as for this spec instead "
                        "(e.g. the full grid a rerun cell comes from, so that both are scored on the same examples)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--csv", help="also write one row per trial here")
    parser.add_argument("--save-data", metavar="FILE", help="write the held-out examples here (tsv: sentence, label) "
                        "and stop: `metadistil evaluate --sweep NAME --data FILE` scores the sweep on them")
    args = parser.parse_args(argv)

    plan = expand(*load_spec(args.spec))
    source = expand(*load_spec(args.heldout_of)) if args.heldout_of else plan
    data = heldout_set(source, args.size, args.seed)
    print(f"held-out set: {len(data)} examples no trial of {source.spec.name} used", file=sys.stderr)
    if args.save_data:
        save_tsv(data, Path(args.save_data))
        print(f"wrote {args.save_data}", file=sys.stderr)
        return 0
    rows = score_trials(plan, data, args.batch_size, args.device)
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
            writer.writeheader()
            writer.writerows(rows)
    print(cell_table(rows, len(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
