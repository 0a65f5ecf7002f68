"""The measuring TrainerCallback (imports torch and transformers: only `run.run_training` imports this module).

Per optimizer step: torch.cuda.max_memory_allocated / max_memory_reserved (peak stats reset at on_step_begin),
this process's NVML memory (nvidia-smi's per-process figure; read at each callback: the caching allocator
keeps what it reserved, so the step's device peak is reached by on_step_end unless something empties the
cache), wall time per phase with a CUDA synchronize at each callback, and the step's input tokens
(`state.num_input_tokens_seen`, which `run_training` turns on).
Phases (transformers 5 Trainer._inner_training_loop): on_step_begin -> [micro-batches, on_substep_end between
them] -> on_pre_optimizer_step -> clip + optimizer.step -> on_optimizer_step -> scheduler, zero_grad ->
on_step_end.
"""

from __future__ import annotations

import os
import time

import torch
from transformers import TrainerCallback

from .record import StepRecord

__all__ = ["MeasureCallback", "NvmlProcessMemory"]


class NvmlProcessMemory:
    """This process's device memory as NVML reports it (pynvml, when installed and a GPU is visible): the
    per-process `usedGpuMemory`, or the device's used memory less what was used before training when the
    process table does not show this pid (containers with their own pid namespace)."""

    def __init__(self) -> None:
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
            index = int(visible) if visible.isdigit() else 0
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.baseline = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
        except Exception:  # no pynvml, no driver, no GPU: the device figure stays None
            self.handle = None

    def read(self) -> int | None:
        if self.handle is None:
            return None
        try:
            for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory:
                    return int(proc.usedGpuMemory)
            return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used - self.baseline)
        except Exception:
            return None


class MeasureCallback(TrainerCallback):
    def __init__(self, nvml: NvmlProcessMemory | None = None) -> None:
        self.cuda = torch.cuda.is_available()
        self.nvml = nvml
        self.steps: list[StepRecord] = []
        self.losses: list[float] = []
        self._t: dict[str, float] = {}
        self._tokens0 = 0
        self._device = 0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _sample_device(self) -> None:
        if self.nvml is not None:
            v = self.nvml.read()
            if v is not None:
                self._device = max(self._device, v)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._device = 0
        self._sample_device()
        self._t = {"begin": self._now()}
        self._tokens0 = int(getattr(state, "num_input_tokens_seen", 0) or 0)

    def on_substep_end(self, args, state, control, **kwargs):
        self._sample_device()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._t["pre_opt"] = self._now()
        self._sample_device()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._t["opt"] = self._now()
        self._sample_device()

    def on_step_end(self, args, state, control, **kwargs):
        end = self._now()
        self._sample_device()
        t = self._t
        begin = t.get("begin", end)
        pre, opt = t.get("pre_opt"), t.get("opt")
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0) - self._tokens0
        self.steps.append(StepRecord(
            step=int(state.global_step), step_s=end - begin,
            forward_backward_s=(pre - begin) if pre is not None else None,
            optimizer_s=(opt - pre) if pre is not None and opt is not None else None,
            other_s=(end - opt) if opt is not None else None,
            tokens=tokens if tokens > 0 else None,
            allocated_bytes=int(torch.cuda.max_memory_allocated()) if self.cuda else None,
            reserved_bytes=int(torch.cuda.max_memory_reserved()) if self.cuda else None,
            device_bytes=(self._device or None) if self.cuda else None,
        ))

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "train_loss"):
            v = (logs or {}).get(key)
            if isinstance(v, (int, float)):
                self.losses.append(float(v))
