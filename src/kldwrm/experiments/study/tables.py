"""Cells and files of the report's tables: number formatting, Markdown rows, CSV writing.

Every formatter shows a missing value (NaN, or ``None``) as ``—``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["MISSING", "fmt", "fmt_p", "fmt_ratio", "md_head", "md_row", "write_csv"]

MISSING = "—"


def fmt(x: float | None, spec: str) -> str:
    """``format(x, spec)``, or ``—`` for a missing value (``fmt(0.5, ".2f") == "0.50"``)."""
    return MISSING if x is None or math.isnan(x) else format(x, spec)


def fmt_p(p: float) -> str:
    """p-values: 3 decimals, scientific notation below 0.001."""
    return fmt(p, ".3f" if p >= 1e-3 else ".1e")


def fmt_ratio(r: float) -> str:
    """A ratio to 3 significant digits; ``∞`` for infinity."""
    return "∞" if math.isinf(r) else fmt(r, "#.3g")


def md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def md_head(head: Sequence[str]) -> list[str]:
    """The header row and separator of a Markdown table."""
    return [md_row(head), "|" + "---|" * len(head)]


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """``rows`` under the header ``columns``."""
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns))
        w.writeheader()
        w.writerows(rows)
