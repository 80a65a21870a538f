"""Stopping at a step boundary (:mod:`kldwrm.experiments.training.interrupt`) and the batch
shards of a distributed run (:mod:`kldwrm.experiments.training.ranks`). Real Ctrl-C during
training is tested in ``test_train.py``, real ranks in ``tests/test_distributed.py``."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

from kldwrm.experiments.training.interrupt import StopFlags, graceful_sigint
from kldwrm.experiments.training.ranks import shard


def test_stop_flags_one_rank_and_several():
    one, two = StopFlags(1), StopFlags(2)
    one.requested = two.requested = True
    assert one() and not two()  # several ranks stop only when they agree
    two.agreed = True
    assert two()


def test_first_ctrl_c_asks_to_stop_the_second_interrupts():
    before = signal.getsignal(signal.SIGINT)
    stop = StopFlags(1)
    with pytest.raises(KeyboardInterrupt):
        with graceful_sigint(stop):
            os.kill(os.getpid(), signal.SIGINT)
            assert stop()
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_outside_the_main_thread_the_handler_is_left_alone():
    seen = []

    def body() -> None:
        with graceful_sigint(StopFlags(1)):
            seen.append(signal.getsignal(signal.SIGINT))

    before = signal.getsignal(signal.SIGINT)
    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [before]


def test_shards_are_equal_and_contiguous():
    x, y = torch.arange(7), torch.arange(7) * 10
    assert [shard(x, y, r, 3)[0].tolist() for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert shard(x, y, 1, 3)[1].tolist() == [20, 30]
    with pytest.raises(ValueError, match="cannot feed 8 ranks"):
        shard(x, y, 0, 8)
