"""The vision tower's forward on a micro-batch's images (Qwen2.5-VL, LoRA, tower and merger frozen).

Frozen is not transient with gradient checkpointing. PEFT 0.21 `PeftModel.__init__` calls
`model.enable_input_require_grads()` when the model's `is_gradient_checkpointing` is true (LLaMA-Factory enables
checkpointing before it adds the adapters), and transformers 5.24 `modeling_utils.py::enable_input_require_grads`
hooks the input embeddings of every PreTrainedModel inside the model: the text `embed_tokens` and the vision
tower's `patch_embed` (`Qwen2_5_VisionTransformerPretrainedModel._input_embed_layer`). The patch embedding's output
then requires grad, so autograd records the whole tower and keeps what its backward needs for the input gradient
(never the frozen Linears' inputs) until the tower's backward at the very end of `loss.backward()`. LLaMA-Factory's
checkpointing wrapper does not checkpoint the vision blocks (no trainable parameter: `_gradient_checkpointing_func`
runs them directly). [T] traced (optimizer/trace/vision.py) with 1-4 images, byte-exact per tensor.

Per block (transformers models/qwen2_5_vl/modeling_qwen2_5_vl.py, P patches, a = activation bytes):
- `attn.qkv` output [P, 3 Hv] (v stays a view of it, saved by sdpa) + the rotated q and k cast back [P, Hv] each;
- sdpa (flash / memory-efficient on CUDA) per attention segment of n patches: output [1, heads, n, hd] + fp32
  logsumexp [1, heads, n] (eager: the [1, heads, n, n] probabilities in fp32 and cast back); the segments are the
  images' frames in `fullatt_block_indexes` blocks, else the windows of `window_size` pixels
  (vision_utils.get_vision_window_index);
- `mlp`: gate and up outputs and the SiLU output [P, Iv] each (the product's operands);
- `norm1`/`norm2` (Qwen2_5_VLRMSNorm): the fp32 copy [P, Hv] + rsqrt [P, 1] fp32 each.
Per tower: the patch embedding output [P, Hv] (the grad-requiring leaf its AccumulateGrad node holds), the
window-permuted rotary cos and sin [P, hd] fp32, the merger's `ln_q` (fp32 copy + rsqrt) and its GELU input
[P / m^2, m^2 Hv], the window index and its argsort [P / m^2] int64. Besides: the text embedding output [b, s, H],
a leaf of the same hook that `masked_scatter` no longer hands to the first decoder layer, stays held too.

Without checkpointing nothing requires grad in the tower (no hook) and nothing of it is saved: its forward is a
transient working set and only its outputs reach the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.vision import plan_image_grid
from ..schema import Arch, Plan, VisionTower
from ..units import alloc_bytes
from .precision import FP32, Setting

__all__ = ["VisionStep", "vision_step", "window_lengths", "image_grids"]

_I64 = 8


def window_lengths(grid: tuple[int, int, int], merge: int, window_size: int, patch_size: int) -> list[int]:
    """Patches per attention window of one image, in transformers vision_utils.get_vision_window_index's order: each
    frame's merged grid (h / m, w / m) cut into windows of window_size / m / patch_size merged tokens a side (the
    last row and column of windows hold the remainders; empty windows are dropped by its unique_consecutive), times
    m^2 patches per merged token."""
    t, h, w = grid
    side = window_size // merge // patch_size
    gh, gw = h // merge, w // merge
    rows = [min(side, gh - i) for i in range(0, gh, side)]
    cols = [min(side, gw - j) for j in range(0, gw, side)]
    return [r * c * merge * merge for _ in range(t) for r in rows for c in cols]


def image_grids(v: VisionTower, plan: Plan) -> list[tuple[int, int, int]]:
    """The grids (t, h, w) of one micro-batch's images: images_per_sample per sequence, each a square of
    image_max_pixels (models.vision.plan_image_grid)."""
    if not plan.images_per_sample:
        return []
    grid = plan_image_grid(v, plan.image_max_pixels, plan.image_min_pixels)
    sequences = plan.per_device_train_batch_size * (2 if plan.pairwise else 1)
    return [grid] * (sequences * plan.images_per_sample)


@dataclass(frozen=True, slots=True)
class VisionStep:
    """What the images add to a step (bytes, allocator-rounded)."""

    images: int
    patches: int
    inputs_bytes: int  # pixel_values fp32 + image_grid_thw + mrope position ids + placeholder mask: all step
    saved_bytes: int  # the tower's saved tensors + the text embedding leaf: vision forward .. end of backward
    forward_working_bytes: int  # the tower's forward at its last block's MLP (on top of the saved tensors so far)
    merger_saved_bytes: int  # the part of saved_bytes the merger adds after the last block
    outputs_forward_bytes: int  # vision outputs held through the decoder forward
    outputs_loss_bytes: int  # vision outputs held by the model output through the loss (+ fp32 copies under AMP)


def _attention_bytes(v: VisionTower, grids: list[tuple[int, int, int]], a: int, eager: bool) -> int:
    """What attention saves per segment, over all blocks: sdpa's output + fp32 logsumexp, or eager's
    (modeling_qwen2_5_vl.py::eager_attention_forward) fp32 softmax output [1, heads, n, n] (softmax's backward) and
    its cast to the activation dtype (the probabilities @ v matmul's saved input)."""
    hd = v.hidden_size // v.num_heads

    def seg(n: int) -> int:
        if eager:
            return alloc_bytes(v.num_heads * n * n * FP32) + alloc_bytes(v.num_heads * n * n * a)
        return alloc_bytes(v.num_heads * n * hd * a) + alloc_bytes(v.num_heads * n * FP32)

    full = sum(seg(h * w) for t, h, w in grids for _ in range(t))
    windowed = sum(seg(n) for g in grids
                   for n in window_lengths(g, v.spatial_merge_size, v.window_size, v.patch_size))
    n_full = sum(1 for i in v.fullatt_block_indexes if 0 <= i < v.depth)
    return n_full * full + (v.depth - n_full) * windowed


def vision_step(arch: Arch, plan: Plan, st: Setting) -> VisionStep | None:
    """The images' share of one micro-batch's step (None: a text-only model or plan). See the module docstring."""
    v = arch.vision
    if v is None or not plan.images_per_sample:
        return None
    grids = image_grids(v, plan)
    m2 = v.spatial_merge_size ** 2
    P = sum(t * h * w for t, h, w in grids)  # patches
    Hv, Iv, hd, H = v.hidden_size, v.intermediate_size, v.hidden_size // v.num_heads, arch.hidden_size
    N = st.tokens
    a = st.c if st.amp else st.ckpt_w  # autocast dtype, else the tower's checkpoint dtype
    row = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    # [S] LLaMA-Factory data/collator.py::MultiModalDataCollatorForSeq2Seq: processor pixel_values (fp32),
    # image_grid_thw and the mrope position ids [3, b, s] from get_rope_index, moved to the device with the batch; the
    # model's get_placeholder_mask keeps input_ids == image_token_id [b, s, 1] (bool) for masked_scatter's backward
    inputs = (alloc_bytes(P * row * FP32) + alloc_bytes(len(grids) * 3 * _I64) + alloc_bytes(3 * N * _I64)
              + alloc_bytes(N))
    norm = alloc_bytes(P * Hv * FP32) + alloc_bytes(P * FP32)
    block = (alloc_bytes(P * 3 * Hv * a) + 2 * alloc_bytes(P * Hv * a) + 3 * alloc_bytes(P * Iv * a) + 2 * norm)
    merger = norm + alloc_bytes(P // m2 * Hv * m2 * a)
    tower = (v.depth * block + _attention_bytes(v, grids, a, st.attn == "eager") + alloc_bytes(P * Hv * a)
             + 2 * alloc_bytes(P * hd * FP32) + merger + 2 * alloc_bytes(P // m2 * _I64))
    saved = tower + alloc_bytes(N * H * st.stream) if st.gc else 0
    if not st.gc:
        merger = 0
    # the last block's MLP: pixel_values cast to the tower dtype (get_image_features' local), the residual stream,
    # norm2's output, the gated product and down_proj's output
    working = (alloc_bytes(P * row * a) + 3 * alloc_bytes(P * Hv * a) + alloc_bytes(P * Iv * a))
    if not st.gc:
        # nothing saved: the attention's rotary step is larger (apply_rotary_pos_emb_vision: q and k upcast to fp32,
        # then for k while q's result is held: k * cos, rotate_half(k), its product with sin and their sum, each
        # [P, Hv] fp32) beside the qkv output, the residual stream and norm1's output; or the MLP's three [P, Iv]
        rotary = alloc_bytes(P * 3 * Hv * a) + 7 * alloc_bytes(P * Hv * FP32)
        working = alloc_bytes(P * row * a) + 2 * alloc_bytes(P * Hv * a) + max(rotary, 3 * alloc_bytes(P * Iv * a))
    tokens = alloc_bytes(P // m2 * H * a)
    last = alloc_bytes(P * Hv * a)
    # the tower's last_hidden_state and the merged features (the model output's image_outputs) + masked_scatter's
    # source (torch.cat of the per-image splits, Qwen2_5_VLModel.forward's local) through the decoder forward;
    # under AMP accelerate's convert_to_fp32 copies the output's image tensors to fp32 too
    outputs_fwd = last + 2 * tokens
    outputs_loss = last + tokens + ((alloc_bytes(P * Hv * FP32) + alloc_bytes(P // m2 * H * FP32)) if st.amp else 0)
    return VisionStep(images=len(grids), patches=P, inputs_bytes=inputs, saved_bytes=saved,
                      forward_working_bytes=working, merger_saved_bytes=merger, outputs_forward_bytes=outputs_fwd,
                      outputs_loss_bytes=outputs_loss)
