"""Issue 15, preference stages: `stage: dpo` read, estimated, emitted; unsupported stages refused with one error."""

from __future__ import annotations

import pytest
import yaml

from optimizer.errors import ConfigError
from optimizer.llamafactory.read import accepted_keys, plan_from_dict
from optimizer.llamafactory.write import render_config
from optimizer.memory import estimate
from optimizer.models.catalog import resolve_arch
from optimizer.schema import Plan

Q3B = "Qwen/Qwen2.5-3B-Instruct"


def _dpo(**kw) -> Plan:
    return Plan(**{"bf16": True, "per_device_train_batch_size": 1, "cutoff_len": 1024, "stage": "dpo", **kw})


def test_dpo_yaml_is_read_and_unsupported_stages_get_one_error():
    plan, model = plan_from_dict({"model_name_or_path": Q3B, "stage": "dpo", "pref_loss": "orpo", "pref_beta": 0.2})
    assert (plan.stage, plan.pref_loss, plan.use_ref_model, model) == ("dpo", "orpo", False, Q3B)
    assert plan_from_dict({"stage": "pt"})[0].stage == "sft"
    with pytest.raises(ConfigError) as err:
        plan_from_dict({"stage": "kto"})
    assert str(err.value) == ("config: stage 'kto' is not modelled (sft, pt and dpo are); estimate it as sft or dpo. "
                              "Fix these keys.")


def test_dpo_runs_twice_the_sequences_and_holds_the_reference_pass():
    arch = resolve_arch(Q3B)
    sft = estimate(arch, _dpo(stage="sft"))
    dpo = estimate(arch, _dpo())
    orpo = estimate(arch, _dpo(pref_loss="orpo"))
    assert dpo.tokens_per_micro_batch == 2 * sft.tokens_per_micro_batch == 2048
    peak = max(dpo.phases, key=lambda p: p.total_bytes)
    assert peak.kind == "reference_forward"
    # the policy's fp32 logits [2048, V] + its log-softmax [2046, V] are held while the reference makes the same two
    nv4 = 2048 * arch.vocab_size * 4
    held = {t.name: t.bytes for t in peak.terms}
    assert nv4 * 1.99 < held["policy_logits_and_logps"] == held["reference_forward"] < nv4 * 2.01
    # orpo/simpo need no reference model: no reference pass, a lower peak
    assert all(p.kind != "reference_forward" for p in orpo.phases)
    assert orpo.peak_allocated_bytes < dpo.peak_allocated_bytes


def test_full_dpo_keeps_a_frozen_copy_and_lora_does_not():
    arch = resolve_arch("Qwen/Qwen2.5-0.5B-Instruct")

    def ref_bytes(plan: Plan) -> int:
        return sum(t.bytes for t in estimate(arch, plan).phases[0].terms if t.name == "reference_model_weights")

    full = _dpo(finetuning_type="full", cutoff_len=256)
    # a second copy of every parameter in the checkpoint dtype (bf16): 2 bytes x all params, per-tensor rounding
    assert 2 * estimate(arch, full).all_params <= ref_bytes(full) < 2 * estimate(arch, full).all_params * 1.001
    assert ref_bytes(_dpo()) == 0 and ref_bytes(_dpo(finetuning_type="full", pref_loss="simpo")) == 0


def test_emitted_dpo_config_uses_llamafactory_keys_and_reads_back():
    plan = _dpo(pref_ftx=0.1)
    text = render_config(plan, model_name_or_path=Q3B, template="qwen", dataset="dpo_en_demo", dataset_dir="data",
                         output_dir="saves/x", header=["test"])
    data = yaml.safe_load(text)
    assert (data["stage"], data["pref_loss"], data["pref_beta"], data["pref_ftx"]) == ("dpo", "sigmoid", 0.1, 0.1)
    assert set(data) <= accepted_keys()
    back, _ = plan_from_dict(data)
    assert back.stage == "dpo" and back.pref_ftx == 0.1
    sft = yaml.safe_load(render_config(_dpo(stage="sft"), model_name_or_path=Q3B, template="qwen", dataset="d",
                                       dataset_dir="data", output_dir="o", header=[]))
    assert sft["stage"] == "sft" and "pref_loss" not in sft
