"""A mixture-of-experts MLP block, op by op: the router and the grouped-GEMM expert path of transformers v5.

[S] transformers v5 models/qwen3_moe/modeling_qwen3_moe.py (Qwen3MoeSparseMoeBlock, Qwen3MoeTopKRouter), the
Mixtral and OLMoE equivalents, and integrations/moe.py::grouped_mm_experts_forward: the experts implementation
`from_pretrained` picks by default (modeling_utils.py::get_correct_experts_implementation: "grouped_mm" unless
another is requested; LLaMA-Factory requests none). It runs on CUDA sm80+ (`_can_use_grouped_mm`) and the CPU
trace takes the same path (torch >= 2.11 has a CPU kernel), so the trace sees what the GPU runs.

Shapes: N tokens, H hidden, E experts, k = num_experts_per_tok, I = one expert's width, S = N k routed rows.
Only the routed rows go through the experts (S x (2I + I + H) activations, not E x N); all E experts' weights are
resident (memory/static.py::expert_weight_bytes).
"""

from __future__ import annotations

from dataclasses import replace

from ..models.arch import LinearSpec
from ..schema import Arch
from ..units import alloc_bytes
from .autograd import Walk, gated_mlp, linear_op, promote
from .precision import FP32, Setting

INT64 = 8  # torch.sort / topk indices and the permutation tensors are int64
INT32 = 4  # the CUDA histc input (`expert_ids_g.int()`) and the int32 cumsum offsets


def moe_block(w: Walk, arch: Arch, st: Setting, x: str, x_b: int, lin: dict) -> tuple[str, int]:
    """(Shared expert +) router + experts on the post-attention norm output `x` (`x_b` bytes/elem, held by the
    caller's frame for the whole block and dropped here at the end). Returns the block output and its element
    size. `lin`: the layer's Linear specs by name (the shared expert's)."""
    N, H, E, k = st.tokens, arch.hidden_size, arch.num_experts, arch.num_experts_per_tok
    S = N * k
    shared = None
    if arch.shared_expert_intermediate_size:  # Qwen2-MoE runs its shared expert first
        shared, shared_b = _shared_expert(w, arch, st, x, x_b, lin)
    # --- router: F.linear(x, weight) (autocast applies), softmax in fp32, top-k ---------------------------------
    # The router weight is an nn.Parameter of a `*TopKRouter` module: never quantized, never a LoRA target; its
    # F.linear saves what a frozen (or, full FT, trainable) Linear's does.
    router = LinearSpec("gate", H, E, False, "moe")
    logits, lg_b = linear_op(w, replace(st, quant=None, targets=()), router, x, x_b, N, from_norm=True)
    # Qwen3/OLMoE `softmax(logits, dtype=torch.float)` and Mixtral `softmax(logits.float())` both copy the logits
    # to fp32 first (aten softmax with dtype converts its input; only fp16 on CUDA has a half_to_float kernel);
    # softmax saves its output.
    src = logits
    if lg_b != FP32 and not (st.fp16 and lg_b == 2 and not arch.router_scores_fp32):
        src = w.op("router_logits_f32", N * E * FP32, ins=(logits,))
    w.drop(logits)
    probs = w.op("router_probs", N * E * FP32, ins=(src,), save_out=True)
    if src != logits:
        w.drop(src)
    # topk saves its int64 indices; the values are fp32 [N, k]
    idx = w.op("topk_indices", N * k * INT64)
    top = w.op("topk_values", N * k * FP32, ins=(probs,), saves=(idx,))
    w.drop(probs)
    if arch.norm_topk_prob:
        # `top /= top.sum(-1, keepdim=True)`: the in-place div saves its divisor and a clone of the original
        # values (autograd's `original_self` for an in-place op whose formula reads self)
        den = w.op("topk_sum", N * FP32, ins=(top,))
        orig = w.op("topk_values_orig", N * k * FP32)
        top2 = w.op("topk_normed", N * k * FP32, ins=(top, den), saves=(orig, den), alias=True)
        w.drop(den, orig, top)
        top = top2
    sw_b = FP32
    if not arch.router_scores_fp32:  # `.to(router_logits.dtype)`
        top2 = w.op("routing_weights", N * k * lg_b, ins=(top,))
        w.drop(top)
        top, sw_b = top2, lg_b
    out, out_b = _experts(w, arch, st, x, x_b, idx, top, sw_b, S)
    w.drop(idx, top)
    if shared is not None:
        # sigmoid(shared_expert_gate(x)) * shared: sigmoid saves its output, the product saves both factors
        g, g_b = linear_op(w, st, lin["shared_expert_gate"], x, x_b, N, from_norm=True)
        sig = w.op("shared_gate_sigmoid", N * g_b, ins=(g,), save_out=True)
        w.drop(g)
        gated = w.op("shared_gated", N * H * promote(g_b, shared_b), ins=(sig, shared), saves=(sig, shared))
        w.drop(sig, shared)
        total = w.op("experts_plus_shared", N * H * promote(out_b, shared_b), ins=(out, gated), alias=True)
        w.drop(out, gated)
        out, out_b = total, promote(out_b, shared_b)
    w.drop(x)
    return out, out_b


def _shared_expert(w: Walk, arch: Arch, st: Setting, x: str, x_b: int, lin: dict) -> tuple[str, int]:
    """Qwen2MoeMLP: the decoder's gated MLP of nn.Linear layers (autograd.gated_mlp) at the shared expert's width."""
    return gated_mlp(w, st, lin, x, x_b, st.tokens, arch.shared_expert_intermediate_size, prefix="shared_")


def _experts(w: Walk, arch: Arch, st: Setting, x: str, x_b: int, idx: str, sw: str, sw_b: int,
             S: int) -> tuple[str, int]:
    """[S] transformers integrations/moe.py::grouped_mm_experts_forward, with the Python locals it keeps until it
    returns. `_grouped_mm` runs outside autocast: it casts its input to the weight dtype (`input.to(weight.dtype)`),
    so full fine-tuning computes the experts in fp32."""
    N, H, E, I = st.tokens, arch.hidden_size, arch.num_experts, arch.moe_intermediate_size
    w_b = st.train_w if st.full else st.ckpt_w
    # full fine-tuning: each grouped_mm's backward leaves its expert weight's gradient
    g_up = alloc_bytes(E * 2 * I * H * w_b) if st.full else 0
    g_down = alloc_bytes(E * H * I * w_b) if st.full else 0
    # sort(expert_ids) -> sorted ids + perm (int64 [S]); `perm // k` (int64 [S]) gathers the token rows
    ids_g = w.op("expert_ids_sorted", S * INT64)
    perm = w.op("perm", S * INT64)
    rows = w.op("perm_div_k", S * INT64)
    sel = w.op("selected_rows", S * H * x_b, ins=(x,), saves=(rows,))
    w.drop(rows)
    sw_g = w.op("selected_weights", S * sw_b, ins=(sw,), saves=(perm,))
    # histc over `expert_ids_g.int()` (int32 [S]) -> tokens per expert [E] -> int32 cumsum offsets [E]
    hist_in = w.op("histc_in", S * INT32)
    hist = w.op("tokens_per_expert", E * INT32)
    offs = w.op("offsets", E * INT32)
    # --- up projection: grouped_mm(sel.to(weight dtype), gate_up_proj) -> [S, 2I] ----------------------------------
    a = sel
    if x_b != w_b:
        a = w.op("experts_in_cast", S * H * w_b, ins=(sel,))
    # a frozen weight needs only itself (a parameter) for the input's gradient; a trainable one saves the input
    up = w.op("gate_up_out", S * 2 * I * w_b, ins=(a,), saves=(a,) if st.full else (), params=g_up)
    if a != sel:
        w.drop(a)
    # `_apply_gate`: gate, up = chunk(2) (views); act_fn(gate) saves gate; act * up saves both (views keep the
    # [S, 2I] output alive)
    act = w.op("expert_act", S * I * w_b, ins=(up,), saves=(up,))
    prod = w.op("expert_act_mul_up", S * I * w_b, ins=(act, up), saves=(act, up))
    w.drop(act, up)
    down = w.op("down_out", S * H * w_b, ins=(prod,), saves=(prod,) if st.full else (), params=g_down)
    w.drop(prod)
    # weighted = down * sample_weights_g.unsqueeze(-1): saves both (the routing weights need grad)
    wt_b = promote(w_b, sw_b)
    weighted = w.op("weighted_out", S * H * wt_b, ins=(down, sw_g), saves=(down, sw_g))
    # inv_perm = empty_like(perm); inv_perm[perm] = arange(S) (int64 [S] transient)
    inv = w.op("inv_perm", S * INT64)
    w.tmp(S * INT64)
    unperm = w.op("weighted_unpermuted", S * H * wt_b, ins=(weighted,), saves=(inv,))
    w.drop(weighted)
    # view(N, k, H).sum(dim=1) keeps the dtype; `.to(hidden_states.dtype)`
    summed = w.op("experts_sum", N * H * wt_b, ins=(unperm,))
    out, out_b = summed, wt_b
    if wt_b != x_b:
        out = w.op("experts_out_cast", N * H * x_b, ins=(summed,))
        out_b = x_b
    # the function returns: its locals die (those autograd saved stay)
    w.drop(ids_g, perm, sel, sw_g, hist_in, hist, offs, down, inv, unperm)
    if out != summed:
        w.drop(summed)
    return out, out_b
