"""The GPU and model catalogs: every entry loads and carries its source, parameter counts match what
transformers builds, and unknown ids fail with a helpful CatalogError.

Runs without torch/transformers, except the `trace` test, which rebuilds every catalog model with
transformers on the meta device.
"""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest
import yaml

from optimizer.errors import CatalogError
from optimizer.models.arch import (
    SUPPORTED_MODEL_TYPES,
    arch_from_config,
    layer_linears,
    param_counts,
    vision_param_counts,
)
from optimizer.models.catalog import get_gpu, gpus, model_configs, models, resolve_arch, resolve_config
from optimizer.schema import GpuSpec


def _raw(filename: str) -> list[dict]:
    """The YAML list as written (the loaders key it by id, which would hide duplicates)."""
    text = resources.files("optimizer.models").joinpath(filename).read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    assert isinstance(data, list), f"{filename} must be a YAML list"
    return data


# Golden parameter counts: sum(p.numel() for p in model.parameters()) of transformers 5.24.0
# AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)) built on the meta device
# (torch 2.13.0+cpu; Gemma3ForCausalLM for gemma3_text), from the `config` of each models.yaml entry,
# counted on 2026-11-29. Tied lm_head/embed_tokens weights are counted once, as parameters() yields
# them once. These are recorded outputs of that run, not recomputed from a formula. Every one of them
# also agrees with the count computed independently in the research notes behind the catalog.
GOLDEN_PARAMS: dict[str, int] = {
    "Qwen/Qwen2.5-0.5B-Instruct": 494_032_768,
    "Qwen/Qwen2.5-1.5B-Instruct": 1_543_714_304,
    "Qwen/Qwen2.5-3B-Instruct": 3_085_938_688,  # qwen2: q/k/v bias, tied
    "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512,  # qwen2, untied
    "Qwen/Qwen2.5-14B-Instruct": 14_770_033_664,
    "Qwen/Qwen2.5-32B-Instruct": 32_763_876_352,
    "Qwen/Qwen2.5-72B-Instruct": 72_706_203_648,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": 7_615_616_512,
    "Qwen/Qwen3-0.6B": 596_049_920,  # qwen3: q_norm/k_norm, head_dim 128 != H/nh
    "Qwen/Qwen3-1.7B": 1_720_574_976,
    "Qwen/Qwen3-4B": 4_022_468_096,
    "Qwen/Qwen3-8B": 8_190_735_360,
    "Qwen/Qwen3-14B": 14_768_307_200,
    "Qwen/Qwen3-32B": 32_762_123_264,  # nh * head_dim = 8192 != hidden 5120
    "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248,
    "meta-llama/Llama-3.1-70B-Instruct": 70_553_706_496,
    "meta-llama/Llama-3.2-1B-Instruct": 1_235_814_400,
    "meta-llama/Llama-3.2-3B-Instruct": 3_212_749_824,
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": 1_711_376_384,  # llama, tied, MHA (kv = nh)
    "mistralai/Mistral-7B-Instruct-v0.3": 7_248_023_552,
    "mistralai/Mistral-Nemo-Instruct-2407": 12_247_782_400,  # head_dim 128 != 5120/32
    "google/gemma-2-2b-it": 2_614_341_888,  # gemma2: 4 norms per layer
    "google/gemma-2-9b-it": 9_241_705_984,
    "google/gemma-2-27b-it": 27_227_128_320,
    "google/gemma-3-1b-it": 999_885_952,  # gemma3_text: 4 norms + q/k norms
    "google/gemma-3-4b-it": 3_880_263_168,  # text tower only
    "google/gemma-3-12b-it": 11_766_034_176,  # text tower only
    "google/gemma-3-27b-it": 27_009_346_304,  # text tower only
    "microsoft/Phi-3.5-mini-instruct": 3_821_079_552,  # phi3: fused qkv_proj, gate_up_proj
    "microsoft/phi-4": 14_659_507_200,
    # glm4: 4 norms, fused gate_up, q/k/v bias without o bias; the official safetensors total of
    # zai-org/GLM-4-9B-0414 (as quoted with its revision in the catalog source) is the same 9,400,279,040
    "zai-org/GLM-4-9B-0414": 9_400_279_040,
    # Qwen2.5-VL: the Hugging Face safetensors metadata totals of Qwen/Qwen2.5-VL-3B-Instruct / -7B-Instruct
    # (text decoder 3,085,938,688 / 7,615,616,512 + vision tower and merger 668,684,288 / 676,550,144); the same
    # numbers as Qwen2_5_VLForConditionalGeneration on the meta device (test below).
    "Qwen/Qwen2.5-VL-3B-Instruct": 3_754_622_976,
    "Qwen/Qwen2.5-VL-7B-Instruct": 8_292_166_656,
    # mixture-of-experts: sum(p.numel()) of the transformers 5.24.0 model; the published totals are 30.5B
    # (Qwen3-30B-A3B model card), 46.7B (Mistral's Mixtral announcement), 6.9B (OLMoE paper, arXiv 2409.02060)
    "Qwen/Qwen3-30B-A3B": 30_532_122_624,  # 128 experts of 768, q/k norms
    "mistralai/Mixtral-8x7B-Instruct-v0.1": 46_702_792_704,  # 8 experts of 14336
    "allenai/OLMoE-1B-7B-0924": 6_919_161_856,  # 64 experts of 1024, full-width q/k norms
    "Qwen/Qwen1.5-MoE-A2.7B-Chat": 14_315_784_192,  # + a shared expert of 5632 (model card: 14.3B total)
}

_GPU_ID = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---------------------------------------------------------------- (a) entries load and validate

def test_gpu_entries_load_validate_and_have_sources():
    raw = _raw("gpus.yaml")
    ids = [e["id"] for e in raw]
    assert len(ids) == len(set(ids)), f"duplicate GPU ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    assert len(raw) >= 21
    fields = set(GpuSpec.model_fields)
    for entry in raw:
        assert set(entry) == fields, f"{entry.get('id')}: fields {sorted(set(entry) ^ fields)} differ from GpuSpec"
        assert _GPU_ID.match(entry["id"]), f"{entry['id']}: ids are lowercase-dashed"
        assert isinstance(entry["source"], str) and entry["source"].strip(), f"{entry['id']}: empty source"
    table = gpus()
    assert list(table) == ids
    for gpu in table.values():
        assert isinstance(gpu, GpuSpec)
        assert re.fullmatch(r"\d+\.\d", gpu.compute_capability), gpu.id
        # bf16 support and the bf16 figure go together; with bf16, FP16 (FP32 acc) runs at the same rate.
        assert gpu.bf16 == (gpu.bf16_tflops is not None), gpu.id
        if gpu.bf16:
            assert gpu.fp16_tflops == gpu.bf16_tflops, gpu.id
            assert float(gpu.compute_capability) >= 8.0, gpu.id
        # FlashAttention-2: no before Ampere; only a source build on Blackwell (sm_100, sm_120).
        cc = float(gpu.compute_capability)
        if cc < 8.0:
            assert gpu.flash_attn2 == "no", gpu.id
        elif cc >= 10.0:
            assert gpu.flash_attn2 == "experimental", gpu.id
        else:
            assert gpu.flash_attn2 == "yes", gpu.id


def test_gpu_spot_values():
    t4 = get_gpu("t4")
    assert (t4.bf16, t4.bf16_tflops, t4.fp16_tflops, t4.flash_attn2) == (False, None, 65, "no")
    assert get_gpu("rtx-5060-ti-16gb").memory_mib == 16311
    assert get_gpu("rtx-5060-ti-16gb").compute_capability == "12.0"
    assert get_gpu("h100-sxm-80gb").bf16_tflops == 989  # dense, not the 1979 sparse headline
    assert get_gpu("a100-80gb").memory_mib == 81920
    for gid in ("rtx-3060-12gb", "rtx-4090", "a100-40gb", "h100-pcie-80gb", "h200-sxm-141gb",
                "l4", "a10g", "l40s", "b200"):
        assert gid in gpus()


def test_model_entries_load_validate_and_have_sources():
    raw = _raw("models.yaml")
    ids = [e["id"] for e in raw]
    assert len(ids) == len(set(ids)), f"duplicate model ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    assert len(raw) >= 28
    for entry in raw:
        mid = entry["id"]
        assert set(entry) == {"id", "source", "config"}, mid
        assert _MODEL_ID.match(mid), f"{mid}: ids are Hugging Face repo ids"
        assert isinstance(entry["source"], str) and entry["source"].strip(), f"{mid}: empty source"
        cfg = entry["config"]
        assert cfg["model_type"] in SUPPORTED_MODEL_TYPES, mid
        assert cfg.get("torch_dtype") == "bfloat16", mid
        assert "tie_word_embeddings" in cfg, f"{mid}: write tie_word_embeddings (class defaults differ by family)"
        # head_dim is explicit for every family whose config class has it (it differs from H/nh for
        # Qwen3, Gemma 2/3 and Mistral-Nemo); qwen2 and phi3 configs derive it as H/nh.
        if cfg["model_type"] in ("qwen3", "qwen3_moe", "gemma2", "gemma3_text", "mistral", "llama"):
            assert "head_dim" in cfg, f"{mid}: this family's config.json has an explicit head_dim"
        else:
            assert "head_dim" not in cfg or cfg["head_dim"] * cfg["num_attention_heads"] == cfg["hidden_size"], mid
        if cfg["model_type"].startswith("gemma"):
            assert cfg.get("hidden_activation") == "gelu_pytorch_tanh", mid
        if cfg["model_type"] == "gemma2":
            assert cfg.get("final_logit_softcapping") == 30.0, mid
    archs = models()
    assert list(archs) == ids
    for mid, arch in archs.items():
        assert arch.name == mid
        assert arch.source == model_configs()[mid]["source"]
        assert param_counts(arch).total > 0


def test_family_flags_derived_from_model_type():
    archs = models()
    qwen25 = archs["Qwen/Qwen2.5-3B-Instruct"]
    assert (qwen25.qkv_bias, qwen25.o_bias, qwen25.qk_norm, qwen25.norms_per_layer) == (True, False, False, 2)
    qwen3 = archs["Qwen/Qwen3-32B"]
    assert (qwen3.qkv_bias, qwen3.qk_norm, qwen3.q_dim) == (False, True, 8192)
    gemma2 = archs["google/gemma-2-2b-it"]
    assert (gemma2.norms_per_layer, gemma2.qk_norm, gemma2.final_logit_softcapping) == (4, False, 30.0)
    assert gemma2.attn_logit_softcapping == 50.0
    gemma3 = archs["google/gemma-3-1b-it"]
    assert (gemma3.norms_per_layer, gemma3.qk_norm, gemma3.head_dim) == (4, True, 256)
    phi = archs["microsoft/Phi-3.5-mini-instruct"]
    assert (phi.fused_qkv, phi.fused_gate_up) == (True, True)
    assert [m.name for m in layer_linears(phi)] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert archs["mistralai/Mistral-Nemo-Instruct-2407"].q_dim == 4096  # 32 x 128, hidden 5120
    q3m = archs["Qwen/Qwen3-30B-A3B"]
    assert (q3m.num_experts, q3m.num_experts_per_tok, q3m.moe_intermediate_size, q3m.norm_topk_prob,
            q3m.router_scores_fp32, q3m.qk_norm) == (128, 8, 768, True, False, True)
    # the experts are fused 3-D parameters and the router is no nn.Linear: only attention Linears per layer
    assert [m.name for m in layer_linears(q3m)] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    mix = archs["mistralai/Mixtral-8x7B-Instruct-v0.1"]
    assert (mix.num_experts, mix.num_experts_per_tok, mix.moe_intermediate_size, mix.norm_topk_prob,
            mix.router_scores_fp32) == (8, 2, 14336, True, True)
    q15m = archs["Qwen/Qwen1.5-MoE-A2.7B-Chat"]
    assert (q15m.num_experts, q15m.num_experts_per_tok, q15m.shared_expert_intermediate_size, q15m.qkv_bias) == (
        60, 4, 5632, True)
    # the shared expert and its gate are nn.Linear (LoRA `all` targets them), the routed experts are not
    assert [m.name for m in layer_linears(q15m)][4:] == ["gate_proj", "up_proj", "down_proj", "shared_expert_gate"]
    # glm4: q/k/v bias (attention_bias) but o_proj bias=False, fused gate_up only, 4 norms, RoPE on 64 of 128
    glm = archs["zai-org/GLM-4-9B-0414"]
    assert (glm.qkv_bias, glm.o_bias, glm.fused_qkv, glm.fused_gate_up, glm.norms_per_layer, glm.rotary_dim) == (
        True, False, False, True, 4, 64)
    assert [(m.name, m.bias) for m in layer_linears(glm)] == [
        ("q_proj", True), ("k_proj", True), ("v_proj", True), ("o_proj", False), ("gate_up_proj", False),
        ("down_proj", False)]
    assert archs["Qwen/Qwen2.5-3B-Instruct"].rotary_dim == 128  # the other families rotate every channel
    olmoe = archs["allenai/OLMoE-1B-7B-0924"]
    assert (olmoe.num_experts, olmoe.num_experts_per_tok, olmoe.norm_topk_prob, olmoe.qk_norm_full) == (64, 8, False,
                                                                                                         True)


# ---------------------------------------------------------------- (b) golden parameter counts

def test_golden_table_covers_the_required_families():
    for mid in ("Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen3-0.6B", "meta-llama/Llama-3.1-8B-Instruct",
                "mistralai/Mistral-7B-Instruct-v0.3", "google/gemma-2-2b-it", "microsoft/Phi-3.5-mini-instruct",
                "HuggingFaceTB/SmolLM2-1.7B-Instruct", "Qwen/Qwen2.5-7B-Instruct"):
        assert mid in GOLDEN_PARAMS
    assert set(GOLDEN_PARAMS) <= set(models())


@pytest.mark.parametrize("model_id", sorted(GOLDEN_PARAMS))
def test_param_counts_match_transformers_golden(model_id):
    assert param_counts(models()[model_id]).total == GOLDEN_PARAMS[model_id]


def test_lora_all_linear_count_qwen25_3b():
    # r = 8 on all seven projections of 36 layers: r * (in + out) summed = 14,966,784.
    arch = models()["Qwen/Qwen2.5-3B-Instruct"]
    per_layer = sum(8 * (m.in_features + m.out_features) for m in layer_linears(arch))
    assert per_layer == 415_744
    assert per_layer * arch.num_hidden_layers == 14_966_784


# ---------------------------------------------------------------- (c) recount with transformers

@pytest.mark.trace
def test_param_counts_match_transformers_on_meta():
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    problems = []
    for mid, entry in model_configs().items():
        cfg = dict(entry["config"])
        model_type = cfg.pop("model_type")
        config = AutoConfig.for_model(model_type, **cfg)
        with torch.device("meta"):
            if model_type == "qwen2_5_vl":
                from transformers import Qwen2_5_VLForConditionalGeneration

                model = Qwen2_5_VLForConditionalGeneration(config)
            elif model_type == "gemma3_text":
                from transformers import Gemma3ForCausalLM

                model = Gemma3ForCausalLM(config)
            else:
                model = AutoModelForCausalLM.from_config(config)
        arch = models()[mid]
        counted = sum(p.numel() for p in model.parameters())
        predicted = param_counts(arch).total
        if counted != predicted:
            problems.append(f"{mid}: transformers {counted:,} != param_counts {predicted:,}")
        if arch.vision is not None:
            visual = sum(p.numel() for p in model.model.visual.parameters())
            if visual != vision_param_counts(arch.vision).total:
                problems.append(f"{mid}: visual {visual:,} != vision_param_counts "
                                f"{vision_param_counts(arch.vision).total:,}")
        if mid in GOLDEN_PARAMS and counted != GOLDEN_PARAMS[mid]:
            problems.append(f"{mid}: transformers {counted:,} != golden {GOLDEN_PARAMS[mid]:,}")
        # Totals cannot see fused vs split projections; compare layer 0's Linear modules too.
        layer = (model.model.language_model if model_type == "qwen2_5_vl" else model.model).layers[0]
        real = {name.rsplit(".", 1)[-1]: (mod.in_features, mod.out_features, mod.bias is not None)
                for name, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)}
        ours = {m.name: (m.in_features, m.out_features, m.bias) for m in layer_linears(arch)}
        if real != ours:
            problems.append(f"{mid}: layer Linears {real} != layer_linears {ours}")
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        if tied != arch.tie_word_embeddings:
            problems.append(f"{mid}: transformers tied={tied}, catalog tie_word_embeddings={arch.tie_word_embeddings}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- (d) lookups and error messages

def test_get_gpu_known_and_unknown():
    assert get_gpu("rtx-4090").memory_mib == 24564
    with pytest.raises(CatalogError) as err:
        get_gpu("rtx-4091")
    assert "rtx-4090" in str(err.value)


def test_resolve_arch_unknown_model_names_the_closest_id():
    with pytest.raises(CatalogError) as err:
        resolve_arch("Qwen/Qwen2.5-3B")
    assert "Qwen/Qwen2.5-3B-Instruct" in str(err.value)


def test_resolve_arch_is_case_insensitive_for_catalog_ids():
    assert resolve_arch("qwen/qwen2.5-3b-instruct").name == "Qwen/Qwen2.5-3B-Instruct"


def _write_config(folder) -> dict:
    cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "max_position_embeddings": 32768,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return cfg


def test_resolve_arch_from_config_json_path(tmp_path):
    cfg = _write_config(tmp_path)
    arch = resolve_arch(str(tmp_path / "config.json"))
    assert arch.name == str(tmp_path / "config.json")
    assert (arch.model_type, arch.hidden_size, arch.head_dim, arch.qkv_bias) == ("qwen2", 896, 64, True)
    # Same numbers as the catalog's Qwen2.5-0.5B-Instruct, so the same count transformers gave.
    assert param_counts(arch).total == GOLDEN_PARAMS["Qwen/Qwen2.5-0.5B-Instruct"]
    assert resolve_config(str(tmp_path / "config.json")) == cfg


def test_resolve_arch_from_model_folder(tmp_path):
    _write_config(tmp_path)
    arch = resolve_arch(str(tmp_path))
    assert arch.hidden_size == 896
    assert param_counts(arch).total == GOLDEN_PARAMS["Qwen/Qwen2.5-0.5B-Instruct"]


def test_resolve_arch_folder_without_config(tmp_path):
    with pytest.raises(CatalogError) as err:
        resolve_arch(str(tmp_path))
    assert "config.json" in str(err.value)


def test_resolve_config_returns_a_copy_of_the_catalog_config():
    cfg = resolve_config("Qwen/Qwen2.5-3B-Instruct")
    assert cfg["model_type"] == "qwen2" and cfg["hidden_size"] == 2048
    cfg["hidden_size"] = 1
    assert resolve_config("Qwen/Qwen2.5-3B-Instruct")["hidden_size"] == 2048


def test_qwen25_vl_vision_tower_from_config():
    # vision_config of the 3B lists hidden_size 1280 and out_hidden_size 2048; the rest are the
    # Qwen2_5_VLVisionConfig defaults (transformers configuration_qwen2_5_vl.py).
    arch = models()["Qwen/Qwen2.5-VL-3B-Instruct"]
    v = arch.vision
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.patch_size, v.spatial_merge_size,
            v.temporal_patch_size, v.window_size, v.fullatt_block_indexes, v.out_hidden_size) == (
        32, 1280, 3420, 16, 14, 2, 2, 112, (7, 15, 23, 31), 2048)
    assert (arch.qkv_bias, arch.o_bias, arch.hidden_size, arch.tie_word_embeddings) == (True, False, 2048, True)
    assert models()["Qwen/Qwen2.5-VL-7B-Instruct"].vision.out_hidden_size == 3584
    assert models()["Qwen/Qwen2.5-3B-Instruct"].vision is None
    # the text decoder alone is Qwen2.5-3B-Instruct's
    assert param_counts(arch).total - param_counts(arch).vision == GOLDEN_PARAMS["Qwen/Qwen2.5-3B-Instruct"]


def test_qwen25_vl_without_vision_config_is_refused():
    cfg = dict(model_configs()["Qwen/Qwen2.5-VL-3B-Instruct"]["config"])
    del cfg["vision_config"]
    with pytest.raises(CatalogError, match="no vision_config object"):
        arch_from_config(cfg, "x")
    cfg["vision_config"] = {"depth": 0}
    with pytest.raises(CatalogError, match="vision_config.depth"):
        arch_from_config(cfg, "x")


def test_glm4_partial_rotary_factor_read_and_checked():
    cfg = dict(resolve_config("zai-org/GLM-4-9B-0414"))
    del cfg["partial_rotary_factor"]
    assert arch_from_config(cfg, "glm").rotary_dim == 64  # Glm4Config's default 0.5
    assert arch_from_config(dict(cfg, rope_parameters={"partial_rotary_factor": 0.25}), "glm").rotary_dim == 32
    with pytest.raises(CatalogError) as err:
        arch_from_config(dict(cfg, partial_rotary_factor=1.5), "glm")
    assert "partial_rotary_factor must be a number in (0, 1], found 1.5" in str(err.value)


def test_gemma2_softcaps_default_like_gemma2config():
    """A Gemma-2 config.json without the soft-cap keys gets transformers' Gemma2Config defaults (30.0 final, 50.0
    attention); an explicit null turns a cap off; Gemma-3 has none by default."""
    cfg = dict(model_configs()["google/gemma-2-2b-it"]["config"])
    cfg.pop("final_logit_softcapping")
    cfg.pop("attn_logit_softcapping")
    arch = arch_from_config(cfg, "gemma-2-no-caps")
    assert (arch.final_logit_softcapping, arch.attn_logit_softcapping) == (30.0, 50.0)
    off = arch_from_config({**cfg, "final_logit_softcapping": None}, "gemma-2-off")
    assert off.final_logit_softcapping is None
    g3 = dict(model_configs()["google/gemma-3-1b-it"]["config"])
    g3.pop("final_logit_softcapping", None)
    assert arch_from_config(g3, "gemma-3").final_logit_softcapping is None
