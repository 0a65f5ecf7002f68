"""Model families: one row per config.json `model_type` holding every per-family fact trainfit uses, and the
LLaMA-Factory chat template of each catalog model (with name rules for other ids of the same families).

A row's fields and their sources:
- tied_by_default: transformers v5 config classes default `tie_word_embeddings` to True only for the Gemma
  family (GemmaConfig, Gemma2Config, Gemma3TextConfig); LlamaConfig, Qwen2Config, Qwen3Config, MistralConfig,
  Phi3Config and GraniteConfig default to False.
- qwen2_biases: Qwen2Attention.__init__ gives q/k/v `bias=True` and o_proj `bias=False` whatever config.json says
  (it has no `attention_bias` key); other families take `config.attention_bias`.
- qk_norm: qwen3 and gemma3 have `q_norm`/`k_norm` RMSNorm(head_dim) per layer.
- norms_per_layer: gemma2 and gemma3 have four RMSNorms per layer (input, post_attention, pre/post_feedforward).
- fused: phi3 fuses `qkv_proj` (H -> (nh + 2 kv) hd) and `gate_up_proj` (H -> 2 I).
- gemma_norm: Gemma's RMSNorm computes `x * (1 + w)` in fp32 (modeling_gemma*.py GemmaRMSNorm.forward), which
  changes what the memory model's norm op saves.
- liger: Liger kernels patch the family (liger_kernel.transformers.monkey_patch MODEL_TYPE_TO_APPLY_LIGER_FN, the
  families LLaMA-Factory's `enable_liger_kernel` applies through apply_liger_kernel_to_<family>).
- tokenizer: the approximate token counter's family when the model's name says nothing (optimizer/data/tokens.py;
  None: decided by the chat template).
- template_hint: what to suggest when no chat template is known for a model id of the family.
- experts_key: the config.json key holding the number of routed experts of a mixture-of-experts family
  (transformers v5 Qwen3MoeConfig/OlmoeConfig `num_experts`, MixtralConfig `num_local_experts`); None: dense.
  Every MoE family here stores its experts as two fused 3-D parameters per layer (`experts.gate_up_proj`
  [E, 2 I, H], `experts.down_proj` [E, H, I]: modeling_qwen3_moe.py Qwen3MoeExperts, MixtralExperts, OlmoeExperts).
- expert_width_key: the config.json key of one expert's MLP width (qwen3_moe `moe_intermediate_size`; Mixtral and
  OLMoE build experts of `intermediate_size`).
- router_scores_fp32: MixtralTopKRouter.forward softmaxes `router_logits.float()` and returns the fp32 top-k weights
  (Qwen3MoeTopKRouter and OlmoeTopKRouter cast them back with `.to(router_logits.dtype)`); Mixtral always
  renormalizes the top-k (no `norm_topk_prob` key).
- shared_expert: Qwen2MoeSparseMoeBlock adds `shared_expert` (a gated MLP of nn.Linear gate/up/down_proj of width
  `shared_expert_intermediate_size`) and `shared_expert_gate` (nn.Linear(H, 1)): output = experts +
  sigmoid(shared_expert_gate(x)) * shared_expert(x).
- qk_norm_full: OlmoeAttention has q_norm = RMSNorm(hidden_size) and k_norm = RMSNorm(kv width) over the whole
  projection outputs, before the per-head view.
- fused_gate_up: the MLP alone is fused (Glm4MLP: `gate_up_proj` nn.Linear(H, 2 I, bias=False), q/k/v separate).
- no_o_bias: o_proj has no bias whatever `attention_bias` says (Glm4Attention: q/k/v `bias=config.attention_bias`,
  o_proj `bias=False`).
- partial_rope: RoPE on the first `partial_rotary_factor` x head_dim channels of each head, adjacent channel pairs
  rotated (modeling_glm4.py apply_rotary_pos_emb / rotate_half); Glm4Config.__post_init__ defaults the factor to 0.5.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["Family", "FAMILIES", "family_of", "CATALOG_TEMPLATES", "template_for", "template_by_rules"]


@dataclass(frozen=True)
class Family:
    tied_by_default: bool = False
    qwen2_biases: bool = False
    qk_norm: bool = False
    norms_per_layer: int = 2
    fused: bool = False
    gemma_norm: bool = False
    liger: bool = False
    tokenizer: str | None = None
    template_hint: str = ""
    experts_key: str | None = None
    expert_width_key: str = "intermediate_size"
    router_scores_fp32: bool = False
    shared_expert: bool = False
    qk_norm_full: bool = False
    fused_gate_up: bool = False
    no_o_bias: bool = False
    partial_rope: bool = False


FAMILIES: dict[str, Family] = {
    "llama": Family(liger=True, tokenizer="llama3",
                    template_hint="`llama3` for Llama 3.x, `smollm2` for SmolLM2, `llama2` for Llama 2"),
    "mistral": Family(liger=True, tokenizer="sp32k", template_hint="`mistral` for Mistral-7B, `ministral` for "
                      "Mistral-Nemo, `mistral_small` for Mistral-Small"),
    "qwen2": Family(qwen2_biases=True, liger=True, tokenizer="qwen",
                    template_hint="`qwen` for Qwen2/Qwen2.5, `deepseekr1` for the DeepSeek-R1 distills"),
    # Qwen2.5-VL's text decoder is Qwen2's (Qwen2_5_VLAttention: q/k/v bias=True, o_proj bias=False)
    "qwen2_5_vl": Family(qwen2_biases=True, liger=True, tokenizer="qwen", template_hint="`qwen2_vl`"),
    "qwen3": Family(qk_norm=True, liger=True, tokenizer="qwen",
                    template_hint="`qwen3` (thinking), `qwen3_nothink` (Instruct-2507)"),
    "gemma": Family(tied_by_default=True, gemma_norm=True, liger=True, tokenizer="gemma"),
    "gemma2": Family(tied_by_default=True, norms_per_layer=4, gemma_norm=True, liger=True, tokenizer="gemma",
                     template_hint="`gemma2`"),
    "gemma3": Family(tied_by_default=True, qk_norm=True, norms_per_layer=4, gemma_norm=True, liger=True,
                     tokenizer="gemma", template_hint="`gemma3`"),
    "gemma3_text": Family(tied_by_default=True, qk_norm=True, norms_per_layer=4, gemma_norm=True, liger=True,
                          tokenizer="gemma",
                          template_hint="`gemma2` for the text-only Gemma 3 (270M/1B), `gemma3` otherwise"),
    "phi3": Family(fused=True, liger=True, tokenizer="sp32k",
                   template_hint="`phi` for Phi-3/3.5, `phi4` for phi-4, `phi4_mini` for Phi-4-mini"),
    "granite": Family(),
    # GLM-4-0414 (Glm4ForCausalLM): four RMSNorms per layer (input, post_self_attn, post_attention = pre-MLP,
    # post_mlp; plain Llama-style RMSNorm), fused gate_up, q/k/v bias without o bias, partial interleaved RoPE;
    # LLaMA-Factory's liger_kernel.py applies apply_liger_kernel_to_glm4 for model_type glm and glm4
    "glm4": Family(norms_per_layer=4, fused_gate_up=True, no_o_bias=True, partial_rope=True, liger=True,
                   tokenizer="glm4", template_hint="`glm4` for GLM-4-0414, `glmz1` for GLM-Z1-0414"),
    # mixture-of-experts decoders (Llama-pattern attention, a routed-expert MLP in every layer)
    "qwen3_moe": Family(qk_norm=True, liger=True, tokenizer="qwen", experts_key="num_experts",
                        expert_width_key="moe_intermediate_size",
                        template_hint="`qwen3` (thinking), `qwen3_nothink` (Instruct-2507)"),
    # [S] Qwen2MoeConfig.qkv_bias defaults to True (q/k/v bias, no o bias, like qwen2); LLaMA-Factory's liger list
    # has no qwen2_moe
    "qwen2_moe": Family(qwen2_biases=True, tokenizer="qwen", experts_key="num_experts",
                        expert_width_key="moe_intermediate_size", shared_expert=True, template_hint="`qwen`"),
    "mixtral": Family(liger=True, tokenizer="sp32k", experts_key="num_local_experts", router_scores_fp32=True,
                      template_hint="`mistral`"),
    # LLaMA-Factory 0.9.5 registers no OLMoE model (extras/constants.py has OLMo 1/1.7 only, without a template)
    "olmoe": Family(qk_norm=True, qk_norm_full=True, experts_key="num_experts",
                    template_hint="`default` (LLaMA-Factory registers no OLMoE model)"),
}


def family_of(model_type: str) -> Family:
    """The row of a supported model_type (models.arch rejects the others before anything asks)."""
    return FAMILIES.get(model_type, Family())


# Catalog id -> the template LLaMA-Factory 0.9.5 registers for that hub id (extras/constants.py). The same names
# are registered in 0.9.4. In 0.9.3 `gemma2` does not exist yet (Gemma 2 and Gemma-3-1B used `gemma`, whose
# EOS handling 0.9.4 fixed in PR #8480); every other name below exists in 0.9.3 too.
CATALOG_TEMPLATES: dict[str, str] = {
    "Qwen/Qwen2.5-0.5B-Instruct": "qwen",
    "Qwen/Qwen2.5-1.5B-Instruct": "qwen",
    "Qwen/Qwen2.5-3B-Instruct": "qwen",
    "Qwen/Qwen2.5-7B-Instruct": "qwen",
    "Qwen/Qwen2.5-14B-Instruct": "qwen",
    "Qwen/Qwen2.5-32B-Instruct": "qwen",
    "Qwen/Qwen2.5-72B-Instruct": "qwen",
    # a Qwen2 architecture, but DeepSeek's tokenizer and chat format (<｜User｜>/<｜Assistant｜>, <think>)
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": "deepseekr1",
    # the hybrid-thinking Qwen3 releases: `qwen3` (a ReasoningTemplate); `qwen3_nothink` is registered only for
    # the *-Instruct-2507 releases (and does not exist in 0.9.3)
    "Qwen/Qwen3-0.6B": "qwen3",
    "Qwen/Qwen3-1.7B": "qwen3",
    "Qwen/Qwen3-4B": "qwen3",
    "Qwen/Qwen3-8B": "qwen3",
    "Qwen/Qwen3-14B": "qwen3",
    "Qwen/Qwen3-32B": "qwen3",
    # LLaMA-Factory registers the 3.1 models under their old repo names (meta-llama/Meta-Llama-3.1-*)
    "meta-llama/Llama-3.1-8B-Instruct": "llama3",
    "meta-llama/Llama-3.1-70B-Instruct": "llama3",
    "meta-llama/Llama-3.2-1B-Instruct": "llama3",
    "meta-llama/Llama-3.2-3B-Instruct": "llama3",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": "smollm2",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistral",
    # Nemo's tokenizer (Tekken) writes [INST] without the space `mistral` puts after it
    "mistralai/Mistral-Nemo-Instruct-2407": "ministral",
    "google/gemma-2-2b-it": "gemma2",
    "google/gemma-2-9b-it": "gemma2",
    "google/gemma-2-27b-it": "gemma2",
    # the text-only Gemma 3 (Gemma3ForCausalLM) is registered with the Gemma 2 template; the 4B-27B repos are
    # Gemma3ForConditionalGeneration and use `gemma3` (which carries the image plugin)
    "google/gemma-3-1b-it": "gemma2",
    "google/gemma-3-4b-it": "gemma3",
    "google/gemma-3-12b-it": "gemma3",
    "google/gemma-3-27b-it": "gemma3",
    # [S] LLaMA-Factory extras/constants.py: the Qwen2.5-VL-*-Instruct registrations use template `qwen2_vl`
    "Qwen/Qwen2.5-VL-3B-Instruct": "qwen2_vl",
    "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2_vl",
    "microsoft/Phi-3.5-mini-instruct": "phi",
    "microsoft/phi-4": "phi4",
    # registered as "Qwen3-30B-A3B-Thinking" (template qwen3) and "Mixtral-8x7B-v0.1-Instruct" (template mistral);
    # allenai/OLMoE-1B-7B-0924 has no registration, so no entry
    "Qwen/Qwen3-30B-A3B": "qwen3",
    "Qwen/Qwen1.5-MoE-A2.7B-Chat": "qwen",
    "mistralai/Mixtral-8x7B-Instruct-v0.1": "mistral",
    # registered as "GLM-4-0414-9B-Chat" (hub id zai-org/GLM-4-9B-0414, formerly THUDM/GLM-4-9B-0414: the name rule)
    "zai-org/GLM-4-9B-0414": "glm4",
}

# For ids outside the catalog (other sizes, base models, a local folder named after its hub repo): rules on the
# last path component, lower-cased, in order. Each holds for every LLaMA-Factory 0.9.5 registration it matches
# (checked against extras/constants.py); `model_type` must be one of the listed ones, which keeps out the VL,
# Omni, MoE and "small" siblings that have other templates.
_RULES: tuple[tuple[re.Pattern[str], frozenset[str], str], ...] = tuple(
    (re.compile(pattern), frozenset(types), template)
    for pattern, types, template in (
        (r"^deepseek-r1-distill-(qwen|llama)-", ("qwen2", "llama"), "deepseekr1"),
        (r"^qwen3-.*-instruct-2507", ("qwen3", "qwen3_moe"), "qwen3_nothink"),
        (r"^qwen3-", ("qwen3", "qwen3_moe"), "qwen3"),
        (r"^qwen2\.5-vl-", ("qwen2_5_vl",), "qwen2_vl"),
        (r"^qwen2\.5-", ("qwen2",), "qwen"),
        (r"^qwen1\.5-moe-", ("qwen2_moe",), "qwen"),
        (r"^(meta-)?llama-3", ("llama",), "llama3"),
        (r"^smollm2-", ("llama",), "smollm2"),
        (r"^mistral-7b-", ("mistral",), "mistral"),
        (r"^mixtral-8x(7|22)b-", ("mixtral",), "mistral"),
        (r"^mistral-nemo-", ("mistral",), "ministral"),
        (r"^gemma-2-", ("gemma2",), "gemma2"),
        (r"^gemma-3-(270m|1b)", ("gemma3_text",), "gemma2"),
        (r"^gemma-3-", ("gemma3", "gemma3_text"), "gemma3"),
        (r"^phi-3(\.5)?-(mini|medium)-", ("phi3",), "phi"),
        (r"^phi-4$", ("phi3",), "phi4"),
        # GLM-4-0414-9B-Chat, GLM-4-0414-32B-Base/Chat (template glm4); the GLM-Z1 reasoning models are glmz1
        (r"^glm-4-(9b|32b)(-base)?-0414$", ("glm4",), "glm4"),
    )
)


def template_by_rules(model_id: str, model_type: str) -> str | None:
    base = model_id.replace("\\", "/").rstrip("/").split("/")[-1].lower()
    for pattern, types, template in _RULES:
        if pattern.search(base) and model_type in types:
            return template
    return None


def template_for(model_id: str, model_type: str) -> str:
    """LLaMA-Factory `template` for a model: the catalog table, then name rules for other ids of the same
    families. Raises ConfigError when neither knows the model (a wrong chat template trains silently wrong)."""
    lowered = {k.lower(): v for k, v in CATALOG_TEMPLATES.items()}
    key = model_id.strip().rstrip("/").lower()
    if key in lowered:
        return lowered[key]
    found = template_by_rules(model_id.strip(), model_type)
    if found is not None:
        return found
    hint = family_of(model_type).template_hint
    usually = f" For model_type {model_type} it is usually {hint}." if hint else ""
    raise ConfigError(
        f"no LLaMA-Factory chat template known for model {model_id!r} (model_type {model_type!r}).{usually} "
        "Set the template explicitly: the 'Supported Models' table of LLaMA-Factory's README names it."
    )
