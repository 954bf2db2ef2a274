"""Intervals for success rates and their differences (95%, score-based: sound near 0 and 1 and for small n).

- :func:`wilson_interval`: one success rate (Wilson 1927).
- :func:`paired_difference`: the difference of two success rates measured on the SAME seeds,
  with Newcombe's (1998) hybrid score interval for paired proportions (his method 10). Pairing
  matters: two agents on the same seeds share the seeds' difficulty, so their difference is
  known better than two independent rates would allow.
- :func:`over_runs`: mean, spread and t interval of one metric over independent runs (training seeds).
"""

from __future__ import annotations

import math
from statistics import mean, stdev

Z95 = 1.959963984540054
# two-sided 95% Student t quantiles by degrees of freedom (beyond 30 the normal one is within 4%)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of the success rate ``successes / n`` (n >= 1)."""
    p, z2 = successes / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # the bounds are exactly 0 and 1 at the extremes; rounding would leave them a hair inside
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == n else centre + half)


def rate_fields(name: str, successes: int, n: int) -> dict:
    """``{name: rate, name_ci_low: .., name_ci_high: ..}``: a rate and its Wilson interval as flat metrics."""
    low, high = wilson_interval(successes, n)
    return {name: successes / n, f"{name}_ci_low": low, f"{name}_ci_high": high}


def paired_difference(a: list[int], b: list[int]) -> dict:
    """Success rate of ``a`` minus that of ``b``, outcomes (0/1) on the same seeds in the same order.

    Returns the difference, its 95% interval (Newcombe's method 10: the two Wilson intervals
    combined with the correlation of the pairs), the episode count and the discordant pairs
    (``a_only``: seeds only ``a`` solved, ``b_only``); numbers only, so that it is a DVC metric.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired outcomes need the same non-zero length, got {len(a)} and {len(b)}")
    n = len(a)
    both = sum(x and y for x, y in zip(a, b))
    a_only = sum(x and not y for x, y in zip(a, b))
    b_only = sum(y and not x for x, y in zip(a, b))
    neither = n - both - a_only - b_only
    p1, p2 = (both + a_only) / n, (both + b_only) / n
    (l1, u1), (l2, u2) = wilson_interval(both + a_only, n), wilson_interval(both + b_only, n)
    denom = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    phi = (both * neither - a_only * b_only) / math.sqrt(denom) if denom else 0.0
    d1, d2 = p1 - l1, u2 - p2
    e1, e2 = u1 - p1, p2 - l2
    low = p1 - p2 - math.sqrt(max(0.0, d1 * d1 - 2 * phi * d1 * d2 + d2 * d2))
    high = p1 - p2 + math.sqrt(max(0.0, e1 * e1 - 2 * phi * e1 * e2 + e2 * e2))
    return {"difference": p1 - p2, "ci_low": max(-1.0, low), "ci_high": min(1.0, high), "episodes": n,
            "a_only": a_only, "b_only": b_only}  # fmt: skip


def verdict(diff: dict) -> str:
    """How to read a :func:`paired_difference`: which side is ahead, or "no difference" when its
    interval holds zero."""
    if diff["ci_low"] > 0:
        return "ahead"
    return "behind" if diff["ci_high"] < 0 else "no difference"


def over_runs(values: list[float]) -> dict:
    """Mean, sample standard deviation, min/max and 95% t interval of the mean over independent runs."""
    n = len(values)
    if n == 0:
        raise ValueError("over_runs needs at least one value")
    m = mean(values)
    sd = stdev(values) if n > 1 else None
    if sd is None:
        low = high = None
    else:
        t = T95[max(k for k in T95 if k <= n - 1)]  # the next smaller tabulated df: a slightly wider interval
        low, high = m - t * sd / math.sqrt(n), m + t * sd / math.sqrt(n)
    return {"runs": n, "mean": m, "std": sd, "min": min(values), "max": max(values), "ci_low": low, "ci_high": high}
