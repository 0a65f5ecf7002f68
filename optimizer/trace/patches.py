"""Scoped patches that make a fake-tensor CPU step behave like the CUDA step it stands for.

Each patch is undone when the context exits. They fix places where library code branches on the device, on
tensor *values* (which fake tensors do not have), or on the CUDA autocast state:

1. transformers' packed-sequence detection (`masking_utils.find_packed_sequence_indices`) cannot read fake
   position_ids and then assumes packing (a dense [B,1,S,S] mask, no sdpa `is_causal`/GQA path). On a GPU,
   unpadded input is "not packed": the patched function answers None.
2. `torch.is_autocast_enabled()` without a device reports the CUDA autocast state. PEFT's bitsandbytes LoRA
   layers use it to decide whether to cast the input to fp32; the trace runs CPU autocast in place of CUDA
   autocast, so the no-argument form answers for the CPU.
3. bitsandbytes >= 0.50 calls a fused `gemm_4bit` op whose fake kernel only makes the output. Its CUDA
   fallback (more than 1536 tokens per micro-batch; most shapes on sm90/sm100) dequantizes the absmax and
   the weight into a 16-bit [out, in] tensor and calls F.linear. The patched op runs that path with the
   dequantize ops, so the transient weight is traced.
4. `F.dropout` on a CPU tensor runs a non-fused kernel that keeps an input-sized noise tensor in the input
   dtype; on CUDA it runs `native_dropout`, which keeps a bool mask. The patch calls `native_dropout`.
5. `F.scaled_dot_product_attention`: CPU runs its flash kernel for any dtype, CUDA only for fp16/bf16; fp32
   inputs with GQA (no fused CUDA kernel takes both) fall back to the math kernel, which materializes the
   [B, heads, S, S] scores and repeats K/V. The patch picks the backend the CUDA dispatcher would; where that is
   the memory-efficient kernel (a mask), the output gets that kernel's [B, S, heads, hd] layout.
6. LLM.int8 (8-bit): bitsandbytes picks its CPU training path (`MatMul8bitFp`) on a CPU device; the patch
   keeps the CUDA path (`MatMul8bitLt`) and replays bitsandbytes' CUDA int8 kernels' allocations (int8 row/col
   copies, int32 GEMM output, fp16 dequant). Outlier columns (threshold 6.0) have a data-dependent count;
   none are assumed.
7. bitsandbytes' 8-bit optimizers build their code tables with value reads at construction; they get the
   tables built on real tensors beforehand.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["trace_patches", "precompute_bnb_tables", "quiet_library_warnings", "SEEN"]


@contextlib.contextmanager
def _setattr(obj: Any, name: str, value: Any) -> Iterator[None]:
    had = hasattr(obj, name)
    old = getattr(obj, name, None)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


def _not_packed(position_ids: Any) -> None:
    return None


def _is_autocast_enabled_cpu_for_cuda(*args: Any, **kwargs: Any) -> bool:
    if args or kwargs:
        return _ORIG_IS_AUTOCAST_ENABLED(*args, **kwargs)
    return _ORIG_IS_AUTOCAST_ENABLED("cpu")


_ORIG_IS_AUTOCAST_ENABLED = torch.is_autocast_enabled


def _cuda_like_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False):
    if training and 0.0 < p < 1.0 and input.numel() > 0 and not inplace:
        return torch.native_dropout(input, p, True)[0]
    return _ORIG_DROPOUT(input, p, training, inplace)


_ORIG_DROPOUT = torch.nn.functional.dropout
_ORIG_SDPA = torch.nn.functional.scaled_dot_product_attention

# What the patched functions saw during the current trace (read by the runner for its notes).
SEEN: dict[str, int] = {"sdpa_math": 0, "sdpa_fused": 0}


def _cuda_sdpa_backend(query: torch.Tensor, key: torch.Tensor, attn_mask: Any, enable_gqa: bool) -> str:
    """The backend torch's CUDA dispatcher (sm80+) picks: flash for fp16/bf16 without a mask, memory-efficient
    for any dtype without GQA, else math."""
    dtype = query.dtype
    if torch.is_autocast_enabled("cpu"):  # the trace's stand-in for CUDA autocast; sdpa runs in its dtype
        dtype = torch.get_autocast_dtype("cpu")
    head_dim = query.shape[-1]
    gqa = enable_gqa and query.shape[-3] != key.shape[-3]
    if dtype in (torch.float16, torch.bfloat16) and attn_mask is None and head_dim <= 256 and head_dim % 8 == 0:
        return "flash"
    if not gqa and head_dim % (4 if dtype == torch.float32 else 8) == 0:
        return "efficient"
    return "math"


def _cuda_like_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    kwargs = {"attn_mask": attn_mask, "dropout_p": dropout_p, "is_causal": is_causal, "scale": scale,
              "enable_gqa": enable_gqa}
    backend = _cuda_sdpa_backend(query, key, attn_mask, enable_gqa)
    if backend != "math":
        # CPU's flash kernel keeps what CUDA's flash / memory-efficient kernels keep: output + fp32 logsumexp
        SEEN["sdpa_fused"] += 1
        if backend == "efficient" and not query.transpose(1, 2).is_contiguous():
            # The CPU kernel's output takes the query's layout ([S] torch/_meta_registrations.py::
            # meta__scaled_dot_product_flash_attention_for_cpu: `torch.empty_like(query)`); CUDA's memory-efficient
            # kernel writes [b, s, heads, hd] whatever the query (meta__scaled_dot_product_efficient_attention:
            # `torch.empty(B, M, num_heads, Kv).transpose(1, 2)`), so the caller's `.transpose(1, 2).contiguous()`
            # copies nothing there. A query that is contiguous [b, heads, s, hd] (a RoPE ending in torch.cat:
            # Phi-3, GLM-4) is handed over in the [b, s, heads, hd] layout, so the output takes it and the caller
            # makes no copy that CUDA does not make (which LoRA on o_proj would then save). Left: the query copy,
            # live until the attention module returns (the caller holds the original), a transient CUDA lacks.
            query = query.transpose(1, 2).contiguous().transpose(1, 2)
        return _ORIG_SDPA(query, key, value, **kwargs)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    SEEN["sdpa_math"] += 1
    with sdpa_kernel([SDPBackend.MATH]):
        return _ORIG_SDPA(query, key, value, **kwargs)


class _OpShim:
    """Stands in for a `torch.ops.bitsandbytes.<op>` packet (called directly or through `.default`).

    A shim must never call the op it replaces: the dispatcher resolves that op through the same attribute."""

    def __init__(self, fn: Any) -> None:
        self.default = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.default(*args, **kwargs)


def _gemm_4bit_dequant_linear(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None,
                              absmax_code=None, absmax_offset=None):
    """bitsandbytes' CUDA dequantize + F.linear fallback of gemm_4bit."""
    ops = torch.ops.bitsandbytes
    if absmax_8bit is not None:
        # nested (double) quantization: the 8-bit absmax is expanded to fp32, then the offset added
        absmax_dq = ops.dequantize_blockwise.default(absmax_8bit, absmax, absmax_code, 256, torch.float32)
        absmax = absmax_dq + absmax_offset
        del absmax_dq
    w = ops.dequantize_4bit.default(B, absmax, blocksize, quant_type, list(shapeB), A.dtype)
    return torch.nn.functional.linear(A, w, bias)


def precompute_bnb_tables() -> None:
    """Build bitsandbytes' lookup tables on real tensors (their construction reads values: `.tolist()`)."""
    import bitsandbytes.functional as bF

    if "dynamic" not in bF.name2qmap:
        bF.name2qmap["dynamic"] = bF.create_dynamic_map()
    if "udynamic" not in bF.name2qmap:
        bF.name2qmap["udynamic"] = bF.create_dynamic_map(signed=False)


def _int8_vectorwise_quant_cuda_like(A: torch.Tensor, threshold: float = 0.0):
    """bitsandbytes' CUDA int8_vectorwise_quant, allocation for allocation, with no outlier column found."""
    rows = A.numel() // A.shape[-1]
    row_stats = torch.empty(rows, device=A.device, dtype=torch.float32)
    out_row = torch.empty(A.shape, device=A.device, dtype=torch.int8)
    outlier_cols = None
    if threshold > 0.0:
        outliers = A.abs() >= threshold
        outliers.any(dim=0)
        del outliers
        outlier_cols = torch.empty(0, device=A.device, dtype=torch.int64)  # the count depends on the values
    return out_row, row_stats, outlier_cols


def _int8_double_quant_cuda_like(A: torch.Tensor, col_stats=None, row_stats=None, out_col=None, out_row=None,
                                 threshold: float = 0.0):
    """bitsandbytes' CUDA int8_double_quant (row-wise kernel + column-wise PyTorch code)."""
    quant_row, row_stats_, outlier_cols = _int8_vectorwise_quant_cuda_like(A, threshold)
    abs_a = A.abs().view(-1, A.shape[-1])
    if threshold > 0.0:
        mask = abs_a >= threshold
        abs_a.masked_fill_(mask, 0.0)
        A = A.masked_fill(mask.view(A.shape), 0.0)
        del mask
    col = abs_a.amax(dim=0, keepdim=False).float()
    del abs_a
    quant_col = torch.round(A.mul(127.0) / col.unsqueeze(0)).to(torch.int8)
    return quant_row, quant_col, row_stats_, col.flatten().float(), outlier_cols


def _int8_scaled_mm_cuda_like(A, B, row_stats, col_stats, bias=None, dtype=None):
    """int8 GEMM to int32, then the CUDA dequant kernel (fp16 out, bias added, cast to dtype)."""
    out_i32 = torch.ops.bitsandbytes.int8_linear_matmul.default(A, B)
    out = torch.empty_like(out_i32, dtype=torch.float16)
    del out_i32
    if bias is not None and bias.dtype != torch.float16:
        out.add_(bias)
    return out.to(dtype or torch.float16)


def _int8_mixed_scaled_mm_no_outliers(A, CA, CB, SCA, SCB, outlier_cols=None, bias=None):
    sub_a = torch.empty(0, device=A.device, dtype=A.dtype)
    return _int8_scaled_mm_cuda_like(CA, CB, SCA, SCB, bias=bias, dtype=A.dtype), sub_a


@contextlib.contextmanager
def _int8_patches() -> Iterator[None]:
    import bitsandbytes as bnb
    import bitsandbytes.autograd._functions as bfun
    import bitsandbytes.functional as bF

    def _matmul_cuda_path(A, B, out=None, state=None, threshold=0.0, bias=None):
        state = state or bfun.MatmulLtState()
        if threshold > 0.0:
            state.threshold = threshold
        return bfun.MatMul8bitLt.apply(A, B, out, bias, state)

    ops = torch.ops.bitsandbytes
    with contextlib.ExitStack() as stack:
        stack.enter_context(_setattr(bfun, "matmul", _matmul_cuda_path))
        stack.enter_context(_setattr(bnb, "matmul", _matmul_cuda_path))
        stack.enter_context(_setattr(bF, "int8_vectorwise_quant", _int8_vectorwise_quant_cuda_like))
        stack.enter_context(_setattr(bF, "int8_double_quant", _int8_double_quant_cuda_like))
        # shims for ops whose fake kernels have data-dependent output sizes; they never call the real op
        stack.enter_context(_setattr(ops, "int8_mixed_scaled_mm", _OpShim(_int8_mixed_scaled_mm_no_outliers)))
        stack.enter_context(_setattr(ops, "int8_scaled_mm", _OpShim(_int8_scaled_mm_cuda_like)))
        yield


def _prefilled_fill_qmap(self) -> None:
    import bitsandbytes.functional as bF

    precompute_bnb_tables()
    self.name2qmap["dynamic"] = bF.name2qmap["dynamic"]
    self.name2qmap["udynamic"] = bF.name2qmap["udynamic"]


@contextlib.contextmanager
def _bnb_optim_patches() -> Iterator[None]:
    from bitsandbytes.optim.optimizer import Optimizer8bit

    with _setattr(Optimizer8bit, "fill_qmap", _prefilled_fill_qmap):
        yield


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    import logging

    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def quiet_library_warnings() -> Iterator[None]:
    """Deprecation chatter of transformers/PEFT and bitsandbytes' CPU notices say nothing about the trace."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*Paged optimizers are not supported on CPU.*")
        warnings.filterwarnings("ignore", message=".*ensure_weight_tying.*")
        yield


@contextlib.contextmanager
def trace_patches(*, bnb4: bool = False, bnb8: bool = False, bnb_optim: bool = False) -> Iterator[None]:
    import transformers.masking_utils as masking_utils

    with contextlib.ExitStack() as stack:
        stack.enter_context(quiet_library_warnings())
        stack.enter_context(_setattr(masking_utils, "find_packed_sequence_indices", _not_packed))
        stack.enter_context(_setattr(torch, "is_autocast_enabled", _is_autocast_enabled_cpu_for_cuda))
        stack.enter_context(_setattr(torch.nn.functional, "dropout", _cuda_like_dropout))
        stack.enter_context(_setattr(torch.nn.functional, "scaled_dot_product_attention", _cuda_like_sdpa))
        for k in SEEN:
            SEEN[k] = 0
        if bnb4 or bnb8 or bnb_optim:
            precompute_bnb_tables()
        if bnb4:
            stack.enter_context(_setattr(torch.ops.bitsandbytes, "gemm_4bit", _OpShim(_gemm_4bit_dequant_linear)))
        if bnb8:
            stack.enter_context(_int8_patches())
            stack.enter_context(_quiet_logger("bitsandbytes"))
        if bnb_optim:
            stack.enter_context(_bnb_optim_patches())
        yield
