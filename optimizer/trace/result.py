"""What one oracle run reports. Pure pydantic: importable without torch."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..schema import PHASES, Moment

__all__ = ["TraceResult", "TopTensor", "TRACE_PHASES", "TRACE_SUB_PHASES", "MOMENT_OF_SUB"]

# The phases of a step, as the memory model names them (schema.Phase).
TRACE_PHASES = PHASES
# Finer instants, in step order, each inside one of TRACE_PHASES (see optimizer/trace/tracker.py).
TRACE_SUB_PHASES = (
    "vision_fwd",   # forward (vision-language models): the frozen vision tower on the images, under no grad
    "fwd",          # forward: step start (inputs) .. the lm_head is called
    "lm_head",      # loss: the lm_head matmul (+ LLaMA-Factory's upcast_lmhead_output hook)
    "loss_ce",      # loss: logits.float() + cross-entropy, until the model's forward returns
    "out_fp32",     # loss: accelerate's convert_outputs_to_fp32 of the model outputs (AMP only)
    "ref_fwd",      # loss (DPO): the reference model's decoder layers under no_grad
    "ref_loss",     # loss (DPO): the reference logits + log-softmax, then the preference loss
    "bwd_loss",     # backward: loss.backward() until the logits' gradient exists (CE backward)
    "bwd_lm_head",  # backward: logits grad .. the gradient of the lm_head input exists
    "bwd_layers",   # backward: final norm + decoder layers (+ recompute) + embedding
    "opt_unscale",  # optimizer: fp16 GradScaler unscale
    "opt_clip",     # optimizer: clip_grad_norm_
    "opt_step",     # optimizer: optimizer.step()
    "opt_zero_grad",  # optimizer: zero_grad(set_to_none=True)
)
# The memory model's moment (schema.Moment) each sub-phase's peak stands for. bwd_layers spans the decoder
# layers' backward and, under full fine-tuning, the embedding gradient at its end.
MOMENT_OF_SUB: dict[str, Moment] = {
    "vision_fwd": Moment.VISION_FORWARD,
    "fwd": Moment.FORWARD_LAST_LAYER,
    "lm_head": Moment.LOSS_FORWARD,
    "loss_ce": Moment.LOSS_FORWARD,
    "out_fp32": Moment.LOSS_FORWARD,
    "ref_fwd": Moment.REFERENCE_FORWARD,
    "ref_loss": Moment.REFERENCE_FORWARD,
    "bwd_loss": Moment.CE_BACKWARD,
    "bwd_lm_head": Moment.LM_HEAD_BACKWARD,
    "bwd_layers": Moment.LAYER_BACKWARD_TOP,
    "opt_unscale": Moment.OPTIMIZER_STEP,
    "opt_clip": Moment.OPTIMIZER_STEP,
    "opt_step": Moment.OPTIMIZER_STEP,
    "opt_zero_grad": Moment.OPTIMIZER_STEP,
}


class TopTensor(BaseModel):
    """A tensor live at the step's peak (identical tensors are grouped: `count` of them, `bytes` each)."""

    model_config = ConfigDict(extra="forbid")
    shape: list[int] = Field(description="Tensor shape.")
    dtype: str = Field(description="torch dtype without the `torch.` prefix.")
    bytes: int = Field(description="Allocator bytes of one such tensor (storage size rounded up to 512 B).")
    op: str = Field(description="The aten op that allocated it, or `param:`/`buffer:`/`optim:` + a name.")
    phase: str = Field(description="Where it was allocated: setup, prev_step, or a sub-phase of this step.")
    count: int = Field(default=1, description="How many tensors share shape, dtype, op and phase.")


class TraceResult(BaseModel):
    """One training step of a LLaMA-Factory run, measured on fake tensors (or on a real GPU by `run_cuda`)."""

    model_config = ConfigDict(extra="forbid")

    arch: str = Field(description="config.json model_type (and the model name when known).")
    layers: int = Field(description="Decoder layers of the result (the layers run, or the target of an extrapolation).")
    extrapolated: bool = Field(default=False, description="Byte figures extrapolated linearly in layers from two runs.")
    device: str = Field(default="fake", description="`fake` (FakeTensorMode on the CPU) or the CUDA device name.")
    seq_len: int = Field(description="Padded sequence length (cutoff_len rounded up to a multiple of 8).")
    batch_size: int = Field(description="per_device_train_batch_size.")
    peak_allocated_bytes: int = Field(
        description="Peak of live allocated bytes in the measured step (max_memory_allocated)."
    )
    peak_phase: str = Field(description="forward, loss, backward or optimizer: where the peak happens.")
    peak_sub_phase: str = Field(default="", description="The finer instant of the peak (see TRACE_SUB_PHASES).")
    phase_peaks: dict[str, int] = Field(description="Peak live bytes per phase of the measured step.")
    sub_phase_peaks: dict[str, int] = Field(default_factory=dict, description="Peak live bytes per sub-phase.")
    step1_peak_bytes: int = Field(description="Peak of step 1 (no optimizer state during its forward/backward).")
    step1_measured: bool = Field(
        default=True,
        description="False when step 1's forward/backward was not run but derived from the measured step "
        "(its phase peaks minus the optimizer state, which step 1 does not have yet).",
    )
    static_bytes: int = Field(description="Live bytes at the start of the measured step (weights + optimizer state).")
    end_bytes: int = Field(default=0, description="Live bytes after the measured step: equals static_bytes (no leak).")
    load_bytes: int = Field(
        default=0, description="Live bytes after model load, before any step (weights, adapters, buffers)."
    )
    trainable_params: int = Field(description="Trainable parameters, as LLaMA-Factory's count_parameters prints them.")
    all_params: int = Field(description="All parameters, as LLaMA-Factory's count_parameters prints them.")
    peak_breakdown: dict[str, int] = Field(
        default_factory=dict,
        description="Bytes live at the peak grouped by where they were allocated (setup, prev_step, sub-phases).",
    )
    top_tensors: list[TopTensor] = Field(default_factory=list, description="Largest tensors live at the peak.")
    notes: list[str] = Field(default_factory=list, description="Where this run differs from a CUDA run.")
    wall_s: float = Field(description="Wall-clock seconds of the run (imports excluded).")
    aten_ops: int = Field(default=0, description="Aten ops dispatched (fake runs).")
    versions: dict[str, str] = Field(
        default_factory=dict, description="torch/transformers/peft/bitsandbytes/accelerate."
    )
    peak_reserved_bytes: int | None = Field(default=None, description="run_cuda: torch.cuda.max_memory_reserved().")
    nvml_used_bytes: int | None = Field(default=None, description="run_cuda: device memory used as NVML reports it.")
