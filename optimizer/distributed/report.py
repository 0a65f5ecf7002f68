"""Text and JSON of a per-GPU estimate (no printing here: the CLI prints)."""

from __future__ import annotations

import json

from ..memory.allocator import fits
from ..schema import GpuSpec
from ..units import GIB, fmt_gib
from .memory import DistEstimate

__all__ = ["dist_table", "dist_json"]


def dist_table(d: DistEstimate, gpu: GpuSpec | None, margin: float) -> str:
    per_node = d.num_gpus // d.nodes
    lines = [f"Multi-GPU: {d.engine} on {d.num_gpus} GPU(s) ({d.nodes} node(s) x {per_node})"
             + (f", offload {d.offload}" if d.offload != "none" else "")]
    for p in d.phases:
        lines.append(f"  {p.phase:<10} {fmt_gib(p.total_bytes):>11}  ({p.moment})")
    peak = next(p for p in d.phases if p.total_bytes == d.peak_allocated_bytes)
    lines.append(f"Per-GPU peak allocated: {fmt_gib(d.peak_allocated_bytes)} in {d.peak_phase} "
                 f"(one GPU: {fmt_gib(d.single_gpu_peak_allocated_bytes)}); device ~{fmt_gib(d.device_peak_bytes)}")
    for t in sorted(peak.terms, key=lambda t: -t.bytes):
        lines.append(f"    {t.name:<30} {fmt_gib(t.bytes):>11}  {t.detail}")
    if gpu is not None:
        verdict = fits(d.device_peak_bytes, gpu.memory_bytes, margin).replace("_", " ")
        lines.append(f"Verdict per GPU on {gpu.name}: {verdict}")
    lines.append(f"Host RAM per node: {fmt_gib(d.host_peak_bytes)} at the worst moment")
    for t in d.host_terms:
        lines.append(f"    {t.name:<30} {fmt_gib(t.bytes):>11}  {t.detail}")
    lines.append("Who shards what:")
    lines += [f"  {s}" for s in d.shards]
    lines += [f"Note: {n}" for n in d.notes]
    return "\n".join(lines)


def dist_json(d: DistEstimate, gpu: GpuSpec | None, margin: float) -> str:
    out = d.model_dump()
    out["peak_allocated_gib"] = round(d.peak_allocated_bytes / GIB, 3)
    if gpu is not None:
        out["gpu"] = gpu.id
        out["verdict"] = fits(d.device_peak_bytes, gpu.memory_bytes, margin)
    return json.dumps(out, indent=2)
