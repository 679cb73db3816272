"""The ``metadistil`` command."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections import Counter
from pathlib import Path

from trainer.config import ConfigError, explain, load_config
from trainer.logging import redact_text, redact_uri


def _train(args: argparse.Namespace) -> int:
    from launcher.tracking import MLflowLogger, refuse_config_credentials, resolve_tracking

    cfg = load_config(args.config, args.overrides)
    refuse_config_credentials([cfg])
    tracking = resolve_tracking(cfg.tracking.mlflow_uri, cfg.tracking.experiment, default=None)
    loggers = [MLflowLogger(tracking.uri, tracking.experiment, cfg.tracking.run_name)] if tracking else []
    from trainer.loop import run_trial  # torch and DeepSpeed: seconds of imports, after the quick checks

    result = run_trial(cfg, loggers, progress=not args.no_progress)
    print(f"best validation accuracy {result.metrics['best_val_accuracy']:.4f}, "
          f"test accuracy {result.metrics['test_accuracy']:.4f}; outputs in {result.output_dir}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from launcher.tracking import refuse_config_credentials

    cfg = load_config(args.config, args.overrides)
    refuse_config_credentials([cfg])
    teachers = ", ".join(t.name for t in cfg.teachers) or "none"
    print(f"{args.config}: valid ({cfg.algorithm}; student {cfg.student.name}; teachers {teachers})")
    return 0


def _explain(args: argparse.Namespace) -> int:
    print("\n".join(explain()))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from launcher.spec import expand, load_spec
    from launcher.tracking import refuse_config_credentials

    spec, base = load_spec(args.spec)
    plan = expand(spec, base)
    refuse_config_credentials([t.config for t in [*plan.teacher_trials.values(), *plan.trials]])
    if args.dry_run:
        print(format_plan(plan))
        return 0
    from launcher.driver import run_sweep

    result = run_sweep(plan, resume=args.resume)
    print(f"sweep {spec.name}: {len(result.finished)} trials ran, {len(result.skipped)} already finished, "
          f"{len(result.failed)} failed; MLflow parent run {result.parent_run_id} at {redact_uri(result.tracking_uri)}")
    if result.replaced:
        print(f"  ran again because their config changed since their earlier run (now deleted in MLflow, "
              f"restorable): {', '.join(result.replaced)}")
    for trial, error in result.failed.items():
        print(f"  FAILED {trial}: {redact_text(error.splitlines()[0])[:300]}")
    print("sweep wall time: " + ", ".join(f"{k.removeprefix('sweep_').removesuffix('_s').replace('_', ' ')} "
                                          f"{v:.1f} s" for k, v in result.phases.items()))
    if result.best:
        print(f"best student: {result.best[0]} (by validation accuracy), registered as MLflow model "
              f"metadistil-{spec.name} version {result.best[1]}")
    if not args.no_report:
        from launcher.report import build_report

        report = build_report(result.tracking_uri, spec.name, Path(f"runs/reports/{spec.name}"),
                              experiment=plan.trials[0].config.tracking.experiment if plan.trials else "metadistil")
        print(f"\n{report.markdown}\nwrote {report.csv_path} and {report.png_path}")
    return 1 if result.failed else 0


def format_plan(plan) -> str:
    from launcher.driver import teacher_cached

    lines = [(f"sweep {plan.spec.name}: {len(plan.teacher_trials)} teacher fine-tuning trials, {len(plan.trials)} "
              f"trials, {len(plan.dropped)} combinations dropped (config hash {plan.config_hash})")]
    for t in plan.teacher_trials.values():
        state = "cached" if teacher_cached(t) else "to fine-tune"
        lines.append(f"  teacher  {t.id:<40} {t.config.student.name} -> {t.config.output.dir} ({state})")
    header = (f"  {'#':>3} {'algorithm':<10} {'teachers':<22} {'student':<12} {'warmup':>6} {'noise':<10} "
              f"{'seed':>5} {'workers':>7}")
    lines.append(header)
    for i, t in enumerate(plan.trials):
        a = t.axes
        lines.append(f"  {i:>3} {a['algorithm']:<10} {'+'.join(t.teachers) or '-':<22} {a['student']:<12} "
                     f"{a['warmup']:>6g} {a['noise']:<10} {a['seed']:>5} {t.workers:>7}")
    reasons = Counter(reason for _, reason in plan.dropped)
    lines += [f"  dropped {n} combination(s) {reason}" for reason, n in sorted(reasons.items())]
    return "\n".join(lines)


def _report(args: argparse.Namespace) -> int:
    from launcher.report import ReportError, build_report
    from launcher.tracking import local_store, resolve_tracking

    out = Path(args.out or f"runs/reports/{args.sweep}")
    tracking = resolve_tracking(args.tracking_uri, args.experiment, default=local_store())
    try:
        report = build_report(tracking.uri, args.sweep, out, experiment=tracking.experiment,
                              attach=not args.no_attach)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.markdown)
    print(f"\nwrote {report.csv_path} and {report.png_path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from trainer.data import read_labelled_file
    from trainer.evaluation import score_saved
    from trainer.models import pick_device

    if not (Path(args.model) / "config.json").is_file():
        raise ConfigError(f"--model: {args.model!r} is not a saved Hugging Face model folder (no config.json)")
    data = read_labelled_file(args.data, args.text_column, args.label_column)
    score = score_saved(args.model, data, args.max_length, args.batch_size, pick_device(args.device))
    print(f"accuracy {score:.4f} on {len(data)} examples of {args.data}")
    if args.json:
        Path(args.json).write_text(json.dumps({"accuracy": score, "examples": len(data), "model": args.model,
                                               "data": args.data}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metadistil", description="Knowledge-distillation experiments: "
                                     "MetaDistil, KD and fine-tuning trials and sweeps.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (("train", _train, "run one trial"), ("validate", _validate, "check a trial config")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", help="trial config YAML")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. noise.student.p=0.1")
        p.set_defaults(func=func)
    sub.choices["train"].add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sub.add_parser("explain", help="list every config key with its default and help").set_defaults(func=_explain)
    sweep = sub.add_parser("sweep", help="run a grid of trials on Ray Tune, tracked in MLflow")
    sweep.add_argument("spec", help="sweep spec YAML")
    sweep.add_argument("--dry-run", action="store_true", help="expand and validate the grid, start nothing")
    sweep.add_argument("--resume", action="store_true",
                       help="continue the sweep's latest run: run only the trials that did not finish with their "
                            "current config")
    sweep.add_argument("--no-report", action="store_true", help="skip the Table 1 report at the end")
    sweep.set_defaults(func=_sweep)
    report = sub.add_parser("report", help="rebuild the report's Table 1 for a sweep from MLflow")
    report.add_argument("--sweep", required=True, help="sweep name (the spec's name)")
    report.add_argument("--out", help="folder for the CSV and PNG (default runs/reports/<sweep>)")
    report.add_argument("--tracking-uri", help="MLflow URI (default MLFLOW_TRACKING_URI, else ./mlflow.db)")
    report.add_argument("--experiment", default="metadistil", help="MLflow experiment of the sweep")
    report.add_argument("--no-attach", action="store_true", help="do not attach the files to the sweep's run")
    report.set_defaults(func=_report)
    evaluate = sub.add_parser("evaluate", help="accuracy of a saved student on any labelled file")
    evaluate.add_argument("--model", required=True, help="saved model folder (e.g. runs/.../student)")
    evaluate.add_argument("--data", required=True, help="labelled tsv/csv/jsonl/json/parquet file")
    evaluate.add_argument("--text-column", default="sentence")
    evaluate.add_argument("--label-column", default="label")
    evaluate.add_argument("--max-length", type=int, default=128)
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    evaluate.add_argument("--json", help="also write {accuracy, examples, model, data} to this file")
    evaluate.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {redact_text(str(err))}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - shown as Python would show it, but never with a password from a URI
        print(redact_text(traceback.format_exc()), end="", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
