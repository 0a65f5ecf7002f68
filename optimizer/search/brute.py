"""Exhaustive oracle (`--solver brute`): every point of the instance, through the same `objectives` as CP-SAT,
and Pareto dominance for two objectives: quality (maximize) and time (minimize)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import TypeVar

from .objectives import point_objectives
from .space import Instance

__all__ = ["all_points", "solve_brute", "non_dominated"]

P = TypeVar("P")


def point_key(inst: Instance, combo_pos: int, accum: int, samples, epochs: float) -> tuple:
    """The tie-break key: positions in the domains, MEM_KNOBS order, then accumulation, max_samples, epochs."""
    d = inst.domains
    return inst.combos[combo_pos].index + (d["gradient_accumulation_steps"].index(accum),
                                           d["max_samples"].index(samples), d["num_train_epochs"].index(epochs))


def all_points(inst: Instance):
    d = inst.domains
    grid = itertools.product(range(len(inst.combos)), d["gradient_accumulation_steps"], d["max_samples"],
                             d["num_train_epochs"])
    for pos, accum, samples, epochs in grid:
        if not inst.combos[pos].allows(accum):
            continue
        q, t = point_objectives(inst, inst.combos[pos], accum, samples, epochs)
        yield q, t, point_key(inst, pos, accum, samples, epochs), (pos, accum, samples, epochs)


def solve_brute(inst: Instance):
    """The Pareto front as [(quality, time_ms, key, (combo position, accumulation, max_samples, epochs))]."""
    return non_dominated(all_points(inst))


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
