"""The command line: exit codes, exact error text, JSON shape."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from optimizer.cli import app

runner = CliRunner()
REF = "configs/reference-case/ultra_lite.yaml"


def run(*args: str):
    return runner.invoke(app, list(args))


def test_estimate_from_the_reference_yaml():
    res = run("estimate", "--config", REF, "--gpu", "rtx-5060-ti-16gb")
    assert res.exit_code == 0, res.output
    assert "trainable params: 5,271,552" in res.output
    assert "verdict on GeForce RTX 5060 Ti 16GB" in res.output


def test_estimate_json_has_the_documented_keys():
    res = run("estimate", "--model", "Qwen/Qwen2.5-3B-Instruct", "--quantization-bit", "4", "--lora-rank", "8",
              "--lora-target", "all", "--cutoff-len", "512", "--per-device-train-batch-size", "1", "--bf16",
              "--gpu", "rtx-5060-ti-16gb", "--json")
    assert res.exit_code == 0, res.output
    obj = json.loads(res.output)
    for key in ("trainable_params", "all_params", "peak_allocated_bytes", "peak_reserved_bytes", "device_peak_bytes",
                "peak_phase", "components", "gpu_total_bytes", "fits"):
        assert key in obj
    assert (obj["trainable_params"], obj["all_params"]) == (14_966_784, 3_100_905_472)
    assert sum(obj["components"].values()) == obj["peak_allocated_bytes"]
    assert obj["gpu_total_bytes"] == 16311 * 2**20
    assert obj["fits"] is True


def test_flags_override_the_yaml():
    a = json.loads(run("estimate", "--config", REF, "--json").output)
    b = json.loads(run("estimate", "--config", REF, "--json", "--cutoff-len", "2048").output)
    assert b["peak_allocated_bytes"] > a["peak_allocated_bytes"]
    assert b["plan"]["cutoff_len"] == 2048


def test_output_is_deterministic():
    assert run("estimate", "--config", REF, "--json").output == run("estimate", "--config", REF, "--json").output


def test_unknown_key_is_rejected_like_llamafactory(tmp_path):
    cfg = tmp_path / "t.yaml"
    cfg.write_text("model_name_or_path: Qwen/Qwen2.5-3B-Instruct\nlora_rnak: 8\n")
    res = run("estimate", "--config", str(cfg))
    assert res.exit_code == 1
    assert res.output.strip() == (
        f"Error: {cfg}: key 'lora_rnak' is not a LLaMA-Factory 0.9.5 train argument (did you mean 'lora_rank'?); "
        "LLaMA-Factory stops with 'Some keys are not used by the HfArgumentParser'. Fix these keys."
    )
    assert "Traceback" not in res.output


def test_unknown_model_names_the_closest():
    res = run("estimate", "--model", "Qwen/Qwen2.5-3B", "--bf16")
    assert res.exit_code == 1
    assert res.output.startswith("Error: unknown model 'Qwen/Qwen2.5-3B'")
    assert "Qwen/Qwen2.5-3B-Instruct" in res.output


def test_unknown_gpu():
    res = run("estimate", "--config", REF, "--gpu", "rtx-4091")
    assert res.exit_code == 1
    assert res.output.strip() == (
        "Error: unknown GPU 'rtx-4091'. Closest: rtx-4090, rtx-5090, rtx-4080. Run `trainfit gpus` for the list.")


def test_missing_config_file():
    res = run("estimate", "--config", "nope.yaml")
    assert res.exit_code == 1
    assert res.output.strip() == ("Error: config file 'nope.yaml' does not exist. "
                                  "Pass the path of a LLaMA-Factory training YAML.")


def test_bad_value_is_reported_with_the_key(tmp_path):
    cfg = tmp_path / "t.yaml"
    cfg.write_text("model_name_or_path: Qwen/Qwen2.5-3B-Instruct\ncutoff_len: -5\nquantization_bit: 3\n")
    res = run("estimate", "--config", str(cfg))
    assert res.exit_code == 1
    assert "cutoff_len" in res.output and "quantization_bit" in res.output


def test_no_model():
    res = run("estimate", "--bf16")
    assert res.exit_code == 1
    assert "no model given" in res.output


def test_bad_flag_value_exits_2():
    assert run("estimate", "--config", REF, "--flash-attn", "fa9").exit_code == 2


def test_config_json_path(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 1000, "torch_dtype": "bfloat16"}))
    res = run("estimate", "--model", str(tmp_path), "--bf16", "--json")
    assert res.exit_code == 0, res.output
    # transformers 5.24.0 + PEFT 0.21.2 on this config (meta device): sum(p.numel()) = 5,745,152;
    # get_peft_model(LoraConfig(r=8, all 7 projections)).get_nb_trainable_parameters() = (131,072, 5,876,224)
    obj = json.loads(res.output)
    assert (obj["trainable_params"], obj["all_params"]) == (131_072, 5_876_224)


def test_gpus_and_models_list():
    res = run("gpus")
    assert res.exit_code == 0 and "rtx-5060-ti-16gb" in res.output and "h100-sxm-80gb" in res.output
    res = run("models")
    assert res.exit_code == 0 and "Qwen/Qwen2.5-3B-Instruct" in res.output and "3,085,938,688" in res.output


def test_trace_command_runs_and_validates():
    import pytest

    pytest.importorskip("torch")
    pytest.importorskip("peft")
    res = run("trace", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--bf16", "--layers", "1", "--cutoff-len", "128",
              "--per-device-train-batch-size", "1", "--json")
    assert res.exit_code == 0, res.output
    obj = json.loads(res.output[res.output.index("{"):])
    assert obj["layers"] == 1 and obj["peak_phase"] in ("forward", "loss", "backward", "optimizer")
    assert obj["peak_allocated_bytes"] > 0 and obj["trainable_params"] == 183_296
    bad = run("trace", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--lora-target", "bogus", "--layers", "1")
    assert bad.exit_code == 1 and bad.output.startswith("Error: lora_target bogus matches no Linear layer")
    dev = run("trace", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--device", "tpu", "--layers", "1")
    assert dev.exit_code == 1 and "--device 'tpu' is not cpu or cuda" in dev.output


def test_a_path_longer_than_the_file_system_allows_is_one_error_line(tmp_path, monkeypatch):
    """pathlib's is_file()/is_dir() raise OSError (ENAMETOOLONG) rather than answer False; found by tests/test_fuzz.py
    through a dataset_info.json `file_name`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"ds": {"file_name": "x" * 300, "formatting": "alpaca"}}))
    for argv in (["data", "dataset_info.json"], ["data", "y" * 300]):
        res = run(*argv)
        assert res.exit_code == 1, res.output
        assert res.output.startswith("Error: cannot use ") and "File name too long" in res.output
        assert len(res.output.strip().splitlines()) == 1
