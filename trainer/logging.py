"""The logger protocol the trainer reports through, and the always-on stdout logger.

Trackers (MLflow) implement the same protocol in the launcher package, so the trainer never imports them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm


class Logger(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifacts(self, folder: Path, name: str) -> None: ...

    def finish(self, status: str, error: str | None = None) -> None: ...


class StdoutLogger:
    """Prints evaluation results and the final summary; per-step losses go to the progress bar instead."""

    def __init__(self, print_fn=tqdm.write):
        self.print = print_fn

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        shown = {k: v for k, v in metrics.items() if not k.startswith("train/")}
        if shown:
            self.print(f"[step {step}] " + "  ".join(f"{k}={_fmt(v)}" for k, v in sorted(shown.items())))

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifacts(self, folder: Path, name: str) -> None:
        self.print(f"saved {name}: {folder}")

    def finish(self, status: str, error: str | None = None) -> None:
        self.print(f"trial {status}" + (f": {error}" if error else ""))


class Loggers:
    """Fans every call out to several loggers."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def __getattr__(self, method: str):
        def fan_out(*args: Any, **kwargs: Any) -> None:
            for logger in self.loggers:
                getattr(logger, method)(*args, **kwargs)

        return fan_out


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
