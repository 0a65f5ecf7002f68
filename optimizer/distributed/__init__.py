"""More than one GPU: per-GPU memory under DDP / DeepSpeed ZeRO / FSDP, host RAM per node, communication time.

PURE (no I/O): `per_gpu` takes the single-GPU model's pieces plus `DistSettings` and returns a `DistEstimate`;
`comm_time_s` gives the communication seconds of one optimizer step. Search can call both per candidate.
"""

from .comm import CommTime, comm_time_s
from .engines import ENGINES, DistSettings, parse_engine, validate, zero_values
from .memory import DistEstimate, activation_plan, per_gpu

__all__ = ["ENGINES", "CommTime", "DistEstimate", "DistSettings", "activation_plan", "comm_time_s", "parse_engine",
           "per_gpu", "validate", "zero_values"]
