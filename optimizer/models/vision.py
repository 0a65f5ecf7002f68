"""Image sizes as the vision tower sees them: LLaMA-Factory's resize and transformers' smart_resize for Qwen2.5-VL
(the steps are documented in optimizer/data/images.py, which reads the images), and the patches of one image at a
plan's `image_max_pixels` (what the memory model and the tracer put through the vision tower)."""

from __future__ import annotations

import math

from ..schema import VisionTower

__all__ = ["IMAGE_MAX_PIXELS", "IMAGE_MIN_PIXELS", "PROCESSOR_MIN_PIXELS", "PROCESSOR_MAX_PIXELS",
           "regularized_size", "smart_resize", "image_grid", "plan_image_grid"]

# [S] LLaMA-Factory hparams/model_args.py ProcessorArguments defaults
IMAGE_MAX_PIXELS = 768 * 768
IMAGE_MIN_PIXELS = 32 * 32
# [S] Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct preprocessor_config.json: min_pixels, max_pixels
PROCESSOR_MIN_PIXELS = 3136
PROCESSOR_MAX_PIXELS = 12845056
def regularized_size(width: int, height: int, max_pixels: int = IMAGE_MAX_PIXELS,
                     min_pixels: int = IMAGE_MIN_PIXELS) -> tuple[int, int]:
    """(width, height) after LLaMA-Factory's Qwen2VLPlugin._preprocess_image (see the module docstring)."""
    if width * height > max_pixels:
        f = math.sqrt(max_pixels / (width * height))
        width, height = int(width * f), int(height * f)
    if width * height < min_pixels:
        f = math.sqrt(min_pixels / (width * height))
        width, height = int(width * f), int(height * f)
    if min(width, height) < 28:
        width, height = max(width, 28), max(height, 28)
    if width / height > 200:
        width, height = height * 180, height
    if height / width > 200:
        width, height = width, width * 180
    return width, height


def smart_resize(height: int, width: int, factor: int, min_pixels: int = PROCESSOR_MIN_PIXELS,
                 max_pixels: int = PROCESSOR_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) as transformers' qwen2_vl smart_resize returns them: multiples of `factor` within
    [min_pixels, max_pixels] (Python's round(): half to even, as there)."""
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_grid(width: int, height: int, vision: VisionTower, max_pixels: int = IMAGE_MAX_PIXELS,
               min_pixels: int = IMAGE_MIN_PIXELS) -> tuple[int, int, int]:
    """The processor's image_grid_thw (t, h, w) in patches for an image of `width` x `height` pixels."""
    w, h = regularized_size(width, height, max_pixels, min_pixels)
    hh, ww = smart_resize(h, w, vision.patch_size * vision.spatial_merge_size)
    return 1, hh // vision.patch_size, ww // vision.patch_size


def plan_image_grid(vision: VisionTower, max_pixels: int, min_pixels: int) -> tuple[int, int, int]:
    """The grid (t, h, w) of one image as the memory model and the tracer take it: a square of `max_pixels` (side
    isqrt(max_pixels)), the most pixels LLaMA-Factory's resize leaves an image (optimizer/data/images.py)."""
    side = math.isqrt(max_pixels)
    return image_grid(side, side, vision, max_pixels, min_pixels)
