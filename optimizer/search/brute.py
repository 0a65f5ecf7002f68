"""Exhaustive oracle: every point of the instance, the same integer tables as the CP-SAT model."""

from __future__ import annotations

import itertools

from .pareto import non_dominated
from .space import Instance

__all__ = ["all_points", "solve_brute"]


def point_key(inst: Instance, combo_pos: int, accum: int, samples) -> tuple:
    d = inst.domains
    return inst.combos[combo_pos].index + (d["gradient_accumulation_steps"].index(accum), d["max_samples"].index(samples))


def evaluate_point(inst: Instance, combo_pos: int, accum: int, samples) -> tuple[int, int]:
    c = inst.combos[combo_pos]
    b = c.knobs[4]
    n = inst.samples_used[samples]
    q = c.quality + inst.samples_quality[samples] - inst.batch_penalty[(b, accum)]
    return q, inst.time_units(n, b, accum, c)


def all_points(inst: Instance):
    d = inst.domains
    for pos, accum, samples in itertools.product(range(len(inst.combos)), d["gradient_accumulation_steps"], d["max_samples"]):
        q, t = evaluate_point(inst, pos, accum, samples)
        yield q, t, point_key(inst, pos, accum, samples), (pos, accum, samples)


def solve_brute(inst: Instance):
    """The Pareto front as [(quality, time_ms, key, (combo position, accumulation, max_samples))]."""
    return non_dominated(all_points(inst))
