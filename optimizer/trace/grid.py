"""The accuracy grid: configs on which `trainfit estimate` is checked against `trainfit trace`.

Used by tests/test_accuracy.py (asserts the error bound) and benchmarks/accuracy.py (prints the table).
Architectures: tied and untied embeddings, vocabularies from 32k to 152k, GQA and MHA, q/k norms (Qwen3),
fused projections (Phi-3.5; GLM-4's gate_up), partial RoPE and post-block norms (GLM-4), qkv biases (Qwen2.5),
mixture-of-experts (Qwen3-30B-A3B, Mixtral-8x7B, OLMoE, Qwen1.5-MoE with a shared expert), vision-language
models with images (Qwen2.5-VL), soft-capped eager attention (Gemma 2); LoRA, QLoRA (4- and 8-bit) and full
fine-tuning; checkpointing on and off; eager and sdpa; cutoff_len 128-4096; batch 1-4; gradient accumulation (two
traced micro-batches) for LoRA and full fine-tuning.
"""

from __future__ import annotations

from ..schema import Plan

__all__ = ["GRID", "ERROR_BOUND"]

# The acceptance bound is 2%; the model holds 0.5% on every grid config, and the test keeps it there so
# that a regression shows (peak allocated; the estimate's cuBLAS workspaces, which the CPU trace cannot see,
# are left out of the comparison).
ERROR_BOUND = 0.005

_Q05 = "Qwen/Qwen2.5-0.5B-Instruct"
_Q7 = "Qwen/Qwen2.5-7B-Instruct"
_L1 = "meta-llama/Llama-3.2-1B-Instruct"
_M7 = "mistralai/Mistral-7B-Instruct-v0.3"
_Q3 = "Qwen/Qwen3-0.6B"
_PHI = "microsoft/Phi-3.5-mini-instruct"
_SMOL = "HuggingFaceTB/SmolLM2-1.7B-Instruct"


def _p(**kw) -> Plan:
    base = {"bf16": True, "per_device_train_batch_size": 1}
    base.update(kw)
    return Plan(**base)


GRID: list[tuple[str, Plan]] = [
    # Qwen2.5-0.5B: tied, 152k vocabulary, GQA, qkv bias
    (_Q05, _p(cutoff_len=128)),
    (_Q05, _p(cutoff_len=512, per_device_train_batch_size=2)),
    (_Q05, _p(cutoff_len=512, per_device_train_batch_size=2, disable_gradient_checkpointing=True)),
    (_Q05, _p(cutoff_len=512, per_device_train_batch_size=2, disable_gradient_checkpointing=True,
              flash_attn="disabled")),
    (_Q05, _p(cutoff_len=2048, flash_attn="disabled")),
    (_Q05, _p(cutoff_len=1024, quantization_bit=4)),
    (_Q05, _p(cutoff_len=1024, quantization_bit=4, disable_gradient_checkpointing=True)),
    (_Q05, _p(cutoff_len=512, quantization_bit=4, double_quantization=False, quantization_type="fp4")),
    (_Q05, _p(cutoff_len=512, quantization_bit=8)),
    (_Q05, _p(cutoff_len=256, per_device_train_batch_size=2, finetuning_type="full")),
    (_Q05, _p(cutoff_len=256, per_device_train_batch_size=2, finetuning_type="full",
              disable_gradient_checkpointing=True)),
    (_Q05, _p(cutoff_len=512, finetuning_type="full", pure_bf16=True, bf16=False)),
    (_Q05, _p(cutoff_len=512, finetuning_type="full", optim="adamw_torch", per_device_train_batch_size=2)),
    (_Q05, _p(cutoff_len=512, optim="adamw_8bit")),
    (_Q05, _p(cutoff_len=512, fp16=True, bf16=False)),
    (_Q05, _p(cutoff_len=512, bf16=False)),
    (_Q05, _p(cutoff_len=512, quantization_bit=4, kbit_prepare=True)),
    (_Q05, _p(cutoff_len=512, upcast_lmhead_output=True)),
    (_Q05, _p(cutoff_len=512, upcast_layernorm=True, disable_gradient_checkpointing=True)),
    (_Q05, _p(cutoff_len=512, additional_target="embed_tokens")),
    (_Q05, _p(cutoff_len=512, use_reentrant_gc=False, lora_dropout=0.1)),
    (_Q05, _p(cutoff_len=4096, per_device_train_batch_size=4)),
    # Qwen2.5-7B: untied, 152k
    (_Q7, _p(cutoff_len=1024, quantization_bit=4)),
    (_Q7, _p(cutoff_len=2048, per_device_train_batch_size=2)),
    (_Q7, _p(cutoff_len=512, disable_gradient_checkpointing=True, lora_rank=64)),
    (_Q7, _p(cutoff_len=256, finetuning_type="full", pure_bf16=True, bf16=False)),
    # Llama-3.2-1B: tied, 128k, GQA
    (_L1, _p(cutoff_len=1024, per_device_train_batch_size=2, optim="adamw_torch")),
    (_L1, _p(cutoff_len=1024, per_device_train_batch_size=2, lora_dropout=0.05, disable_gradient_checkpointing=True)),
    (_L1, _p(cutoff_len=512, quantization_bit=8)),
    (_L1, _p(cutoff_len=2048, flash_attn="disabled", lora_target="q_proj,v_proj")),
    # Mistral-7B: untied, 32k vocabulary, GQA
    (_M7, _p(cutoff_len=2048, per_device_train_batch_size=2)),
    (_M7, _p(cutoff_len=2048, per_device_train_batch_size=2, disable_gradient_checkpointing=True)),
    (_M7, _p(cutoff_len=1024, per_device_train_batch_size=2, quantization_bit=4)),
    (_M7, _p(cutoff_len=4096, per_device_train_batch_size=4)),
    (_M7, _p(cutoff_len=2048, per_device_train_batch_size=2, flash_attn="disabled")),
    (_M7, _p(cutoff_len=2048, per_device_train_batch_size=4, quantization_bit=4,
             lora_target="gate_proj,up_proj,down_proj")),
    # Qwen3-0.6B: q/k norms, tied
    (_Q3, _p(cutoff_len=512, per_device_train_batch_size=2, disable_gradient_checkpointing=True)),
    (_Q3, _p(cutoff_len=1024, quantization_bit=4, per_device_train_batch_size=2)),
    (_Q3, _p(cutoff_len=256, finetuning_type="full", per_device_train_batch_size=2)),
    # Phi-3.5-mini: fused qkv/gate_up, MHA, 32k, untied
    (_PHI, _p(cutoff_len=1024, disable_gradient_checkpointing=True)),
    (_PHI, _p(cutoff_len=1024)),
    (_PHI, _p(cutoff_len=4096, per_device_train_batch_size=4)),
    (_PHI, _p(cutoff_len=1024, quantization_bit=4, lora_target="qkv_proj,o_proj")),
    # SmolLM2-1.7B: tied, 49k, MHA
    (_SMOL, _p(cutoff_len=2048, per_device_train_batch_size=2)),
    (_SMOL, _p(cutoff_len=512, per_device_train_batch_size=4, disable_gradient_checkpointing=True,
               flash_attn="disabled")),
    (_SMOL, _p(cutoff_len=1024, finetuning_type="full", per_device_train_batch_size=1)),
]
GRID += [
    # trainable copies of embeddings / lm_head (PEFT modules_to_save), fp32 and pure_bf16
    (_Q05, _p(cutoff_len=256, additional_target="lm_head", pure_bf16=True, bf16=False)),
    (_Q05, _p(cutoff_len=256, additional_target="embed_tokens", pure_bf16=True, bf16=False)),
    (_M7, _p(cutoff_len=128, additional_target="lm_head")),
    (_L1, _p(cutoff_len=512, additional_target="lm_head,embed_tokens")),
]
GRID += [
    # gradient accumulation: the tracer runs two micro-batches per optimizer step; from the second on every .grad
    # is live (full fine-tuning: GBs; LoRA: the adapters'). Checkpointing on and off, tied and untied, AMP and not.
    (_Q05, _p(cutoff_len=256, per_device_train_batch_size=2, finetuning_type="full", gradient_accumulation_steps=2)),
    (_Q05, _p(cutoff_len=256, per_device_train_batch_size=2, finetuning_type="full", gradient_accumulation_steps=2,
              disable_gradient_checkpointing=True)),
    (_Q05, _p(cutoff_len=256, finetuning_type="full", bf16=False, gradient_accumulation_steps=2)),
    (_Q7, _p(cutoff_len=256, finetuning_type="full", pure_bf16=True, bf16=False, gradient_accumulation_steps=2)),
    (_Q05, _p(cutoff_len=512, per_device_train_batch_size=2, gradient_accumulation_steps=2)),
    (_L1, _p(cutoff_len=1024, per_device_train_batch_size=2, gradient_accumulation_steps=4,
             disable_gradient_checkpointing=True)),
    (_M7, _p(cutoff_len=128, additional_target="lm_head", gradient_accumulation_steps=2)),
]
GRID += [
    # stage dpo (LLaMA-Factory CustomDPOTrainer): 2b sequences per forward, the policy's fp32 logits + log-softmax
    # held through the reference's no_grad forward (LoRA: adapters disabled; full: a second frozen copy); orpo has
    # no reference. LoRA, QLoRA and full; checkpointing on and off; eager and sdpa; 32k-152k vocabularies.
    (_Q05, _p(stage="dpo", cutoff_len=512)),
    (_Q05, _p(stage="dpo", cutoff_len=512, disable_gradient_checkpointing=True)),
    (_Q05, _p(stage="dpo", cutoff_len=1024, quantization_bit=4)),
    (_Q05, _p(stage="dpo", cutoff_len=256, finetuning_type="full")),
    (_Q05, _p(stage="dpo", cutoff_len=256, finetuning_type="full", disable_gradient_checkpointing=True)),
    (_Q05, _p(stage="dpo", cutoff_len=512, pref_loss="orpo")),
    (_Q3, _p(stage="dpo", cutoff_len=512, flash_attn="disabled")),
    (_L1, _p(stage="dpo", cutoff_len=1024, per_device_train_batch_size=2, pref_ftx=0.1)),
    (_M7, _p(stage="dpo", cutoff_len=1024, quantization_bit=4)),
]
_Q3M = "Qwen/Qwen3-30B-A3B"
_MIX = "mistralai/Mixtral-8x7B-Instruct-v0.1"
_OLMOE = "allenai/OLMoE-1B-7B-0924"
_Q15M = "Qwen/Qwen1.5-MoE-A2.7B-Chat"
GRID += [
    # mixture-of-experts (transformers' grouped_mm experts): every expert resident in bf16 (not quantized by
    # bitsandbytes, not LoRA targets), router softmax in fp32, S = N k routed rows through the experts. 128/64/8
    # experts, top-8/8/2, Mixtral's fp32 routing weights, OLMoE's full-width q/k norms; LoRA, QLoRA 4/8-bit, full
    # (pure_bf16), fp16 autocast, checkpointing on and off, sdpa and eager.
    (_OLMOE, _p(cutoff_len=256)),
    (_OLMOE, _p(cutoff_len=2048, per_device_train_batch_size=2, disable_gradient_checkpointing=True)),
    (_OLMOE, _p(cutoff_len=1024, quantization_bit=4)),
    (_OLMOE, _p(cutoff_len=512, finetuning_type="full", pure_bf16=True, bf16=False)),
    (_OLMOE, _p(cutoff_len=1024, quantization_bit=8)),
    (_OLMOE, _p(cutoff_len=1024, fp16=True, bf16=False)),
    (_Q3M, _p(cutoff_len=1024, per_device_train_batch_size=2)),
    (_Q3M, _p(cutoff_len=512, disable_gradient_checkpointing=True)),
    (_Q3M, _p(cutoff_len=1024, quantization_bit=4, flash_attn="disabled")),
    (_MIX, _p(cutoff_len=1024, quantization_bit=4, disable_gradient_checkpointing=True)),
    (_MIX, _p(cutoff_len=2048, per_device_train_batch_size=2)),
]
GRID += [
    # Qwen2-MoE: a shared expert (nn.Linear gate/up/down, LoRA targets, 4-bit) and its sigmoid gate beside 60 routed
    # experts, top-4, qkv biases
    (_Q15M, _p(cutoff_len=1024, per_device_train_batch_size=2, disable_gradient_checkpointing=True)),
    (_Q15M, _p(cutoff_len=1024, quantization_bit=4)),
    (_Q15M, _p(cutoff_len=512, finetuning_type="full", pure_bf16=True, bf16=False,
               disable_gradient_checkpointing=True)),
    (_Q15M, _p(cutoff_len=2048, flash_attn="disabled", lora_dropout=0.1)),
]
GRID += [
    # DPO on MoE: chosen + rejected through the routed experts; the LoRA reference is the adapter-disabled policy
    (_OLMOE, _p(stage="dpo", cutoff_len=512)),
    (_Q15M, _p(stage="dpo", cutoff_len=512, quantization_bit=4)),
]
GRID += [
    # padded batches, packing and neat_packing (optimizer/memory/precision.py::attention_mask_kind). sdpa's worst case
    # holds a pad token: a bool [b, 1, s, s] mask, an additive copy saved per layer, K/V repeated (GQA); packing at a
    # cutoff_len that is a multiple of 8 has none (rows of exactly cutoff_len); neat_packing: LLaMA-Factory's 4-D mask
    # in the compute dtype, held all step (sdpa and eager).
    (_SMOL, _p(cutoff_len=1024, per_device_train_batch_size=4, disable_gradient_checkpointing=True)),
    (_Q05, _p(cutoff_len=1024, per_device_train_batch_size=2, packing=True)),
    (_Q7, _p(cutoff_len=1020, per_device_train_batch_size=2, packing=True, quantization_bit=4)),
    (_Q05, _p(cutoff_len=1024, per_device_train_batch_size=2, neat_packing=True)),
    (_Q05, _p(cutoff_len=512, per_device_train_batch_size=2, neat_packing=True, disable_gradient_checkpointing=True)),
    (_L1, _p(cutoff_len=2048, neat_packing=True, flash_attn="disabled")),
    (_M7, _p(cutoff_len=2048, per_device_train_batch_size=2, neat_packing=True, quantization_bit=4)),
    (_Q3, _p(cutoff_len=512, per_device_train_batch_size=2, neat_packing=True, finetuning_type="full")),
    # long context: 32k-64k tokens per row (sdpa: the padded mask grows as s^2; eager: b x heads x s^2 fp32 softmax)
    (_L1, _p(cutoff_len=65536)),
    (_L1, _p(cutoff_len=32768, packing=True, quantization_bit=4)),
    (_Q05, _p(cutoff_len=32768, flash_attn="disabled")),
]
_GLM = "zai-org/GLM-4-9B-0414"
GRID += [
    # GLM-4-0414 (glm4): four norms per layer (post_self_attn and post_mlp on the block outputs), fused gate_up with
    # separate q/k/v, q/k/v bias without o bias, partial interleaved RoPE (64 of 128 channels, per-layer cos/sin
    # copies), 151k untied vocabulary, 16:1 GQA; LoRA, QLoRA, full (pure_bf16), sdpa and eager, checkpointing on and off
    (_GLM, _p(cutoff_len=1024)),
    (_GLM, _p(cutoff_len=512, per_device_train_batch_size=2, disable_gradient_checkpointing=True)),
    (_GLM, _p(cutoff_len=2048, per_device_train_batch_size=2, quantization_bit=4)),
    (_GLM, _p(cutoff_len=1024, flash_attn="disabled", disable_gradient_checkpointing=True)),
    (_GLM, _p(cutoff_len=256, finetuning_type="full", pure_bf16=True, bf16=False)),
    # packed rows (no mask): flash sdpa's output takes the contiguous query's layout, so o_proj gets a copy, which
    # QLoRA's adapter saves
    (_GLM, _p(cutoff_len=1024, quantization_bit=4, disable_gradient_checkpointing=True, packing=True)),
]
_QVL3 = "Qwen/Qwen2.5-VL-3B-Instruct"
_QVL7 = "Qwen/Qwen2.5-VL-7B-Instruct"
GRID += [
    # vision-language models (Qwen2.5-VL, LoRA, frozen tower and merger): images_per_sample images per sequence at
    # image_max_pixels (optimizer/trace/vision.py answers the tower's value reads from their grids). With gradient
    # checkpointing PEFT's enable_input_require_grads makes the tower's patch embedding output require grad, so every
    # vision block keeps its saved tensors until the end of backward; without it the tower is a transient. sdpa and
    # eager (windowed and full attention), 1-4 images of 256^2-1024^2 pixels, batch 1-2, AMP and not.
    (_QVL3, _p(cutoff_len=1024, images_per_sample=1)),
    (_QVL3, _p(cutoff_len=2048, per_device_train_batch_size=2, images_per_sample=2, image_max_pixels=512 * 512,
               disable_gradient_checkpointing=True)),
    (_QVL7, _p(cutoff_len=2048, images_per_sample=1, image_max_pixels=1024 * 1024)),
    (_QVL3, _p(cutoff_len=1024, per_device_train_batch_size=2, images_per_sample=1, image_max_pixels=448 * 448,
               flash_attn="disabled")),
    (_QVL7, _p(cutoff_len=1024, images_per_sample=4, image_max_pixels=256 * 256, lora_rank=32,
               disable_gradient_checkpointing=True)),
    (_QVL3, _p(cutoff_len=512, images_per_sample=1, image_max_pixels=448 * 448, bf16=False)),
]
_G2 = "google/gemma-2-2b-it"
GRID += [
    # QLoRA without checkpointing: the adapters save the attention output o_proj gets. Phi-3's RoPE ends in
    # torch.cat (a contiguous query), so packed rows' flash sdpa output needs the caller's contiguous copy (with a
    # mask CUDA's memory-efficient kernel writes [b, s, nh, hd]: no copy; trace/patches.py keeps that); Gemma 2's
    # eager attention soft-caps the scores (tanh saves a [b, nh, s, s] tensor per layer)
    (_PHI, _p(cutoff_len=1024, quantization_bit=4, disable_gradient_checkpointing=True, packing=True)),
    (_PHI, _p(cutoff_len=1024, quantization_bit=4, disable_gradient_checkpointing=True, per_device_train_batch_size=2)),
    (_G2, _p(cutoff_len=1024, quantization_bit=4, disable_gradient_checkpointing=True, flash_attn="disabled")),
    (_G2, _p(cutoff_len=512, per_device_train_batch_size=2, disable_gradient_checkpointing=True,
             flash_attn="disabled")),
]
