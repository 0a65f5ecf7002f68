"""Pydantic types for everything a user types or reads.

Architecture fields copy Hugging Face `config.json` names; plan fields copy LLaMA-Factory's YAML keys,
so reading a training YAML and emitting one is a near-rename-free dump.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["REFERENCE_FREE_LOSSES", "VisionTower",
           "Arch", "GpuSpec", "Plan", "MemoryTerm", "Phase", "Moment", "PhasePeak",
           "Estimate", "PHASES"]

_FROZEN = ConfigDict(extra="forbid", frozen=True)


class VisionTower(BaseModel):
    """The vision tower of a Qwen2.5-VL model, as its config.json `vision_config` describes it (fields absent from
    config.json take the `Qwen2_5_VLVisionConfig` defaults of transformers' configuration_qwen2_5_vl.py)."""

    model_config = _FROZEN

    depth: int = Field(gt=0, description="`vision_config.depth`: ViT blocks (32).")
    hidden_size: int = Field(gt=0, description="`vision_config.hidden_size`: ViT width (1280).")
    intermediate_size: int = Field(gt=0, description="`vision_config.intermediate_size`: gated MLP width (3420).")
    num_heads: int = Field(gt=0, description="`vision_config.num_heads` (16).")
    in_channels: int = Field(default=3, gt=0, description="`vision_config.in_channels` (`in_chans`): 3 (RGB).")
    patch_size: int = Field(gt=0, description="`vision_config.patch_size`: pixels per patch side (14).")
    spatial_merge_size: int = Field(gt=0, description="`vision_config.spatial_merge_size`: patches merged per side "
                                    "into one text-side image token (2).")
    temporal_patch_size: int = Field(gt=0, description="`vision_config.temporal_patch_size`: frames per patch (2; "
                                     "an image is repeated to fill them).")
    window_size: int = Field(gt=0, description="`vision_config.window_size`: windowed-attention side in pixels "
                             "(112).")
    fullatt_block_indexes: tuple[int, ...] = Field(
        description="`vision_config.fullatt_block_indexes`: blocks with full attention over the image; the others "
        "attend within windows."
    )
    out_hidden_size: int = Field(gt=0, description="`vision_config.out_hidden_size`: the merger's output width, the "
                                 "text decoder's hidden_size.")


class Arch(BaseModel):
    """A decoder-only transformer, as its `config.json` describes it (plus a few flags that the
    model's transformers class hard-codes, derived by `optimizer.arch.arch_from_config`)."""

    model_config = _FROZEN

    name: str = Field(description="Catalog id (the Hugging Face repo id) or the path it was read from.")
    model_type: str = Field(description="config.json `model_type`, e.g. qwen2, llama, mistral, qwen3, gemma2, phi3.")
    hidden_size: int = Field(gt=0, description="config.json `hidden_size` (H).")
    intermediate_size: int = Field(gt=0, description="config.json `intermediate_size` (I), the MLP width.")
    num_hidden_layers: int = Field(gt=0, description="config.json `num_hidden_layers` (L).")
    num_attention_heads: int = Field(gt=0, description="config.json `num_attention_heads`.")
    num_key_value_heads: int = Field(gt=0, description="config.json `num_key_value_heads` (GQA when smaller).")
    head_dim: int = Field(gt=0, description="config.json `head_dim`, or hidden_size / num_attention_heads.")
    vocab_size: int = Field(gt=0, description="config.json `vocab_size` (V).")
    tie_word_embeddings: bool = Field(description="config.json `tie_word_embeddings`: lm_head shares embed_tokens.")
    max_position_embeddings: int | None = Field(
        default=None, gt=0,
        description="config.json `max_position_embeddings`: the trained context window (None: unknown).",
    )
    hidden_act: str = Field(default="silu", description="config.json `hidden_act` (or `hidden_activation`).")
    torch_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="bfloat16", description="config.json `torch_dtype`/`dtype`: the checkpoint dtype LLaMA-Factory loads."
    )
    qkv_bias: bool = Field(
        default=False, description="q/k/v projections carry a bias (Qwen2 always; Llama when `attention_bias`)."
    )
    o_bias: bool = Field(default=False, description="o_proj carries a bias (Llama-style `attention_bias`).")
    mlp_bias: bool = Field(default=False, description="config.json `mlp_bias`.")
    qk_norm: bool = Field(default=False, description="RMSNorm on q and k per head (q_norm/k_norm: Qwen3, Gemma 3).")
    norms_per_layer: int = Field(default=2, ge=1, description="RMSNorms per decoder layer (2; Gemma 2/3 have 4).")
    fused_qkv: bool = Field(default=False, description="One `qkv_proj` Linear instead of q/k/v (Phi-3).")
    fused_gate_up: bool = Field(default=False, description="One `gate_up_proj` Linear instead of gate/up (Phi-3).")
    final_logit_softcapping: float | None = Field(
        default=None, description="config.json `final_logit_softcapping` (Gemma 2): tanh capping of the logits."
    )
    attn_logit_softcapping: float | None = Field(
        default=None, description="config.json `attn_logit_softcapping` (Gemma 2): tanh capping of the attention "
        "scores (eager attention only; sdpa ignores it)."
    )
    vision: VisionTower | None = Field(
        default=None, description="The vision tower of a vision-language model (None: a text-only decoder)."
    )
    qk_norm_full: bool = Field(default=False, description="q_norm/k_norm normalize the whole q and k projections, "
                               "not each head (OLMoE: RMSNorm(hidden_size) and RMSNorm(kv width)).")
    num_experts: int = Field(default=0, ge=0, description="Routed experts per MoE layer (config.json `num_experts`; "
                             "Mixtral `num_local_experts`); 0 for a dense model.")
    num_experts_per_tok: int = Field(default=0, ge=0, description="config.json `num_experts_per_tok` (top-k).")
    moe_intermediate_size: int = Field(default=0, ge=0, description="One expert's MLP width (config.json "
                                       "`moe_intermediate_size`; Mixtral and OLMoE: `intermediate_size`).")
    shared_expert_intermediate_size: int = Field(default=0, ge=0, description="config.json "
                                                 "`shared_expert_intermediate_size` (Qwen2-MoE): the width of the "
                                                 "dense expert every token also goes through; 0: none.")
    norm_topk_prob: bool = Field(default=False, description="config.json `norm_topk_prob`: renormalize the top-k "
                                 "routing weights (Mixtral always does).")
    router_scores_fp32: bool = Field(default=False, description="The routing weights stay fp32 into the expert "
                                     "combine (Mixtral's router softmaxes `logits.float()` and never casts back).")
    partial_rotary_factor: float = Field(default=1.0, gt=0, le=1, description="The share of each head's channels "
                                         "RoPE rotates (GLM-4: config.json `partial_rotary_factor` 0.5, adjacent "
                                         "pairs); 1.0: all, Llama's rotate_half.")
    source: str = Field(default="", description="Where these numbers come from.")

    @property
    def rotary_dim(self) -> int:
        """Channels per head that RoPE rotates ([S] transformers models/glm4/modeling_glm4.py
        Glm4RotaryEmbedding.compute_default_rope_parameters: int(head_dim * partial_rotary_factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim


class GpuSpec(BaseModel):
    """One GPU model. Memory is the total nvidia-smi reports, in MiB."""

    model_config = _FROZEN

    id: str = Field(description="Catalog id, e.g. `rtx-5060-ti-16gb`.")
    name: str = Field(description="Marketing name.")
    memory_mib: int = Field(gt=0, description="Total memory as nvidia-smi reports it, MiB.")
    bandwidth_gbps: float = Field(gt=0, description="Memory bandwidth, GB/s.")
    bf16_tflops: float | None = Field(
        description="Dense BF16 tensor TFLOPS (FP32 accumulate on GeForce); None without bf16."
    )
    fp16_tflops: float = Field(gt=0, description="Dense FP16 tensor TFLOPS (FP32 accumulate on GeForce).")
    compute_capability: str = Field(description="CUDA compute capability, e.g. `8.9`.")
    architecture: str = Field(description="GPU architecture, e.g. Ada, Blackwell.")
    bf16: bool = Field(description="Supports bfloat16 (Ampere and newer).")
    flash_attn2: Literal["yes", "no", "experimental"] = Field(description="FlashAttention-2 support.")
    source: str = Field(default="", description="Where these numbers come from.")
    nvlink_gbps: float | None = Field(default=None, description="NVLink bandwidth per GPU, GB/s, bidirectional total "
                                      "as NVIDIA quotes it; None without NVLink.")
    pcie_gen: int | None = Field(default=None, description="PCIe generation of the card's host link.")
    pcie_lanes: int | None = Field(default=None, description="PCIe lanes of the card's host link.")
    interconnect_source: str = Field(default="", description="Where the interconnect figures come from.")

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * 1024 * 1024


FinetuningType = Literal["lora", "full"]
FlashAttn = Literal["auto", "disabled", "sdpa", "fa2"]
# [S] LLaMA-Factory hparams/finetuning_args.py: RLHFArguments.pref_loss choices; use_ref_model is false for orpo
# and simpo (FinetuningArguments.__post_init__).
PrefLoss = Literal["sigmoid", "hinge", "ipo", "kto_pair", "orpo", "simpo"]
REFERENCE_FREE_LOSSES = ("orpo", "simpo")
Optim = Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "sgd"]


class Plan(BaseModel):
    """The memory-relevant keys of one LLaMA-Factory training run, with LLaMA-Factory's defaults
    (v0.9.5, on transformers v5; `../docs` of each field gives the source of the default)."""

    model_config = _FROZEN

    finetuning_type: FinetuningType = Field(
        default="lora", description="LLaMA-Factory `finetuning_type` (default lora)."
    )
    quantization_bit: Literal[4, 8] | None = Field(
        default=None, description="bitsandbytes on-the-fly quantization: 4 (QLoRA) or 8."
    )
    quantization_type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type (default nf4).")
    double_quantization: bool = Field(default=True, description="Quantize the 4-bit absmax again (default true).")
    lora_rank: int = Field(default=8, gt=0, description="LoRA rank r (default 8).")
    lora_alpha: int | None = Field(default=None, description="LoRA alpha (default 2 x lora_rank). No memory effect.")
    lora_dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="LoRA dropout (default 0.0); > 0 keeps a dropout mask and output."
    )
    lora_target: str = Field(
        default="all", description="`all` or a comma list of module-name suffixes (q_proj,v_proj,...)."
    )
    additional_target: str | None = Field(
        default=None, description="Comma list of fully trained modules (PEFT modules_to_save)."
    )
    cutoff_len: int = Field(default=2048, gt=0, description="Maximum tokens per sample (default 2048).")
    per_device_train_batch_size: int = Field(default=8, gt=0, description="Micro-batch size (HF default 8).")
    gradient_accumulation_steps: int = Field(
        default=1, gt=0,
        description="Micro-batches per optimizer step. Above 1 the gradients stay live through the next micro-batch.",
    )
    max_samples: int | None = Field(default=None, description="Samples kept per dataset. No memory effect.")
    num_train_epochs: float = Field(default=3.0, gt=0, description="Epochs. No memory effect.")
    disable_gradient_checkpointing: bool = Field(
        default=False, description="LLaMA-Factory turns checkpointing on unless this is true."
    )
    use_reentrant_gc: bool = Field(
        default=True, description="Reentrant torch.utils.checkpoint (LLaMA-Factory default true)."
    )
    flash_attn: FlashAttn = Field(
        default="auto", description="Attention kernel: auto (sdpa), disabled (eager), sdpa, fa2."
    )
    optim: Optim = Field(
        default="adamw_torch_fused", description="HF optimizer name (transformers v5 default adamw_torch_fused)."
    )
    bf16: bool = Field(default=False, description="bf16 autocast (AMP).")
    fp16: bool = Field(default=False, description="fp16 autocast (AMP).")
    pure_bf16: bool = Field(default=False, description="Train in bf16 without AMP: trainable parameters stay bf16.")
    enable_liger_kernel: bool = Field(
        default=False, description="Liger kernels: fused linear cross-entropy, no full logits."
    )
    upcast_layernorm: bool = Field(default=False, description="Cast norm weights to fp32.")
    upcast_lmhead_output: bool = Field(
        default=False, description="Cast the lm_head output (logits) to fp32 with a hook."
    )
    max_grad_norm: float = Field(default=1.0, ge=0.0, description="Gradient clipping (HF default 1.0; 0 disables).")
    stage: Literal["sft", "dpo"] = Field(
        default="sft",
        description="LLaMA-Factory `stage`: sft (supervised; pt runs the same step) or dpo (pairwise preference: "
        "chosen and rejected sequences in one batch, plus a reference model's log-probs).",
    )
    pref_loss: PrefLoss = Field(default="sigmoid", description="DPO loss (default sigmoid); orpo and simpo need no "
                                "reference model.")
    pref_beta: float = Field(default=0.1, ge=0.0, description="DPO beta (default 0.1). No memory effect.")
    pref_ftx: float = Field(default=0.0, ge=0.0, description="SFT loss weight on the chosen sequences (default 0). "
                            "No memory effect: it reuses the policy's log-probs.")
    ref_model: str | None = Field(
        default=None,
        description="DPO reference model path (default: LoRA disables the adapters; full loads a second frozen copy "
        "of the model). trainfit assumes it has the policy's architecture.",
    )
    packing: bool | None = Field(
        default=None,
        description="LLaMA-Factory `packing`: samples packed into rows of exactly cutoff_len tokens (greedy knapsack; "
        "default None: on only for stage pt). Every micro-batch row is then cutoff_len long.",
    )
    neat_packing: bool = Field(
        default=False,
        description="LLaMA-Factory `neat_packing` (implies packing): no attention across packed samples. With sdpa or "
        "eager the collator builds a 4-D block-diagonal mask [b, 1, s, s] in the compute dtype, held all step.",
    )
    images_per_sample: int = Field(
        default=0, ge=0, exclude_if=lambda v: v == 0,
        description="trainfit option (vision-language models): images in each sample, from the dataset (`trainfit "
        "data` counts them; 0: text only). Each image goes through the vision tower as a square of image_max_pixels, "
        "the most patches LLaMA-Factory's resize lets one image have.",
    )
    image_max_pixels: int = Field(
        default=768 * 768, gt=0, exclude_if=lambda v: v == 768 * 768,
        description="LLaMA-Factory `image_max_pixels` (default 768*768): larger images are scaled down to it.",
    )
    image_min_pixels: int = Field(
        default=32 * 32, gt=0, exclude_if=lambda v: v == 32 * 32,
        description="LLaMA-Factory `image_min_pixels` (default 32*32): smaller images are scaled up to it.",
    )
    kbit_prepare: bool = Field(
        default=False,
        description="trainfit option: model prepared by PEFT's prepare_model_for_kbit_training (PEFT/TRL scripts; "
        "not LLaMA-Factory): every non-quantized parameter is upcast to fp32.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        """Cross-field rules, all reported at once (every reader and writer relies on them)."""
        problems = []
        if self.quantization_bit is not None and self.finetuning_type != "lora":
            # [S] LLaMA-Factory hparams/parser.py: "Quantization is only compatible with the LoRA or OFT method."
            problems.append("quantization_bit needs finetuning_type lora: remove quantization_bit or use lora")
        if self.bf16 and self.fp16:
            # [S] transformers training_args.py: bf16 and fp16 are mutually exclusive
            problems.append("bf16 and fp16 are both true: set only one of them")
        if self.pure_bf16 and self.fp16:
            # [S] LLaMA-Factory hparams/parser.py: pure_bf16 trains in bf16; fp16 autocast contradicts it
            problems.append("pure_bf16 and fp16 are both true: pick one precision")
        if (self.packing or self.neat_packing) and self.stage != "sft":
            # [S] LLaMA-Factory hparams/parser.py: "`neat_packing` cannot be set as True except SFT."; data/loader.py
            # packs only the supervised (and pt) datasets, pairwise data is never packed
            problems.append(f"packing/neat_packing apply to stage sft only (stage {self.stage}): remove them")
        if self.neat_packing and self.flash_attn == "fa2" and self.per_device_train_batch_size != 1:
            # [S] LLaMA-Factory data/collator.py::SFTDataCollatorWith4DAttentionMask: "bsz should be 1 for neat packing"
            problems.append("neat_packing with flash_attn fa2 needs per_device_train_batch_size 1: set it to 1 or use "
                            "sdpa")
        if self.image_max_pixels < self.image_min_pixels:
            # [S] LLaMA-Factory hparams/model_args.py ProcessorArguments.__post_init__
            problems.append(f"image_max_pixels {self.image_max_pixels} is smaller than image_min_pixels "
                            f"{self.image_min_pixels}: raise image_max_pixels or lower image_min_pixels")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def packed(self) -> bool:
        """Rows are packed: [S] LLaMA-Factory hparams/data_args.py::__post_init__ sets packing when neat_packing."""
        return bool(self.packing or self.neat_packing)

    @property
    def pairwise(self) -> bool:
        """Chosen and rejected sequences concatenated in one batch ([S] LLaMA-Factory data/collator.py::
        PairwiseDataCollatorWithPadding): twice per_device_train_batch_size sequences per forward."""
        return self.stage == "dpo"

    @property
    def use_ref_model(self) -> bool:
        """[S] LLaMA-Factory hparams/finetuning_args.py: use_ref_model = stage in (dpo, kto) and pref_loss not in
        (orpo, simpo)."""
        return self.stage == "dpo" and self.pref_loss not in REFERENCE_FREE_LOSSES

    @property
    def gradient_checkpointing(self) -> bool:
        return not self.disable_gradient_checkpointing

    @property
    def effective_lora_alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank


class Phase(StrEnum):
    """The phases of a training step (and the evaluation pass), as the memory model and the tracer name them."""

    FORWARD = "forward"
    LOSS = "loss"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"
    EVAL = "eval"


# The phases of one optimizer step, in order (the evaluation pass is not one of them).
PHASES = tuple(p.value for p in (Phase.FORWARD, Phase.LOSS, Phase.BACKWARD, Phase.OPTIMIZER))


class Moment(StrEnum):
    """The instants inside a phase where the memory model evaluates a peak. The allocator model
    (`memory.allocator.large_blocks_at`) and the tracer's sub-phases (`trace.result.MOMENT_OF_SUB`) key on
    these, never on the human-readable `PhasePeak.moment` text."""

    VISION_FORWARD = "vision_forward"  # vision-language models: the frozen vision tower's forward on the images
    FORWARD_LAST_LAYER = "forward_last_layer"  # the last decoder layer's forward, every earlier layer's saved
    LOSS_FORWARD = "loss_forward"  # logits, fp32 upcast, log-softmax
    REFERENCE_FORWARD = "reference_forward"  # DPO: the reference model's no_grad forward + log-softmax
    CE_BACKWARD = "ce_backward"  # nll_loss + log_softmax backward: dense fp32 [N, V] gradients
    LM_HEAD_BACKWARD = "lm_head_backward"  # logits gradient -> hidden-state (+ weight) gradient
    LAYER_BACKWARD_TOP = "layer_backward_top"  # the top decoder layer's (recompute +) backward
    LAYER_BACKWARD_BOTTOM = "layer_backward_bottom"  # the bottom decoder layer's (recompute +) backward
    EMBEDDING_GRAD_END = "embedding_grad_end"  # full fine-tuning: the embedding gradient, end of backward
    OPTIMIZER_STEP = "optimizer_step"  # clip_grad_norm_ + optimizer.step()
    EVAL = "eval"  # one evaluation batch under no_grad


class MemoryTerm(BaseModel):
    model_config = _FROZEN
    name: str = Field(description="Term name, e.g. `base_weights`, `logits_loss_backward`.")
    bytes: int = Field(description="Bytes of this term live at the peak of its phase (allocator-rounded).")
    detail: str = Field(default="", description="How the number is made: shapes and dtypes.")


class PhasePeak(BaseModel):
    model_config = _FROZEN
    phase: Phase = Field(description="forward, loss, backward, optimizer (or eval).")
    kind: Moment = Field(exclude=True, description="Which instant (code keys on this, not on the `moment` text).")
    moment: str = Field(description="The instant inside the phase where the peak happens, in words.")
    terms: list[MemoryTerm] = Field(description="Co-resident buffers at that instant; they add up to `total_bytes`.")

    @property
    def total_bytes(self) -> int:
        return sum(t.bytes for t in self.terms)


class Estimate(BaseModel):
    """What the memory model says about one plan on one architecture."""

    model_config = _FROZEN
    arch: str = Field(description="Architecture name.")
    trainable_params: int = Field(description="Trainable parameters, as LLaMA-Factory prints them.")
    all_params: int = Field(description="All parameters, as LLaMA-Factory prints them (4-bit weights un-packed).")
    tokens_per_micro_batch: int = Field(description="per_device_train_batch_size x padded sequence length.")
    phases: list[PhasePeak] = Field(description="Peak allocated memory of each phase of the steady-state step.")
    peak_phase: Phase = Field(description="The phase holding the overall peak.")
    peak_allocated_bytes: int = Field(description="Predicted torch.cuda.max_memory_allocated().")
    peak_reserved_bytes: int = Field(description="Predicted torch.cuda.max_memory_reserved().")
    device_peak_bytes: int = Field(description="Predicted nvidia-smi usage of the process (reserved + CUDA context).")
    notes: list[str] = Field(default_factory=list, description="Assumptions and warnings.")


class DatasetSummary(BaseModel):
    """What the solver needs to know about the data when no data file is given."""

    model_config = _FROZEN
    num_samples: int = Field(gt=0, description="Samples in the training set (after any validation split).")
    token_length_percentiles: dict[int, int] = Field(
        description="Percentile (0-100) -> tokens per sample (prompt + response, after the chat template). "
        "Give at least the 50th and 100th; more points make the coverage estimate better."
    )
    response_token_share: float = Field(
        default=0.5, gt=0, le=1, allow_inf_nan=False,
        description="Share of a sample's tokens that are the supervised response."
    )

    @model_validator(mode="after")
    def _check(self) -> DatasetSummary:
        keys = sorted(self.token_length_percentiles)
        if not keys or keys[0] < 0 or keys[-1] != 100 or 50 not in keys:
            raise ValueError("token_length_percentiles needs keys within 0..100 including 50 and 100")
        vals = [self.token_length_percentiles[k] for k in keys]
        if any(v <= 0 for v in vals) or vals != sorted(vals):
            raise ValueError("token_length_percentiles must be positive and non-decreasing in the percentile")
        return self
