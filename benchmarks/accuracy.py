"""The memory model against the oracle: `trainfit estimate` vs `trainfit trace` over the accuracy grid.

Run: python benchmarks/accuracy.py [--full] [--single]   (--single: skip the multi-GPU rows)   (needs the trace extra)

Each config is traced with 1 and 2 decoder layers and extrapolated linearly to the model's depth (per-layer
terms are exactly linear; tests/test_trace.py checks the extrapolation against direct runs); `--full` traces
the whole depth instead (slower). Peak allocated is compared; the estimate's cuBLAS workspaces, which a CPU
trace cannot see, are left out of the comparison.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from optimizer.memory import CUBLAS_WORKSPACE_BYTES, estimate  # noqa: E402
from optimizer.models.catalog import resolve_arch, resolve_config  # noqa: E402
from optimizer.schema import Plan  # noqa: E402
from optimizer.trace import run_trace, run_trace_extrapolated  # noqa: E402
from optimizer.trace.grid import ERROR_BOUND, GRID  # noqa: E402

GIB = 2**30


def compare(model: str, plan: Plan, full: bool = False) -> tuple[int, int, str]:
    cfg = resolve_config(model)
    trace = run_trace(cfg, plan) if full else run_trace_extrapolated(cfg, plan)
    est = estimate(resolve_arch(model), plan).peak_allocated_bytes - 2 * CUBLAS_WORKSPACE_BYTES
    return est, trace.peak_allocated_bytes, f"{trace.peak_phase}/{trace.peak_sub_phase}"


def _label(plan: Plan) -> str:
    default = Plan().model_dump()
    return json.dumps({k: v for k, v in plan.model_dump().items() if k not in default or v != default[k]},
                      separators=(",", ":"))


def main() -> None:
    """The single-GPU grid, then (unless --single) the multi-GPU rows of benchmarks/accuracy_multi.py."""
    full = "--full" in sys.argv
    errs = []
    t0 = time.perf_counter()
    print(f"{'#':>2s} {'model':30s} {'config':96s} {'estimate':>9s} {'trace':>9s} {'error':>7s}  trace peak")
    for i, (model, plan) in enumerate(GRID):
        est, tr, where = compare(model, plan, full)
        err = (est - tr) / tr
        errs.append(abs(err))
        print(f"{i:2d} {model:30s} {_label(plan)[:96]:96s} "
              f"{est / GIB:8.3f}G {tr / GIB:8.3f}G {100 * err:+6.2f}%  {where}",
              flush=True)
    print(f"{len(errs)} configs, {len({m for m, _ in GRID})} architectures: median |error| "
          f"{100 * statistics.median(errs):.2f}%, max {100 * max(errs):.2f}% (bound {100 * ERROR_BOUND:.1f}%), "
          f"{time.perf_counter() - t0:.0f} s")
    if "--single" not in sys.argv:
        print("\nmulti-GPU (per-GPU estimate vs the FSDP2 rank oracle):", flush=True)
        import accuracy_multi

        accuracy_multi.main()


if __name__ == "__main__":
    main()
