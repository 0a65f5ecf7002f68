"""`trainfit check`: verdicts, the evaluation phase, pitfalls, no-effect keys, the minimal fix, exit codes."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from optimizer.cli import app

runner = CliRunner()
GPU = "rtx-5060-ti-16gb"
BIG = """### model
model_name_or_path: Qwen/Qwen2.5-7B-Instruct  # keep this comment
stage: sft
do_train: true
finetuning_type: lora
lora_target: all
dataset: my_data
template: qwen
cutoff_len: 4096
per_device_train_batch_size: 4
gradient_accumulation_steps: 4
learning_rate: 1.0e-4
bf16: true
output_dir: saves/qwen7b
"""


def run(*args):
    return runner.invoke(app, list(args))


def _cfg(tmp_path, text, name="t.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_reference_configs_get_a_verdict_and_the_keys_that_did_nothing():
    for v in ("ultra_lite", "balanced", "full_300"):
        res = run("check", f"configs/reference-case/{v}.yaml", "--gpu", GPU, "--json")
        assert res.exit_code == 0, res.output
        rep = json.loads(res.output)
        assert rep["verdict"] in ("fits", "fits_below_margin")
        assert rep["estimate"]["peak_phase"] == "backward"
        none = {e["key"] for e in rep["no_effect"]}
        assert {"max_samples", "dataloader_num_workers", "num_train_epochs"} <= none
        # accumulation > 1 keeps the LoRA gradients live through the next micro-batch: it costs memory versus 1
        accum = next(e for e in rep["key_effects"] if e["key"] == "gradient_accumulation_steps")
        assert accum["default"] == 1 and accum["saves_bytes"] < 0
        assert rep["eval"] is not None  # eval_strategy: steps


def test_default_eval_batch_is_a_pitfall_and_costs_memory():
    bal = json.loads(run("check", "configs/reference-case/balanced.yaml", "--gpu", GPU, "--json").output)
    assert any(p["key"] == "per_device_eval_batch_size" for p in bal["pitfalls"])
    assert bal["eval_device_peak_bytes"] > bal["train_device_peak_bytes"]
    ultra = json.loads(run("check", "configs/reference-case/ultra_lite.yaml", "--gpu", GPU, "--json").output)
    assert not any(p["key"] == "per_device_eval_batch_size" for p in ultra["pitfalls"])


def test_each_pitfall(tmp_path):
    text = ("model_name_or_path: Qwen/Qwen2.5-3B-Instruct\nquantization_bit: 4\nfp16: true\n"
            "gradient_checkpointing: true\n"
            "upcast_lmhead_output: true\nflash_attn: fa2\ncutoff_len: 256\nper_device_train_batch_size: 1\n"
            "eval_strategy: steps\ncompute_accuracy: true\noutput_dir: {out}\n")
    out = tmp_path / "old_run"
    (out / "checkpoint-100").mkdir(parents=True)
    rep = json.loads(run("check", _cfg(tmp_path, text.format(out=out)), "--gpu", GPU, "--json").output)
    keys = {p["key"] for p in rep["pitfalls"]}
    assert keys == {"per_device_eval_batch_size", "gradient_checkpointing", "fp16", "dataset", "template",
                    "upcast_layernorm", "(environment)", "flash_attn", "output_dir", "eval_accumulation_steps"}
    # upcast_lmhead_output is no pitfall: the loss upcasts the logits to fp32 anyway, so the trace shows no
    # extra peak; check reports it among the keys that do not change the peak
    assert any(e["key"] == "upcast_lmhead_output" for e in rep["no_effect"])


def test_config_that_does_not_fit_gets_a_minimal_fix_that_fits(tmp_path):
    cfg = _cfg(tmp_path, BIG)
    fixed = tmp_path / "fixed.yaml"
    res = run("check", cfg, "--gpu", GPU, "--write", str(fixed))
    assert res.exit_code == 3, res.output
    assert "DOES NOT FIT" in res.output and "smallest change that fits" in res.output
    text = fixed.read_text()
    assert "# keep this comment" in text
    again = run("check", str(fixed), "--gpu", GPU, "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["verdict"] == "fits"
    # never overwrite without --force
    res = run("check", cfg, "--gpu", GPU, "--write", str(fixed))
    assert res.exit_code == 1
    assert res.output.strip() == f"Error: {fixed} exists. Pass --force to overwrite it."
    assert run("check", cfg, "--gpu", GPU, "--write", str(fixed), "--force").exit_code == 3


def test_fix_is_the_cheapest_feasible_option(tmp_path):
    import yaml

    from optimizer.check import fix_options
    from optimizer.llamafactory.read import plan_from_dict
    from optimizer.models.catalog import get_gpu, resolve_arch

    rep = json.loads(run("check", _cfg(tmp_path, BIG), "--gpu", GPU, "--json").output)
    fix = rep["fix"]
    # a 16-bit 7B model cannot fit 16 GB: quantization is required
    assert fix["changes"]["quantization_bit"] == [None, 4]
    # CP-SAT's choice equals the minimum over every fitting combination (enumerated here), ties by peak
    data = yaml.safe_load(BIG)
    plan, model = plan_from_dict(data)
    budget = int(get_gpu(GPU).memory_bytes * 0.9)
    rows = fix_options(data, plan, resolve_arch(model), budget, evaluates=False)
    best_cost = min(r[4] for r in rows)
    assert fix["cost"] == best_cost
    assert fix["device_peak_bytes"] // 2**20 == min(r[3] // 2**20 for r in rows if r[4] == best_cost)
    assert fix["device_peak_bytes"] <= budget


def test_exit_code_for_bad_input(tmp_path):
    res = run("check", _cfg(tmp_path, "model_name_or_path: Qwen/Qwen2.5-3B-Instruct\nbogus: 1\n"), "--gpu", GPU)
    assert res.exit_code == 1
    assert res.output.startswith("Error: ")
    assert run("check", "missing.yaml", "--gpu", GPU).exit_code == 1


def test_optimize_on_a_fitting_config_proposes_nothing_costly():
    rep = json.loads(run("check", "configs/reference-case/ultra_lite.yaml", "--gpu", GPU, "--optimize",
                         "--json").output)
    assert rep["fix"]["cost"] == 0 and rep["fix"]["changes"] == {}


def test_cutoff_len_past_the_context_window_is_a_pitfall_and_an_estimate_note(tmp_path):
    # SmolLM2-1.7B-Instruct: config.json max_position_embeddings 8192 (optimizer/models/models.yaml)
    text = ("model_name_or_path: HuggingFaceTB/SmolLM2-1.7B-Instruct\ncutoff_len: 16384\n"
            "per_device_train_batch_size: 1\n")
    rep = json.loads(run("check", _cfg(tmp_path, text), "--gpu", "h100-sxm-80gb", "--json").output)
    pit = next(p for p in rep["pitfalls"] if p["key"] == "cutoff_len")
    assert "exceeds the model's context window (max_position_embeddings 8192)" in pit["problem"]
    assert pit["fix"] == "set cutoff_len <= 8192"
    assert any("max_position_embeddings 8192" in n for n in rep["estimate"]["notes"])
    ok = json.loads(run("check", _cfg(tmp_path, text.replace("16384", "8192"), "ok.yaml"), "--gpu", GPU,
                        "--json").output)
    assert not any(p["key"] == "cutoff_len" for p in ok["pitfalls"])


def test_liger_kernel_needs_its_package_in_check_and_in_the_emitted_header(tmp_path):
    from optimizer.llamafactory.write import render_config
    from optimizer.schema import Plan

    text = "model_name_or_path: Qwen/Qwen2.5-3B-Instruct\nenable_liger_kernel: true\ncutoff_len: 256\n"
    rep = json.loads(run("check", _cfg(tmp_path, text), "--gpu", GPU, "--json").output)
    env = [p for p in rep["pitfalls"] if p["key"] == "(environment)" and "liger-kernel" in p["problem"]]
    assert [p["fix"] for p in env] == ["pip install liger-kernel"]
    kw = dict(model_name_or_path="Qwen/Qwen2.5-3B-Instruct", template="qwen", dataset="d", dataset_dir="data",
              output_dir="saves/x", header=["a header"])
    assert "# needs: pip install liger-kernel" in render_config(Plan(enable_liger_kernel=True, bf16=True), **kw)
    assert "liger" not in render_config(Plan(bf16=True), **kw).split("### model")[0]
