"""Throughput and training-time model. PURE.

t_micro = flops_per_token * tokens / (peak_flops * mfu(tokens)) + dequant_s     (per micro-batch)
time    = micro_batches * t_micro + optimizer_steps * t_optimizer   (counted in search/objectives.py)

- FLOPs per token (Kaplan et al. 2020 6N convention, split by pass): with N the matmul parameters (decoder
  Linear layers + lm_head), A = 4 * (s/2) * (heads*head_dim) * L the causal attention FLOPs of a forward
  and P the LoRA parameters: LoRA forward 2N + A + 2P, backward (input gradients only) 2N + 2A + 4P,
  recompute under checkpointing 2N + A + 2P; full fine-tuning forward 2N + A, backward 4N + 2A,
  recompute 2N + A. So LoRA is 4N (6N with checkpointing) and full 6N (8N), plus attention.
- mfu(t) = MFU_MAX[class] * t / (t + T_HALF_TOKENS): utilization rises with tokens per micro-batch. Fitted to
  the published Qwen-7B LoRA throughput on an A100-80G (Qwen README, FA2 + checkpointing, batch 1: 1,707 /
  2,731 / 3,151 / 3,244 tokens/s at 256 / 512 / 2048 / 4096 tokens, i.e. 23 / 38 / 45 / 49 % of 312 TFLOPS);
  GeForce cards get their own maximum from the one consumer point (see benchmarks/throughput.py).
- bitsandbytes 4-bit dequantizes every frozen weight in forward, recompute and backward, once per
  micro-batch whatever its tokens: DEQUANT_BYTES_PER_PARAM * quantized params / bandwidth. Fitted to the
  same README's Q-LoRA rows (0.1-0.23 s per micro-batch for 7B NF4 on an A100-80G, 2,039 GB/s).
- LLM.int8 training runs at INT8_THROUGHPUT of 16-bit (h2oGPT and LLaMA-Factory #2077 report 8-bit much
  slower than fp16; the factor is an assumption within the 0.3-0.6 range those reports suggest).
- stage dpo: a micro-batch of b pairs runs 2b sequences (LLaMA-Factory data/collator.py::
  PairwiseDataCollatorWithPadding: chosen then rejected, padded to the longest), so tokens = 2b x seq through the
  policy's forward and backward; with a reference model (pref_loss not orpo/simpo) one more forward of the same 2b
  sequences without grad (train/dpo/trainer.py::CustomDPOTrainer.compute_reference_log_probs): 2N + A per token
  (Kaplan et al. 2020: a forward is 2N FLOPs per token; LoRA's adapters are disabled for it, full fine-tuning runs
  a frozen copy of the same size). A 4-bit reference forward dequantizes every weight once more: one pass of the
  fitted dequant cost, a third of DEQUANT_BYTES_PER_PARAM (the fit's runs used checkpointing: forward, recompute
  and backward, three passes).
The fit and its errors are printed by benchmarks/throughput.py; treat times as +-30 %.
"""

from __future__ import annotations

import math
from functools import lru_cache

from ..memory.precision import padded_length
from ..models.arch import layer_linears
from ..schema import Arch, GpuSpec

__all__ = ["flops_per_token", "mfu", "micro_batch_seconds", "expected_padded_len", "expected_padded_len_samples",
           "packed_rows_estimate"]

# Fitted by benchmarks/throughput.py --fit (least squares of relative error): datacenter cards on the Qwen-7B
# A100 rows; GeForce cards on the one published consumer point with a known setup (Qwen2.5-1.5B LoRA on an
# RTX 4060, arXiv 2509.12229). torchtune's RTX 4090 figures (implying > 80% utilization) are shown, not fitted.
MFU_MAX = {"datacenter": 0.57, "consumer": 0.30}
T_HALF_TOKENS = 350
DEQUANT_BYTES_PER_PARAM = 66.0
INT8_THROUGHPUT = 0.45
# fused AdamW reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg, exp_avg_sq: 7 fp32 tensors
ADAMW_BYTES_PER_PARAM = 28


def matmul_params(arch: Arch) -> int:
    """Weights each token multiplies: the decoder Linears, the lm_head and, for MoE, the router and the
    num_experts_per_tok experts the token is routed to (3 H I each), not all of them."""
    decoder = arch.num_hidden_layers * sum(m.weight_numel for m in layer_linears(arch))
    if arch.is_moe:
        H, I = arch.hidden_size, arch.moe_intermediate_size
        decoder += arch.num_hidden_layers * (arch.num_experts_per_tok * 3 * H * I + arch.num_experts * H)
    return decoder + arch.vocab_size * arch.hidden_size


def flops_per_token(arch: Arch, *, full: bool, gc: bool, seq_len: int, lora_params: int) -> float:
    n = matmul_params(arch)
    a = 4 * (seq_len / 2) * arch.q_dim * arch.num_hidden_layers
    p = 0 if full else lora_params
    if full:
        fwd, bwd, rec = 2 * n + a, 4 * n + 2 * a, 2 * n + a
    else:
        fwd, bwd, rec = 2 * n + a + 2 * p, 2 * n + 2 * a + 4 * p, 2 * n + a + 2 * p
    return fwd + bwd + (rec if gc else 0)


def time_band(gpu: GpuSpec) -> str:
    """The error band the fit supports (benchmarks/throughput.py): datacenter cards median 5%, max 13% on the
    fitted points; GeForce cards rest on one published point (and the model is ~75% below torchtune's RTX 4090
    figures)."""
    if gpu_class(gpu) == "datacenter":
        return "times: +-15% (fit to published A100 throughput: median error 5%, max 13%)"
    return ("times: +-50% (GeForce utilization fitted to one published point; other published consumer figures "
            "differ by up to 70%)")


def gpu_class(gpu: GpuSpec) -> str:
    """GeForce cards (catalog ids rtx-*) reach a lower share of their peak than datacenter cards."""
    return "consumer" if gpu.id.startswith("rtx-") or "GeForce" in gpu.name else "datacenter"


def mfu(tokens: float, gpu_cls: str = "datacenter") -> float:
    return MFU_MAX[gpu_cls] * tokens / (tokens + T_HALF_TOKENS)


def peak_flops(gpu: GpuSpec) -> float:
    return (gpu.bf16_tflops if gpu.bf16 and gpu.bf16_tflops else gpu.fp16_tflops) * 1e12


def micro_batch_seconds(arch: Arch, gpu: GpuSpec, *, finetuning_type: str, gc: bool, batch: int, seq_len: int,
                        lora_params: int, pairwise: bool = False, reference: bool = False) -> float:
    """One micro-batch of `batch` samples padded to `seq_len`. pairwise (stage dpo): `batch` pairs, 2 x batch
    sequences; reference: plus the reference model's no-grad forward of them (module docstring)."""
    seqs = 2 * batch if pairwise else batch
    tokens = seqs * seq_len
    full = finetuning_type == "full"
    f = flops_per_token(arch, full=full, gc=gc, seq_len=seq_len, lora_params=lora_params)
    if reference:
        f += 2 * matmul_params(arch) + 4 * (seq_len / 2) * arch.q_dim * arch.num_hidden_layers  # 2N + A, no grad
    t = f * tokens / (peak_flops(gpu) * mfu(tokens, gpu_class(gpu)))
    if finetuning_type == "qlora4":
        quantized = arch.num_hidden_layers * sum(m.weight_numel for m in layer_linears(arch))
        passes = 1 + (1 / 3 if reference else 0)  # the fit covers forward + recompute + backward
        t += passes * DEQUANT_BYTES_PER_PARAM * quantized / (gpu.bandwidth_gbps * 1e9)
    if finetuning_type == "qlora8":
        t /= INT8_THROUGHPUT
    return t


def _quantile(percentiles: dict[int, int], u: float) -> float:
    pts = sorted(percentiles.items())
    if pts[0][0] > 0:
        pts = [(0, 1)] + pts
    q = u * 100
    for (q0, l0), (q1, l1) in zip(pts, pts[1:]):
        if q0 <= q <= q1:
            return l0 + (l1 - l0) * ((q - q0) / (q1 - q0) if q1 > q0 else 0.0)
    return float(pts[-1][1])


def expected_padded_len(percentiles: dict[int, int], cutoff_len: int, batch: int) -> int:
    return _expected_padded_len(tuple(sorted(percentiles.items())), cutoff_len, batch)


@lru_cache(maxsize=4096)
def _expected_padded_len(pts: tuple[tuple[int, int], ...], cutoff_len: int, batch: int) -> int:
    """Expected padded length of a micro-batch: E[max of `batch` sample lengths], each truncated to
    cutoff_len, rounded up to a multiple of 8 (LLaMA-Factory's collator pads to the longest sample with
    pad_to_multiple_of=8). E[max] = integral of Q(u) * b * u^(b-1) du over the quantile function Q."""
    total = 0.0
    for i in range(QUANTILE_STEPS):
        u = (i + 0.5) / QUANTILE_STEPS
        total += min(cutoff_len, _quantile(dict(pts), u)) * batch * u ** (batch - 1) / QUANTILE_STEPS
    return min(padded_length(math.ceil(total)), padded_length(cutoff_len))


# Midpoints of the quantile function a length distribution known by its percentiles is integrated over (the error of
# the midpoint rule is below one token at this resolution for the piecewise-linear quantile function of _quantile)
QUANTILE_STEPS = 400


def mean_length(percentiles: dict[int, int], cap: float = math.inf) -> float:
    """Mean sample length, each truncated to `cap`, of the distribution the percentiles describe: the midpoint rule
    over its quantile function (QUANTILE_STEPS points)."""
    return sum(min(cap, _quantile(percentiles, (i + 0.5) / QUANTILE_STEPS))
               for i in range(QUANTILE_STEPS)) / QUANTILE_STEPS


def summary_coverage(percentiles: dict[int, int], response_share: float, cutoff_len: int) -> float:
    """Share of the supervised (response) tokens kept at cutoff_len, for a dataset known only by its length
    percentiles: each of QUANTILE_STEPS samples of the quantile function, a single turn whose response is
    `response_share` of its tokens, truncated by LLaMA-Factory's rule (data.dataset.infer_seqlen: a short response is
    kept whole, else a short prompt, else both cut in proportion). With a data file, data.dataset.coverage truncates
    each measured sample instead."""
    from ..data.dataset import infer_seqlen

    kept = total = 0
    for i in range(QUANTILE_STEPS):
        length = round(_quantile(percentiles, (i + 0.5) / QUANTILE_STEPS))
        response = round(response_share * length)
        kept += infer_seqlen(length - response, response, cutoff_len)[1]
        total += response
    return kept / total if total else 1.0


def packed_rows_estimate(percentiles: dict[int, int], num_samples: int, cutoff_len: int) -> int:
    """Rows that `packing` makes of a dataset known only by its length percentiles: the tokens after truncation at
    cutoff_len - 1 (LLaMA-Factory lowers cutoff_len by 1 when packing, hparams/data_args.py) divided by that
    capacity, rounded up. A lower bound of the greedy knapsack's count (data.dataset.packed_rows, used when the data
    file is given): it assumes every row full."""
    capacity = max(cutoff_len - 1, 1)
    return max(1, math.ceil(num_samples * mean_length(percentiles, capacity) / capacity))


def expected_padded_len_samples(lengths: tuple[int, ...], cutoff_len: int, batch: int) -> int:
    """Expected padded length of a micro-batch drawn from the measured sample lengths (sorted ascending):
    E[max of b draws] = sum_k L_(k) * ((k/n)^b - ((k-1)/n)^b), each length truncated to cutoff_len; rounded
    up to a multiple of 8 like the collator."""
    return _expected_from_samples(lengths, cutoff_len, batch)


@lru_cache(maxsize=4096)
def _expected_from_samples(lengths: tuple[int, ...], cutoff_len: int, batch: int) -> int:
    n = len(lengths)
    total = 0.0
    for k, length in enumerate(lengths, 1):
        total += min(length, cutoff_len) * ((k / n) ** batch - ((k - 1) / n) ** batch)
    return min(padded_length(math.ceil(total)), padded_length(cutoff_len))


def optimizer_step_seconds(trainable_params: int, gpu: GpuSpec) -> float:
    """One optimizer step: fused AdamW streams ADAMW_BYTES_PER_PARAM per trainable parameter through memory."""
    return ADAMW_BYTES_PER_PARAM * trainable_params / (gpu.bandwidth_gbps * 1e9)
