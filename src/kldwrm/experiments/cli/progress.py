"""Progress of the ``kldwrm`` commands on the terminal: tqdm bars and one line per epoch.

Only the CLI uses these (the library never prints); tqdm is imported when a bar is made,
after :func:`.commands.main` has checked the extras.
"""

from __future__ import annotations

import math
import sys
from typing import Any

__all__ = ["SweepProgress", "TrainProgress"]


class SweepProgress:
    """A tqdm bar over all optimizer steps of a sweep, fed by worker events."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.tqdm = tqdm
        self.bar = tqdm(total=total, unit="step", disable=not enabled, dynamic_ncols=True)
        self.pos: dict[tuple[str, int], int] = {}
        self.nb: dict[tuple[str, int], int] = {}
        self.epochs: dict[tuple[str, int], int] = {}

    def set_epochs(self, key: tuple[str, int], epochs: int, nb: int) -> None:
        self.epochs[key], self.nb[key] = epochs, nb

    def _advance_to(self, key: tuple[str, int], pos: int) -> None:
        delta = pos - self.pos.get(key, 0)
        if delta > 0:
            self.bar.update(delta)
        self.pos[key] = max(pos, self.pos.get(key, 0))

    def __call__(self, ev: dict[str, Any]) -> None:
        key = (ev["solver"], ev["seed"])
        kind = ev["kind"]
        nb = self.nb.get(key, 1)
        if kind == "skip":
            self._advance_to(key, self.epochs.get(key, 0) * nb)
            self.write(f"{ev['solver']} seed {ev['seed']}: finished earlier, skipped")
        elif kind in ("epoch_start", "step"):
            self._advance_to(key, (ev["epoch"] - 1) * nb + ev["batch"])
            if kind == "step":
                self.bar.set_postfix_str(
                    f"{ev['solver']} s{ev['seed']} ep{ev['epoch']} loss {ev['loss']:.3f}"
                )
        elif kind == "epoch_end":
            row = ev["row"]
            self._advance_to(key, ev["epoch"] * nb)
            acc = row["test_acc"]
            acc_s = "" if math.isnan(acc) else f", test acc {100 * acc:.2f}%"
            self.write(
                f"{ev['solver']} seed {ev['seed']} epoch {ev['epoch']}: "
                f"test loss {row['test_loss']:.4f}{acc_s}"
            )
        elif kind == "failed":
            self.write(f"{ev['solver']} seed {ev['seed']}: FAILED: {ev.get('error')}")
        elif kind == "notice":
            self.write(f"kldwrm: warning: {ev['solver']} seed {ev['seed']}: {ev['message']}")

    def write(self, text: str) -> None:
        self.tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()



class TrainProgress:
    """``kldwrm train``'s callback: a tqdm bar per epoch, one line per finished epoch.

    It has :class:`~kldwrm.experiments.training.train.TrainCallback`'s methods without deriving
    from it (that would import torch before :func:`main` has checked the extras).
    """

    def __init__(self, epochs: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.tqdm, self.epochs, self.enabled = tqdm, epochs, enabled
        self.bar: Any = None

    def on_epoch_start(self, epoch: int, num_batches: int, start_batch: int) -> None:
        self.bar = self.tqdm(
            total=num_batches,
            initial=start_batch,
            unit="batch",
            desc=f"epoch {epoch}/{self.epochs}",
            leave=False,
            disable=not self.enabled,
            dynamic_ncols=True,
        )

    def on_step(self, epoch: int, batch: int, loss: float, acc: float) -> None:
        self.bar.update(batch - self.bar.n)
        post = f"loss {loss:.4f}" + ("" if math.isnan(acc) else f" acc {100 * acc:.2f}%")
        self.bar.set_postfix_str(post, refresh=False)

    def on_notice(self, message: str) -> None:
        self.tqdm.write(f"kldwrm: warning: {message}", file=sys.stderr)

    def on_epoch_end(self, row: dict[str, float]) -> None:
        self.close()
        acc = (
            ""
            if math.isnan(row["test_acc"])
            else f"  train acc {100 * row['train_acc']:.2f}%  test acc {100 * row['test_acc']:.2f}%"
        )
        self.tqdm.write(
            f"epoch {int(row['epoch'])}: train loss {row['train_loss']:.4f}  "
            f"test loss {row['test_loss']:.4f}{acc}  "
            f"{row['mean_step_ms']:.1f} ms/step  {row['wall_time_s']:.1f} s"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
