"""Scoped patches that let a Qwen2.5-VL training step with images run on fake tensors.

transformers 5.24 (models/qwen2_5_vl/modeling_qwen2_5_vl.py, vision_utils.py) reads the values of `image_grid_thw` and
of the attention boundaries it derives from it: fake tensors have no values, so these reads fail
(DataDependentOutputException). The tracer chose the images' grids itself (`optimizer.models.vision.plan_image_grid`),
so each read is answered from those Python ints and the library code otherwise runs as it is:

1. vision_utils' `get_vision_position_ids`, `get_vision_attention_seqlens` and `get_vision_window_index` (as the
   modeling module imported them) build small index tensors with `.tolist()`, boolean indexing and
   `unique_consecutive`. The patched functions allocate the tensors they return with the same shapes and dtypes
   (position ids int64 [patches, 2]; cu_seqlens int32 [frames + 1]; window_index int64 [patches / merge^2];
   cu_window_seqlens int32 [windows + 1]), computed from the grids. Their transient intermediates (a few
   [patches]-sized int64 tensors, freed before the tower's first block) are not traced.
2. `Qwen2_5_VLVisionAttention.forward` (sdpa and eager) splits q/k/v per window with `lengths.tolist()`, and
   `Qwen2_5_VLModel.get_image_features` splits the merged features per image with `(...).tolist()`: while each runs,
   a 1-D `tolist()` of the expected length answers the known lengths (window sizes, tokens per image).
3. `get_placeholder_mask`'s `torch_compilable_check` (placeholder count == feature rows) reads a value: it is skipped
   (the trace's input_ids hold no image tokens; masked_scatter's output has the same shape either way).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch

from ..memory.vision import window_lengths
from .patches import _setattr

__all__ = ["vision_patches"]

# id(cu_seqlens tensor made by a patched helper) -> the segment lengths it stands for
_LENGTHS: dict[int, list[int]] = {}
# the lengths a 1-D .tolist() answers while a patched call runs
_PENDING: ContextVar[list[int] | None] = ContextVar("trainfit_vision_pending", default=None)
_ORIG_TOLIST = torch.Tensor.tolist


def _fake_tensor_class() -> type:
    from torch._subclasses.fake_tensor import FakeTensor

    return FakeTensor


def _known_tolist(self: torch.Tensor) -> Any:
    pending = _PENDING.get()
    if pending is not None and self.dim() == 1 and self.shape[0] == len(pending):
        return list(pending)
    return _FAKE_TOLIST(self) if isinstance(self, _fake_tensor_class()) else _ORIG_TOLIST(self)


_FAKE_TOLIST = _fake_tensor_class().tolist


def _cu(lengths: list[int], device: torch.device) -> torch.Tensor:
    cu = torch.empty(len(lengths) + 1, dtype=torch.int32, device=device)
    _LENGTHS[id(cu)] = lengths
    return cu


@contextlib.contextmanager
def vision_patches(grids: list[tuple[int, int, int]]) -> Iterator[None]:
    """Answer the Qwen2.5-VL vision code's value reads from `grids` (one (t, h, w) per image of the micro-batch)."""
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as mq

    patches = sum(t * h * w for t, h, w in grids)

    def position_ids(grid_thw, spatial_merge_size, include_temporal=False, kwargs=None):
        return torch.empty(patches, 3 if include_temporal else 2, dtype=torch.long, device=grid_thw.device)

    def attention_seqlens(grid_thw, *args, **kwargs):  # (grid_thw, config, merge_temporal, kwargs)
        lengths = [h * w for t, h, w in grids for _ in range(t)]
        return _cu(lengths, grid_thw.device), None

    def window_index(grid_thw, spatial_merge_size, window_size, patch_size, kwargs=None):
        lengths = [n for g in grids for n in window_lengths(g, spatial_merge_size, window_size, patch_size)]
        index = torch.empty(patches // spatial_merge_size ** 2, dtype=torch.long, device=grid_thw.device)
        return index, _cu(lengths, grid_thw.device)

    orig_attn = mq.Qwen2_5_VLVisionAttention.forward

    def attn_forward(self, hidden_states, cu_seqlens, *args, **kwargs):
        token = _PENDING.set(_LENGTHS.get(id(cu_seqlens)))
        try:
            return orig_attn(self, hidden_states, cu_seqlens, *args, **kwargs)
        finally:
            _PENDING.reset(token)

    orig_features = mq.Qwen2_5_VLModel.get_image_features

    def image_features(self, *args, **kwargs):
        merge2 = self.visual.spatial_merge_size ** 2
        token = _PENDING.set([t * h * w // merge2 for t, h, w in grids])
        try:
            return orig_features(self, *args, **kwargs)
        finally:
            _PENDING.reset(token)

    with contextlib.ExitStack() as stack:
        stack.enter_context(_setattr(mq, "get_vision_position_ids", position_ids))
        stack.enter_context(_setattr(mq, "get_vision_attention_seqlens", attention_seqlens))
        stack.enter_context(_setattr(mq, "get_vision_window_index", window_index))
        stack.enter_context(_setattr(mq, "torch_compilable_check", lambda *a, **k: None))
        stack.enter_context(_setattr(mq.Qwen2_5_VLVisionAttention, "forward", attn_forward))
        stack.enter_context(_setattr(mq.Qwen2_5_VLModel, "get_image_features", image_features))
        stack.enter_context(_setattr(_fake_tensor_class(), "tolist", _known_tolist))
        try:
            yield
        finally:
            _LENGTHS.clear()
