"""The evaluation pass (HF Trainer.evaluate inside training): its own phase."""

from __future__ import annotations

from dataclasses import replace

from ..schema import Arch, Moment, Phase, PhasePeak, Plan
from ..units import alloc_bytes
from .allocator import CUBLAS_WORKSPACE_BYTES
from .head import attention_mask_bytes, head_activations, shared_forward_bytes
from .layer import layer_forward
from .precision import setting_for
from .static import adapter_bytes, base_weight_bytes, optimizer_state_bytes
from .step import StepMoment, terms
from .vision import vision_step

# ---------------------------------------------------------------------------------------------------
# The evaluation pass (HF Trainer.evaluate inside training): its own phase
# ---------------------------------------------------------------------------------------------------

def eval_estimate(arch: Arch, plan: Plan, *, eval_batch: int, compute_accuracy: bool = False,
                  predict_with_generate: bool = False, eval_accumulation_steps: int | None = None,
                  eval_samples: int = 0, max_new_tokens: int = 0) -> PhasePeak:
    """Peak allocated bytes of one evaluation batch during training (`max_new_tokens` counts only with
    `predict_with_generate`; the LLaMA-Factory reader supplies LLaMA-Factory's default).

    [S] transformers trainer.py::Trainer.prediction_step runs the model under torch.no_grad() (autocast
    as in training); the optimizer states stay allocated, gradients are None (zero_grad(set_to_none=True)).
    No activation is saved: the forward keeps one layer's working set at a time. The loss is computed as in
    training (logits, fp32 upcast, log-softmax: 10 bytes per logit momentarily) and accelerate converts the
    returned logits to fp32. Without compute_accuracy/predict_with_generate only the loss is kept
    (`prediction_loss_only`). compute_accuracy [S] LLaMA-Factory train/sft/metric.py::eval_logit_processor:
    argmax ids [b, s] int64 (+ the labels) accumulate on the GPU over the whole eval set unless
    eval_accumulation_steps moves them to the CPU. predict_with_generate: a KV cache of
    2 x L x b x (s + max_new_tokens) x kv_dim in the compute dtype [S] transformers cache_utils.DynamicCache.
    """
    ev = plan.model_copy(update={"per_device_train_batch_size": eval_batch})
    st = setting_for(arch, ev)
    N, L = st.tokens, arch.num_hidden_layers
    weights = sum(base_weight_bytes(arch, st).values())
    adapters = adapter_bytes(arch, plan, st)
    states = optimizer_state_bytes(arch, plan, st)
    lay = layer_forward(arch, st, no_grad=True)
    # + sdpa's 4-D mask of a padded (or neat_packing) batch, made once per forward (memory/head.py)
    layer_peak = lay.peak_bytes + shared_forward_bytes(arch, st) + attention_mask_bytes(st)
    head = head_activations(arch, ev, st)
    loss = head.loss_peak_extra  # logits, their fp32 copy and log-softmax (computed, not saved: no_grad)
    kept = 0
    detail = "loss only"
    if compute_accuracy:
        per_batch = 2 * alloc_bytes(N * 8)
        batches = max(1, -(-eval_samples // eval_batch)) if eval_samples else 1
        kept = per_batch * (min(batches, eval_accumulation_steps) if eval_accumulation_steps else batches)
        detail = ("argmax ids + labels of "
                  f"{batches if not eval_accumulation_steps else min(batches, eval_accumulation_steps)} batch(es)")
    kv = 0
    if predict_with_generate:
        kv = 2 * L * alloc_bytes(eval_batch * (st.seq + max_new_tokens) * arch.kv_dim * st.c)
        detail = f"KV cache for {st.seq} + {max_new_tokens} tokens"
    # images (memory/vision.py): under no_grad nothing of the vision tower is saved; its forward is a transient before
    # the decoder's, its outputs are held through the decoder forward and the loss, the image inputs all pass
    vis = vision_step(arch, ev, replace(st, gc=False))
    fwd_out, loss_out = (vis.outputs_forward_bytes, vis.outputs_loss_bytes) if vis else (0, 0)
    work = max(layer_peak + kv + fwd_out, loss + loss_out, vis.forward_working_bytes if vis else 0)
    moment = f"evaluation batch of {eval_batch} ({detail})"
    return StepMoment(phase=Phase.EVAL, kind=Moment.EVAL, moment=moment, terms=terms(
        ("weights", weights, "model weights"),
        ("adapters", adapters, ""),
        ("optimizer_states", states, "kept during evaluation"),
        ("cublas_workspace", CUBLAS_WORKSPACE_BYTES, ""),
        ("vision_inputs", vis.inputs_bytes if vis else 0, "pixel_values fp32 + mrope position ids"),
        ("eval_forward", work, "one layer at a time under no_grad, or the logits + loss"
         + (", or the vision tower's forward" if vis else "")),
        ("eval_kept_predictions", kept, detail),
    )).peak()
