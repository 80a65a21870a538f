"""Stopping a training run at a step boundary: Ctrl-C and the stop agreed by every rank.

The first Ctrl-C (SIGINT) only asks the run to stop (:class:`StopFlags`); the session checks
the flags between steps and raises :class:`StopRequested`, so the state up to the last
finished step is consistent and can be checkpointed. A second Ctrl-C raises
:class:`KeyboardInterrupt` at once. With several ranks a rank stops only when every rank
agrees (the request travels with each step's metrics, see :mod:`.ranks`).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["StopFlags", "StopRequested", "graceful_sigint"]


class StopFlags:
    """Stop requests: ``requested`` is set by this process's SIGINT handler; ``agreed``,
    with several ranks, when any rank requested (all-reduced with each step's metrics)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.requested = False
        self.agreed = False

    def __call__(self) -> bool:
        """Whether the run should stop at this step boundary."""
        return self.requested if self.world == 1 else self.agreed


class StopRequested(Exception):
    """Raised at a step boundary when the run should stop (caught by ``train``)."""


@contextmanager
def graceful_sigint(stop: StopFlags) -> Iterator[None]:
    """First Ctrl-C sets ``stop.requested``; a second one raises KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(
            signal.SIGINT, previous if previous is not None else signal.default_int_handler
        )
