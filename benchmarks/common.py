"""Shared pieces of the benchmark suite: models, data, optimizers, machine description.

The benchmark models are defined here (not imported from ``kldwrm.experiments``) so that
the suite only depends on the optimizers it measures.
"""

from __future__ import annotations

import gzip
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import kldwrm

REPO_ROOT = Path(__file__).resolve().parent.parent
MNIST_DIR = REPO_ROOT.parent / "shared" / "data" / "mnist"
#: where the IDX files of a data set ``<name>`` are looked for, in order: ``<root>/<name>``
#: (Debian's ``dataset-fashion-mnist`` package installs ``/usr/share/datasets/fashion-mnist``)
DATA_ROOTS = (REPO_ROOT.parent / "shared" / "data", Path("/usr/share/datasets"))
#: the four IDX files: train images, train labels, test images, test labels
IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
ALL_METHODS = ("sgd", "adam", "kfac", "so", "q", "qe")
#: the first-order baselines (``torch.optim``); every other method has a curvature engine
FIRST_ORDER = ("sgd", "adam")
#: ``<method>-r<rank>``: a curvature method with ``rank=<rank>`` (e.g. ``kfac-r128``)
_RANKED = re.compile(r"^(?P<base>[a-z]+)-r(?P<rank>[0-9]+)$")


# -- models ------------------------------------------------------------------------------
def paper_cnn() -> nn.Sequential:
    """The paper's MNIST network (DESIGN section 4), 4,712 parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 5, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(5, 7, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(112, 30), nn.ReLU(), nn.Dropout(0.5), nn.Linear(30, 10),
    )


def mlp(width: int = 1024) -> nn.Sequential:
    """MLP 784-width-width-10 with ReLU (1.86 M parameters at the default width 1024)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, 10),
    )


def mlp_wide() -> nn.Sequential:
    """MLP 784-4096-4096-10 with ReLU (20.0 M parameters)."""
    return mlp(4096)


class _Residual(nn.Module):
    """Two 3x3 conv + BatchNorm layers with an identity or 1x1-projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.short(x))


def resnet_small() -> nn.Sequential:
    """Small residual CNN with BatchNorm for 3x32x32 inputs (stem 16, stages 16/32/64)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        _Residual(16, 16, 1), _Residual(16, 32, 2), _Residual(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


@dataclass(frozen=True)
class Workload:
    """A model builder with its input shape and batch size.

    ``max_rounds`` caps the timed rounds of a step-time cell (``None``: no cap) for a
    workload whose exact curvature step takes seconds; such a cell is marked *short*.
    """

    key: str
    label: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch: int
    max_rounds: int | None = None


WORKLOADS: dict[str, Workload] = {
    "cnn": Workload("cnn", "(a) paper CNN, MNIST shape, batch 512", paper_cnn, (1, 28, 28), 512),
    "mlp": Workload("mlp", "(b) MLP 784-1024-1024-10, batch 256", mlp, (1, 28, 28), 256),
    "resnet": Workload(
        "resnet", "(c) residual CNN + BatchNorm, 3x32x32, batch 128", resnet_small,
        (3, 32, 32), 128,
    ),
    "mlp-wide": Workload(
        "mlp-wide", "(d) MLP 784-4096-4096-10, batch 256 (short cell: one timed round)",
        mlp_wide, (1, 28, 28), 256, max_rounds=1,
    ),
}


def synthetic_batches(w: Workload, n: int, device: torch.device, seed: int = 0
                      ) -> list[tuple[Tensor, Tensor]]:
    """``n`` fixed random batches (step time does not depend on the pixel values)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn((w.batch, *w.input_shape), generator=g)
        y = torch.randint(0, 10, (w.batch,), generator=g)
        out.append((x.to(device), y.to(device)))
    return out


# -- optimizers ---------------------------------------------------------------------------
def parse_method(name: str) -> tuple[str, dict[str, int]]:
    """``"kfac-r128"`` → ``("kfac", {"rank": 128})``; ``"kfac"`` → ``("kfac", {})``.

    Raises ``ValueError`` for an unknown optimizer, a rank on SGD/Adam or a rank < 1.
    """
    match = _RANKED.match(name)
    base, extra = (match["base"], {"rank": int(match["rank"])}) if match else (name, {})
    if base not in ALL_METHODS:
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(ALL_METHODS)}, "
                         "or a curvature method with a rank such as kfac-r128")
    if extra and (base in FIRST_ORDER or extra["rank"] < 1):
        raise ValueError(f"{name!r}: a rank >= 1 applies to kfac, so, q and qe only")
    return base, extra


def is_curvature(name: str) -> bool:
    """Whether ``name`` (with or without a rank) is one of this library's optimizers."""
    return parse_method(name)[0] not in FIRST_ORDER


def available_methods(requested: Sequence[str] = ALL_METHODS) -> list[str]:
    """The requested methods that can be built here (``qe`` only if its module exists).

    Names are checked with :func:`parse_method` (a bad name raises ``ValueError``).
    """
    out = []
    for m in requested:
        if parse_method(m)[0] == "qe":
            try:
                from kldwrm.optim.qe import QEKLDWRM  # noqa: F401
            except ImportError:
                print("[bench] qe not importable; skipped", file=sys.stderr)
                continue
        out.append(m)
    return out


def make(name: str, model: nn.Module, **kw: object) -> torch.optim.Optimizer:
    """``kldwrm.make_optimizer`` (the paper settings, DESIGN section 4) with overrides;
    ``name`` may carry a rank (``kfac-r128`` is ``make_optimizer("kfac", model, rank=128)``)."""
    base, extra = parse_method(name)
    return kldwrm.make_optimizer(base, model, **{**extra, **kw})


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state (``state_bytes()`` if defined, else the state tensors)."""
    fn = getattr(opt, "state_bytes", None)
    if callable(fn):
        return int(fn())
    return sum(
        v.numel() * v.element_size()
        for st in opt.state.values() for v in st.values() if isinstance(v, Tensor)
    )


def factor_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the curvature (factors and their decompositions); 0 for SGD/Adam."""
    eng = getattr(opt, "engine", None)
    return int(eng.state_bytes()) if eng is not None else 0


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- timing and machine ---------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def summary(xs: Sequence[float]) -> dict[str, float]:
    """Mean, median, interquartile range, min and max of a sample."""
    s = sorted(xs)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
    return dict(mean=statistics.fmean(s), median=statistics.median(s), q1=q[0], q3=q[2],
                min=s[0], max=s[-1], n=len(s))


def peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    ``VmHWM`` from /proc first: ``ru_maxrss`` of a child started by fork + exec can report
    the parent's peak on Linux, which would make every subprocess look alike.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """Current resident set size from /proc (0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, str]:
    """Machine, software and thread count, for the report header."""
    info = {
        "CPU": f"{cpu_model()} ({os.cpu_count()} logical cores visible)",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "Python": platform.python_version(),
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "device": str(device),
    }
    if device.type == "cuda":
        info["GPU"] = torch.cuda.get_device_name(device)
    return info


# -- MNIST-type data sets ------------------------------------------------------------------
def _idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def find_idx_dir(name: str, roots: Sequence[Path] = DATA_ROOTS) -> Path:
    """The first ``<root>/<name>`` holding the four :data:`IDX_FILES`.

    Raises ``FileNotFoundError`` naming the directories searched.
    """
    for root in roots:
        if all((root / name / f).is_file() for f in IDX_FILES):
            return root / name
    searched = ", ".join(str(r / name) for r in roots)
    raise FileNotFoundError(f"{name}: the files {', '.join(IDX_FILES)} are in none of "
                            f"{searched} (Fashion-MNIST on Debian/Ubuntu: apt-get install "
                            "dataset-fashion-mnist)")


def load_idx(root: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """An MNIST-type data set from the IDX files in ``root``: float tensors in [0, 1],
    shape (N, 1, 28, 28), and int64 labels (train images, labels, test images, labels)."""
    def images(name: str) -> Tensor:
        a = _idx(root / name, 16).reshape(-1, 1, 28, 28)
        return torch.from_numpy(a.astype(np.float32) / 255.0)

    def labels(name: str) -> Tensor:
        return torch.from_numpy(_idx(root / name, 8).astype(np.int64))

    return (images(IDX_FILES[0]), labels(IDX_FILES[1]), images(IDX_FILES[2]),
            labels(IDX_FILES[3]))


def load_mnist(root: Path | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST from ``root`` (default: :func:`find_idx_dir`), as :func:`load_idx`."""
    return load_idx(root if root is not None else find_idx_dir("mnist"))
