"""IDX files: checksums, look-up order, error messages, the download fallback."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from kldwrm.experiments.data import idx as I
from kldwrm.experiments.data.datasets import load_dataset
from kldwrm.experiments.data.idx import FILE_NAMES, ChecksumError, DatasetNotFoundError


def _copy_mnist(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in FILE_NAMES:
        shutil.copyfile(src / f, dst / f)
    return dst


@pytest.fixture(autouse=True)
def _isolated_cache():
    """Corrupted copies must not be served from (or leak into) the per-process cache."""
    yield
    for key in [k for k in I._CACHE if "tmp" in str(k[1]) or "pytest" in str(k[1])]:
        del I._CACHE[key]


def test_truncated_file_gives_checksum_error(tmp_path, mnist_dir):
    d = _copy_mnist(mnist_dir, tmp_path / "trunc")
    victim = d / "train-images-idx3-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:5_000_000])
    with pytest.raises(ChecksumError) as info:
        load_dataset("mnist", d, download=False)
    assert str(victim) in str(info.value)
    assert "f68b3c2dcbeaaa9fbdd348bbdeb94873" in str(info.value)
    assert info.value.path == victim
    assert isinstance(info.value, ValueError)


def test_one_changed_byte_gives_checksum_error(tmp_path, mnist_dir):
    d = _copy_mnist(mnist_dir, tmp_path / "flip")
    victim = d / "t10k-labels-idx1-ubyte.gz"
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    victim.write_bytes(bytes(blob))
    with pytest.raises(ChecksumError) as info:
        load_dataset("mnist", d, download=False)
    assert str(victim) in str(info.value)
    assert "ec29112dd5afa0611ce80d1b7f02629c" in str(info.value)


def test_changed_byte_in_valid_recompressed_file_is_caught(tmp_path, mnist_dir):
    """A well-formed gzip whose content differs in one byte: the content md5 catches it."""
    d = _copy_mnist(mnist_dir, tmp_path / "content")
    victim = d / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(victim.read_bytes()))
    raw[100] = (raw[100] + 1) % 10
    victim.write_bytes(gzip.compress(bytes(raw), mtime=0))
    with pytest.raises(ChecksumError, match="train-labels-idx1-ubyte.gz"):
        load_dataset("mnist", d, download=False)


def test_recompressed_and_uncompressed_files_are_accepted(tmp_path, mnist_dir, mnist):
    """Debian's dataset-* packages recompress the .gz files; raw IDX files work too."""
    d = _copy_mnist(mnist_dir, tmp_path / "debian")
    labels = d / "train-labels-idx1-ubyte.gz"
    content = gzip.decompress(labels.read_bytes())
    labels.write_bytes(gzip.compress(content, compresslevel=9, mtime=0))
    assert hashlib.md5(labels.read_bytes()).hexdigest() != "d53e105ee54ea40749a09fcbcd1e9432"
    tl = d / "t10k-labels-idx1-ubyte.gz"
    (d / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress(tl.read_bytes()))
    tl.unlink()
    got = load_dataset("mnist", d, download=False)
    assert torch.equal(got.y_train, mnist.y_train)
    assert torch.equal(got.y_test, mnist.y_test)


def test_missing_dataset_names_every_directory_and_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KLDWRM_DATA", str(tmp_path / "envdata"))
    monkeypatch.setattr(I, "_repo_root", lambda: tmp_path / "repo")
    explicit = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", explicit, download=False)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    expected_dirs = [
        explicit,
        explicit / "mnist",
        tmp_path / "envdata" / "mnist",
        tmp_path / "envdata",
        tmp_path / "data" / "mnist",
        tmp_path.parent / "shared" / "data" / "mnist",
        tmp_path / "shared" / "data" / "mnist",  # relative to the (patched) repository root
        Path("/usr/share/datasets/mnist"),
    ]
    for d in expected_dirs:
        assert str(d) in msg
    positions = [msg.index(str(d) + "  ") for d in expected_dirs]
    assert positions == sorted(positions)  # listed in look-up order
    for f in FILE_NAMES:
        assert f in msg
    assert "f68b3c2dcbeaaa9fbdd348bbdeb94873" in msg
    assert "--data-dir" in msg and "KLDWRM_DATA" in msg


def test_lookup_order_prefers_explicit_then_env(tmp_path, monkeypatch, mnist_dir):
    a = _copy_mnist(mnist_dir, tmp_path / "explicit")
    b = _copy_mnist(mnist_dir, tmp_path / "env" / "mnist")
    monkeypatch.setenv("KLDWRM_DATA", str(tmp_path / "env"))
    assert I.find_dataset_dir("mnist", a)[0] == a
    assert I.find_dataset_dir("mnist")[0] == b
    monkeypatch.delenv("KLDWRM_DATA")
    monkeypatch.chdir(tmp_path / "explicit")  # ./data/mnist absent → ../shared/... or repo
    found = I.find_dataset_dir("mnist")[0]
    assert found is not None and found.resolve() == mnist_dir.resolve()


def _isolate_lookup(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KLDWRM_DATA", raising=False)
    monkeypatch.delenv("KLDWRM_NO_DOWNLOAD", raising=False)
    monkeypatch.setattr(I, "_repo_root", lambda: tmp_path / "repo")


def test_failed_download_falls_through_to_clear_error(tmp_path, monkeypatch):
    _isolate_lookup(tmp_path, monkeypatch)
    calls = []

    def offline(url, timeout):
        calls.append((url, timeout))
        raise OSError("network unreachable")

    monkeypatch.setattr(I.urllib.request, "urlopen", offline)
    with pytest.raises(DatasetNotFoundError, match="download failed") as info:
        load_dataset("mnist")
    assert len(calls) == len(I.DATASETS["mnist"].mirrors)  # one try per mirror, then give up
    assert all(t <= 10 for _, t in calls)
    assert "train-images-idx3-ubyte.gz" in str(info.value)
    assert not (tmp_path / "data" / "mnist").exists()  # no empty directory left behind


def test_download_from_mirror_is_verified_and_used(tmp_path, monkeypatch, mnist_dir, mnist):
    _isolate_lookup(tmp_path, monkeypatch)

    class Response:
        def __init__(self, payload: bytes) -> None:
            self.payload = payload

        def read(self) -> bytes:
            return self.payload

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

    def fake(url, timeout):
        return Response((mnist_dir / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(I.urllib.request, "urlopen", fake)
    got = load_dataset("mnist", normalize=False, subset=10)
    assert got.source == tmp_path / "data" / "mnist"
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(FILE_NAMES)
    assert torch.equal(got.y_train, mnist.y_train[:10])
