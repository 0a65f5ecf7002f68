"""Communication seconds of one optimizer step. PURE: bytes and GB/s in, seconds out.

Ring collectives ([S] NCCL docs "Performance" / nccl-tests doc/PERFORMANCE.md): all-reduce moves 2(N-1)/N of the
buffer through each GPU's link, all-gather and reduce-scatter (N-1)/N. ZeRO paper (Rajbhandari et al. 2020,
Sec. 7): DDP and ZeRO-1/2 move 2 x gradient bytes per step; ZeRO-3 adds a parameter all-gather in forward and in
backward (3 x). The bus bandwidth is the slowest link of the ring: NVLink (per direction) inside a node when the
card has it, else PCIe, and the network between nodes.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..schema import GpuSpec
from .memory import DistEstimate

__all__ = ["CommTime", "comm_time_s", "link_gbps", "DEFAULT_NETWORK_GBPS"]

# [S] NVIDIA ConnectX-6 / Quantum HDR InfiniBand: 200 Gb/s per port = 25 GB/s per direction; a common
# one-NIC-per-node assumption. Override with network_gbps.
DEFAULT_NETWORK_GBPS = 25.0


class CommTime(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    collective_bytes: int = Field(description="Bytes each GPU sends per optimizer step over the GPU links.")
    pcie_offload_bytes: int = Field(description="Bytes each GPU moves over PCIe to/from host RAM per step (offload).")
    link_gbps: float = Field(description="Bus bandwidth used for collectives, GB/s per direction.")
    pcie_gbps: float = Field(description="PCIe bandwidth per direction, GB/s.")
    seconds: float = Field(description="Communication time per optimizer step, not overlapped with compute.")
    detail: str = Field(description="What moves.")


def pcie_gbps(gpu: GpuSpec) -> float:
    """PCIe per direction: ~0.985 GB/s per lane for gen3 (8 GT/s, 128b/130b), doubling per generation
    ([S] PCI-SIG specifications: gen4 16 GT/s, gen5 32 GT/s)."""
    gen = gpu.pcie_gen or 4
    lanes = gpu.pcie_lanes or 16
    return 0.985 * 2 ** (gen - 3) * lanes


def link_gbps(gpu: GpuSpec, nodes: int, network_gbps: float = DEFAULT_NETWORK_GBPS) -> float:
    """The ring's slowest link per direction: NVLink's vendor figure is bidirectional, so half of it."""
    intra = gpu.nvlink_gbps / 2 if gpu.nvlink_gbps else pcie_gbps(gpu)
    return min(intra, network_gbps) if nodes > 1 else intra


def comm_time_s(d: DistEstimate, trainable_params: int, frozen_params: int, gpu: GpuSpec,
                network_gbps: float = DEFAULT_NETWORK_GBPS, grad_bytes_per_param: int = 2) -> CommTime:
    """Seconds per optimizer step (gradient accumulation: DDP and ZeRO-1/2 reduce once per step when
    no_sync is used; ZeRO-3/FSDP gather the weights every micro-batch -- counted once here)."""
    N, T, F, g = d.num_gpus, trainable_params, frozen_params, grad_bytes_per_param
    ring = (N - 1) / N if N > 1 else 0.0
    if d.engine == "ddp":
        coll, what = int(2 * ring * T * 4), "all-reduce of the gradients (fp32 buckets)"
    elif d.engine in ("zero1", "zero2"):
        coll = int(ring * T * g + ring * T * 2)
        what = "reduce-scatter of gradients + all-gather of updated bf16 weights"
    else:
        coll = int(2 * ring * (T + F) * 2 + ring * T * g)
        what = "all-gather of bf16 weights in forward and backward + reduce-scatter of gradients"
    pcie = 0
    if d.offload in ("optimizer", "params"):
        pcie += int(T / N * g + T / N * 2)  # gradient partition down, updated bf16 partition up
        what += "; offload: gradients to host and weights back over PCIe"
    if d.offload == "params":
        pcie += int(2 * (T + F) / N * 2)  # each forward/backward fetches the partition from host
    bw = link_gbps(gpu, d.nodes, network_gbps)
    pbw = pcie_gbps(gpu)
    sec = coll / (bw * 1e9) + pcie / (pbw * 1e9)
    return CommTime(collective_bytes=coll, pcie_offload_bytes=pcie, link_gbps=bw, pcie_gbps=pbw,
                    seconds=sec, detail=what)
