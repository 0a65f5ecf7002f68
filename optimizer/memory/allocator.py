"""Beyond tensors: cuBLAS workspaces, the caching allocator's segments, the CUDA context."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

from ..schema import Arch, Moment, Plan
from ..units import MIB, alloc_bytes, round_up
from .precision import FP32, Setting, setting_for

# ---------------------------------------------------------------------------------------------------
# Beyond tensors: workspaces, allocator, CUDA context
# ---------------------------------------------------------------------------------------------------

# [S] torch aten/src/ATen/cuda/CublasHandlePool.cpp::getChosenWorkspaceSize: default
# CUBLAS_WORKSPACE_CONFIG ":4096:2:16:8" = 2 x 4096 KiB + 8 x 16 KiB = 8,519,680 B per (handle, stream),
# allocated through the caching allocator (so it shows in memory_allocated). Handles are per thread, and
# the autograd engine runs backward on its own device thread: one workspace for forward, one for backward.
CUBLAS_WORKSPACE_BYTES = 8_519_680
# [S] pytorch/pytorch#86509: CUDA context of a process with lazy module loading (PyTorch >= 1.13 sets
# CUDA_MODULE_LOADING=LAZY): 287,047,680 B measured with nvidia-smi. Not counted by torch's allocator.
CUDA_CONTEXT_BYTES = 287_047_680
# [S] c10/cuda/CUDACachingAllocator.cpp: requests > 1 MiB (kSmallSize) come from large segments;
# requests under 10 MiB (kMinLargeAlloc) share 20 MiB segments (kLargeBuffer), larger ones are rounded up
# to 2 MiB (kRoundLarge) and get their own segment; small requests share 2 MiB segments (kSmallBuffer).
ROUND_LARGE = 2 * MIB
LARGE_BUFFER = 20 * MIB


def reserved_bytes(peak_allocated: int, large_blocks: list[int]) -> int:
    """Predicted max_memory_reserved: the peak's big blocks rounded up to 2 MiB, plus one 20 MiB segment for
    the 1-10 MiB pool and one 2 MiB small segment, plus the blocks freed-but-cached from the phase before
    the peak (the caching allocator keeps them; a later bigger request cannot reuse smaller free blocks).
    The segment rules are [S] CUDACachingAllocator constants; the free-but-cached part is bounded here by the
    largest single block, which is what a request sequence like the CE backward (same-size fp32 [N, V]
    blocks) leaves. Not calibrated on a GPU yet (no GPU was available): treat it as a model, not a fact.
    """
    cal = _calibration.get()
    if cal is not None:
        return cal.reserved_bytes(peak_allocated)
    return round_up(peak_allocated + reserved_overhead(large_blocks), ROUND_LARGE)


def reserved_overhead(large_blocks: list[int]) -> int:
    """What `reserved_bytes` adds to the peak allocated bytes before its 2 MiB rounding (the sourced model):
    the big blocks' rounding, the 20 MiB and 2 MiB segments, the largest block freed-but-cached."""
    rounding = sum(round_up(b, ROUND_LARGE) - b for b in large_blocks if b > 10 * MIB)
    cached = max([b for b in large_blocks] + [0])
    return rounding + LARGE_BUFFER + ROUND_LARGE + cached


def allocated_limit(device_budget: int, managed: int = 0) -> int | None:
    """The largest `peak allocated + reserved_overhead(blocks)` whose device peak (`device_peak_for`) stays within
    `device_budget`: reserved = round_up(x, 2 MiB) <= budget - managed - context holds exactly when x <= that
    bound floored to 2 MiB. The search states the memory bound as sums against it (search/factored.py). None while
    a calibration profile is active (its reserved rule is not of this form)."""
    if _calibration.get() is not None:
        return None
    return (device_budget - managed - CUDA_CONTEXT_BYTES) // ROUND_LARGE * ROUND_LARGE


def large_blocks_at(arch: Arch, plan: Plan, moment: Moment, batch: int | None = None,
                    setting: Setting | None = None) -> list[int]:
    """The big tensors live at a moment's peak, for the allocator's rounding ([T] the trace's largest live
    tensors): the cross-entropy backward holds three fp32 [N, V] blocks (saved log-softmax and two
    gradients), the loss forward two fp32 [N, V] and the logits, evaluation the same as the loss; every
    other moment (a layer's forward or backward, the lm_head backward, the end of backward) is modelled by a
    layer's MLP factors ([N, I] in the compute dtype, three; a MoE layer's routed-row tensors); the optimizer step
    none beyond weights. `setting`: the plan's own setting_for, when the caller has it (not with `batch`)."""
    if plan.enable_liger_kernel or moment is Moment.OPTIMIZER_STEP:
        return []
    if setting is None or batch is not None:
        setting = setting_for(arch, plan if batch is None else plan.model_copy(
            update={"per_device_train_batch_size": batch}))
    st = setting
    nv4 = alloc_bytes(st.tokens * arch.vocab_size * FP32)
    if moment is Moment.CE_BACKWARD:
        return [nv4] * 3
    if moment in (Moment.LOSS_FORWARD, Moment.EVAL):
        return [nv4] * 2 + [alloc_bytes(st.tokens * arch.vocab_size * st.c)]
    if arch.is_moe:  # the routed rows S = N k: the experts' [S, 2I] gate_up output and two [S, H] (memory/moe.py)
        S = st.tokens * arch.num_experts_per_tok
        return [alloc_bytes(S * 2 * arch.moe_intermediate_size * st.c)] + [alloc_bytes(S * arch.hidden_size * st.c)] * 2
    return [alloc_bytes(st.tokens * arch.intermediate_size * st.c)] * 3


def device_peak_for(peak_allocated: int, large_blocks: list[int], managed: int = 0) -> int:
    """nvidia-smi's view of a phase: reserved (`reserved_bytes`) + CUDA managed memory (paged optimizer
    states) + the CUDA context."""
    cal = _calibration.get()
    context = CUDA_CONTEXT_BYTES if cal is None else cal.cuda_context_bytes
    return reserved_bytes(peak_allocated, large_blocks) + managed + context


# ---------------------------------------------------------------------------------------------------
# Calibration hook: a profile measured on one GPU (`trainfit calibrate`, optimizer/train/calibrate.py)
# replaces the two overheads above while it is active. Without one (the default) nothing changes.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AllocatorCalibration:
    """Measured overheads of one GPU: reserved - allocated = intercept + slope * allocated (a least-squares fit
    of torch.cuda.max_memory_reserved - max_memory_allocated over recorded runs), and the CUDA context
    (NVML device memory - max_memory_reserved)."""

    gpu: str
    reserved_intercept_bytes: int
    reserved_slope: float
    cuda_context_bytes: int

    def reserved_bytes(self, peak_allocated: int) -> int:
        overhead = max(0, round(self.reserved_intercept_bytes + self.reserved_slope * peak_allocated))
        return round_up(peak_allocated + overhead, ROUND_LARGE)


_calibration: ContextVar[AllocatorCalibration | None] = ContextVar("trainfit_allocator_calibration", default=None)


@contextmanager
def calibrated(cal: AllocatorCalibration | None) -> Iterator[None]:
    """Within the block, `reserved_bytes` and `device_peak_for` use `cal` (None: the sourced model)."""
    token = _calibration.set(cal)
    try:
        yield
    finally:
        _calibration.reset(token)


# Keep at least this share of the card free by default (estimate, check and solve use it alike).
# A planning margin, not a measured constant: it absorbs what the model leaves out (desktop/compositor
# memory on consumer cards, driver and library versions, allocator fragmentation beyond the model).
DEFAULT_MARGIN = 0.10

Verdict = Literal["fits", "fits_below_margin", "does_not_fit"]


def budget_bytes(gpu_total_bytes: int, margin: float = DEFAULT_MARGIN) -> int:
    """The device-peak bound: the GPU's memory less the margin, floored to whole bytes."""
    return math.floor(gpu_total_bytes * (1 - margin))


def fits(device_peak: int, gpu_total_bytes: int, margin: float = DEFAULT_MARGIN) -> Verdict:
    """The one verdict: fits (within the bound), fits below the margin (on the card, not within the bound), or
    does not fit."""
    if device_peak > gpu_total_bytes:
        return "does_not_fit"
    return "fits" if device_peak <= budget_bytes(gpu_total_bytes, margin) else "fits_below_margin"
