"""The estimated-quality score of a plan: a documented, monotone heuristic, not a prediction of eval loss.

Q = w_target*T + w_rank*R + w_cutoff*C + w_samples*S - w_quant*P - w_batch*B, each term in [0, 1].
The ordering of each term is evidence-backed; the weights are policy (override them in the problem file):
- T(lora_target): attention 0.2 < mlp 0.85 < all 1.0. Ordering: LoRA paper (Hu et al. 2021, Table 5: more
  adapted matrices beat one at a higher rank), QLoRA (Dettmers et al. 2023: "LoRA on all linear transformer
  block layers are required to match full finetuning"), Biderman et al. 2024 (All > MLP > Attention),
  Schulman et al. 2025 "LoRA Without Regret" (attention-only underperforms even at matched parameters).
- R(lora_rank) = log2(r) / log2(256): rank matters little on small data (Hu et al. Table 6; QLoRA: "r ... does
  not affect performance"), more with more data (rsLoRA, Biderman r=256 > r=16); hence a small weight.
- C(cutoff_len): share of supervised (response) tokens kept under truncation, from the dataset's length
  distribution (mechanistic; no paper gives a per-token value).
- S(max_samples) = log(1 + n) / log(1 + N): loss falls log-linearly with data (Schulman et al. 2025; the
  power law of Zhang et al. 2024).
- P(quantization): nf4 0.4, 8-bit 0.2, 16-bit 0 (QLoRA Table 4: NF4+DQ 53.1 vs BF16 53.0 MMLU; the LoftQ
  Phi-2 GSM8K card: QLoRA 60.2 vs LoRA 64.8, so a small non-zero penalty).
- B(effective batch) = 0 up to 32, then log2(ebs/32)/2, at most 1: LoRA is less tolerant of large batches
  (Schulman et al. 2025; TRL's "effective batch size < 32").
Limits: the score ranks configs of one model on one dataset; it says nothing across models or tasks.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["QualityWeights", "TARGET_SCORE", "QUANT_PENALTY", "coverage"]


class QualityWeights(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    target: float = Field(default=0.30, ge=0, description="Weight of the LoRA-target coverage term.")
    rank: float = Field(default=0.10, ge=0, description="Weight of the rank term.")
    cutoff: float = Field(default=0.30, ge=0, description="Weight of the supervised-token coverage term.")
    samples: float = Field(default=0.20, ge=0, description="Weight of the data-amount term.")
    quant: float = Field(default=0.05, ge=0, description="Weight of the quantization penalty.")
    batch: float = Field(default=0.05, ge=0, description="Weight of the large-effective-batch penalty.")


TARGET_SCORE = {"attention": 0.2, "mlp": 0.85, "all": 1.0}
QUANT_PENALTY = {"lora": 0.0, "full": 0.0, "qlora8": 0.2, "qlora4": 0.4}
RANK_MAX = 256


def coverage(cutoff_len: int, percentiles: dict[int, int], response_share: float) -> float:
    """Share of supervised tokens kept when samples are truncated to cutoff_len.

    The length distribution is piecewise linear between the given percentiles (the 0th percentile defaults to
    1 token). LLaMA-Factory's `infer_seqlen` keeps the response whole while it fits and trims prompt and
    response in proportion otherwise; here a sample of length l > cutoff keeps cutoff/l of its response.
    """
    pts = sorted(percentiles.items())
    if pts[0][0] > 0:
        pts = [(0, 1)] + pts
    kept = total = 0.0
    steps = 200
    for i in range(steps):
        q = (i + 0.5) / steps * 100
        for (q0, l0), (q1, l1) in zip(pts, pts[1:]):
            if q0 <= q <= q1:
                length = l0 + (l1 - l0) * ((q - q0) / (q1 - q0) if q1 > q0 else 0.0)
                break
        resp = response_share * length
        prompt = length - resp
        if length <= cutoff_len:
            kept += resp
        elif prompt < cutoff_len and resp * 2 < cutoff_len:
            kept += resp  # short response: the prompt is truncated
        else:
            kept += resp * cutoff_len / length
        total += resp
    return kept / total if total else 1.0
