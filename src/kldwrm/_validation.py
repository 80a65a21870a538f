"""Argument checks shared by every optimizer: each error names the argument and its range;
and where a warning points (:func:`caller_stacklevel`)."""

from __future__ import annotations

import math
import os
import sys

import torch


def check_positive(name: str, value: float) -> float:
    """Require ``value > 0`` and finite."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value: float) -> float:
    """Require ``value >= 0`` and finite."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def check_unit_interval(name: str, value: float) -> float:
    """Require ``0 <= value < 1`` (the range of the EA decay rho)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def check_optional_positive(name: str, value: float | None) -> float | None:
    """``None`` (off) or a number > 0."""
    if value is None:
        return None
    return check_positive(name, value)


def check_int_at_least(name: str, value: int, low: int) -> int:
    """Require an integer ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Require ``value`` to be one of ``choices``."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def caller_stacklevel() -> int:
    """``warnings.warn``'s ``stacklevel`` from its caller up to the first frame outside
    kldwrm and torch: the user's ``step()`` call, however deep the step found the cause."""
    frame, level = sys._getframe(2), 2  # the frame that calls warn, at stacklevel 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


#: source directories whose frames a warning skips (:func:`caller_stacklevel`)
_INTERNAL = (os.path.dirname(__file__), os.path.dirname(torch.__file__))
