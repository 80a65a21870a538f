"""Data loading: checksums, look-up order, error messages, batching, synthetic data."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from kldwrm.experiments import data as D
from kldwrm.experiments.data import (
    FILE_NAMES,
    ChecksumError,
    DatasetNotFoundError,
    iterate_batches,
    load_dataset,
    num_batches,
    regression_data,
)


def _copy_mnist(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in FILE_NAMES:
        shutil.copyfile(src / f, dst / f)
    return dst


@pytest.fixture(autouse=True)
def _isolated_cache():
    """Corrupted copies must not be served from (or leak into) the per-process cache."""
    yield
    for key in [k for k in D._CACHE if "tmp" in str(k[1]) or "pytest" in str(k[1])]:
        del D._CACHE[key]


def test_real_mnist_shapes_dtypes_and_values(mnist, mnist_dir):
    assert mnist.x_train.shape == (60000, 1, 28, 28)
    assert mnist.x_test.shape == (10000, 1, 28, 28)
    assert mnist.y_train.shape == (60000,) and mnist.y_test.shape == (10000,)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    assert mnist.source == Path(os.path.abspath(mnist_dir))
    # normalised with the MNIST constants: the raw training mean is 0.1307 to 4 decimals
    raw_mean = (mnist.x_train * 0.3081 + 0.1307).mean().item()
    assert raw_mean == pytest.approx(0.13066, abs=1e-4)
    assert mnist.x_train.mean().item() == pytest.approx(0.0, abs=2e-3)
    # well-known facts about MNIST: first training label 5, first test label 7
    assert mnist.y_train[:5].tolist() == [5, 0, 4, 1, 9]
    assert mnist.y_test[:3].tolist() == [7, 2, 1]
    assert torch.bincount(mnist.y_train).tolist()[1] == 6742


def test_unnormalised_and_released_quirk(mnist_dir):
    raw = load_dataset("mnist", mnist_dir, normalize=False, download=False)
    assert raw.x_train.min().item() == 0.0 and raw.x_train.max().item() == 1.0
    quirk = load_dataset("mnist", mnist_dir, normalize=True, normalize_test=False, download=False)
    assert torch.equal(quirk.x_test, raw.x_test)  # test set left in [0, 1]
    assert torch.allclose(quirk.x_train[:10], (raw.x_train[:10] - 0.1307) / 0.3081)


def test_subset_keeps_first_images(mnist, mnist_dir):
    sub = load_dataset("mnist", mnist_dir, subset=2000, download=False)
    assert sub.x_train.shape[0] == 2000 and sub.x_test.shape[0] == 10000
    assert torch.equal(sub.x_train, mnist.x_train[:2000])
    assert torch.equal(sub.y_train, mnist.y_train[:2000])


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
    monkeypatch.setattr(D, "_repo_root", lambda: tmp_path / "repo")
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
    assert D.find_dataset_dir("mnist", a)[0] == a
    assert D.find_dataset_dir("mnist")[0] == b
    monkeypatch.delenv("KLDWRM_DATA")
    monkeypatch.chdir(tmp_path / "explicit")  # ./data/mnist absent → ../shared/... or repo
    found = D.find_dataset_dir("mnist")[0]
    assert found is not None and found.resolve() == mnist_dir.resolve()


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_from_debian_package():
    fm = load_dataset("fashion-mnist", download=False, normalize=False)
    assert fm.x_train.shape == (60000, 1, 28, 28) and fm.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(fm.y_train).tolist() == [6000] * 10
    assert fm.x_train.mean().item() == pytest.approx(0.2860, abs=1e-4)


def test_iterate_batches_permutation_and_sizes():
    x = torch.arange(10.0).unsqueeze(1)
    y = torch.arange(10)
    g = torch.Generator().manual_seed(3)
    batches = list(iterate_batches(x, y, 4, generator=g))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2] and num_batches(10, 4) == 3
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(10))
    assert torch.equal(torch.cat([b[0] for b in batches]).squeeze(1), seen.float())
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(seen, expected)
    # resuming at batch 1 from the same generator state gives the remaining batches
    rest = list(iterate_batches(x, y, 4, generator=torch.Generator().manual_seed(3), start=1))
    assert torch.equal(torch.cat([b[1] for b in rest]), expected[4:])
    assert [len(b[1]) for b in iterate_batches(x, y, 4, drop_last=True)] == [4, 4]
    assert num_batches(10, 4, drop_last=True) == 2


def test_regression_data_noise_floor():
    d = regression_data(n_train=20000, n_test=20000, noise_std=0.2, seed=1)
    assert d.task == "regression" and d.x_train.shape == (20000, 4)
    assert d.y_train.shape == (20000, 1) and d.noise_floor == pytest.approx(0.04)
    x = d.x_test
    f = torch.sin(3 * x[:, 0]) * torch.cos(2 * x[:, 1]) + 0.5 * x[:, 2] ** 2 - 0.3 * x[:, 3]
    mse = ((d.y_test[:, 0] - f) ** 2).mean().item()
    assert mse == pytest.approx(0.04, rel=0.05)  # the true function sits at the noise floor
    assert torch.equal(regression_data(seed=1).x_train, regression_data(seed=1).x_train)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("cifar-1000")


def _isolate_lookup(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KLDWRM_DATA", raising=False)
    monkeypatch.delenv("KLDWRM_NO_DOWNLOAD", raising=False)
    monkeypatch.setattr(D, "_repo_root", lambda: tmp_path / "repo")


def test_failed_download_falls_through_to_clear_error(tmp_path, monkeypatch):
    _isolate_lookup(tmp_path, monkeypatch)
    calls = []

    def offline(url, timeout):
        calls.append((url, timeout))
        raise OSError("network unreachable")

    monkeypatch.setattr(D.urllib.request, "urlopen", offline)
    with pytest.raises(DatasetNotFoundError, match="download failed") as info:
        load_dataset("mnist")
    assert len(calls) == len(D.DATASETS["mnist"].mirrors)  # one try per mirror, then give up
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

    monkeypatch.setattr(D.urllib.request, "urlopen", fake)
    got = load_dataset("mnist", normalize=False, subset=10)
    assert got.source == tmp_path / "data" / "mnist"
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(FILE_NAMES)
    assert torch.equal(got.y_train, mnist.y_train[:10])
