"""Solve a problem: instance -> front (CP-SAT or brute force) -> solutions re-validated by the memory model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InfeasibleError
from ..memory import estimate
from ..schema import Plan
from ..units import GIB
from .brute import solve_brute
from .cpsat import SolveStats, solve_cpsat
from .objectives import MEM_KNOBS, QUALITY_SCALE, TIME_UNIT_MS
from .perf import time_band
from .problem import Problem
from .space import Instance, build_instance, plan_for

__all__ = ["Solution", "SolveResult", "solve_problem", "PICKS"]

PICKS = ("best-quality", "fastest", "balanced")


class Solution(BaseModel):
    """One point of the front: the plan, what the memory model says about it, and its objective values."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    finetuning_type: str = Field(description="lora, qlora4, qlora8 or full.")
    lora_rank: int | None = Field(description="LoRA rank (None for full).")
    lora_target: str | None = Field(description="attention, mlp or all (None for full).")
    cutoff_len: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    max_samples: int | None
    gradient_checkpointing: bool
    flash_attn: str
    optim: str
    enable_liger_kernel: bool
    plan: Plan = Field(description="The LLaMA-Factory keys of this point.")
    peak_allocated_bytes: int = Field(description="Predicted max_memory_allocated.")
    device_peak_bytes: int = Field(description="Predicted nvidia-smi peak.")
    headroom_bytes: int = Field(description="GPU total minus the device peak.")
    quality: float = Field(description="The quality score (0-1, higher is better).")
    time_s: float = Field(description="Estimated training time for all epochs, seconds.")
    epoch_s: float = Field(description="Estimated time of one epoch, seconds.")
    labels: list[str] = Field(default_factory=list, description="best-quality, fastest, balanced.")


class SolveResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    problem: str
    model: str
    gpu: str
    gpu_total_bytes: int
    budget_bytes: int = Field(description="Device-peak bound: GPU total x (1 - margin).")
    margin: float
    method: Literal["cpsat", "brute"]
    proven_optimal: bool
    front: list[Solution]
    recommended: int = Field(description="Index of the recommended (balanced) point in `front`.")
    why: str
    evaluated_plans: int
    num_samples: int = Field(description="Training samples of the data (given or measured).")
    solve_s: float
    notes: list[str]


def _balanced(front: list[tuple[int, int]]) -> int:
    """The knee: maximize (Q - Qmin)/(Qmax - Qmin) - (T - Tmin)/(Tmax - Tmin); ties -> higher quality."""
    qs = [q for q, _ in front]
    ts = [t for _, t in front]
    qr = (max(qs) - min(qs)) or 1
    tr = (max(ts) - min(ts)) or 1
    scores = [((q - min(qs)) / qr - (t - min(ts)) / tr, q) for q, t in front]
    return max(range(len(front)), key=lambda i: scores[i])


def _infeasible(inst: Instance) -> InfeasibleError:
    peak, knobs = inst.min_peak or (0, ())
    k = dict(knobs)
    desc = ", ".join(f"{name}={k[name]}" for name in MEM_KNOBS if name in k and k[name] is not None)
    return InfeasibleError(
        f"no plan of the search space fits {inst.gpu.name}: the smallest device peak is {peak / GIB:.2f} GiB "
        f"({desc}) and the bound is {inst.budget_bytes / GIB:.2f} GiB ({inst.problem.margin:.0%} margin). "
        "Relax: allow qlora4, smaller cutoff_len and batch 1, gradient checkpointing and the liger kernel, "
        "lower the margin, or pick a bigger GPU or a smaller model."
    )


def solve_problem(problem: Problem, base: Path | None = None, method: str = "cpsat") -> SolveResult:
    t0 = time.perf_counter()
    inst = build_instance(problem, base)
    if not inst.combos:
        raise _infeasible(inst)
    stats = SolveStats()
    raw = solve_cpsat(inst, stats) if method == "cpsat" else solve_brute(inst)
    if not raw:
        raise _infeasible(inst)
    front: list[Solution] = []
    for q, t, _key, (pos, accum, samples) in raw:
        c = inst.combos[pos]
        knobs = c.knobs()
        knobs["gradient_accumulation_steps"] = accum
        knobs["max_samples"] = samples
        plan = plan_for(inst.arch, inst.gpu, knobs)
        est = estimate(inst.arch, plan)
        if est.device_peak_bytes > inst.budget_bytes:  # re-validation against the memory model
            raise AssertionError(f"solver returned an infeasible plan: {knobs}")  # pragma: no cover
        front.append(Solution(
            **knobs, plan=plan, peak_allocated_bytes=est.peak_allocated_bytes, device_peak_bytes=est.device_peak_bytes,
            headroom_bytes=inst.gpu.memory_bytes - est.device_peak_bytes, quality=q / QUALITY_SCALE, time_s=t * TIME_UNIT_MS / 1000,
            epoch_s=round(t * TIME_UNIT_MS / 1000 / problem.objective.num_train_epochs, 1),
        ))
    rec = _balanced([(q, t) for q, t, _, _ in raw])
    labels: dict[int, list[str]] = {}
    for i, label in ((0, "best-quality"), (len(front) - 1, "fastest"), (rec, "balanced")):
        labels.setdefault(i, []).append(label)  # a one-point front carries all three
    front = [s.model_copy(update={"labels": labels.get(i, [])}) for i, s in enumerate(front)]
    why = ("balanced: the front point with the largest normalized quality gain minus normalized time cost "
           "(the knee of the quality/time front)")
    return SolveResult(
        problem=problem.name, model=inst.arch.name, gpu=inst.gpu.id, gpu_total_bytes=inst.gpu.memory_bytes,
        budget_bytes=inst.budget_bytes, margin=problem.margin, method=method, proven_optimal=stats.proven,
        front=front, recommended=rec, why=why, evaluated_plans=inst.evaluated, num_samples=inst.summary.num_samples,
        solve_s=round(time.perf_counter() - t0, 3), notes=inst.notes + [time_band(inst.gpu)],
    )
