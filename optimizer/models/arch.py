"""Architectures: from a `config.json` dict to an `Arch`, the Linear modules of a decoder layer, and
parameter counts exactly as transformers builds the model.

The per-family flags (biases, q/k norms, norms per layer, fused projections, tied default) come from the family
table in `models/families.py`, each with its transformers v5 source; llama, mistral, qwen3, olmo2 and granite
take `bias=config.attention_bias` on q/k/v/o and `bias=config.mlp_bias` on the MLP; glm4 on q/k/v only (o_proj and the
MLP have none).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ..errors import CatalogError
from ..io import join_problems
from ..schema import Arch, VisionTower
from .families import FAMILIES, family_of

__all__ = ["LinearSpec", "arch_from_config", "validate_config", "layer_linears", "param_counts",
           "vision_param_counts", "SUPPORTED_MODEL_TYPES", "expert_numels", "qk_norm_numels"]

# Families whose decoder layer is the Llama pattern (RMSNorm, attention with RoPE, gated MLP): the family table.
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))
# config.json keys of mixture-of-experts layouts trainfit does not model: shared experts (Qwen2-MoE
# `shared_expert_intermediate_size`, DeepSeek `n_shared_experts`), DeepSeek-style routed experts, dense layers
# mixed in (Qwen3-MoE `mlp_only_layers`, `decoder_sparse_step` > 1) and the router aux loss
# (`output_router_logits`, which LLaMA-Factory sets when `moe_aux_loss_coef` is given: model_utils/moe.py
# configure_moe).
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


@dataclass(frozen=True)
class LinearSpec:
    """One nn.Linear of a decoder layer: `name` is the module-name suffix PEFT matches."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    group: str  # "attn" or "mlp"

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features


# The fields trainfit reads from config.json: (required, upper bound). The bounds sit 8-60x above the largest
# published dense decoders (Llama-3.1-405B: hidden 16384, intermediate 53248, 126 layers, 128 heads; Gemma 3:
# vocab 262144, head_dim 256; Llama 4: 10,485,760 positions), so no real model is refused, and every product
# the memory model forms stays far inside 64 bits.
_INT_FIELDS: dict[str, tuple[bool, int]] = {
    "hidden_size": (True, 1 << 17),
    "intermediate_size": (True, 1 << 20),
    "num_hidden_layers": (True, 1024),
    "num_attention_heads": (True, 4096),
    "num_key_value_heads": (False, 4096),
    "head_dim": (False, 4096),
    "vocab_size": (True, 1 << 24),
    "max_position_embeddings": (False, 1 << 30),
}
_BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
_DTYPES = ("bfloat16", "float16", "float32")


# Vision-language model types: their config.json carries a `vision_config`.
VISION_MODEL_TYPES = ("qwen2_5_vl",)
# [S] transformers models/qwen2_5_vl/configuration_qwen2_5_vl.py::Qwen2_5_VLVisionConfig.__init__ defaults: the
# values a `vision_config` that omits a field gets (Qwen/Qwen2.5-VL-3B-Instruct's config.json lists only
# hidden_size 1280, out_hidden_size 2048 and in_chans 3, a key the class ignores).
_VISION_DEFAULTS: dict[str, Any] = {
    "depth": 32, "hidden_size": 3584, "intermediate_size": 3420, "num_heads": 16, "in_channels": 3, "patch_size": 14,
    "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": 3584,
    "fullatt_block_indexes": (7, 15, 23, 31),
}


def _vision_from_config(vcfg: Any, name: str) -> VisionTower:
    if not isinstance(vcfg, dict):
        raise CatalogError(f"{name}: config.json has no vision_config object. Pass the model's own config.json "
                           "(a Qwen2.5-VL config.json carries one).")
    fields = {k: vcfg.get(k, d) for k, d in _VISION_DEFAULTS.items()}
    fields["fullatt_block_indexes"] = tuple(fields["fullatt_block_indexes"] or ())
    try:
        return VisionTower(**fields)
    except ValueError as exc:
        bad = "; ".join(f"vision_config.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                        for e in getattr(exc, "errors", lambda: [])())
        raise CatalogError(f"{name}: config.json {bad or exc}. Copy vision_config from the model's Hugging Face "
                           "config.json.") from None


def _show(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (str, bool, type(None))) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def validate_config(cfg: dict[str, Any]) -> list[str]:
    """Everything wrong with the fields trainfit reads from a config.json (empty when it can be modelled): types,
    ranges, the divisibility the attention layout needs, the model type and dtype."""
    problems: list[str] = []
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        problems.append(f"model_type {_show(model_type)} is not modelled "
                        f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    ints: dict[str, int] = {}
    for key, (required, hi) in _INT_FIELDS.items():
        v = cfg.get(key)
        if v is None:
            if required:
                problems.append(f"{key} is missing" if key not in cfg else f"{key} is null")
        elif isinstance(v, bool) or not isinstance(v, int):
            problems.append(f"{key} must be a whole number, found {_show(v)}")
        elif not 0 < v <= hi:
            problems.append(f"{key} must be between 1 and {hi:,}, found {v}")
        else:
            ints[key] = v
    h, nh, nkv = ints.get("hidden_size"), ints.get("num_attention_heads"), ints.get("num_key_value_heads")
    if h and nh and cfg.get("head_dim") is None and h % nh:
        problems.append(f"hidden_size {h} is not divisible by num_attention_heads {nh} (and no head_dim is given)")
    if nh and nkv and nh % nkv:
        problems.append(f"num_attention_heads {nh} is not divisible by num_key_value_heads {nkv}")
    for key in _BOOL_FIELDS:
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            problems.append(f"{key} must be true or false, found {_show(cfg[key])}")
    for key in ("dtype", "torch_dtype"):
        if cfg.get(key) is not None and cfg[key] not in _DTYPES:
            problems.append(f"{key} {_show(cfg[key])} is not one of {', '.join(_DTYPES)}")
    for key in ("hidden_act", "hidden_activation"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            problems.append(f"{key} must be a string, found {_show(cfg[key])}")
    prf = cfg.get("partial_rotary_factor")
    if prf is not None and (isinstance(prf, bool) or not isinstance(prf, (int, float)) or not 0 < prf <= 1):
        problems.append(f"partial_rotary_factor must be a number in (0, 1], found {_show(prf)}")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        cap = cfg.get(key)
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap < 1e6):
            problems.append(f"{key} must be a positive number or null, found {_show(cap)}")
    return problems


def arch_from_config(cfg: dict[str, Any], name: str, source: str = "") -> Arch:
    """Build an `Arch` from a Hugging Face `config.json` dict (multimodal configs: their `text_config`). Every
    problem of the fields it reads is reported at once (CatalogError)."""
    if not isinstance(cfg, dict):
        raise CatalogError(f"{name}: config.json is not a JSON object. "
                           "Pass the config.json of a decoder-only causal LM.")
    if isinstance(cfg.get("text_config"), dict) and "hidden_size" in cfg["text_config"]:
        outer = cfg
        cfg = {**cfg["text_config"]}
        cfg.setdefault("model_type", outer.get("model_type", ""))
        if cfg["model_type"] == "qwen2_5_vl_text":  # transformers v5 gives the text sub-config its own model_type
            cfg["model_type"] = outer.get("model_type")
        for key in ("dtype", "torch_dtype", "tie_word_embeddings", "vision_config"):
            if key not in cfg and key in outer:
                cfg[key] = outer[key]
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CatalogError(
            f"{name}: model_type {_show(model_type)} is not modelled. Use a model of a supported type "
            f"({', '.join(SUPPORTED_MODEL_TYPES)}), or run `trainfit models` for the catalog."
        )
    fam = family_of(model_type)
    if fam.experts_key is None and any(cfg.get(k) for k in _MOE_KEYS):
        raise CatalogError(
            f"{name}: mixture-of-experts config of model_type {model_type} is not modelled. Use a MoE model of "
            "type qwen3_moe, mixtral or olmoe, or a dense decoder-only model."
        )
    vision = _vision_from_config(cfg.get("vision_config"), name) if model_type in VISION_MODEL_TYPES else None
    problems = validate_config(cfg)
    if fam.experts_key is not None:
        problems += _moe_problems(cfg, fam.experts_key, fam.expert_width_key, fam.shared_expert)
    if problems:
        raise CatalogError(f"{name}: config.json {join_problems(problems)}. Fix these fields (copy them from the "
                           "model's Hugging Face config.json), or pass the config.json of a decoder-only causal LM.")
    h = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    attention_bias = bool(cfg.get("attention_bias") or False)
    qkv_bias = True if fam.qwen2_biases else attention_bias
    o_bias = False if fam.qwen2_biases or fam.no_o_bias else attention_bias
    tied = cfg.get("tie_word_embeddings")
    return Arch(
        name=name,
        model_type=model_type,
        hidden_size=h,
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=nh,
        num_key_value_heads=cfg.get("num_key_value_heads") or nh,
        head_dim=cfg.get("head_dim") or h // nh,
        vocab_size=cfg["vocab_size"],
        tie_word_embeddings=fam.tied_by_default if tied is None else tied,
        max_position_embeddings=cfg.get("max_position_embeddings") or None,
        hidden_act=cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu",
        # transformers v5 writes `dtype`, v4 wrote `torch_dtype`; with neither, from_pretrained(torch_dtype="auto")
        # falls back to torch's default float32.
        torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype") or "float32",
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(cfg.get("mlp_bias") or False),
        qk_norm=fam.qk_norm,
        norms_per_layer=fam.norms_per_layer,
        fused_qkv=fam.fused,
        fused_gate_up=fam.fused or fam.fused_gate_up,
        # [S] transformers models/gemma2/configuration_gemma2.py: Gemma2Config `final_logit_softcapping = 30.0` and
        # `attn_logit_softcapping = 50.0` when config.json leaves them out (Gemma3TextConfig: None); an explicit null
        # turns them off
        final_logit_softcapping=cfg.get("final_logit_softcapping", 30.0 if model_type == "gemma2" else None),
        attn_logit_softcapping=cfg.get("attn_logit_softcapping", 50.0 if model_type == "gemma2" else None),
        vision=vision,
        qk_norm_full=fam.qk_norm_full,
        num_experts=cfg[fam.experts_key] if fam.experts_key else 0,
        num_experts_per_tok=cfg["num_experts_per_tok"] if fam.experts_key else 0,
        moe_intermediate_size=cfg[fam.expert_width_key] if fam.experts_key else 0,
        shared_expert_intermediate_size=cfg["shared_expert_intermediate_size"] if fam.shared_expert else 0,
        # Mixtral renormalizes always; Qwen3-MoE and OLMoE read `norm_topk_prob` (config class default False)
        norm_topk_prob=fam.router_scores_fp32 or bool(cfg.get("norm_topk_prob") or False),
        router_scores_fp32=fam.router_scores_fp32,
        partial_rotary_factor=_partial_rotary_factor(cfg) if fam.partial_rope else 1.0,
        source=source,
    )


def _partial_rotary_factor(cfg: dict[str, Any]) -> float:
    """config.json `partial_rotary_factor` (transformers v5 may write it inside `rope_parameters`); GLM-4's default
    0.5 ([S] transformers models/glm4/configuration_glm4.py Glm4Config.__post_init__ setdefault)."""
    rope = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    return cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 0.5


def _moe_problems(cfg: dict[str, Any], experts_key: str, width_key: str, shared: bool) -> list[str]:
    """What a routed-expert config.json must hold for trainfit's MoE layer: every layer sparse, top-k of E, a
    shared expert only where the family has one (Qwen2-MoE: required), no router aux loss."""
    problems: list[str] = []
    experts, k, width = cfg.get(experts_key), cfg.get("num_experts_per_tok"), cfg.get(width_key)
    for key, v in ((experts_key, experts), ("num_experts_per_tok", k), (width_key, width)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= (1 << 20):
            problems.append(f"{key} must be a whole number between 1 and {1 << 20:,}, found {_show(v)}")
    if isinstance(experts, int) and isinstance(k, int) and not isinstance(k, bool) and k > experts:
        problems.append(f"num_experts_per_tok {k} is more than the {experts} experts")
    if cfg.get("mlp_only_layers") or (cfg.get("decoder_sparse_step") or 1) != 1:
        problems.append("dense layers mixed into a MoE model (mlp_only_layers or decoder_sparse_step > 1) are not "
                        "modelled; every layer must be a MoE layer")
    if shared:
        v = cfg.get("shared_expert_intermediate_size")
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= (1 << 20):
            problems.append(f"shared_expert_intermediate_size must be a whole number between 1 and {1 << 20:,}, "
                            f"found {_show(v)}")
        if cfg.get("qkv_bias") is False:
            problems.append("qkv_bias false is not modelled (Qwen2-MoE's q/k/v carry a bias)")
    elif cfg.get("shared_expert_intermediate_size") or cfg.get("n_shared_experts"):
        problems.append("shared experts are not modelled for this model_type (Qwen2-MoE's are)")
    if cfg.get("output_router_logits"):
        problems.append("output_router_logits true (the router aux loss, LLaMA-Factory moe_aux_loss_coef) is not "
                        "modelled; set it to false")
    if cfg.get("router_jitter_noise"):
        problems.append("router_jitter_noise is not modelled; set it to 0")
    if cfg.get("clip_qkv") is not None:
        problems.append("clip_qkv is not modelled; set it to null")
    return problems


@lru_cache(maxsize=256)
def layer_linears(arch: Arch) -> tuple[LinearSpec, ...]:
    """The nn.Linear modules of one decoder layer, in forward order."""
    h, i = arch.hidden_size, arch.intermediate_size
    q, kv = arch.q_dim, arch.kv_dim
    out: list[LinearSpec] = []
    if arch.fused_qkv:
        out.append(LinearSpec("qkv_proj", h, q + 2 * kv, arch.qkv_bias, "attn"))
    else:
        out += [LinearSpec("q_proj", h, q, arch.qkv_bias, "attn"),
                LinearSpec("k_proj", h, kv, arch.qkv_bias, "attn"),
                LinearSpec("v_proj", h, kv, arch.qkv_bias, "attn")]
    out.append(LinearSpec("o_proj", q, h, arch.o_bias, "attn"))
    if arch.is_moe:
        # the router is an nn.Parameter in a `*TopKRouter` module and the experts are fused 3-D parameters: neither
        # is an nn.Linear (see `expert_numels`). Qwen2-MoE's shared expert and its gate are nn.Linear.
        si = arch.shared_expert_intermediate_size
        if si:
            out += [LinearSpec("gate_proj", h, si, False, "mlp"), LinearSpec("up_proj", h, si, False, "mlp"),
                    LinearSpec("down_proj", si, h, False, "mlp"), LinearSpec("shared_expert_gate", h, 1, False, "mlp")]
        return tuple(out)
    if arch.fused_gate_up:
        out.append(LinearSpec("gate_up_proj", h, 2 * i, arch.mlp_bias, "mlp"))
    else:
        out += [LinearSpec("gate_proj", h, i, arch.mlp_bias, "mlp"),
                LinearSpec("up_proj", h, i, arch.mlp_bias, "mlp")]
    out.append(LinearSpec("down_proj", i, h, arch.mlp_bias, "mlp"))
    return tuple(out)


def expert_numels(arch: Arch) -> tuple[int, int, int]:
    """(gate_up_proj, down_proj, router weight) numels of one MoE layer ((0, 0, 0) when dense).

    [S] transformers v5 models/qwen3_moe/modeling_qwen3_moe.py Qwen3MoeExperts.__init__: gate_up_proj
    nn.Parameter [E, 2 I, H], down_proj [E, H, I]; Qwen3MoeTopKRouter.weight [E, H] (the same in MixtralExperts,
    OlmoeExperts and their routers). No biases."""
    if not arch.is_moe:
        return 0, 0, 0
    E, H, I = arch.num_experts, arch.hidden_size, arch.moe_intermediate_size
    return E * 2 * I * H, E * H * I, E * H


def qk_norm_numels(arch: Arch) -> int:
    """Elements of one layer's q_norm + k_norm weights: per head (Qwen3, Gemma 3) or over the projections (OLMoE)."""
    if not arch.qk_norm:
        return 0
    return arch.q_dim + arch.kv_dim if arch.qk_norm_full else 2 * arch.head_dim


@dataclass(frozen=True)
class ParamCounts:
    embed: int
    lm_head: int  # 0 when tied
    per_layer_linear_weights: int
    per_layer_linear_biases: int
    per_layer_norms: int
    final_norm: int
    layers: int
    vision: int = 0  # the vision tower and its merger (vision-language models)

    @property
    def per_layer(self) -> int:
        return self.per_layer_linear_weights + self.per_layer_linear_biases + self.per_layer_norms

    @property
    def total(self) -> int:
        return self.embed + self.lm_head + self.layers * self.per_layer + self.final_norm + self.vision


@lru_cache(maxsize=256)
def param_counts(arch: Arch) -> ParamCounts:
    """Parameters as `sum(p.numel() for p in model.parameters())` counts them (tied weights once)."""
    lin = layer_linears(arch)
    norms = arch.norms_per_layer * arch.hidden_size + qk_norm_numels(arch)
    embed = arch.vocab_size * arch.hidden_size
    return ParamCounts(
        embed=embed,
        lm_head=0 if arch.tie_word_embeddings else embed,
        per_layer_linear_weights=sum(m.weight_numel for m in lin) + sum(expert_numels(arch)),
        per_layer_linear_biases=sum(m.out_features for m in lin if m.bias),
        per_layer_norms=norms,
        final_norm=arch.hidden_size,
        layers=arch.num_hidden_layers,
        vision=vision_param_counts(arch.vision).total if arch.vision else 0,
    )


@dataclass(frozen=True)
class VisionParamCounts:
    """Parameters of a Qwen2.5-VL vision tower, by module ([S] transformers models/qwen2_5_vl/
    modeling_qwen2_5_vl.py): `patch_embed` Qwen2_5_VisionPatchEmbed, a Conv3d(in_channels, hidden,
    kernel [temporal_patch, patch, patch], bias=False); each of the `depth` Qwen2_5_VLVisionBlock has norm1/norm2
    RMSNorm(hidden) (weight only), attn.qkv Linear(hidden, 3 hidden, bias=True), attn.proj Linear(hidden, hidden,
    bias=True), mlp Qwen2_5_VLMLP(bias=True): gate_proj/up_proj Linear(hidden, intermediate), down_proj
    Linear(intermediate, hidden); `merger` Qwen2_5_VLPatchMerger: ln_q RMSNorm(hidden), mlp.0 Linear(hidden m^2,
    hidden m^2), GELU, mlp.2 Linear(hidden m^2, out_hidden_size), both with bias (m = spatial_merge_size). The
    rotary embedding holds only an `inv_freq` buffer."""

    patch_embed: int
    per_block: int
    blocks: int
    merger: int

    @property
    def tower(self) -> int:
        """patch_embed + blocks: LLaMA-Factory's `vision_model_keys` (visual.patch_embed, visual.blocks)."""
        return self.patch_embed + self.blocks * self.per_block

    @property
    def total(self) -> int:
        return self.tower + self.merger


@lru_cache(maxsize=64)
def vision_param_counts(v: VisionTower) -> VisionParamCounts:
    h, i, m2 = v.hidden_size, v.intermediate_size, v.spatial_merge_size ** 2
    block = 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + 2 * (h * i + i) + (i * h + h)
    merger = h + (h * m2 * h * m2 + h * m2) + (h * m2 * v.out_hidden_size + v.out_hidden_size)
    return VisionParamCounts(patch_embed=v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * h,
                             per_block=block, blocks=v.depth, merger=merger)
