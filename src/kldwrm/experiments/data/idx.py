"""MNIST-type data sets from their IDX files: located, verified, parsed, cached.

The standard IDX files (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``) are verified by MD5 against
the canonical distribution and parsed once per process into float32 tensors of shape
``(N, 1, 28, 28)`` scaled to ``[0, 1]`` and int64 labels.

A file is accepted when either the MD5 of the ``.gz`` file equals the canonical one, or the
MD5 of its decompressed content equals the canonical content checksum (Debian's
``dataset-fashion-mnist`` package ships recompressed ``.gz`` files with identical content).
Uncompressed IDX files (the same names without ``.gz``) are accepted as well.

Look-up order for a data set ``<name>`` ("mnist" or "fashion-mnist"):

1. the explicit ``data_dir`` argument (the directory itself, then ``data_dir/<name>``);
2. ``$KLDWRM_DATA/<name>``, then ``$KLDWRM_DATA``;
3. ``./data/<name>`` (relative to the current working directory);
4. ``../shared/data/<name>`` relative to the current working directory (and to the
   repository root, for an editable install);
5. ``/usr/share/datasets/<name>`` (Debian's ``dataset-*`` packages).

If none of them holds the four files, :func:`kldwrm.experiments.data.datasets.load_dataset` tries a
download from the canonical mirrors (:func:`try_download`: short timeout; any failure falls
through) into the first writable of ``data_dir``, ``$KLDWRM_DATA/<name>``,
``./data/<name>``, and otherwise raises :class:`DatasetNotFoundError`, listing every
directory searched and the files to put there (:func:`not_found_message`).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import tempfile
import urllib.request
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "ALIASES",
    "DATASETS",
    "FILE_NAMES",
    "ChecksumError",
    "DatasetNotFoundError",
    "candidate_dirs",
    "canonical_name",
    "clear_cache",
    "find_dataset_dir",
    "load_idx_dataset",
    "not_found_message",
    "read_idx",
    "try_download",
]

#: File roles in the order (train images, train labels, test images, test labels).
FILE_NAMES: tuple[str, ...] = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@dataclass(frozen=True)
class _IdxSpec:
    """Canonical checksums, mirrors and normalisation constants of an IDX data set."""

    gz_md5: dict[str, str]
    raw_md5: dict[str, str]
    mirrors: tuple[str, ...]
    mean: float
    std: float
    num_classes: int = 10


DATASETS: dict[str, _IdxSpec] = {
    "mnist": _IdxSpec(
        gz_md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        raw_md5={
            "train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
        },
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        mean=0.1307,
        std=0.3081,
    ),
    "fashion-mnist": _IdxSpec(
        gz_md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        raw_md5={
            "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        mean=0.2860,
        std=0.3530,
    ),
}

#: Other spellings accepted for a data set name.
ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist"}

_DOWNLOAD_TIMEOUT_S = 10.0


class DatasetNotFoundError(FileNotFoundError):
    """The IDX files of a data set were found in none of the searched directories."""


class ChecksumError(ValueError):
    """A data file exists but is truncated, corrupted or not the canonical file."""

    def __init__(self, message: str, path: Path | str | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


# ----------------------------------------------------------------------------- locating


def canonical_name(name: str, accepted: Iterable[str] = DATASETS) -> str:
    """``name`` lower-cased, with :data:`ALIASES` resolved; a :class:`ValueError` naming
    the choices unless it is one of ``accepted`` (default: the IDX data sets)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in accepted:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(accepted)}")
    return key


def _repo_root() -> Path:
    """Repository root for a source checkout (``src/kldwrm/experiments/data/idx.py``)."""
    return Path(__file__).resolve().parents[4]


def candidate_dirs(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Directories searched for data set ``name``, in look-up order (duplicates removed)."""
    name = canonical_name(name)
    dirs: list[Path] = []
    if data_dir is not None:
        dirs += [Path(data_dir), Path(data_dir) / name]
    env = os.environ.get("KLDWRM_DATA")
    if env:
        dirs += [Path(env) / name, Path(env)]
    cwd = Path.cwd()
    dirs += [cwd / "data" / name, cwd.parent / "shared" / "data" / name]
    dirs.append(_repo_root().parent / "shared" / "data" / name)
    dirs.append(Path("/usr/share/datasets") / name)
    unique: list[Path] = []
    seen: set[Path] = set()
    for d in dirs:
        key = Path(os.path.abspath(d))
        if key not in seen:
            seen.add(key)
            unique.append(key)
    return unique


def _file_in(directory: Path, fname: str) -> Path | None:
    """The ``.gz`` file or its uncompressed twin inside ``directory``, if present."""
    for candidate in (directory / fname, directory / fname[: -len(".gz")]):
        if candidate.is_file():
            return candidate
    return None


def find_dataset_dir(
    name: str, data_dir: str | os.PathLike[str] | None = None
) -> tuple[Path | None, list[Path]]:
    """First directory holding all four files of ``name``, and the list of directories searched."""
    searched = candidate_dirs(name, data_dir)
    for d in searched:
        if d.is_dir() and all(_file_in(d, f) is not None for f in FILE_NAMES):
            return d, searched
    return None, searched


def not_found_message(name: str, searched: Sequence[Path], download_note: str) -> str:
    lines = [
        f"data set {name!r} not found. Searched, in this order:",
        *[f"  - {d}{'' if d.exists() else '  (does not exist)'}" for d in searched],
        "Put these four files (from the canonical distribution) into one of them,",
        f"for example {searched[0] if searched else Path('data') / name}:",
        *[f"  - {f}   (md5 {DATASETS[name].gz_md5[f]})" for f in FILE_NAMES],
        "or pass --data-dir DIR / set KLDWRM_DATA=DIR (then DIR/" + name + " is searched).",
    ]
    if name == "fashion-mnist":
        lines.append("On Debian/Ubuntu: apt-get install dataset-fashion-mnist.")
    if download_note:
        lines.append(download_note)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- download


def _download_targets(name: str, data_dir: str | os.PathLike[str] | None) -> list[Path]:
    targets = []
    if data_dir is not None:
        targets.append(Path(data_dir))
    env = os.environ.get("KLDWRM_DATA")
    if env:
        targets.append(Path(env) / name)
    targets.append(Path.cwd() / "data" / name)
    return targets


def try_download(name: str, data_dir: str | os.PathLike[str] | None) -> tuple[Path | None, str]:
    """Try each canonical mirror; return the directory written, or ``None`` and a reason."""
    spec = DATASETS[name]
    target = None
    created = False
    for t in _download_targets(name, data_dir):
        try:
            created = not t.exists()
            t.mkdir(parents=True, exist_ok=True)
            if os.access(t, os.W_OK):
                target = t
                break
        except OSError:
            continue
    if target is None:
        return None, "download skipped: no writable target directory."
    reasons = []
    for mirror in spec.mirrors:
        try:
            for fname in FILE_NAMES:
                dest = target / fname
                if dest.is_file() and _md5_file(dest) == spec.gz_md5[fname]:
                    continue
                with urllib.request.urlopen(mirror + fname, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
                    payload = resp.read()
                if hashlib.md5(payload).hexdigest() != spec.gz_md5[fname]:
                    raise ValueError(f"{mirror + fname}: checksum mismatch")
                fd, tmp = tempfile.mkstemp(dir=target, prefix=fname, suffix=".part")
                with os.fdopen(fd, "wb") as fh:
                    fh.write(payload)
                os.replace(tmp, dest)
            return target, ""
        except Exception as exc:  # noqa: BLE001 - any failure falls through to the next mirror
            reasons.append(f"{mirror}: {type(exc).__name__}: {exc}")
    if created:
        try:
            target.rmdir()  # leave no empty directory behind
        except OSError:
            pass
    return None, "download failed (offline?): " + "; ".join(reasons)


# ----------------------------------------------------------------------------- parsing


def _md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_verified(path: Path, role: str, spec: _IdxSpec, name: str) -> bytes:
    """Raw (decompressed) bytes of ``path`` after checking them against the canonical MD5s."""
    expected_gz, expected_raw = spec.gz_md5[role], spec.raw_md5[role]
    data = path.read_bytes()
    gz_ok = hashlib.md5(data).hexdigest() == expected_gz
    if data[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise ChecksumError(
                f"{path}: corrupted or truncated gzip file ({exc}); expected md5 {expected_gz} "
                f"for the canonical {name} file {role}. Delete it and fetch it again.",
                path,
            ) from exc
    else:
        raw = data
    if not gz_ok and hashlib.md5(raw).hexdigest() != expected_raw:
        raise ChecksumError(
            f"{path}: checksum mismatch (file md5 {hashlib.md5(data).hexdigest()}); expected "
            f"md5 {expected_gz} for the canonical {name} file {role} (or decompressed content "
            f"md5 {expected_raw}). The file is truncated, corrupted or not the {name} file; "
            "delete it and fetch it again.",
            path,
        )
    return raw


def read_idx(raw: bytes, path: Path | str = "<bytes>") -> np.ndarray:
    """Parse an uncompressed IDX file of unsigned bytes into a numpy array."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ChecksumError(f"{path}: not an IDX file of unsigned bytes", path)
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ChecksumError(f"{path}: truncated IDX header", path)
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = math.prod(shape)
    if len(raw) != header + count:
        raise ChecksumError(
            f"{path}: IDX payload has {len(raw) - header} bytes, header says {count}", path
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


_CACHE: dict[tuple[str, Path], tuple[torch.Tensor, ...]] = {}


def clear_cache() -> None:
    """Forget the parsed data sets held by this process."""
    _CACHE.clear()


def load_idx_dataset(name: str, directory: Path) -> tuple[torch.Tensor, ...]:
    """Verify and parse the four files in ``directory`` (cached per process).

    Returns ``(x_train, y_train, x_test, y_test)`` with images float32 ``(N, 1, 28, 28)``
    in ``[0, 1]`` and int64 labels.
    """
    name = canonical_name(name)
    directory = Path(os.path.abspath(directory))
    key = (name, directory)
    if key in _CACHE:
        return _CACHE[key]
    spec = DATASETS[name]
    arrays = []
    for role in FILE_NAMES:
        path = _file_in(directory, role)
        if path is None:
            raise DatasetNotFoundError(not_found_message(name, [directory], ""))
        arrays.append(read_idx(_read_verified(path, role, spec, name), path))
    xtr, ytr, xte, yte = arrays
    out = (
        torch.from_numpy(xtr.astype(np.float32) / 255.0).unsqueeze(1),
        torch.from_numpy(ytr.astype(np.int64)),
        torch.from_numpy(xte.astype(np.float32) / 255.0).unsqueeze(1),
        torch.from_numpy(yte.astype(np.int64)),
    )
    _CACHE[key] = out
    return out
