"""The same training steps on a real device: random weights, torch's CUDA memory statistics.

Sub-phase peaks come from `torch.cuda.max_memory_allocated()` read and reset at every sub-phase change, so
they line up one to one with the fake trace's. `run_on_device` also runs on the CPU (no memory statistics:
all byte figures are 0), which lets the real-tensor code path be tested without a GPU.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ..schema import Plan
from .build import BuiltModel, build_model, count_parameters, tied_groups
from .result import TraceResult
from .tracker import StepStats
from .trainer import TrainerStep

__all__ = ["run_on_device", "CudaProbe", "materialize_real"]


class CudaProbe:
    """Sub-phase peaks from the CUDA caching allocator's statistics (zeros on a CPU device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.steps: dict[int, StepStats] = {}
        self.step = 0
        self.sub = "setup"
        self.peak_reserved = 0
        self.device_used = 0

    def _allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else 0

    def _close(self) -> None:
        st = self.steps.get(self.step)
        if st is None or not self.cuda:
            return
        peak = torch.cuda.max_memory_allocated(self.device)
        self.peak_reserved = max(self.peak_reserved, torch.cuda.max_memory_reserved(self.device))
        free, total = torch.cuda.mem_get_info(self.device)
        self.device_used = max(self.device_used, total - free)
        st.sub_peaks[self.sub] = max(st.sub_peaks.get(self.sub, 0), peak)
        if peak > st.peak_bytes:
            st.peak_bytes = peak
            st.peak_sub_phase = self.sub
        torch.cuda.reset_peak_memory_stats(self.device)

    def begin_step(self, step: int) -> None:
        self.step = step
        start = self._allocated()
        self.steps[step] = StepStats(start_bytes=start, peak_bytes=start)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sub = "fwd"

    def set_sub_phase(self, name: str) -> None:
        self._close()
        self.sub = name

    def end_step(self) -> StepStats:
        self._close()
        st = self.steps[self.step]
        st.end_bytes = self._allocated()
        self.sub = "setup"
        return st


def _init_values(model: nn.Module, skip: set[int]) -> None:
    """Plausible random values: no NaN/inf, so an fp16 GradScaler does not skip the optimizer step."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in skip or not p.is_floating_point():
                continue
            if p.ndim == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                p.normal_(0.0, 0.02)
        for module in model.modules():
            inv = getattr(module, "inv_freq", None)
            if isinstance(inv, torch.Tensor) and hasattr(module, "config"):
                dim = inv.numel() * 2
                base = 10000.0
                rope = getattr(module.config, "rope_parameters", None) or {}
                base = float(rope.get("rope_theta", getattr(module.config, "rope_theta", base)))
                fresh = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=inv.device) / dim))
                inv.copy_(fresh.to(inv.dtype))
                orig = getattr(module, "original_inv_freq", None)
                if isinstance(orig, torch.Tensor):
                    orig.copy_(fresh.to(orig.dtype))


def materialize_real(built: BuiltModel, plan: Plan, device: torch.device) -> None:
    model = built.model
    groups = tied_groups(model)
    for _, module in built.bnb4 + built.bnb8:
        module._parameters["weight"] = None
    model.to_empty(device=device)
    for names in groups:
        p = model.get_parameter(names[0])
        for other in names[1:]:
            parent_name, _, leaf = other.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, p)
    _init_values(model, skip=set())
    if built.bnb4 or built.bnb8:
        import bitsandbytes as bnb

        for _, module in built.bnb4:
            w = torch.randn(module.out_features, module.in_features, dtype=built.model_dtype, device=device) * 0.02
            module.weight = bnb.nn.Params4bit(
                w, requires_grad=False, quant_type=plan.quantization_type, blocksize=64,
                compress_statistics=plan.double_quantization, quant_storage=built.compute_dtype, module=module,
            ).to(device)
            del w
        for _, module in built.bnb8:
            # Int8Params quantizes when moved from the CPU (as transformers loads it)
            w = torch.randn(module.out_features, module.in_features, dtype=torch.float16) * 0.02
            module.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to(device)
            del w
    built.param_names = {id(p): n for n, p in model.named_parameters()}


def run_on_device(config: dict[str, Any], plan: Plan, *, layers: int | None, steps: int,
                  device: torch.device) -> TraceResult:
    from .patches import quiet_library_warnings
    from .run import _measured_fields, versions

    t0 = time.perf_counter()
    with quiet_library_warnings():
        built = build_model(config, plan, layers=layers)
        materialize_real(built, plan, device)
    trainable, total = count_parameters(built.model)
    probe = CudaProbe(device)
    if probe.cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    load = probe._allocated()
    trainer = TrainerStep(built, plan, probe, device, real_scaler=True)
    stats: dict[int, StepStats] = {}
    try:
        for i in range(1, steps + 1):
            stats[i] = trainer.step(i)
    finally:
        trainer.close()
    if probe.cuda:
        torch.cuda.synchronize(device)
    measured = stats[steps]
    sub = dict(measured.sub_peaks)
    name = torch.cuda.get_device_name(device) if probe.cuda else str(device)
    notes = list(built.notes) + [
        f"Real run on {name} with random weights: max_memory_allocated read and reset at every sub-phase change.",
        "nvml_used_bytes is device-wide used memory (torch.cuda.mem_get_info), CUDA context and other processes "
        "included.",
    ]
    return TraceResult(
        **_measured_fields(built, plan, measured, sub),
        device=name,
        step1_peak_bytes=stats[1].peak_bytes,
        step1_measured=True,
        load_bytes=load,
        trainable_params=trainable,
        all_params=total,
        notes=notes,
        wall_s=round(time.perf_counter() - t0, 3),
        versions=versions(),
        peak_reserved_bytes=probe.peak_reserved if probe.cuda else None,
        nvml_used_bytes=probe.device_used if probe.cuda else None,
    )
