"""Checkpoint files of a run directory: atomic writes, the previous good checkpoint, damage.

A run directory holds ``checkpoint.pt`` (the newest state) and, from the second checkpoint
of a session on, ``checkpoint.prev.pt`` (the one before it). Every file is written to a
temporary file in the same directory, flushed to disk and renamed over the old one, so a
crash leaves either the old or the new file, never half of one; the new file gets the
ordinary mode of a created file (``0o666 & ~umask``).

Before ``checkpoint.pt`` is replaced, the current one is kept as ``checkpoint.prev.pt``
(a hard link, or a copy where links are not supported), but only when it is known to be
good: this session wrote it or read it. :func:`load_latest` reads ``checkpoint.pt`` and,
when that file is damaged (truncated, corrupted, not a checkpoint), falls back on
``checkpoint.prev.pt`` and says why, so a damaged file costs at most one epoch. Without a
readable file it raises :class:`CheckpointError` naming the damaged file and what to do.
A missing ``checkpoint.pt`` means no checkpoint (deleting it restarts the run).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "CHECKPOINT_NAME",
    "PREVIOUS_CHECKPOINT_NAME",
    "CheckpointError",
    "CheckpointFiles",
    "LoadedCheckpoint",
    "atomic_write",
    "load_checkpoint",
    "load_latest",
]

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_CHECKPOINT_NAME = "checkpoint.prev.pt"

#: keys every checkpoint written by :func:`kldwrm.experiments.training.train.train` holds
_REQUIRED_KEYS = frozenset({"config", "epoch", "batch", "model", "optimizer"})


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: truncated, corrupted or not a training checkpoint.

    ``path`` is the damaged file.
    """

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


# ----------------------------------------------------------------------------- writing


def _temporary_name(path: Path) -> Path:
    """A fresh name beside ``path`` (ending in ``.tmp``)."""
    return path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")


def _open_temporary(path: Path) -> tuple[Path, int]:
    """A new, empty temporary file beside ``path``, created with mode ``0o666 & ~umask``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = _temporary_name(path)
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the platform allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _keep_as(path: Path, previous: Path) -> None:
    """Make ``previous`` a copy of ``path`` atomically (a hard link where possible)."""
    tmp = _temporary_name(previous)
    try:
        try:
            os.link(path, tmp)
        except OSError:  # no hard links on this file system: copy the bytes
            shutil.copyfile(path, tmp)
        os.replace(tmp, previous)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(
    path: str | os.PathLike[str],
    writer: Callable[[IO[Any]], None],
    *,
    text: bool = False,
    keep_previous: str | os.PathLike[str] | None = None,
) -> None:
    """Write ``path`` through ``writer(file)`` atomically (temporary file + rename).

    Args:
        path: the file to (re)write; its directory is created.
        writer: writes the whole content to the open file.
        text: open the file in text mode (UTF-8, ``newline=""`` as :mod:`csv` wants).
        keep_previous: when given and ``path`` exists, its current content is kept under
            this name before ``path`` is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _open_temporary(path)
    try:
        kw: dict[str, Any] = {"encoding": "utf-8", "newline": ""} if text else {}
        with os.fdopen(fd, "w" if text else "wb", **kw) as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if keep_previous is not None and path.is_file():
            _keep_as(path, Path(keep_previous))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


# ----------------------------------------------------------------------------- reading


def _short(exc: BaseException) -> str:
    """The first sentence of an exception's message (torch's run to a paragraph)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    head, dot, _ = text.partition(". ")
    return head if dot and len(text) > 100 else text.rstrip(".")


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load one checkpoint file (``torch.load(..., weights_only=True)`` onto the CPU).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not a readable training checkpoint.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path} is damaged (an empty file)", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, pickle errors
        raise CheckpointError(f"{path} is damaged ({_short(exc)})", path) from exc
    if not isinstance(state, dict) or not _REQUIRED_KEYS <= state.keys():
        raise CheckpointError(f"{path} is not a kldwrm training checkpoint", path)
    return state


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint read by :func:`load_latest`."""

    state: dict[str, Any]
    #: the file it came from
    path: Path
    #: why the newest file could not be used, when this is the previous one
    problem: str | None = None


def load_latest(out_dir: str | os.PathLike[str]) -> LoadedCheckpoint | None:
    """The newest readable checkpoint of ``out_dir``; ``None`` when it has none.

    Raises:
        CheckpointError: ``checkpoint.pt`` is damaged and no readable previous checkpoint
            exists; the message names the file and says how to go on.
    """
    latest = Path(out_dir) / CHECKPOINT_NAME
    previous = latest.with_name(PREVIOUS_CHECKPOINT_NAME)
    if not latest.is_file():
        return None
    try:
        return LoadedCheckpoint(load_checkpoint(latest), latest)
    except CheckpointError as exc:
        damaged = exc
    fix = f"restore {latest} from a copy, or delete it to start the run over"
    if not previous.is_file():
        raise CheckpointError(
            f"{damaged} and there is no previous checkpoint to fall back on; {fix}", latest
        ) from damaged
    try:
        return LoadedCheckpoint(load_checkpoint(previous), previous, str(damaged))
    except CheckpointError as exc:
        raise CheckpointError(f"{damaged}, and {exc}; {fix}", latest) from damaged


class CheckpointFiles:
    """The checkpoint files of one run directory, as one session reads and writes them."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.path = Path(out_dir) / CHECKPOINT_NAME
        self.previous = self.path.with_name(PREVIOUS_CHECKPOINT_NAME)
        self._current_is_good = False  # checkpoint.pt was written or read by this session

    def load(self) -> LoadedCheckpoint | None:
        """:func:`load_latest` of the run directory."""
        loaded = load_latest(self.path.parent)
        self._current_is_good = loaded is not None and loaded.path == self.path
        return loaded

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` as ``checkpoint.pt``, keeping a known-good one as the previous."""
        keep = self.previous if self._current_is_good else None
        atomic_write(self.path, lambda fh: torch.save(state, fh), keep_previous=keep)
        self._current_is_good = True
