"""Solver speed: each shipped problem, a 20-model x 10-GPU batch, and CP-SAT vs brute force on growing spaces.

Run: python benchmarks/solve.py [--quick]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimizer.models.catalog import gpus, models
from optimizer.search.batch import expand, run_batch
from optimizer.search.brute import solve_brute
from optimizer.search.cpsat import solve_cpsat
from optimizer.search.problem import DatasetSpec, DatasetSummary, Problem, SearchSpace, load_problem
from optimizer.search.solve import solve_problem
from optimizer.search.space import build_instance

ROOT = Path(__file__).resolve().parents[1]


def shipped() -> None:
    print("shipped problems (model tables + CP-SAT front):")
    for f in sorted((ROOT / "problems").glob("*.yaml")):
        problem, base = load_problem(f)
        t = time.perf_counter()
        res = solve_problem(problem, base)
        print(f"  {f.name:36s} {time.perf_counter() - t:6.2f} s  front {len(res.front):3d}  plans evaluated {res.evaluated_plans}")


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
    print("CP-SAT vs brute force on growing spaces (same instance tables; time after the tables are built):")
    data = DatasetSpec(summary=DatasetSummary(num_samples=2000, token_length_percentiles={50: 400, 90: 1500, 100: 4000}))
    ladders = [
        dict(lora_rank=[8], lora_target=["all"], cutoff_len=[512, 1024], per_device_train_batch_size=[1, 2],
             gradient_accumulation_steps=[1, 8], finetuning_type=["lora"], optim=["adamw_torch_fused"],
             enable_liger_kernel=[False], gradient_checkpointing=[True]),
        dict(lora_rank=[8, 16], lora_target=["mlp", "all"], cutoff_len=[256, 512, 1024, 2048],
             per_device_train_batch_size=[1, 2, 4], gradient_accumulation_steps=[1, 4, 16], finetuning_type=["lora", "qlora4"]),
        dict(),  # the default search space
        dict(lora_rank=[4, 8, 16, 32, 64, 128], cutoff_len=[128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096],
             per_device_train_batch_size=[1, 2, 4, 8, 16], gradient_accumulation_steps=[1, 2, 4, 8, 16, 32],
             max_samples=[None, 500, 1000], finetuning_type=["lora", "qlora4", "qlora8"],
             optim=["adamw_torch", "adamw_torch_fused", "adamw_8bit"]),
    ]
    print(f"  {'points':>10s} {'feasible':>9s} {'front':>6s} {'brute s':>8s} {'cpsat s':>8s} {'ratio':>7s} equal")
    for space in ladders:
        p = Problem(name="g", model="meta-llama/Llama-3.1-8B-Instruct", gpu="rtx-4090", dataset=data,
                    search=SearchSpace(**space))
        inst = build_instance(p)
        d = inst.domains
        points = len(inst.combos) * len(d["gradient_accumulation_steps"]) * len(d["max_samples"])
        total = 1
        for _k, v in d.items():
            total *= len(v)
        t = time.perf_counter()
        fb = solve_brute(inst)
        tb = time.perf_counter() - t
        t = time.perf_counter()
        fc = solve_cpsat(inst)
        tc = time.perf_counter() - t
        same = [x[:3] for x in fb] == [x[:3] for x in fc]
        print(f"  {total:10,d} {points:9,d} {len(fc):6d} {tb:8.3f} {tc:8.3f} {tc / max(tb, 1e-9):6.1f}x {same}")


if __name__ == "__main__":
    shipped()
    growing()
    if "--quick" in sys.argv:
        batch(4, 3)
    else:
        batch(20, 10)
