"""Preference training (LLaMA-Factory `stage: dpo`): the head, the loss and the reference pass of one step.

[S] LLaMA-Factory 0.9.5 train/dpo/trainer.py::CustomDPOTrainer.get_batch_loss_metrics, in order:
1. `concatenated_forward(model, batch)`: the policy over the 2b sequences of b pairs (chosen, then rejected;
   data/collator.py::PairwiseDataCollatorWithPadding), no labels to the model, so no transformers loss:
   `model(**batch).logits.to(torch.float32)` (under AMP accelerate's convert_outputs_to_fp32 has already made
   the logits fp32), then train/trainer_utils.py::get_batch_logps:
   `torch.gather(logits[:, :-1, :].log_softmax(-1), 2, labels)`: an fp32 [2b, s-1, V] log-softmax, saved for
   backward. The fp32 logits stay referenced (the `chosen_logits`/`rejected_logits` metrics) until the loss
   is returned.
2. `compute_reference_log_probs`: the same forward under `torch.no_grad()`: LoRA without `ref_model` runs the
   policy inside PEFT's `disable_adapter()` (no second copy); full fine-tuning runs a second frozen model
   (trainer_utils.py::create_ref_model: load_model(is_trainable=False), the checkpoint dtype). Only [b]
   log-probs survive it; its transient peak (its fp32 logits + log-softmax) sits on top of everything the
   policy holds: the step's peak for large vocabularies.
3. the sigmoid (or orpo/simpo) loss on [b] tensors; `pref_ftx` reuses the chosen log-probs.
Backward: gather's backward (zeros [2b, s-1, V] fp32 + scatter), log_softmax's backward (fp32, the saved
output alive), the slice's backward (zeros [2b, s, V] fp32), the fp32 cast's backward, then the lm_head.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..schema import Arch, Plan
from ..units import alloc_bytes
from .head import HeadActivations, shared_forward_bytes
from .layer import layer_forward
from .precision import FP32, Setting
from .static import base_weight_bytes

__all__ = ["PreferenceHead", "preference_head", "reference_setting", "reference_weight_bytes"]


@dataclass(frozen=True)
class PreferenceHead:
    loss_peak_extra: int  # the policy's logits -> fp32 -> log-softmax, peak
    held_after_loss: int  # fp32 logits (metrics) + saved log-softmax, through the reference pass
    reference_extra: int  # the reference pass's transient peak (no_grad layers or its head)
    loss_saved: int  # saved log-softmax fp32 [2b, s-1, V]
    ce_backward_extra: int  # on top of loss_saved: the gather and log_softmax gradients, then the slice's


def reference_setting(st: Setting, plan: Plan) -> Setting:
    """The reference forward's dtypes: LoRA = the policy with its adapters disabled (no LoRA ops); full = a frozen
    copy in the checkpoint dtype (no fp32 masters, no quantization)."""
    if not st.full and plan.ref_model is None:
        return replace(st, targets=(), lora_dropout=False)
    return replace(st, full=False, targets=(), lora_dropout=False, quant=None, train_w=st.ckpt_w,
                   embed_w=st.ckpt_w, norm_w=st.ckpt_w, stream=st.ckpt_w, mixed16=False,
                   c=2 if st.amp else st.ckpt_w)


def reference_weight_bytes(arch: Arch, st: Setting, plan: Plan) -> int:
    """A second model resident for the whole run: full fine-tuning (or an explicit `ref_model`) with a reference
    loss. [S] create_ref_model + loader.py (is_trainable=False): the checkpoint dtype, fp32 cast to the compute
    dtype; trainfit assumes `ref_model` has the policy's architecture."""
    if not plan.use_ref_model or (not st.full and plan.ref_model is None):
        return 0
    return sum(base_weight_bytes(arch, reference_setting(st, plan)).values())


def _logits_to_logps(nv: int, n1v: int, logit_b: int, amp: bool, held: int) -> tuple[int, int]:
    """(peak, what stays): logits in `logit_b` (+ `held`, the lm_head input until the forward returns) -> fp32
    (accelerate's copy under AMP, `.to(float32)` otherwise) -> log_softmax of the [:, :-1] slice."""
    logits = alloc_bytes(nv * logit_b)
    f32 = alloc_bytes(nv * FP32)
    lsm = alloc_bytes(n1v * FP32)
    peak = logits + held
    if logit_b != FP32:
        peak = max(peak, logits + f32)
    peak = max(peak, f32 + lsm)
    return peak, f32 + lsm


def preference_head(arch: Arch, plan: Plan, st: Setting, head: HeadActivations) -> PreferenceHead:
    """The DPO head, loss and reference pass (module docstring). N = 2b*s tokens, N1 = 2b*(s-1)."""
    N, V, H = st.tokens, arch.vocab_size, arch.hidden_size
    nv, n1v = N * V, st.batch * (st.seq - 1) * V
    logit_b = st.c if st.amp else head.logit_bytes
    held_in = head.forward_end_extra - alloc_bytes(nv * logit_b)  # the lm_head input, held until forward returns
    peak, held = _logits_to_logps(nv, n1v, logit_b, st.amp, held_in)
    ref_extra = 0
    if plan.use_ref_model:
        rs = reference_setting(st, plan)
        ref_logit_b = rs.c if rs.amp else rs.embed_w
        lay = layer_forward(arch, rs, no_grad=True)
        layers = shared_forward_bytes(arch, rs) + lay.peak_bytes
        final = alloc_bytes(N * H * rs.stream)
        head_peak, _ = _logits_to_logps(nv, n1v, ref_logit_b, rs.amp, final)
        ref_extra = max(layers, head_peak)
    lsm = alloc_bytes(n1v * FP32)
    f32 = alloc_bytes(nv * FP32)
    # gather grad + log_softmax grad (saved output alive); then the slice's [N, V] zeros with the log_softmax grad
    ce_bwd = max(2 * lsm, f32)
    return PreferenceHead(loss_peak_extra=peak, held_after_loss=held, reference_extra=ref_extra, loss_saved=lsm,
                          ce_backward_extra=ce_bwd)
