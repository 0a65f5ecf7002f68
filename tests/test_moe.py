"""Mixture-of-experts decoders: config parsing, the resident experts, LoRA targets, the clear errors, and a solve.

The estimate-versus-trace comparison of MoE plans lives in the accuracy grid (optimizer/trace/grid.py, 11 rows)."""

from __future__ import annotations

from pathlib import Path

import pytest

from optimizer.errors import CatalogError, ConfigError
from optimizer.memory import estimate
from optimizer.memory.static import count_params
from optimizer.models.arch import arch_from_config
from optimizer.models.catalog import model_configs, resolve_arch
from optimizer.schema import Plan
from optimizer.search.brute import solve_brute
from optimizer.search.cpsat import solve_cpsat
from optimizer.search.perf import matmul_params
from optimizer.search.problem import load_problem
from optimizer.search.solve import solve_problem
from optimizer.search.space import build_instance

Q3M = "Qwen/Qwen3-30B-A3B"
OLMOE = "allenai/OLMoE-1B-7B-0924"
MIX = "mistralai/Mixtral-8x7B-Instruct-v0.1"


def _cfg(model: str, **changes) -> dict:
    cfg = dict(model_configs()[model]["config"])
    cfg.update(changes)
    return cfg


def _term(est, name: str) -> int:
    phase = max(est.phases, key=lambda p: p.total_bytes)
    return next(t.bytes for t in phase.terms if t.name == name)


@pytest.mark.parametrize("model,trainable,total", [
    # PEFT's counts as the trace printed them (get_peft_model on the transformers 5.24.0 model, r 8, `all`): the
    # attention Linears only, 4 per layer; the fused 3-D experts and the router are no nn.Linear
    (OLMOE, 2_097_152, 6_921_259_008),
    (Q3M, 6_684_672, 30_538_807_296),
    (MIX, 6_815_744, 46_709_608_448),
    # Qwen2-MoE: + the shared expert's gate/up/down_proj and shared_expert_gate (nn.Linear(2048, 1))
    ("Qwen/Qwen1.5-MoE-A2.7B-Chat", 7_962_816, 14_323_747_008),
])
def test_lora_all_targets_only_the_attention_linears(model, trainable, total):
    plan = Plan(lora_rank=8, lora_target="all")
    assert count_params(resolve_arch(model), plan) == (trainable, total)


def test_every_expert_stays_resident_in_bf16_under_4bit():
    # OLMoE: 16 layers x (gate_up [64, 2048, 2048] + down [64, 2048, 1024] + router [64, 2048]) x 2 bytes: the
    # experts are nn.Parameters, which bitsandbytes does not quantize (replace_with_bnb_linear swaps nn.Linear only)
    arch = resolve_arch(OLMOE)
    expected = 16 * (64 * 2 * 1024 * 2048 + 64 * 2048 * 1024 + 64 * 2048) * 2
    for bits in (None, 4, 8):
        est = estimate(arch, Plan(bf16=True, cutoff_len=256, per_device_train_batch_size=1, quantization_bit=bits))
        assert _term(est, "weights_experts") == expected
    # 4-bit shrinks only the attention Linears: the experts dominate either way
    e16 = estimate(arch, Plan(bf16=True, cutoff_len=256, per_device_train_batch_size=1))
    e4 = estimate(arch, Plan(bf16=True, cutoff_len=256, per_device_train_batch_size=1, quantization_bit=4))
    assert 0 < e16.peak_allocated_bytes - e4.peak_allocated_bytes < 0.1 * e16.peak_allocated_bytes


def test_routed_activations_grow_with_top_k():
    # S = N k rows go through the experts: doubling k on the same model raises the no-checkpointing peak
    base = _cfg(OLMOE)
    plan = Plan(bf16=True, cutoff_len=1024, per_device_train_batch_size=1, disable_gradient_checkpointing=True)
    k8 = estimate(arch_from_config(base, "k8"), plan).peak_allocated_bytes
    k4 = estimate(arch_from_config({**base, "num_experts_per_tok": 4}, "k4"), plan).peak_allocated_bytes
    assert k8 > k4


def test_active_parameters_match_the_published_figure():
    # Qwen3-30B-A3B model card: 3.3B activated. matmul_params counts the Linears, the 8 routed experts, the router
    # and the lm_head; the published figure also counts the input embedding (151936 x 2048).
    active = matmul_params(resolve_arch(Q3M)) + 151936 * 2048
    assert abs(active - 3.3e9) / 3.3e9 < 0.02


@pytest.mark.parametrize("changes,message", [
    ({"n_shared_experts": 1}, "shared experts are not modelled for this model_type (Qwen2-MoE's are)"),
    ({"mlp_only_layers": [0, 1]}, "dense layers mixed into a MoE model (mlp_only_layers or decoder_sparse_step > 1) "
                                  "are not modelled; every layer must be a MoE layer"),
    ({"decoder_sparse_step": 2}, "every layer must be a MoE layer"),
    ({"output_router_logits": True}, "output_router_logits true (the router aux loss, LLaMA-Factory "
                                     "moe_aux_loss_coef) is not modelled; set it to false"),
    ({"num_experts_per_tok": 200}, "num_experts_per_tok 200 is more than the 128 experts"),
    ({"num_experts": None}, "num_experts must be a whole number between 1 and 1,048,576, found null"),
])
def test_unsupported_moe_configs_get_one_clear_error(changes, message):
    with pytest.raises(CatalogError) as err:
        arch_from_config(_cfg(Q3M, **changes), "m")
    assert message in str(err.value)


def test_a_dense_family_with_expert_keys_is_refused():
    cfg = dict(model_configs()["mistralai/Mistral-7B-Instruct-v0.3"]["config"], num_local_experts=8)
    with pytest.raises(CatalogError) as err:
        arch_from_config(cfg, "m")
    assert str(err.value) == ("m: mixture-of-experts config of model_type mistral is not modelled. Use a MoE model of "
                              "type qwen3_moe, mixtral or olmoe, or a dense decoder-only model.")


def test_full_fine_tuning_with_fp32_experts_is_refused():
    arch = resolve_arch(OLMOE)
    with pytest.raises(ConfigError) as err:
        estimate(arch, Plan(bf16=True, finetuning_type="full"))
    assert str(err.value) == (
        "full fine-tuning of the mixture-of-experts model allenai/OLMoE-1B-7B-0924 upcasts its experts to fp32, which "
        "transformers' grouped_mm experts kernel rejects (bf16 only). Set pure_bf16: true, or use LoRA.")
    # pure_bf16 keeps them bf16: the experts are trainable, with bf16 grads and AdamW states
    est = estimate(arch, Plan(pure_bf16=True, finetuning_type="full", cutoff_len=256, per_device_train_batch_size=1))
    assert est.trainable_params == est.all_params == 6_919_161_856


def test_qwen2_moe_needs_its_shared_expert():
    cfg = dict(model_configs()["Qwen/Qwen1.5-MoE-A2.7B-Chat"]["config"])
    del cfg["shared_expert_intermediate_size"]
    with pytest.raises(CatalogError) as err:
        arch_from_config(cfg, "m")
    assert "shared_expert_intermediate_size must be a whole number between 1 and 1,048,576, found null" in str(
        err.value)


def test_the_router_aux_loss_is_refused_in_a_training_yaml():
    from optimizer.errors import TrainfitError
    from optimizer.llamafactory.read import plan_from_dict

    base = {"model_name_or_path": Q3M, "stage": "sft", "finetuning_type": "lora", "template": "qwen3"}
    plan_from_dict({**base, "moe_aux_loss_coef": 0.0})  # 0 leaves configure_moe off
    with pytest.raises(TrainfitError) as err:
        plan_from_dict({**base, "moe_aux_loss_coef": 0.001})
    assert "moe_aux_loss_coef: 0.001 changes memory in ways trainfit does not model yet; remove it to estimate" in (
        str(err.value))


def test_lora_target_mlp_matches_nothing_in_a_moe_model():
    with pytest.raises(ConfigError) as err:
        estimate(resolve_arch(Q3M), Plan(lora_target="gate_proj,up_proj"))
    assert "lora_target gate_proj, up_proj matches no Linear layer" in str(err.value)


def test_moe_on_several_gpus_is_refused():
    from optimizer.distributed.engines import DistSettings
    from optimizer.distributed.memory import per_gpu

    with pytest.raises(ConfigError) as err:
        per_gpu(resolve_arch(OLMOE), Plan(bf16=True), DistSettings(engine="ddp", num_gpus=2))
    assert "trainfit models MoE on one GPU only" in str(err.value)


PROBLEM = Path(__file__).parent / "moe_qwen3-30b-a3b-a100-80gb.yaml"


def test_solve_a_moe_problem():
    problem, base = load_problem(PROBLEM)
    result = solve_problem(problem, base)
    plans = [s.plan for s in result.front]
    assert plans and all(p.finetuning_type == "lora" and p.lora_target == "all" for p in plans)
    assert any("mixture-of-experts model" in n for n in result.notes)
    for s in result.front:  # every front point re-checked by the memory model
        assert estimate(resolve_arch(Q3M), s.plan).device_peak_bytes == s.device_peak_bytes <= result.budget_bytes
    inst = build_instance(problem, base)  # the exact front equals brute force on this MoE space
    assert [(q, t, k) for q, t, k, _ in solve_cpsat(inst)] == [(q, t, k) for q, t, k, _ in solve_brute(inst)]


def test_the_search_keeps_mlp_targets_only_where_the_mlp_has_linears(tmp_path):
    text = PROBLEM.read_text().replace("Qwen/Qwen3-30B-A3B", "Qwen/Qwen1.5-MoE-A2.7B-Chat")
    (tmp_path / "p.yaml").write_text(text)
    problem, base = load_problem(tmp_path / "p.yaml")
    inst = build_instance(problem, base)  # the shared expert's gate/up/down_proj are nn.Linear
    assert inst.domains["lora_target"] == ["mlp", "all"] and "full" not in inst.domains["finetuning_type"]
    assert build_instance(*load_problem(PROBLEM)).domains["lora_target"] == ["all"]
