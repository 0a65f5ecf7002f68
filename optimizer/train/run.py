"""`trainfit train`: check the config, run LLaMA-Factory's own training in-process with a measuring callback,
compare predicted with measured, and append a record to the calibration log.

`preflight` is light (no torch, no LLaMA-Factory): the CLI stops with exit 3 on its verdict before
`run_training` imports anything heavy.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..check import CheckReport, check
from ..errors import ConfigError
from ..llamafactory.read import plan_from_dict, read_yaml
from ..memory import count_params, estimate, large_blocks_at
from ..models import catalog
from ..schema import Arch, GpuSpec, Plan
from .record import Measured, Predicted, Record, config_hash, versions

__all__ = ["Preflight", "preflight", "detect_gpu", "run_training", "predicted_step_s", "train_text"]


@dataclass
class Preflight:
    config: str
    data: dict[str, Any]
    plan: Plan
    arch: Arch
    gpu: GpuSpec | None
    report: CheckReport | None
    note: str = ""


def detect_gpu() -> tuple[GpuSpec | None, str]:
    """The catalog entry of GPU 0 by its NVML name (no torch, no CUDA context); (None, why) otherwise."""
    try:
        import pynvml

        pynvml.nvmlInit()
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        name = name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return None, ("no GPU found through NVML (pynvml missing or no driver): memory check skipped, training on "
                      "the CPU")
    key = name.lower().replace("nvidia ", "")
    for spec in catalog.gpus().values():
        if spec.name.lower().replace("nvidia ", "") in key:
            return spec, f"GPU 0 is {name}: checked as {spec.id}"
    raise ConfigError(f"GPU 0 is {name!r}, which the catalog does not list. Pass --gpu with the closest catalog id "
                      "(see `trainfit gpus`).")


def preflight(config: str, gpu_id: str | None, margin: float, model: str | None = None) -> Preflight:
    data = read_yaml(config)
    plan, yaml_model = plan_from_dict(dict(data), config)
    name = model or yaml_model
    if not name:
        raise ConfigError(f"{config}: no model_name_or_path. Set it (a catalog id or a model folder).")
    arch = catalog.resolve_arch(name)
    note = ""
    if gpu_id:
        spec = catalog.get_gpu(gpu_id)
    else:
        spec, note = detect_gpu()
    report = check(data, plan, arch, spec, margin=margin, config_path=config) if spec else None
    return Preflight(config=config, data=dict(data), plan=plan, arch=arch, gpu=spec, report=report, note=note)


def _time_kind(plan: Plan) -> str:
    if plan.finetuning_type == "full":
        return "full"
    return {4: "qlora4", 8: "qlora8"}.get(plan.quantization_bit or 0, "lora")


def predicted_step_s(arch: Arch, plan: Plan, gpu: GpuSpec, seq_len: int) -> float:
    """search.perf's time of one optimizer step: accumulation x micro-batch time + the optimizer step."""
    from ..search.perf import micro_batch_seconds, optimizer_step_seconds

    trainable, _ = count_params(arch, plan)
    micro = micro_batch_seconds(arch, gpu, finetuning_type=_time_kind(plan), gc=not plan.disable_gradient_checkpointing,
                                batch=plan.per_device_train_batch_size, seq_len=seq_len,
                                lora_params=0 if plan.finetuning_type == "full" else trainable,
                                pairwise=plan.pairwise, reference=plan.use_ref_model)
    return plan.gradient_accumulation_steps * micro + optimizer_step_seconds(trainable, gpu)


def _predicted(pre: Preflight, seq_len: int | None) -> Predicted:
    est = estimate(pre.arch, pre.plan)  # the sourced model (no calibration active here): what calibrate fits against
    kind = {"loss": "loss", "optimizer": "optimizer"}.get(est.peak_phase, next(
        p.moment for p in est.phases if p.phase == est.peak_phase))
    step_s = predicted_step_s(pre.arch, pre.plan, pre.gpu, seq_len or pre.plan.cutoff_len) if pre.gpu else None
    return Predicted(peak_allocated_bytes=est.peak_allocated_bytes, peak_reserved_bytes=est.peak_reserved_bytes,
                     device_peak_bytes=est.device_peak_bytes,
                     large_blocks_bytes=large_blocks_at(pre.arch, pre.plan, kind), step_s=step_s)


def run_training(pre: Preflight, *, max_steps: int | None = None) -> Record:
    """Train with LLaMA-Factory (`llamafactory.train.tuner.run_exp`) and measure; returns the record."""
    try:
        from llamafactory.train.tuner import run_exp
    except ImportError as exc:
        raise ConfigError(f"LLaMA-Factory is not importable here ({exc}). Install it: pip install llamafactory==0.9.5 "
                          "(in its own virtual environment: it pins transformers<=5.6).") from None
    import torch

    from .callback import MeasureCallback, NvmlProcessMemory

    args = dict(pre.data)
    args.setdefault("include_num_input_tokens_seen", "all")  # the callback's token count; no memory effect
    if max_steps:
        args["max_steps"] = max_steps
    cuda = torch.cuda.is_available()
    cb = MeasureCallback(NvmlProcessMemory() if cuda else None)
    run_exp(args=args, callbacks=[cb])
    steps = cb.steps
    if not steps:
        raise ConfigError(f"{pre.config}: LLaMA-Factory ran no training step. Check dataset, max_samples and "
                          "max_steps.")
    timed = steps[1:] if len(steps) > 1 else steps
    tok = [s.tokens for s in timed if s.tokens]
    tokens_per_s = sum(tok) / sum(s.step_s for s in timed if s.tokens) if tok else None
    micro = pre.plan.per_device_train_batch_size * pre.plan.gradient_accumulation_steps
    seq_len = round(statistics.fmean(tok) / micro) if tok else None

    def peak(field: str) -> int | None:
        vals = [getattr(s, field) for s in steps if getattr(s, field) is not None]
        return max(vals) if vals else None

    loss = cb.losses[-1] if cb.losses else None
    measured = Measured(peak_allocated_bytes=peak("allocated_bytes"), peak_reserved_bytes=peak("reserved_bytes"),
                        device_peak_bytes=peak("device_bytes"), step_s=statistics.median(s.step_s for s in timed),
                        tokens_per_s=tokens_per_s, loss=loss if loss is not None and math.isfinite(loss) else None)
    return Record(schema="trainfit.calibration/1", time=datetime.now(UTC).isoformat(timespec="seconds"),
                  config=str(Path(pre.config)), config_hash=config_hash(args), model=pre.arch.name,
                  gpu=pre.gpu.id if pre.gpu else None,
                  device_name=torch.cuda.get_device_name() if cuda else "cpu", versions=versions(),
                  plan=pre.plan.model_dump(mode="json"), steps=len(steps), predicted=_predicted(pre, seq_len),
                  measured=measured, per_step=steps)


def train_text(rec: Record, log: str) -> str:
    """Predicted vs measured, for people."""
    mib = 2 ** 20

    def row(name: str, p: float | None, m: float | None, unit: str, scale: float) -> str:
        cpu_time = unit == "s" and rec.device_name == "cpu"  # a CPU run against a GPU prediction: no error
        fmt = ",.2f" if unit == "MiB" else ".4f"
        ps = f"{p / scale:{fmt}} {unit}" if p is not None else "-"
        ms = f"{m / scale:{fmt}} {unit}" if m is not None else "- (no CUDA)" if unit == "MiB" else "-"
        err = f"{(p - m) / m:+.1%}" if p is not None and m and not cpu_time else ""
        return f"  {name:<16} {ps:>16} {ms:>16} {err:>8}"

    p, m = rec.predicted, rec.measured
    lines = [f"trained {rec.steps} step(s) of {rec.config} on {rec.device_name}"
             + (f" (predictions for {rec.gpu})" if rec.gpu else ""),
             f"  {'':<16} {'predicted':>16} {'measured':>16} {'error':>8}",
             row("peak allocated", p.peak_allocated_bytes, m.peak_allocated_bytes, "MiB", mib),
             row("peak reserved", p.peak_reserved_bytes, m.peak_reserved_bytes, "MiB", mib),
             row("device peak", p.device_peak_bytes, m.device_peak_bytes, "MiB", mib),
             row("step time", p.step_s, m.step_s, "s", 1.0)]
    for name, v in (("forward+backward", "forward_backward_s"), ("optimizer", "optimizer_s")):
        vals = [getattr(s, v) for s in rec.per_step[1:] or rec.per_step if getattr(s, v) is not None]
        if vals:
            lines.append(f"  {name + ' (measured)':<33} {statistics.median(vals):>13.4f} s")
    if m.tokens_per_s:
        lines.append(f"  tokens/s (measured): {m.tokens_per_s:,.0f}")
    if m.loss is not None:
        lines.append(f"  last loss: {m.loss:.4f}")
    lines.append(f"appended to {log} (fit it with `trainfit calibrate {log}`)")
    return "\n".join(lines)
