"""Per-GPU estimate (optimizer.distributed.per_gpu) vs the FSDP2 rank oracle (optimizer.trace.distributed).

Run: .venv/bin/python benchmarks/accuracy_multi.py
Each row traces rank 0 of N on fake tensors with 1 and 2 decoder layers and extrapolates to the full depth, as the
single-GPU grid does. Peak allocated; the estimate's cuBLAS workspaces (invisible to a CPU trace) are left out.
"""

from __future__ import annotations

import sys
import time

from optimizer.distributed import DistSettings, per_gpu
from optimizer.memory import CUBLAS_WORKSPACE_BYTES
from optimizer.models import catalog
from optimizer.schema import Plan
from optimizer.trace.distributed import run_rank_extrapolated

_Q05, _L1, _Q3 = "Qwen/Qwen2.5-0.5B-Instruct", "meta-llama/Llama-3.2-1B-Instruct", "Qwen/Qwen3-0.6B"


def _p(**kw) -> Plan:
    base = {"bf16": True, "per_device_train_batch_size": 1}
    base.update(kw)
    return Plan(**base)


GRID_MULTI: list[tuple[str, Plan, int]] = [
    (_Q05, _p(cutoff_len=256), 2),
    (_Q05, _p(cutoff_len=256), 4),
    (_Q05, _p(cutoff_len=256), 8),
    (_Q05, _p(cutoff_len=1024, per_device_train_batch_size=2), 4),
    (_Q05, _p(cutoff_len=256, finetuning_type="full"), 4),
    (_L1, _p(cutoff_len=512), 4),
    (_Q3, _p(cutoff_len=512, disable_gradient_checkpointing=True), 2),
]


def main() -> int:
    worst = 0.0
    print(f"{'model':<34} {'plan':<34} {'N':>2} {'estimate MiB':>13} {'trace MiB':>10} {'error':>7}")
    for name, plan, n in GRID_MULTI:
        t0 = time.perf_counter()
        arch = catalog.resolve_arch(name)
        d = per_gpu(arch, plan, DistSettings(engine="fsdp2", num_gpus=n))
        est = d.peak_allocated_bytes - 2 * CUBLAS_WORKSPACE_BYTES
        tr = run_rank_extrapolated(catalog.resolve_config(name), plan, "fsdp2", n)["peak_allocated_bytes"]
        err = (est - tr) / tr
        worst = max(worst, abs(err))
        desc = f"{plan.finetuning_type} s{plan.cutoff_len} b{plan.per_device_train_batch_size}" + (
            " nogc" if plan.disable_gradient_checkpointing else "")
        print(f"{name:<34} {desc:<34} {n:>2} {est / 2**20:>13,.1f} {tr / 2**20:>10,.1f} {err:>+7.1%}"
              f"  ({time.perf_counter() - t0:.0f}s)")
    print(f"worst |error| {worst:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
