"""The training-memory model: peak allocated bytes of one steady-state optimizer step.

PURE: no I/O, no printing. Every term is an int number of bytes, rounded per tensor the way PyTorch's
CUDA caching allocator rounds (`units.alloc_bytes`, 512 B). The step mirrors `llamafactory-cli train` on
one CUDA GPU (LLaMA-Factory 0.9.5, transformers 5.24, PEFT 0.21, bitsandbytes 0.50, accelerate 1.15,
torch 2.13): the second optimizer step, when the optimizer states exist.

Legend: b batch, s padded sequence length (cutoff_len rounded up to a multiple of 8: LLaMA-Factory's
SFT collator pads with `pad_to_multiple_of=8`), N = b*s tokens, H hidden, I intermediate, L layers,
V vocabulary, r LoRA rank, c compute-dtype bytes (2 under bf16/fp16 autocast).

How the activation terms are made: `layer_forward` walks one decoder layer op by op (`_Walk`), allocating
each output and keeping what autograd saves for backward, so shared tensors count once and the forward
transient peak falls out. The walk encodes what the libraries do; each rule names its source:
- [S] read in a library's source (file and function named),
- [T] measured with `trainfit trace` (optimizer/trace: a real PyTorch step on fake tensors, every
  allocation counted), see tests/test_accuracy.py for the grid it is checked on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from .arch import LinearSpec, layer_linears, param_counts
from .errors import ConfigError
from .schema import Arch, Estimate, MemoryTerm, PhasePeak, Plan
from .units import MIB, alloc_bytes, ceil_div, round_up

__all__ = ["estimate", "Setting", "setting_for", "lora_targets", "count_params", "layer_forward"]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4

# ---------------------------------------------------------------------------------------------------
# Settings derived from the plan: which dtype each thing has.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """Dtypes and switches of one run, derived once from (arch, plan) by `setting_for`."""

    amp: bool  # autocast on: accelerate wraps model.forward in torch.autocast for bf16/fp16
    c: int  # compute dtype bytes: autocast dtype, or the weights' dtype without autocast
    ckpt_w: int  # checkpoint dtype bytes (frozen 16-bit weights, biases)
    train_w: int  # bytes of a trainable parameter (fp32 master unless pure_bf16)
    embed_w: int  # bytes per element of embed_tokens / untied lm_head
    norm_w: int  # bytes per element of norm weights
    stream: int  # bytes per element of the residual stream (the embedding output dtype)
    lora_w: int  # bytes of a LoRA adapter parameter
    full: bool
    quant: int | None
    double_quant: bool
    gc: bool
    attn: str  # "sdpa" or "eager"
    targets: tuple[str, ...]  # LoRA'd module suffixes of a decoder layer
    lora_dropout: bool
    rank: int
    seq: int
    batch: int
    gemma_norm: bool
    mixed16: bool = False  # fp16 autocast over bf16 weights: same bytes, different dtype, so casts copy
    fp16: bool = False  # the autocast dtype is float16

    def same_as_c(self, nbytes: int, from_weights: bool) -> bool:
        """Does a tensor of `nbytes` per element have the compute dtype? Tensors that come from the 16-bit
        weights (embeddings, norms) are bf16 while fp16 autocast computes in fp16."""
        return nbytes == self.c and not (self.mixed16 and from_weights)

    @property
    def tokens(self) -> int:
        return self.seq * self.batch


def lora_targets(arch: Arch, plan: Plan) -> tuple[str, ...]:
    """Resolve `lora_target` as LLaMA-Factory does.

    [S] LLaMA-Factory `model/model_utils/misc.py::find_all_linear_modules`: `all` = the name suffix of every
    module whose class name contains "Linear", except `lm_head` and "Embedding" classes; otherwise the comma
    list goes to PEFT as `target_modules`, which matches module-name suffixes.
    """
    names = [m.name for m in layer_linears(arch)]
    raw = [t.strip() for t in plan.lora_target.split(",") if t.strip()]
    if raw == ["all"]:
        return tuple(names)
    unknown = [t for t in raw if t not in names]
    if unknown:
        raise ConfigError(
            f"lora_target {', '.join(unknown)} matches no Linear layer of the decoder layers of {arch.name} "
            f"(they are: {', '.join(names)}). Use `all` or a comma list of those names."
        )
    return tuple(n for n in names if n in raw)


def setting_for(arch: Arch, plan: Plan) -> Setting:
    if plan.quantization_bit and plan.finetuning_type != "lora":
        # [S] LLaMA-Factory hparams/parser.py: "Quantization is only compatible with the LoRA or OFT method."
        raise ConfigError("quantization_bit needs finetuning_type: lora. Remove quantization_bit or use lora.")
    if plan.bf16 and plan.fp16:
        raise ConfigError("bf16 and fp16 are both true. Set only one of them.")
    ckpt_w = DTYPE_BYTES[arch.torch_dtype]
    amp = (plan.bf16 or plan.fp16) and not plan.pure_bf16
    full = plan.finetuning_type == "full"
    # [S] LLaMA-Factory model/adapter.py::init_adapter: trainable params are upcast to float32 unless
    # pure_bf16; in full fine-tuning every parameter is trainable, so the whole model becomes fp32 (with
    # pure_bf16 it keeps the checkpoint dtype: an fp32 checkpoint stays fp32 [T]).
    train_w = ckpt_w if plan.pure_bf16 else FP32
    # [S] PEFT utils/other.py::prepare_model_for_kbit_training casts every non-4/8-bit parameter to fp32.
    kbit_up = plan.kbit_prepare and plan.quantization_bit is not None
    embed_w = train_w if full else (FP32 if kbit_up else ckpt_w)
    norm_w = train_w if full else (FP32 if (kbit_up or plan.upcast_layernorm) else ckpt_w)
    stream = embed_w
    if "embed_tokens" in _additional(plan):
        stream = train_w  # the trainable copy PEFT makes is upcast like every trainable param
    c = 2 if amp else (train_w if full else ckpt_w)
    family = arch.model_type.replace("_text", "")
    # [S] LLaMA-Factory >= 0.9.4 model/loader.py loads with torch_dtype="auto" (the checkpoint dtype), so
    # `fp16: true` on a bf16 checkpoint runs fp16 autocast over bf16 weights.
    mixed16 = amp and plan.fp16 and arch.torch_dtype == "bfloat16" and not full
    if mixed16:
        # [T] the first residual add sums the bf16 embedding stream and an fp16 autocast output, which type
        # promotion makes float32: every later layer's input (and checkpoint) is fp32
        stream = FP32
    return Setting(
        amp=amp, c=c, ckpt_w=ckpt_w, train_w=train_w, embed_w=embed_w, norm_w=norm_w, stream=stream,
        # [S] PEFT mapping.py::get_peft_model(autocast_adapter_dtype=True) creates adapters in fp32 over a
        # 16-bit base; LLaMA-Factory's pure_bf16 only skips its own upcast, so adapters stay fp32 [T].
        lora_w=FP32, full=full, quant=plan.quantization_bit,
        double_quant=plan.double_quantization, gc=plan.gradient_checkpointing,
        attn=_attention(arch, plan),
        targets=() if full else lora_targets(arch, plan), lora_dropout=plan.lora_dropout > 0,
        rank=plan.lora_rank, seq=round_up(plan.cutoff_len, 8), batch=plan.per_device_train_batch_size,
        gemma_norm=family in ("gemma", "gemma2", "gemma3"), mixed16=mixed16, fp16=amp and plan.fp16,
    )


def _attention(arch: Arch, plan: Plan) -> str:
    """The attention kernel's memory pattern: eager (s x s scores) or sdpa/fa2 (flash: no scores).

    [S] LLaMA-Factory model/model_utils/attention.py::configure_attn_implementation: Gemma 2 needs soft-capped
    attention, so `auto` becomes fa2 when flash-attn is installed and eager otherwise; transformers' Gemma 2
    has no sdpa path. trainfit assumes flash-attn is not installed unless `flash_attn: fa2` is asked for."""
    if plan.flash_attn == "disabled":
        return "eager"
    if arch.model_type == "gemma2" and plan.flash_attn != "fa2":
        return "eager"
    return "sdpa"


def _additional(plan: Plan) -> list[str]:
    return [t.strip() for t in (plan.additional_target or "").split(",") if t.strip()]


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
    extra = sum(_module_numel(arch, name) for name in _additional(plan))
    trainable = per_layer * arch.num_hidden_layers + extra
    return trainable, base + trainable


def _module_numel(arch: Arch, name: str) -> int:
    if name in ("embed_tokens", "lm_head"):
        return arch.vocab_size * arch.hidden_size
    if name == "norm":
        return arch.hidden_size
    raise ConfigError(f"additional_target {name!r} is not modelled. Use embed_tokens, lm_head or norm, or leave it unset.")


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
    nested = alloc_bytes(blocks) + alloc_bytes(ceil_div(blocks, 256) * FP32) + alloc_bytes(256 * FP32) + alloc_bytes(FP32)
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
    qk = 2 * alloc_bytes(arch.head_dim * st.norm_w) if arch.qk_norm else 0
    embed = alloc_bytes(V * H * st.embed_w)
    return {
        "decoder_linears": L * sum(linear_weight_bytes(m, st) for m in lin),
        "norms": L * (arch.norms_per_layer * norm + qk) + norm,
        "embed_tokens": embed,
        "lm_head": 0 if arch.tie_word_embeddings else embed,
    }


def trainable_tensor_numels(arch: Arch, plan: Plan, st: Setting) -> tuple[tuple[int, int, int], ...]:
    """(numel, count, bytes per element) of the trainable parameter tensors (one gradient and one
    optimizer-state set each). LoRA A/B are fp32; full fine-tuning and PEFT's `modules_to_save` copies have
    the trainable dtype (fp32, or the checkpoint dtype under pure_bf16) [T]."""
    return _trainable_numels(arch, st.full, st.targets, st.rank, tuple(_additional(plan)), st.lora_w, st.train_w)


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
        if arch.qk_norm:
            counts[arch.head_dim, train_w] += 2 * L
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
class _Walk:
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

    def backward(self, out: str, held: frozenset[str] = frozenset()) -> tuple[int, int]:
        """(peak live bytes during the layer's backward, parameter-gradient bytes it leaves). At the start the
        live set is the saved tensors plus `held` (tensors the caller keeps) plus the output's gradient."""
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


def _promote(a: int, b: int) -> int:
    return max(a, b)


def _norm(w: _Walk, st: Setting, x: str, x_b: int, n_el: int, rows: int, trainable: bool) -> tuple[str, int]:
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
    out_b = _promote(st.norm_w, x_b)
    out = w.op("norm_out", n_el * out_b, ins=(hc,), saves=(hc,) if trainable else (), params=wgrad)
    w.drop(hc)
    return out, out_b


def _linear(w: _Walk, st: Setting, m: LinearSpec, x: str, x_b: int, N: int, from_norm: bool = False) -> tuple[str, int]:
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
        out_b = c if st.amp else _promote(x_b, st.train_w)
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
        out_b = c if st.amp else _promote(x_b, st.ckpt_w)
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
    if st.amp:
        # lora_A/lora_B under autocast: the input is cast to the compute dtype (saved for the weight gradient)
        # and the fp32 adapter weights are cast once and cached (their backward yields the fp32 gradients).
        xa = xl
        if not st.same_as_c(xl_b, from_norm and not convert):
            xa = w.op("lora_a_in", N * m.in_features * c, ins=(xl,))
            if xl != x:
                w.drop(xl)
        if st.lora_w != c:
            wa = w.op("lora_a_wcast", r * m.in_features * c, params=ga)
            wb = w.op("lora_b_wcast", r * m.out_features * c, params=gb)
            a = w.op("lora_a_out", N * r * c, ins=(xa, wa), saves=(xa, wa))
            bo = w.op("lora_b_out", N * m.out_features * c, ins=(a, wb), saves=(a, wb))
            w.drop(wa, wb)
        else:
            a = w.op("lora_a_out", N * r * c, ins=(xa,), saves=(xa,), params=ga)
            bo = w.op("lora_b_out", N * m.out_features * c, ins=(a,), saves=(a,), params=gb)
        a_b = c
        if xa != x:
            w.drop(xa)
    else:
        a = w.op("lora_a_out", N * r * xl_b, ins=(xl,), saves=(xl,), params=ga)
        bo = w.op("lora_b_out", N * m.out_features * xl_b, ins=(a,), saves=(a,), params=gb)
        a_b = xl_b
        if xl != x:
            w.drop(xl)
    w.drop(a)
    sc = w.op("lora_scaled", N * m.out_features * a_b, ins=(bo,))
    w.drop(bo)
    if a_b != out_b and not st.amp:
        cast = w.op("lora_out_cast", N * m.out_features * out_b, ins=(sc,))
        w.drop(sc)
        sc = cast
    res_b = _promote(out_b, a_b if st.amp else out_b)
    res = w.op("lora_sum", N * m.out_features * res_b, ins=(out, sc), alias=True)
    w.drop(sc, out)
    return res, res_b


@dataclass(frozen=True)
class LayerActivations:
    saved_bytes: int  # what one layer keeps for backward (its input included when saved)
    peak_bytes: int  # peak live bytes of the forward walk, the input included
    output_bytes: int
    input_bytes: int
    backward_peak_bytes: int  # peak of the layer's backward over its saved tensors + output gradient
    param_grad_bytes: int  # parameter gradients the layer's backward leaves


@lru_cache(maxsize=8192)
def layer_forward(arch: Arch, st: Setting, no_grad: bool = False) -> LayerActivations:
    """Walk one decoder layer's forward (and, with grad, replay its backward). The layer input `x` is live at
    start and held by the caller."""
    b, s = st.batch, st.seq
    N = b * s
    H, I = arch.hidden_size, arch.intermediate_size
    nh = arch.num_attention_heads
    c = st.c
    trainable = st.full
    w = _Walk(no_grad=no_grad)
    x = w.leaf("x", N * H * st.stream, requires_grad=True)
    lin = {m.name: m for m in layer_linears(arch)}
    h, h_b = _norm(w, st, x, st.stream, N * H, N, trainable)
    qd, kvd = arch.q_dim, arch.kv_dim
    if arch.fused_qkv:
        qkv, qkv_b = _linear(w, st, lin["qkv_proj"], h, h_b, N, from_norm=True)
        # Phi-3 slices q/k/v as views of the fused output: the fused tensor stays alive while any is used.
        q, k, v, q_b = qkv, qkv, qkv, qkv_b
        k_b = v_b = qkv_b
    else:
        q, q_b = _linear(w, st, lin["q_proj"], h, h_b, N, from_norm=True)
        k, k_b = _linear(w, st, lin["k_proj"], h, h_b, N, from_norm=True)
        v, v_b = _linear(w, st, lin["v_proj"], h, h_b, N, from_norm=True)
    w.drop(h)
    if arch.qk_norm:
        q2, q_b = _norm(w, st, q, q_b, N * qd, N * nh, trainable)
        k2, k_b = _norm(w, st, k, k_b, N * kvd, N * arch.num_key_value_heads, trainable)
        if not arch.fused_qkv:
            w.drop(q, k)
        q, k = q2, k2
    # RoPE [S] transformers llama `apply_rotary_pos_emb`: q*cos + rotate_half(q)*sin, cos/sin in the stream
    # dtype (shared by all layers, see `shared_forward_bytes`); the muls save only cos/sin (no grad).
    rope_b = _promote(q_b, st.stream)

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

    qe = rope(q, qd)
    if not arch.fused_qkv or arch.qk_norm:
        w.drop(q)
    ke = rope(k, kvd)
    if not arch.fused_qkv or arch.qk_norm:
        w.drop(k)
    a_b = c if st.amp else rope_b
    if st.attn == "sdpa":
        # [S] transformers integrations/sdpa_attention.py: is_causal, no mask, GQA via enable_gqa; the
        # CUDA flash kernel saves q, k, v, out and the fp32 logsumexp [b, nh, s]. Output is laid out
        # [b, s, nh, hd] so `.transpose(1, 2).contiguous()` copies nothing.
        ins = []
        for t, dim, tb in ((qe, qd, rope_b), (ke, kvd, rope_b), (v, kvd, v_b)):
            if st.amp and tb != c:
                t2 = w.op("sdpa_in_cast", N * dim * c, ins=(t,))
                w.drop(t)
                t = t2
            ins.append(t)
        lse = w.op("sdpa_lse", b * nh * s * FP32)
        attn_out = w.op("sdpa_out", N * qd * a_b, ins=tuple(ins), saves=tuple(ins) + (lse,), save_out=True)
        w.drop(lse, *ins)
    else:
        # [S] transformers models/llama/modeling_llama.py::eager_attention_forward: repeat_kv copies K and V
        # to nh heads (when GQA), scores = q @ k^T * scaling (+ the shared causal mask), softmax in fp32
        # (saved), cast back (saved for probs @ v), dropout p=0 is a no-op, out.transpose(1,2).contiguous().
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
        attn_out = w.op("attn_out", N * qd * a_b, ins=(o,), alias=True)
        w.drop(o)
    if arch.fused_qkv:
        w.drop(qkv)
    o_out, o_b = _linear(w, st, lin["o_proj"], attn_out, a_b, N)
    w.drop(attn_out)
    res_b = _promote(st.stream, o_b)
    if arch.norms_per_layer == 4:  # Gemma 2/3: post_attention_layernorm on the attention output
        o2, o_b = _norm(w, st, o_out, o_b, N * H, N, trainable)
        w.drop(o_out)
        o_out = o2
    h1 = w.op("resid1", N * H * res_b, ins=(x, o_out), alias=True)
    w.drop(o_out)
    h2, h2_b = _norm(w, st, h1, res_b, N * H, N, trainable)
    # MLP [S] transformers llama `LlamaMLP.forward`: down(act(gate(x)) * up(x)); act saves its input,
    # the product saves both factors.
    if arch.fused_gate_up:
        gu, gu_b = _linear(w, st, lin["gate_up_proj"], h2, h2_b, N, from_norm=True)
        w.drop(h2)
        # act(gate view) and `up * act` keep the fused output alive
        act = w.op("act", N * I * gu_b, ins=(gu,), saves=(gu,))
        prod = w.op("act_mul_up", N * I * gu_b, ins=(act, gu), saves=(act, gu))
        w.drop(gu, act)
        g_b = gu_b
    else:
        g, g_b = _linear(w, st, lin["gate_proj"], h2, h2_b, N, from_norm=True)
        u, _ = _linear(w, st, lin["up_proj"], h2, h2_b, N, from_norm=True)
        w.drop(h2)
        act = w.op("act", N * I * g_b, ins=(g,), saves=(g,))
        w.drop(g)
        prod = w.op("act_mul_up", N * I * g_b, ins=(act, u), saves=(act, u))
        w.drop(act, u)
    d_out, d_b = _linear(w, st, lin["down_proj"], prod, g_b, N)
    w.drop(prod)
    if arch.norms_per_layer == 4:  # Gemma: post_feedforward_layernorm
        d2, d_b = _norm(w, st, d_out, d_b, N * H, N, trainable)
        w.drop(d_out)
        d_out = d2
    out = w.op("resid2", N * H * _promote(res_b, d_b), ins=(h1, d_out), alias=True)
    w.drop(d_out, h1)
    # After the layer returns, the caller drops its input: what stays is what autograd saved (the input
    # too when a norm saved it as its own fp32 view) and the output.
    saved = w.saved_bytes()
    bwd_peak, pgrads = (0, 0) if no_grad else w.backward(out)
    return LayerActivations(
        saved_bytes=saved,
        peak_bytes=w.peak,
        output_bytes=w.live[out],
        input_bytes=alloc_bytes(N * H * st.stream),
        backward_peak_bytes=bwd_peak,
        param_grad_bytes=pgrads,
    )


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
    rope = 2 * alloc_bytes(b * s * arch.head_dim * st.stream)
    mask = alloc_bytes(b * s * s * st.stream) if st.attn == "eager" else 0
    return rope + mask


@dataclass(frozen=True)
class HeadActivations:
    final_norm_saved: int  # final norm's saved tensors (+ the lm_head input when the lm_head trains)
    weight_cast: int  # the lm_head weight cast to the compute dtype, saved for backward (0 when none)
    forward_end_extra: int  # the logits while the lm_head has just run (+ its input, held by the outputs)
    loss_peak_extra: int  # peak of the loss computation (logits, fp32 upcast, log-softmax, lm_head input)
    loss_saved: int  # what the loss keeps for backward
    ce_backward_extra: int  # peak of the cross-entropy backward, on top of loss_saved
    lm_head_backward_extra: int  # after CE backward: grad of logits + grad of the hidden states


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
    w = _Walk()
    x = w.leaf("last_hidden", N * H * st.stream, requires_grad=True)
    h, h_b = _norm(w, st, x, st.stream, N * H, N, st.full)
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
    logit_b = st.c if st.amp else _promote(h_b, lw)
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
    return HeadActivations(final_saved, wcast, fwd_end + held_out, peak + held_out, saved, ce_bwd, lm_bwd)


def lm_head_trains(arch: Arch, plan: Plan, st: Setting) -> bool:
    """Full fine-tuning, or `additional_target` naming lm_head (PEFT's trainable copy)."""
    return st.full or "lm_head" in _additional(plan)


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


# ---------------------------------------------------------------------------------------------------
# Beyond tensors: workspaces, allocator, CUDA context
# ---------------------------------------------------------------------------------------------------

# [S] torch aten/src/ATen/cuda/CublasHandlePool.cpp::getChosenWorkspaceSize: default
# CUBLAS_WORKSPACE_CONFIG ":4096:2:16:8" = 2 x 4096 KiB + 8 x 16 KiB = 8,519,680 B per (handle, stream),
# allocated through the caching allocator (so it shows in memory_allocated). Handles are per thread, and
# the autograd engine runs backward on its own device thread: one workspace for forward, one for backward.
CUBLAS_WORKSPACE_BYTES = 8_519_680
# [S] pytorch/pytorch#86509: CUDA context of a process with lazy module loading (PyTorch >= 1.13 sets
# CUDA_MODULE_LOADING=LAZY): 287,047,680 B measured with nvidia-smi. Not counted by torch's allocator.
CUDA_CONTEXT_BYTES = 287_047_680
# [S] c10/cuda/CUDACachingAllocator.cpp: requests > 1 MiB (kSmallSize) come from large segments;
# requests under 10 MiB (kMinLargeAlloc) share 20 MiB segments (kLargeBuffer), larger ones are rounded up
# to 2 MiB (kRoundLarge) and get their own segment; small requests share 2 MiB segments (kSmallBuffer).
ROUND_LARGE = 2 * MIB
LARGE_BUFFER = 20 * MIB


def reserved_bytes(peak_allocated: int, large_blocks: list[int]) -> int:
    """Predicted max_memory_reserved: the peak's big blocks rounded up to 2 MiB, plus one 20 MiB segment for
    the 1-10 MiB pool and one 2 MiB small segment, plus the blocks freed-but-cached from the phase before
    the peak (the caching allocator keeps them; a later bigger request cannot reuse smaller free blocks).
    The segment rules are [S] CUDACachingAllocator constants; the free-but-cached part is bounded here by the
    largest single block, which is what a request sequence like the CE backward (same-size fp32 [N, V]
    blocks) leaves. Not calibrated on a GPU yet (no GPU was available): treat it as a model, not a fact.
    """
    rounding = sum(round_up(b, ROUND_LARGE) - b for b in large_blocks if b > 10 * MIB)
    cached = max([b for b in large_blocks] + [0])
    return round_up(peak_allocated + rounding + LARGE_BUFFER + ROUND_LARGE + cached, ROUND_LARGE)


def large_blocks_at(arch: Arch, plan: Plan, moment: str, batch: int | None = None) -> list[int]:
    """The big tensors live at a phase's peak, for the allocator's rounding ([T] the trace's largest live
    tensors): the cross-entropy backward holds three fp32 [N, V] blocks (saved log-softmax and two
    gradients), the loss forward two fp32 [N, V] and the logits, evaluation the same as the loss; a layer's
    peak holds its MLP factors ([N, I] in the compute dtype, three); the optimizer step none beyond weights."""
    st = setting_for(arch, plan if batch is None else plan.model_copy(update={"per_device_train_batch_size": batch}))
    nv4 = alloc_bytes(st.tokens * arch.vocab_size * FP32)
    if plan.enable_liger_kernel or moment == "optimizer":
        return []
    if moment == "cross-entropy backward":
        return [nv4] * 3
    if moment in ("loss", "eval"):
        return [nv4] * 2 + [alloc_bytes(st.tokens * arch.vocab_size * st.c)]
    return [alloc_bytes(st.tokens * arch.intermediate_size * st.c)] * 3


def device_peak_for(peak_allocated: int, large_blocks: list[int], managed: int = 0) -> int:
    """nvidia-smi's view of a phase: reserved (`reserved_bytes`) + CUDA managed memory (paged optimizer
    states) + the CUDA context."""
    return reserved_bytes(peak_allocated, large_blocks) + managed + CUDA_CONTEXT_BYTES


# ---------------------------------------------------------------------------------------------------
# The step, phase by phase
# ---------------------------------------------------------------------------------------------------

def _terms(*pairs: tuple[str, int, str]) -> list[MemoryTerm]:
    return [MemoryTerm(name=n, bytes=int(b), detail=d) for n, b, d in pairs if b]


def estimate(arch: Arch, plan: Plan) -> Estimate:
    """The memory model of one steady-state step of `plan` on `arch`."""
    st = setting_for(arch, plan)
    L = arch.num_hidden_layers
    N = st.tokens
    weights = base_weight_bytes(arch, st)
    adapters = adapter_bytes(arch, plan, st)
    states = optimizer_state_bytes(arch, plan, st)
    grads = grad_bytes(arch, plan, st)
    opt_tmp = optimizer_step_temp_bytes(arch, plan, st)
    workspace = CUBLAS_WORKSPACE_BYTES
    shared = shared_forward_bytes(arch, st)
    lay = layer_forward(arch, st)
    lay_ng = layer_forward(arch, st, no_grad=True) if st.gc and plan.use_reentrant_gc else lay
    head = head_activations(arch, plan, st)
    ckpt = lay.input_bytes  # gradient checkpointing keeps each layer's input
    if st.gc:
        acts_all = L * ckpt
        fwd_layer = (L - 1) * ckpt + lay_ng.peak_bytes
        what = f"{L} checkpointed layer inputs [b, s, H]"
    else:
        acts_all = L * lay.saved_bytes
        fwd_layer = (L - 1) * lay.saved_bytes + lay.peak_bytes
        what = f"{L} layers x saved activations"
    weight_terms = (
        ("weights_decoder_linears", weights["decoder_linears"], _weights_detail(st)),
        ("weights_embed_tokens", weights["embed_tokens"], f"V x H, {_dtype_name(st.embed_w, arch)}" + (" (tied lm_head)" if arch.tie_word_embeddings else "")),
        ("weights_lm_head", weights["lm_head"], "V x H (untied)"),
        ("weights_norms", weights["norms"], "RMSNorm weights"),
        ("adapters", adapters, "LoRA A/B (fp32) + trainable copies of additional_target" if not st.full else ""),
        ("optimizer_states", states, plan.optim),
        ("cublas_workspace", workspace, "cuBLAS workspace of the forward thread"),
    )
    static = _terms(*weight_terms)
    # [S] torch autocast `cached_cast`: the compute-dtype copy of a grad-requiring leaf weight is cached until
    # the outermost autocast region (the model forward) exits. Without checkpointing those copies are saved
    # for backward anyway (counted in the layers' saved tensors); with checkpointing the recompute runs in its
    # own region, so only the first forward holds every layer's copies, until the loss is computed.
    cache = 0
    if st.full and st.amp and st.gc and st.train_w != st.c:
        cache = L * sum(alloc_bytes(m.weight_numel * st.c) for m in layer_linears(arch))
    forward = PhasePeak(phase="forward", moment="last decoder layer's forward", terms=static + _terms(
        ("activations_shared", shared, "RoPE cos/sin" + (" + causal mask" if st.attn == "eager" else "")),
        ("activations_layers", fwd_layer, f"{L - 1} earlier layers + the running layer's peak"),
        ("autocast_weight_cache", cache, "bf16 copies of the fp32 decoder weights, cached by autocast"),
    ))
    loss = PhasePeak(phase="loss", moment="cross-entropy forward (fp32 logits + log-softmax)", terms=static + _terms(
        ("activations_shared", shared, ""),
        ("activations_layers", acts_all, what),
        ("final_norm_saved", head.final_norm_saved, "final RMSNorm saved tensors (+ lm_head input when it trains)"),
        ("lm_head_weight_cast", head.weight_cast, "lm_head weight in the autocast dtype, saved for backward"),
        ("logits_and_loss", max(head.loss_peak_extra, head.forward_end_extra), f"logits [{N}, {arch.vocab_size}] + fp32 upcast + log-softmax"),
        ("autocast_weight_cache", cache, "bf16 copies of the fp32 decoder weights, cached by autocast"),
    ))
    bw_ws = ("cublas_workspace_backward", workspace, "cuBLAS workspace of the autograd thread")
    ce = PhasePeak(phase="backward", moment="cross-entropy backward", terms=static + _terms(
        bw_ws,
        ("activations_shared", shared, ""),
        ("activations_layers", acts_all, what),
        ("final_norm_saved", head.final_norm_saved, ""),
        ("lm_head_weight_cast", head.weight_cast, "lm_head weight in the autocast dtype, saved for backward"),
        ("loss_saved", head.loss_saved, "saved log-softmax fp32 [N, V]"),
        ("loss_backward", head.ce_backward_extra, "dense fp32 [N, V] gradients of nll_loss and log_softmax"),
    ))
    # Decoder layers' backward, top layer first. The layer's own backward peak comes from replaying its
    # tape (`_Walk.backward`); parameter gradients of the layers above persist (LoRA: small; full: large),
    # so check the top layer (most activations) and the bottom one (most gradients).
    V, H = arch.vocab_size, arch.hidden_size
    vh_grad = alloc_bytes(V * H * st.train_w)
    head_grads = 0
    if st.full:
        # tied: the lm_head's share of the shared weight's gradient waits in autograd's input buffer for the
        # embedding's share; untied: lm_head.grad is already stored. Plus the final norm's weight gradient.
        head_grads = vh_grad + alloc_bytes(H * st.train_w)
    if st.gc:
        # reentrant checkpointing: recompute the layer (its input is the kept checkpoint), then backward
        # through it while the recomputed output is still referenced
        per = max(lay.peak_bytes - lay.input_bytes, lay.backward_peak_bytes + lay.output_bytes)
        top = L * ckpt + per
        bottom = ckpt + per + (L - 1) * lay.param_grad_bytes
        layer_moment = "a decoder layer's recompute + backward"
    else:
        top = (L - 1) * lay.saved_bytes + lay.backward_peak_bytes
        bottom = lay.backward_peak_bytes + (L - 1) * lay.param_grad_bytes
        layer_moment = "a decoder layer's backward"
    lb = max(
        PhasePeak(phase="backward", moment=f"top {layer_moment}", terms=static + _terms(
            bw_ws, ("activations_shared", shared, ""),
            ("activations_layers", top, "saved activations + the layer's backward (gradients, freed inputs)"),
            ("grads", head_grads, "gradients of the lm_head/final norm"),
        )),
        PhasePeak(phase="backward", moment=f"bottom {layer_moment}", terms=static + _terms(
            bw_ws, ("activations_shared", shared, ""),
            ("activations_layers", bottom, "the first layer's backward"),
            ("grads", head_grads, "gradients of the lm_head/final norm"),
        )),
        key=lambda p: p.total_bytes,
    )
    lmb = PhasePeak(phase="backward", moment="lm_head backward", terms=static + _terms(
        bw_ws,
        ("activations_shared", shared, ""),
        ("activations_layers", acts_all, what),
        ("final_norm_saved", head.final_norm_saved, ""),
        ("lm_head_weight_cast", head.weight_cast, "lm_head weight in the autocast dtype, saved for backward"),
        ("lm_head_backward", head.lm_head_backward_extra, "logits gradient, input gradient (+ weight gradient)"),
    ))
    candidates = [ce, lb, lmb]
    if st.full:
        # [T] the end of backward: the embedding's gradient (embedding_dense_backward, [V, H]) is summed with
        # the tied lm_head's share before AccumulateGrad stores it. Under autocast that share is the fp32
        # output of the weight cast's backward, exclusively owned, so autograd's InputBuffer adds in place (2
        # buffers); without autocast the sum is a new buffer (3). Untied, the gradient is stored directly.
        # All other gradients exist by then; the activations are gone.
        emb = (2 if st.amp else 3) * vh_grad if arch.tie_word_embeddings else 0
        end = PhasePeak(phase="backward", moment="embedding gradient (end of backward)", terms=static + _terms(
            bw_ws,
            ("grads", grads - (vh_grad if arch.tie_word_embeddings else 0), "all other gradients"),
            ("embedding_grad_transient", emb, "tied weight: lm_head share + embedding share (+ their sum)"),
            ("hidden_grad", alloc_bytes(N * H * st.stream), "gradient of the embedding output"),
        ))
        candidates.append(end)
    backward = max(candidates, key=lambda p: p.total_bytes)
    optimizer = PhasePeak(phase="optimizer", moment="clip_grad_norm_ + optimizer.step()", terms=static + _terms(
        bw_ws,
        ("grads", grads, "one gradient per trainable tensor"),
        ("optimizer_step_temporaries", opt_tmp, "clip norms" + (" + foreach sqrt(exp_avg_sq)" if plan.optim == "adamw_torch" else "")),
    ))
    phases = [forward, loss, backward, optimizer]
    peak = max(phases, key=lambda p: p.total_bytes)
    trainable, all_params = count_params(arch, plan)
    kind = {"loss": "loss", "optimizer": "optimizer"}.get(peak.phase, peak.moment)
    large = large_blocks_at(arch, plan, kind)
    reserved = reserved_bytes(peak.total_bytes, large)
    paged = paged_state_bytes(arch, plan, st)
    notes = _notes(arch, plan, st, grads)
    return Estimate(
        arch=arch.name,
        trainable_params=trainable,
        all_params=all_params,
        tokens_per_micro_batch=N,
        phases=phases,
        peak_phase=peak.phase,
        peak_allocated_bytes=peak.total_bytes,
        peak_reserved_bytes=reserved + paged,
        device_peak_bytes=device_peak_for(peak.total_bytes, large, paged),
        notes=notes,
    )


def _dtype_name(nbytes: int, arch: Arch) -> str:
    return "fp32" if nbytes == FP32 else {"bfloat16": "bf16", "float16": "fp16"}.get(arch.torch_dtype, "16-bit")


def _weights_detail(st: Setting) -> str:
    if st.full:
        return "decoder Linear weights, fp32 masters" if st.train_w == 4 else "decoder Linear weights, bf16"
    if st.quant == 4:
        return "bitsandbytes 4-bit: packed + absmax" + (" (double-quantized)" if st.double_quant else "")
    if st.quant == 8:
        return "bitsandbytes LLM.int8: int8 + row scales"
    return "decoder Linear weights, checkpoint dtype"


def _notes(arch: Arch, plan: Plan, st: Setting, grads: int) -> list[str]:
    notes = [f"sequence padded to {st.seq} tokens (cutoff_len {plan.cutoff_len} rounded up to a multiple of 8); "
             "the peak assumes a micro-batch of maximum-length samples"]
    if plan.gradient_accumulation_steps > 1:
        notes.append(
            f"gradient_accumulation_steps {plan.gradient_accumulation_steps}: the estimate is the same for any value; "
            f"from the second micro-batch on, the {grads / MIB:,.1f} MiB of accumulated gradients stay live "
            "(covered by the safety margin, not added)"
        )
    if plan.per_device_train_batch_size > 1 and st.attn == "sdpa" and arch.num_key_value_heads < arch.num_attention_heads:
        notes.append("a padded micro-batch (unequal lengths) makes sdpa take an explicit [b, 1, s, s] mask and "
                     "repeat K/V to every head (transformers sdpa_attention_forward); the estimate's worst case, "
                     "every sample at cutoff_len, has no padding")
    if plan.flash_attn == "fa2":
        notes.append("fa2 saves the same tensors as sdpa's flash kernel (q, k, v, out, logsumexp); modelled as sdpa")
    if plan.optim == "paged_adamw_8bit":
        notes.append("paged_adamw_8bit states live in CUDA managed memory: not in peak allocated, counted in reserved/device")
    if not plan.bf16 and not plan.fp16 and not plan.pure_bf16:
        notes.append("no bf16/fp16: no autocast; LoRA runs in fp32 and the base in the checkpoint dtype")
    return notes


# ---------------------------------------------------------------------------------------------------
# The evaluation pass (HF Trainer.evaluate inside training): its own phase
# ---------------------------------------------------------------------------------------------------

# [S] LLaMA-Factory hparams/generating_args.py: GeneratingArguments.max_new_tokens default 1024.
GENERATE_MAX_NEW_TOKENS = 1024


def eval_estimate(arch: Arch, plan: Plan, *, eval_batch: int, compute_accuracy: bool = False,
                  predict_with_generate: bool = False, eval_accumulation_steps: int | None = None,
                  eval_samples: int = 0, max_new_tokens: int = GENERATE_MAX_NEW_TOKENS) -> PhasePeak:
    """Peak allocated bytes of one evaluation batch during training.

    [S] transformers trainer.py::Trainer.prediction_step runs the model under torch.no_grad() (autocast
    as in training); the optimizer states stay allocated, gradients are None (zero_grad(set_to_none=True)).
    No activation is saved: the forward keeps one layer's working set at a time. The loss is computed as in
    training (logits, fp32 upcast, log-softmax: 10 bytes per logit momentarily) and accelerate converts the
    returned logits to fp32. Without compute_accuracy/predict_with_generate only the loss is kept
    (`prediction_loss_only`). compute_accuracy [S] LLaMA-Factory train/sft/metric.py::eval_logit_processor:
    argmax ids [b, s] int64 (+ the labels) accumulate on the GPU over the whole eval set unless
    eval_accumulation_steps moves them to the CPU. predict_with_generate: a KV cache of
    2 x L x b x (s + max_new_tokens) x kv_dim in the compute dtype [S] transformers cache_utils.DynamicCache.
    """
    ev = plan.model_copy(update={"per_device_train_batch_size": eval_batch})
    st = setting_for(arch, ev)
    N, L = st.tokens, arch.num_hidden_layers
    weights = sum(base_weight_bytes(arch, st).values())
    adapters = adapter_bytes(arch, plan, st)
    states = optimizer_state_bytes(arch, plan, st)
    lay = layer_forward(arch, st, no_grad=True)
    layer_peak = lay.peak_bytes + shared_forward_bytes(arch, st)
    head = head_activations(arch, ev, st)
    loss = head.loss_peak_extra  # logits, their fp32 copy and log-softmax (computed, not saved: no_grad)
    kept = 0
    detail = "loss only"
    if compute_accuracy:
        per_batch = 2 * alloc_bytes(N * 8)
        batches = max(1, -(-eval_samples // eval_batch)) if eval_samples else 1
        kept = per_batch * (min(batches, eval_accumulation_steps) if eval_accumulation_steps else batches)
        detail = f"argmax ids + labels of {batches if not eval_accumulation_steps else min(batches, eval_accumulation_steps)} batch(es)"
    kv = 0
    if predict_with_generate:
        kv = 2 * L * alloc_bytes(eval_batch * (st.seq + max_new_tokens) * arch.kv_dim * st.c)
        detail = f"KV cache for {st.seq} + {max_new_tokens} tokens"
    work = max(layer_peak + kv, loss)
    return PhasePeak(phase="eval", moment=f"evaluation batch of {eval_batch} ({detail})", terms=_terms(
        ("weights", weights, "model weights"),
        ("adapters", adapters, ""),
        ("optimizer_states", states, "kept during evaluation"),
        ("cublas_workspace", CUBLAS_WORKSPACE_BYTES, ""),
        ("eval_forward", work, "one layer at a time under no_grad, or the logits + loss"),
        ("eval_kept_predictions", kept, detail),
    ))
