"""One decoder layer's activations: the forward walk (attention + MLP) and its backward replay."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..models.arch import layer_linears
from ..schema import Arch
from ..units import alloc_bytes
from .autograd import Walk, gated_mlp, linear_op, norm_op, promote
from .moe import moe_block
from .precision import FP32, Setting


@dataclass(frozen=True)
class LayerActivations:
    saved_bytes: int  # what one layer keeps for backward (its input included when saved)
    peak_bytes: int  # peak live bytes of the forward walk, the input included
    output_bytes: int
    input_bytes: int
    backward_peak_bytes: int  # peak of the layer's backward over its saved tensors + output gradient
    param_grad_bytes: int  # parameter gradients the layer's backward leaves
    backward_peak_accum_bytes: int  # the same peak in a later micro-batch: new parameter gradients are transient


@lru_cache(maxsize=8192)
def layer_forward(arch: Arch, st: Setting, no_grad: bool = False) -> LayerActivations:
    """Walk one decoder layer's forward (and, with grad, replay its backward). The layer input `x` is live at
    start and held by the caller: x -> attention block -> + x -> MLP block -> + (the first sum)."""
    N, H = st.batch * st.seq, arch.hidden_size
    w = Walk(no_grad=no_grad)
    x = w.leaf("x", N * H * st.stream, requires_grad=True)
    lin = {m.name: m for m in layer_linears(arch)}
    o_out, o_b = _attention_block(w, arch, st, lin, x)
    res_b = promote(st.stream, o_b)
    h1 = w.op("resid1", N * H * res_b, ins=(x, o_out), alias=True)
    w.drop(o_out)
    d_out, d_b = _mlp_block(w, arch, st, lin, h1, res_b)
    out = w.op("resid2", N * H * promote(res_b, d_b), ins=(h1, d_out), alias=True)
    w.drop(d_out, h1)
    # After the layer returns, the caller drops its input: what stays is what autograd saved (the input
    # too when a norm saved it as its own fp32 view) and the output.
    saved = w.saved_bytes()
    bwd_peak, pgrads = (0, 0) if no_grad else w.backward(out)
    bwd_peak_accum = 0 if no_grad else w.backward(out, accumulate=True)[0]
    return LayerActivations(
        saved_bytes=saved,
        peak_bytes=w.peak,
        output_bytes=w.live[out],
        input_bytes=alloc_bytes(N * H * st.stream),
        backward_peak_bytes=bwd_peak,
        param_grad_bytes=pgrads,
        backward_peak_accum_bytes=bwd_peak_accum,
    )


def _attention_block(w: Walk, arch: Arch, st: Setting, lin: dict, x: str) -> tuple[str, int]:
    """input_layernorm -> q/k/v projections (+ q/k norms) -> RoPE -> attention -> o_proj (+ Gemma's
    post-attention norm). Returns the block's output and its element size; `x` stays live."""
    b, s = st.batch, st.seq
    N = b * s
    H = arch.hidden_size
    nh = arch.num_attention_heads
    trainable = st.full
    h, h_b = norm_op(w, st, x, st.stream, N * H, N, trainable)
    qd, kvd = arch.q_dim, arch.kv_dim
    qkv = None
    if arch.fused_qkv:
        qkv, qkv_b = linear_op(w, st, lin["qkv_proj"], h, h_b, N, from_norm=True)
        # Phi-3 slices q/k/v as views of the fused output: the fused tensor stays alive while any is used.
        q, k, v, q_b = qkv, qkv, qkv, qkv_b
        k_b = v_b = qkv_b
    else:
        q, q_b = linear_op(w, st, lin["q_proj"], h, h_b, N, from_norm=True)
        k, k_b = linear_op(w, st, lin["k_proj"], h, h_b, N, from_norm=True)
        v, v_b = linear_op(w, st, lin["v_proj"], h, h_b, N, from_norm=True)
    w.drop(h)
    if arch.qk_norm:
        # per head (rows N x heads), or OLMoE's norms over the whole projection (rows N)
        q_rows, k_rows = (N, N) if arch.qk_norm_full else (N * nh, N * arch.num_key_value_heads)
        q2, q_b = norm_op(w, st, q, q_b, N * qd, q_rows, trainable)
        k2, k_b = norm_op(w, st, k, k_b, N * kvd, k_rows, trainable)
        if not arch.fused_qkv:
            w.drop(q, k)
        q, k = q2, k2
    # RoPE [S] transformers llama `apply_rotary_pos_emb`: q*cos + rotate_half(q)*sin, cos/sin in the stream
    # dtype (shared by all layers, see `shared_forward_bytes`); the muls save only cos/sin (no grad).
    rope_b = promote(q_b, st.stream)

    def rope(t: str, dim: int) -> str:
        a = w.op("rope_cos", N * dim * rope_b, ins=(t,))
        neg = w.op("rope_neg", N * dim // 2 * q_b, ins=(t,))
        cat = w.op("rope_cat", N * dim * q_b, ins=(neg,))
        w.drop(neg)
        bsin = w.op("rope_sin", N * dim * rope_b, ins=(cat,))
        w.drop(cat)
        out = w.op("rope_out", N * dim * rope_b, ins=(a, bsin), alias=True)
        w.drop(a, bsin)
        return out

    if arch.partial_rotary_factor < 1:
        qe, ke = _partial_rope(w, arch, st, (q, qd), (k, kvd), q_b, rope_b)
        w.drop(q, k)
    else:
        qe = rope(q, qd)
        if not arch.fused_qkv or arch.qk_norm:
            w.drop(q)
        ke = rope(k, kvd)
        if not arch.fused_qkv or arch.qk_norm:
            w.drop(k)
    a_b = st.c if st.amp else rope_b
    if st.attn == "sdpa":
        attn_out = _sdpa(w, arch, st, (qe, qd, rope_b), (ke, kvd, rope_b), (v, kvd, v_b), a_b)
        # Phi-3's RoPE ends in torch.cat too, even rotating every channel ([S] transformers models/phi3/
        # modeling_phi3.py::apply_rotary_pos_emb: `torch.cat([(q_rot * cos) + (rotate_half(q_rot) * sin), q_pass],
        # dim=-1)`, q_pass empty)
        if st.mask == "none" and (arch.partial_rotary_factor < 1 or arch.model_type == "phi3"):
            # GLM-4's query is torch.cat's contiguous [b, nh, s, hd]; without a mask sdpa runs the flash kernel,
            # whose output takes the query's layout ([S] torch/_meta_registrations.py::
            # meta__scaled_dot_product_flash_attention: `torch.empty_like(query)`), so the caller's
            # `.transpose(1, 2)...contiguous()` copies it. With a mask the memory-efficient kernel writes
            # [b, s, nh, hd] whatever the query (meta__scaled_dot_product_efficient_attention: `empty(B, M,
            # num_heads, Kv).transpose(1, 2)`): no copy.
            a2 = w.op("attn_out_contiguous", N * qd * a_b, ins=(attn_out,), alias=True)
            w.drop(attn_out)
            attn_out = a2
    else:
        attn_out = _eager_attention(w, arch, st, qe, ke, v, rope_b, v_b, a_b)
    if qkv is not None:
        w.drop(qkv)
    o_out, o_b = linear_op(w, st, lin["o_proj"], attn_out, a_b, N)
    w.drop(attn_out)
    # Gemma 2/3: post_attention_layernorm on the attention output; GLM-4: post_self_attn_layernorm
    if arch.norms_per_layer == 4:
        o2, o_b = norm_op(w, st, o_out, o_b, N * H, N, trainable)
        w.drop(o_out)
        o_out = o2
    return o_out, o_b


def _partial_rope(w: Walk, arch: Arch, st: Setting, q: tuple, k: tuple, q_b: int, rope_b: int) -> tuple[str, str]:
    """GLM-4's RoPE on the first rotary_dim channels of each head, adjacent pairs rotated.

    [S] transformers models/glm4/modeling_glm4.py::apply_rotary_pos_emb: cos/sin [b, s, rotary_dim] (shared, see
    `shared_forward_bytes`) become `cos[..., :r/2].repeat_interleave(2, -1)` [b, 1, s, r] in the stream dtype, once
    per layer, saved by the muls; per tensor t: t_rot * cos, rotate_half = stack((-x[..., 1::2], x[..., 0::2]), -1)
    .flatten(-2) (the negation, then the stacked copy; flatten is a view), * sin, +, then torch.cat([t_embed,
    t_pass], -1) writes the full-width result. q and k (the projections' outputs) stay referenced by the function's
    arguments until both are done. `q`, `k`: (tensor, width)."""
    N = st.batch * st.seq
    r = arch.rotary_dim
    cos_r = w.op("rope_cos_rep", N * r * st.stream)
    sin_r = w.op("rope_sin_rep", N * r * st.stream)
    rotated = []
    for t, dim in (q, k):
        n_rot = N * dim // arch.head_dim * r
        a = w.op("rope_cos", n_rot * rope_b, ins=(t,), saves=(cos_r,))
        neg = w.op("rope_neg", n_rot // 2 * q_b, ins=(t,))
        stk = w.op("rope_stack", n_rot * q_b, ins=(neg, t))
        w.drop(neg)
        bsin = w.op("rope_sin", n_rot * rope_b, ins=(stk,), saves=(sin_r,))
        w.drop(stk)
        e = w.op("rope_out", n_rot * rope_b, ins=(a, bsin), alias=True)
        w.drop(a, bsin)
        rotated.append(e)
    out = []
    for e, (t, dim) in zip(rotated, (q, k)):
        out.append(w.op("rope_cat", N * dim * rope_b, ins=(e, t)))
        w.drop(e)
    w.drop(cos_r, sin_r)
    return out[0], out[1]


def _sdpa(w: Walk, arch: Arch, st: Setting, q: tuple, k: tuple, v: tuple, a_b: int) -> str:
    """[S] transformers integrations/sdpa_attention.py: without a mask is_causal and GQA via enable_gqa; the CUDA
    flash kernel saves q, k, v, out and the fp32 logsumexp [b, nh, s]. With a mask (`st.mask`, see
    precision.attention_mask_kind) the memory-efficient kernel runs on repeated K/V and saves the mask too.
    Output is laid out [b, s, nh, hd] so
    `.transpose(1, 2).contiguous()` copies nothing. `q`, `k`, `v`: (tensor, width, element size)."""
    b, s, c = st.batch, st.seq, st.c
    N = b * s
    originals = []
    if st.mask != "none" and arch.num_key_value_heads < arch.num_attention_heads:
        # [S] transformers integrations/sdpa_attention.py::use_gqa_in_sdpa is False on CUDA with a mask, so
        # repeat_kv copies K and V to every head before sdpa (autocast casts the copies inside sdpa)
        k2 = w.op("sdpa_repeat_k", N * arch.q_dim * k[2], ins=(k[0],))
        v2 = w.op("sdpa_repeat_v", N * arch.q_dim * v[2], ins=(v[0],))
        originals = [k[0]] + ([] if arch.fused_qkv else [v[0]])  # Phi-3's v is a view of the fused qkv output
        k, v = (k2, arch.q_dim, k[2]), (v2, arch.q_dim, v[2])
    ins = []
    for t, dim, tb in (q, k, v):
        if st.amp and tb != c:
            t2 = w.op("sdpa_in_cast", N * dim * c, ins=(t,))
            w.drop(t)
            t = t2
        ins.append(t)
    q_b = c if st.amp else q[2]
    mask = ()
    if st.mask == "bool":
        # [S] aten/src/ATen/native/transformers/attention.cpp::convert_boolean_attn_mask: a bool mask becomes an
        # additive one, where(mask, 0, -inf) [b, 1, s, s] in the query dtype, per call; the fused kernel saves it
        # for backward (preprocess_mask only expands it: rows of s elements are 8-aligned, no pad copy)
        mask = (w.op("sdpa_mask_additive", b * s * s * q_b),)
    lse = w.op("sdpa_lse", b * arch.num_attention_heads * s * FP32)
    out = w.op("sdpa_out", N * arch.q_dim * a_b, ins=tuple(ins), saves=tuple(ins) + (lse,) + mask, save_out=True)
    w.drop(lse, *ins, *mask)
    # the un-repeated K/V stay referenced by the attention module until sdpa returns
    w.drop(*originals)
    return out


def _eager_attention(w: Walk, arch: Arch, st: Setting, qe: str, ke: str, v: str, rope_b: int, v_b: int,
                     a_b: int) -> str:
    """[S] transformers models/llama/modeling_llama.py::eager_attention_forward: repeat_kv copies K and V to
    nh heads (when GQA), scores = q @ k^T * scaling (+ the shared causal mask), softmax in fp32 (saved), cast
    back (saved for probs @ v), dropout p=0 is a no-op, out.transpose(1,2).contiguous()."""
    b, s = st.batch, st.seq
    N = b * s
    nh, qd = arch.num_attention_heads, arch.q_dim
    rep = nh // arch.num_key_value_heads
    kr, vr = ke, v
    if rep > 1:
        kr = w.op("repeat_k", N * qd * rope_b, ins=(ke,))
        vr = w.op("repeat_v", N * qd * v_b, ins=(v,))
        w.drop(ke)
        if not arch.fused_qkv:
            w.drop(v)
    sc = b * nh * s * s
    s1 = w.op("scores", sc * a_b, ins=(qe, kr), saves=(qe, kr))
    w.drop(qe, kr)
    s2 = w.op("scores_scaled", sc * a_b, ins=(s1,))
    w.drop(s1)
    if arch.attn_logit_softcapping:
        # [S] transformers models/gemma2/modeling_gemma2.py::eager_attention_forward: scores / softcap, tanh,
        # * softcap, three [b, nh, s, s] tensors in the scores' dtype (tanh is on no autocast list); the divide and
        # multiply by a Python scalar save nothing, tanh saves its output for backward (1 - tanh^2)
        d = w.op("softcap_div", sc * a_b, ins=(s2,))
        w.drop(s2)
        t = w.op("softcap_tanh", sc * a_b, ins=(d,), save_out=True)
        w.drop(d)
        s2 = w.op("softcap_mul", sc * a_b, ins=(t,))
        w.drop(t)
    s3 = w.op("scores_masked", sc * a_b, ins=(s2,), alias=True)
    w.drop(s2)
    # softmax(..., dtype=float32) converts its input first ([S] aten/src/ATen/native/SoftMax.cpp::softmax:
    # only fp16 input on CUDA takes the half_to_float path without a copy)
    if a_b != FP32 and not st.fp16:
        s4 = w.op("softmax_in_f32", sc * FP32, ins=(s3,))
        w.drop(s3)
        s3 = s4
    p32 = w.op("probs_f32", sc * FP32, ins=(s3,), save_out=True)
    w.drop(s3)
    p16 = w.op("probs", sc * a_b, ins=(p32,))
    w.drop(p32)
    o = w.op("attn_matmul_out", N * qd * a_b, ins=(p16, vr), saves=(p16, vr))
    w.drop(p16, vr)
    out = w.op("attn_out", N * qd * a_b, ins=(o,), alias=True)
    w.drop(o)
    return out


def _mlp_block(w: Walk, arch: Arch, st: Setting, lin: dict, h1: str, res_b: int) -> tuple[str, int]:
    """post_attention_layernorm -> MLP (+ Gemma's post-feedforward norm). Returns the block's output and its
    element size; the residual `h1` stays live.

    [S] transformers llama `LlamaMLP.forward`: down(act(gate(x)) * up(x)); act saves its input, the product
    saves both factors."""
    N = st.batch * st.seq
    H, I = arch.hidden_size, arch.intermediate_size
    trainable = st.full
    h2, h2_b = norm_op(w, st, h1, res_b, N * H, N, trainable)
    if arch.is_moe:
        return moe_block(w, arch, st, h2, h2_b, lin)
    if arch.fused_gate_up:
        gu, gu_b = linear_op(w, st, lin["gate_up_proj"], h2, h2_b, N, from_norm=True)
        w.drop(h2)
        # act(gate view) and `up * act` keep the fused output alive
        act = w.op("act", N * I * gu_b, ins=(gu,), saves=(gu,))
        prod = w.op("act_mul_up", N * I * gu_b, ins=(act, gu), saves=(act, gu))
        w.drop(gu, act)
        d_out, d_b = linear_op(w, st, lin["down_proj"], prod, gu_b, N)
        w.drop(prod)
    else:
        d_out, d_b = gated_mlp(w, st, lin, h2, h2_b, N, I, drop_input=True)
    if arch.norms_per_layer == 4:  # Gemma: post_feedforward_layernorm; GLM-4: post_mlp_layernorm
        d2, d_b = norm_op(w, st, d_out, d_b, N * H, N, trainable)
        w.drop(d_out)
        d_out = d2
    return d_out, d_b
