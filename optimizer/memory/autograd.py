"""The op tape: one decoder layer walked op by op, what autograd saves, replayed in reverse for backward."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models.arch import LinearSpec
from ..units import alloc_bytes
from .precision import FP32, Setting

# ---------------------------------------------------------------------------------------------------
# Activations: one decoder layer, op by op
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Op:
    out: str
    ins: tuple[str, ...]  # inputs that require grad
    saves: tuple[str, ...]  # tensors autograd keeps for this op's backward
    params: int  # bytes of parameter gradients this op's backward produces (they persist)
    alias: bool  # backward hands the output's gradient to the inputs as is (add, contiguous copy)
    bwd_extra: int  # transient bytes inside this op's backward (e.g. a re-dequantized 4-bit weight)


@dataclass
class Walk:
    """An op-by-op walk of one decoder layer: live tensors, what autograd saves, and a tape for backward.

    `op` allocates an output; if any input requires grad (or the op has trainable parameters) the output
    requires grad and the op is taped with the tensors it saves. `drop` ends a Python reference: the tensor
    dies unless an op still holds it as saved. `backward` replays the tape in reverse (the autograd engine
    runs nodes in reverse creation order), allocating each input's gradient (same bytes as the input) and
    freeing each node's saved tensors and output gradient once it ran."""

    live: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    rg: set[str] = field(default_factory=set)
    savers: dict[str, int] = field(default_factory=dict)
    tape: list[_Op] = field(default_factory=list)
    peak: int = 0
    n: int = 0
    total: int = 0
    no_grad: bool = False  # reentrant checkpointing runs the layer forward under torch.no_grad()

    def _new(self, stem: str, nbytes: int) -> str:
        self.n += 1
        name = f"{stem}#{self.n}"
        size = alloc_bytes(nbytes)
        self.live[name] = size
        self.sizes[name] = size
        self.total += size
        self.peak = max(self.peak, self.total)
        return name

    def leaf(self, stem: str, nbytes: int, requires_grad: bool) -> str:
        name = self._new(stem, nbytes)
        if requires_grad:
            self.rg.add(name)
        return name

    def tmp(self, nbytes: int) -> None:
        """A transient inside one op (allocated and freed before the op returns)."""
        self.peak = max(self.peak, self.total + alloc_bytes(nbytes))

    def op(self, stem: str, nbytes: int, ins: tuple[str, ...] = (), saves: tuple[str, ...] = (),
           params: int = 0, alias: bool = False, save_out: bool = False, bwd_extra: int = 0) -> str:
        out = self._new(stem, nbytes)
        g_ins = tuple(i for i in ins if i in self.rg)
        if self.no_grad or not (g_ins or params):
            return out
        self.rg.add(out)
        kept = tuple(saves) + ((out,) if save_out else ())
        for s in kept:
            self.savers[s] = self.savers.get(s, 0) + 1
        self.tape.append(_Op(out, g_ins, kept, params, alias, bwd_extra))
        return out

    def drop(self, *names: str) -> None:
        for name in names:
            if name in self.live and not self.savers.get(name):
                self.total -= self.live.pop(name)

    def saved_bytes(self) -> int:
        return sum(v for k, v in self.live.items() if self.savers.get(k))

    def backward(self, out: str, held: frozenset[str] = frozenset(), accumulate: bool = False) -> tuple[int, int]:
        """(peak live bytes during the layer's backward, parameter-gradient bytes it leaves). At the start the
        live set is the saved tensors plus `held` (tensors the caller keeps) plus the output's gradient.

        `accumulate`: a later micro-batch of gradient accumulation. Each parameter already has a .grad (counted
        by the caller), so a new parameter gradient lives only until AccumulateGrad adds it in place ([S] torch
        csrc/autograd/functions/accumulate_grad.h, case 2.3 `variable_grad += new_grad`): transient at its op,
        and the bytes left are 0."""
        live = {k: v for k, v in self.live.items() if self.savers.get(k) or k in held}
        savers = dict(self.savers)
        total = sum(live.values())
        storage: dict[int, int] = {0: self.sizes[out]}
        refs = {0: 1}
        grad_of = {out: 0}
        sid = 1
        param_grads = 0
        peak = total + storage[0]
        for op in reversed(self.tape):
            if op.out not in grad_of:
                continue
            g = grad_of[op.out]
            transient = op.bwd_extra
            for i in op.ins:
                if op.alias:
                    if i not in grad_of:
                        grad_of[i] = g
                        refs[g] += 1
                elif i in grad_of:
                    transient += self.sizes[i]  # computed, then added into the existing gradient
                else:
                    storage[sid] = self.sizes[i]
                    refs[sid] = 1
                    grad_of[i] = sid
                    sid += 1
            if accumulate:
                transient += op.params
            else:
                param_grads += op.params
            peak = max(peak, total + sum(storage.values()) + transient + param_grads)
            refs[g] -= 1
            del grad_of[op.out]
            if refs[g] == 0:
                del storage[g]
            for s in op.saves:
                savers[s] -= 1
                if savers[s] == 0 and s in live and s not in held:
                    total -= live.pop(s)
        return peak, param_grads


def promote(a: int, b: int) -> int:
    return max(a, b)


def norm_op(w: Walk, st: Setting, x: str, x_b: int, n_el: int, rows: int, trainable: bool) -> tuple[str, int]:
    """RMSNorm over the last dim: `n_el` elements of `x_b` bytes; returns (output, output bytes/elem).

    [S] transformers models/llama/modeling_llama.py::LlamaRMSNorm.forward: h = x.to(float32);
    var = h.pow(2).mean(-1); h = h * rsqrt(var + eps); return weight * h.to(input_dtype).
    pow and mul save h (the fp32 copy, or x itself when x is fp32), rsqrt saves its [rows] fp32 output;
    the final mul saves h.to(input_dtype) only if the weight is trainable (autograd saves an input only for
    the other input's gradient). Gemma: `output * (1.0 + weight.float())` then `.type_as(x)` [S]
    models/gemma2/modeling_gemma2.py::Gemma2RMSNorm: saves the fp32 normalized h when trainable.
    """
    wgrad = alloc_bytes(n_el // rows * st.train_w) if trainable else 0
    h = x if x_b == FP32 else w.op("norm_f32", n_el * FP32, ins=(x,))
    p = w.op("pow", n_el * FP32, ins=(h,), saves=(h,))
    var = w.op("var", rows * FP32, ins=(p,))
    w.drop(p)
    tmp = w.op("var_eps", rows * FP32, ins=(var,))
    w.drop(var)
    rs = w.op("rsqrt", rows * FP32, ins=(tmp,), save_out=True)
    w.drop(tmp)
    hn = w.op("normed", n_el * FP32, ins=(h, rs), saves=(h, rs))
    w.drop(rs)
    if h != x:
        w.drop(h)
    if st.gemma_norm:
        o32 = w.op("norm_out32", n_el * FP32, ins=(hn,), saves=(hn,) if trainable else (), params=wgrad)
        w.drop(hn)
        if x_b == FP32:
            return o32, FP32
        out = w.op("norm_out", n_el * x_b, ins=(o32,))
        w.drop(o32)
        return out, x_b
    hc = hn
    if x_b != FP32:
        hc = w.op("normed_cast", n_el * x_b, ins=(hn,))
        w.drop(hn)
    out_b = promote(st.norm_w, x_b)
    out = w.op("norm_out", n_el * out_b, ins=(hc,), saves=(hc,) if trainable else (), params=wgrad)
    w.drop(hc)
    return out, out_b


def linear_op(w: Walk, st: Setting, m: LinearSpec, x: str, x_b: int, N: int,
              from_norm: bool = False) -> tuple[str, int]:
    """One decoder Linear with its LoRA branch; returns (output, output bytes/elem). `from_norm`: the input
    is a norm output (weights' dtype), which matters under fp16 autocast over bf16 weights."""
    lora = m.name in st.targets
    c = st.c
    native = st.same_as_c(x_b, from_norm)
    # --- base layer ---
    if st.full:
        # Trainable weight: autograd saves the input (for grad_W) and the weight it multiplied.
        # [S] torch autocast `cached_cast`: a leaf that requires grad is cast once per autocast region and
        # cached; the bf16 copy is saved; its backward turns the bf16 weight gradient into the fp32 one.
        wgrad = alloc_bytes(m.weight_numel * st.train_w)
        xi = x
        if st.amp and x_b != c:
            xi = w.op("cast_in", N * m.in_features * c, ins=(x,))
        out_b = c if st.amp else promote(x_b, st.train_w)
        if st.amp and st.train_w != c:
            wc = w.op("w_cast", m.weight_numel * c, params=wgrad)
            out = w.op("lin_out", N * m.out_features * out_b, ins=(xi, wc), saves=(xi, wc))
            w.drop(wc)
        else:
            out = w.op("lin_out", N * m.out_features * out_b, ins=(xi,), saves=(xi,), params=wgrad)
        if xi != x:
            w.drop(xi)
        return out, out_b
    if st.quant == 4:
        # [S] bitsandbytes nn/modules.py::Linear4bit.forward casts x to the compute dtype;
        # autograd/_functions.py::MatMul4Bit keeps only the packed weight (ctx.tensors = (None, B)) and
        # dequantizes it again in backward. On CUDA the 4-bit GEMM dequantizes the weight to a transient
        # 16-bit copy for > 1536 tokens and on sm90+ (bnb 0.50 `gemm_4bit` fallback); counted always, as the
        # trace does (conservative by one weight for short micro-batches on pre-Hopper cards).
        xi = x
        if not native:
            xi = w.op("cast_in", N * m.in_features * c, ins=(x,))
        deq = m.weight_numel * c
        w.tmp(deq + N * m.out_features * c)
        out = w.op("lin_out", N * m.out_features * c, ins=(xi,), bwd_extra=alloc_bytes(deq))
        if xi != x:
            w.drop(xi)
        out_b = c
        if not native:  # `.to(inp_dtype)` at the end of Linear4bit.forward
            o2 = w.op("lin_out_cast", N * m.out_features * x_b, ins=(out,))
            w.drop(out)
            out, out_b = o2, x_b
    elif st.quant == 8:
        # [S] bitsandbytes autograd/_functions.py::MatMul8bitLt: int8_vectorwise_quant(A.to(float16))
        # (transient fp16 copy + int8 CA + fp32 row scales), ctx.tensors = (CAt, subA, A): keeps A.
        w.tmp((N * m.in_features * 2 if x_b != 2 or st.c != 2 else 0) + N * m.in_features + N * FP32)
        out = w.op("lin_out", N * m.out_features * x_b, ins=(x,), saves=(x,))
        out_b = x_b
    else:
        # Frozen 16-bit weight: F.linear saves only the weight (for grad_input), no copy when the
        # weight already has the compute dtype. Under autocast the cast of a frozen weight is not cached
        # (not a grad-requiring leaf) but is saved when dtypes differ (fp16 autocast on a bf16 checkpoint).
        xi = x
        if st.amp and not native:
            xi = w.op("cast_in", N * m.in_features * c, ins=(x,))
        out_b = c if st.amp else promote(x_b, st.ckpt_w)
        if st.amp and (st.ckpt_w != c or st.mixed16):
            wc = w.op("w_cast", m.weight_numel * c)
            out = w.op("lin_out", N * m.out_features * out_b, ins=(xi,), saves=(wc,))
            w.drop(wc)
        else:
            out = w.op("lin_out", N * m.out_features * out_b, ins=(xi,))
        if xi != x:
            w.drop(xi)
    if not lora:
        return out, out_b
    # --- LoRA branch ---
    r = st.rank
    ga, gb = alloc_bytes(r * m.in_features * st.lora_w), alloc_bytes(r * m.out_features * st.lora_w)
    if st.quant == 4:
        # [S] PEFT tuners/lora/bnb.py::Linear4bit.forward: `result = result.clone()`; the input is cast to
        # the adapter dtype only when autocast is off (`requires_conversion = not torch.is_autocast_enabled()`).
        cl = w.op("clone", N * m.out_features * out_b, ins=(out,), alias=True)
        w.drop(out)
        out = cl
        convert = not st.amp
    else:
        # [S] PEFT tuners/lora/layer.py::Linear.forward: `x = self._cast_input_dtype(x, lora_A.weight.dtype)`.
        convert = True
    xl = x
    if convert and x_b != st.lora_w:
        xl = w.op("lora_in_cast", N * m.in_features * st.lora_w, ins=(x,))
    xl_b = st.lora_w if convert else x_b
    if st.lora_dropout:
        mask = w.op("dropout_mask", N * m.in_features)
        xd = w.op("dropout_out", N * m.in_features * xl_b, ins=(xl,), saves=(mask,))
        w.drop(mask)
        if xl != x:
            w.drop(xl)
        xl = xd
    # lora_A/lora_B's input `xa`, `a_b` bytes/elem: as it comes, or under autocast cast to the compute dtype
    # (saved for the weight gradient), with the fp32 adapter weights cast once and cached (their backward
    # yields the fp32 gradients).
    xa, a_b = xl, xl_b
    if st.amp:
        a_b = c
        if not st.same_as_c(xl_b, from_norm and not convert):
            xa = w.op("lora_a_in", N * m.in_features * c, ins=(xl,))
            if xl != x:
                w.drop(xl)
    if st.amp and st.lora_w != c:
        wa = w.op("lora_a_wcast", r * m.in_features * c, params=ga)
        wb = w.op("lora_b_wcast", r * m.out_features * c, params=gb)
        a = w.op("lora_a_out", N * r * c, ins=(xa, wa), saves=(xa, wa))
        bo = w.op("lora_b_out", N * m.out_features * c, ins=(a, wb), saves=(a, wb))
        w.drop(wa, wb)
    else:
        a = w.op("lora_a_out", N * r * a_b, ins=(xa,), saves=(xa,), params=ga)
        bo = w.op("lora_b_out", N * m.out_features * a_b, ins=(a,), saves=(a,), params=gb)
    if xa != x:
        w.drop(xa)
    w.drop(a)
    sc = w.op("lora_scaled", N * m.out_features * a_b, ins=(bo,))
    w.drop(bo)
    if a_b != out_b and not st.amp:
        cast = w.op("lora_out_cast", N * m.out_features * out_b, ins=(sc,))
        w.drop(sc)
        sc = cast
    res_b = promote(out_b, a_b if st.amp else out_b)
    res = w.op("lora_sum", N * m.out_features * res_b, ins=(out, sc), alias=True)
    w.drop(sc, out)
    return res, res_b


def gated_mlp(w: Walk, st: Setting, lin: dict, x: str, x_b: int, N: int, I: int, prefix: str = "",
              drop_input: bool = False) -> tuple[str, int]:
    """down(act(gate(x)) * up(x)) of nn.Linear layers (LoRA targets, quantized like any decoder Linear): act saves
    its input, the product both factors ([S] transformers llama `LlamaMLP.forward`; Qwen2MoeMLP is the same).
    `drop_input`: the caller's last use of `x` (it is freed before the activation). Returns the output and its
    element size."""
    g, g_b = linear_op(w, st, lin["gate_proj"], x, x_b, N, from_norm=True)
    u, _ = linear_op(w, st, lin["up_proj"], x, x_b, N, from_norm=True)
    if drop_input:
        w.drop(x)
    act = w.op(f"{prefix}act", N * I * g_b, ins=(g,), saves=(g,))
    w.drop(g)
    prod = w.op(f"{prefix}act_mul_up", N * I * g_b, ins=(act, u), saves=(act, u))
    w.drop(act, u)
    d, d_b = linear_op(w, st, lin["down_proj"], prod, g_b, N)
    w.drop(prod)
    return d, d_b
