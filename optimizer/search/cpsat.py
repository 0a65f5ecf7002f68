"""CP-SAT: the exact Pareto front of quality vs training time under the memory bound.

The only module that imports ortools. The model is built from the instance's integer tables (memory
feasibility already applied: only feasible memory settings exist as choices). Front by the epsilon-constraint
method, starting unconstrained: maximize quality; with quality fixed, minimize time; with both fixed,
minimize the tie-break key (the point's position in the search space's order); then require time < the
found time and repeat until infeasible. Each point is non-dominated and every non-dominated objective vector
is found (two integer objectives). One worker and a fixed seed make the search deterministic.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from ortools.sat.python import cp_model

from ..errors import InfeasibleError
from .brute import non_dominated, point_key
from .objectives import MEM_KNOBS, TIME_UNIT_MS, point_objectives
from .space import Instance

__all__ = ["solve_cpsat", "solve_factored", "SolveStats"]

TIME_LIMIT_S = 30.0


class SolveStats:
    def __init__(self) -> None:
        self.proven = True
        self.literals = 0  # literals of the enumerated models solved (solve_cpsat), summed


def _radix(inst: Instance) -> tuple[list[int], int]:
    """The memory knobs' domain sizes, and the number of (accumulation, max_samples, epochs) triples."""
    d = inst.domains
    sizes = [len(d[k]) for k in MEM_KNOBS]
    return sizes, len(d["gradient_accumulation_steps"]) * len(d["max_samples"]) * len(d["num_train_epochs"])


def _key_int(index: tuple[int, ...], sizes: list[int]) -> int:
    k = 0
    for i, s in zip(index, sizes):
        k = k * s + i
    return k


def _groups(inst: Instance) -> list[tuple[int, int]]:
    """Combos that are identical for both objectives at every (accumulation, max_samples, epochs) (Candidate.signature)
    collapse to the one with the smallest key: it is the one the tie-break would pick. (position, key int)"""
    sizes, _ = _radix(inst)
    best: dict[tuple, tuple[int, int]] = {}
    for pos, c in enumerate(inst.combos):
        sig = c.signature()
        k = _key_int(c.index, sizes)
        if sig not in best or k < best[sig][1]:
            best[sig] = (pos, k)
    return sorted(best.values())


def _build(inst: Instance):
    """Joint one-hot over (memory group, accumulation, max_samples, epochs): quality, time and key are linear in
    it with coefficients from the instance tables (the joint encoding keeps the LP relaxation exact, so
    each solve is fast; memory feasibility is already built into which groups exist)."""
    m = cp_model.CpModel()
    d = inst.domains
    groups = _groups(inst)
    tails = list(itertools.product(d["gradient_accumulation_steps"], d["max_samples"], d["num_train_epochs"]))
    _, n_tail = _radix(inst)
    x: dict[tuple[int, int, object, float], cp_model.IntVar] = {}
    q_coef, t_coef, k_coef = [], [], []
    for gi, (pos, gk) in enumerate(groups):
        c = inst.combos[pos]
        for ti, (a, n, e) in enumerate(tails):  # product order: the key's tail (accumulation, max_samples, epochs)
            if not c.allows(a):
                continue
            var = m.new_bool_var(f"x{gi}_{ti}")
            x[gi, a, n, e] = var
            q, t = point_objectives(inst, c, a, n, e)
            q_coef.append(q)
            t_coef.append(t)
            k_coef.append(gk * n_tail + ti)
    xs = list(x.values())
    m.add_exactly_one(xs)
    Q = m.new_int_var(min(q_coef), max(q_coef), "quality")
    m.add(sum(cq * v for cq, v in zip(q_coef, xs)) == Q)
    T = m.new_int_var(min(t_coef), max(t_coef), "time_ms")
    m.add(sum(ct * v for ct, v in zip(t_coef, xs)) == T)
    key = m.new_int_var(0, max(k_coef), "key")
    m.add(key == sum(ck * v for ck, v in zip(k_coef, xs)))
    return m, x, Q, T, key, groups, (q_coef, t_coef, k_coef)


def _solve(m: cp_model.CpModel, stats: SolveStats) -> tuple[cp_model.CpSolver, int]:
    s = cp_model.CpSolver()
    s.parameters.num_workers = 1
    s.parameters.random_seed = 0
    s.parameters.max_time_in_seconds = TIME_LIMIT_S
    # The joint one-hot model needs no probing; it costs ~1 s per solve here (measured, ortools 9.15).
    s.parameters.cp_model_probing_level = 0
    s.parameters.find_big_linear_overlap = False
    st = s.solve(m)
    if st == cp_model.MODEL_INVALID:  # a bug, never a property of the problem: never an empty front
        raise AssertionError(f"invalid CP-SAT model: {m.validate()}")  # pragma: no cover
    if st == cp_model.UNKNOWN:  # no solution within the time limit: not "nothing fits"
        raise InfeasibleError(f"CP-SAT found no solution within its {TIME_LIMIT_S:g} s limit. Solve with --solver "
                              "brute, or pin the widest dimensions of the search space.")
    if st == cp_model.FEASIBLE:
        stats.proven = False
    return s, st


def solve_cpsat(inst: Instance, stats: SolveStats | None = None):
    """The front as [(quality, time_ms, key, (combo position, accumulation, max_samples, epochs))], quality
    descending.

    Per front point: maximize quality (time below the last point's); then, with quality fixed, minimize time and
    then the tie-break key. Exactly one literal is true, so fixing the quality leaves only the literals of that
    quality coefficient: the two lexicographic steps solve on that sub-model (`_lexmin`), not on the whole one.
    Then require a strictly smaller time and repeat.

    Several num_train_epochs values: one such solve per value, the fronts merged by brute.non_dominated (exact: the
    front of a union of spaces is the front of the union of their fronts; the keys are the whole space's, so the
    tie-break is the same). Measured (python benchmarks/solve.py, 1,749,600 plans with 3 epochs values): 35 s as one
    model, 21 s split; CP-SAT's time per solve grows faster than its literals."""
    stats = stats or SolveStats()
    if not inst.combos:
        return []
    epochs = inst.domains["num_train_epochs"]
    if len(epochs) > 1:
        merged = []
        for e in epochs:
            sub = replace(inst, domains={**inst.domains, "num_train_epochs": [e]})
            merged += [(q, t, point_key(inst, *p), p) for q, t, _, p in solve_cpsat(sub, stats)]
        return non_dominated(merged)
    base, x, Q, T, key, groups, (qc, tc, kc) = _build(inst)
    lits = list(x)
    stats.literals += len(lits)
    front = []
    eps = None
    while True:
        m = base.clone()
        if eps is not None:
            m.add(eps >= T)
        m.maximize(Q)
        s, st = _solve(m, stats)
        if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            break
        q = s.value(Q)
        sub = [i for i, cq in enumerate(qc) if cq == q and (eps is None or tc[i] <= eps)]
        i = _lexmin(sub, tc, kc, stats)
        gi, accum, samples, epochs = lits[i]
        t = tc[i]
        pos = groups[gi][0]
        front.append((q, t, point_key(inst, pos, accum, samples, epochs), (pos, accum, samples, epochs)))
        eps = t - 1
        if eps < 0:
            break
    return front


def _lexmin(sub: list[int], tc: list[int], kc: list[int], stats: SolveStats) -> int:
    """The literal of `sub` with the smallest time, then the smallest key: a one-hot over `sub`, two solves (one
    literal: it is the one)."""
    if len(sub) == 1:
        return sub[0]
    m = cp_model.CpModel()
    xs = [m.new_bool_var(f"s{i}") for i in sub]
    m.add_exactly_one(xs)
    t = sum(tc[i] * v for i, v in zip(sub, xs))
    m.minimize(t)
    s, _ = _solve(m, stats)
    m.add(t == int(s.objective_value))
    m.minimize(sum(kc[i] * v for i, v in zip(sub, xs)))
    s, _ = _solve(m, stats)
    return next(i for i, v in zip(sub, xs) if s.boolean_value(v))


def nearest_feasible(costs: list[int], tiebreak: list[int]) -> int:
    """Index of the cheapest feasible option: minimize cost, then `tiebreak` (e.g. device peak in MiB), then
    the index. Each option is one literal of an exactly-one constraint; lexicographic by three solves."""
    m = cp_model.CpModel()
    x = [m.new_bool_var(f"o{i}") for i in range(len(costs))]
    m.add_exactly_one(x)
    cost = sum(c * v for c, v in zip(costs, x))
    tb = sum(t * v for t, v in zip(tiebreak, x))
    idx = sum(i * v for i, v in enumerate(x))
    stats = SolveStats()
    for obj in (cost, tb, idx):
        m.minimize(obj)
        s, _ = _solve(m, stats)
        m.add(obj == int(round(s.objective_value)))
    return next(i for i, v in enumerate(x) if s.boolean_value(v))


# --- the factored model (search/factored.py): the memory model and the objectives as constraints ----------------


class _Factored:
    """The CP-SAT model of a Factored instance, all linear: a one-hot Boolean per knob value; per distinct knob set
    of the tables, one Boolean per row of its sub-domain, channelled to the knobs' one-hots (exactly one row, the
    one the plan's knob values select), so every table's value is a linear sum over its rows and tables over the
    same knobs share rows. Per moment, its allocated bytes are the sum of its tables; the peak moment (the first of
    largest total) must fit: total + allocator overhead <= allocated limit. Quality is the sum of its term tables;
    time in whole seconds: ceil((compute ms + step ms) / 1000); the tie-break key is the point's position in the
    search space's order (mixed radix over the knobs' indices)."""

    def __init__(self, fac) -> None:
        self.fac = fac
        self.knobs(fac.sizes, fac.accumulating_index)
        m = self.cp
        totals = [sum(self.value(t) for t in fac.memory[k]) for k in fac.moments]
        overs = [self.value(fac.overhead[k]) if k in fac.overhead else 0 for k in fac.moments]
        limit = self.value(fac.limit)
        z = [m.new_bool_var(f"peak_{k}") for k in fac.moments]
        if z:
            m.add_exactly_one(z)
        for i, zi in enumerate(z):
            for j in range(len(z)):
                if j != i:
                    m.add(totals[i] >= totals[j] + (1 if j < i else 0)).only_enforce_if(zi)
            m.add(totals[i] + overs[i] <= limit).only_enforce_if(zi)
        self.objectives(fac.quality, fac.compute_ms, fac.step_ms)

    def knobs(self, sizes: dict[str, int], accumulating_index) -> None:
        """A fresh model: one-hots per knob (factored.KNOBS and the accumulation class, channelled to accumulation
        through `accumulating_index`: accumulation index -> class index) and the tie-break key: the point's
        position in the search space's order (mixed radix over the knobs' indices)."""
        from .factored import KNOBS

        m = self.cp = cp_model.CpModel()
        self._rows: dict[tuple, dict] = {}
        self.x = {k: [m.new_bool_var(f"{k}={i}") for i in range(sizes[k])] for k in KNOBS + ("accumulating",)}
        for vs in self.x.values():
            m.add_exactly_one(vs)
        for c in range(sizes["accumulating"]):
            m.add(sum(self.x["gradient_accumulation_steps"][i] for i in range(sizes["gradient_accumulation_steps"])
                      if accumulating_index(i) == c) == self.x["accumulating"][c])
        stride, key_hi, key_terms = 1, 0, []
        for k in reversed(KNOBS):
            key_terms += [stride * i * v for i, v in enumerate(self.x[k]) if i]
            key_hi += stride * (sizes[k] - 1)
            stride *= sizes[k]
        self.key = m.new_int_var(0, key_hi, "key")
        m.add(self.key == sum(key_terms))

    def objectives(self, quality: list, compute_ms, step_ms) -> None:
        """Quality as the sum of its term tables; time in whole seconds: ceil((compute ms + step ms) / 1000)."""
        m = self.cp
        self.quality = m.new_int_var(*_bounds([self.bounds(t) for t in quality]), "quality")
        m.add(self.quality == sum(self.value(t) for t in quality))
        ms = self.value(compute_ms) + self.value(step_ms)
        hi = -(-(self.bounds(compute_ms)[1] + self.bounds(step_ms)[1]) // TIME_UNIT_MS)
        self.time = m.new_int_var(0, hi, "time")
        m.add(TIME_UNIT_MS * self.time >= ms)
        m.add(TIME_UNIT_MS * self.time <= ms + TIME_UNIT_MS - 1)

    def index(self, k: str, solver: cp_model.CpSolver) -> int:
        return next(i for i, v in enumerate(self.x[k]) if solver.boolean_value(v))

    @staticmethod
    def bounds(t) -> tuple[int, int]:
        vals = t.values.values()
        return min(vals), max(vals)

    def rows(self, knobs: tuple[str, ...], keys) -> dict:
        """The row Booleans of a knob set: exactly one, channelled to each knob's one-hot."""
        r = self._rows.get(knobs)
        if r is None:
            m = self.cp
            r = self._rows[knobs] = {key: m.new_bool_var(f"{'|'.join(knobs)}#{n}") for n, key in
                                     enumerate(sorted(keys))}
            for pos, k in enumerate(knobs):
                by_value: dict[int, list] = {}
                for key, var in r.items():
                    by_value.setdefault(key[pos], []).append(var)
                for i, var in enumerate(self.x[k]):
                    m.add(sum(by_value.get(i, [])) == var)
        return r

    def value(self, t) -> cp_model.LinearExpr:
        """A table's value: the sum of its rows' values times their Booleans."""
        r = self.rows(t.knobs, t.values.keys())
        return cp_model.LinearExpr.weighted_sum([r[key] for key in t.values], list(t.values.values()))


def _bounds(parts: list[tuple[int, int]]) -> tuple[int, int]:
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def _solve_light(m: cp_model.CpModel, stats: SolveStats) -> tuple[cp_model.CpSolver, int]:
    """The factored model: presolve off (measured on the reference problem, ortools 9.15: presolve took 8.6 s of a
    12.7 s solve; without it 1.4 s)."""
    s = cp_model.CpSolver()
    s.parameters.num_workers = 1
    s.parameters.random_seed = 0
    s.parameters.max_time_in_seconds = TIME_LIMIT_S
    s.parameters.cp_model_presolve = False
    st = s.solve(m)
    if st == cp_model.FEASIBLE:
        stats.proven = False
    return s, st


def epsilon_front(model: _Factored, stats: SolveStats) -> list[tuple[int, int, cp_model.CpSolver]]:
    """The epsilon-constraint loop over a factored model (maximize quality; with it fixed, minimize time; then the
    key; then require a strictly smaller time): [(quality, time, the solver of the key step)], quality descending."""
    front = []
    eps = None
    while True:
        m = model.cp.clone()
        if eps is not None:
            m.add(model.time <= eps)
        m.maximize(model.quality)
        s, st = _solve_light(m, stats)
        if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return front
        q = s.value(model.quality)
        m.add(model.quality == q)
        m.minimize(model.time)
        s, st = _solve_light(m, stats)
        t = s.value(model.time)
        m.add(model.time == t)
        m.minimize(model.key)
        s, st = _solve_light(m, stats)
        front.append((q, t, s))
        eps = t - 1
        if eps < 0:
            return front


def solve_factored(fac, stats: SolveStats | None = None):
    """The front of a Factored instance as [(quality, time, key, knob values)], quality descending
    (`epsilon_front`). Empty when no plan fits."""
    from .factored import KNOBS, memory_of

    model = _Factored(fac)
    d = fac.inst.domains
    front = []
    for q, t, s in epsilon_front(model, stats or SolveStats()):
        idx = {k: model.index(k, s) for k in KNOBS}
        values = {k: d[k][i] for k, i in idx.items()}
        if not memory_of(fac, values)[1]:  # re-checked by the tables' own arithmetic, outside the solver
            raise AssertionError(f"the factored model returned a plan that does not fit: {values}")  # pragma: no cover
        front.append((q, t, tuple(idx[k] for k in KNOBS), values))
    return front
