"""Multi-GPU memory: per-GPU model rules, DeepSpeed's own estimators, the CLI's errors, the FSDP2 oracle (slow)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from optimizer.cli import app
from optimizer.distributed import DistSettings, comm_time_s, parse_engine, per_gpu
from optimizer.errors import ConfigError
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
