"""Multi-GPU memory: per-GPU model rules, DeepSpeed's own estimators, the CLI's errors, the FSDP2 oracle (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from optimizer.cli import app
from optimizer.distributed import DistSettings, comm_time_s, parse_engine, per_gpu
from optimizer.errors import ConfigError
from optimizer.llamafactory.launch import deepspeed_key, launch_command, launch_files
from optimizer.models import catalog
from optimizer.models.arch import param_counts
from optimizer.schema import Plan

Q7 = "Qwen/Qwen2.5-7B-Instruct"


def _arch(name=Q7):
    return catalog.resolve_arch(name)


def _plan(**kw):
    base = {"bf16": True, "per_device_train_batch_size": 1, "cutoff_len": 1024}
    base.update(kw)
    return Plan(**base)


def _term(d, phase, name):
    p = next(p for p in d.phases if p.phase == phase)
    return sum(t.bytes for t in p.terms if t.name == name)


def test_lora_zero2_does_not_lower_per_gpu_memory():
    """LLaMA-Factory #350: ZeRO-2 shards only the trainable states, so LoRA per-GPU memory stays about the same."""
    plan = _plan()
    one = per_gpu(_arch(), plan, DistSettings(engine="ddp", num_gpus=1)).single_gpu_peak_allocated_bytes
    for n in (2, 4, 8):
        z2 = per_gpu(_arch(), plan, DistSettings(engine="zero2", num_gpus=n))
        assert z2.peak_allocated_bytes > 0.95 * one
    z3 = per_gpu(_arch(), plan, DistSettings(engine="zero3", num_gpus=8))
    assert z3.peak_allocated_bytes < 0.6 * one  # ZeRO-3 shards the frozen base


def test_activations_are_never_sharded():
    plan = _plan(cutoff_len=8192)
    acts = [_term(per_gpu(_arch(), plan, DistSettings(engine="zero3", num_gpus=n)), "backward", "loss_backward")
            for n in (2, 4, 8)]
    assert acts[0] == acts[1] == acts[2] > 0


def test_full_finetuning_shards_with_more_gpus_and_offload_moves_to_host():
    plan = _plan(finetuning_type="full")
    peaks = [per_gpu(_arch(), plan, DistSettings(engine="zero3", num_gpus=n)).peak_allocated_bytes for n in (2, 4, 8)]
    assert peaks[0] > peaks[1] > peaks[2]
    on = per_gpu(_arch(), plan, DistSettings(engine="zero3", num_gpus=4))
    off = per_gpu(_arch(), plan, DistSettings(engine="zero3", num_gpus=4, offload="optimizer"))
    assert off.peak_allocated_bytes < on.peak_allocated_bytes
    assert off.host_peak_bytes > on.host_peak_bytes


def test_ddp_holds_a_second_gradient_copy():
    plan = _plan(finetuning_type="full", cutoff_len=256)
    d = per_gpu(_arch("Qwen/Qwen2.5-0.5B-Instruct"), plan, DistSettings(engine="ddp", num_gpus=2))
    assert _term(d, "optimizer", "ddp_gradient_buckets") >= _term(d, "optimizer", "grads") > 0


def test_parts_add_up_and_peak_is_the_max():
    d = per_gpu(_arch(), _plan(quantization_bit=4), DistSettings(engine="fsdp", num_gpus=2))
    assert d.peak_allocated_bytes == max(p.total_bytes for p in d.phases)
    for p in d.phases:
        assert p.total_bytes == sum(t.bytes for t in p.terms)


def test_model_states_match_deepspeed_estimators_on_full_finetuning():
    """DeepSpeed's estimators count every parameter as trainable: compare on full fine-tuning (pure bf16 engine).
    ZeRO-2 (stage_1_and_2.py::estimate_zero2_model_states_mem_needs): GPU = 2P + 18P/N.
    ZeRO-3 (stage3.py::estimate_zero3_model_states_mem_needs): 18P/N + 4 x largest layer; ours keeps the bf16
    gradient partition (grad_partitions_flat_buffer) next to the fp32 step copy: 20P/N, so subtract 2P/N."""
    ds = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    ds3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    arch, plan, N = _arch(), _plan(finetuning_type="full"), 4
    P = param_counts(arch).total
    _, gpu2 = ds.estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=N, cpu_offload=False)
    d2 = per_gpu(arch, plan, DistSettings(engine="zero2", num_gpus=N))
    names2 = ("weights_trainable_bf16", "grads_partition", "fp32_master_partition", "optimizer_states",
              "fp32_grad_partition")
    ours2 = sum(_term(d2, "optimizer", n) for n in names2)
    assert abs(ours2 - gpu2) / gpu2 < 0.001
    _, gpu3, largest = ds3.estimate_zero3_model_states_mem_needs(P, 1, num_gpus_per_node=N, cpu_offload=False)
    d3 = per_gpu(arch, plan, DistSettings(engine="zero3", num_gpus=N))
    ours3 = sum(_term(d3, "optimizer", n) for n in ("params_partition", "grads_partition", "fp32_master_partition",
                                                    "optimizer_states", "fp32_grad_partition"))
    assert abs((ours3 - 2 * P // N) - (gpu3 - largest)) / (gpu3 - largest) < 0.005


def test_comm_time_ring_all_reduce():
    d = per_gpu(_arch(), _plan(finetuning_type="full"), DistSettings(engine="ddp", num_gpus=4))
    gpu = catalog.get_gpu("a100-80gb")
    c = comm_time_s(d, 7_000_000_000, 0, gpu)
    assert c.collective_bytes == int(2 * 3 / 4 * 7_000_000_000 * 4)  # 2(N-1)/N x fp32 gradient bytes
    assert c.link_gbps == 300.0  # NVLink 600 GB/s bidirectional -> 300 per direction
    slow = comm_time_s(d, 7_000_000_000, 0, catalog.get_gpu("rtx-4090"))
    assert slow.seconds > c.seconds


def test_bad_inputs_one_error_each():
    with pytest.raises(ConfigError, match="not something LLaMA-Factory launches"):
        parse_engine("megatron")
    with pytest.raises(ConfigError, match="needs ZeRO-3"):
        per_gpu(_arch(), _plan(), DistSettings(engine="zero2", num_gpus=2, offload="params"))


@pytest.mark.parametrize("args, message", [
    (["--num-gpus", "0"], "Error: num_gpus is 0: a run needs at least one GPU. Pass --num-gpus 1 or more.\n"),
    (["--num-gpus", "2", "--engine", "zero3", "--offload", "optimizer", "--host-ram-gib", "0"],
     "Error: offload optimizer with host RAM 0 GiB: offloaded states live in host RAM. Give --host-ram-gib the RAM per "
     "node, or drop --offload.\n"),
    (["--num-gpus", "2", "--engine", "tp"],
     "Error: engine 'tp' (tensor parallelism) is not something LLaMA-Factory launches. Use one of: ddp, zero1, zero2, "
     "zero3, fsdp, fsdp2, fsdp_grad_op.\n"),
])
def test_cli_errors(args, message):
    r = CliRunner().invoke(app, ["estimate", "-m", Q7, "--bf16", *args])
    assert r.exit_code == 1
    assert r.stderr == message if hasattr(r, "stderr") else message in r.output


def test_cli_prints_per_gpu_and_host():
    r = CliRunner().invoke(app, ["estimate", "-m", Q7, "--bf16", "--num-gpus", "4", "--engine", "zero3",
                                 "--gpu", "a100-80gb"])
    assert r.exit_code == 0, r.output
    assert "Per-GPU peak allocated" in r.output and "Host RAM per node" in r.output and "ZeRO-3 shards" in r.output


@pytest.mark.slow
def test_fsdp2_oracle_runs_on_a_fake_process_group():
    """The oracle runs one rank of FSDP2 on fake tensors; its steady-state start is the sharded state, far below
    the single-GPU static bytes. (The model-vs-trace accuracy grid is not in place yet: see the report.)"""
    pytest.importorskip("torch")
    from optimizer.trace.distributed import run_fake_rank

    cfg = catalog.resolve_config("Qwen/Qwen2.5-0.5B-Instruct")
    r = run_fake_rank(cfg, _plan(cutoff_len=256), "fsdp2", 4, layers=2)
    assert 0 < r["static_bytes"] < r["peak_allocated_bytes"]


@pytest.mark.slow
def test_fsdp2_per_gpu_estimate_within_2_percent_of_the_rank_oracle():
    """The FSDP2 grid (trace/distributed.GRID_MULTI: 6 models, LoRA and full, N 2/4/8, checkpointing on/off,
    gradient accumulation): per-GPU peak allocated within 2% of rank 0 traced on fake tensors with 3 and 4 layers,
    extrapolated (about 90 s; benchmarks/accuracy_multi.py prints the table). Before the reduce-scatter/all-gather
    lifetimes were modelled, Mistral-7B full fine-tuning N=8 was off by 61% (layers_a/b 2, 3) and Qwen2.5-0.5B
    full N=4 by +6.3%."""
    pytest.importorskip("torch")
    from optimizer.memory import CUBLAS_WORKSPACE_BYTES
    from optimizer.trace.distributed import GRID_MULTI, run_rank_extrapolated

    assert len(GRID_MULTI) >= 20
    bad = []
    for name, plan, n in GRID_MULTI:
        d = per_gpu(catalog.resolve_arch(name), plan, DistSettings(engine="fsdp2", num_gpus=n))
        est = d.peak_allocated_bytes - 2 * CUBLAS_WORKSPACE_BYTES  # a CPU trace has no cuBLAS workspaces
        tr = run_rank_extrapolated(catalog.resolve_config(name), plan, "fsdp2", n)["peak_allocated_bytes"]
        if abs(est - tr) > 0.02 * tr:
            bad.append(f"{name} {plan.finetuning_type} s{plan.cutoff_len} N={n}: {est / 2**20:.0f} vs {tr / 2**20:.0f}")
    assert not bad, bad


# --- launch files (optimizer/llamafactory/launch.py) against LLaMA-Factory's shipped examples and the schemas ---

GOLDEN = Path(__file__).parent / "golden" / "llamafactory_launch"
_DS_CASES = [("zero2", "none", "ds_z2_config.json"), ("zero2", "optimizer", "ds_z2_offload_config.json"),
             ("zero3", "none", "ds_z3_config.json"), ("zero3", "params", "ds_z3_offload_config.json")]


@pytest.mark.parametrize("engine, offload, golden", _DS_CASES)
def test_deepspeed_json_is_llamafactorys_example(engine, offload, golden):
    files = launch_files(_plan(), DistSettings(engine=engine, num_gpus=4, offload=offload), "out/run.yaml")
    assert list(files) == [f"out/{golden}"]
    assert json.loads(files[f"out/{golden}"]) == json.loads((GOLDEN / golden).read_text())


def _fill_auto(cfg: dict, plan: Plan, world: int, hidden: int) -> dict:
    """What transformers integrations/deepspeed.py::HfTrainerDeepSpeedConfig.trainer_config_process/_finalize write
    over "auto" (batch sizes from the TrainingArguments, bucket sizes from hidden_size)."""
    ga = plan.gradient_accumulation_steps
    fill = {"train_batch_size": world * plan.per_device_train_batch_size * ga,
            "train_micro_batch_size_per_gpu": plan.per_device_train_batch_size, "gradient_accumulation_steps": ga,
            "gradient_clipping": 1.0, "reduce_bucket_size": hidden * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}

    def walk(d, key=None):
        if isinstance(d, dict):
            return {k: walk(v, k) for k, v in d.items()}
        if d == "auto":
            return fill.get(key, "auto")
        return d
    out = walk(cfg)
    out["fp16"]["enabled"], out["bf16"]["enabled"] = bool(plan.fp16), bool(plan.bf16)
    assert "auto" not in json.dumps(out)
    return out


@pytest.mark.parametrize("engine, offload", [("zero1", "none"), ("zero1", "optimizer"), ("zero2", "none"),
                                             ("zero2", "optimizer"), ("zero3", "none"), ("zero3", "optimizer"),
                                             ("zero3", "params")])
def test_deepspeed_json_passes_deepspeeds_own_config_parser(engine, offload):
    """deepspeed.runtime.config.DeepSpeedConfig parses the JSON with pydantic models that forbid unknown keys
    (DeepSpeedConfigModel: extra="forbid") and reads the stage and the offload devices back."""
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    plan = _plan(gradient_accumulation_steps=4)
    (text,) = launch_files(plan, DistSettings(engine=engine, num_gpus=4, offload=offload), "run.yaml").values()
    # without a process group DeepSpeedConfig takes world size 1 and checks train_batch_size against it
    cfg = ds_config.DeepSpeedConfig(_fill_auto(json.loads(text), plan, 1, 3584), mpu=None)
    assert cfg.zero_optimization_stage == int(engine[-1])
    assert (cfg.zero_config.offload_optimizer is not None) == (offload != "none")
    assert (cfg.zero_config.offload_param is not None) == (offload == "params")
    bad = json.loads(text)
    bad["zero_optimization"]["stage3_max_live_params"] = 1  # a typo must not pass
    with pytest.raises(Exception, match="stage3_max_live_params"):
        ds_config.DeepSpeedConfig(_fill_auto(bad, plan, 1, 3584), mpu=None)


@pytest.mark.parametrize("engine, offload, nodes, golden", [
    ("fsdp", "none", 1, "fsdp_config.yaml"), ("fsdp", "params", 1, "fsdp_config_offload.yaml"),
    ("fsdp2", "none", 1, "fsdp2_config.yaml"), ("fsdp", "none", 2, "fsdp_config_multiple_nodes.yaml")])
def test_accelerate_config_is_llamafactorys_example_and_loads(engine, offload, nodes, golden, tmp_path):
    cc = pytest.importorskip("accelerate.commands.config.config_args")
    gpus = 2 if nodes == 1 else 16
    files = launch_files(_plan(), DistSettings(engine=engine, num_gpus=gpus, nodes=nodes, offload=offload), "run.yaml")
    ((name, text),) = files.items()
    want = yaml.safe_load((GOLDEN / golden).read_text())
    assert yaml.safe_load(text) == want
    (tmp_path / name).write_text(text)
    loaded = cc.ClusterConfig.from_yaml_file(str(tmp_path / name))  # unknown keys raise ValueError
    assert loaded.num_processes == gpus and loaded.num_machines == nodes


def test_launch_commands():
    d = DistSettings
    assert launch_command(d(engine="ddp", num_gpus=4), "cfg/a.yaml") == \
        "FORCE_TORCHRUN=1 NPROC_PER_NODE=4 llamafactory-cli train cfg/a.yaml"
    assert launch_command(d(engine="zero3", num_gpus=16, nodes=2), "a.yaml", node_rank=1) == (
        "FORCE_TORCHRUN=1 NNODES=2 NODE_RANK=1 MASTER_ADDR=192.168.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 "
        "llamafactory-cli train a.yaml")
    assert launch_command(d(engine="fsdp", num_gpus=2, offload="params"), "cfg/a.yaml") == \
        "accelerate launch --config_file cfg/fsdp_config_offload.yaml src/train.py cfg/a.yaml"
    assert deepspeed_key(d(engine="zero3", num_gpus=2), "cfg/a.yaml") == "cfg/ds_z3_config.json"
    assert deepspeed_key(d(engine="fsdp", num_gpus=2), "cfg/a.yaml") is None
    assert launch_files(_plan(), d(engine="ddp", num_gpus=2), "a.yaml") == {}


def test_cli_estimate_prints_the_launch_command():
    r = CliRunner().invoke(app, ["estimate", "-m", Q7, "--bf16", "--num-gpus", "8", "--nodes", "2", "--engine",
                                 "zero3", "--offload", "params"])
    assert r.exit_code == 0, r.output
    assert ("Launch (node 0; the others with their NODE_RANK or --machine_rank): FORCE_TORCHRUN=1 NNODES=2 NODE_RANK=0 "
            "MASTER_ADDR=192.168.0.1 MASTER_PORT=29500 NPROC_PER_NODE=4 llamafactory-cli train train.yaml") in r.output
    assert "ds_z3_offload_config.json" in r.output


def test_reader_accepts_the_deepspeed_key_and_ignores_it_for_the_plan():
    from optimizer.llamafactory.read import plan_from_dict

    data = yaml.safe_load(_FULL7)
    plain, _ = plan_from_dict(dict(data))
    with_ds, _ = plan_from_dict({**data, "deepspeed": "ds_z3_config.json"})
    assert with_ds == plain


# --- trainfit check with the multi-GPU flags (optimizer/check.py::check_multi, optimizer/distributed/advice.py) ---

_FULL7 = """model_name_or_path: Qwen/Qwen2.5-7B-Instruct
stage: sft
do_train: true
finetuning_type: full
dataset: alpaca_en_demo
template: qwen
cutoff_len: 1024
per_device_train_batch_size: 1
gradient_accumulation_steps: 4
bf16: true
output_dir: saves/q7
"""


def _check(tmp_path, text, *args):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    return CliRunner().invoke(app, ["check", str(cfg), *args])


def test_check_reads_the_deepspeed_json_and_proposes_the_smallest_multi_gpu_change(tmp_path):
    (tmp_path / "ds_z2_config.json").write_text((GOLDEN / "ds_z2_config.json").read_text())
    r = _check(tmp_path, _FULL7 + "deepspeed: ds_z2_config.json\n", "--gpu", "rtx-4090", "--num-gpus", "4")
    assert r.exit_code == 3, r.output
    assert r.output.startswith("multi-GPU: zero2 on 4 x GeForce RTX 4090 (1 node(s)): DOES NOT FIT")
    assert "ZeRO-2 keeps the bf16 weights whole on every GPU" in r.output
    # FSDP shards the bf16 weights, gradients and bf16 Adam states: ~18.9 GiB per GPU (the FSDP2 oracle puts the same
    # plan with GA=1 within 0.5% of its own FSDP2 estimate), so switching the engine is enough
    assert "smallest multi-GPU change that fits (cost 1): --engine fsdp -> per-GPU 19.50 GiB" in r.output


def test_check_explains_why_zero2_does_not_lower_lora_memory(tmp_path):
    text = _FULL7.replace("finetuning_type: full", "finetuning_type: lora\nlora_target: all")
    r = _check(tmp_path, text, "--gpu", "a100-80gb", "--num-gpus", "4", "--engine", "zero2")
    assert r.exit_code == 0, r.output
    assert "zero2 shards at most the trainable states; with LoRA those are small" in r.output
    assert "LLaMA-Factory #350" in r.output


def test_check_host_ram_shortfall_and_its_fix(tmp_path):
    r = _check(tmp_path, _FULL7, "--gpu", "rtx-4090", "--num-gpus", "8", "--engine", "zero3", "--offload", "params",
               "--host-ram-gib", "64")
    assert r.exit_code == 3, r.output
    assert "why: host RAM: the run needs 127.7 GiB per node" in r.output
    # FSDP with cpu_ram_efficient_loading needs one checkpoint per node and no offload: it fits on these 8 GPUs
    assert "smallest multi-GPU change that fits (cost 1): --engine fsdp -> per-GPU 12.40 GiB, host 14.2 GiB" in r.output


def test_check_qlora_under_fsdp_names_the_quant_storage(tmp_path):
    text = _FULL7.replace("finetuning_type: full", "finetuning_type: lora\nquantization_bit: 4")
    r = _check(tmp_path, text, "--gpu", "rtx-4090", "--num-gpus", "2", "--engine", "fsdp")
    assert "bnb_4bit_quant_storage to the compute dtype" in r.output and "bf16 tensors" in r.output


@pytest.mark.parametrize("extra, args, message", [
    ("", ["--num-gpus", "0"], "Error: num_gpus is 0: a run needs at least one GPU. Pass --num-gpus 1 or more.\n"),
    ("", ["--num-gpus", "2", "--engine", "zero3", "--offload", "params", "--host-ram-gib", "0"],
     "Error: offload params with host RAM 0 GiB: offloaded states live in host RAM. Give --host-ram-gib the RAM per "
     "node, or drop --offload.\n"),
    ("", ["--num-gpus", "2", "--engine", "pp"],
     "Error: engine 'pp' (pipeline parallelism) is not something LLaMA-Factory launches. Use one of: ddp, zero1, "
     "zero2, zero3, fsdp, fsdp2, fsdp_grad_op.\n"),
    ("deepspeed: missing.json\n", [], "Error: the multi-GPU check needs the GPU count (the config sets deepspeed: "
     "missing.json). Pass --num-gpus N (GPUs in all).\n"),
    ("deepspeed: missing.json\n", ["--num-gpus", "2"], "Error: deepspeed: 'missing.json' cannot be read as JSON "
     "(from here or next to {cfg}). Fix the path, or pass --engine.\n"),
    ("", ["--num-gpus", "2", "--engine", "fsdp", "-m", "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4"],
     "Error: Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4 is a GPTQ-quantized checkpoint and fsdp shards parameters: "
     "LLaMA-Factory stops with 'DeepSpeed ZeRO-3 or FSDP is incompatible with PTQ-quantized models'. Use --engine ddp "
     "or zero2, or the 16-bit model with quantization_bit 4 (QLoRA) under --engine fsdp.\n"),
    ("quantization_bit: 8\n", ["--num-gpus", "2", "--engine", "fsdp"],
     "Error: quantization_bit 8 with fsdp: LLaMA-Factory accepts only 4-bit bitsandbytes under ZeRO-3/FSDP. Use "
     "quantization_bit 4, or --engine ddp/zero2.\n"),
])
def test_check_multi_gpu_errors(tmp_path, extra, args, message):
    text = _FULL7.replace("finetuning_type: full", "finetuning_type: lora") + extra
    r = _check(tmp_path, text, "--gpu", "rtx-4090", *args)
    assert r.exit_code == 1, r.output
    assert r.stderr == message.format(cfg=tmp_path / "run.yaml")


def test_multi_gpu_check_shows_the_evaluation_pass_and_the_pitfalls(tmp_path):
    """The per-GPU model covers training only; the check says so for evaluation and keeps the one-GPU pitfalls
    (found by a review: the multi-GPU check was silent where the one-GPU check said 'does not fit' for evaluation)."""
    cfg = tmp_path / "ev.yaml"
    cfg.write_text(Path("configs/reference-case/balanced.yaml").read_text() + "eval_strategy: steps\nval_size: 0.1\n")
    res = CliRunner().invoke(app, ["check", str(cfg), "--gpu", "rtx-5060-ti-16gb", "--num-gpus", "2", "--engine",
                                   "fsdp"])
    assert "evaluation: not modelled per GPU yet; on one GPU it peaks at" in res.output
    assert "per_device_eval_batch_size: evaluation runs with HF's default batch of 8" in res.output
