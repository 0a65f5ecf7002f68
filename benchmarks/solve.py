"""Solver speed: each shipped problem, a 20-model x 10-GPU batch, and CP-SAT vs brute force on growing spaces.

Run: python benchmarks/solve.py [--quick]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimizer.errors import ProblemError
from optimizer.models.catalog import gpus, models
from optimizer.search.batch import expand, run_batch
from optimizer.search.brute import solve_brute
from optimizer.search.cpsat import solve_cpsat
from optimizer.search.problem import DatasetSpec, DatasetSummary, Problem, SearchSpace, load_problem
from optimizer.search.solve import solve_problem
from optimizer.search.space import build_instance, space_size

ROOT = Path(__file__).resolve().parents[1]


def shipped() -> None:
    print("shipped problems (model tables + CP-SAT front):")
    for f in sorted((ROOT / "problems").glob("*.yaml")):
        problem, base = load_problem(f)
        t = time.perf_counter()
        res = solve_problem(problem, base)
        dt = time.perf_counter() - t
        ev = build_instance(problem, base).terms.evaluations
        print(f"  {f.name:36s} {dt:6.2f} s  layer walks {ev['layer']:4d} heads {ev['head']:4d}  "
              f"front {len(res.front):3d}  plans evaluated {res.evaluated_plans}")


def batch(n_models: int, n_gpus: int) -> None:
    problem, base = load_problem(ROOT / "problems/qwen2.5-7b-rtx3060-12gb.yaml")
    ms = [m for m in models() if not m.startswith("google/gemma-3")][:n_models]
    gs = list(gpus())[:n_gpus]
    items = expand([("x", problem, base)], ms, gs)
    t = time.perf_counter()
    results = run_batch(items, "cpsat")
    dt = time.perf_counter() - t
    ok = sum(1 for r in results if r[3] is not None)
    print(f"batch {n_models} models x {n_gpus} GPUs = {len(items)} problems: {dt:.1f} s "
          f"({dt / len(items):.2f} s each on {__import__('os').cpu_count()} CPUs), {ok} feasible")


def growing() -> None:
    """Spaces from ~10^4 to ~10^9 plans: size, memory-model work (estimates and component evaluations,
    memory/terms.py), CP-SAT and brute-force time (brute skipped above 10^7 points), or the up-front refusal."""
    print("scaling (Llama-3.1-8B on an RTX 4090; times after the tables are built):")
    data = DatasetSpec(summary=DatasetSummary(num_samples=2000,
                                              token_length_percentiles={50: 400, 90: 1500, 100: 4000}))
    wide = dict(lora_rank=[4, 8, 16, 32, 64, 128], cutoff_len=[128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096],
                per_device_train_batch_size=[1, 2, 4, 8, 16], gradient_accumulation_steps=[1, 2, 4, 8, 16, 32],
                max_samples=[None, 500, 1000], finetuning_type=["lora", "qlora4", "qlora8"],
                optim=["adamw_torch", "adamw_torch_fused", "adamw_8bit"])
    ladders = [
        dict(lora_rank=[8, 16], lora_target=["mlp", "all"], cutoff_len=[256, 512, 1024, 2048],
             per_device_train_batch_size=[1, 2, 4], gradient_accumulation_steps=[1, 4, 16],
             finetuning_type=["lora", "qlora4"]),
        dict(),  # the default search space
        wide,
        {**wide, "num_train_epochs": [1, 2, 3]},  # epochs searched: time and quality, not memory
        {**wide, "max_samples": [None, 250, 500, 1000, 1500], "flash_attn": ["auto", "sdpa", "disabled"],
         "finetuning_type": ["lora", "qlora4", "qlora8", "full"], "optim": ["adamw_torch", "adamw_torch_fused",
                                                                            "adamw_8bit", "paged_adamw_8bit"]},
        {**wide, "lora_rank": [2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256],
         "cutoff_len": list(range(128, 4097, 128)), "per_device_train_batch_size": list(range(1, 17)),
         "max_samples": [None, 100, 250, 500, 750, 1000, 1250, 1500, 1750, 1900],
         "flash_attn": ["auto", "sdpa", "disabled"], "finetuning_type": ["lora", "qlora4", "qlora8", "full"],
         "optim": ["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit"]},
    ]
    print(f"  {'plans':>13s} {'settings':>9s} {'estimates':>9s} {'walks':>6s} {'heads':>6s} {'build s':>8s} "
          f"{'front':>5s} {'brute s':>8s} {'cpsat s':>8s} equal")
    for space in ladders:
        p = Problem(name="g", model="meta-llama/Llama-3.1-8B-Instruct", gpu="rtx-4090", dataset=data,
                    search=SearchSpace(**space))
        total = 1
        for v in SearchSpace(**space).model_dump().values():
            total *= len(v) if v is not None else 1  # num_train_epochs None: one value (the recipe's)
        t = time.perf_counter()
        try:
            inst = build_instance(p)
        except ProblemError as exc:
            print(f"  {total:13,d} refused up front in {time.perf_counter() - t:.2f} s: {exc}")
            continue
        tbuild = time.perf_counter() - t
        settings, points = space_size(inst.domains)
        ev = inst.terms.evaluations
        t = time.perf_counter()
        fc = solve_cpsat(inst)
        tc = time.perf_counter() - t
        if points <= 10**7:
            t = time.perf_counter()
            fb = solve_brute(inst)
            tb = f"{time.perf_counter() - t:8.3f}"
            same = str([x[:3] for x in fb] == [x[:3] for x in fc])
        else:
            tb, same = f"{'-':>8s}", "-"
        print(f"  {total:13,d} {settings:9,d} {inst.evaluated:9,d} {ev['layer']:6,d} {ev['head']:6,d} {tbuild:8.2f} "
              f"{len(fc):5d} {tb} {tc:8.3f} {same}")


def factored_model() -> None:
    """The factored CP-SAT model (search/factored.py + cpsat.solve_factored: the memory model and the objectives as
    table constraints, no enumeration) against enumeration + brute force, on the reference problem."""
    from optimizer.search.cpsat import solve_factored
    from optimizer.search.factored import factor

    problem, base = load_problem(ROOT / "problems/qwen2.5-3b-rtx5060ti-16gb.yaml")
    t = time.perf_counter()
    fac = factor(build_instance(problem, base, enumerate_settings=False))
    tf = time.perf_counter() - t
    t = time.perf_counter()
    fr = solve_factored(fac)
    ts = time.perf_counter() - t
    t = time.perf_counter()
    inst = build_instance(problem, base)
    fb = solve_brute(inst)
    tb = time.perf_counter() - t
    same = [x[:3] for x in fr] == [x[:3] for x in fb]
    print(f"factored CP-SAT, reference problem: tables {tf:.2f} s ({fac.evaluations} step_moments calls), solve "
          f"{ts:.2f} s, front {len(fr)}; enumeration + brute force {tb:.2f} s ({inst.evaluated} estimates); "
          f"same front: {same}; factored / brute {(tf + ts) / tb:.1f}x")


if __name__ == "__main__":
    factored_model()
    shipped()
    growing()
    if "--quick" in sys.argv:
        batch(4, 3)
    else:
        batch(20, 10)
