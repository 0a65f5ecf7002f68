"""The two objectives of a point of the search space, in the integers both solvers read. PURE.

A point is (candidate, gradient_accumulation_steps, max_samples): a `Candidate` is one memory-feasible setting of
the memory knobs (built by `space`), and accumulation and max_samples do not change memory. CP-SAT (`cpsat`) and
the exhaustive oracle (`brute`) both call `point_objectives`, so they optimize the same numbers by construction.

- quality: the documented score of `quality.py`, scaled by QUALITY_SCALE and rounded to an integer once here.
- time: micro-batches x t_micro + optimizer steps x t_opt (perf.py), in whole seconds (TIME_UNIT_MS), ceil.
- steps: transformers' count of optimizer steps, the one formula the emitted warmup_steps also uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .quality import QUANT_PENALTY, RANK_MAX, TARGET_SCORE, QualityWeights

if TYPE_CHECKING:
    from .space import Instance

__all__ = ["Candidate", "MEM_KNOBS", "QUALITY_SCALE", "TIME_UNIT_MS", "micro_batches", "optimizer_steps",
           "candidate_quality", "samples_quality", "batch_penalty", "point_objectives", "point_time"]

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
    quality: int  # scaled quality terms of the memory knobs (target, rank, cutoff, quantization)
    micro_ms: int  # one micro-batch, ms (ceil)
    opt_ms: int  # one optimizer step, ms (ceil)

    def knobs(self) -> dict:
        """The memory knobs by name."""
        return {k: getattr(self, k) for k in MEM_KNOBS}


def micro_batches(epochs: float, samples: int, batch: int) -> int:
    """Micro-batches of a run: ceil(epochs * ceil(samples / batch))."""
    return math.ceil(epochs * math.ceil(samples / batch))


def optimizer_steps(epochs: float, samples: int, batch: int, accumulation: int) -> int:
    """Optimizer steps as transformers' Trainer counts them (one device): ceil(epochs * ceil(ceil(n / b) / a))."""
    return math.ceil(epochs * math.ceil(math.ceil(samples / batch) / accumulation))


def candidate_quality(w: QualityWeights, knobs: dict, coverage_share: float) -> int:
    """Scaled w_target*T + w_rank*R + w_cutoff*C - w_quant*P of quality.py (the memory knobs' terms)."""
    ft = knobs["finetuning_type"]
    full = ft == "full"
    t = 1.0 if full else TARGET_SCORE[knobs["lora_target"]]
    r = 1.0 if full else min(1.0, math.log2(knobs["lora_rank"]) / math.log2(RANK_MAX))
    return round(QUALITY_SCALE * (w.target * t + w.rank * r + w.cutoff * coverage_share - w.quant * QUANT_PENALTY[ft]))


def samples_quality(w: QualityWeights, used: int, total: int) -> int:
    """Scaled w_samples*S, S = log(1 + n) / log(1 + N)."""
    return round(QUALITY_SCALE * w.samples * math.log1p(used) / math.log1p(total))


def batch_penalty(w: QualityWeights, effective_batch: int) -> int:
    """Scaled w_batch*B, B = 0 up to 32, then log2(ebs/32)/2, at most 1."""
    pen = 0.0 if effective_batch <= 32 else min(1.0, math.log2(effective_batch / 32) / 2)
    return round(QUALITY_SCALE * w.batch * pen)


def point_time(inst: Instance, c: Candidate, accumulation: int, samples: int | None) -> int:
    """Training time in whole seconds (ceil): the objective's resolution, so sub-second differences tie and the
    tie-break decides."""
    epochs = inst.problem.objective.num_train_epochs
    n, b = inst.samples_used[samples], c.per_device_train_batch_size
    ms = micro_batches(epochs, n, b) * c.micro_ms + optimizer_steps(epochs, n, b, accumulation) * c.opt_ms
    return -(-ms // TIME_UNIT_MS)


def point_objectives(inst: Instance, c: Candidate, accumulation: int, samples: int | None) -> tuple[int, int]:
    """(scaled quality, time units) of one point of the search space."""
    b = c.per_device_train_batch_size
    q = c.quality + inst.samples_quality[samples] - inst.batch_penalty[(b, accumulation)]
    return q, point_time(inst, c, accumulation, samples)
