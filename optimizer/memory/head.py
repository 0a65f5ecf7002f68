"""Outside the decoder layers: shared RoPE tables, final norm, logits and the loss."""

from __future__ import annotations

from dataclasses import dataclass

from ..schema import Arch, Plan
from ..units import alloc_bytes, ceil_div
from .autograd import Walk, norm_op, promote
from .precision import FP32, Setting, additional_targets

# ---------------------------------------------------------------------------------------------------
# Outside the decoder layers: shared RoPE tables, final norm, logits and the loss
# ---------------------------------------------------------------------------------------------------


def shared_forward_bytes(arch: Arch, st: Setting) -> int:
    """Tensors made once per forward and kept by every layer's graph.

    [S] transformers llama `LlamaRotaryEmbedding.forward`: cos and sin [b, s, head_dim] in the hidden
    dtype; every layer's `q * cos` saves them. Eager attention adds the 4-D causal mask [b, 1, s, s]
    ([S] transformers masking_utils.py::eager_mask, hidden dtype).
    """
    b, s = st.batch, st.seq
    rope = 2 * alloc_bytes(b * s * arch.rotary_dim * st.stream)  # GLM-4: [b, s, rotary_dim]
    # (neat_packing's mask replaces eager's own: `attention_mask_bytes`)
    mask = alloc_bytes(b * s * s * st.stream) if st.attn == "eager" and st.mask == "none" else 0
    return rope + mask


def attention_mask_bytes(st: Setting) -> int:
    """The 4-D attention mask sdpa gets (`st.mask`, memory/precision.py::attention_mask_kind), made once per step.

    bool: [b, 1, s, s] torch.bool ([S] transformers masking_utils.py::sdpa_mask: the causal and padding mask
    functions broadcast over (batch, head 1, q, kv), then `.expand`). float: LLaMA-Factory's block-diagonal
    neat_packing mask [b, 1, s, s] in its compute dtype, bf16 or fp16 ([S] LLaMA-Factory data/collator.py::
    prepare_4d_attention_mask, built on the CPU by the collator; the Trainer moves the batch to the GPU)."""
    b, s = st.batch, st.seq
    if st.mask == "bool":
        return alloc_bytes(b * s * s)
    if st.mask == "float":
        return alloc_bytes(b * s * s * 2)
    return 0


@dataclass(frozen=True)
class HeadActivations:
    final_norm_saved: int  # final norm's saved tensors (+ the lm_head input when the lm_head trains)
    weight_cast: int  # the lm_head weight cast to the compute dtype, saved for backward (0 when none)
    forward_end_extra: int  # the logits while the lm_head has just run (+ its input, held by the outputs)
    loss_peak_extra: int  # peak of the loss computation (logits, fp32 upcast, log-softmax, lm_head input)
    loss_saved: int  # what the loss keeps for backward
    ce_backward_extra: int  # peak of the cross-entropy backward, on top of loss_saved
    lm_head_backward_extra: int  # after CE backward: grad of logits + grad of the hidden states
    logit_bytes: int = 2  # bytes per element of the lm_head output (the logits)


def head_activations(arch: Arch, plan: Plan, st: Setting) -> HeadActivations:
    """Final norm, lm_head, loss; forward and backward.

    [S] transformers loss/loss_utils.py::ForCausalLMLoss: `logits = logits.float()`, labels padded and
    shifted (no copy of the logits), `cross_entropy` = log_softmax (saved, fp32 [N, V]) + nll_loss.
    [S] accelerate utils/operations.py::convert_outputs_to_fp32 (applied by Accelerator.prepare_model under
    bf16/fp16): the model's outputs, logits included, are converted to fp32 before HF Trainer drops them.
    Backward: nll_loss_backward writes a dense fp32 [N, V] gradient and _log_softmax_backward_data another
    while the saved log-softmax is alive (3 x 4NV); then the fp32 gradient is cast back to the logits dtype.
    Liger's fused linear cross-entropy ([S] liger_kernel/ops/fused_linear_cross_entropy.py) never holds
    the full logits: it processes chunks of ceil(N / ceil(N*V/ (N*H))) rows ... see `_liger_chunk_bytes`.
    """
    N, H, V = st.tokens, arch.hidden_size, arch.vocab_size
    w = Walk()
    x = w.leaf("last_hidden", N * H * st.stream, requires_grad=True)
    h, h_b = norm_op(w, st, x, st.stream, N * H, N, st.full)
    w.drop(x)
    # saved for backward; the lm_head input itself is only referenced until forward returns (loss phase),
    # unless the lm_head trains (full fine-tuning, additional_target lm_head): then it saves its input
    lm_train = lm_head_trains(arch, plan, st)
    final_saved = sum(v for k, v in w.live.items() if w.savers.get(k) or (lm_train and k == h))
    held_out = 0 if (w.savers.get(h) or lm_train) else w.live[h]
    if plan.enable_liger_kernel:
        chunk = _liger_chunk_bytes(arch, st)
        return HeadActivations(final_saved, 0, chunk + held_out, chunk + held_out, alloc_bytes(N * H * st.c), chunk,
                               alloc_bytes(N * H * st.c))
    lw = st.train_w if lm_train else st.embed_w
    logit_b = st.c if st.amp else promote(h_b, lw)
    logits_nv = N * V
    fwd_end = alloc_bytes(logits_nv * logit_b)
    wcast = 0
    if st.mixed16 or (st.amp and lw != st.c):
        # the lm_head weight is cast to the autocast dtype (cached when it trains) and saved for backward
        wcast = alloc_bytes(V * H * st.c)
    peak = fwd_end
    cur = fwd_end
    if plan.upcast_lmhead_output and logit_b != FP32:
        # [S] LLaMA-Factory model/model_utils/checkpointing.py: a forward hook returns output.to(float32)
        peak = max(peak, cur + alloc_bytes(logits_nv * FP32))
        cur, logit_b = alloc_bytes(logits_nv * FP32), FP32
    saved = 0
    if arch.final_logit_softcapping:
        # [S] transformers gemma2 `Gemma2ForCausalLM.forward`: logits / cap, tanh (saves its output), * cap
        t = alloc_bytes(logits_nv * logit_b)
        peak = max(peak, cur + 2 * t)
        saved += t
        cur = t + saved
    up = alloc_bytes(logits_nv * FP32) if logit_b != FP32 else 0
    lsm = alloc_bytes(logits_nv * FP32)
    peak = max(peak, cur + up + lsm)
    saved += lsm
    if st.amp:  # accelerate converts the outputs (logits) to fp32 at forward return
        peak = max(peak, cur + saved + (alloc_bytes(logits_nv * FP32) if logit_b != FP32 else 0))
    ce_bwd = 2 * alloc_bytes(logits_nv * FP32)  # nll grad + log_softmax grad, on top of the saved lsm
    # lm_head backward: the fp32 logits gradient cast back to the logits dtype, then the input gradient and,
    # when the lm_head trains, its weight gradient (in the compute dtype, then fp32 through the cast's
    # backward under autocast) [T]
    d_log = alloc_bytes(logits_nv * logit_b)
    d_x = alloc_bytes(N * H * st.c)
    lm_bwd = alloc_bytes(logits_nv * FP32) + (d_log if logit_b != FP32 else 0)
    if lm_train:
        # the matmul's backward: logits gradient + input gradient + weight gradient (compute dtype), with the
        # saved input and cast weight; then, those freed, the cast's backward makes the fp32 weight gradient
        cast = st.amp and st.train_w != st.c
        dw_c = alloc_bytes(V * H * st.c)
        at_mm = d_log + d_x + dw_c
        at_cast = d_x + dw_c + alloc_bytes(V * H * st.train_w) - alloc_bytes(V * H * st.c) - w.live[h] if cast else 0
        lm_bwd = max(lm_bwd, at_mm, at_cast)
    else:
        lm_bwd = max(lm_bwd, d_log + d_x)
    return HeadActivations(final_saved, wcast, fwd_end + held_out, peak + held_out, saved, ce_bwd, lm_bwd,
                           st.c if st.amp else promote(h_b, lw))


def lm_head_trains(arch: Arch, plan: Plan, st: Setting) -> bool:
    """Full fine-tuning, or `additional_target` naming lm_head (PEFT's trainable copy)."""
    return st.full or "lm_head" in additional_targets(plan)


def _liger_chunk_bytes(arch: Arch, st: Setting) -> int:
    """Liger fused linear cross-entropy working set.

    [S] liger_kernel/ops/fused_linear_cross_entropy.py::fused_linear_cross_entropy_forward:
    inc_factor = ceil(V / H); chunk_size = next_power_of_2(ceil(N / inc_factor)); per chunk it allocates
    the chunk's logits in the input dtype and computes the gradient in place; it also allocates
    grad_input [N, H] and grad_weight [V, H] (fp32 when the weight trains; not for a frozen lm_head).
    """
    N, H, V = st.tokens, arch.hidden_size, arch.vocab_size
    inc = ceil_div(V, H)
    chunk = 1 << max(0, (ceil_div(N, inc) - 1).bit_length())
    return alloc_bytes(chunk * V * st.c) + alloc_bytes(chunk * V * FP32) + alloc_bytes(N * H * st.c)
