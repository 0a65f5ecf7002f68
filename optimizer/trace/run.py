"""Run the oracle: fake-tensor traces, their linear extrapolation in layers, and real CUDA runs."""

from __future__ import annotations

import contextlib
import re
import time
from collections import defaultdict
from typing import Any

from ..errors import ConfigError, TrainfitError
from ..schema import Plan
from .result import TRACE_PHASES, TopTensor, TraceResult

__all__ = ["run_fake", "run_extrapolated", "run_real_cuda", "require_trace_extra", "versions"]

_EXTRA_MSG = "trainfit trace needs the trace extra: pip install 'trainfit[trace]'"
_8BIT_OPTIMS = ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit")


def require_trace_extra(plan: Plan | None = None) -> None:
    try:
        import accelerate  # noqa: F401
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise TrainfitError(_EXTRA_MSG) from None
    if plan is None or plan.quantization_bit is not None or plan.optim in _8BIT_OPTIMS:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            if plan is not None:
                raise TrainfitError(_EXTRA_MSG + " (bitsandbytes is missing)") from None


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _num_layers(config: dict[str, Any]) -> int:
    n = config.get("num_hidden_layers")
    if n is None and isinstance(config.get("text_config"), dict):
        n = config["text_config"].get("num_hidden_layers")
    if not n:
        raise ConfigError("config has no num_hidden_layers.")
    return int(n)


# ---------------------------------------------------------------------------------------------------------------
# notes: where a fake CPU step differs from the CUDA step it stands for
# ---------------------------------------------------------------------------------------------------------------

def _inputs_note(plan: Plan, attn_impl: str) -> str:
    """What the traced micro-batch stands for (optimizer/memory/precision.py::attention_mask_kind)."""
    from ..memory.precision import attention_mask_kind

    kind = attention_mask_kind(plan, attn_impl)
    head = "Inputs are one micro-batch of cutoff_len-long rows"
    if kind == "bool":
        return (head + " with the worst case's padding: the attention_mask is passed, and transformers builds the "
                "bool [b, 1, s, s] sdpa mask (fake tensors cannot be read, as a padded batch's zeros force on a GPU).")
    if kind == "float":
        return head + " with neat_packing's 4-D [b, 1, s, s] mask in the compute dtype (LLaMA-Factory's collator)."
    return (head + " without padding (no attention_mask, as transformers drops an all-ones mask on a GPU: packed rows "
            "of exactly cutoff_len, fa2's unpadded path, or eager's own mask).")


def _fake_notes(plan: Plan, built: Any, primed: bool) -> list[str]:
    notes = [
        "Counts allocated tensor bytes, each storage rounded up to 512 B, as torch.cuda.max_memory_allocated() does. "
        "Not modelled: reserved-but-free allocator memory (segments, fragmentation), the CUDA context, NCCL buffers.",
        "Kernel-internal scratch that CUDA kernels take from the caching allocator is invisible here: cuBLAS/cuBLASLt "
        "workspaces (~8 MiB per handle and stream, up to 32 MiB on Hopper), flash-attention backward buffers "
        "(fp32 dq accumulator; expanded dK/dV under GQA), embedding-backward sort buffers.",
        _inputs_note(plan, built.attn_impl),
        "The CE loss uses reduction=sum with num_items_in_batch, as HF Trainer passes it (same buffers as mean).",
        "Autograd's gradient sums (InputBuffer) never run in place on fake tensors; the tracker replays eager "
        "autograd's rule (in place when the first gradient is an exclusively owned dense tensor, calibrated on this "
        "torch build), so those sums cost no extra buffer where a CUDA run adds in place.",
    ]
    if built.attn_impl == "sdpa":
        from .patches import SEEN

        if SEEN["sdpa_fused"]:
            notes.append(
                "sdpa: the CUDA flash (fp16/bf16) or memory-efficient kernel is stood in for by PyTorch's CPU flash "
                "kernel, which keeps the same output + fp32 logsumexp for backward."
            )
        if SEEN["sdpa_math"]:
            notes.append(
                "sdpa: with fp32 attention inputs and GQA no fused CUDA kernel applies, so CUDA runs the math "
                "kernel ([B, heads, S, S] scores, repeated K/V); the trace runs the same math kernel."
            )
    if plan.bf16 or plan.fp16:
        notes.append(
            "AMP runs torch's CPU autocast in place of CUDA autocast (same lower-precision list for "
            "linear/matmul/sdpa; the fp32 lists differ only in ops these models do not use), then accelerate's fp32 "
            "copy of the outputs."
        )
    if plan.lora_dropout > 0 and plan.finetuning_type == "lora":
        notes.append("LoRA dropout traced with native_dropout (bool mask) as on CUDA, not the CPU kernel's "
                     "float noise.")
    if built.bnb4:
        notes.append(
            "bitsandbytes 4-bit matmul traced as dequantize + F.linear (its CUDA path above 1536 tokens per "
            "micro-batch and on sm90/sm100 for most shapes): a transient 16-bit [out, in] weight per call. Below "
            "that, on other GPUs, the fused gemm_4bit kernel skips that transient weight. Weights are quantized from "
            "fake tensors (bnb's fake kernels give packed data + absmax + nested state shapes)."
        )
    if built.bnb8:
        notes.append(
            "LLM.int8: traced through bitsandbytes' CUDA training path (MatMul8bitLt) with zero outlier columns; real "
            "inputs with |x| > 6.0 add small fp16 copies of the outlier columns."
        )
    if plan.optim == "adamw_torch":
        notes.append("adamw_torch: foreach AdamW as torch picks on CUDA; its step counters live on the host "
                     "(not counted).")
    if plan.optim == "paged_adamw_8bit":
        notes.append("paged_adamw_8bit: states of tensors >= 1e5 elements are cudaMallocManaged pages, outside the "
                     "torch allocator (not in max_memory_allocated; NVML shows the resident pages).")
    if plan.optim in _8BIT_OPTIMS:
        notes.append("8-bit optimizer code tables (2 x 256 fp32, shared) are real tensors here and not counted.")
    if plan.fp16:
        notes.append("fp16: GradScaler scaling/unscaling traced; its skip-on-inf of optimizer.step is not modelled.")
    if primed:
        notes.append("Step 1 ran only its optimizer phase (grads shaped as backward leaves them); its forward/backward "
                     "peaks are those of the measured step minus the optimizer state (step1_measured=false).")
    return notes


# ---------------------------------------------------------------------------------------------------------------
# fake run
# ---------------------------------------------------------------------------------------------------------------

_LAYER_IDX = re.compile(r"\.\d+\.")


def _label_group(op: str) -> str:
    return _LAYER_IDX.sub(".*.", op)


def _annotate_model(tracker: Any, built: Any) -> None:
    model = built.model
    for name, p in model.named_parameters():
        tracker.annotate(p, f"param:{name}")
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for field_name in ("absmax", "code", "offset"):
                t = getattr(qs, field_name, None)
                if t is not None:
                    tracker.annotate(t, f"quant:{name}.{field_name}")
            s2 = getattr(qs, "state2", None)
            if s2 is not None:
                for field_name in ("absmax", "code"):
                    t = getattr(s2, field_name, None)
                    if t is not None:
                        tracker.annotate(t, f"quant:{name}.state2.{field_name}")
    for _, module in built.bnb8:
        if module.state.SCB is not None:
            tracker.annotate(module.state.SCB, "quant:int8.SCB")
    for name, b in model.named_buffers():
        tracker.annotate(b, f"buffer:{name}")


def _after_first_optimizer_step(tracker: Any, trainer: Any, built: Any, plan: Plan) -> None:
    import torch

    names = {id(p): n for n, p in built.model.named_parameters()}
    opt = trainer.optimizer
    for p, state in opt.state.items():
        pname = names.get(id(p), "?")
        for key, val in state.items():
            if not torch.is_tensor(val):
                continue
            if key == "step" and plan.optim == "adamw_torch":
                tracker.mark_host(val)  # non-fused, non-capturable AdamW keeps step counters on the CPU
                continue
            if (plan.optim == "paged_adamw_8bit" and key in ("state1", "state2") and p.numel() >= 1e5):
                tracker.mark_host(val)  # cudaMallocManaged pages, outside the torch allocator
                continue
            if key in ("qmap1", "qmap2"):
                continue
            tracker.annotate(val, f"optim:{key}:{pname}")


def _top_tensors(records: list[Any], step: int, top: int) -> tuple[list[TopTensor], dict[str, int]]:
    groups: dict[tuple, list[int]] = {}
    breakdown: dict[str, int] = defaultdict(int)
    for r in records:
        phase = "setup" if r.step == 0 else ("prev_step" if r.step < step else r.sub_phase)
        breakdown[phase] += r.nbytes
        key = (r.shape, r.dtype, _label_group(r.op), phase, r.nbytes)
        g = groups.setdefault(key, [0])
        g[0] += 1
    ordered = sorted(groups.items(), key=lambda kv: (-kv[0][4], -kv[1][0]))
    out = [
        TopTensor(shape=list(k[0]), dtype=k[1], bytes=k[4], op=k[2], phase=k[3], count=v[0])
        for k, v in ordered[:max(top, 0)]
    ]
    return out, dict(breakdown)


def _phase_peaks(sub_peaks: dict[str, int]) -> dict[str, int]:
    from .tracker import PHASE_OF_SUB

    peaks = {p: 0 for p in TRACE_PHASES}
    for sub, val in sub_peaks.items():
        phase = PHASE_OF_SUB.get(sub)
        if phase in peaks:
            peaks[phase] = max(peaks[phase], val)
    return peaks


def _measured_fields(built: Any, plan: Plan, measured: Any, sub_peaks: dict[str, int]) -> dict[str, Any]:
    """The TraceResult fields a measured step fills alike on fake tensors (`run_fake`) and on a device
    (cuda.py `run_on_device`): the model, the plan's shape and the measured step's peaks."""
    from .build import padded_seq_len
    from .tracker import PHASE_OF_SUB

    return {
        "arch": built.arch,
        "layers": built.layers,
        "extrapolated": False,
        "seq_len": padded_seq_len(plan),
        "batch_size": plan.per_device_train_batch_size,
        "peak_allocated_bytes": measured.peak_bytes,
        "peak_phase": PHASE_OF_SUB.get(measured.peak_sub_phase, "forward"),
        "peak_sub_phase": measured.peak_sub_phase,
        "phase_peaks": _phase_peaks(sub_peaks),
        "sub_phase_peaks": sub_peaks,
        "static_bytes": measured.start_bytes,
        "end_bytes": measured.end_bytes,
    }


def run_fake(config: dict[str, Any], plan: Plan, *, layers: int | None = None, steps: int = 2, top: int = 10,
             measure_step1: bool = False) -> TraceResult:
    require_trace_extra(plan)
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}.")
    import torch

    from .build import build_model, build_reference, count_parameters, materialize
    from .patches import quiet_library_warnings, trace_patches
    from .tracker import PHASE_OF_SUB, StorageTracker, tracked_backward, tracking_fake_mode
    from .trainer import TrainerStep, image_grids
    from .vision import vision_patches

    t0 = time.perf_counter()
    with quiet_library_warnings():
        built = build_model(config, plan, layers=layers)
        ref = build_reference(config, plan, layers=layers)
    tracker = StorageTracker()
    primed = steps >= 2 and not measure_step1
    stats: dict[int, Any] = {}
    try:
        grids = image_grids(built, plan)
        with trace_patches(bnb4=bool(built.bnb4), bnb8=bool(built.bnb8), bnb_optim=plan.optim in _8BIT_OPTIMS), \
                (vision_patches(grids) if grids else contextlib.nullcontext()), \
                tracking_fake_mode(tracker), tracked_backward(tracker):
            tracker.calibrate()
            materialize(built, plan)
            _annotate_model(tracker, built)
            trainable, total = count_parameters(built.model)
            if ref is not None:
                materialize(ref, plan)
                for name, p in ref.model.named_parameters():
                    tracker.annotate(p, f"ref_param:{name}")
            load_bytes = tracker.current
            trainer = TrainerStep(built, plan, tracker, torch.device("cpu"), ref=ref)
            try:
                for i in range(1, steps + 1):
                    stats[i] = trainer.prime_step(i) if (i == 1 and primed) else trainer.step(i)
                    if i == 1:
                        _after_first_optimizer_step(tracker, trainer, built, plan)
            finally:
                trainer.close()
            measured = stats[steps]
            live = tracker.live_at(measured.peak_t)
    except torch._subclasses.fake_tensor.DataDependentOutputException as exc:
        raise NotImplementedError(
            f"{built.arch}: the training step reads tensor values ({exc}); fake tensors have none, so this "
            "configuration cannot be traced."
        ) from None
    except torch._subclasses.fake_tensor.DynamicOutputShapeException as exc:
        raise NotImplementedError(
            f"{built.arch}: an op has a data-dependent output shape ({exc}); this configuration cannot be traced."
        ) from None

    sub_peaks = {k: v for k, v in measured.sub_peaks.items() if k in PHASE_OF_SUB and PHASE_OF_SUB[k] != "setup"}
    step1 = stats[1]
    if steps == 1:
        step1_peak, step1_measured = step1.peak_bytes, True
    elif primed:
        delta = measured.start_bytes - step1.start_bytes  # optimizer state created by step 1
        fwd_bwd = [v - delta for k, v in sub_peaks.items() if PHASE_OF_SUB[k] in ("forward", "loss", "backward")]
        step1_peak, step1_measured = max([step1.peak_bytes, *fwd_bwd]), False
    else:
        step1_peak, step1_measured = step1.peak_bytes, True
    top_list, breakdown = _top_tensors(live, steps, top)
    return TraceResult(
        **_measured_fields(built, plan, measured, sub_peaks),
        device="fake",
        step1_peak_bytes=step1_peak,
        step1_measured=step1_measured,
        load_bytes=load_bytes,
        trainable_params=trainable,
        all_params=total,
        peak_breakdown=breakdown,
        top_tensors=top_list,
        notes=built.notes + (ref.notes if ref is not None else []) + _fake_notes(plan, built, primed) + ([
            f"Images: {len(grids)} per micro-batch, grid (t, h, w) {grids[0]} each; the vision code's value reads "
            "(grid_thw, attention windows, per-image splits) are answered from these grids (trace/vision.py), and "
            "input_ids hold no image tokens (masked_scatter's shapes and buffers are the same)."] if grids else []),
        wall_s=round(time.perf_counter() - t0, 3),
        aten_ops=tracker.op_count,
        versions=versions(),
    )


# ---------------------------------------------------------------------------------------------------------------
# extrapolation in layers
# ---------------------------------------------------------------------------------------------------------------

def run_extrapolated(config: dict[str, Any], plan: Plan, *, layers_a: int = 1, layers_b: int = 2) -> TraceResult:
    if not (0 < layers_a < layers_b):
        raise ConfigError(f"need 0 < layers_a < layers_b, got {layers_a}, {layers_b}.")
    target = _num_layers(config)
    a = run_fake(config, plan, layers=layers_a)
    b = run_fake(config, plan, layers=layers_b)
    span = layers_b - layers_a

    def ex(va: int, vb: int) -> int:
        return int(round(va + (vb - va) * (target - layers_a) / span))

    subs = {k: ex(a.sub_phase_peaks.get(k, 0), b.sub_phase_peaks[k]) for k in b.sub_phase_peaks}
    phases = _phase_peaks(subs)
    peak_sub = max(subs, key=lambda k: subs[k])
    peak_phase = max(phases, key=lambda k: phases[k])
    keys = set(a.peak_breakdown) | set(b.peak_breakdown)
    breakdown = {k: ex(a.peak_breakdown.get(k, 0), b.peak_breakdown.get(k, 0)) for k in keys}
    note = (f"Extrapolated linearly in layers from traces with {layers_a} and {layers_b} decoder layers to {target}; "
            f"top_tensors and peak_breakdown shapes are from the {layers_b}-layer trace.")
    return TraceResult(
        arch=b.arch,
        layers=target,
        extrapolated=True,
        device=b.device,
        seq_len=b.seq_len,
        batch_size=b.batch_size,
        peak_allocated_bytes=max(phases.values()),
        peak_phase=peak_phase,
        peak_sub_phase=peak_sub,
        phase_peaks=phases,
        sub_phase_peaks=subs,
        step1_peak_bytes=ex(a.step1_peak_bytes, b.step1_peak_bytes),
        step1_measured=b.step1_measured,
        static_bytes=ex(a.static_bytes, b.static_bytes),
        end_bytes=ex(a.end_bytes, b.end_bytes),
        load_bytes=ex(a.load_bytes, b.load_bytes),
        trainable_params=ex(a.trainable_params, b.trainable_params),
        all_params=ex(a.all_params, b.all_params),
        peak_breakdown=breakdown,
        top_tensors=b.top_tensors,
        notes=[note, *b.notes],
        wall_s=round(a.wall_s + b.wall_s, 3),
        aten_ops=a.aten_ops + b.aten_ops,
        versions=b.versions,
    )


# ---------------------------------------------------------------------------------------------------------------
# real CUDA run
# ---------------------------------------------------------------------------------------------------------------

def run_real_cuda(config: dict[str, Any], plan: Plan, *, layers: int | None = None, steps: int = 2) -> TraceResult:
    require_trace_extra(plan)
    import torch

    if not torch.cuda.is_available():
        raise TrainfitError("no CUDA device: --device cuda needs a GPU and a CUDA build of torch. "
                            "Use --device cpu (the fake-tensor trace) instead.")
    from .cuda import run_on_device

    return run_on_device(config, plan, layers=layers, steps=steps,
                         device=torch.device("cuda", torch.cuda.current_device()))
