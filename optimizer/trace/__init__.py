"""The oracle: a real PyTorch training step of a LLaMA-Factory run, on fake tensors.

`run_trace` builds the model with transformers/PEFT/bitsandbytes exactly as LLaMA-Factory 0.9.5 prepares it,
allocates it as FakeTensors (shapes and dtypes, no data) on the CPU, and runs HF-Trainer training steps while
counting live storage bytes the way `torch.cuda.max_memory_allocated()` does (512-byte blocks).
`run_trace_extrapolated` runs two short models and extrapolates linearly in the number of layers.
`run_cuda` runs the same steps on a real GPU and reads torch's CUDA memory statistics.

torch, transformers, peft, accelerate and bitsandbytes are imported only when a run starts, so importing
this package works without the `trace` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .result import MOMENT_OF_SUB, TRACE_PHASES, TRACE_SUB_PHASES, TopTensor, TraceResult

if TYPE_CHECKING:
    from ..schema import Plan

__all__ = [
    "run_trace", "run_trace_extrapolated", "run_cuda",
    "TraceResult", "TopTensor", "TRACE_PHASES", "TRACE_SUB_PHASES", "MOMENT_OF_SUB",
]


def run_trace(config: dict[str, Any], plan: Plan, *, layers: int | None = None, steps: int = 2, top: int = 10,
              measure_step1: bool = False) -> TraceResult:
    """Trace `steps` training steps on fake tensors and report the last one (steady state from step 2 on).

    By default step 1 runs only its optimizer phase (gradients shaped as backward leaves them), which creates
    the optimizer state; its forward/backward peaks are then the measured step's minus that state
    (`step1_measured=False`). `measure_step1=True` runs step 1 in full.
    """
    from .run import run_fake

    return run_fake(config, plan, layers=layers, steps=steps, top=top, measure_step1=measure_step1)


def run_trace_extrapolated(config: dict[str, Any], plan: Plan, *, layers_a: int | None = None,
                           layers_b: int | None = None) -> TraceResult:
    """Trace with `layers_a` and `layers_b` decoder layers (default 1 and 2; 2 and 3 for DPO) and extrapolate every
    byte figure linearly to the config's num_hidden_layers (`extrapolated=True`).

    DPO: a 1-layer model's reference-forward peak is not on the line through deeper ones ([T] Mistral-7B QLoRA
    cutoff 1024: ref_fwd +146.8 MiB from 1 to 2 layers, +130.9 MiB from 2 to 3 and from 3 to 4), so DPO starts at 2."""
    from .run import run_extrapolated

    if layers_a is None or layers_b is None:
        layers_a, layers_b = (2, 3) if plan.pairwise else (1, 2)

    return run_extrapolated(config, plan, layers_a=layers_a, layers_b=layers_b)


def run_cuda(config: dict[str, Any], plan: Plan, *, layers: int | None = None, steps: int = 2) -> TraceResult:
    """Run the same training steps on the first CUDA GPU (random weights) and read its memory statistics."""
    from .run import run_real_cuda

    return run_real_cuda(config, plan, layers=layers, steps=steps)
