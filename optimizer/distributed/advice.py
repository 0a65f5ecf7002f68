"""Why a multi-GPU run does (not) fit, and the smallest multi-GPU change that does. PURE: per_gpu in, words out.

Used by `trainfit check CONFIG --num-gpus N --engine E` (optimizer/check.py::check_multi). The rules that stop
LLaMA-Factory before training are [S] hiyouga/LLaMA-Factory src/llamafactory/model/model_utils/quantization.py
(commit ff6d4d12): "DeepSpeed ZeRO-3 or FSDP is incompatible with PTQ-quantized models" (GPTQ, AWQ, AQLM, ...),
"Only 4-bit quantized model can use fsdp+qlora", "HQQ/EETQ quantization is incompatible with DeepSpeed ZeRO-3 or
FSDP", and `bnb_4bit_quant_storage=model_args.compute_dtype  # crucial for fsdp+qlora`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError
from ..memory.allocator import budget_bytes, fits
from ..schema import Arch, GpuSpec, Plan
from ..units import GIB, MIB
from .engines import DEEPSPEED, SHARDS_PARAMS, DistSettings
from .memory import DistEstimate, per_gpu

__all__ = ["MultiGpuAdvice", "MultiFix", "advise", "dist_from_deepspeed_json", "screen_config", "PTQ_MARKERS"]

# Pre-quantized (PTQ) checkpoints carry a quantization_config; their repo names say which (HF hub convention).
PTQ_MARKERS = ("gptq", "awq", "aqlm", "bitnet", "hqq", "eetq", "exl2")

# Cost of each multi-GPU change (policy, like check.FIX_COSTS; lower = less disruptive): the engine is a launcher
# setting (same math), offload slows the step, more GPUs cost money.
MULTI_FIX_COSTS = {"engine": 1, "offload_optimizer": 2, "offload_params": 3, "double_gpus": 4}


class MultiFix(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    change: str = Field(description="The change in words, as flags.")
    cost: int = Field(description="Sum of MULTI_FIX_COSTS of its parts.")
    device_peak_bytes: int = Field(description="Per-GPU device peak after the change.")
    host_peak_bytes: int = Field(description="Host RAM per node after the change.")


class MultiGpuAdvice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    engine: str
    num_gpus: int
    nodes: int
    offload: str
    verdict: str = Field(description="fits | fits_below_margin | does_not_fit (per GPU and host RAM).")
    device_peak_bytes: int = Field(description="Per-GPU device peak.")
    single_gpu_device_peak_bytes: int = Field(description="The same plan on one GPU.")
    host_peak_bytes: int
    host_ram_bytes: int | None
    host_short: bool = Field(description="Host RAM per node is below what the run needs.")
    explanations: list[str] = Field(description="Why the per-GPU number is what it is, in words.")
    fix: MultiFix | None
    fix_note: str = ""


def screen_config(data: dict[str, Any], model_name: str, dist: DistSettings) -> None:
    """What LLaMA-Factory refuses before training under ZeRO-3/FSDP, as one ConfigError (nothing when fine)."""
    if dist.engine not in SHARDS_PARAMS:
        return
    how = "Use --engine ddp or zero2, or the 16-bit model with quantization_bit 4 (QLoRA) under --engine fsdp"
    low = model_name.lower()
    marker = next((m for m in PTQ_MARKERS if m in low), None)
    if marker:
        raise ConfigError(f"{model_name} is a {marker.upper()}-quantized checkpoint and {dist.engine} shards "
                          "parameters: LLaMA-Factory stops with 'DeepSpeed ZeRO-3 or FSDP is incompatible with "
                          f"PTQ-quantized models'. {how}.")
    method = str(data.get("quantization_method", "bnb")).lower()
    if data.get("quantization_bit") is not None and method in ("hqq", "eetq"):
        raise ConfigError(f"quantization_method {method} with {dist.engine}: LLaMA-Factory stops with "
                          f"'{method.upper()} quantization is incompatible with DeepSpeed ZeRO-3 or FSDP'. {how}.")


def dist_from_deepspeed_json(path: str, config_path: str, num_gpus: int, nodes: int) -> DistSettings | None:
    """The engine, offload and bucket sizes of a DeepSpeed JSON named by the YAML's `deepspeed:` key, or None when
    the file cannot be read. HF TrainingArguments opens the path as given (relative to the launch folder); the
    YAML's folder is tried next."""
    for cand in (Path(path), Path(config_path).parent / path):
        try:
            cfg = json.loads(cand.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(cfg, dict):
            continue
        zero: dict = cfg.get("zero_optimization") or {}
        stage = int(zero.get("stage", 0))
        if stage not in (0, 1, 2, 3):
            raise ConfigError(f"{cand}: zero_optimization.stage is {stage}. DeepSpeed has stages 0-3.")

        on = {k: str((zero.get(k) or {}).get("device", "none")).lower() in ("cpu", "nvme")
              for k in ("offload_param", "offload_optimizer")}
        offload = "params" if on["offload_param"] else "optimizer" if on["offload_optimizer"] else "none"
        nums = {k: int(float(v)) for k, v in zero.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        kw = {k: nums[k] for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size",
                                   "stage3_param_persistence_threshold") if k in nums}
        live = nums.get("stage3_max_live_parameters")
        return DistSettings(engine="ddp" if stage == 0 else f"zero{stage}", num_gpus=num_gpus, nodes=nodes,
                            offload=offload, **kw,
                            **({"stage3_max_live_parameters": live} if live is not None else {}))
    return None


def _verdict(d: DistEstimate, gpu: GpuSpec, margin: float, host_bytes: int | None) -> str:
    v = fits(d.device_peak_bytes, gpu.memory_bytes, margin)
    if host_bytes is not None and d.host_peak_bytes > host_bytes:
        return "does_not_fit"
    return v


def _explain(arch: Arch, plan: Plan, d: DistEstimate, one_dev: int, host_bytes: int | None) -> list[str]:
    out: list[str] = []
    peak = next(p for p in d.phases if p.total_bytes == d.peak_allocated_bytes)
    acts = sum(t.bytes for t in peak.terms if t.name.startswith(("activations", "loss", "logits")))
    weights = sum(t.bytes for t in peak.terms if t.name.startswith("weights_"))
    lora = plan.finetuning_type == "lora"
    if d.engine in ("ddp", "zero1", "zero2") and lora and d.num_gpus > 1:
        states = sum(t.bytes for t in peak.terms if t.name in ("adapters", "optimizer_states", "fp32_master_partition",
                                                                "grads_partition", "ddp_gradient_buckets"))
        out.append(f"{d.engine} shards at most the trainable states; with LoRA those are small "
                   f"({states / MIB:,.0f} MiB per GPU here) while the frozen base ({weights / GIB:.2f} GiB) "
                   f"stays whole on every GPU, so the per-GPU peak ({d.device_peak_bytes / GIB:.2f} GiB) is about "
                   f"one GPU's ({one_dev / GIB:.2f} GiB) (LLaMA-Factory #350). ZeRO-3 or FSDP shard the base too.")
    if d.engine == "zero2" and not lora:
        out.append("ZeRO-2 keeps the bf16 weights whole on every GPU; only gradients and optimizer states shard.")
    if acts > 0.5 * peak.total_bytes:
        out.append(f"activations are {acts / GIB:.2f} GiB of the {peak.total_bytes / GIB:.2f} GiB peak, and no ZeRO "
                   "stage or FSDP mode shards them (LLaMA-Factory #5972): more GPUs do not lower them; "
                   "cutoff_len, the batch or gradient checkpointing do.")
    if d.engine in SHARDS_PARAMS and plan.quantization_bit == 4:
        out.append("QLoRA under ZeRO-3/FSDP: LLaMA-Factory sets bnb_4bit_quant_storage to the compute dtype itself "
                   "(quantization.py: 'crucial for fsdp+qlora'), so the packed 4-bit weights are stored as "
                   f"{'bf16' if (plan.bf16 or plan.pure_bf16) else 'fp16' if plan.fp16 else 'fp32'} tensors that "
                   "shard with the rest; a script outside LLaMA-Factory that leaves it at uint8 fails under FSDP "
                   "(flat parameters need one dtype) or keeps the base whole.")
        if not (plan.bf16 or plan.fp16 or plan.pure_bf16):
            out.append("QLoRA under FSDP without bf16/fp16: the quant storage is fp32, four bytes per packed pair; "
                       "set bf16: true (and mixed_precision: bf16 in the accelerate config).")
    if host_bytes is not None and d.host_peak_bytes > host_bytes:
        worst = max(d.host_terms, key=lambda t: t.bytes)
        out.append(f"host RAM: the run needs {d.host_peak_bytes / GIB:.1f} GiB per node ({worst.name}: {worst.detail}) "
                   f"but the node has {host_bytes / GIB:.1f} GiB.")
    return out


def _candidates(dist: DistSettings, plan: Plan) -> list[tuple[str, int, DistSettings]]:
    """Multi-GPU changes, each as (flags, cost, settings), in the order they are tried."""
    c = MULTI_FIX_COSTS
    out: list[tuple[str, int, DistSettings]] = []

    def add(flags: str, cost: int, **upd: Any) -> None:
        out.append((flags, cost, dist.model_copy(update=upd)))
    q8 = plan.quantization_bit == 8
    engines = [e for e in ("zero3", "fsdp") if e != dist.engine and not q8]
    for e in engines:
        add(f"--engine {e}", c["engine"], engine=e, offload="none")
    for e in ([dist.engine] if dist.engine in DEEPSPEED else []) + [e for e in engines if e in DEEPSPEED]:
        add(f"--engine {e} --offload optimizer", (e != dist.engine) * c["engine"] + c["offload_optimizer"], engine=e,
            offload="optimizer")
    for e in [e for e in (dist.engine, *engines) if e in ("zero3", "fsdp")]:
        add(f"--engine {e} --offload params", (e != dist.engine) * c["engine"] + c["offload_params"], engine=e,
            offload="params")
    if dist.engine == "zero3" and not dist.zero_init:
        add("--zero-init (load through HF's DeepSpeed integration, as llamafactory-cli does)", c["engine"],
            zero_init=True)
    for k in (2, 4):
        # [S] NVIDIA DGX/HGX H100 and A100 systems: 8 GPUs per node; beyond that the extra GPUs are extra nodes
        n, nodes = dist.num_gpus * k, dist.nodes * (k if dist.gpus_per_node * k > 8 else 1)
        where = f" --nodes {nodes}" if nodes != dist.nodes else ""
        add(f"--num-gpus {n}{where}", c["double_gpus"] * (k // 2), num_gpus=n, nodes=nodes)
        for e in engines:
            add(f"--engine {e} --num-gpus {n}{where}", c["engine"] + c["double_gpus"] * (k // 2), engine=e,
                offload="none", num_gpus=n, nodes=nodes)
    return sorted(out, key=lambda r: r[1])


def advise(arch: Arch, plan: Plan, dist: DistSettings, gpu: GpuSpec, margin: float) -> MultiGpuAdvice:
    d = per_gpu(arch, plan, dist)
    one = per_gpu(arch, plan, dist.model_copy(update={"engine": "ddp", "num_gpus": 1, "nodes": 1, "offload": "none"}))
    host = int(dist.host_ram_gib * GIB) if dist.host_ram_gib is not None else None
    verdict = _verdict(d, gpu, margin, host)
    fix, note = None, ""
    if verdict != "fits":
        for flags, cost, cand in _candidates(dist, plan):
            try:
                e = per_gpu(arch, plan, cand)
            except ConfigError:
                continue  # e.g. offload params with an engine that cannot
            if _verdict(e, gpu, margin, host) == "fits":
                fix = MultiFix(change=flags, cost=cost, device_peak_bytes=e.device_peak_bytes,
                               host_peak_bytes=e.host_peak_bytes)
                break
        if fix is None and host is not None and d.host_peak_bytes > host:
            note = (f"host RAM per node ({host / GIB:.1f} GiB) is the bound: give the nodes more RAM, spread the GPUs "
                    "over more nodes (--nodes), or load under zero.Init (ZeRO-3) / cpu_ram_efficient_loading (FSDP)")
        elif fix is None:
            note = (f"no engine, offload or GPU count up to {4 * dist.num_gpus} GPUs fits within "
                    f"{budget_bytes(gpu.memory_bytes, margin) / GIB:.2f} GiB per GPU (and the host RAM given): "
                    "activations and gathered layers do not shard; run `trainfit check` without the multi-GPU "
                    "flags for the single-GPU changes (cutoff_len, batch, checkpointing)")
    return MultiGpuAdvice(
        engine=d.engine, num_gpus=d.num_gpus, nodes=d.nodes, offload=d.offload, verdict=verdict,
        device_peak_bytes=d.device_peak_bytes, single_gpu_device_peak_bytes=one.device_peak_bytes,
        host_peak_bytes=d.host_peak_bytes, host_ram_bytes=host,
        host_short=host is not None and d.host_peak_bytes > host,
        explanations=_explain(arch, plan, d, one.device_peak_bytes, host), fix=fix, fix_note=note)


def advice_text(a: MultiGpuAdvice, gpu: GpuSpec) -> str:
    word = {"fits": "FITS", "fits_below_margin": "FITS, but below the safety margin", "does_not_fit": "DOES NOT FIT"}
    lines = [f"multi-GPU: {a.engine} on {a.num_gpus} x {gpu.name} ({a.nodes} node(s))"
             + (f", offload {a.offload}" if a.offload != "none" else "") + f": {word[a.verdict]}",
             f"  per-GPU device peak {a.device_peak_bytes / GIB:.2f} GiB (one GPU: "
             f"{a.single_gpu_device_peak_bytes / GIB:.2f} GiB); host RAM per node {a.host_peak_bytes / GIB:.1f} GiB"
             + (f" of {a.host_ram_bytes / GIB:.1f} GiB" if a.host_ram_bytes is not None else "")]
    lines += [f"  why: {e}" for e in a.explanations]
    if a.fix is not None:
        lines.append(f"smallest multi-GPU change that fits (cost {a.fix.cost}): {a.fix.change} -> per-GPU "
                     f"{a.fix.device_peak_bytes / GIB:.2f} GiB, host {a.fix.host_peak_bytes / GIB:.1f} GiB per node")
    elif a.fix_note:
        lines.append(f"no multi-GPU fix found: {a.fix_note}")
    return "\n".join(lines)
