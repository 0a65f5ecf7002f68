"""The training step, phase by phase: the terms of each moment and the peak (`estimate`)."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from ..models.arch import expert_numels, layer_linears
from ..schema import Arch, Estimate, MemoryTerm, Moment, Phase, PhasePeak, Plan
from ..units import MIB, alloc_bytes
from .allocator import CUBLAS_WORKSPACE_BYTES, device_peak_for, large_blocks_at, reserved_bytes
from .head import attention_mask_bytes, head_activations, shared_forward_bytes
from .layer import layer_forward
from .precision import FP32, Setting, setting_for
from .preference import preference_head, reference_weight_bytes
from .static import (
    adapter_bytes,
    base_weight_bytes,
    count_params,
    grad_bytes,
    optimizer_state_bytes,
    optimizer_step_temp_bytes,
    paged_state_bytes,
)
from .vision import vision_step

# ---------------------------------------------------------------------------------------------------
# The step, phase by phase
# ---------------------------------------------------------------------------------------------------

# memory/terms.py's hook: inside `terms.memoized()` each component below is computed once per setting of the knobs it
# declares (terms.COMPONENTS); outside it (the default) every call computes, so the numbers are the same either way.
_MEMO: ContextVar = ContextVar("trainfit_term_memo", default=None)


def _part(name: str, st: Setting, plan: Plan, fn):
    memo = _MEMO.get()
    return fn() if memo is None else memo.get(name, st, plan, fn)


def terms(*pairs: tuple[str, int, str]) -> list[tuple[str, int, str]]:
    return [(n, int(b), d) for n, b, d in pairs if b]


@dataclass(frozen=True, slots=True)
class StepMoment:
    """One instant of the step: its co-resident terms as (name, bytes, detail). A plain value (the search reads
    thousands of them); `peak()` is the PhasePeak the Estimate shows."""

    phase: Phase
    kind: Moment
    moment: str
    terms: list[tuple[str, int, str]]

    @property
    def total_bytes(self) -> int:
        return sum(t[1] for t in self.terms)

    def peak(self) -> PhasePeak:
        return PhasePeak(phase=self.phase, kind=self.kind, moment=self.moment,
                         terms=[MemoryTerm(name=n, bytes=b, detail=d) for n, b, d in self.terms])


@dataclass(frozen=True, slots=True)
class StepMoments:
    """Every instant of the step in one flat order (forward, loss, [reference], cross-entropy backward, top and
    bottom layer backward, lm_head backward, [embedding gradient], optimizer step) and what is not a moment's
    tensor: CUDA managed memory (paged optimizer states). The peak is the first moment of largest total, the
    same one `estimate`'s phase-by-phase maxima pick."""

    moments: list[StepMoment]
    managed_bytes: int
    setting: Setting
    grads_bytes: int


def step_moments(arch: Arch, plan: Plan, setting: Setting | None = None) -> StepMoments:
    """Every moment of one steady-state step of `plan` on `arch`, flat (StepMoments), as plain values: what
    `estimate` reports and what the search's term tables are read from (search/factored.py)."""
    st = setting or setting_for(arch, plan)
    L = arch.num_hidden_layers
    N = st.tokens
    weights = _part("weights", st, plan, lambda: base_weight_bytes(arch, st))
    adapters = _part("adapters", st, plan, lambda: adapter_bytes(arch, plan, st))
    states = _part("optimizer_states", st, plan, lambda: optimizer_state_bytes(arch, plan, st))
    grads = _part("grads", st, plan, lambda: grad_bytes(arch, plan, st))
    opt_tmp = _part("optimizer_step_temporaries", st, plan, lambda: optimizer_step_temp_bytes(arch, plan, st))
    workspace = CUBLAS_WORKSPACE_BYTES
    shared = _part("activations_shared", st, plan, lambda: shared_forward_bytes(arch, st))
    lay = _part("layer", st, plan, lambda: layer_forward(arch, st))
    lay_ng = (_part("layer_no_grad", st, plan, lambda: layer_forward(arch, st, no_grad=True))
              if st.gc and plan.use_reentrant_gc else lay)
    # [S] LLaMA-Factory model/model_utils/liger_kernel.py: stages other than pt/sft need the logits, so Liger's
    # fused linear cross-entropy is not applied (require_logits)
    hplan = plan.model_copy(update={"enable_liger_kernel": False}) if plan.pairwise else plan
    head = _part("head", st, hplan, lambda: head_activations(arch, hplan, st))
    pref = _part("preference", st, plan, lambda: preference_head(arch, plan, st, head)) if plan.pairwise else None
    # sdpa's 4-D mask (padded batch or neat_packing): live through the model forward; the bool mask that transformers
    # builds is then held by the checkpointed layers' saved inputs until their backward (without checkpointing it
    # dies with the forward); LLaMA-Factory's neat_packing mask is part of the batch, held all step
    mask = _part("attention_mask", st, plan, lambda: attention_mask_bytes(st))
    mask_held = mask if (st.gc or st.mask == "float") else 0
    mask_detail = (f"attention mask [{st.batch}, 1, {st.seq}, {st.seq}] "
                   + ("bool (padded batch)" if st.mask == "bool" else "compute dtype (neat_packing)"))
    ckpt = lay.input_bytes  # gradient checkpointing keeps each layer's input
    if st.gc:
        acts_all = L * ckpt
        fwd_layer = (L - 1) * ckpt + lay_ng.peak_bytes
        what = f"{L} checkpointed layer inputs [b, s, H]"
    else:
        acts_all = L * lay.saved_bytes
        fwd_layer = (L - 1) * lay.saved_bytes + lay.peak_bytes
        what = f"{L} layers x saved activations"
    weight_terms = (
        ("weights_decoder_linears", weights["decoder_linears"], _weights_detail(st)),
        ("weights_embed_tokens", weights["embed_tokens"],
         f"V x H, {_dtype_name(st.embed_w, arch)}" + (" (tied lm_head)" if arch.tie_word_embeddings else "")),
        ("weights_lm_head", weights["lm_head"], "V x H (untied)"),
        ("weights_norms", weights["norms"], "RMSNorm weights"),
        ("weights_vision_tower", weights.get("vision_tower", 0),
         "frozen vision tower + merger, checkpoint dtype"),
        ("weights_experts", weights.get("experts", 0), f"all {arch.num_experts} experts + router per layer, "
         f"{'trainable' if st.full else 'checkpoint dtype'} (3-D parameters: not quantized, not LoRA targets)"),
        ("adapters", adapters, "LoRA A/B (fp32) + trainable copies of additional_target" if not st.full else ""),
        ("optimizer_states", states, plan.optim),
        ("cublas_workspace", workspace, "cuBLAS workspace of the forward thread"),
        ("reference_model_weights", _part("reference_weights", st, plan, lambda: reference_weight_bytes(arch, st, plan))
         if plan.pairwise else 0, "DPO reference: a frozen copy of the model, checkpoint dtype"),
    )
    static = terms(*weight_terms)
    # vision-language models with images (memory/vision.py): the batch's image inputs all step; the tower's saved
    # tensors from its forward to the end of backward; its outputs through the decoder forward and the loss
    vis = vision_step(arch, plan, st)
    vis_in = ("vision_inputs", vis.inputs_bytes if vis else 0,
              f"pixel_values fp32 of {vis.images} image(s), {vis.patches} patches + mrope position ids" if vis else "")
    vis_saved = ("vision_activations", vis.saved_bytes if vis else 0,
                 "the vision tower's saved tensors (its patch embedding output requires grad) + the text embedding "
                 "output" if vis else "")
    # [S] torch autocast `cached_cast`: the compute-dtype copy of a grad-requiring leaf weight is cached until
    # the outermost autocast region (the model forward) exits. Without checkpointing those copies are saved
    # for backward anyway (counted in the layers' saved tensors); with checkpointing the recompute runs in its
    # own region, so only the first forward holds every layer's copies, until the loss is computed.
    cache = 0
    if st.full and st.amp and st.gc and st.train_w != st.c:
        cache = L * sum(alloc_bytes(m.weight_numel * st.c) for m in layer_linears(arch))
        # MoE: the router's F.linear is autocast too; the experts' grouped_mm is not (it casts its input to the
        # weight dtype instead: transformers integrations/moe.py::_grouped_mm), so no expert copy is cached
        cache += L * alloc_bytes(expert_numels(arch)[2] * st.c)
    # Gradient accumulation: from the second micro-batch on, every trainable tensor's .grad from the earlier
    # micro-batches is live through the forward, the loss and the backward ([T] traced with two micro-batches;
    # HF Trainer zeroes gradients only after the optimizer step). The third and later micro-batches repeat the
    # second, and the later micro-batch's peaks are never below the first's, so they are the phases' peaks.
    later = plan.gradient_accumulation_steps > 1
    held = ("accumulated_grads", grads if later else 0, "gradients (.grad) of the earlier micro-batches")

    def forward_saved(norm_detail: str = "") -> tuple[tuple[str, int, str], ...]:
        """What the forward leaves saved for backward, held from the loss to the lm_head's backward."""
        return (("activations_shared", shared, ""), ("attention_mask", mask_held, mask_detail),
                ("activations_layers", acts_all, what),
                ("final_norm_saved", head.final_norm_saved, norm_detail),
                ("lm_head_weight_cast", head.weight_cast, "lm_head weight in the autocast dtype, saved for backward"))

    vision_forward = None
    if vis is not None:
        vision_forward = StepMoment(phase=Phase.FORWARD, kind=Moment.VISION_FORWARD,
                                    moment="vision tower's last block (MLP)", terms=static + terms(
            vis_in,
            ("vision_activations", vis.saved_bytes - vis.merger_saved_bytes,
             "saved tensors of the patch embedding and every block + the text embedding output"),
            ("vision_forward_working", vis.forward_working_bytes, "pixel_values in the tower dtype, residual stream, "
             "norm2 output, gated product and down_proj output of the running block"),
            held,
        ))
    forward = StepMoment(phase=Phase.FORWARD, kind=Moment.FORWARD_LAST_LAYER, moment="last decoder layer's forward",
                        terms=static + terms(
        vis_in, vis_saved,
        ("vision_outputs", vis.outputs_forward_bytes if vis else 0,
         "tower output + merged image features + the masked_scatter source"),
        ("activations_shared", shared, "RoPE cos/sin" + (" + causal mask" if st.attn == "eager" else "")),
        ("attention_mask", mask, mask_detail),
        ("activations_layers", fwd_layer, f"{L - 1} earlier layers + the running layer's peak"),
        ("autocast_weight_cache", cache, "bf16 copies of the fp32 decoder weights, cached by autocast"),
        held,
    ))
    loss = StepMoment(phase=Phase.LOSS, kind=Moment.LOSS_FORWARD,
                     moment="cross-entropy forward (fp32 logits + log-softmax)", terms=static + terms(
        vis_in, vis_saved,
        ("vision_outputs", vis.outputs_loss_bytes if vis else 0,
         "tower output + merged image features in the model output" + (" (+ fp32 copies)" if st.amp else "")),
        *forward_saved("final RMSNorm saved tensors (+ lm_head input when it trains)"),
        ("logits_and_loss", pref.loss_peak_extra if pref else max(head.loss_peak_extra, head.forward_end_extra),
         f"logits [{N}, {arch.vocab_size}] + fp32 upcast + log-softmax"),
        ("autocast_weight_cache", cache, "bf16 copies of the fp32 decoder weights, cached by autocast"),
        held,
    ))
    reference = None
    if pref is not None and pref.reference_extra:
        reference = StepMoment(phase=Phase.LOSS, kind=Moment.REFERENCE_FORWARD,
                              moment="DPO reference forward (no_grad) + its log-softmax", terms=static + terms(
            *forward_saved(),
            ("policy_logits_and_logps", pref.held_after_loss, f"fp32 logits [{N}, {arch.vocab_size}] (metrics) + "
             "saved log-softmax"),
            ("reference_forward", pref.reference_extra, "the reference's no_grad layer or its logits + log-softmax"),
            held,
        ))
    bw_ws = ("cublas_workspace_backward", workspace, "cuBLAS workspace of the autograd thread")
    ce = StepMoment(phase=Phase.BACKWARD, kind=Moment.CE_BACKWARD, moment="cross-entropy backward",
                    terms=static + terms(
        bw_ws, vis_in, vis_saved,
        *forward_saved(),
        ("loss_saved", pref.loss_saved if pref else head.loss_saved, "saved log-softmax fp32 [N, V]"),
        ("loss_backward", pref.ce_backward_extra if pref else head.ce_backward_extra,
         "dense fp32 [N, V] gradients of " + ("gather, log_softmax and the [:, :-1] slice" if pref else
                                              "nll_loss and log_softmax")),
        held,
    ))
    # Decoder layers' backward, top layer first. The layer's own backward peak comes from replaying its
    # tape (`Walk.backward`); parameter gradients of the layers above persist (LoRA: small; full: large),
    # so check the top layer (most activations) and the bottom one (most gradients).
    V, H = arch.vocab_size, arch.hidden_size
    vh_grad = alloc_bytes(V * H * st.train_w)
    head_grads = 0
    if st.full:
        # tied: the lm_head's share of the shared weight's gradient waits in autograd's input buffer for the
        # embedding's share; untied: lm_head.grad is already stored. Plus the final norm's weight gradient.
        head_grads = vh_grad + alloc_bytes(H * st.train_w)
    # a later micro-batch: the layers' new parameter gradients are added into .grad as they appear (transient,
    # `backward_peak_accum_bytes`), and only the tied lm_head share waiting for the embedding's is new
    bwd_peak = lay.backward_peak_accum_bytes if later else lay.backward_peak_bytes
    left = 0 if later else lay.param_grad_bytes
    if later:
        head_grads = vh_grad if st.full and arch.tie_word_embeddings else 0
    if st.gc:
        # reentrant checkpointing: recompute the layer (its input is the kept checkpoint), then backward
        # through it while the recomputed output is still referenced
        per = max(lay.peak_bytes - lay.input_bytes, bwd_peak + lay.output_bytes)
        top = L * ckpt + per
        bottom = ckpt + per + (L - 1) * left
        layer_moment = "a decoder layer's recompute + backward"
    else:
        top = (L - 1) * lay.saved_bytes + bwd_peak
        bottom = bwd_peak + (L - 1) * left
        layer_moment = "a decoder layer's backward"

    def layer_backward(kind: Moment, which: str, activations: int, detail: str) -> PhasePeak:
        """The top or bottom decoder layer's backward: `activations` in the layers, the head's gradients held."""
        return StepMoment(phase=Phase.BACKWARD, kind=kind, moment=f"{which} {layer_moment}", terms=static + terms(
            bw_ws, vis_in, vis_saved, ("activations_shared", shared, ""), ("attention_mask", mask_held, mask_detail),
            ("activations_layers", activations, detail),
            ("grads", head_grads, "gradients of the lm_head/final norm"),
            held,
        ))

    lbs = (
        layer_backward(Moment.LAYER_BACKWARD_TOP, "top", top,
                       "saved activations + the layer's backward (gradients, freed inputs)"),
        layer_backward(Moment.LAYER_BACKWARD_BOTTOM, "bottom", bottom, "the first layer's backward"),
    )
    lmb = StepMoment(phase=Phase.BACKWARD, kind=Moment.LM_HEAD_BACKWARD, moment="lm_head backward",
                     terms=static + terms(
        bw_ws, vis_in, vis_saved,
        *forward_saved(),
        ("lm_head_backward", head.lm_head_backward_extra, "logits gradient, input gradient (+ weight gradient)"),
        held,
    ))
    candidates = [lmb]
    if st.full:
        # [T] the end of backward: the embedding's gradient (embedding_dense_backward, [V, H]) is summed with
        # the tied lm_head's share before AccumulateGrad stores it. Under autocast that share is the fp32
        # output of the weight cast's backward, exclusively owned, so autograd's InputBuffer adds in place (2
        # buffers); without autocast the sum is a new buffer (3). Untied, the gradient is stored directly.
        # All other gradients exist by then; the activations are gone.
        # In a later micro-batch every .grad exists (`held`) and the new embedding gradient is added into it in
        # place: tied, the same 2 (3) buffers; untied, the new [V, H] gradient is one more buffer.
        emb = (2 if st.amp else 3) * vh_grad if arch.tie_word_embeddings else (vh_grad if later else 0)
        end = StepMoment(phase=Phase.BACKWARD, kind=Moment.EMBEDDING_GRAD_END,
                        moment="embedding gradient (end of backward)", terms=static + terms(
            bw_ws,
            ("grads", 0 if later else grads - (vh_grad if arch.tie_word_embeddings else 0), "all other gradients"),
            ("embedding_grad_transient", emb, "the new embedding gradient (tied: lm_head share + embedding share "
             "(+ their sum))" if later else "tied weight: lm_head share + embedding share (+ their sum)"),
            ("hidden_grad", alloc_bytes(N * H * st.stream), "gradient of the embedding output"),
            held,
        ))
        candidates.append(end)
    optimizer = StepMoment(phase=Phase.OPTIMIZER, kind=Moment.OPTIMIZER_STEP,
                          moment="clip_grad_norm_ + optimizer.step()", terms=static + terms(
        bw_ws, vis_in,
        ("grads", grads, "one gradient per trainable tensor"),
        ("attention_mask", mask if st.mask == "float" else 0, mask_detail),
        ("optimizer_step_temporaries", opt_tmp,
         "clip norms" + (" + foreach sqrt(exp_avg_sq)" if plan.optim == "adamw_torch" else "")),
    ))
    paged = _part("paged_states", st, plan, lambda: paged_state_bytes(arch, plan, st))
    flat = [*([vision_forward] if vision_forward is not None else []), forward, loss,
            *([reference] if reference is not None else []), ce, *lbs, *candidates, optimizer]
    return StepMoments(flat, paged, st, grads)


def device_peak(arch: Arch, plan: Plan, setting: Setting | None = None) -> int:
    """The device peak `estimate` reports (`device_peak_bytes`), without building the Estimate: the first moment of
    largest total, its allocator blocks, the managed bytes. What the search judges each plan by (search/space.py);
    tests/test_memory.py checks it equals estimate's on the accuracy grid."""
    sm = step_moments(arch, plan, setting)
    peak = max(sm.moments, key=lambda p: p.total_bytes)
    # the blocks are the plan's own setting's (as estimate's), reused when the caller passed none
    own = sm.setting if setting is None else None
    return device_peak_for(peak.total_bytes, large_blocks_at(arch, plan, peak.kind, setting=own), sm.managed_bytes)


def estimate(arch: Arch, plan: Plan, setting: Setting | None = None, all_moments: bool = False) -> Estimate:
    """The memory model of one steady-state step of `plan` on `arch` (`setting`: the dtypes the step computes in,
    when an engine changes them; `all_moments`: list every backward moment, not only the largest, for an engine
    that replaces terms: optimizer/distributed/memory.py). Each phase shows its largest moment (the first of
    equal totals); the peak is the largest phase."""
    sm = step_moments(arch, plan, setting)
    st = sm.setting
    by_kind = {m.kind: m for m in sm.moments}
    forward, ce = by_kind[Moment.FORWARD_LAST_LAYER], by_kind[Moment.CE_BACKWARD]
    if Moment.VISION_FORWARD in by_kind:
        forward = max(by_kind[Moment.VISION_FORWARD], forward, key=lambda p: p.total_bytes)
    optimizer = by_kind[Moment.OPTIMIZER_STEP]
    loss = by_kind[Moment.LOSS_FORWARD]
    if Moment.REFERENCE_FORWARD in by_kind:
        loss = max(loss, by_kind[Moment.REFERENCE_FORWARD], key=lambda p: p.total_bytes)
    lbs = [by_kind[Moment.LAYER_BACKWARD_TOP], by_kind[Moment.LAYER_BACKWARD_BOTTOM]]
    lb = max(lbs, key=lambda p: p.total_bytes)
    rest = [by_kind[k] for k in (Moment.LM_HEAD_BACKWARD, Moment.EMBEDDING_GRAD_END) if k in by_kind]
    backward = max([ce, lb, *rest], key=lambda p: p.total_bytes)
    phases = [forward, loss, *([ce, *lbs, *rest] if all_moments else [backward]), optimizer]
    peak = max(phases, key=lambda p: p.total_bytes)
    trainable, all_params = _part("params", st, plan, lambda: count_params(arch, plan))
    large = large_blocks_at(arch, plan, peak.kind)
    reserved = reserved_bytes(peak.total_bytes, large)
    paged = sm.managed_bytes
    notes = _notes(arch, plan, st, sm.grads_bytes)
    if Moment.VISION_FORWARD in by_kind:
        notes.append(_vision_note(arch, plan, st, by_kind[Moment.VISION_FORWARD].total_bytes))
    return Estimate(
        arch=arch.name,
        trainable_params=trainable,
        all_params=all_params,
        tokens_per_micro_batch=st.tokens,
        phases=[p.peak() for p in phases],
        peak_phase=peak.phase,
        peak_allocated_bytes=peak.total_bytes,
        peak_reserved_bytes=reserved + paged,
        device_peak_bytes=device_peak_for(peak.total_bytes, large, paged),
        notes=notes,
    )


def _vision_note(arch: Arch, plan: Plan, st: Setting, forward_bytes: int) -> str:
    """What the images cost: the vision forward's peak and what its tower keeps (memory/vision.py)."""
    vis = vision_step(arch, plan, st)
    assert vis is not None and arch.vision is not None
    m2 = arch.vision.spatial_merge_size ** 2
    held = (f"with gradient checkpointing PEFT's enable_input_require_grads makes the frozen tower's patch embedding "
            f"output require grad, so {vis.saved_bytes / MIB:,.1f} MiB of its tensors stay saved until the end of "
            "backward" if st.gc else "without gradient checkpointing the frozen tower saves nothing for backward")
    return (f"images: {vis.images} per micro-batch ({plan.images_per_sample} per sample at image_max_pixels "
            f"{plan.image_max_pixels:,}), {vis.patches:,} patches through the vision tower, {vis.patches // m2:,} "
            f"image tokens in its cutoff_len-long rows; vision forward peak {forward_bytes / MIB:,.1f} MiB (the "
            f"tower's last block); {held}")


def _dtype_name(nbytes: int, arch: Arch) -> str:
    return "fp32" if nbytes == FP32 else {"bfloat16": "bf16", "float16": "fp16"}.get(arch.torch_dtype, "16-bit")


def _weights_detail(st: Setting) -> str:
    if st.full:
        return "decoder Linear weights, fp32 masters" if st.train_w == 4 else "decoder Linear weights, bf16"
    if st.quant == 4:
        return "bitsandbytes 4-bit: packed + absmax" + (" (double-quantized)" if st.double_quant else "")
    if st.quant == 8:
        return "bitsandbytes LLM.int8: int8 + row scales"
    return "decoder Linear weights, checkpoint dtype"


def context_window_problem(cutoff_len: int, max_position_embeddings: int) -> str:
    """The one wording (estimate's note, check's pitfall) for a cutoff_len past the trained context window."""
    return (f"cutoff_len {cutoff_len} exceeds the model's context window (max_position_embeddings "
            f"{max_position_embeddings}): positions past {max_position_embeddings} are untrained (RoPE), so samples "
            f"that long train on positions the model never saw; set cutoff_len <= {max_position_embeddings}")


def _notes(arch: Arch, plan: Plan, st: Setting, grads: int) -> list[str]:
    notes = [f"sequence padded to {st.seq} tokens (cutoff_len {plan.cutoff_len} rounded up to a multiple of 8); "
             "the peak assumes a micro-batch of maximum-length samples"]
    if arch.max_position_embeddings is not None and plan.cutoff_len > arch.max_position_embeddings:
        notes.append(context_window_problem(plan.cutoff_len, arch.max_position_embeddings))
    if plan.pairwise:
        notes.append(f"stage dpo: {plan.per_device_train_batch_size} pair(s) = {st.batch} sequences per forward "
                     "(chosen + rejected); "
                     + ("the reference pass (no_grad, "
                        + ("adapters disabled" if not st.full and plan.ref_model is None
                           else "a frozen copy of the model")
                        + ") runs while the policy's fp32 logits and log-softmax are held"
                        if plan.use_ref_model else f"{plan.pref_loss}: no reference"))
    if plan.gradient_accumulation_steps > 1:
        notes.append(
            f"gradient_accumulation_steps {plan.gradient_accumulation_steps}: from the second micro-batch on, the "
            f"{grads / MIB:,.1f} MiB of accumulated gradients (.grad) stay live through forward, loss and backward "
            "(counted in the peak; the same for any value > 1; gradient_accumulation_steps 1 saves them)"
        )
    gqa = arch.num_key_value_heads < arch.num_attention_heads
    if st.mask == "bool":
        notes.append("worst case with padding: a micro-batch holding a pad token (the collator pads to the longest "
                     "sample, rounded up to 8) makes sdpa take a bool [b, 1, s, s] mask (transformers "
                     "masking_utils.sdpa_mask), which each layer converts to an additive copy saved for backward"
                     + (" and K/V repeated to every head (sdpa_attention_forward)" if gqa else "")
                     + "; a batch without padding uses is_causal and needs less")
    if plan.packed:
        notes.append(f"packing: every row is {plan.cutoff_len} tokens (several samples, LLaMA-Factory's greedy "
                     "knapsack)" + ("; neat_packing: a block-diagonal [b, 1, s, s] mask in the compute dtype, held "
                                    "all step" if st.mask == "float" else
                                    "; neat_packing with fa2: no mask (varlen), per_device_train_batch_size must be 1"
                                    if plan.neat_packing and plan.flash_attn == "fa2" else ""))
    if plan.flash_attn == "fa2":
        notes.append("fa2 saves the same tensors as sdpa's flash kernel (q, k, v, out, logsumexp); modelled as sdpa")
    if plan.optim == "paged_adamw_8bit":
        notes.append("paged_adamw_8bit states live in CUDA managed memory: not in peak allocated, counted in "
                     "reserved/device")
    if not plan.bf16 and not plan.fp16 and not plan.pure_bf16:
        notes.append("no bf16/fp16: no autocast; LoRA runs in fp32 and the base in the checkpoint dtype")
    return notes
