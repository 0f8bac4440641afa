"""The arithmetic of measured figures: ratios, verdicts against a goal, peaks over samples that
may be missing, medians, ``nvidia-smi`` numbers. Missing figures are NaN throughout, so a
section that measured nothing still renders its table (``n/a``) instead of failing."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

MiB = 2**20


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN when either is missing or the denominator is not positive."""
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator <= 0:
        return math.nan
    return numerator / denominator


def verdict(value: float, goal: float, at_most: bool, judged: bool = True) -> str:
    """``yes``/``no`` for a measured value against its goal; ``n/a`` when not judged or unmeasured."""
    if not judged or not math.isfinite(value):
        return "n/a"
    return "yes" if (value <= goal if at_most else value >= goal) else "no"


def nanmax(*values: float) -> float:
    """The largest finite value (NaN when there is none): peaks over samples that may be missing."""
    finite = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return max(finite) if finite else math.nan


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def parse_csv_numbers(text: str) -> list[list[float]]:
    """Rows of an ``nvidia-smi --format=csv,noheader,nounits`` answer; ``[N/A]`` fields become NaN."""
    rows = []
    for line in text.strip().splitlines():
        fields = []
        for item in line.split(","):
            try:
                fields.append(float(item.strip()))
            except ValueError:
                fields.append(math.nan)
        if fields:
            rows.append(fields)
    return rows
