"""The two objectives of a point of the search space, in the integers both solvers read, and the recommendation
rule over the front. PURE.

A point is (candidate, gradient_accumulation_steps, max_samples, num_train_epochs): a `Candidate` is one
memory-feasible setting of the memory knobs (built by `space`); accumulation, max_samples and epochs do not change
memory. CP-SAT (`cpsat`) and the
exhaustive oracle (`brute`) both call `point_objectives`, so they optimize the same numbers by construction.

- quality: `quality.quality_terms(plan, context)`, the evidence-based score (each term with its source in
  quality.py), each term scaled by QUALITY_SCALE and rounded to an integer, here (`quality_units`), then summed.
- time: micro-batches x t_micro + optimizer steps x t_opt (perf.py), in whole seconds (TIME_UNIT_MS), ceil.
- optimizer steps: transformers' count, the one formula the emitted warmup_steps also uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import quality as qm

if TYPE_CHECKING:
    from .space import Instance

__all__ = ["Candidate", "MEM_KNOBS", "QUALITY_SCALE", "TIME_UNIT_MS", "micro_batches", "optimizer_steps", "rows_used",
           "point_plan", "point_quality", "quality_units", "point_time", "point_objectives", "recommend",
           "Recommendation", "eligible", "passes"]

QUALITY_SCALE = 10_000
TIME_UNIT_MS = 1000
MEM_KNOBS = ("finetuning_type", "lora_rank", "lora_target", "cutoff_len", "per_device_train_batch_size",
             "gradient_checkpointing", "flash_attn", "optim", "enable_liger_kernel")


@dataclass(frozen=True)
class Candidate:
    """One memory-feasible setting of the memory knobs (MEM_KNOBS), with what the objectives need from it."""

    finetuning_type: str
    lora_rank: int | None  # None for full fine-tuning
    lora_target: str | None  # attention, mlp or all; None for full fine-tuning
    cutoff_len: int
    per_device_train_batch_size: int
    gradient_checkpointing: bool
    flash_attn: str
    optim: str
    enable_liger_kernel: bool
    index: tuple[int, ...]  # positions in the instance's domains, MEM_KNOBS order (the tie-break key)
    micro_ms: int  # one micro-batch, ms (ceil)
    opt_ms: int  # one optimizer step, ms (ceil)
    # memory depends on accumulation only through `gradient_accumulation_steps > 1` (the accumulated gradients are
    # live: memory/step.py), so a setting fits with accumulation 1, with every value > 1, or both. The instance keeps
    # a setting for a class only where it is the first of its memory-only knob values (space.MEMORY_ONLY, in the
    # search space's order) that fits: a later one has the same objectives and a larger key (space._settings).
    fits_single: bool = True
    fits_accumulated: bool = True

    def allows(self, accumulation: int) -> bool:
        """Is this memory setting kept at this accumulation (it fits there, and no earlier memory-only value
        does)?"""
        return self.fits_accumulated if accumulation > 1 else self.fits_single

    def knobs(self) -> dict:
        """The memory knobs by name."""
        return {k: getattr(self, k) for k in MEM_KNOBS}

    def signature(self) -> tuple:
        """What both objectives depend on: candidates with equal signatures score equally at every point."""
        return (self.finetuning_type, self.lora_rank, self.lora_target, self.cutoff_len,
                self.per_device_train_batch_size, self.micro_ms, self.opt_ms, self.fits_single, self.fits_accumulated)


def micro_batches(epochs: float, samples: int, batch: int) -> int:
    """Micro-batches of a run: ceil(epochs * ceil(samples / batch))."""
    return math.ceil(epochs * math.ceil(samples / batch))


def optimizer_steps(epochs: float, samples: int, batch: int, accumulation: int) -> int:
    """Optimizer steps as transformers' Trainer counts them (one device): ceil(epochs * ceil(ceil(n / b) / a))."""
    return math.ceil(epochs * math.ceil(math.ceil(samples / batch) / accumulation))


def point_plan(inst: Instance, c: Candidate, accumulation: int, samples: int | None, epochs: float) -> dict:
    """The plan dict `quality.quality` scores (its keys are documented there). With N GPUs (data parallel) the
    effective batch is the global one, b x accumulation x N, and each rank sees ceil(n / N) samples
    (torch DistributedSampler pads to a multiple of N), so the optimizer steps fall N-fold."""
    n, b, g = inst.samples_used[samples], c.per_device_train_batch_size, inst.num_gpus
    rows = rows_used(inst, c.cutoff_len, samples)  # packing: the trainer steps over packed rows
    return {"finetuning_type": c.finetuning_type, "lora_rank": c.lora_rank, "lora_target": c.lora_target,
            "effective_batch": b * accumulation * g, "num_train_epochs": epochs,
            "optimizer_steps": optimizer_steps(epochs, -(-rows // g), b, accumulation),
            "kept_token_share": inst.coverage[c.cutoff_len], "samples_used": n}


def quality_units(plan: dict, context: dict) -> dict[str, int]:
    """Each term of the score in integer units: round(QUALITY_SCALE * term). The objective is their sum, so it
    factors term by term (search/factored.py holds one table per term); the rounding is per term, at most half a
    unit each."""
    return {k: round(QUALITY_SCALE * v) for k, v in qm.quality_terms(plan, context).items()}


def point_quality(inst: Instance, c: Candidate, accumulation: int, samples: int | None, epochs: float) -> int:
    """The sum of `quality_units`, cached on the instance by what the score depends on."""
    key = (c.finetuning_type, c.lora_rank, c.lora_target, c.cutoff_len, c.per_device_train_batch_size,
           accumulation, samples, epochs)
    q = inst.quality_cache.get(key)
    if q is None:
        q = inst.quality_cache[key] = sum(quality_units(point_plan(inst, c, accumulation, samples, epochs),
                                                        inst.context).values())
    return q


def rows_used(inst: Instance, cutoff_len: int, samples: int | None) -> int:
    """Dataset rows the trainer iterates: the samples, or with packing the packed rows at this cutoff_len (LLaMA-
    Factory applies max_samples before packing: the rows of the whole set scaled to the samples kept, ceil)."""
    n = inst.samples_used[samples]
    rows = inst.packed_rows.get(cutoff_len)
    if rows is None:
        return n
    total = inst.summary.num_samples if inst.summary is not None else n
    return max(1, -(-rows * n // max(total, 1)))


def point_time(inst: Instance, c: Candidate, accumulation: int, samples: int | None, epochs: float) -> int:
    """Training time in whole seconds (ceil): the objective's resolution, so sub-second differences tie and the
    tie-break decides. With N GPUs each rank runs ceil(n / N) rows (samples, or packed rows); c.opt_ms includes the
    communication."""
    n, b = -(-rows_used(inst, c.cutoff_len, samples) // inst.num_gpus), c.per_device_train_batch_size
    ms = micro_batches(epochs, n, b) * c.micro_ms + optimizer_steps(epochs, n, b, accumulation) * c.opt_ms
    return -(-ms // TIME_UNIT_MS)


def point_objectives(inst: Instance, c: Candidate, accumulation: int, samples: int | None,
                     epochs: float) -> tuple[int, int]:
    """(scaled quality, time units) of one point of the search space."""
    return point_quality(inst, c, accumulation, samples, epochs), point_time(inst, c, accumulation, samples, epochs)


# --- the recommendation rule ------------------------------------------------------------------------------------
# POLICY, stated so it can be argued: a point that gives up more than MAX_TOKEN_LOSS of the supervised tokens (or of
# the optimizer steps) of the best-quality point within the time budget is recommended only if it saves a large
# time, both relative (>= MIN_SAVING_SHARE) and absolute (>= MIN_SAVING_S). Among the points that pass, `balanced`
# takes the fastest one whose score is within quality.TIE_TOL of that best point (the score's resolution: no known
# reason to expect a worse result), `quality` the best point itself, `speed` the fastest point that passes.
MAX_TOKEN_LOSS = 0.10
MIN_SAVING_SHARE = 0.20
MIN_SAVING_S = 15 * 60


@dataclass(frozen=True)
class FrontRow:
    """What the rule reads of a front point."""

    quality: float
    time_s: float
    supervised_tokens: float  # supervised tokens trained on per epoch
    optimizer_steps: int
    epochs: float


@dataclass(frozen=True)
class Recommendation:
    index: int  # the recommended point (by the problem's preference)
    balanced: int  # the point the balanced rule picks (the `balanced` label)
    reason: str


def passes(r: FrontRow, a: FrontRow) -> tuple[bool, str]:
    """May r be recommended instead of the anchor a? (verdict, what it gives up)"""
    lost_tok = 1 - r.supervised_tokens / a.supervised_tokens if a.supervised_tokens else 0.0
    lost_steps = 1 - r.optimizer_steps / a.optimizer_steps if a.optimizer_steps else 0.0
    saved = a.time_s - r.time_s
    gives_up = lost_tok > MAX_TOKEN_LOSS or lost_steps > MAX_TOKEN_LOSS
    big_saving = saved >= MIN_SAVING_S and saved >= MIN_SAVING_SHARE * a.time_s
    what = (f"keeps {1 - lost_tok:.0%} of the supervised tokens per epoch and {1 - lost_steps:.0%} of the optimizer "
            "steps of the best point" + (f", in {r.epochs:g} epochs instead of {a.epochs:g}" if r.epochs != a.epochs
                                         else ""))
    return (not gives_up or big_saving), what


def eligible(rows: list[FrontRow], max_s: float | None) -> tuple[int, list[int]] | None:
    """The rule's anchor (the best-quality point within the time budget) and the points within the budget that pass
    it against that anchor (`passes`), in front order; None when no point fits the budget."""
    budget = [i for i, r in enumerate(rows) if max_s is None or r.time_s <= max_s]
    if not budget:
        return None
    a = budget[0]
    return a, [i for i in budget if passes(rows[i], rows[a])[0]]


def recommend(rows: list[FrontRow], *, max_s: float | None = None, prefer: str = "balanced") -> Recommendation:
    """The recommended front point (rows in front order: quality descending, time descending) and why."""
    last = len(rows) - 1
    got = eligible(rows, max_s)
    if got is None:
        why = (f"no front point fits the time budget of {max_s / 3600:g} h: the fastest ({rows[last].time_s / 60:.0f} "
               "min) is recommended; raise objective.max_hours or shrink the data")
        return Recommendation(last, last, why)
    a, passing = got
    anchor = rows[a]
    close = [i for i in passing if rows[i].quality >= anchor.quality - qm.TIE_TOL]
    balanced = close[-1]
    pick = {"quality": a, "balanced": balanced, "speed": passing[-1]}[prefer]
    head = f"best score within the {max_s / 3600:g} h budget" if max_s is not None and a > 0 else "best score"
    if pick == a:
        why = f"{prefer}: the {head}"
        if a < last:
            faster = rows[a + 1]
            ok, what = passes(faster, anchor)
            if not ok:
                why += (f"; the next faster point saves only {(anchor.time_s - faster.time_s) / 60:.0f} min and "
                        f"{what}")
            else:
                why += (f"; the next faster point scores {anchor.quality - faster.quality:.3f} lower (more than the "
                        f"score's resolution {qm.TIE_TOL})")
    else:
        r = rows[pick]
        why = (f"{prefer}: {(anchor.time_s - r.time_s) / 60:.0f} min faster than the {head} (#{a + 1}), scoring "
               f"{anchor.quality - r.quality:.3f} lower" + (f" (within the score's resolution {qm.TIE_TOL})"
                                                            if prefer == "balanced" else ""))
        ok, what = passes(r, anchor)
        why += f"; it {what}"
    why += (f" (rule: a point giving up > {MAX_TOKEN_LOSS:.0%} of supervised tokens or optimizer steps must save "
            f">= {MIN_SAVING_SHARE:.0%} and >= {MIN_SAVING_S // 60} min)")
    return Recommendation(pick, balanced, why)
