"""Build the model exactly as LLaMA-Factory 0.9.5 prepares it for training, on the meta device.

Order (llamafactory/model/loader.py::load_model): load in the checkpoint dtype (quantized on the fly by
bitsandbytes) -> patch_model/prepare_model_for_training (upcast_layernorm, gradient checkpointing with
LLaMA-Factory's own checkpoint wrapper, use_cache=False, upcast_lmhead_output hook) -> init_adapter
(LoRA via PEFT, or full: every parameter trainable; trainable parameters upcast to fp32 unless pure_bf16).

All module surgery happens on meta tensors; `materialize` then allocates the (fake) storage, re-ties shared
parameters and quantizes bitsandbytes layers from fake 16-bit weights.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, TrainfitError
from ..schema import Plan

__all__ = ["BuiltModel", "build_model", "build_reference", "materialize", "compute_dtype_for", "padded_seq_len",
           "attn_impl_for"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_LAYERNORM_NAMES = ("norm", "ln")  # LLaMA-Factory extras/constants.py LAYERNORM_NAMES


def padded_seq_len(plan: Plan) -> int:
    """LLaMA-Factory's SFT collator pads to the longest sample, rounded up to a multiple of 8."""
    return -(-plan.cutoff_len // 8) * 8


def checkpoint_dtype(config: dict[str, Any]) -> torch.dtype:
    value = config.get("dtype") or config.get("torch_dtype") or "float32"
    if isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ConfigError(f"config dtype {value!r} is not one of bfloat16, float16, float32. Fix the config.")
    return _DTYPES[value]


def compute_dtype_for(plan: Plan, ckpt_dtype: torch.dtype) -> torch.dtype:
    """LLaMA-Factory's model_args.compute_dtype (hparams/parser.py, extras/misc.py::infer_optim_dtype on a bf16 GPU)."""
    if plan.bf16 or plan.pure_bf16:
        return torch.bfloat16
    if plan.fp16:
        return torch.float16
    return torch.bfloat16 if ckpt_dtype == torch.bfloat16 else torch.float16


def attn_impl_for(plan: Plan) -> tuple[str, list[str]]:
    notes: list[str] = []
    if plan.flash_attn == "disabled":
        return "eager", notes
    if plan.flash_attn == "fa2":
        notes.append(
            "flash_attn=fa2: FlashAttention-2 has no CPU kernel, so the trace runs sdpa (flash kernel, is_causal, "
            "GQA). FA2 keeps the same saved tensors (output + fp32 logsumexp) but its varlen path and workspace differ."
        )
    return "sdpa", notes


@dataclass
class BuiltModel:
    model: nn.Module  # what the trainer calls: a PeftModel (LoRA) or the transformers model
    hf_model: nn.Module  # the transformers PreTrainedModel inside
    config: Any  # the transformers config
    arch: str
    layers: int
    model_dtype: torch.dtype
    compute_dtype: torch.dtype
    attn_impl: str
    lm_head: nn.Module
    bnb4: list[tuple[str, nn.Module]] = field(default_factory=list)
    bnb8: list[tuple[str, nn.Module]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    param_names: dict[int, str] = field(default_factory=dict)  # id(param) -> name (filled by materialize)


def _hf_config(config: dict[str, Any], layers: int | None, attn_impl: str):
    from transformers import AutoConfig

    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise ConfigError("config has no model_type. Pass the config.json of a Hugging Face causal LM.")
    if "text_config" in cfg and isinstance(cfg["text_config"], dict):
        raise ConfigError(f"{model_type}: multimodal configs are not traced. Trace the text model's config.")
    if layers is not None:
        if layers <= 0:
            raise ConfigError(f"layers must be positive, got {layers}. Pass --layers 1 or more.")
        cfg["num_hidden_layers"] = layers
        if isinstance(cfg.get("layer_types"), list):
            cfg["layer_types"] = cfg["layer_types"][:layers]
    cfg.pop("quantization_config", None)
    if "torch_dtype" in cfg:  # transformers v5 name
        cfg.setdefault("dtype", cfg["torch_dtype"])
        del cfg["torch_dtype"]
    try:
        hf_cfg = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"transformers cannot build a config for model_type {model_type!r}: {exc}") from None
    hf_cfg.use_cache = False  # LLaMA-Factory configure_kv_cache: no KV cache while training
    return hf_cfg


def _bnb_config(plan: Plan, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if plan.quantization_bit == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=plan.double_quantization,
            bnb_4bit_quant_type=plan.quantization_type,
            bnb_4bit_quant_storage=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def _module_of_checkpointed(func: Any) -> nn.Module | None:
    """The decoder layer a gradient-checkpointing call runs (transformers passes partial(forward, self, ...))."""
    if isinstance(func, functools.partial):
        inner = func.func
        owner = getattr(inner, "__self__", None)
        if isinstance(owner, nn.Module):
            return owner
        if func.args and isinstance(func.args[0], nn.Module):
            return func.args[0]
        return None
    owner = getattr(func, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _llamafactory_checkpoint_func(use_reentrant: bool):
    """LLaMA-Factory's custom gradient checkpointing: only layers with trainable parameters are checkpointed,
    and the first floating-point argument (the hidden states) is made to require grad."""
    from torch.utils.checkpoint import checkpoint

    def gc_func(func: Any, *args: Any, **kwargs: Any) -> Any:
        module = _module_of_checkpointed(func)
        has_grad = module is None or any(p.requires_grad for p in module.parameters())
        if not has_grad:
            return func(*args, **kwargs)
        for arg in args:
            if torch.is_tensor(arg) and torch.is_floating_point(arg):
                arg.requires_grad_(True)
                break
        return checkpoint(func, *args, use_reentrant=use_reentrant, **kwargs)

    return gc_func


def _fp32_output_hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return output.to(torch.float32)


def _lora_targets(model: nn.Module, plan: Plan) -> list[str]:
    targets = [t.strip() for t in plan.lora_target.split(",") if t.strip()]
    if targets == ["all"]:
        names: set[str] = set()
        for name, module in model.named_modules():
            if "lm_head" in name or "visual" in name.split("."):  # find_all_linear_modules' forbidden modules
                continue
            cls = module.__class__.__name__
            if "Linear" in cls and "Embedding" not in cls:
                names.add(name.split(".")[-1])
        return sorted(names)
    return targets


def _vision_free_targets(targets: list[str]) -> str:
    """LoRA target modules outside the vision tower and merger, as a PEFT regex (full-name match): LLaMA-Factory
    model/model_utils/visual.py::patch_target_modules excludes the `visual` modules of Qwen2.5-VL with
    `freeze_vision_tower` (default) so that suffixes the tower shares with the decoder (gate_proj, up_proj,
    down_proj) get no adapters there."""
    return r"^(?!.*\bvisual\b).*\.(?:{})$".format("|".join(re.escape(t) for t in targets))


def build_model(config: dict[str, Any], plan: Plan, *, layers: int | None = None) -> BuiltModel:
    """The model of one LLaMA-Factory run, on meta tensors."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if plan.enable_liger_kernel:
        raise NotImplementedError(
            "enable_liger_kernel: Liger's fused linear cross-entropy is a Triton kernel that cannot run on fake "
            "CPU tensors, so the trace cannot measure it. Trace without it (an upper bound) or use run_cuda."
        )

    notes: list[str] = []
    ckpt_dtype = checkpoint_dtype(config)
    compute_dtype = compute_dtype_for(plan, ckpt_dtype)
    attn_impl, attn_notes = attn_impl_for(plan)
    notes += attn_notes
    hf_cfg = _hf_config(config, layers, attn_impl)
    n_layers = int(hf_cfg.get_text_config().num_hidden_layers)

    vlm = getattr(hf_cfg, "vision_config", None) is not None
    # LLaMA-Factory model/loader.py loads a vision-language model with AutoModelForImageTextToText
    auto = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    with torch.device("meta"):
        try:
            model = auto.from_config(hf_cfg, dtype=ckpt_dtype, attn_implementation=attn_impl)
        except ValueError as exc:
            if attn_impl == "sdpa" and plan.flash_attn in ("auto", "fa2"):
                # LLaMA-Factory: fa2 when flash-attn is installed, else eager (e.g. Gemma 2)
                attn_impl = "eager"
                notes.append(
                    f"{hf_cfg.model_type} has no sdpa attention in transformers: eager attention traced (it keeps "
                    "[B, heads, S, S] probabilities). With flash-attn installed LLaMA-Factory would use FA2, which "
                    "keeps none; the trace cannot run FA2."
                )
                model = auto.from_config(hf_cfg, dtype=ckpt_dtype, attn_implementation=attn_impl)
            else:
                raise ConfigError(f"transformers cannot build {hf_cfg.model_type} with flash_attn="
                                  f"{plan.flash_attn}: {exc}") from None
    model.config.use_cache = False

    bnb4: list[tuple[str, nn.Module]] = []
    bnb8: list[tuple[str, nn.Module]] = []
    if plan.quantization_bit is not None:
        import bitsandbytes as bnb
        from transformers.integrations.bitsandbytes import replace_with_bnb_linear

        qcfg = _bnb_config(plan, compute_dtype)
        model = replace_with_bnb_linear(model, modules_to_not_convert=["lm_head"], quantization_config=qcfg)
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                bnb4.append((name, module))
            elif isinstance(module, bnb.nn.Linear8bitLt):
                bnb8.append((name, module))
            else:
                continue
            if module.bias is not None:  # loaded from the checkpoint in its dtype, like every non-quantized tensor
                module.bias.data = module.bias.data.to(ckpt_dtype)
        if not bnb4 and not bnb8:
            raise TrainfitError("bitsandbytes found no nn.Linear to quantize in this model.")
        model.is_quantized = True
        model.quantization_method = "bitsandbytes"
        if plan.quantization_bit == 4:
            model.is_loaded_in_4bit = True
        else:
            model.is_loaded_in_8bit = True

    # --- patch_model -> prepare_model_for_training (model_utils/checkpointing.py) ------------------------------
    if plan.kbit_prepare:
        if plan.quantization_bit is None:
            raise ConfigError("kbit_prepare needs quantization_bit 4 or 8 (prepare_model_for_kbit_training).")
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=plan.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": plan.use_reentrant_gc},
        )
        notes.append("kbit_prepare: PEFT's prepare_model_for_kbit_training upcasts every non-quantized parameter to "
                     "fp32 (the residual stream and logits become fp32); LLaMA-Factory does not call it.")
    if plan.upcast_layernorm:
        for name, param in model.named_parameters():
            if param.ndim == 1 and any(k in name for k in _LAYERNORM_NAMES):
                param.data = param.data.to(torch.float32)
    if plan.gradient_checkpointing and not plan.kbit_prepare:
        if not getattr(model, "supports_gradient_checkpointing", False):
            notes.append(f"{hf_cfg.model_type} does not support gradient checkpointing; traced without it.")
        else:
            model._set_gradient_checkpointing(
                enable=True, gradient_checkpointing_func=_llamafactory_checkpoint_func(plan.use_reentrant_gc)
            )
    if plan.upcast_lmhead_output:
        out_layer = model.get_output_embeddings()
        if isinstance(out_layer, nn.Linear) and out_layer.weight.dtype != torch.float32:
            out_layer.register_forward_hook(_fp32_output_hook)

    # --- init_adapter (model/adapter.py) -------------------------------------------------------------------------
    cast_fp32 = not plan.pure_bf16
    if plan.finetuning_type == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        targets = _lora_targets(model, plan)
        if not targets:
            raise ConfigError(f"lora_target {plan.lora_target!r} matches no Linear module of {hf_cfg.model_type}.")
        extra = [t.strip() for t in (plan.additional_target or "").split(",") if t.strip()] or None
        peft_cfg = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            inference_mode=False,
            r=plan.lora_rank,
            lora_alpha=plan.effective_lora_alpha,
            lora_dropout=plan.lora_dropout,
            target_modules=_vision_free_targets(targets) if vlm else targets,
            modules_to_save=extra,
        )
        try:
            top = get_peft_model(model, peft_cfg)
        except ValueError as exc:
            raise ConfigError(f"PEFT rejects the LoRA config: {exc}") from None
        if cast_fp32:
            for p in top.parameters():
                if p.requires_grad:
                    p.data = p.data.to(torch.float32)
        elif any(p.requires_grad and p.dtype == torch.float32 for p in top.parameters()):
            notes.append("pure_bf16: PEFT creates the LoRA adapters in fp32 (get_peft_model "
                         "autocast_adapter_dtype=True, which LLaMA-Factory keeps), so adapters, their grads and "
                         "optimizer states stay fp32.")
    else:
        top = model
        for p in model.parameters():
            p.requires_grad_(True)
            if cast_fp32:
                p.data = p.data.to(torch.float32)

    lm_head = _find_lm_head(top, model)
    return BuiltModel(
        model=top, hf_model=model, config=hf_cfg, arch=str(hf_cfg.model_type), layers=n_layers,
        model_dtype=ckpt_dtype, compute_dtype=compute_dtype, attn_impl=attn_impl, lm_head=lm_head,
        bnb4=bnb4, bnb8=bnb8, notes=notes,
    )


def build_reference(config: dict[str, Any], plan: Plan, *, layers: int | None = None) -> BuiltModel | None:
    """The DPO reference model LLaMA-Factory loads for full fine-tuning, on meta tensors (None when there is none).

    [S] LLaMA-Factory train/trainer_utils.py::create_ref_model: LoRA without `ref_model` -> None (the policy with
    its adapters disabled); otherwise load_model(..., is_trainable=False): the checkpoint in its dtype, no
    adapter, no checkpointing, every parameter frozen, fp32 parameters cast to the compute dtype (loader.py).
    `ref_model` is assumed to have the policy's architecture."""
    if not plan.use_ref_model or (plan.finetuning_type == "lora" and plan.ref_model is None):
        return None
    ref_plan = plan.model_copy(update={
        "finetuning_type": "full", "pure_bf16": True, "bf16": False, "fp16": False, "quantization_bit": None,
        "disable_gradient_checkpointing": True, "upcast_layernorm": False, "upcast_lmhead_output": False,
        "additional_target": None, "kbit_prepare": False, "stage": "sft"})
    built = build_model(config, ref_plan, layers=layers)
    built.model.requires_grad_(False)
    built.model.eval()
    built.notes = ["DPO reference: a second frozen copy of the model in its checkpoint dtype (create_ref_model)."]
    return built


def _find_lm_head(top: nn.Module, hf_model: nn.Module) -> nn.Module:
    head = hf_model.get_output_embeddings()
    # PEFT's modules_to_save replaces the attribute with a wrapper: hook what the forward really calls
    for name, module in top.named_modules():
        if name.endswith("lm_head") and "modules_to_save" not in name and "original_module" not in name:
            return module
    if head is None:
        raise TrainfitError("the model has no output embeddings (lm_head); only causal LMs are traced.")
    return head


def _set_by_name(root: nn.Module, dotted: str, value: nn.Parameter) -> None:
    parent_name, _, leaf = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, value)


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters that share one tensor (tied embeddings); `to_empty` unties them."""
    shared: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    return [names for names in shared.values() if len(names) > 1]


def materialize(built: BuiltModel, plan: Plan) -> None:
    """Allocate every parameter and buffer as a fake CPU tensor (call inside FakeTensorMode + tracker)."""
    model = built.model
    groups = tied_groups(model)

    # A quantized Linear's 16-bit weight never lives on the GPU as such: drop it before allocation.
    for _, module in built.bnb4 + built.bnb8:
        module._parameters["weight"] = None

    model.to_empty(device="cpu")
    for names in groups:  # to_empty() allocates each occurrence separately: re-tie
        p = model.get_parameter(names[0])
        for other in names[1:]:
            _set_by_name(model, other, p)

    if built.bnb4:
        _quantize_4bit(built, plan)
    if built.bnb8:
        _quantize_8bit(built)

    built.param_names = {id(p): n for n, p in model.named_parameters()}


def _quantize_4bit(built: BuiltModel, plan: Plan) -> None:
    import bitsandbytes.functional as bF

    storage = built.compute_dtype
    for _, module in built.bnb4:
        w16 = torch.empty(module.out_features, module.in_features, dtype=built.model_dtype)
        packed, state = bF.quantize_4bit(
            w16, blocksize=64, compress_statistics=plan.double_quantization,
            quant_type=plan.quantization_type, quant_storage=storage,
        )
        del w16
        weight = nn.Parameter(packed, requires_grad=False)
        # the attributes of a bitsandbytes Params4bit that bitsandbytes and PEFT read
        weight.quant_state = state
        weight.quant_type = plan.quantization_type
        weight.blocksize = 64
        weight.compress_statistics = plan.double_quantization
        weight.quant_storage = storage
        weight.bnb_quantized = True
        weight.module = module
        weight.is_params4bit = True  # trainfit marker: LLaMA-Factory counts numel * 2 * itemsize
        module.weight = weight
        module.quant_state = state


def _quantize_8bit(built: BuiltModel) -> None:
    for _, module in built.bnb8:
        # Int8Params: CB int8 [out, in] (the parameter data) + SCB fp32 [out] row scales
        cb = torch.empty(module.out_features, module.in_features, dtype=torch.int8)
        scb = torch.empty(module.out_features, dtype=torch.float32)
        weight = nn.Parameter(cb, requires_grad=False)
        weight.CB = None
        weight.SCB = None
        weight.has_fp16_weights = False
        module.weight = weight
        module.state.CB = cb
        module.state.SCB = scb
        module.state.has_fp16_weights = False


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """LLaMA-Factory extras/misc.py::count_parameters: 4-bit weights count numel * 2 * storage itemsize."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if getattr(p, "is_params4bit", False) or p.__class__.__name__ == "Params4bit":
            storage = getattr(p, "quant_storage", None)
            itemsize = getattr(storage, "itemsize", None) or p.element_size()
            n = n * 2 * itemsize
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
