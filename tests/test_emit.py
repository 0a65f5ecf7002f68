"""The LLaMA-Factory emitter: keys, float style, YAML round trip, templates, dataset_info.json, atomic writes.

Tests marked `llamafactory` feed the emitted YAML to LLaMA-Factory's own train parser; they run where
`llamafactory` imports (e.g. a venv with `pip install llamafactory==0.9.5 torch==2.13.0`) and skip elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from pathlib import Path

import pytest
import yaml

from optimizer.errors import ConfigError, TrainfitError
from optimizer.io import write_text_atomic
from optimizer.llamafactory.read import accepted_keys, plan_from_dict
from optimizer.llamafactory.write import (
    SECTIONS,
    dataset_info_entry,
    format_float,
    render_config,
    warmup_steps_for,
)
from optimizer.models.catalog import model_configs
from optimizer.models.families import CATALOG_TEMPLATES, template_for
from optimizer.models.families import template_by_rules as _template_by_rules
from optimizer.schema import Plan

# --------------------------------------------------------------------------------------------------------------
# fixtures

PLANS: dict[str, Plan] = {
    "lora_default": Plan(),
    "lora_bf16": Plan(bf16=True, per_device_train_batch_size=2, gradient_accumulation_steps=4),
    "qlora4": Plan(quantization_bit=4, bf16=True, upcast_layernorm=True, lora_rank=16, cutoff_len=1024,
                   optim="paged_adamw_8bit", max_samples=1000),
    "qlora4_fp4_nodq": Plan(quantization_bit=4, quantization_type="fp4", double_quantization=False, bf16=True,
                            lora_target="q_proj,k_proj,v_proj,o_proj", lora_alpha=8, flash_attn="fa2"),
    "qlora8_fp16": Plan(quantization_bit=8, fp16=True, optim="adamw_8bit", flash_attn="sdpa", lora_dropout=0.05,
                        additional_target="embed_tokens", per_device_train_batch_size=1),
    "full_bf16": Plan(finetuning_type="full", bf16=True, disable_gradient_checkpointing=True, max_grad_norm=0.5,
                      use_reentrant_gc=False, upcast_lmhead_output=True, optim="adamw_torch", flash_attn="disabled"),
    "full_pure_bf16": Plan(finetuning_type="full", pure_bf16=True, optim="adamw_torch", max_grad_norm=0.0),
    "lora_liger": Plan(bf16=True, enable_liger_kernel=True, lora_rank=64, cutoff_len=4096),
    "dpo_qlora4": Plan(stage="dpo", pref_loss="simpo", pref_beta=0.2, pref_ftx=0.1, quantization_bit=4, bf16=True,
                       per_device_train_batch_size=1, cutoff_len=1024),
}

ALWAYS = ("model_name_or_path", "trust_remote_code", "flash_attn", "stage", "do_train", "finetuning_type",
          "dataset_dir", "dataset", "template", "cutoff_len", "preprocessing_num_workers", "dataloader_num_workers",
          "output_dir", "overwrite_output_dir", "logging_steps", "save_steps", "report_to",
          "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "num_train_epochs",
          "lr_scheduler_type", "warmup_steps", "optim", "per_device_eval_batch_size")
LORA_ALWAYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target")


def _render(plan: Plan, **kw) -> str:
    args = dict(model_name_or_path="Qwen/Qwen2.5-3B-Instruct", template="qwen", dataset="train",
                dataset_dir="/abs/data", output_dir="/abs/out/run1", header=["trainfit test", "plan 1 of 1"])
    args.update(kw)
    return render_config(plan, **args)


def _sections(text: str) -> dict[str, list[str]]:
    """### name -> the keys under it, in order."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("### "):
            current = line[4:]
            out[current] = []
        elif line and not line.startswith("#"):
            assert current is not None, line
            out[current].append(line.split(":", 1)[0])
    return out


# --------------------------------------------------------------------------------------------------------------
# keys


@pytest.mark.parametrize("name", sorted(PLANS))
def test_every_emitted_key_is_a_llamafactory_key(name):
    data = yaml.safe_load(_render(PLANS[name]))
    unknown = sorted(set(data) - accepted_keys())
    assert not unknown, unknown
    assert "warmup_ratio" not in data
    assert "quantization_method" not in data  # default bnb everywhere; 0.9.2 spelled it bitsandbytes


@pytest.mark.parametrize("name", sorted(PLANS))
def test_required_keys_and_sections(name):
    plan = PLANS[name]
    text = _render(plan)
    data = yaml.safe_load(text)
    for key in ALWAYS:
        assert key in data, key
    lora = plan.finetuning_type == "lora"
    for key in LORA_ALWAYS:
        assert (key in data) == lora, key
    assert data["trust_remote_code"] is True and data["do_train"] is True and data["stage"] == plan.stage
    assert data["overwrite_output_dir"] is True and data["report_to"] == "none"
    assert data["dataloader_num_workers"] == 0 and data["lr_scheduler_type"] == "cosine"
    assert data["per_device_eval_batch_size"] == plan.per_device_train_batch_size
    assert isinstance(data["warmup_steps"], int) and not isinstance(data["warmup_steps"], bool)
    if lora:
        assert data["lora_alpha"] == plan.effective_lora_alpha
    secs = _sections(text)
    assert list(secs) == [s for s in SECTIONS if secs.get(s)]
    assert secs["model"][:2] == ["model_name_or_path", "trust_remote_code"]
    assert secs["method"][:3] == ["stage", "do_train", "finetuning_type"]
    assert "per_device_eval_batch_size" in secs["eval"]


def test_optional_keys_follow_the_plan():
    d = yaml.safe_load(_render(Plan()))
    for key in ("quantization_bit", "quantization_type", "double_quantization", "upcast_layernorm",
                "upcast_lmhead_output", "disable_gradient_checkpointing", "use_reentrant_gc", "enable_liger_kernel",
                "bf16", "fp16", "pure_bf16", "max_grad_norm", "max_samples", "additional_target"):
        assert key not in d, key
    q4 = yaml.safe_load(_render(PLANS["qlora4"]))
    assert q4["quantization_bit"] == 4 and q4["upcast_layernorm"] is True and q4["bf16"] is True
    assert "quantization_type" not in q4 and "double_quantization" not in q4  # nf4 + double quant: LF defaults
    assert q4["max_samples"] == 1000
    fp4 = yaml.safe_load(_render(PLANS["qlora4_fp4_nodq"]))
    assert fp4["quantization_type"] == "fp4" and fp4["double_quantization"] is False and fp4["lora_alpha"] == 8
    assert fp4["lora_target"] == "q_proj,k_proj,v_proj,o_proj" and fp4["flash_attn"] == "fa2"
    q8 = yaml.safe_load(_render(PLANS["qlora8_fp16"]))
    assert q8["quantization_bit"] == 8 and q8["fp16"] is True and "bf16" not in q8
    assert q8["additional_target"] == "embed_tokens" and q8["lora_dropout"] == 0.05
    full = yaml.safe_load(_render(PLANS["full_bf16"]))
    assert full["disable_gradient_checkpointing"] is True and full["use_reentrant_gc"] is False
    assert full["upcast_lmhead_output"] is True and full["max_grad_norm"] == 0.5 and full["learning_rate"] == 1.0e-5
    pure = yaml.safe_load(_render(PLANS["full_pure_bf16"]))
    assert pure["pure_bf16"] is True and "bf16" not in pure and pure["max_grad_norm"] == 0.0
    assert yaml.safe_load(_render(PLANS["lora_liger"]))["enable_liger_kernel"] is True


# --------------------------------------------------------------------------------------------------------------
# floats and round trips


@pytest.mark.parametrize("value,text", [
    (1e-4, "1.0e-4"), (5e-5, "5.0e-5"), (2e-5, "2.0e-5"), (1e-5, "1.0e-5"), (1.25e-5, "1.25e-5"), (3e-4, "3.0e-4"),
    (1e-3, "1.0e-3"), (9.9e-3, "9.9e-3"), (3.0, "3.0"), (1.0, "1.0"), (0.05, "0.05"), (0.1, "0.1"), (0.01, "0.01"),
    (0.0, "0.0"), (-0.0, "0.0"), (2.5, "2.5"), (-2e-3, "-2.0e-3"), (1e20, "1.0e+20"), (3, "3.0"),
])
def test_format_float(value, text):
    assert format_float(value) == text
    assert yaml.safe_load(f"k: {text}")["k"] == float(value)
    assert isinstance(yaml.safe_load(f"k: {text}")["k"], float)


def test_format_float_round_trips_through_pyyaml():
    rng = random.Random(0)
    values = [rng.uniform(0, 1) * 10 ** rng.randint(-12, 20) for _ in range(3000)]
    values += [1 / 3, 2 / 3, 1e-300, 5e-324, 1.7976931348623157e308, 123456789.123, 0.1 + 0.2]
    for v in values + [-v for v in values]:
        s = format_float(v)
        assert "." in s, s
        back = yaml.safe_load(f"k: {s}")["k"]
        assert isinstance(back, float) and back == v, (v, s)


def test_pyyaml_reads_bare_exponent_as_string():
    # why format_float writes 1.0e-4: YAML 1.1 (PyYAML) needs a dot, and a sign on the exponent
    assert yaml.safe_load("k: 1e-4")["k"] == "1e-4"
    assert yaml.safe_load("k: 1.0e4")["k"] == "1.0e4"
    assert yaml.safe_load("k: 1.0e-4")["k"] == 1e-4


def test_format_float_rejects_non_finite():
    for bad in (math.inf, -math.inf, math.nan):
        with pytest.raises(ConfigError):
            format_float(bad)


def test_numbers_round_trip_through_safe_load():
    plan = Plan(bf16=True, lora_dropout=0.05, max_grad_norm=0.3, num_train_epochs=2.5, max_samples=777)
    text = _render(plan, learning_rate=1.25e-5, extra={"val_size": 0.05, "weight_decay": 1e-2, "warmup_steps": 7})
    d = yaml.safe_load(text)
    expect = {"learning_rate": 1.25e-5, "num_train_epochs": 2.5, "lora_dropout": 0.05, "max_grad_norm": 0.3,
              "val_size": 0.05, "weight_decay": 0.01}
    for key, value in expect.items():
        assert isinstance(d[key], float) and d[key] == value, key
    assert "learning_rate: 1.25e-5" in text and "num_train_epochs: 2.5" in text and "lora_dropout: 0.05" in text
    for key in ("cutoff_len", "per_device_train_batch_size", "gradient_accumulation_steps", "lora_rank", "lora_alpha",
                "max_samples", "warmup_steps", "logging_steps", "save_steps"):
        assert type(d[key]) is int, key
    assert d["warmup_steps"] == 7


def test_default_learning_rates_and_epochs():
    lora = _render(Plan())
    assert "learning_rate: 1.0e-4\n" in lora and "num_train_epochs: 3.0\n" in lora
    full = _render(Plan(finetuning_type="full"))
    assert "learning_rate: 1.0e-5\n" in full
    assert "learning_rate: 5.0e-5\n" in _render(Plan(), learning_rate=5e-5)
    assert "num_train_epochs: 1.0\n" in _render(Plan(), num_train_epochs=1)


@pytest.mark.parametrize("name", sorted(PLANS))
def test_yaml_reads_back_to_the_plan(name):
    plan = PLANS[name]
    back, model = plan_from_dict(yaml.safe_load(_render(plan)))
    assert model == "Qwen/Qwen2.5-3B-Instruct"
    same = ["finetuning_type", "quantization_bit", "cutoff_len", "per_device_train_batch_size",
            "gradient_accumulation_steps", "max_samples", "num_train_epochs", "disable_gradient_checkpointing",
            "use_reentrant_gc", "flash_attn", "optim", "bf16", "fp16", "pure_bf16", "enable_liger_kernel",
            "upcast_layernorm", "upcast_lmhead_output", "max_grad_norm"]
    if plan.finetuning_type == "lora":
        same += ["lora_rank", "lora_dropout", "lora_target", "additional_target"]
        assert back.effective_lora_alpha == plan.effective_lora_alpha
    if plan.quantization_bit == 4:
        same += ["quantization_type", "double_quantization"]
    for field in same:
        assert getattr(back, field) == getattr(plan, field), field


def test_strings_are_quoted_when_yaml_would_misread_them():
    odd = {"dataset": "yes", "template": "qwen", "dataset_dir": "/data dir/with: colon #hash",
           "output_dir": "1.0", "model_name_or_path": "C:\\models\\qwen"}
    d = yaml.safe_load(_render(Plan(), **odd))
    for key, value in odd.items():
        assert d[key] == value, key
    for s in ("null", "~", "true", "on", "1e3", "0x10", "1_000", "12:30", "@x", "*x", "!x", "%x", "`x", "'x", "é"):
        assert yaml.safe_load(_render(Plan(), dataset=s))["dataset"] == s, s


# --------------------------------------------------------------------------------------------------------------
# determinism and header


def test_deterministic():
    for plan in PLANS.values():
        assert _render(plan) == _render(plan)
    a = _render(Plan(), extra={"val_size": 0.1, "eval_strategy": "steps", "eval_steps": 50, "save_total_limit": 2})
    b = _render(Plan(), extra={"save_total_limit": 2, "eval_steps": 50, "eval_strategy": "steps", "val_size": 0.1})
    assert a == b
    assert _render(Plan()).endswith("\n") and not _render(Plan()).endswith("\n\n")


def test_header_comes_first_as_comments():
    text = _render(Plan(), header=["trainfit 0.1.0", "predicted peak 9.12 GiB of 16.00 GiB", "", "two\nlines"])
    lines = text.splitlines()
    assert lines[:6] == ["# trainfit 0.1.0", "# predicted peak 9.12 GiB of 16.00 GiB", "#", "# two", "# lines", ""]
    assert lines[6] == "### model"
    assert _render(Plan(), header=[]).startswith("### model\n")
    assert yaml.safe_load(text) == yaml.safe_load(_render(Plan(), header=[]))


# --------------------------------------------------------------------------------------------------------------
# extra keys


def test_extra_overrides_and_adds_in_sections():
    text = _render(Plan(), extra={"warmup_steps": 0, "logging_steps": 1, "val_size": 0.1, "eval_strategy": "steps",
                                  "save_total_limit": 3, "preprocessing_num_workers": None, "weight_decay": 0.0})
    secs = _sections(text)
    d = yaml.safe_load(text)
    assert d["warmup_steps"] == 0 and d["logging_steps"] == 1 and "preprocessing_num_workers" not in d
    assert "val_size" in secs["eval"] and "eval_strategy" in secs["eval"]
    assert "save_total_limit" in secs["output"] and "weight_decay" in secs["train"]


@pytest.mark.parametrize("extra,needle", [
    ({"warmup_ratio": 0.1}, "warmup_ratio"),
    ({"no_such_key": 1}, "no_such_key"),
    ({"cutoff_len": 512}, "belongs to the plan"),
    ({"learning_rate": 1e-4}, "belongs to the plan"),
    ({"model_name_or_path": "x"}, "belongs to the plan"),
    ({"warmup_steps": 0.1}, "non-negative integer"),
    ({"warmup_steps": True}, "non-negative integer"),
    ({"use_unsloth": True}, "does not model"),
    ({"report_to": ["wandb"]}, "scalar"),
])
def test_extra_rejections(extra, needle):
    with pytest.raises(ConfigError) as err:
        _render(Plan(), extra=extra)
    assert needle in str(err.value)


def test_plans_llamafactory_cannot_run():
    with pytest.raises(ConfigError) as err:
        _render(Plan(kbit_prepare=True))
    assert "kbit_prepare" in str(err.value)


@pytest.mark.parametrize("fields,needle", [
    ({"finetuning_type": "full", "quantization_bit": 4}, "quantization_bit needs finetuning_type lora"),
    ({"bf16": True, "fp16": True}, "bf16 and fp16 are both true"),
    ({"pure_bf16": True, "fp16": True}, "pure_bf16 and fp16 are both true"),
])
def test_plan_cross_field_rules_are_validators(fields, needle):
    """One place for Plan's cross-field rules: the schema. No Plan that breaks them can exist, and the YAML reader
    reports them as one line with the others."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=needle):
        Plan(**fields)
    with pytest.raises(ConfigError, match=needle):
        plan_from_dict(fields, "x.yaml")


def test_empty_names_rejected():
    with pytest.raises(ConfigError):
        _render(Plan(), template="")
    with pytest.raises(ConfigError):
        _render(Plan(), learning_rate=0.0)


def test_warmup_steps():
    plan = Plan(per_device_train_batch_size=4, gradient_accumulation_steps=4)
    # 1000 samples: 250 micro-batches, 63 optimizer steps per epoch, 189 in 3 epochs, 10% -> 19
    assert warmup_steps_for(1000, plan) == 19
    assert warmup_steps_for(1000, plan, num_train_epochs=1) == 7
    assert warmup_steps_for(1000, plan.model_copy(update={"max_samples": 100})) == 3  # 7 per epoch, 21 -> 3
    assert warmup_steps_for(1, plan) == 1
    with pytest.raises(ConfigError):
        warmup_steps_for(0, plan)
    assert yaml.safe_load(_render(plan.model_copy(update={"max_samples": 1000})))["warmup_steps"] == 19
    assert yaml.safe_load(_render(plan))["warmup_steps"] == 10


# --------------------------------------------------------------------------------------------------------------
# templates

# LLaMA-Factory 0.9.5, extras/constants.py (register_model_group): the template of each catalog id.
EXPECTED_TEMPLATES = {
    "Qwen/Qwen2.5-0.5B-Instruct": "qwen", "Qwen/Qwen2.5-1.5B-Instruct": "qwen", "Qwen/Qwen2.5-3B-Instruct": "qwen",
    "Qwen/Qwen2.5-7B-Instruct": "qwen", "Qwen/Qwen2.5-14B-Instruct": "qwen", "Qwen/Qwen2.5-32B-Instruct": "qwen",
    "Qwen/Qwen2.5-72B-Instruct": "qwen", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": "deepseekr1",
    "Qwen/Qwen3-0.6B": "qwen3", "Qwen/Qwen3-1.7B": "qwen3", "Qwen/Qwen3-4B": "qwen3", "Qwen/Qwen3-8B": "qwen3",
    "Qwen/Qwen3-14B": "qwen3", "Qwen/Qwen3-32B": "qwen3",
    "meta-llama/Llama-3.1-8B-Instruct": "llama3", "meta-llama/Llama-3.1-70B-Instruct": "llama3",
    "meta-llama/Llama-3.2-1B-Instruct": "llama3", "meta-llama/Llama-3.2-3B-Instruct": "llama3",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": "smollm2",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistral", "mistralai/Mistral-Nemo-Instruct-2407": "ministral",
    "google/gemma-2-2b-it": "gemma2", "google/gemma-2-9b-it": "gemma2", "google/gemma-2-27b-it": "gemma2",
    "google/gemma-3-1b-it": "gemma2", "google/gemma-3-4b-it": "gemma3", "google/gemma-3-12b-it": "gemma3",
    "google/gemma-3-27b-it": "gemma3",
    "microsoft/Phi-3.5-mini-instruct": "phi", "microsoft/phi-4": "phi4",
    # LLaMA-Factory 0.9.5 extras/constants.py: Qwen2.5-VL-*-Instruct registered with template="qwen2_vl"
    "Qwen/Qwen2.5-VL-3B-Instruct": "qwen2_vl", "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2_vl",
    "Qwen/Qwen3-30B-A3B": "qwen3", "mistralai/Mixtral-8x7B-Instruct-v0.1": "mistral",
    # not registered by id in 0.9.5 (FAMILY_ONLY below); LLaMA-Factory's Qwen2 group, Qwen2-MoE included, uses qwen
    "Qwen/Qwen1.5-MoE-A2.7B-Chat": "qwen",
    # LLaMA-Factory 0.9.5 extras/constants.py: "GLM-4-0414-9B-Chat" (zai-org/GLM-4-9B-0414) with template="glm4"
    "zai-org/GLM-4-9B-0414": "glm4",
}
# catalog models LLaMA-Factory registers no template for: template_for refuses them with a hint
UNREGISTERED = {"allenai/OLMoE-1B-7B-0924"}
# catalog ids LLaMA-Factory 0.9.5 does not register by id, whose family it registers: id -> a registered model of the
# family with the same template (extras/constants.py)
FAMILY_ONLY = {"Qwen/Qwen1.5-MoE-A2.7B-Chat": "Qwen2-MoE-57B-A14B-Instruct"}


def test_template_for_every_catalog_model():
    catalog = {k: v for k, v in model_configs().items() if k not in UNREGISTERED}
    assert set(catalog) == set(EXPECTED_TEMPLATES) == set(CATALOG_TEMPLATES)
    for mid in UNREGISTERED:
        with pytest.raises(ConfigError) as err:
            template_for(mid, model_configs()[mid]["config"]["model_type"])
        assert "it is usually `default` (LLaMA-Factory registers no OLMoE model)" in str(err.value)
    for mid, entry in catalog.items():
        model_type = entry["config"]["model_type"]
        assert template_for(mid, model_type) == EXPECTED_TEMPLATES[mid], mid
        assert template_for(mid.lower(), model_type) == EXPECTED_TEMPLATES[mid], mid
        # the name rules agree with the table, so a local folder named after the repo gets the same template
        assert _template_by_rules(mid, model_type) == EXPECTED_TEMPLATES[mid], mid
        assert template_for(f"/models/{mid.split('/')[-1]}/", model_type) == EXPECTED_TEMPLATES[mid], mid


@pytest.mark.parametrize("model_id,model_type,template", [
    ("Qwen/Qwen2.5-Coder-7B-Instruct", "qwen2", "qwen"),
    ("Qwen/Qwen2.5-7B", "qwen2", "qwen"),
    ("Qwen/Qwen3-4B-Instruct-2507", "qwen3", "qwen3_nothink"),
    ("Qwen/Qwen3-30B-A3B-Thinking-2507", "qwen3_moe", "qwen3"),
    ("meta-llama/Meta-Llama-3.1-8B-Instruct", "llama", "llama3"),
    ("meta-llama/Llama-3.3-70B-Instruct", "llama", "llama3"),
    ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "llama", "deepseekr1"),
    ("HuggingFaceTB/SmolLM2-360M-Instruct", "llama", "smollm2"),
    ("google/gemma-3-270m-it", "gemma3_text", "gemma2"),
    ("microsoft/Phi-3-mini-4k-instruct", "phi3", "phi"),
    ("Qwen/Qwen2.5-VL-32B-Instruct", "qwen2_5_vl", "qwen2_vl"),  # a VL sibling: qwen2_vl, not qwen
    ("/home/me/ckpt/Mistral-7B-Instruct-v0.2", "mistral", "mistral"),
])
def test_template_rules_for_other_ids(model_id, model_type, template):
    assert template_for(model_id, model_type) == template


@pytest.mark.parametrize("model_id,model_type", [
    ("Qwen/Qwen2-VL-7B-Instruct", "qwen2_vl"),  # Qwen2-VL (not modelled; LLaMA-Factory: qwen2_vl)
    ("microsoft/Phi-4-mini-instruct", "phi3"),  # phi4_mini
    ("mistralai/Mistral-Small-24B-Instruct-2501", "mistral"),  # mistral_small
    ("/models/my-finetune", "qwen2"),
    ("someone/SomeModel-7B", "falcon"),
])
def test_unknown_template_raises(model_id, model_type):
    with pytest.raises(ConfigError) as err:
        template_for(model_id, model_type)
    msg = str(err.value)
    assert model_id in msg and "template" in msg and "explicitly" in msg


# --------------------------------------------------------------------------------------------------------------
# dataset_info.json


def test_dataset_info_entries():
    alpaca = dataset_info_entry("train.json", "alpaca")
    assert alpaca == {"file_name": "train.json", "formatting": "alpaca",
                      "columns": {"prompt": "instruction", "query": "input", "response": "output"}}
    sharegpt = dataset_info_entry("chat.jsonl", "sharegpt")
    assert sharegpt == {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "conversations"}}
    openai = dataset_info_entry("/abs/msgs.json", "openai")
    assert openai["formatting"] == "sharegpt"  # LLaMA-Factory 0.9.3 has no `openai` formatting
    assert openai["columns"] == {"messages": "messages"}
    assert openai["tags"] == {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                              "assistant_tag": "assistant", "observation_tag": "tool", "system_tag": "system"}
    for entry in (alpaca, sharegpt, openai):
        assert json.loads(json.dumps(entry)) == entry
    dataset_info_entry("a.json", "alpaca")["columns"]["prompt"] = "changed"
    assert dataset_info_entry("a.json", "alpaca")["columns"]["prompt"] == "instruction"  # no shared state
    with pytest.raises(ConfigError):
        dataset_info_entry("a.json", "parquet")
    with pytest.raises(ConfigError):
        dataset_info_entry("", "alpaca")


# --------------------------------------------------------------------------------------------------------------
# write_text_atomic


def test_write_text_atomic(tmp_path):
    path = tmp_path / "configs" / "p" / "plan-1.yaml"
    text = "### model\nmodel_name_or_path: x\n# é\r\n"
    write_text_atomic(path, text, force=False)  # creates parent folders
    assert path.read_bytes() == text.encode("utf-8")  # bytes as given, no newline translation
    with pytest.raises(TrainfitError) as err:
        write_text_atomic(path, "other\n", force=False)
    assert str(err.value) == f"{path} exists. Pass --force to overwrite it."
    assert path.read_bytes() == text.encode("utf-8")
    write_text_atomic(str(path), "other\n", force=True)
    assert path.read_text() == "other\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["plan-1.yaml"]  # no temp file left


def test_write_text_atomic_cleans_up_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "out.yaml"
    path.write_text("old\n")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_text_atomic(path, "new\n", force=True)
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.yaml"]


def test_write_text_atomic_without_hard_links(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_link)
    path = tmp_path / "a.yaml"
    write_text_atomic(path, "a\n", force=False)
    assert path.read_text() == "a\n"
    with pytest.raises(TrainfitError):
        write_text_atomic(path, "b\n", force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.yaml"]


def test_write_text_atomic_refuses_a_folder(tmp_path):
    with pytest.raises(TrainfitError):
        write_text_atomic(tmp_path, "x\n", force=True)


# --------------------------------------------------------------------------------------------------------------
# LLaMA-Factory's own parser


def _import_llamafactory_parser(monkeypatch):
    monkeypatch.setenv("DISABLE_VERSION_CHECK", "1")  # LF 0.9.5 pins transformers<=5.6; the trace extra has 5.24
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LLAMAFACTORY_VERBOSITY", "WARN")
    try:
        from llamafactory.hparams import get_train_args
        from llamafactory.hparams import parser as lf_parser
    except ImportError as exc:
        pytest.skip(f"llamafactory is not importable ({exc})")
    except Exception as exc:  # installed but broken beside this torch/transformers (e.g. torchvision ABI)
        pytest.skip(f"llamafactory does not import here ({type(exc).__name__}: {exc})")
    return get_train_args, lf_parser


def _lf_workspace(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"},
                                                 {"instruction": "Add", "input": "1+1", "output": "2"}]))
    (data / "chat.json").write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "hello"}]}]))
    info = {"train": dataset_info_entry("train.json", "alpaca"), "chat": dataset_info_entry("chat.json", "openai")}
    (data / "dataset_info.json").write_text(json.dumps(info, indent=2))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(model_configs()["Qwen/Qwen2.5-0.5B-Instruct"]["config"]))
    return data, model


@pytest.mark.llamafactory
def test_llamafactory_parses_emitted_configs(tmp_path, monkeypatch):
    """`llamafactory-cli train cfg.yaml` reads the file with OmegaConf and hands it to get_train_args, whose
    HfArgumentParser rejects any unknown key. `use_cpu=true` is a CLI override for CPU-only machines (transformers
    refuses bf16 without a GPU otherwise); LF's own pure_bf16 GPU check is patched out for the same reason."""
    import importlib.metadata as md

    get_train_args, lf_parser = _import_llamafactory_parser(monkeypatch)
    monkeypatch.setattr(lf_parser, "is_torch_bf16_gpu_available", lambda: True)
    data, model = _lf_workspace(tmp_path)
    try:
        md.version("liger-kernel")
        has_liger = True
    except md.PackageNotFoundError:
        has_liger = False
    extras = {"lora_default": {"val_size": 0.5, "eval_strategy": "steps", "eval_steps": 1}}
    for name, plan in PLANS.items():
        text = render_config(plan, model_name_or_path=str(model), template="qwen",
                             dataset="train,chat" if name == "lora_bf16" else "train", dataset_dir=str(data),
                             output_dir=str(tmp_path / "out" / name), header=[name], extra=extras.get(name),
                             learning_rate=2e-4 if name == "qlora4" else None)
        cfg = tmp_path / f"{name}.yaml"
        write_text_atomic(cfg, text, force=False)
        monkeypatch.setattr(sys, "argv", ["llamafactory-cli", str(cfg), "use_cpu=true"])
        args = lf_parser.read_args()
        # every key accepted (parse_dict raises 'Some keys are not used by the HfArgumentParser' otherwise)
        lf_parser.HfArgumentParser(lf_parser._TRAIN_ARGS).parse_dict(dict(args), allow_extra_keys=False)
        if plan.enable_liger_kernel and not has_liger:
            continue  # get_train_args hard-requires the liger-kernel package
        model_args, data_args, training_args, finetuning_args, _ = get_train_args()
        assert training_args.learning_rate == (2e-4 if name == "qlora4" else 1e-4 if plan.finetuning_type == "lora"
                                               else 1e-5)
        assert training_args.num_train_epochs == 3.0
        assert isinstance(training_args.warmup_steps, int)
        assert training_args.per_device_eval_batch_size == plan.per_device_train_batch_size
        assert training_args.gradient_accumulation_steps == plan.gradient_accumulation_steps
        assert str(training_args.optim.value if hasattr(training_args.optim, "value") else training_args.optim) \
            == plan.optim
        assert training_args.bf16 == plan.bf16 and training_args.fp16 == plan.fp16
        assert finetuning_args.finetuning_type == plan.finetuning_type
        assert finetuning_args.pure_bf16 == plan.pure_bf16
        assert model_args.quantization_bit == plan.quantization_bit
        assert model_args.quantization_type == plan.quantization_type
        assert model_args.double_quantization == plan.double_quantization
        assert model_args.disable_gradient_checkpointing == plan.disable_gradient_checkpointing
        assert model_args.upcast_layernorm == plan.upcast_layernorm
        assert data_args.cutoff_len == plan.cutoff_len and data_args.template == "qwen"
        assert data_args.max_samples == plan.max_samples
        assert finetuning_args.stage == plan.stage
        if plan.stage == "dpo":
            assert (finetuning_args.pref_loss, finetuning_args.pref_beta, finetuning_args.pref_ftx) == \
                (plan.pref_loss, plan.pref_beta, plan.pref_ftx)
            assert finetuning_args.use_ref_model == plan.use_ref_model
        if plan.finetuning_type == "lora":
            assert finetuning_args.lora_rank == plan.lora_rank
            assert finetuning_args.lora_alpha == plan.effective_lora_alpha
            assert finetuning_args.lora_dropout == plan.lora_dropout
            assert finetuning_args.lora_target == plan.lora_target.split(",")


@pytest.mark.llamafactory
def test_llamafactory_parses_a_vision_language_config(tmp_path, monkeypatch):
    """What solve writes for a vision-language model (template qwen2_vl): the image sizes and the frozen tower are
    LLaMA-Factory keys, read back as set."""
    get_train_args, lf_parser = _import_llamafactory_parser(monkeypatch)
    monkeypatch.setattr(lf_parser, "is_torch_bf16_gpu_available", lambda: True)
    data, model = _lf_workspace(tmp_path)
    plan = Plan(bf16=True, cutoff_len=2048, images_per_sample=2, image_max_pixels=512 * 512, image_min_pixels=64 * 64)
    text = render_config(plan, model_name_or_path=str(model), template="qwen2_vl", dataset="chat",
                         dataset_dir=str(data), output_dir=str(tmp_path / "out"), header=["vl"])
    cfg = tmp_path / "vl.yaml"
    write_text_atomic(cfg, text, force=False)
    monkeypatch.setattr(sys, "argv", ["llamafactory-cli", str(cfg), "use_cpu=true"])
    lf_parser.HfArgumentParser(lf_parser._TRAIN_ARGS).parse_dict(dict(lf_parser.read_args()), allow_extra_keys=False)
    model_args, data_args, _, finetuning_args, _ = get_train_args()
    assert (model_args.image_max_pixels, model_args.image_min_pixels) == (512 * 512, 64 * 64)
    assert finetuning_args.freeze_vision_tower and finetuning_args.freeze_multi_modal_projector
    assert data_args.template == "qwen2_vl" and data_args.cutoff_len == 2048


@pytest.mark.llamafactory
def test_llamafactory_knows_our_templates(monkeypatch):
    _import_llamafactory_parser(monkeypatch)
    from llamafactory.extras.constants import DEFAULT_TEMPLATE, SUPPORTED_MODELS, DownloadSource

    by_path = {}
    for name, paths in SUPPORTED_MODELS.items():
        if DownloadSource.DEFAULT in paths:
            by_path[paths[DownloadSource.DEFAULT].lower()] = name
    alias = {"meta-llama/llama-3.1-8b-instruct": "meta-llama/meta-llama-3.1-8b-instruct",
             "meta-llama/llama-3.1-70b-instruct": "meta-llama/meta-llama-3.1-70b-instruct"}
    checked = 0
    for mid, template in CATALOG_TEMPLATES.items():
        if mid in FAMILY_ONLY:
            assert DEFAULT_TEMPLATE[FAMILY_ONLY[mid]] == template, mid
            continue
        name = by_path.get(alias.get(mid.lower(), mid.lower()))
        assert name is not None, f"{mid} is not registered in LLaMA-Factory"
        if name in DEFAULT_TEMPLATE:  # only names with -Instruct/-Chat/-Distill/-Thinking get a default
            assert DEFAULT_TEMPLATE[name] == template, mid
            checked += 1
    assert checked >= 25
    try:
        from llamafactory.data.template import TEMPLATES
    except Exception as exc:  # 0.9.5's data package imports torchaudio at module load
        pytest.skip(f"llamafactory.data does not import here ({type(exc).__name__}: {exc})")
    missing = sorted({t for t in CATALOG_TEMPLATES.values() if t not in TEMPLATES})
    assert not missing, missing
