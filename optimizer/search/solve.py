"""Solve a problem: instance -> front (CP-SAT or brute force) -> solutions re-validated by the memory model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from ..distributed import DistSettings, per_gpu, validate
from ..errors import InfeasibleError
from ..memory import estimate
from ..schema import Plan
from ..units import GIB
from . import quality as qm
from .brute import non_dominated, solve_brute
from .cpsat import SolveStats, solve_cpsat
from .objectives import MEM_KNOBS, QUALITY_SCALE, TIME_UNIT_MS, FrontRow, eligible, passes, point_plan, recommend
from .perf import time_band
from .problem import Problem
from .space import Instance, build_instance, hparams_for, plan_fields, plan_for

__all__ = ["Solution", "SolveResult", "solve_problem", "PICKS"]

PICKS = ("best-quality", "fastest", "balanced")
# Literals of the CP-SAT model above which the output suggests --solver brute. Measured on 2 cores (Llama-3.1-8B on an
# RTX 4090, spaces of benchmarks/solve.py): 4,430 literals 0.8 s, 23,836 literals 3.7 s (brute force 0.07 s).
LITERALS_HINT = 20_000


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
    quality: float = Field(description="The quality score (search/quality.py; higher is better, differences below "
                           "its TIE_TOL are no difference).")
    quality_terms: dict[str, float] = Field(description="The score's terms by name (they add up to `quality`).")
    time_s: float = Field(description="Estimated training time for all epochs, seconds.")
    epoch_s: float = Field(description="Estimated time of one epoch, seconds.")
    num_train_epochs: float = Field(description="Epochs (searched, the problem's, or the recipe's for the data "
                                    "size).")
    optimizer_steps: int = Field(description="Optimizer steps of the whole run (transformers' count).")
    kept_token_share: float = Field(description="Share of the supervised (response) tokens kept at cutoff_len.")
    supervised_tokens: int = Field(description="Supervised tokens trained on per epoch (samples used x kept share).")
    hparams: dict[str, float | int | bool] = Field(description="Recipe hyperparameters the emitted config carries.")
    hparam_sources: dict[str, str] = Field(description="Where each value of `hparams` comes from.")
    labels: list[str] = Field(default_factory=list, description="best-quality, fastest, balanced.")
    num_gpus: int = Field(default=1, description="GPUs of this point (a problem with a cluster).")
    nodes: int = Field(default=1, description="Machines of this point.")
    engine: str | None = Field(default=None, description="Multi-GPU engine (None on one GPU).")
    offload: str | None = Field(default=None, description="none, optimizer or params (None on one GPU).")
    host_peak_bytes: int | None = Field(default=None, description="Host RAM per node at its worst (several GPUs).")

    @model_serializer(mode="wrap")
    def _drop_single(self, handler):
        """One GPU: the multi-GPU fields are left out, so single-GPU output is what it was before clusters."""
        out = handler(self)
        if self.engine is None:
            for k in ("num_gpus", "nodes", "engine", "offload", "host_peak_bytes"):
                out.pop(k, None)
        return out


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
    recommended: int = Field(description="Index of the recommended point in `front` (objective.prefer).")
    why: str = Field(description="Why the recommended point: the rule and what it gives up (objectives.recommend).")
    num_train_epochs: float = Field(description="Epochs of the recommended point (each point has its own, "
                                    "front[i].num_train_epochs: they differ where search.num_train_epochs lists "
                                    "several values).")
    searched_epochs: list[float] = Field(description="The num_train_epochs values searched (one unless "
                                         "search.num_train_epochs lists several).")
    epochs_source: str = Field(description="Where the epochs come from.")
    max_hours: float | None = Field(description="The time budget of the problem, if any.")
    prefer: str = Field(description="The problem's preference: quality, balanced or speed.")
    data_lengths: list[int] | None = Field(description="Measured tokens per sample (prompt + response), sorted; None "
                                           "when the problem gives a summary instead of a data file.")
    cutoff_coverage: dict[int, float] = Field(description="cutoff_len -> share of supervised (response) tokens kept.")
    evaluated_plans: int
    num_samples: int = Field(description="Training samples of the data (given or measured).")
    solve_s: float | None = Field(default=None, description="Wall seconds of the solve; only with `--timings` (it "
                                  "differs every run, and the output is otherwise byte-identical).")
    notes: list[str]

    @property
    def several_epochs(self) -> bool:
        """search.num_train_epochs listed several values: each front point has its own (tables and names show it)."""
        return len(self.searched_epochs) > 1


def _infeasible(inst: Instance) -> InfeasibleError:
    peak, knobs = inst.min_peak or (0, ())
    k = dict(knobs)
    desc = ", ".join(f"{name}={k[name]}" for name in MEM_KNOBS if name in k and k[name] is not None)
    host = ""
    if inst.host_limited:
        host = (f"Host RAM per node ({inst.problem.cluster.host_ram_gib:g} GiB) also ruled plans out: give "
                "cluster.host_ram_gib more, or search less offload. ")
    seen = (f"the smallest device peak is {peak / GIB:.2f} GiB ({desc})" if inst.min_peak is not None
            else "no plan the engines can run")
    if inst.arch.vision is not None:  # qlora is not modelled for a vision-language model (space._domains)
        relax = "fewer or smaller images (dataset.images_per_sample, dataset.image_max_pixels: each image's tokens " \
                "and the vision tower's saved activations scale with its pixels), smaller cutoff_len and batch 1"
    else:
        relax = "allow qlora4, smaller cutoff_len and batch 1"
    return InfeasibleError(
        f"no plan of the search space fits {inst.gpu.name}: {seen} and the bound is "
        f"{inst.budget_bytes / GIB:.2f} GiB ({inst.problem.margin:.0%} margin). {host}"
        f"Relax: {relax}, gradient checkpointing and the liger kernel, lower the margin, or pick a bigger GPU or a "
        "smaller model."
    )


def _instances(problem: Problem, base: Path | None) -> list[Instance]:
    """One instance per (GPU count, engine, offload) of the cluster (one GPU: the plain single-GPU instance)."""
    cl = problem.cluster
    if cl is None:
        return [build_instance(problem, base)]
    out = []
    for n in cl.gpu_count_values():
        if n == 1:
            out.append(build_instance(problem, base))
            continue
        for engine in cl.engines:
            for off in cl.offload:
                dist = DistSettings(engine=engine, num_gpus=n, nodes=cl.nodes, offload=off,
                                    host_ram_gib=cl.host_ram_gib)
                try:
                    validate(dist, Plan())
                except Exception:  # an engine/offload pair LLaMA-Factory cannot run: not a point of the space
                    continue
                out.append(build_instance(problem, base, dist))
    return out


def _solution(inst: Instance, q: int, t: int, pos: int, accum: int, samples,
              epochs: float) -> tuple[Solution, FrontRow]:
    total_tokens = inst.context["supervised_tokens_total"]
    c = inst.combos[pos]
    knobs = {**c.knobs(), "gradient_accumulation_steps": accum, "max_samples": samples}
    ft = c.finetuning_type
    point = point_plan(inst, c, accum, samples, epochs)
    steps = point["optimizer_steps"]
    h = hparams_for(inst, ft, c.lora_rank, steps)
    src = h.pop("sources")
    hp = {"learning_rate": float(f"{h['learning_rate']:.2g}"), "num_train_epochs": epochs,
          "warmup_steps": qm.warmup_steps(steps, h["warmup_ratio"]), "max_grad_norm": h["max_grad_norm"]}
    hsrc = {"learning_rate": src["learning_rate"], "num_train_epochs": inst.epochs_source,
            "warmup_steps": f"ceil({h['warmup_ratio']} x {steps} optimizer steps); " + src["warmup_ratio"],
            "max_grad_norm": src["max_grad_norm"]}
    if ft != "full":
        for k in ("lora_alpha", "use_rslora", "lora_dropout"):
            hp[k], hsrc[k] = h[k], src[k]
    plan = plan_for(inst.arch, inst.gpu, knobs, {**plan_fields(inst, ft, c.lora_rank), "num_train_epochs": epochs})
    est = estimate(inst.arch, plan)
    allocated, device, multi = est.peak_allocated_bytes, est.device_peak_bytes, {}
    if inst.dist is not None:
        d = per_gpu(inst.arch, plan, inst.dist, est)
        allocated, device = d.peak_allocated_bytes, d.device_peak_bytes
        multi = {"num_gpus": d.num_gpus, "nodes": d.nodes, "engine": d.engine, "offload": d.offload,
                 "host_peak_bytes": d.host_peak_bytes}
    if device > inst.budget_bytes:  # re-validation against the memory model
        raise AssertionError(f"solver returned an infeasible plan: {knobs}")  # pragma: no cover
    n = inst.samples_used[samples]
    tokens = round(total_tokens * n / inst.summary.num_samples * point["kept_token_share"])
    time_s = t * TIME_UNIT_MS / 1000
    terms = {k: round(v, 4) for k, v in qm.quality_terms(point, inst.context).items()}
    sol = Solution(
        **knobs, plan=plan, peak_allocated_bytes=allocated, device_peak_bytes=device,
        headroom_bytes=inst.gpu.memory_bytes - device, quality=q / QUALITY_SCALE,
        quality_terms=terms, time_s=time_s, epoch_s=round(time_s / epochs, 1), num_train_epochs=epochs,
        optimizer_steps=steps, kept_token_share=round(point["kept_token_share"], 4), supervised_tokens=tokens,
        hparams=hp, hparam_sources=hsrc, **multi,
    )
    return sol, FrontRow(quality=q / QUALITY_SCALE, time_s=time_s, supervised_tokens=tokens, optimizer_steps=steps,
                         epochs=epochs)


def solve_problem(problem: Problem, base: Path | None = None, method: str = "cpsat",
                  timings: bool = False) -> SolveResult:
    """The front of the problem. With a cluster: one exact solve per (GPU count, engine, offload), the fronts merged
    by brute.non_dominated (exact: the front of a union is the front of the union of the fronts); ties go to the
    fewest GPUs, then the cluster's engine and offload order."""
    t0 = time.perf_counter()
    insts = _instances(problem, base)
    stats = SolveStats()
    merged = []
    for ii, inst in enumerate(insts):
        if not inst.combos:
            continue
        raw = solve_cpsat(inst, stats) if method == "cpsat" else solve_brute(inst)
        merged += [(q, t, (ii,) + key, (ii, pl)) for q, t, key, pl in raw]
    if not merged:
        worst = min(insts, key=lambda i: i.min_peak[0] if i.min_peak else 1 << 62)
        worst.host_limited = any(i.host_limited for i in insts)  # the message names every bound that bit
        raise _infeasible(worst)
    raw = non_dominated(merged) if len(insts) > 1 else [(q, t, k[1:], p) for q, t, k, p in merged]
    front: list[Solution] = []
    rows: list[FrontRow] = []
    for q, t, _key, (ii, (pos, accum, samples, epochs)) in raw:
        sol, row = _solution(insts[ii], q, t, pos, accum, samples, epochs)
        front.append(sol)
        rows.append(row)
    inst = insts[0]
    obj = problem.objective
    max_s = obj.max_hours * 3600 if obj.max_hours else None
    rec = recommend(rows, max_s=max_s, prefer="balanced" if obj.prefer == "fewest_gpus" else obj.prefer)
    rec_index, reason = rec.index, rec.reason
    if obj.prefer == "fewest_gpus":
        rec_index, reason = _fewest_gpus(front, rows, rec, max_s)
    labels: dict[int, list[str]] = {}
    for i, label in ((0, "best-quality"), (len(front) - 1, "fastest"), (rec.balanced, "balanced")):
        labels.setdefault(i, []).append(label)  # a one-point front carries all three
    front = [s.model_copy(update={"labels": labels.get(i, [])}) for i, s in enumerate(front)]
    r = front[rec_index]
    ebs = r.per_device_train_batch_size * r.gradient_accumulation_steps * r.num_gpus
    why = f"{reason}. {_accumulation_reason(r, ebs)}"
    notes = list(inst.notes)
    if method == "cpsat" and stats.literals > LITERALS_HINT:
        notes.append(f"CP-SAT held {stats.literals:,} literals (objective groups x accumulation x max_samples x "
                     f"epochs); above {LITERALS_HINT:,} it takes seconds: pin dimensions, or pass --solver brute (the "
                     "same front, checked by the tests; measured: 23,836 literals, CP-SAT 3.7 s, brute force 0.07 s)")
    if problem.cluster is not None:
        notes.append(f"cluster: {len(insts)} settings of GPU count x engine x offload solved, fronts merged")
    return SolveResult(
        problem=problem.name, model=inst.arch.name, gpu=inst.gpu.id, gpu_total_bytes=inst.gpu.memory_bytes,
        budget_bytes=inst.budget_bytes, margin=problem.margin, method=method, proven_optimal=stats.proven,
        front=front, recommended=rec_index, why=why, num_train_epochs=r.num_train_epochs,
        searched_epochs=inst.domains["num_train_epochs"], epochs_source=inst.epochs_source,
        max_hours=obj.max_hours, prefer=obj.prefer, data_lengths=list(inst.lengths) if inst.lengths else None,
        cutoff_coverage={c: round(v, 4) for c, v in sorted(inst.coverage.items())},
        evaluated_plans=sum(i.evaluated for i in insts), num_samples=inst.summary.num_samples,
        solve_s=round(time.perf_counter() - t0, 3) if timings else None, notes=notes + [time_band(inst.gpu)],
    )


def _fewest_gpus(front: list[Solution], rows: list[FrontRow], rec, max_s: float | None) -> tuple[int, str]:
    """prefer fewest_gpus: among the points balanced would consider (within the time budget, passing the rule
    against the best point there: objectives.eligible, and within the score's resolution quality.TIE_TOL of it), the
    one with the fewest GPUs (ties: the fastest)."""
    got = eligible(rows, max_s)
    if got is None:
        return rec.index, rec.reason
    a, passing = got
    anchor = rows[a]
    close = [i for i in passing if rows[i].quality >= anchor.quality - qm.TIE_TOL]
    pick = min(close, key=lambda i: (front[i].num_gpus, rows[i].time_s))
    why = (f"fewest_gpus: {front[pick].num_gpus} GPU(s), the fewest of the points scoring within the score's "
           f"resolution {qm.TIE_TOL} of the best ({anchor.quality - rows[pick].quality:.3f} lower)")
    if pick != a:
        why += f"; it {passes(rows[pick], anchor)[1]}"
    return pick, why


def _accumulation_reason(s: Solution, ebs: int) -> str:
    """Why this accumulation: the effective batch and step count against the quality model's evidence."""
    gpus = f" x {s.num_gpus} GPUs" if s.num_gpus > 1 else ""
    head = (f"Accumulation {s.gradient_accumulation_steps}: effective batch {s.per_device_train_batch_size} x "
            f"{s.gradient_accumulation_steps}{gpus} = {ebs}, {s.optimizer_steps} optimizer steps")
    if ebs > qm.BATCH_OK:
        return head + f" (above {qm.BATCH_OK}: the large-batch penalty is paid for speed)"
    band = f"{qm.BATCH_LOW}-{qm.BATCH_OK}"
    if ebs < qm.BATCH_LOW:
        return head + (f" (below the recipes' {band}: a larger one would leave fewer than {qm.MIN_STEPS} steps "
                       "or cost time; the score counts both)")
    if s.optimizer_steps < qm.MIN_STEPS:
        return head + f" (fewer than {qm.MIN_STEPS}; the small data allows no more in the {band} band)"
    return head + (f": in the {band} band the recipes use (QLoRA 16; TRL's LoRA guide < 32, Schulman et al. "
                   f"2025) with >= {qm.MIN_STEPS} optimizer steps")
