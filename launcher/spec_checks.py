"""Checks of a sweep spec beyond the types of its keys: names and values that become folder names, repeated values,
exclude patterns that drop nothing, and the storage folder every output goes under.

Each check raises ConfigError with one line naming the spec's dotted key, the value and what is allowed (inside the
spec's validators pydantic wraps it, and load_spec names the file).
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from trainer.config import ConfigError

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"
_NAME_RULE = "use letters, digits and _ . + - only, starting with a letter or digit"
_DOTTED_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
# Separators would leave the trial's folder; the others are refused by some filesystems (and trip up shells).
_UNSAFE_IN_FOLDER = re.compile(r'[/\\:*?"<>|\x00-\x1f\x7f]')
_FOLDER_RULE = r"""a folder name may not be empty, '.' or '..' nor hold / \ : * ? " < > | or control characters"""
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_NAME_MAX = 255  # bytes in one folder name on common Linux and macOS filesystems


def check_names(section: str, names: Iterable[str]) -> None:
    """Teacher, teacher-set, student and noise names become parts of folder names (trial ids, the teacher cache)."""
    for name in names:
        if not re.match(NAME, name):
            raise ConfigError(f"{section}: name {name!r} cannot be part of a folder name; {_NAME_RULE}")


def check_extra_axes(extra: Mapping[str, Sequence[Any]], axes: Sequence[str]) -> None:
    """grid.extra keys are dotted trial keys; each key=value ends up in the trial's folder name."""
    for key, values in extra.items():
        if key in axes:
            raise ConfigError(f"grid.extra: {key!r} is an axis of its own; give it as grid.{key}")
        if not _DOTTED_KEY.match(key):
            raise ConfigError(f"grid.extra: {key!r} is not a dotted trial key (e.g. distill.temperature)")
        check_no_repeats(f"grid.extra.{key}", values)
        for value in values:
            check_folder_part(f"grid.extra.{key}", value)


def check_folder_part(where: str, value: Any) -> None:
    """A value shown as text in a trial's folder name."""
    text = str(value)
    if text in ("", ".", "..") or _UNSAFE_IN_FOLDER.search(text):
        raise ConfigError(f"{where}: value {value!r} cannot be part of a trial folder name; {_FOLDER_RULE}")


def check_no_repeats(where: str, values: Sequence[Any]) -> None:
    """The same value twice would run the same trials twice (or, for a teacher, distil from it twice)."""
    # compared by equality, not hash: values may be lists, and 1 and 1.0 configure the same trial
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise ConfigError(f"{where}: {repeated[0]!r} is given more than once in {list(values)}; give each value once")


def refuse_storage_uri(storage_path: str) -> str:
    """The trainer writes its outputs with local file operations, so a URI would become a local folder 's3:/...'.

    A field validator: pydantic prefixes the key and appends the value.
    """
    if _URI.match(storage_path):
        raise ConfigError("remote storage URIs are not supported; use a folder shared by every node, e.g. a mounted "
                          "NFS/EFS path")
    return storage_path


def check_storage(storage: Path) -> None:
    """Refuse a storage folder that cannot exist here: a file in its place, or an existing folder that is read-only.

    Side-effect free (a dry run creates nothing). A folder that does not exist yet under an unwritable parent passes:
    that is a cluster's shared path seen from a machine that does not mount it; ``prepare_storage`` refuses it on the
    machine that runs the sweep.
    """
    # os.path, not Path: these answer False (not raise) under a folder this user may not read
    existing = next(p for p in (storage, *storage.parents) if os.path.exists(p))
    if not os.path.isdir(existing):
        what = "is a file" if existing == storage else f"cannot be created: {existing} is a file"
        raise ConfigError(f"storage_path: {str(storage)!r} {what}; give a folder (it is created when missing)")
    if existing == storage and not os.access(storage, os.W_OK | os.X_OK):
        raise ConfigError(f"storage_path: folder {str(storage)!r} is not writable by this user")


def prepare_storage(storage_path: str) -> None:
    """Create the storage folder and prove it writable, before the sweep starts Ray (for the driver to call first)."""
    storage = Path(storage_path)
    check_storage(storage)
    try:
        storage.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=storage):
            pass
    except OSError as err:
        raise ConfigError(f"storage_path: folder {storage_path!r} is not writable ({err.strerror})") from None


def check_outputs_inside(storage: Path, outputs: Mapping[str, str]) -> None:
    """The last line of defence behind the name checks: every trial's output folder is a folder of its own inside
    storage_path. Compared without resolving links: a storage folder may be a link to shared storage on purpose."""
    root = Path(os.path.normpath(storage))
    for trial, output in outputs.items():
        folder = Path(os.path.normpath(output))
        if folder == root or not folder.is_relative_to(root):
            raise ConfigError(f"trial {trial}: output folder {output!r} is not inside storage_path {str(storage)!r}")
        too_long = [part for part in folder.relative_to(root).parts if len(part.encode()) > _NAME_MAX]
        if too_long:
            raise ConfigError(f"trial folder {too_long[0][:60]}... is {len(too_long[0].encode())} bytes long, over "
                              f"the {_NAME_MAX} a folder name may have; use shorter names or grid.extra values")


def warn_unmatched_excludes(patterns: Sequence[Mapping[str, Any]], matched: set[int]) -> None:
    """A pattern that drops nothing is most likely a typo (a value the grid does not have); it is harmless, so warn."""
    for i, pattern in enumerate(patterns):
        if i not in matched:
            warnings.warn(f"exclude.{i}: {dict(pattern)} matches no combination of the grid; it drops nothing",
                          UserWarning, stacklevel=3)
