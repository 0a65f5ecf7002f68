"""The files and the command that launch one plan on several GPUs through LLaMA-Factory. PURE: text in, text out.

Sources (hiyouga/LLaMA-Factory, read at commit ff6d4d12, v0.9.5-54):
- `src/llamafactory/launcher.py::launch`: `llamafactory-cli train` runs torchrun when `FORCE_TORCHRUN` is set (or
  more than one GPU is visible), with `NNODES`, `NODE_RANK`, `NPROC_PER_NODE`, `MASTER_ADDR`, `MASTER_PORT` from the
  environment; `examples/README.md` shows `FORCE_TORCHRUN=1 NNODES=2 NODE_RANK=0 MASTER_ADDR=.. MASTER_PORT=..`.
- DeepSpeed: the training YAML's `deepspeed:` key names a JSON; `examples/deepspeed/ds_z{0,2,3}_config.json`,
  `ds_z2_offload_config.json`, `ds_z3_offload_config.json` are reproduced below key for key (`_ds_config`).
- FSDP: `examples/accelerate/fsdp_config.yaml`, `fsdp_config_offload.yaml`, `fsdp2_config.yaml`,
  `fsdp_config_multiple_nodes.yaml`, launched as `examples/extras/fsdp_qlora/train.sh` does:
  `accelerate launch --config_file examples/accelerate/fsdp_config.yaml src/train.py <yaml>` (from a LLaMA-Factory
  checkout: `src/train.py` calls `llamafactory.train.tuner.run_exp`).

The emitted files sit next to the training YAML; paths in the YAML key and in the command are the YAML's folder
joined with the file name, so both work from the folder the command is run in.
"""

from __future__ import annotations

import json
import posixpath

from ..distributed.engines import DEEPSPEED, DistSettings
from ..distributed.memory import DistEstimate
from ..schema import Plan

__all__ = ["launch_files", "launch_command", "launch_text", "deepspeed_key", "DEFAULT_MASTER_ADDR",
           "DEFAULT_MASTER_PORT"]

# [S] LLaMA-Factory examples/README.md multi-node example and accelerate's default main_process_port.
DEFAULT_MASTER_ADDR = "192.168.0.1"
DEFAULT_MASTER_PORT = 29500


def _ds_name(dist: DistSettings) -> str:
    stage = dist.engine[-1]
    # LLaMA-Factory's ds_z2_offload_config.json offloads the optimizer, ds_z3_offload_config.json both
    off = {"none": "", "optimizer": "_offload" if stage != "3" else "_offload_optimizer", "params": "_offload"}
    off = off[dist.offload]
    return f"ds_z{stage}{off}_config.json"


def _ds_config(dist: DistSettings) -> dict:
    """[S] LLaMA-Factory examples/deepspeed/ds_z2_config.json and ds_z3_config.json (the same top-level keys; "auto"
    values are filled by transformers integrations/deepspeed.py from the TrainingArguments). ZeRO-1 (no shipped
    example) is ds_z2_config.json with stage 1; ZeRO-3 with the optimizer offloaded only is ds_z3_offload_config.json
    without offload_param."""
    stage = int(dist.engine[-1])
    zero: dict = {"stage": stage}
    if dist.offload in ("optimizer", "params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if dist.offload == "params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage < 3:
        zero.update({"allgather_partitions": True, "allgather_bucket_size": 5e8, "overlap_comm": False,
                     "reduce_scatter": True, "reduce_bucket_size": 5e8, "contiguous_gradients": True,
                     "round_robin_gradients": True})
    else:
        zero.update({"overlap_comm": False, "contiguous_gradients": True, "sub_group_size": 1e9,
                     "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                     "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
                     "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True})
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
                 "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": "auto"},
        "zero_optimization": zero,
    }


def _mixed_precision(plan: Plan) -> str:
    """accelerate's mixed_precision must match the YAML's dtype (LLaMA-Factory's example: `bf16  # or fp16`)."""
    return "bf16" if (plan.bf16 or plan.pure_bf16) else "fp16" if plan.fp16 else "no"


def _fsdp_name(dist: DistSettings) -> str:
    if dist.engine == "fsdp2":
        return "fsdp2_config.yaml"
    if dist.engine == "fsdp_grad_op":
        return "fsdp_grad_op_config.yaml"
    return "fsdp_config_offload.yaml" if dist.offload == "params" else "fsdp_config.yaml"


def _fsdp_config(plan: Plan, dist: DistSettings) -> str:
    """[S] LLaMA-Factory examples/accelerate/fsdp_config.yaml (FSDP1), fsdp_config_offload.yaml (offload_params
    true), fsdp2_config.yaml (fsdp_version 2, reshard_after_forward true); SHARD_GRAD_OP is fsdp_config.yaml with
    that sharding strategy. num_machines / num_processes as in fsdp_config_multiple_nodes.yaml."""
    off = "true" if dist.offload == "params" else "false"
    if dist.engine == "fsdp2":
        fsdp = ["  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP", "  fsdp_cpu_ram_efficient_loading: true",
                f"  fsdp_offload_params: {off}", "  fsdp_reshard_after_forward: true",
                "  fsdp_state_dict_type: FULL_STATE_DICT", "  fsdp_version: 2"]
    else:
        strategy = "SHARD_GRAD_OP" if dist.engine == "fsdp_grad_op" else "FULL_SHARD"
        fsdp = ["  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP", "  fsdp_backward_prefetch: BACKWARD_PRE",
                "  fsdp_forward_prefetch: false", "  fsdp_cpu_ram_efficient_loading: true",
                f"  fsdp_offload_params: {off}", f"  fsdp_sharding_strategy: {strategy}",
                "  fsdp_state_dict_type: FULL_STATE_DICT", "  fsdp_sync_module_states: true",
                "  fsdp_use_orig_params: true"]
    head = ["compute_environment: LOCAL_MACHINE", "debug: false", "distributed_type: FSDP", "downcast_bf16: 'no'",
            "fsdp_config:"]
    tail = ["machine_rank: 0", "main_training_function: main", f"mixed_precision: {_mixed_precision(plan)}"]
    if dist.nodes > 1:
        tail += [f"main_process_ip: {DEFAULT_MASTER_ADDR}", f"main_process_port: {DEFAULT_MASTER_PORT}"]
    tail += [f"num_machines: {dist.nodes}  # the number of nodes",
             f"num_processes: {dist.num_gpus}  # the number of GPUs in all nodes",
             "rdzv_backend: static", "same_network: true", "tpu_env: []", "tpu_use_cluster: false",
             "tpu_use_sudo: false", "use_cpu: false"]
    return "\n".join(head + fsdp + tail) + "\n"


def _beside(config_name: str, name: str) -> str:
    return posixpath.join(posixpath.dirname(config_name), name)


def deepspeed_key(dist: DistSettings, config_name: str) -> str | None:
    """The value of the training YAML's `deepspeed:` key (None when the engine is not DeepSpeed)."""
    return _beside(config_name, _ds_name(dist)) if dist.engine in DEEPSPEED else None


def launch_files(plan: Plan, dist: DistSettings, config_name: str) -> dict[str, str]:
    """{path: text} of the launcher files a multi-GPU run needs next to the training YAML `config_name`: the
    DeepSpeed JSON (ZeRO) or the accelerate config (FSDP); nothing for plain DDP or one GPU."""
    if dist.engine in DEEPSPEED:
        return {deepspeed_key(dist, config_name) or "": json.dumps(_ds_config(dist), indent=2) + "\n"}
    if dist.engine.startswith("fsdp"):
        return {_beside(config_name, _fsdp_name(dist)): _fsdp_config(plan, dist)}
    return {}


def launch_command(dist: DistSettings, config_name: str, *, node_rank: int = 0,
                   master_addr: str = DEFAULT_MASTER_ADDR, master_port: int = DEFAULT_MASTER_PORT) -> str:
    """The shell command that starts node `node_rank` of the run (the other nodes: the same with their rank)."""
    if dist.engine.startswith("fsdp"):
        cmd = f"accelerate launch --config_file {_beside(config_name, _fsdp_name(dist))}"
        if dist.nodes > 1:
            cmd += f" --machine_rank {node_rank} --main_process_ip {master_addr} --main_process_port {master_port}"
        return f"{cmd} src/train.py {config_name}"
    if dist.num_gpus <= 1:
        return f"llamafactory-cli train {config_name}"
    env = "FORCE_TORCHRUN=1"
    if dist.nodes > 1:
        env += f" NNODES={dist.nodes} NODE_RANK={node_rank} MASTER_ADDR={master_addr} MASTER_PORT={master_port}"
    env += f" NPROC_PER_NODE={dist.gpus_per_node}"
    return f"{env} llamafactory-cli train {config_name}"


def launch_text(plan, d: DistEstimate, config_name: str) -> str:
    """How to launch the run: the command and the launcher file it needs (optimizer.llamafactory.launch)."""
    dist = DistSettings(engine=d.engine, num_gpus=d.num_gpus, nodes=d.nodes, offload=d.offload)  # type: ignore[arg-type]
    lines = [f"Launch{' (node 0; the others with their NODE_RANK or --machine_rank)' if d.nodes > 1 else ''}: "
             f"{launch_command(dist, config_name)}"]
    for path in launch_files(plan, dist, config_name):
        if path.endswith(".json"):
            lines.append(f"  needs {path} (LLaMA-Factory's examples/deepspeed file; `trainfit solve` with a cluster "
                         f"writes it) and `deepspeed: {deepspeed_key(dist, config_name)}` in the YAML")
        else:
            lines.append(f"  needs {path} (LLaMA-Factory's examples/accelerate file; `trainfit solve` with a cluster "
                         "writes it); run from a LLaMA-Factory checkout: src/train.py")
    return "\n".join(lines)
