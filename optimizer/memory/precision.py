"""Settings derived from a plan: which dtype each thing has, which modules LoRA wraps, the padded length."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..models.arch import layer_linears
from ..models.families import family_of
from ..schema import Arch, Plan
from ..units import round_up

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4

# ---------------------------------------------------------------------------------------------------
# Settings derived from the plan: which dtype each thing has.
# ---------------------------------------------------------------------------------------------------


# [S] LLaMA-Factory data/collator.py: the SFT collator pads each batch with pad_to_multiple_of=8.
PAD_MULTIPLE = 8


def padded_length(tokens: int) -> int:
    """The length a batch of `tokens`-long samples is padded to (what every per-token memory term uses)."""
    return round_up(tokens, PAD_MULTIPLE)



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
    mask: str = "none"  # sdpa's attention mask: none (is_causal), bool (padded batch), float (neat_packing)

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


def check_moe(arch: Arch, plan: Plan) -> None:
    """A MoE model's experts run through `grouped_mm`, which takes bfloat16 only ([S] transformers v5
    integrations/moe.py::_grouped_mm casts the input to the weight dtype; torch.nn.functional.grouped_mm docs:
    "Inputs are currently expected to be torch.bfloat16"; [T] the CPU kernel raises "Expected inputs of BF16
    type" on fp32 experts). Full fine-tuning upcasts them to fp32 unless pure_bf16, and an fp32/fp16 checkpoint
    keeps them in that dtype: one clear error instead of a crash in the first forward."""
    if not arch.is_moe:
        return
    if plan.finetuning_type == "full" and not plan.pure_bf16:
        raise ConfigError(
            f"full fine-tuning of the mixture-of-experts model {arch.name} upcasts its experts to fp32, which "
            "transformers' grouped_mm experts kernel rejects (bf16 only). Set pure_bf16: true, or use LoRA.")
    if arch.torch_dtype != "bfloat16":
        raise ConfigError(
            f"the experts of {arch.name} are {arch.torch_dtype} (config.json torch_dtype), which transformers' "
            "grouped_mm experts kernel rejects (bf16 only). Use a bfloat16 checkpoint.")


def setting_for(arch: Arch, plan: Plan) -> Setting:
    if arch.vision is not None:
        _check_vision(arch, plan)
    elif plan.images_per_sample:
        raise ConfigError(f"{arch.name}: images_per_sample {plan.images_per_sample} needs a vision-language model; "
                          f"{arch.name} has no vision tower. Set images_per_sample 0 or use a vision-language model, "
                          "e.g. Qwen/Qwen2.5-VL-3B-Instruct.")
    check_moe(arch, plan)
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
    if "embed_tokens" in additional_targets(plan):
        stream = train_w  # the trainable copy PEFT makes is upcast like every trainable param
    c = 2 if amp else (train_w if full else ckpt_w)
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
        rank=plan.lora_rank, seq=padded_length(plan.cutoff_len),
        # [S] LLaMA-Factory data/collator.py::PairwiseDataCollatorWithPadding: a DPO micro-batch of b pairs is
        # one batch of 2b sequences (chosen, then rejected)
        batch=plan.per_device_train_batch_size * (2 if plan.pairwise else 1),
        gemma_norm=family_of(arch.model_type).gemma_norm, mixed16=mixed16, fp16=amp and plan.fp16,
        mask=attention_mask_kind(plan, _attention(arch, plan)),
    )


def attention_mask_kind(plan: Plan, attn: str) -> str:
    """Which attention mask sdpa gets in the worst case of a micro-batch (the tracer passes the same).

    - `float`: neat_packing ([S] LLaMA-Factory data/collator.py::SFTDataCollatorWith4DAttentionMask: without
      flash_attention_2 the collator replaces the 2-D mask by prepare_4d_attention_mask, [b, 1, s, s] in the
      compute dtype; transformers masking_utils.py::_preprocess_mask_arguments returns a 4-D mask as-is).
    - `none`: packing without neat_packing at a cutoff_len that is a multiple of 8: every row is exactly cutoff_len
      tokens with an all-ones attention_mask ([S] LLaMA-Factory data/processor/supervised.py::
      PackedSupervisedDatasetProcessor pads each row with attention_mask 1; hparams/data_args.py lowers cutoff_len
      by 1 first, the row is cutoff_len - 1 + 1), so masking_utils.py::_ignore_causal_mask_sdpa drops the mask
      (`fast_all(padding_mask)`) and sdpa runs is_causal.
    - `bool`: any other micro-batch can hold padding: the collator pads to the longest sample rounded up to 8
      (pad_to_multiple_of=8, attention_mask 0), even a single sample; a zero in the mask makes masking_utils.py::
      sdpa_mask build a bool [b, 1, s, s] mask, which the worst case assumes.
    fa2: `none` (LLaMA-Factory drops the mask for neat_packing, and FA2 unpads a padded batch: no [s, s] mask).
    eager: `none` unless neat_packing (eager always builds its own 4-D mask, counted in head.py; neat_packing's
    replaces it)."""
    if plan.flash_attn == "fa2":
        return "none"
    if plan.neat_packing:
        return "float"
    if attn != "sdpa":
        return "none"
    if plan.packed and plan.cutoff_len % PAD_MULTIPLE == 0:
        return "none"
    return "bool"


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


def _check_vision(arch: Arch, plan: Plan) -> None:
    """The vision-language plans the memory model covers: LoRA on the text decoder with the vision tower and the
    merger frozen (LLaMA-Factory's defaults freeze_vision_tower and freeze_multi_modal_projector true, [S]
    hparams/finetuning_args.py; `lora_target: all` then skips visual.* [S] model/model_utils/visual.py)."""
    if plan.quantization_bit is not None:
        # transformers' bitsandbytes integration would quantize the vision tower's Linear layers too
        raise ConfigError(f"{arch.name}: quantization_bit {plan.quantization_bit} with a vision-language model is not "
                          "modelled (bitsandbytes would also quantize the vision tower's Linear layers). Remove "
                          "quantization_bit, or use a text-only model.")
    if plan.finetuning_type != "lora":
        raise ConfigError(f"{arch.name}: finetuning_type {plan.finetuning_type} of a vision-language model is not "
                          "modelled yet. Use finetuning_type lora (the vision tower stays frozen).")
    if plan.additional_target:
        raise ConfigError(f"{arch.name}: additional_target with a vision-language model is not modelled yet. Leave "
                          "additional_target unset.")
    if plan.images_per_sample and (plan.pairwise or plan.packed):
        what = "stage dpo" if plan.pairwise else "packing/neat_packing"
        raise ConfigError(f"{arch.name}: {what} with images is not modelled yet. Use stage sft without packing, or "
                          "images_per_sample 0.")
    if plan.images_per_sample:
        tokens = sample_image_tokens(arch, plan.images_per_sample, plan.image_max_pixels, plan.image_min_pixels)
        if tokens > plan.cutoff_len:
            raise ConfigError(f"{arch.name}: {plan.images_per_sample} image(s) of up to image_max_pixels "
                              f"{plan.image_max_pixels} take {tokens} tokens, more than cutoff_len {plan.cutoff_len} "
                              "(image tokens count toward it). Raise cutoff_len or lower image_max_pixels.")


def sample_image_tokens(arch: Arch, images: int, max_pixels: int, min_pixels: int) -> int:
    """The tokens `images` images of up to `max_pixels` take in a sample's cutoff_len-long sequence, each priced as
    the memory model takes it (a square of max_pixels: models/vision.plan_image_grid)."""
    from ..models.vision import plan_image_grid

    t, h, w = plan_image_grid(arch.vision, max_pixels, min_pixels)
    # [S] LLaMA-Factory data/mm_plugin.py Qwen2VLPlugin.process_messages: t h w / merge^2 <|image_pad|> tokens
    # + <|vision_start|> and <|vision_end|> per image, inside the cutoff_len-long sequence
    return images * (t * h * w // arch.vision.spatial_merge_size ** 2 + 2)


def additional_targets(plan: Plan) -> list[str]:
    return [t.strip() for t in (plan.additional_target or "").split(",") if t.strip()]
