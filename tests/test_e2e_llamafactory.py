"""End to end through real LLaMA-Factory: a tiny random Qwen2 (2 layers, hidden 64) with its own tokenizer, a tiny
alpaca dataset, `trainfit solve` on it, and the picked config trained for 3 steps on the CPU by `trainfit train`
under LLaMA-Factory's own virtual environment (0.9.5 pins transformers<=5.6; the trace extra pins 5.24).

Runs when TRAINFIT_LF_PYTHON names that interpreter (.ci/run builds .venv-lf: `pip install -e . llamafactory==0.9.5
torch==2.13.0`); skips otherwise. Everything is offline: the model, tokenizer and data are written here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from optimizer.cli import app

# abspath, not resolve(): a venv's python is a symlink to the base interpreter, which lacks the venv's packages
LF_PYTHON = os.path.abspath(os.environ["TRAINFIT_LF_PYTHON"]) if os.environ.get("TRAINFIT_LF_PYTHON") else None
pytestmark = [
    pytest.mark.llamafactory,
    pytest.mark.skipif(not LF_PYTHON, reason="TRAINFIT_LF_PYTHON is unset: point it at a Python with "
                       "llamafactory==0.9.5 and trainfit installed (.ci/run builds .venv-lf)"),
]

# Built by LLaMA-Factory's interpreter (it has transformers and tokenizers): a WordLevel tokenizer trained on the
# test's own text with Qwen's special tokens and a ChatML chat template (what LLaMA-Factory's `qwen` template
# expects), and a randomly initialised 2-layer Qwen2 whose vocabulary is that tokenizer's.
BUILD = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    import torch

    out = Path(sys.argv[1]); text = Path(sys.argv[2]).read_text().split("\\n")
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(text + ["system user assistant You are a helpful assistant ."],
                            trainers.WordLevelTrainer(special_tokens=special))
    chat = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\\n{{ m['content'] }}<|im_end|>\\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>"], chat_template=chat)
    fast.save_pretrained(out)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                      bos_token_id=None, torch_dtype="float32")
    Qwen2ForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    print(json.dumps({"vocab": len(fast)}))
''')

WORDS = ("the", "model", "learns", "to", "answer", "short", "questions", "about", "colors", "numbers",
         "animals", "and", "places", "with", "one", "clear", "sentence", "red", "blue", "green", "cat",
         "dog", "bird", "city", "river", "mountain", "one", "two", "three", "four", "five")


def _samples(n: int) -> list[dict]:
    out = []
    for i in range(n):
        w = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(6 + i % 5)]
        out.append({"instruction": f"question {i} : " + " ".join(w[:4]), "input": "",
                    "output": " ".join(reversed(w)) + " ."})
    return out


def _train_three_steps(tmp_path: Path, cfg: dict, env: dict) -> list[str]:
    """`trainfit train` of a solved config for 3 steps in LLaMA-Factory's environment, with test-only overrides (the
    CPU has no bf16 autocast here; logged steps into a fresh folder). Checks it trained and saved the adapter;
    returns the calibration log's lines."""
    cfg = {**cfg, "bf16": False, "fp16": False, "use_cpu": True, "logging_steps": 1, "save_steps": 1000,
           "output_dir": str(tmp_path / "out"), "report_to": "none", "overwrite_output_dir": True}
    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log = tmp_path / "calibration.jsonl"
    proc = subprocess.run([LF_PYTHON, "-m", "optimizer", "train", str(run_cfg), "--gpu", "rtx-5060-ti-16gb",
                           "--max-steps", "3", "--log", str(log)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert "trained 3 step(s)" in proc.stdout, proc.stdout
    print(proc.stdout)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    return log.read_text().splitlines()


def test_solved_config_trains_with_llamafactory(tmp_path, monkeypatch):
    env = {**os.environ, "TRAINFIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WANDB_DISABLED": "true", "DISABLE_VERSION_CHECK": "1",
           "CUDA_VISIBLE_DEVICES": "", "TRAINFIT_CALIBRATION": "off"}
    data = _samples(24)
    (tmp_path / "data.json").write_text(json.dumps(data, indent=1))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"{d['instruction']} {d['output']}" for d in data))
    model = tmp_path / "Qwen2.5-tiny-random"
    built = subprocess.run([LF_PYTHON, "-c", BUILD, str(model), str(corpus)], env=env, capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    assert (model / "model.safetensors").is_file() and (model / "tokenizer.json").is_file()

    problem = {
        "name": "tiny-e2e", "model": model.name, "trainer": "llamafactory",
        "gpu": {"name": "test card", "memory_mib": 16384, "bf16_tflops": 100.0, "bandwidth_gbps": 500.0},
        "dataset": {"name": "tiny", "formatting": "alpaca", "file": "data.json", "tokenizer": "approx"},
        "search": {"finetuning_type": ["lora"], "lora_rank": [8], "lora_target": ["all"], "cutoff_len": [64],
                   "per_device_train_batch_size": [2], "gradient_accumulation_steps": [1], "max_samples": [None],
                   "gradient_checkpointing": [True], "optim": ["adamw_torch"], "enable_liger_kernel": [False]},
        "objective": {"num_train_epochs": 1.0},
    }
    (tmp_path / "problem.yaml").write_text(yaml.safe_dump(problem, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRAINFIT_CALIBRATION", "off")
    res = CliRunner().invoke(app, ["solve", "problem.yaml", "--out", "cfg", "--pick", "fastest"])
    assert res.exit_code == 0, res.output
    picked = sorted((tmp_path / "cfg").glob("*.yaml"))
    assert len(picked) == 1, picked
    cfg = yaml.safe_load(picked[0].read_text())
    # the model folder (not its config.json) and the qwen template, as LLaMA-Factory needs them
    assert cfg["model_name_or_path"] == model.name and cfg["template"] == "qwen" and cfg["finetuning_type"] == "lora"
    lines = _train_three_steps(tmp_path, cfg, env)
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["schema"] == "trainfit.calibration/1" and rec["steps"] == 3 and rec["device_name"] == "cpu"
    assert rec["measured"]["loss"] is not None and math.isfinite(rec["measured"]["loss"])
    assert rec["measured"]["peak_allocated_bytes"] is None  # no CUDA: memory figures are null
    assert rec["measured"]["step_s"] > 0 and rec["measured"]["tokens_per_s"] > 0
    assert rec["predicted"]["peak_allocated_bytes"] > 0 and rec["predicted"]["step_s"] > 0
    assert rec["versions"]["llamafactory"] == "0.9.5" and rec["versions"]["transformers"]
    assert [s["step"] for s in rec["per_step"]] == [1, 2, 3]


def test_solved_dpo_config_trains_with_llamafactory(tmp_path, monkeypatch):
    """stage dpo end to end: a ranking dataset, `trainfit solve` of a DPO problem (its dataset_info.json entry with
    `ranking: true`), and LLaMA-Factory's DPO trainer (pairwise processor and collator, reference log-probs from the
    adapter-disabled policy) running the picked config for 3 steps."""
    env = {**os.environ, "TRAINFIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WANDB_DISABLED": "true", "DISABLE_VERSION_CHECK": "1",
           "CUDA_VISIBLE_DEVICES": "", "TRAINFIT_CALIBRATION": "off"}
    data = [{"instruction": d["instruction"], "input": "", "chosen": d["output"],
             "rejected": " ".join(d["output"].split()[:3]) + " ."} for d in _samples(24)]
    (tmp_path / "pairs.json").write_text(json.dumps(data, indent=1))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"{d['instruction']} {d['chosen']}" for d in data))
    model = tmp_path / "Qwen2.5-tiny-random"
    built = subprocess.run([LF_PYTHON, "-c", BUILD, str(model), str(corpus)], env=env, capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    problem = {
        "name": "tiny-dpo", "model": model.name, "trainer": "llamafactory", "stage": "dpo", "pref_loss": "sigmoid",
        "gpu": {"name": "test card", "memory_mib": 16384, "bf16_tflops": 100.0, "bandwidth_gbps": 500.0},
        "dataset": {"name": "tiny_pairs", "formatting": "alpaca", "file": "pairs.json", "tokenizer": "approx"},
        "search": {"finetuning_type": ["lora"], "lora_rank": [8], "lora_target": ["all"], "cutoff_len": [64],
                   "per_device_train_batch_size": [2], "gradient_accumulation_steps": [1], "max_samples": [None],
                   "gradient_checkpointing": [True], "optim": ["adamw_torch"], "enable_liger_kernel": [False]},
        "objective": {"num_train_epochs": 1.0},
    }
    (tmp_path / "problem.yaml").write_text(yaml.safe_dump(problem, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["solve", "problem.yaml", "--out", "cfg", "--pick", "fastest"])
    assert res.exit_code == 0, res.output
    (picked,) = sorted((tmp_path / "cfg").glob("*.yaml"))
    cfg = yaml.safe_load(picked.read_text())
    assert (cfg["stage"], cfg["pref_loss"], cfg["pref_beta"]) == ("dpo", "sigmoid", 0.1)
    assert json.loads((tmp_path / "cfg" / "dataset_info.json").read_text())["tiny_pairs"]["ranking"] is True
    rec = json.loads(_train_three_steps(tmp_path, cfg, env)[0])
    assert rec["steps"] == 3 and rec["measured"]["loss"] is not None and math.isfinite(rec["measured"]["loss"])
    assert rec["predicted"]["step_s"] > 0
    # -logsigmoid(beta * 0) = ln 2: LoRA's B starts at zero, so the policy equals its adapter-disabled reference
    assert abs(rec["measured"]["loss"] - math.log(2)) < 1e-3, rec["measured"]["loss"]
    # each batch holds 2 x 2 sequences (chosen + rejected) padded to a multiple of 8 (measured: 160, 160, 192)
    assert all(s["tokens"] % (2 * 2 * 8) == 0 for s in rec["per_step"]), rec["per_step"]
