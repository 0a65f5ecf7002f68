"""Which CP-SAT encoding of the search is fast, measured (issue 10): the same exact front four ways.

1. default: the feasible memory settings enumerated (the staircase walk, space.enumerate_instance), one Boolean per
   (objective group, accumulation, max_samples, epochs); no coupling constraint, the LP relaxation is integral
   (search/cpsat.py solve_cpsat).
2. factored: the memory model as tables per moment x knob group and the objectives as tables per term, all
   channelled to one-hot knobs (search/factored.py + cpsat.solve_factored).
3. staircase + factored objectives: memory as one enforced bound per (outer setting, accumulation class): the
   sorted batch position <= the largest that fits at the chosen cutoff_len (the staircase the enumeration walks,
   |C| + |B| estimates per row); objectives as in 2.
4. staircase + joint objectives: memory as in 3; quality and time as one table over every objective knob
   (finetuning type, rank, targets, cutoff_len, batch, checkpointing, accumulation, max_samples, epochs).

Each prints the time of its epsilon-constraint loop (3 solves per front point, one worker) and checks its front
against brute force. Run: python benchmarks/cpsat_encodings.py [problem.yaml]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimizer.memory.terms import memoized
from optimizer.search.brute import solve_brute
from optimizer.search.cpsat import SolveStats, _Factored, epsilon_front, solve_cpsat, solve_factored
from optimizer.search.factored import KNOBS, Table, _points, _quality_tables, _time_tables, candidate, factor
from optimizer.search.objectives import point_objectives
from optimizer.search.problem import load_problem
from optimizer.search.space import _staircase, build_instance, micro_ms, opt_ms

ROOT = Path(__file__).resolve().parents[1]
OUTER = ("finetuning_type", "lora_rank", "lora_target", "gradient_checkpointing", "flash_attn", "optim",
         "enable_liger_kernel")
OBJECTIVE_KNOBS = ("finetuning_type", "lora_rank", "lora_target", "cutoff_len", "per_device_train_batch_size",
                   "gradient_checkpointing", "gradient_accumulation_steps", "max_samples", "num_train_epochs")


def staircases(inst, sizes: dict, classes: list[bool]) -> dict[tuple, dict[int, int]]:
    """(outer setting indices, accumulation class) -> cutoff index -> largest fitting batch position (sorted), -1."""
    d = inst.domains
    cutoffs = sorted(range(len(d["cutoff_len"])), key=lambda i: d["cutoff_len"][i])
    batches = sorted(d["per_device_train_batch_size"])
    out = {}
    with memoized(inst.terms):
        for idx in _points(inst, OUTER, sizes):
            knobs = {k: d[k][i] for k, i in zip(OUTER, idx)}
            if knobs["finetuning_type"] == "full":
                knobs["lora_rank"] = knobs["lora_target"] = None
            for ci, later in enumerate(classes):
                accum = min(a for a in d["gradient_accumulation_steps"] if (a > 1) == later)
                covered = [-1] * len(cutoffs)  # space._staircase raises it to each cutoff's largest fitting batch
                _staircase(inst, knobs, [d["cutoff_len"][c] for c in cutoffs], batches, accum, covered)
                out[idx + (ci,)] = dict(zip(cutoffs, covered))
    return out


class Staircase(_Factored):
    """Encodings 3 (joint=False) and 4 (joint=True); one-hots, rows, objectives and the key as in _Factored."""

    def __init__(self, inst, joint: bool) -> None:
        d = inst.domains
        classes = sorted({a > 1 for a in d["gradient_accumulation_steps"]})
        sizes = {k: len(d[k]) for k in KNOBS} | {"accumulating": len(classes)}
        t = time.perf_counter()
        stairs = staircases(inst, sizes, classes)
        self.stairs_s = time.perf_counter() - t
        self.knobs(sizes, lambda i: classes.index(d["gradient_accumulation_steps"][i] > 1))
        m = self.cp
        batches = sorted(d["per_device_train_batch_size"])
        rank = sum(batches.index(b) * v for b, v in zip(d["per_device_train_batch_size"],
                                                         self.x["per_device_train_batch_size"]))
        for key, y in self.rows(OUTER + ("accumulating",), stairs.keys()).items():
            row = stairs[key]
            if max(row.values()) < 0:
                m.add(y == 0)
            elif min(row.values()) < len(batches) - 1:
                m.add(rank <= sum(j * self.x["cutoff_len"][c] for c, j in row.items())).only_enforce_if(y)
        if not joint:
            times = _time_tables(inst, sizes)
            self.objectives(_quality_tables(inst, sizes), times["compute_ms"], times["step_ms"])
            return
        q, s = {}, {}
        for idx in _points(inst, OBJECTIVE_KNOBS, sizes):
            v = {k: d[k][i] for k, i in zip(OBJECTIVE_KNOBS, idx)}
            ft = v["finetuning_type"]
            r, tg = (None, None) if ft == "full" else (v["lora_rank"], v["lora_target"])
            cand = candidate(inst, v, micro_ms(inst, ft, r, tg, v["cutoff_len"], v["per_device_train_batch_size"],
                                               v["gradient_checkpointing"]), opt_ms(inst, ft, r, tg))
            q[idx], s[idx] = point_objectives(inst, cand, v["gradient_accumulation_steps"], v["max_samples"],
                                              v["num_train_epochs"])
        self.quality = m.new_int_var(min(q.values()), max(q.values()), "quality")
        m.add(self.quality == self.value(Table("quality", OBJECTIVE_KNOBS, q)))
        self.time = m.new_int_var(0, max(s.values()), "time")
        m.add(self.time == self.value(Table("time", OBJECTIVE_KNOBS, s)))


def main(path: Path) -> None:
    problem, base = load_problem(path)
    t = time.perf_counter()
    inst = build_instance(problem, base)
    build = time.perf_counter() - t
    oracle = [p[:2] for p in solve_brute(inst)]
    t = time.perf_counter()
    default = [p[:2] for p in solve_cpsat(inst)]
    print(f"{path.name}: front {len(oracle)} points")
    print(f"  1 default (enumerated feasible points): build {build:.2f} s ({inst.evaluated} estimates), CP-SAT "
          f"{time.perf_counter() - t:.2f} s, equal to brute: {default == oracle}")
    t = time.perf_counter()
    fac = factor(build_instance(problem, base, enumerate_settings=False))
    tables = time.perf_counter() - t
    t = time.perf_counter()
    factored = [p[:2] for p in solve_factored(fac)]
    print(f"  2 factored tables: tables {tables:.2f} s ({fac.evaluations} step_moments), CP-SAT "
          f"{time.perf_counter() - t:.2f} s, equal to brute: {factored == oracle}")
    for n, joint in ((3, False), (4, True)):
        inst = build_instance(problem, base, enumerate_settings=False)
        t = time.perf_counter()
        model = Staircase(inst, joint)
        built = time.perf_counter() - t
        t = time.perf_counter()
        front = [(q, tt) for q, tt, _ in epsilon_front(model, SolveStats())]
        print(f"  {n} staircase + {'joint' if joint else 'factored'} objectives: staircase {model.stairs_s:.2f} s "
              f"({inst.evaluated} estimates), model {built - model.stairs_s:.2f} s, CP-SAT "
              f"{time.perf_counter() - t:.2f} s in {3 * len(front) + 1} solves, equal to brute: {front == oracle}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "problems/qwen2.5-3b-rtx5060ti-16gb.yaml")
