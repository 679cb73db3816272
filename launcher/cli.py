"""The ``metadistil`` command."""

from __future__ import annotations

import argparse
import sys

from trainer.config import ConfigError, explain, load_config


def _train(args: argparse.Namespace) -> int:
    from launcher.tracking import MLflowLogger, tracking_uri
    from trainer.loop import run_trial

    cfg = load_config(args.config, args.overrides)
    loggers = []
    uri = tracking_uri(cfg.tracking.mlflow_uri)
    if uri:
        loggers.append(MLflowLogger(uri, cfg.tracking.experiment, cfg.tracking.run_name))
    result = run_trial(cfg, loggers, progress=not args.no_progress)
    print(f"best validation accuracy {result.metrics['best_val_accuracy']:.4f}, "
          f"test accuracy {result.metrics['test_accuracy']:.4f}; outputs in {result.output_dir}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    teachers = ", ".join(t.name for t in cfg.teachers) or "none"
    print(f"{args.config}: valid ({cfg.algorithm}; student {cfg.student.name}; teachers {teachers})")
    return 0


def _explain(args: argparse.Namespace) -> int:
    print("\n".join(explain()))
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
