"""The logger protocol the trainer reports through, the always-on stdout logger, and the redaction of credentials in
URIs that every logger applies.

Trackers (MLflow) implement the same protocol in the launcher package, so the trainer never imports them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

MASK = "***"
_URI = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
_QUERY_OR_FRAGMENT = re.compile(r"[?#]")
_QUERY_ITEM = re.compile(r"(?P<lead>[?&;#])(?P<name>[^=&;#]+)=(?P<value>[^&;#]*)")
_SECRET_WORDS = {"password", "passwd", "passphrase", "secret", "secrets", "credential", "credentials", "auth",
                 "authorization", "apikey"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("secret", "key"), ("private", "key")}
_QUERY_SECRET_WORDS = {"token", "key", "sig", "signature"}
_SPECIAL_TOKENS = {"pad", "unk", "mask", "cls", "sep", "bos", "eos"}  # tokenizer words, e.g. a pad_token setting


class Logger(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifacts(self, files: list[Path], name: str) -> None:
        """Small files (config, metrics) to keep with the run under ``name``."""

    def log_datasets(self, splits: list[DataSplit]) -> None:
        """The data the trial drew its splits from, as a tracker's dataset inputs."""

    def log_student(self, folder: Path) -> None:
        """The trained student (a ``save_pretrained`` folder with its tokenizer), as a tracker's model."""

    def finish(self, status: str, error: str | None = None) -> None: ...


@dataclass(frozen=True)
class DataSplit:
    """One split of a trial's data as a tracker records it: what identifies its examples, not the examples."""

    name: str  # e.g. "sst2/train"
    context: str  # what the trial uses it for: training, quiz, validation or testing
    size: int  # examples
    digest: str  # of its texts and labels, in order: the same digest, the same examples
    source: str  # the local file or folder, the hub dataset, or "synthetic", that it was drawn from
    source_type: str  # "local", "hub" or "synthetic"
    subset: str | None = None  # the hub dataset's configuration


# A named trial's lines start with "[<name>] " (StdoutLogger). Ray merges lines of different workers that differ only
# in words with digits ("[repeated 3x across cluster]"), which hides which trial printed what; the CLI exempts lines
# of this form from that (Ray's RAY_DEDUP_LOGS_ALLOW_REGEX).
NAMED_LINE = r"^\[[^\]\s]+\] "

# Set (to "1") by the CLI unless -v, and inherited by a local Ray's workers: the trainer then silences what libraries
# print bare on stdout once per trial (DeepSpeed's "... built successfully" for its CPU communication op).
QUIET_LIBRARIES = "METADISTIL_QUIET_LIBRARIES"


def libraries_quiet() -> bool:
    return os.environ.get(QUIET_LIBRARIES) == "1"


class StdoutLogger:
    """Prints evaluation results and the final summary; per-step losses go to the progress bar instead.

    With ``name`` (a sweep trial's id) every line starts with ``[name]``: a sweep's console mixes several trials.
    """

    def __init__(self, print_fn=tqdm.write, name: str | None = None):
        self._print_fn = print_fn
        self._prefix = f"[{name}] " if name else ""

    def print(self, line: str) -> None:
        self._print_fn(self._prefix + line)

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        shown = {k: v for k, v in metrics.items() if not k.startswith("train/")}
        if shown:
            self.print(f"[step {step}] " + "  ".join(f"{k}={_fmt(v)}" for k, v in sorted(shown.items())))

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifacts(self, files: list[Path], name: str) -> None:
        self.print(f"saved {name}: {', '.join(str(f) for f in files)}")

    def log_datasets(self, splits: list[DataSplit]) -> None:
        pass

    def log_student(self, folder: Path) -> None:
        pass

    def finish(self, status: str, error: str | None = None) -> None:
        self.print(f"trial {status}" + (f": {redact_text(error)}" if error else ""))


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


def _words(name: str) -> list[str]:
    """``hf_token``, ``hfToken`` and ``HF-TOKEN`` all read ["hf", "token"]."""
    return [w for w in re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()) if w]


def is_secret_name(name: str) -> bool:
    """A key or query-parameter name that holds a credential, judged on its last dotted part split into words.

    Secret: the last word is password, passwd, passphrase, secret(s), credential(s), auth, authorization or apikey;
    the last two are api_key, access_key, secret_key or private_key; or the last word is ``token`` after another word
    (``hf_token``, ``api_token``, ``access_token``). Not secret: a bare ``token`` (the noise word,
    ``noise.student.token``), a tokenizer's special tokens (``pad_token``, ``mask_token``, ...), ``tokenizer``,
    ``token_cache``, and names where the secret word is not last (``password_file``, ``auth_mode``), which hold paths
    and settings rather than the secret itself.
    """
    parts = _words(name.rsplit(".", 1)[-1])
    if not parts:
        return False
    auth_token = parts[-1] == "token" and len(parts) > 1 and parts[-2] not in _SPECIAL_TOKENS
    return parts[-1] in _SECRET_WORDS or tuple(parts[-2:]) in _SECRET_PAIRS or auth_token


def redact_uri(uri: str) -> str:
    """``uri`` with its credentials replaced by ``***``; scheme, host, port and path stay readable.

    Masks the whole user-info (``user:pw@``, ``:token@``; up to the last ``@`` before the query, so an unescaped ``@``
    or ``/`` in a password is masked too) and the values of query or fragment parameters named like a credential
    (``is_secret_name``, or token, key, sig, signature: ``?token=``, ``?access_token=``, ``?api_key=``).
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    cut = _QUERY_OR_FRAGMENT.search(rest)
    location, tail = (rest[:cut.start()], rest[cut.start():]) if cut else (rest, "")
    _, at, host_and_path = location.rpartition("@")
    if at:
        location = f"{MASK}@{host_and_path}"
    return f"{scheme}://{location}{_QUERY_ITEM.sub(_mask_query_item, tail)}"


def _mask_query_item(item: re.Match) -> str:
    # In a query a bare token or key is the credential itself, not a setting named after one (as in a config).
    last = _words(item["name"])[-1:]
    if is_secret_name(item["name"]) or (last and last[0] in _QUERY_SECRET_WORDS):
        return f"{item['lead']}{item['name']}={MASK}"
    return item[0]


def redact_text(text: str) -> str:
    """Free text (an error message, a traceback) with every URI in it redacted (``redact_uri``)."""
    return _URI.sub(lambda found: redact_uri(found[0]), text)
