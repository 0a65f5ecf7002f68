"""Multi-GPU engine settings as LLaMA-Factory launches them, and their validation.

LLaMA-Factory runs several GPUs three ways ([S] LLaMA-Factory `src/llamafactory/cli.py`, `examples/`):
plain DDP (torchrun, the default with more than one visible GPU), DeepSpeed ZeRO (the YAML key `deepspeed:`
naming one of `examples/deepspeed/ds_z{0,2,3}[_offload]_config.json`), and FSDP through accelerate
(`examples/accelerate/fsdp_config.yaml`, `fsdp_config_offload.yaml`, `fsdp2_config.yaml`).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError
from ..schema import Arch, Plan

__all__ = ["ENGINES", "Engine", "Offload", "DistSettings", "ZeroValues", "validate", "zero_values", "parse_engine",
           "DEEPSPEED", "SHARDS_PARAMS"]

Engine = Literal["ddp", "zero1", "zero2", "zero3", "fsdp", "fsdp2", "fsdp_grad_op"]
Offload = Literal["none", "optimizer", "params"]
ENGINES: tuple[str, ...] = ("ddp", "zero1", "zero2", "zero3", "fsdp", "fsdp2", "fsdp_grad_op")
DEEPSPEED = ("zero1", "zero2", "zero3")
SHARDS_PARAMS = ("zero3", "fsdp", "fsdp2", "fsdp_grad_op")  # the frozen base is sharded too

# Engines users ask for that LLaMA-Factory does not launch (for a clear error instead of a guess).
_NOT_SUPPORTED = {
    "tp": "tensor parallelism", "pp": "pipeline parallelism", "megatron": "Megatron-LM",
    "zero++": "ZeRO++", "zeropp": "ZeRO++", "zero0": "ZeRO stage 0 (that is plain data parallelism: use ddp)",
}


class DistSettings(BaseModel):
    """How many GPUs and which engine: the multi-GPU side of one run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: Engine = Field(default="ddp", description="ddp (LLaMA-Factory's default with >1 GPU), zero1/zero2/zero3 "
                           "(DeepSpeed), fsdp (FSDP1 FULL_SHARD), fsdp2 (fully_shard), fsdp_grad_op (SHARD_GRAD_OP).")
    num_gpus: int = Field(default=1, description="GPUs in all (world size), across every node.")
    nodes: int = Field(default=1, description="Machines; num_gpus is split evenly over them.")
    offload: Offload = Field(default="none", description="none, optimizer (DeepSpeed offload_optimizer to CPU) or "
                             "params "
                             "(ZeRO-3 offload_param + offload_optimizer; FSDP CPUOffload(offload_params=True)).")
    zero_init: bool = Field(default=True, description="ZeRO-3: the model is built under deepspeed.zero.Init (HF "
                            "Trainer does it when the DeepSpeed config is known before from_pretrained).")
    cpu_ram_efficient_loading: bool = Field(default=True, description="FSDP: only rank 0 loads the checkpoint "
                                            "(accelerate fsdp_cpu_ram_efficient_loading; LLaMA-Factory's configs "
                                            "set it).")
    host_ram_gib: float | None = Field(default=None, description="Host RAM per node, GiB, for the host verdict.")
    reduce_bucket_size: int | None = Field(default=None, description="DeepSpeed reduce_bucket_size (elements); None = "
                                           "LLaMA-Factory's example config (5e8, or 'auto' = hidden_size^2 "
                                           "under ZeRO-3).")
    stage3_prefetch_bucket_size: int | None = Field(default=None, description="None = 'auto' = 0.9 hidden_size^2.")
    stage3_param_persistence_threshold: int | None = Field(default=None, description="None = 'auto' = 10 hidden_size.")
    stage3_max_live_parameters: int = Field(default=1_000_000_000, description="LLaMA-Factory's ds_z3 config: 1e9.")
    ddp_bucket_cap_mb: int = Field(default=25,
                                   description="torch DDP bucket_cap_mb (HF ddp_bucket_cap_mb; default 25).")

    @property
    def gpus_per_node(self) -> int:
        return self.num_gpus // self.nodes


class ZeroValues(BaseModel):
    """DeepSpeed bucket sizes after transformers fills the 'auto' values (elements)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    reduce_bucket_size: int
    prefetch_bucket_size: int
    persistence_threshold: int
    max_live_parameters: int


def zero_values(arch: Arch, dist: DistSettings) -> ZeroValues:
    """[S] LLaMA-Factory examples/deepspeed/ds_z{0,2}_config.json: reduce_bucket_size 5e8, allgather_bucket_size 5e8;
    ds_z3_config.json: reduce_bucket_size, stage3_prefetch_bucket_size, stage3_param_persistence_threshold 'auto',
    stage3_max_live_parameters 1e9. [S] transformers integrations/deepspeed.py::HfTrainerDeepSpeedConfig.
    trainer_config_finalize: reduce_bucket_size = h*h, stage3_prefetch_bucket_size = 0.9*h*h,
    stage3_param_persistence_threshold = 10*h (h = hidden_size)."""
    h = arch.hidden_size
    z3 = dist.engine == "zero3"
    rbs = dist.reduce_bucket_size if dist.reduce_bucket_size is not None else (h * h if z3 else 500_000_000)
    pf = dist.stage3_prefetch_bucket_size if dist.stage3_prefetch_bucket_size is not None else int(0.9 * h * h)
    pt = dist.stage3_param_persistence_threshold if dist.stage3_param_persistence_threshold is not None else 10 * h
    return ZeroValues(reduce_bucket_size=rbs, prefetch_bucket_size=pf, persistence_threshold=pt,
                      max_live_parameters=dist.stage3_max_live_parameters)


def parse_engine(name: str) -> Engine:
    """A user's engine name, or one clear error."""
    key = name.strip().lower().replace("-", "_")
    aliases = {"deepspeed": "zero2", "zero_1": "zero1", "zero_2": "zero2", "zero_3": "zero3", "z1": "zero1",
               "z2": "zero2", "z3": "zero3", "fsdp1": "fsdp", "full_shard": "fsdp", "shard_grad_op": "fsdp_grad_op"}
    key = aliases.get(key, key)
    if key in ENGINES:
        return key  # type: ignore[return-value]
    what = _NOT_SUPPORTED.get(key.replace("_", ""), _NOT_SUPPORTED.get(key))
    why = f" ({what}) is not something LLaMA-Factory launches" if what else " is not an engine LLaMA-Factory supports"
    raise ConfigError(f"engine {name!r}{why}. Use one of: {', '.join(ENGINES)}.")


def validate(dist: DistSettings, plan: Plan) -> None:
    """Every problem of the multi-GPU settings at once, as one ConfigError."""
    problems: list[str] = []
    if dist.num_gpus < 1:
        problems.append(f"num_gpus is {dist.num_gpus}: a run needs at least one GPU. Pass --num-gpus 1 or more")
    if dist.nodes < 1:
        problems.append(f"nodes is {dist.nodes}: pass --nodes 1 or more")
    elif dist.num_gpus >= 1 and dist.num_gpus % dist.nodes:
        problems.append(f"num_gpus {dist.num_gpus} does not split evenly over {dist.nodes} nodes: "
                        "torchrun starts the same number of processes on every node. Use a multiple of --nodes")
    if dist.offload != "none":
        if dist.engine in ("ddp", "fsdp_grad_op"):
            problems.append(f"offload {dist.offload} with {dist.engine}: only DeepSpeed ZeRO and FSDP FULL_SHARD "
                            "offload. Use --engine zero2/zero3 or fsdp, or drop --offload")
        elif dist.engine in ("zero1", "zero2") and dist.offload == "params":
            # [S] DeepSpeed runtime/zero/config.py: offload_param is a ZeRO-3 feature
            problems.append(f"offload params with {dist.engine}: parameter offload needs ZeRO-3. "
                            "Use --engine zero3 or --offload optimizer")
        elif dist.engine in ("fsdp", "fsdp2") and dist.offload == "optimizer":
            # [S] torch FSDP CPUOffload has one switch, offload_params, which also moves grads and the step to CPU
            problems.append("offload optimizer with FSDP: FSDP offloads parameters, gradients and the optimizer step "
                            "together. Use --offload params, or --engine zero2/zero3 for optimizer-only offload")
        if dist.host_ram_gib is not None and dist.host_ram_gib <= 0:
            problems.append(f"offload {dist.offload} with host RAM {dist.host_ram_gib:g} GiB: offloaded states live in "
                            "host RAM. Give --host-ram-gib the RAM per node, or drop --offload")
    if dist.host_ram_gib is not None and not (dist.host_ram_gib >= 0 and math.isfinite(dist.host_ram_gib)):
        problems.append(f"host RAM {dist.host_ram_gib:g} GiB is not a finite, non-negative number. Give the RAM per "
                        "node in GiB")
    if dist.engine in SHARDS_PARAMS and plan.quantization_bit is not None and plan.quantization_bit != 4:
        # [S] LLaMA-Factory model/model_utils/quantization.py: "Only 4-bit quantized model can use fsdp+qlora or
        # auto device map."
        problems.append(f"quantization_bit {plan.quantization_bit} with {dist.engine}: LLaMA-Factory accepts only "
                        "4-bit bitsandbytes under ZeRO-3/FSDP. Use quantization_bit 4, or --engine ddp/zero2")
    if problems:
        raise ConfigError("; ".join(problems) + ".")
