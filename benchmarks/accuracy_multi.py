"""Per-GPU estimate (optimizer.distributed.per_gpu) vs the FSDP2 rank oracle (optimizer.trace.distributed).

Run: .venv/bin/python benchmarks/accuracy_multi.py   (about a minute on a CPU)
Each row traces rank 0 of N on fake tensors with 1 and 2 decoder layers and extrapolates to the full depth, as the
single-GPU grid does. Peak allocated; the estimate's cuBLAS workspaces (invisible to a CPU trace) are left out.
tests/test_distributed.py (slow) asserts every row within 2%.
"""

from __future__ import annotations

import sys
import time

from optimizer.distributed import DistSettings, per_gpu
from optimizer.memory import CUBLAS_WORKSPACE_BYTES
from optimizer.models import catalog
from optimizer.schema import Plan
from optimizer.trace.distributed import GRID_MULTI, UNTRACED_ENGINES, run_rank_extrapolated


def row(name: str, plan: Plan, n: int, engine: str = "fsdp2") -> tuple[int, int]:
    """(estimate, trace) peak allocated bytes of rank 0."""
    arch = catalog.resolve_arch(name)
    d = per_gpu(arch, plan, DistSettings(engine=engine, num_gpus=n))
    est = d.peak_allocated_bytes - 2 * CUBLAS_WORKSPACE_BYTES
    tr = run_rank_extrapolated(catalog.resolve_config(name), plan, engine, n)["peak_allocated_bytes"]
    return est, tr


def describe(plan: Plan) -> str:
    return (f"{plan.finetuning_type} s{plan.cutoff_len} b{plan.per_device_train_batch_size}"
            + (f" ga{plan.gradient_accumulation_steps}" if plan.gradient_accumulation_steps > 1 else "")
            + (" nogc" if plan.disable_gradient_checkpointing else ""))


def main() -> int:
    worst = 0.0
    print(f"{'model':<36} {'plan':<24} {'engine':<6} {'N':>2} {'estimate MiB':>13} {'trace MiB':>10} {'error':>7}")
    for name, plan, n in GRID_MULTI:
        t0 = time.perf_counter()
        est, tr = row(name, plan, n)
        err = (est - tr) / tr
        worst = max(worst, abs(err))
        print(f"{name:<36} {describe(plan):<24} {'fsdp2':<6} {n:>2} {est / 2**20:>13,.1f} {tr / 2**20:>10,.1f} "
              f"{err:>+7.1%}  ({time.perf_counter() - t0:.0f}s)")
    print(f"{len(GRID_MULTI)} configs, worst |error| {worst:.1%}")
    for eng, why in UNTRACED_ENGINES.items():
        print(f"not traced: {eng}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
