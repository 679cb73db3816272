"""The ``metadistil`` command."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config import ConfigError, explain, load_config
from trainer.logging import NAMED_LINE, QUIET_LIBRARIES, redact_text, redact_uri
from trainer.tasks import METRIC_NAMES, main_metric

if TYPE_CHECKING:
    from trainer.preflight import EvalColumns

# Notices every trial repeats: transformers' load report (a fresh classification head is "MISSING") and its bars for
# loading and saving weights. Environment variables, so that the trainer reads them in this process and in the
# workers of a local Ray, which inherit it; -v leaves the libraries' defaults, and a value already set wins.
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", QUIET_LIBRARIES: "1"}


def _train(args: argparse.Namespace) -> int:
    from launcher.tracking import MLflowLogger, refuse_config_credentials, resolve_tracking

    cfg = load_config(args.config, args.overrides)
    refuse_config_credentials([cfg])
    tracking = resolve_tracking(cfg.tracking.mlflow_uri, cfg.tracking.experiment, default=None)
    loggers = [MLflowLogger(tracking.uri, tracking.experiment, cfg.tracking.run_name)] if tracking else []
    from trainer.loop import run_trial  # torch and DeepSpeed: seconds of imports, after the quick checks

    result = run_trial(cfg, loggers, progress=not args.no_progress)
    metric = main_metric(cfg.data.task)
    print(f"best validation {METRIC_NAMES[metric]} {result.metrics[f'best_val_{metric}']:.4f}, "
          f"test {METRIC_NAMES[metric]} {result.metrics[f'test_{metric}']:.4f}; outputs in {result.output_dir}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from launcher.tracking import refuse_config_credentials
    from trainer.preflight import check_trial

    cfg = load_config(args.config, args.overrides)
    refuse_config_credentials([cfg])
    splits = check_trial(cfg)  # the data files, local model folders, output folder and device, not only the keys
    teachers = ", ".join(t.name for t in cfg.teachers) or "none"
    sizes = f"; data {', '.join(f'{k} {v}' for k, v in splits.sizes().items())}" if splits else ""
    print(f"{args.config}: valid ({cfg.algorithm}; student {cfg.student.name}; teachers {teachers}{sizes})")
    return 0


def _explain(args: argparse.Namespace) -> int:
    print("\n".join(explain()))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from launcher.spec import expand, load_spec
    from launcher.tracking import refuse_config_credentials

    spec, base = load_spec(args.spec, args.overrides)
    plan = expand(spec, base)
    refuse_config_credentials([t.config for t in [*plan.teacher_trials.values(), *plan.trials]])
    _check_layer_maps(plan)
    if args.dry_run:
        print(format_plan(plan))
        return 0
    from launcher.driver import run_sweep

    result = run_sweep(plan, resume=args.resume, verbose=1 + args.verbose)
    print(f"sweep {spec.name}: {len(result.finished)} trials ran, {len(result.skipped)} already finished, "
          f"{len(result.failed)} failed; MLflow parent run {result.parent_run_id} at {redact_uri(result.tracking_uri)}")
    print(f"  its runs in the MLflow UI: {result.runs_view}")
    if result.stopped:
        print(f"  {len(result.stopped)} search trials stopped early by ASHA (finished, with their last evaluation)")
    if result.replaced:
        print(f"  ran again because their config changed since their earlier run (now deleted in MLflow, "
              f"restorable): {', '.join(result.replaced)}")
    for trial, error in result.failed.items():
        print(f"  FAILED {trial}: {redact_text(error.splitlines()[0])[:300]}")
    print("sweep wall time: " + ", ".join(f"{k.removeprefix('sweep_').removesuffix('_s').replace('_', ' ')} "
                                          f"{v:.1f} s" for k, v in result.phases.items()))
    for name, (trial, registered) in result.best.items():
        task = next((t.config.data.task for t in plan.trials if t.id == trial), None)
        print(f"best student: {trial} (by validation {METRIC_NAMES[main_metric(task)]}), registered as "
              f"models:/{name}@best (version {registered})")
    if not args.no_report:
        from launcher.report import build_report

        report = build_report(result.tracking_uri, spec.name, Path(f"runs/reports/{spec.name}"),
                              experiment=plan.trials[0].config.tracking.experiment if plan.trials else "metadistil")
        print(f"\n{report.markdown}\n{report.written}")
    return 1 if result.failed else 0


def _check_layer_maps(plan) -> None:
    """Every trial's distill.hidden layer map against its models' config.json, before any teacher is fine-tuned; a
    teacher still to fine-tune (its folder not written yet) has the depth of the model its recipe starts from."""
    from trainer.preflight import check_layer_map

    # a trial names a fine-tuned teacher by the folder its fine-tuning trial saves it to (launcher.spec)
    planned = {str(Path(t.config.output.dir) / "student"): t.config.student for t in plan.teacher_trials.values()}
    for trial in plan.trials:
        try:
            check_layer_map(trial.config, planned)
        except ConfigError as err:
            raise ConfigError(f"trial {trial.id}: {err}") from None


def format_plan(plan) -> str:
    from launcher.driver import teacher_cached

    lines = [(f"sweep {plan.spec.name}: {len(plan.teacher_trials)} teacher fine-tuning trials, {len(plan.trials)} "
              f"trials, {len(plan.dropped)} combinations dropped (config hash {plan.config_hash})")]
    for t in plan.teacher_trials.values():
        state = "cached" if teacher_cached(t) else "to fine-tune"
        lines.append(f"  teacher  {t.id:<40} {t.config.student.name} -> {t.config.output.dir} ({state})")
    if plan.search:  # the table's trials are then the confirm trials
        from launcher.search import format_search

        lines += format_search(plan)
    extra = list(plan.spec.grid.extra)  # grid.extra keys: a column each, headed by the key's last part
    header = (f"  {'#':>3} {'algorithm':<10} {'teachers':<22} {'student':<12} {'warmup':>6} {'noise':<10} "
              f"{'seed':>5} {'workers':>7}" + "".join(f" {k.rpartition('.')[2]:<10}" for k in extra))
    lines.append(header.rstrip())
    for i, t in enumerate(plan.trials):
        a = t.axes
        lines.append((f"  {i:>3} {a['algorithm']:<10} {'+'.join(t.teachers) or '-':<22} {a['student']:<12} "
                      f"{a['warmup']:>6g} {a['noise']:<10} {a['seed']:>5} {t.workers:>7}"
                      + "".join(f" {a.get(k, '-')!s:<10}" for k in extra)).rstrip())
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
    print(f"\n{report.written}")
    return 0


SWEEP_ONLY = ("tracking_uri", "experiment", "name", "out", "no_attach")  # evaluate's options for --sweep alone


def _evaluate(args: argparse.Namespace) -> int:
    import json

    if args.sweep:
        return _evaluate_sweep(args)
    given = [f"--{key.replace('_', '-')}" for key in SWEEP_ONLY if getattr(args, key) not in (None, False)]
    if given:
        raise ConfigError(f"{given[0]}: only with --sweep (--model scores one model)")
    from launcher.tracking import local_model_folder
    from trainer.evaluation import score_saved
    from trainer.models import pick_device
    from trainer.preflight import check_evaluation

    folder = local_model_folder(args.model)  # a models:/ or runs:/ URI is downloaded; the JSON keeps the URI
    # every input (the --json target too) is checked before the model loads: a bad one fails in a second
    data, metrics = check_evaluation(folder, args.data, args.task, _columns(args), args.max_length, args.batch_size,
                                     args.json)
    scores = score_saved(folder, data, args.max_length, args.batch_size, pick_device(args.device), metrics)
    print(f"{', '.join(f'{k} {v:.4f}' for k, v in scores.items())} on {len(data)} examples of {args.data}")
    if args.json:
        # "accuracy" at the top level as before the task metrics, for readers of that format
        kept = {"accuracy": scores["accuracy"]} if "accuracy" in scores else {}
        try:
            Path(args.json).write_text(json.dumps({**kept, "metrics": scores, "task": args.task,
                                                   "examples": len(data), "model": args.model, "data": args.data},
                                                  indent=2))
        except OSError as err:  # checked writable above, but a disk can still fill up
            raise ConfigError(f"--json: cannot write {args.json!r} ({err.strerror})") from None
    return 0


def _columns(args: argparse.Namespace) -> EvalColumns:
    from trainer.preflight import EvalColumns

    return EvalColumns(args.text_column, args.label_column, args.text_pair_column)


def _evaluate_sweep(args: argparse.Namespace) -> int:
    import json

    from launcher.report import ReportError
    from launcher.rescore import rescore_sweep
    from launcher.tracking import local_store, resolve_tracking

    if args.task:
        raise ConfigError("--task: only with --model (a sweep's students are scored by their trials' data.task)")
    tracking = resolve_tracking(args.tracking_uri, args.experiment or "metadistil", default=local_store())
    if args.json:
        from trainer.preflight import check_output_file

        check_output_file("--json", Path(args.json))
    try:
        result = rescore_sweep(tracking.uri, tracking.experiment, args.sweep, args.data, _columns(args),
                               args.max_length, args.batch_size, args.device,
                               Path(args.out or f"runs/reports/{args.sweep}"), args.name, not args.no_attach)
    except ReportError as err:
        raise ConfigError(f"--sweep: {err}") from None
    logged = sorted({result.prefix + m for scores in result.metrics.values() for m in scores})
    print(result.report.markdown)
    print(f"scored {len(result.scores)} students on {result.examples} examples of {args.data} (metrics "
          f"{', '.join(logged)} on their MLflow runs), {len(result.skipped)} skipped\n{result.report.written}")
    if args.json:
        Path(args.json).write_text(json.dumps({"metric": result.metric, "prefix": result.prefix,
                                               "examples": result.examples, "data": args.data, "sweep": args.sweep,
                                               "scores": result.scores, "metrics": result.metrics,
                                               "skipped": result.skipped}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metadistil", description="Knowledge-distillation experiments: "
                                     "MetaDistil, KD and fine-tuning trials and sweeps.")
    parser.add_argument("--version", action="version", version=f"metadistil {version('metadistil')}")
    verbose_help = ("also show the libraries' notices (transformers' load reports and weight bars, in trials too) "
                    "and, for a sweep, each trial's reports in Tune's output")
    parser.add_argument("-v", "--verbose", action="count", default=0, help=verbose_help)
    # -v after the command too (`sweep SPEC -v`, as cluster/submit.sh passes it); unset there, the global one holds
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=verbose_help)
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = partial(sub.add_parser, parents=[common])
    for name, func, text in (("train", _train, "run one trial"), ("validate", _validate, "check a trial config")):
        p = add_parser(name, help=text, description=text)
        p.add_argument("config", help="trial config YAML")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. noise.student.p=0.1")
        p.set_defaults(func=func)
    sub.choices["train"].add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_parser("explain", help="list every config key with its default and help").set_defaults(func=_explain)
    sweep = add_parser("sweep", help="run a grid of trials on Ray Tune, tracked in MLflow")
    sweep.add_argument("spec", help="sweep spec YAML")
    sweep.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="dotted overrides of the spec, e.g. base.optim.max_steps=4 grid.seed=[1] (values are YAML)")
    sweep.add_argument("--dry-run", action="store_true", help="expand and validate the grid, start nothing")
    sweep.add_argument("--resume", action="store_true",
                       help="continue the sweep's latest run: run only the trials that did not finish with their "
                            "current config")
    sweep.add_argument("--no-report", action="store_true", help="skip the Table 1 report at the end")
    sweep.set_defaults(func=_sweep)
    report = add_parser("report", help="rebuild the report's Table 1 for a sweep from MLflow")
    report.add_argument("--sweep", required=True, help="sweep name (the spec's name)")
    report.add_argument("--out", help="folder for the CSV and PNG (default runs/reports/<sweep>)")
    report.add_argument("--tracking-uri", help="MLflow URI (default MLFLOW_TRACKING_URI, else ./mlflow.db)")
    report.add_argument("--experiment", default="metadistil", help="MLflow experiment of the sweep")
    report.add_argument("--no-attach", action="store_true", help="do not attach the files to the sweep's run")
    report.set_defaults(func=_report)
    evaluate = add_parser("evaluate", help="accuracy (a GLUE task's metrics) of a saved student, or of every student "
                          "of a sweep, on any labelled file")
    scored = evaluate.add_mutually_exclusive_group(required=True)
    scored.add_argument("--model",
                          help="saved model folder (e.g. runs/.../student), or an MLflow model URI: "
                               "models:/<name>@<alias>, models:/<name>/<version> or runs:/<run id>/<path>, read from "
                               "MLFLOW_TRACKING_URI, else ./mlflow.db")
    evaluate.add_argument("--data", required=True, help="labelled tsv/csv/jsonl/json/parquet file; with --task also a "
                          "folder in GLUE's raw layout, whose dev file is read")
    evaluate.add_argument("--task", help="with --model: the GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, "
                          "wnli) that fixes the columns (raw GLUE or hub), the labels and the metrics, as data.task "
                          "does for a trial")
    evaluate.add_argument("--text-column", help="without a task (default sentence)")
    evaluate.add_argument("--text-pair-column", help="without a task: the second sentence of sentence pairs")
    evaluate.add_argument("--label-column", help="without a task (default label)")
    evaluate.add_argument("--max-length", type=int, default=128)
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    scored.add_argument("--sweep", help="score every finished teacher and trial of this sweep (its latest MLflow "
                        "parent run), log the scores to their runs and rebuild Table 1 on the file")
    evaluate.add_argument("--json", help="also write {accuracy (classification), metrics, task, examples, model, "
                          "data} to this file (with --sweep: {metric, prefix, examples, data, sweep, scores and "
                          "metrics by trial, skipped})")
    evaluate.add_argument("--name", help="with --sweep: the runs' metrics are eval_<name>_<metric> (default: the "
                          "file's name without its suffix)")
    evaluate.add_argument("--tracking-uri", help="with --sweep: MLflow URI (default MLFLOW_TRACKING_URI, else "
                          "./mlflow.db)")
    evaluate.add_argument("--experiment", help="with --sweep: MLflow experiment of the sweep (default metadistil)")
    evaluate.add_argument("--out", help="with --sweep: folder for the rebuilt report (default runs/reports/<sweep>; "
                          "the files go to its eval_<name>/)")
    evaluate.add_argument("--no-attach", action="store_true", help="with --sweep: do not attach the rebuilt report "
                          "to the sweep's run")
    evaluate.set_defaults(func=_evaluate)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    # argparse leaves overrides that follow an option (`sweep SPEC --resume grid.seed=[1]`) over
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides += extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ray_running = _ray_initialized()  # e.g. a test's own Ray: not this command's to stop
    try:
        with _console(args.verbose):
            return args.func(args)
    except ConfigError as err:
        print(f"error: {redact_text(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - shown as Python would show it, but never with a password from a URI
        print(redact_text(traceback.format_exc()), end="", file=sys.stderr)
        return 1
    finally:
        # The local Ray this command started (raylet, GCS, agents, trials) ends with it, however it ends: SIGTERM
        # too, which ray.init turns into SystemExit. Joined to a cluster (RAY_ADDRESS, `ray job submit`), shutdown
        # only disconnects this driver.
        if not ray_running and _ray_initialized():
            sys.modules["ray"].shutdown()


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")  # only a sweep imports it
    return ray is not None and ray.is_initialized()


@contextmanager
def _console(verbose: int) -> Iterator[None]:
    """What the libraries print during the command; the environment is as before afterwards (tests call main)."""
    wanted = {} if verbose else dict(QUIET_ENV)
    # read when Ray is first imported: a trial's own lines ("[trial id] ...") are never merged with another trial's
    wanted["RAY_DEDUP_LOGS_ALLOW_REGEX"] = NAMED_LINE
    added = {key: value for key, value in wanted.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


if __name__ == "__main__":
    sys.exit(main())
