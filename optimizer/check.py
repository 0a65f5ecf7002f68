"""`trainfit check`: why a LLaMA-Factory config runs out of memory, and the smallest change that fits.

Everything memory-related comes from `memory` (estimate, eval_estimate); the nearest feasible config is
found by CP-SAT (`solver.nearest_feasible`) over knob changes whose feasibility the memory model decides.

Cost of each change (policy, documented in the README; lower = less disruptive to the training result):
- enable_liger_kernel: on                      1   (same math, fused loss)
- gradient checkpointing back on               1   (same math, ~+33% compute)
- optim -> adamw_8bit                          2   (8-bit states; near-identical results)
- per_device_train_batch_size halved           2 per halving (gradient_accumulation_steps doubled: same
                                                   effective batch)
- quantization_bit 8 -> 4                      3;  none -> 4: 4 (QLoRA: NF4 is close to 16-bit)
- lora_rank halved                             3 per halving
- cutoff_len to 3/4, 1/2, 1/4                  4, 6, 8 (truncates supervised tokens)
- lora_target all -> mlp                       6;  -> attention: 8 (fewer adapted layers)
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigError
from .llamafactory.read import EvalSettings, eval_settings
from .memory import (
    budget_bytes,
    context_window_problem,
    device_peak_for,
    estimate,
    eval_estimate,
    fits,
    large_blocks_at,
    lora_targets,
)
from .memory.precision import PAD_MULTIPLE, padded_length
from .models.families import family_of
from .schema import Arch, Estimate, GpuSpec, Moment, PhasePeak, Plan
from .units import MIB

__all__ = ["CheckReport", "check", "patch_yaml", "NO_EFFECT_KEYS", "FIX_COSTS"]

# Keys that never change the peak, and why (they act on how many steps run or on host memory).
NO_EFFECT_KEYS = {
    "max_samples": "limits how many samples are read from the dataset, not how many are on the GPU at once",
    "num_train_epochs": "repeats the same steps",
    "dataloader_num_workers": "DataLoader workers are CPU processes",
    "dataloader_pin_memory": "pinned host memory, not GPU memory",
    "dataloader_prefetch_factor": "prefetched batches wait in host memory",
    "preprocessing_num_workers": "tokenization runs on the CPU before training",
    "save_steps": "checkpoints are written from host copies",
    "save_total_limit": "a disk setting",
    "logging_steps": "logging",
    "warmup_steps": "the learning-rate schedule",
    "learning_rate": "the learning-rate schedule",
    "lr_scheduler_type": "the learning-rate schedule",
    "weight_decay": "an in-place term of the optimizer update",
    "adam_beta1": "an optimizer coefficient",
    "adam_beta2": "an optimizer coefficient",
    "lora_alpha": "a scaling factor of the adapter output",
    "val_size": "which samples are held out (evaluation memory depends on per_device_eval_batch_size)",
}

FIX_COSTS = {"liger": 1, "gc": 1, "optim8": 2, "batch_halving": 2, "quant8to4": 3, "quant16to4": 4,
             "rank_halving": 3, "cutoff": {0.75: 4, 0.5: 6, 0.25: 8}, "target_mlp": 6, "target_attention": 8}


class Pitfall(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    key: str = Field(description="The key (or keys) concerned.")
    problem: str = Field(description="What is wrong.")
    fix: str = Field(description="What to do.")


class KeyEffect(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    key: str
    value: Any
    default: Any
    saves_bytes: int = Field(description="Device peak saved by this value versus LLaMA-Factory's default (may be < 0).")
    explanation: str


class Fix(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    changes: dict[str, list[Any]] = Field(description="key -> [old value, new value].")
    cost: int = Field(description="Sum of the documented per-change costs.")
    device_peak_bytes: int = Field(description="Predicted device peak after the change.")
    peak_allocated_bytes: int
    headroom_bytes: int


class CheckReport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: str
    model: str
    gpu: str
    gpu_total_bytes: int
    margin: float
    verdict: str = Field(description="fits | fits_below_margin | does_not_fit")
    estimate: Estimate
    train_device_peak_bytes: int
    eval: PhasePeak | None = Field(description="The evaluation pass, when the config evaluates.")
    eval_device_peak_bytes: int | None
    device_peak_bytes: int = Field(description="Max of training and evaluation device peaks.")
    headroom_bytes: int
    pitfalls: list[Pitfall]
    key_effects: list[KeyEffect] = Field(description="Each memory-relevant key the file sets, with what it saves.")
    no_effect: list[KeyEffect] = Field(description="Keys set in the file that do not change the peak.")
    fix: Fix | None
    fix_note: str = ""


def _evaluates(data: dict[str, Any]) -> bool:
    strat = str(data.get("eval_strategy", data.get("evaluation_strategy", "no"))).lower()
    return bool(data.get("do_eval")) or strat in ("steps", "epoch") or bool(data.get("eval_dataset"))


def check(data: dict[str, Any], plan: Plan, arch: Arch, gpu: GpuSpec, *, margin: float, config_path: str,
          optimize: bool = False) -> CheckReport:
    est = estimate(arch, plan)
    total = gpu.memory_bytes
    budget = budget_bytes(total, margin)
    train_dev = est.device_peak_bytes
    ev = None
    ev_dev = None
    es = eval_settings(data, config_path)
    if _evaluates(data):
        ev = eval_estimate(
            arch, plan, eval_batch=es.per_device_eval_batch_size, compute_accuracy=es.compute_accuracy,
            predict_with_generate=es.predict_with_generate, eval_accumulation_steps=es.eval_accumulation_steps,
            eval_samples=_eval_samples(es, plan), max_new_tokens=es.max_new_tokens,
        )
        blocks = large_blocks_at(arch, plan, Moment.EVAL, es.per_device_eval_batch_size)
        ev_dev = device_peak_for(ev.total_bytes, blocks)
    dev = max(train_dev, ev_dev or 0)
    headroom = total - dev
    verdict = fits(dev, total, margin)
    effects, no_effect = _key_effects(data, plan, arch)
    fix = None
    note = ""
    if verdict != "fits" or optimize:
        fix, note = _nearest_fix(data, plan, arch, gpu, budget, ev is not None)
    return CheckReport(
        config=config_path, model=arch.name, gpu=gpu.id, gpu_total_bytes=total, margin=margin, verdict=verdict,
        estimate=est, train_device_peak_bytes=train_dev, eval=ev, eval_device_peak_bytes=ev_dev,
        device_peak_bytes=dev, headroom_bytes=headroom, pitfalls=_pitfalls(data, plan, arch, gpu),
        key_effects=effects, no_effect=no_effect, fix=fix, fix_note=note,
    )


def _eval_samples(es: EvalSettings, plan: Plan) -> int:
    n = plan.max_samples or 0
    if es.val_size >= 1:
        return int(es.val_size)
    return int(n * es.val_size) if n else 0


def _key_effects(data: dict[str, Any], plan: Plan, arch: Arch) -> tuple[list[KeyEffect], list[KeyEffect]]:
    default = Plan()
    base = estimate(arch, plan).device_peak_bytes
    effects, none = [], []
    for key in sorted(data):
        if key in NO_EFFECT_KEYS:
            none.append(KeyEffect(key=key, value=data[key], default=None, saves_bytes=0,
                                  explanation=f"does not change the peak: {NO_EFFECT_KEYS[key]}"))
            continue
        if key not in Plan.model_fields or key in ("bf16", "fp16"):
            continue
        cur, dflt = getattr(plan, key), getattr(default, key)
        if cur == dflt:
            continue
        try:
            other = estimate(arch, plan.model_copy(update={key: dflt})).device_peak_bytes
        except ConfigError:
            continue
        saves = other - base
        if saves == 0:
            expl = "does not change the peak here"
        elif saves > 0:
            expl = f"saves {saves / MIB:,.0f} MiB versus the default {dflt!r}"
        else:
            expl = f"costs {-saves / MIB:,.0f} MiB versus the default {dflt!r}"
        (effects if saves else none).append(
            KeyEffect(key=key, value=cur, default=dflt, saves_bytes=saves, explanation=expl))
    return effects, none


def _pitfalls(data: dict[str, Any], plan: Plan, arch: Arch, gpu: GpuSpec) -> list[Pitfall]:
    out = []
    if not data.get("dataset"):
        # [S] LLaMA-Factory 0.9.5 hparams/data_args.py / parser.py (checked with its parser: the reference
        # case's configs stop with "Cannot specify `val_size` if `dataset` is None.")
        out.append(Pitfall(key="dataset", problem="no dataset: LLaMA-Factory stops before training ('Please specify "
                           "dataset for training.' or 'Cannot specify `val_size` if `dataset` is None.')",
                           fix="set dataset to a name in <dataset_dir>/dataset_info.json (and dataset_dir)"))
    if not data.get("template"):
        out.append(Pitfall(key="template", problem="no template: LLaMA-Factory falls back to the tokenizer's chat "
                           "template or `empty`, with a warning",
                           fix="set the model family's template (qwen for Qwen2.5)"))
    if _evaluates(data) and "per_device_eval_batch_size" not in data:
        out.append(Pitfall(key="per_device_eval_batch_size", problem="evaluation runs with HF's default batch of 8",
                           fix=f"set per_device_eval_batch_size: {plan.per_device_train_batch_size}"))
    if data.get("gradient_checkpointing") and not plan.disable_gradient_checkpointing:
        out.append(Pitfall(key="gradient_checkpointing", problem="LLaMA-Factory already checkpoints every layer "
                           "(disable_gradient_checkpointing: false); this key only makes HF Trainer re-enable it",
                           fix="remove gradient_checkpointing (and gradient_checkpointing_kwargs); "
                               "use use_reentrant_gc"))
    if plan.fp16 and gpu.bf16:
        out.append(Pitfall(key="fp16", problem=f"{gpu.name} supports bf16; fp16 needs loss scaling and over bf16 "
                           "weights makes autocast cast every frozen weight", fix="set bf16: true and fp16: false"))
    if plan.quantization_bit and not plan.upcast_layernorm:
        out.append(Pitfall(key="upcast_layernorm", problem="LLaMA-Factory recommends it for quantized training "
                           "(it warns without it)", fix="set upcast_layernorm: true (small cost with checkpointing)"))
    if gpu.compute_capability.startswith(("12.", "10.")):
        need = "PyTorch >= 2.7 built for CUDA 12.8+" + (" and bitsandbytes >= 0.45.3" if plan.quantization_bit else "")
        out.append(Pitfall(key="(environment)",
                           problem=f"{gpu.name} is Blackwell (sm_{gpu.compute_capability.replace('.', '')})",
                           fix=f"install {need}"))
    if plan.enable_liger_kernel:
        # [S] LLaMA-Factory hparams/parser.py::_check_extra_dependencies: check_version("liger-kernel",
        # mandatory=True) raises "To fix: run `pip install liger-kernel`" before training starts
        out.append(Pitfall(key="(environment)", problem="enable_liger_kernel: true needs the liger-kernel package; "
                           "LLaMA-Factory refuses to start without it", fix="pip install liger-kernel"))
    ctx = arch.max_position_embeddings
    if ctx is not None and plan.cutoff_len > ctx:
        out.append(Pitfall(key="cutoff_len", problem=context_window_problem(plan.cutoff_len, ctx),
                           fix=f"set cutoff_len <= {ctx}"))
    if plan.flash_attn == "fa2" and gpu.flash_attn2 != "yes":
        out.append(Pitfall(key="flash_attn", problem=f"fa2 on {gpu.name}: FlashAttention-2 support is "
                           f"'{gpu.flash_attn2}'; LLaMA-Factory falls back with a warning when flash-attn is missing",
                           fix="set flash_attn: sdpa (or auto)"))
    if plan.neat_packing and plan.flash_attn != "fa2":
        s = padded_length(plan.cutoff_len)
        mask_mib = plan.per_device_train_batch_size * s * s * 2 / MIB
        # [S] LLaMA-Factory data/collator.py::SFTDataCollatorWith4DAttentionMask: without flash_attention_2 the
        # collator builds prepare_4d_attention_mask [b, 1, s, s] in the compute dtype
        out.append(Pitfall(key="neat_packing", problem=f"without fa2 each micro-batch carries a [b, 1, s, s] mask in "
                           f"the compute dtype ({mask_mib:,.0f} MiB here), held for the whole step",
                           fix="with flash-attn installed, flash_attn: fa2 and per_device_train_batch_size: 1 "
                           "(no mask: varlen attention)"))
    elif plan.packing and not plan.neat_packing:
        # [S] LLaMA-Factory data/processor/supervised.py::PackedSupervisedDatasetProcessor: packed samples share one
        # all-ones attention mask (neat_packing gives each its own block)
        out.append(Pitfall(key="packing", problem="packed samples attend to each other (one causal mask over the "
                           "whole row)", fix="set neat_packing: true for a block-diagonal mask"))
    out_dir = data.get("output_dir")
    if out_dir and not data.get("overwrite_output_dir") and not data.get("resume_from_checkpoint"):
        p = Path(str(out_dir))
        if p.is_dir() and any(p.glob("checkpoint-*")):
            out.append(Pitfall(key="output_dir", problem=f"{out_dir} holds checkpoints: LLaMA-Factory resumes that run",
                               fix="use a fresh output_dir or set overwrite_output_dir: true"))
    if data.get("compute_accuracy") and not data.get("eval_accumulation_steps"):
        out.append(Pitfall(key="eval_accumulation_steps", problem="compute_accuracy keeps every eval batch's "
                           "predictions on the GPU until evaluation ends", fix="set eval_accumulation_steps: 1"))
    return out


def _halvings(v: int) -> list[int]:
    out = [v]
    while out[-1] > 1:
        out.append(max(1, out[-1] // 2))
    return out


FIX_KNOBS = ("enable_liger_kernel", "disable_gradient_checkpointing", "optim", "per_device_train_batch_size",
             "quantization_bit", "lora_rank", "lora_target", "cutoff_len", "gradient_accumulation_steps")


def _nearest_fix(data: dict[str, Any], plan: Plan, arch: Arch, gpu: GpuSpec, budget: int,
                 evaluates: bool) -> tuple[Fix | None, str]:
    """Options per knob with their costs; the memory model decides which combinations fit; CP-SAT picks the
    cheapest (ties: the lower device peak, then the order of the options)."""
    rows = fix_options(data, plan, arch, budget, evaluates)
    return _pick_fix(rows, plan, gpu, data, evaluates)


def fix_options(data: dict[str, Any], plan: Plan, arch: Arch, budget: int, evaluates: bool):
    """The fitting combinations of the cheap changes (see the module docstring for the costs)."""
    opts: dict[str, list[tuple[Any, int]]] = {}
    opts["enable_liger_kernel"] = [(plan.enable_liger_kernel, 0)] + (
        [(True, FIX_COSTS["liger"])] if not plan.enable_liger_kernel and family_of(arch.model_type).liger else [])
    opts["disable_gradient_checkpointing"] = [(plan.disable_gradient_checkpointing, 0)] + (
        [(False, FIX_COSTS["gc"])] if plan.disable_gradient_checkpointing else [])
    opts["optim"] = [(plan.optim, 0)] + ([("adamw_8bit", FIX_COSTS["optim8"])]
                                         if plan.optim in ("adamw_torch", "adamw_torch_fused") else [])
    opts["per_device_train_batch_size"] = [(b, FIX_COSTS["batch_halving"] * i)
                                           for i, b in enumerate(_halvings(plan.per_device_train_batch_size))]
    if plan.finetuning_type == "lora":
        q = [(plan.quantization_bit, 0)]
        if plan.quantization_bit is None:
            q.append((4, FIX_COSTS["quant16to4"]))
        elif plan.quantization_bit == 8:
            q.append((4, FIX_COSTS["quant8to4"]))
        opts["quantization_bit"] = q
        opts["lora_rank"] = [(r, FIX_COSTS["rank_halving"] * i) for i, r in enumerate(_halvings(plan.lora_rank)[:4])]
        tg = [(plan.lora_target, 0)]
        if plan.lora_target == "all":
            names = lora_targets(arch, plan)
            mlp = [n for n in names if n in ("gate_proj", "up_proj", "down_proj", "gate_up_proj")]
            att = [n for n in names if n not in mlp]
            tg += [(",".join(mlp), FIX_COSTS["target_mlp"]), (",".join(att), FIX_COSTS["target_attention"])]
        opts["lora_target"] = tg
    c = plan.cutoff_len
    shorter = [(max(PAD_MULTIPLE, padded_length(int(c * f))), cost) for f, cost in FIX_COSTS["cutoff"].items()
               if padded_length(int(c * f)) < c]
    opts["cutoff_len"] = [(c, 0)] + shorter
    return fix_candidates(opts, data, plan, arch, budget, evaluates)


def fix_candidates(opts, data, plan, arch, budget, evaluates):
    """Every combination of the knob options that fits: [(combo, new plan, estimate, device peak, cost)]."""
    keys = list(opts)
    rows = []
    for combo in itertools.product(*(range(len(opts[k])) for k in keys)):
        upd = {k: opts[k][i][0] for k, i in zip(keys, combo)}
        cost = sum(opts[k][i][1] for k, i in zip(keys, combo))
        if "per_device_train_batch_size" in upd:
            ratio = plan.per_device_train_batch_size // upd["per_device_train_batch_size"]
            upd["gradient_accumulation_steps"] = plan.gradient_accumulation_steps * ratio
        new = plan.model_copy(update=upd)
        try:
            est = estimate(arch, new)
        except ConfigError:  # not a plan LLaMA-Factory runs (e.g. a cutoff_len shorter than the images' tokens)
            continue
        dev = est.device_peak_bytes
        if evaluates:
            eb = min(eval_settings(data).per_device_eval_batch_size, new.per_device_train_batch_size)
            ev = eval_estimate(arch, new, eval_batch=eb)
            dev = max(dev, device_peak_for(ev.total_bytes, large_blocks_at(arch, new, Moment.EVAL, eb)))
        if dev <= budget:
            rows.append((combo, new, est, dev, cost))
    return rows


def _pick_fix(rows, plan, gpu, data, evaluates):
    from .search.cpsat import nearest_feasible

    if not rows:
        return None, ("no combination of the cheap changes fits; use a bigger GPU or a smaller model "
                      "(trainfit solve searches every option)")
    best = nearest_feasible([r[4] for r in rows], [r[3] // MIB for r in rows])
    combo, new, est, dev, cost = rows[best]
    changes = {}
    for k in FIX_KNOBS:
        old, nv = getattr(plan, k), getattr(new, k)
        if old != nv:
            changes[k] = [old, nv]
    eval_batch = eval_settings(data).per_device_eval_batch_size
    if evaluates and eval_batch > new.per_device_train_batch_size:
        changes["per_device_eval_batch_size"] = [eval_batch, new.per_device_train_batch_size]
    return Fix(changes=changes, cost=cost, device_peak_bytes=dev, peak_allocated_bytes=est.peak_allocated_bytes,
               headroom_bytes=gpu.memory_bytes - dev), ""


def patch_yaml(text: str, changes: dict[str, list[Any]]) -> str:
    """Apply `changes` to a YAML text line by line, keeping comments and order; new keys go at the end."""
    from .llamafactory.write import format_float

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if v is None:
            return "null"
        if isinstance(v, float):
            return format_float(v)
        return str(v)

    lines = text.splitlines()
    done = set()
    for i, line in enumerate(lines):
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:\s*([^#\n]*?)(\s*#.*)?$", line)
        if m and m.group(1) in changes:
            key = m.group(1)
            comment = m.group(3) or ""
            lines[i] = f"{key}: {fmt(changes[key][1])}{comment}"
            done.add(key)
    added = [f"{k}: {fmt(v[1])}" for k, v in changes.items() if k not in done]
    if added:
        lines += ["", "# changed by trainfit check"] + added
    return "\n".join(lines) + "\n"


# --- multi-GPU (`trainfit check CONFIG --num-gpus N --engine E`): optimizer.distributed.advice does the work ---

def check_multi(data: dict[str, Any], config_path: str, model: str | None, gpu: GpuSpec, margin: float, *,
                num_gpus: int | None, engine: str | None, offload: str | None, nodes: int = 1,
                host_ram_gib: float | None = None, zero_init: bool = True):
    """(advice, dist settings, plan) for a config on several GPUs. The YAML's `deepspeed:` key, when its JSON can be
    read, selects the engine, offload and bucket sizes (a --engine flag overrides it)."""
    from .distributed import DistSettings, parse_engine
    from .distributed.advice import advise, dist_from_deepspeed_json, screen_config
    from .llamafactory.read import plan_from_dict
    from .models import catalog

    data = dict(data)
    ds_path = data.pop("deepspeed", None)
    if num_gpus is None:
        raise ConfigError("the multi-GPU check needs the GPU count" + (f" (the config sets deepspeed: {ds_path})"
                          if ds_path else "") + ". Pass --num-gpus N (GPUs in all).")
    if offload not in (None, "none", "optimizer", "params"):
        raise ConfigError(f"--offload {offload!r} is not none, optimizer or params. Pick one of those.")
    dist = None
    if ds_path and engine is None:
        dist = dist_from_deepspeed_json(str(ds_path), config_path, num_gpus, nodes)
        if dist is None:
            raise ConfigError(f"deepspeed: {ds_path!r} cannot be read as JSON (from here or next to {config_path}). "
                              "Fix the path, or pass --engine.")
        upd: dict[str, Any] = {"host_ram_gib": host_ram_gib, "zero_init": zero_init}
        if offload is not None:
            upd["offload"] = offload
        dist = dist.model_copy(update=upd)
    if dist is None:
        dist = DistSettings(engine=parse_engine(engine or "ddp"), num_gpus=num_gpus, nodes=nodes,
                            offload=offload or "none", host_ram_gib=host_ram_gib, zero_init=zero_init)
    name = model or data.get("model_name_or_path")
    if not name:
        raise ConfigError("no model given. Pass --model or set model_name_or_path.")
    screen_config(data, str(name), dist)
    plan, _ = plan_from_dict(data, config_path)
    arch = catalog.resolve_arch(str(name))
    return advise(arch, plan, dist, gpu, margin), dist, plan
