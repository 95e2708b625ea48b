"""Issue targets as the benchmarks report them: the figure reached, and met or missed by how much."""

from __future__ import annotations

import math


def verdict(label: str, reached: float, goal: float, unit: str = "x", at_most: bool = False) -> str:
    """One line saying whether `reached` meets `goal` (at least `goal`, or at most it when `at_most`) and, if not,
    by what share of the goal it falls short."""
    if not math.isfinite(reached):
        return f"target {label}: not measured"
    met = reached <= goal if at_most else reached >= goal
    shortfall = reached / goal - 1 if at_most else 1 - reached / goal
    return (f"target {label} ({'at most' if at_most else 'at least'} {goal:g}{unit}): {reached:.4g}{unit}, "
            + ("met" if met else f"missed by {shortfall:.0%}"))
