"""Render estimates for people (tables) and scripts (JSON). Pure: returns strings."""

from __future__ import annotations

import json
from typing import Any

from .memory import DEFAULT_MARGIN, fits
from .schema import Arch, Estimate, GpuSpec, Plan
from .units import GIB, MIB

__all__ = ["estimate_json", "estimate_table", "verdict", "gpus_table", "models_table"]

def verdict(est: Estimate, gpu: GpuSpec | None, margin: float = DEFAULT_MARGIN) -> dict[str, Any] | None:
    if gpu is None:
        return None
    total = gpu.memory_bytes
    word = fits(est.device_peak_bytes, total, margin)
    return {
        "gpu": gpu.id,
        "gpu_total_bytes": total,
        "headroom_bytes": total - est.device_peak_bytes,
        "fits": word != "does_not_fit",
        "fits_with_margin": word == "fits",
        "margin": margin,
    }


def estimate_json(est: Estimate, gpu: GpuSpec | None, plan: Plan, margin: float = DEFAULT_MARGIN) -> str:
    peak = next(p for p in est.phases if p.phase == est.peak_phase)
    v = verdict(est, gpu, margin)
    obj: dict[str, Any] = {
        "arch": est.arch,
        "trainable_params": est.trainable_params,
        "all_params": est.all_params,
        "trainable_percent": round(100 * est.trainable_params / est.all_params, 4) if est.all_params else 0.0,
        "tokens_per_micro_batch": est.tokens_per_micro_batch,
        "peak_allocated_bytes": est.peak_allocated_bytes,
        "peak_reserved_bytes": est.peak_reserved_bytes,
        "device_peak_bytes": est.device_peak_bytes,
        "peak_phase": est.peak_phase,
        "peak_moment": peak.moment,
        "components": {t.name: t.bytes for t in peak.terms},
        "phases": {p.phase: {"peak_allocated_bytes": p.total_bytes, "moment": p.moment,
                             "components": {t.name: t.bytes for t in p.terms}} for p in est.phases},
        "gpu_total_bytes": v["gpu_total_bytes"] if v else None,
        "headroom_bytes": v["headroom_bytes"] if v else None,
        "fits": v["fits"] if v else None,
        "fits_with_margin": v["fits_with_margin"] if v else None,
        "plan": plan.model_dump(),
        "notes": est.notes,
    }
    return json.dumps(obj, indent=2, sort_keys=False)


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f} GiB"


def estimate_table(est: Estimate, gpu: GpuSpec | None, margin: float = DEFAULT_MARGIN) -> str:
    peak = next(p for p in est.phases if p.phase == est.peak_phase)
    total = peak.total_bytes
    pct = 100 * est.trainable_params / est.all_params if est.all_params else 0.0
    lines = [
        f"{est.arch}: trainable params: {est.trainable_params:,} || all params: {est.all_params:,} "
        f"|| trainable%: {pct:.4f}",
        f"tokens per micro-batch: {est.tokens_per_micro_batch:,}",
        "",
        f"Peak in phase '{peak.phase}' ({peak.moment}):",
        f"  {'term':34s} {'MiB':>12s} {'share':>7s}",
    ]
    for t in sorted(peak.terms, key=lambda t: -t.bytes):
        lines.append(f"  {t.name:34s} {t.bytes / MIB:12,.1f} {100 * t.bytes / total:6.1f}%  {t.detail}")
    lines.append(f"  {'peak allocated':34s} {total / MIB:12,.1f} {100.0:6.1f}%")
    lines += ["", "Phase peaks (allocated):"]
    for p in est.phases:
        mark = "  <- peak" if p.phase == peak.phase else ""
        lines.append(f"  {p.phase:10s} {_gib(p.total_bytes)}  {p.moment}{mark}")
    lines += [
        "",
        f"peak allocated   {_gib(est.peak_allocated_bytes)}   (torch.cuda.max_memory_allocated)",
        f"peak reserved    {_gib(est.peak_reserved_bytes)}   (torch.cuda.max_memory_reserved)",
        f"device peak      {_gib(est.device_peak_bytes)}   (nvidia-smi: reserved + CUDA context)",
    ]
    v = verdict(est, gpu, margin)
    if v:
        head = v["headroom_bytes"]
        if not v["fits"]:
            word = "DOES NOT FIT"
        elif not v["fits_with_margin"]:
            word = f"fits, but with less than the {margin:.0%} safety margin"
        else:
            word = "fits"
        lines.append(f"verdict on {gpu.name} ({gpu.memory_mib:,} MiB): {word}; headroom {head / GIB:+.2f} GiB "
                     f"({100 * head / v['gpu_total_bytes']:+.1f}%)")
    for n in est.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def gpus_table(gpus: list[GpuSpec]) -> str:
    lines = [f"{'id':18s} {'name':28s} {'MiB':>7s} {'GB/s':>6s} {'bf16 TF':>8s} {'CC':>5s} {'bf16':>5s} {'FA2':>12s}"]
    for g in gpus:
        tf = f"{g.bf16_tflops:.1f}" if g.bf16_tflops else "-"
        lines.append(f"{g.id:18s} {g.name[:28]:28s} {g.memory_mib:7d} {g.bandwidth_gbps:6.0f} {tf:>8s} "
                     f"{g.compute_capability:>5s} {'yes' if g.bf16 else 'no':>5s} {g.flash_attn2:>12s}")
    return "\n".join(lines)


def models_table(archs: list[Arch], counts: dict[str, int]) -> str:
    lines = [f"{'id':44s} {'type':12s} {'params':>15s} {'L':>3s} {'H':>5s} {'heads':>7s} {'V':>7s} {'tied':>5s}"]
    for a in archs:
        lines.append(f"{a.name:44s} {a.model_type:12s} {counts[a.name]:15,d} {a.num_hidden_layers:3d} "
                     f"{a.hidden_size:5d} {a.num_attention_heads:3d}/{a.num_key_value_heads:<3d} {a.vocab_size:7d} "
                     f"{'yes' if a.tie_word_embeddings else 'no':>5s}")
    return "\n".join(lines)


def _dur(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def front_table(result) -> str:
    """The Pareto front of a `search.SolveResult` as a table."""
    lines = [
        f"{result.model} on {result.gpu} ({result.gpu_total_bytes / MIB:,.0f} MiB; device-peak bound "
        f"{result.budget_bytes / MIB:,.0f} MiB = {1 - result.margin:.0%})",
        f"{'#':>2s} {'type':7s} {'rank':>4s} {'target':9s} {'cutoff':>6s} {'batch':>5s} {'accum':>5s} {'samples':>7s} "
        f"{'kept':>4s} {'steps':>5s} {'GC':>3s} {'optim':17s} {'liger':5s} {'peak':>9s} {'headroom':>9s} {'time':>7s} "
        f"{'/epoch':>7s} {'quality':>7s}  pick",
    ]
    multi = any(s.num_gpus > 1 for s in result.front)
    if multi:  # a cluster problem: GPUs, engine and offload of each point, and host RAM per node
        lines[1] = f"{lines[1][:3]}{'gpus engine':20s} {'host':>9s} {lines[1][3:]}"
    epochs = result.several_epochs
    if epochs:
        at = lines[1].index(" kept")
        lines[1] = f"{lines[1][:at]} {'epochs':>6s}{lines[1][at:]}"
    for i, s in enumerate(result.front, 1):
        where = ""
        if multi:
            setup = f"{s.num_gpus} {s.engine or '-'}" + (f"+{s.offload}" if s.offload not in (None, "none") else "")
            host = f"{s.host_peak_bytes / GIB:5.1f} GiB" if s.host_peak_bytes is not None else "-"
            where = f"{setup:20s} {host:>9s} "
        lines.append(
            f"{i:2d} {where}{s.finetuning_type:7s} {str(s.lora_rank or '-'):>4s} {(s.lora_target or '-'):9s} "
            f"{s.cutoff_len:6d} "
            f"{s.per_device_train_batch_size:5d} {s.gradient_accumulation_steps:5d} {str(s.max_samples or 'all'):>7s} "
            + (f"{s.num_train_epochs:6g} " if epochs else "") +
            f"{s.kept_token_share:4.0%} {s.optimizer_steps:5d} {'on' if s.gradient_checkpointing else 'off':>3s} "
            f"{s.optim:17s} {'on' if s.enable_liger_kernel else 'off':5s} {s.device_peak_bytes / GIB:6.2f} GiB "
            f"{s.headroom_bytes / GIB:5.2f} GiB {_dur(s.time_s):>7s} {_dur(s.epoch_s):>7s} {s.quality:7.4f}  "
            f"{','.join(s.labels)}"
        )
    lines.append(f"recommended: #{result.recommended + 1} ({result.why})")
    what = (f"searched {', '.join(f'{e:g}' for e in result.searched_epochs)}" if epochs
            else f"{result.num_train_epochs:g}")
    lines.append(f"epochs: {what} ({result.epochs_source}); kept = share of supervised tokens kept at cutoff_len")
    proof = "proven optimal" if result.proven_optimal else "NOT proven optimal (time limit hit)"
    lines.append(f"front: {len(result.front)} points, {proof} ({result.method}), {result.evaluated_plans} plans "
                 f"evaluated by the memory model" + (f", {result.solve_s:.1f} s" if result.solve_s is not None else "")
                 + "; peak = device peak (nvidia-smi)")
    for n in result.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def trace_table(r) -> str:
    """A `trace.TraceResult` for people."""
    how = "extrapolated from two short runs" if r.extrapolated else f"{r.layers} layers run"
    lines = [
        f"{r.arch}: traced on {r.device} ({how}); seq {r.seq_len} x batch {r.batch_size}; {r.wall_s:.1f} s",
        f"trainable params: {r.trainable_params:,} || all params: {r.all_params:,}",
        f"peak allocated   {_gib(r.peak_allocated_bytes)}   in phase '{r.peak_phase}'"
        + (f" ({r.peak_sub_phase})" if r.peak_sub_phase else ""),
    ]
    if r.peak_reserved_bytes is not None:
        lines.append(f"peak reserved    {_gib(r.peak_reserved_bytes)}")
    if r.nvml_used_bytes is not None:
        lines.append(f"device (NVML)    {_gib(r.nvml_used_bytes)}")
    lines.append("phase peaks: " + ", ".join(f"{k} {v / GIB:.3f} GiB" for k, v in r.phase_peaks.items()))
    if r.top_tensors:
        lines.append("largest live tensors at the peak:")
        for t in r.top_tensors:
            lines.append(f"  {t.count:4d} x {t.bytes / MIB:10,.2f} MiB  {t.dtype:9s} {str(t.shape):24s} "
                         f"{t.op}  [{t.phase}]")
    for n in r.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def check_text(rep) -> str:
    """A `check.CheckReport` for people."""
    word = {"fits": "FITS", "fits_below_margin": f"FITS, but with less than the {rep.margin:.0%} safety margin",
            "does_not_fit": "DOES NOT FIT"}[rep.verdict]
    est = rep.estimate
    lines = [
        f"{rep.config}: {rep.model} on {rep.gpu} ({rep.gpu_total_bytes / MIB:,.0f} MiB)",
        f"verdict: {word}; device peak {rep.device_peak_bytes / GIB:.2f} GiB, "
        f"headroom {rep.headroom_bytes / GIB:+.2f} GiB",
        f"training: device peak {rep.train_device_peak_bytes / GIB:.2f} GiB "
        f"(allocated {est.peak_allocated_bytes / GIB:.2f} GiB) in phase '{est.peak_phase}'",
    ]
    peak = next(p for p in est.phases if p.phase == est.peak_phase)
    lines.append(f"  breakdown at the peak ({peak.moment}):")
    for t in sorted(peak.terms, key=lambda t: -t.bytes):
        lines.append(f"    {t.name:34s} {t.bytes / MIB:10,.1f} MiB  {t.detail}")
    if rep.eval is not None:
        lines.append(f"evaluation: device peak {rep.eval_device_peak_bytes / GIB:.2f} GiB ({rep.eval.moment})")
        for t in sorted(rep.eval.terms, key=lambda t: -t.bytes):
            lines.append(f"    {t.name:34s} {t.bytes / MIB:10,.1f} MiB  {t.detail}")
    if rep.pitfalls:
        lines.append("pitfalls:")
        for p in rep.pitfalls:
            lines.append(f"  - {p.key}: {p.problem}. Fix: {p.fix}.")
    if rep.key_effects or rep.no_effect:
        lines.append("what the memory-related keys of this file do:")
        for e in rep.key_effects:
            lines.append(f"  - {e.key}: {e.value!r} {e.explanation}")
        for e in rep.no_effect:
            lines.append(f"  - {e.key}: {e.value!r} {e.explanation}")
    if rep.fix is not None:
        lines.append(f"smallest change that fits with the margin (cost {rep.fix.cost}):")
        for k, (old, new) in rep.fix.changes.items():
            lines.append(f"  {k}: {old!r} -> {new!r}")
        lines.append(f"  predicted device peak after: {rep.fix.device_peak_bytes / GIB:.2f} GiB "
                     f"(headroom {rep.fix.headroom_bytes / GIB:.2f} GiB)")
    elif rep.fix_note:
        lines.append(f"no fix found: {rep.fix_note}")
    for n in est.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def data_text(tokens, cutoffs: list[int]) -> str:
    """A `dataset.DatasetTokens` for people: histogram, percentiles, coverage per cutoff_len."""
    totals = sorted(s.total for s in tokens.samples)
    n = len(totals)
    s = tokens.summary()
    pairs = getattr(tokens, "pairwise", False)  # data.pairwise.PairwiseTokens: preference pairs (stage dpo)
    lines = [f"{tokens.source}: {n} {'pairs' if pairs else 'samples'}, template {tokens.template}, tokenizer "
             f"{tokens.tokenizer}" + ("" if tokens.exact else " (approximate counts)")]
    what = "prompt + longer response tokens: the padded pair" if pairs else "prompt + response tokens"
    lines.append(f"percentiles ({what}): " + ", ".join(
        f"p{k} {v}" for k, v in sorted(s.token_length_percentiles.items())))
    lines.append(f"{'longer response' if pairs else 'response'} share of tokens: {s.response_token_share:.2f}")
    bins = 12
    hi = totals[-1] if totals else 1
    width = max(1, -(-hi // bins))
    counts = [0] * bins
    for t in totals:
        counts[min(bins - 1, (t - 1) // width if t else 0)] += 1
    top = max(counts) or 1
    lines.append("histogram:")
    for i, c in enumerate(counts):
        lines.append(f"  {i * width + 1:6d}-{(i + 1) * width:<6d} {'#' * round(40 * c / top):40s} {c}")
    lines.append(f"{'cutoff_len':>10s} {'whole samples':>14s} {'response kept':>14s} {'tokens kept':>12s} "
                 f"{'truncated':>10s} {'packed rows':>12s}")
    for c in tokens.coverage_table(cutoffs):
        lines.append(f"{c.cutoff_len:10d} {100 * c.whole_share:13.1f}% {100 * c.response_kept_share:13.1f}% "
                     f"{100 * c.tokens_kept_share:11.1f}% {c.truncated:10d} {c.packed_rows:12d}")
    lines.append("packed rows: the rows of cutoff_len tokens that `packing: true` makes of the samples "
                 "(LLaMA-Factory's greedy knapsack)")
    return "\n".join(lines)


def multi_check_extras(rep) -> str:
    """What the one-GPU check of the same config adds to a multi-GPU check: its pitfalls, and the evaluation pass,
    which the per-GPU model does not cover yet (its activations and logits do not shard, so its one-GPU peak is what
    each GPU needs beyond the sharded states)."""
    lines = []
    if rep.eval is not None:
        lines.append(f"evaluation: not modelled per GPU yet; on one GPU it peaks at "
                     f"{rep.eval_device_peak_bytes / GIB:.2f} GiB ({rep.eval.moment}); its activations do not shard: "
                     "lower per_device_eval_batch_size if in doubt")
    if rep.pitfalls:
        lines.append("pitfalls:")
        lines += [f"  - {p.key}: {p.problem}. Fix: {p.fix}." for p in rep.pitfalls]
    return "\n".join(lines)


def images_text(rows, cutoff_len: int, image_max_pixels: int, image_min_pixels: int, limit: int = 20) -> str:
    """Per-sample text and image tokens (`data.images.SampleLength` rows) against cutoff_len."""
    with_images = [r for r in rows if r.images]
    over = [r for r in rows if r.total_tokens > cutoff_len]
    lines = [f"images: {len(with_images)} of {len(rows)} samples, {sum(r.images for r in rows)} images, "
             f"{sum(r.image_tokens for r in rows):,} image tokens (image_max_pixels {image_max_pixels:,}, "
             f"image_min_pixels {image_min_pixels:,}); text + image tokens over cutoff_len {cutoff_len}: "
             f"{len(over)} samples (LLaMA-Factory truncates them)",
             f"{'sample':>7s} {'text':>7s} {'images':>6s} {'image tok':>9s} {'total':>7s}  vs cutoff_len {cutoff_len}"]
    for r in rows[:limit]:
        verdict = f"over by {r.total_tokens - cutoff_len}" if r.total_tokens > cutoff_len else "fits"
        lines.append(f"{r.sample:7d} {r.text_tokens:7d} {r.images:6d} {r.image_tokens:9d} {r.total_tokens:7d}  "
                     f"{verdict}")
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more samples (--json lists all)")
    return "\n".join(lines)
