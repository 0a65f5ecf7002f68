"""Static terms: parameter counts (as LLaMA-Factory prints them), weights, adapters, gradients, optimizer states."""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

from ..errors import ConfigError
from ..models.arch import LinearSpec, expert_numels, layer_linears, param_counts
from ..schema import Arch, Plan
from ..units import alloc_bytes, ceil_div
from .precision import FP32, Setting, additional_targets, lora_targets

# ---------------------------------------------------------------------------------------------------
# Parameter counts (as LLaMA-Factory prints them)
# ---------------------------------------------------------------------------------------------------


def count_params(arch: Arch, plan: Plan) -> tuple[int, int]:
    """(trainable, all) exactly as LLaMA-Factory's log line `trainable params: .. || all params: ..`.

    [S] LLaMA-Factory `extras/misc.py::count_parameters`: sums `numel()` over `model.parameters()` (tied
    weights once) and multiplies a Params4bit's numel by 2 x storage itemsize, which undoes the 4-bit
    packing: `all` = the base model's true count + adapters. LoRA adds r x (in + out) per targeted Linear
    (lora_A [r, in], lora_B [out, r], no bias) [S] PEFT `tuners/lora/layer.py::LoraLayer.update_layer`.
    PEFT `modules_to_save` keeps the original module and adds a trainable copy (counted in both).
    """
    base = param_counts(arch).total
    if plan.finetuning_type == "full":
        return base, base
    targets = lora_targets(arch, plan)
    per_layer = sum(plan.lora_rank * (m.in_features + m.out_features) for m in layer_linears(arch) if m.name in targets)
    extra = sum(_module_numel(arch, name) for name in additional_targets(plan))
    trainable = per_layer * arch.num_hidden_layers + extra
    return trainable, base + trainable


def _module_numel(arch: Arch, name: str) -> int:
    if name in ("embed_tokens", "lm_head"):
        return arch.vocab_size * arch.hidden_size
    if name == "norm":
        return arch.hidden_size
    raise ConfigError(f"additional_target {name!r} is not modelled. Use embed_tokens, lm_head or norm, "
                      "or leave it unset.")


# ---------------------------------------------------------------------------------------------------
# Static terms: weights, adapters, gradients, optimizer states
# ---------------------------------------------------------------------------------------------------


def quant4_bytes(n: int, double_quant: bool) -> int:
    """One bitsandbytes 4-bit weight of n elements (blocksize 64), packed data + QuantState.

    [S] bitsandbytes `functional.py::quantize_4bit`: packed data of n/2 bytes held in ceil(n/4) elements of
    the storage dtype (LLaMA-Factory sets `bnb_4bit_quant_storage` = the 16-bit compute dtype); absmax fp32
    [ceil(n/64)]; the 16-entry NF4/FP4 code fp32 [16]. With double quantization (`compress_statistics`) the
    absmax is `quantize_blockwise(absmax - offset, blocksize=256)`: uint8 [blocks] + fp32 absmax2
    [ceil(blocks/256)] + fp32 dynamic code [256] + fp32 offset []. Each tensor is its own allocation.
    """
    blocks = ceil_div(n, 64)
    packed = alloc_bytes(ceil_div(n, 4) * 2)
    code = alloc_bytes(16 * FP32)
    if not double_quant:
        return packed + alloc_bytes(blocks * FP32) + code
    nested = (alloc_bytes(blocks) + alloc_bytes(ceil_div(blocks, 256) * FP32) + alloc_bytes(256 * FP32)
              + alloc_bytes(FP32))
    return packed + code + nested


def linear_weight_bytes(m: LinearSpec, st: Setting) -> int:
    """Bytes of one decoder Linear (weight + bias) as stored on the GPU.

    16-bit frozen: in*out x checkpoint bytes. Full fine-tuning: fp32 master (or bf16 with pure_bf16).
    4-bit: `quant4_bytes`. 8-bit [S] bitsandbytes `nn/modules.py::Int8Params`: CB int8 [out, in] + SCB fp32
    [out]. Biases stay in the checkpoint dtype ([S] transformers `integrations/bitsandbytes.py` replaces
    only the weight).
    """
    n = m.weight_numel
    bias = alloc_bytes(m.out_features * (st.train_w if st.full else st.ckpt_w)) if m.bias else 0
    if st.full:
        return alloc_bytes(n * st.train_w) + bias
    if st.quant == 4:
        return quant4_bytes(n, st.double_quant) + bias
    if st.quant == 8:
        return alloc_bytes(n) + alloc_bytes(m.out_features * FP32) + bias
    return alloc_bytes(n * st.ckpt_w) + bias


def base_weight_bytes(arch: Arch, st: Setting) -> dict[str, int]:
    """Frozen (LoRA) or trainable (full) model weights, by part.

    Only the decoder Linear layers are quantized; embed_tokens, lm_head and norms stay in the checkpoint
    dtype [S] transformers `integrations/bitsandbytes.py::get_keys_to_not_convert` (lm_head and tied
    weights skipped; nn.Embedding and norms are not Linear). Tied lm_head shares embed_tokens (counted once).
    """
    lin = layer_linears(arch)
    H, V, L = arch.hidden_size, arch.vocab_size, arch.num_hidden_layers
    norm = alloc_bytes(H * st.norm_w)
    qk = 0
    if arch.qk_norm:
        qk = (alloc_bytes(arch.q_dim * st.norm_w) + alloc_bytes(arch.kv_dim * st.norm_w) if arch.qk_norm_full
              else 2 * alloc_bytes(arch.head_dim * st.norm_w))
    embed = alloc_bytes(V * H * st.embed_w)
    parts = {
        "decoder_linears": L * sum(linear_weight_bytes(m, st) for m in lin),
        "norms": L * (arch.norms_per_layer * norm + qk) + norm,
        "embed_tokens": embed,
        "lm_head": 0 if arch.tie_word_embeddings else embed,
    }
    if arch.vision is not None:
        parts["vision_tower"] = vision_weight_bytes(arch, st)
    if arch.is_moe:
        parts["experts"] = L * expert_weight_bytes(arch, st)
    return parts


def vision_weight_bytes(arch: Arch, st: Setting) -> int:
    """The frozen vision tower and merger of a Qwen2.5-VL model in the checkpoint dtype, one allocation per
    parameter tensor (shapes: models.arch.VisionParamCounts). LLaMA-Factory leaves frozen parameters in the
    dtype they were loaded in ([S] model/adapter.py::_setup_lora_tuning upcasts only trainable ones)."""
    v = arch.vision
    h, i, m2, w = v.hidden_size, v.intermediate_size, v.spatial_merge_size ** 2, st.ckpt_w
    patch = alloc_bytes(v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * h * w)
    block = (2 * alloc_bytes(h * w) + alloc_bytes(3 * h * h * w) + alloc_bytes(3 * h * w) + alloc_bytes(h * h * w)
             + alloc_bytes(h * w) + 2 * (alloc_bytes(h * i * w) + alloc_bytes(i * w)) + alloc_bytes(i * h * w)
             + alloc_bytes(h * w))
    merger = (alloc_bytes(h * w) + alloc_bytes(h * m2 * h * m2 * w) + alloc_bytes(h * m2 * w)
              + alloc_bytes(h * m2 * v.out_hidden_size * w) + alloc_bytes(v.out_hidden_size * w))
    return patch + v.depth * block + merger


def expert_weight_bytes(arch: Arch, st: Setting) -> int:
    """One MoE layer's expert and router weights, resident whatever the top-k: all E experts.

    They are nn.Parameters (3-D `gate_up_proj`/`down_proj`, 2-D router `weight`), not nn.Linear, so bitsandbytes
    leaves them in the checkpoint dtype under 4- and 8-bit loading ([S] transformers v5
    integrations/bitsandbytes.py::replace_with_bnb_linear swaps nn.Linear modules only; [T] a 4-bit OLMoE layer keeps
    both expert tensors bf16). Full fine-tuning: trainable, in the trainable dtype (fp32 master unless pure_bf16).
    """
    w = st.train_w if st.full else st.ckpt_w
    return sum(alloc_bytes(n * w) for n in expert_numels(arch))


def trainable_tensor_numels(arch: Arch, plan: Plan, st: Setting) -> tuple[tuple[int, int, int], ...]:
    """(numel, count, bytes per element) of the trainable parameter tensors (one gradient and one
    optimizer-state set each). LoRA A/B are fp32; full fine-tuning and PEFT's `modules_to_save` copies have
    the trainable dtype (fp32, or the checkpoint dtype under pure_bf16) [T]."""
    return _trainable_numels(arch, st.full, st.targets, st.rank, tuple(additional_targets(plan)), st.lora_w, st.train_w)


@lru_cache(maxsize=4096)
def _trainable_numels(arch: Arch, full: bool, targets: tuple[str, ...], rank: int, additional: tuple[str, ...],
                      lora_w: int, train_w: int) -> tuple[tuple[int, int, int], ...]:
    counts: Counter[tuple[int, int]] = Counter()
    L = arch.num_hidden_layers
    lin = layer_linears(arch)
    if full:
        pc = param_counts(arch)
        for m in lin:
            counts[m.weight_numel, train_w] += L
            if m.bias:
                counts[m.out_features, train_w] += L
        counts[arch.hidden_size, train_w] += L * arch.norms_per_layer + 1
        if arch.qk_norm and arch.qk_norm_full:
            counts[arch.q_dim, train_w] += L
            counts[arch.kv_dim, train_w] += L
        elif arch.qk_norm:
            counts[arch.head_dim, train_w] += 2 * L
        for n in expert_numels(arch) if arch.is_moe else ():
            counts[n, train_w] += L
        counts[pc.embed, train_w] += 1
        if pc.lm_head:
            counts[pc.lm_head, train_w] += 1
    else:
        for m in lin:
            if m.name in targets:
                counts[rank * m.in_features, lora_w] += L
                counts[m.out_features * rank, lora_w] += L
        for name in additional:
            counts[_module_numel(arch, name), train_w] += 1
    return tuple(sorted((n, k, w) for (n, w), k in counts.items()))


def _sum_alloc(groups: tuple[tuple[int, int, int], ...]) -> int:
    return sum(k * alloc_bytes(n * w) for n, k, w in groups)


def adapter_bytes(arch: Arch, plan: Plan, st: Setting) -> int:
    """Trainable parameters that are not base weights: LoRA A/B (fp32: [S] PEFT mapping.py::get_peft_model,
    autocast_adapter_dtype=True) and the trainable copies PEFT makes for `additional_target`
    ([S] PEFT utils/other.py::ModulesToSaveWrapper)."""
    if st.full:
        return 0
    return _sum_alloc(trainable_tensor_numels(arch, plan, st))


def grad_bytes(arch: Arch, plan: Plan, st: Setting) -> int:
    """One gradient per trainable tensor, in the parameter's dtype (AccumulateGrad stores `param.grad`
    with the param's dtype; under autocast the cast's backward returns fp32 for fp32 params)."""
    return _sum_alloc(trainable_tensor_numels(arch, plan, st))


# [S] bitsandbytes optim/optimizer.py::Optimizer8bit: `min_8bit_size=4096`: smaller params keep 32-bit
# states; 8-bit states use blockwise quantization with 256-element blocks (absmax fp32 per block) and
# share one 256-entry fp32 quantization map per state.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256


def optimizer_state_bytes(arch: Arch, plan: Plan, st: Setting) -> int:
    """Optimizer states after the first step.

    adamw_torch / adamw_torch_fused [S] torch `optim/adamw.py::_init_group`: exp_avg and exp_avg_sq with
    the param's dtype; `step` is a device fp32 scalar when fused (one 512 B block each), a CPU tensor
    otherwise. adamw_8bit / paged_adamw_8bit [S] bitsandbytes `optim/optimizer.py::Optimizer2State.init_state`:
    state1/state2 uint8 + absmax1/absmax2 fp32 per 256 block; tensors under 4096 elements keep fp32
    states. Paged states are CUDA managed memory, invisible to torch's allocator (counted in the device
    peak only). sgd (HF passes no momentum) keeps no state.
    """
    groups = trainable_tensor_numels(arch, plan, st)
    if plan.optim in ("adamw_torch", "adamw_torch_fused"):
        step = alloc_bytes(FP32) if plan.optim == "adamw_torch_fused" else 0
        return 2 * _sum_alloc(groups) + sum(k for _, k, _ in groups) * step
    if plan.optim in ("adamw_8bit", "adamw_bnb_8bit"):
        return _bnb8_state_bytes(groups)
    return 0  # paged_adamw_8bit (managed memory, see paged_state_bytes) and sgd


def _bnb8_state_bytes(groups: tuple[tuple[int, int, int], ...]) -> int:
    total = 2 * alloc_bytes(256 * FP32)  # qmap1, qmap2
    for n, k, _ in groups:
        if n < BNB_MIN_8BIT_SIZE:
            total += k * 2 * alloc_bytes(n * FP32)
        else:
            total += k * (2 * alloc_bytes(n) + 2 * alloc_bytes(ceil_div(n, BNB_BLOCK) * FP32))
    return total


def paged_state_bytes(arch: Arch, plan: Plan, st: Setting) -> int:
    """paged_adamw_8bit states live in CUDA managed memory (device peak only)."""
    if plan.optim != "paged_adamw_8bit":
        return 0
    return _bnb8_state_bytes(trainable_tensor_numels(arch, plan, st))


def optimizer_step_temp_bytes(arch: Arch, plan: Plan, st: Setting) -> int:
    """Temporaries of clip + optimizer.step on top of params, grads and states.

    Clipping [S] torch `nn/utils/clip_grad.py::_get_total_norm`: `torch._foreach_norm` returns one fp32
    scalar per grad (512 B each), then `stack` + `vector_norm`. adamw_torch (foreach, the CUDA default)
    [S] torch `optim/adamw.py::_multi_tensor_adamw`: `exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs)`
    allocates one tensor per param (the same bytes as one state); all other foreach ops are in place.
    Fused AdamW and 8-bit AdamW update in place.
    """
    groups = trainable_tensor_numels(arch, plan, st)
    n_tensors = sum(k for _, k, _ in groups)
    clip = 0
    if plan.max_grad_norm > 0:
        clip = n_tensors * alloc_bytes(FP32) + alloc_bytes(n_tensors * FP32) + alloc_bytes(FP32)
    foreach = _sum_alloc(groups) if plan.optim == "adamw_torch" else 0
    return clip + foreach
