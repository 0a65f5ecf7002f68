"""Dominance for two objectives: quality (maximize) and time (minimize)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

__all__ = ["non_dominated"]

P = TypeVar("P")


def non_dominated(points: Iterable[tuple[int, int, tuple, P]]) -> list[tuple[int, int, tuple, P]]:
    """Points (quality, time, key, payload) not weakly dominated by another objective vector. Among points
    with equal (quality, time) the one with the smallest key stays (the documented tie-break). The result is
    sorted by quality descending (time descending with it)."""
    best: dict[tuple[int, int], tuple[int, int, tuple, P]] = {}
    for p in points:
        k = (p[0], p[1])
        if k not in best or p[2] < best[k][2]:
            best[k] = p
    ordered = sorted(best.values(), key=lambda p: (-p[0], p[1]))
    front = []
    best_time = None
    for p in ordered:  # quality descending; a point survives if it is strictly faster than every better one
        if best_time is None or p[1] < best_time:
            front.append(p)
            best_time = p[1]
    return front
