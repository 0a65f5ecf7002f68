"""Image tokens of a vision-language sample, the way LLaMA-Factory 0.9.5 and transformers count them for Qwen2.5-VL.

An image path's pixel size comes from its file header (PNG, JPEG; the standard library only, nothing is decoded).
Then, per image:

1. LLaMA-Factory `data/mm_plugin.py::MMPluginMixin._preprocess_image`: above `image_max_pixels` (default 768*768,
   `hparams/model_args.py`) the image is scaled by sqrt(max / (w h)), below `image_min_pixels` (default 32*32) by
   sqrt(min / (w h)); each side truncated with int(). `Qwen2VLPlugin._preprocess_image` then widens a side under
   28 px to 28 and clips an aspect ratio over 200 to 180.
2. transformers 5.24.0 `models/qwen2_vl/image_processing_qwen2_vl.py::smart_resize` (factor = patch x merge =
   28): each side rounded to a multiple of the factor, scaled down (floor) above the processor's `max_pixels`
   or up (ceil) below its `min_pixels`. Qwen/Qwen2.5-VL-*-Instruct's preprocessor_config.json sets min_pixels
   3136 (56*56) and max_pixels 12845056 (28*28*16384).
3. grid (t, h, w) = (1, H / patch, W / patch): one image fills one temporal patch (the processor repeats it
   `temporal_patch_size` times). `Qwen2VLPlugin.process_messages` replaces each `<image>` with
   `<|vision_start|>` + t h w / merge^2 `<|image_pad|>` tokens + `<|vision_end|>`: those tokens count toward
   cutoff_len (`data/processor/supervised.py` truncates the expanded sequence).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import TrainfitError
from ..models.vision import (
    IMAGE_MAX_PIXELS,
    IMAGE_MIN_PIXELS,
    PROCESSOR_MAX_PIXELS,
    PROCESSOR_MIN_PIXELS,
    image_grid,
    regularized_size,
    smart_resize,
)
from ..schema import VisionTower
from .read import Conversation, DatasetError, read_files, resolve_source

__all__ = ["ImageError", "IMAGE_PLACEHOLDER", "IMAGE_MAX_PIXELS", "IMAGE_MIN_PIXELS", "PROCESSOR_MIN_PIXELS",
           "PROCESSOR_MAX_PIXELS", "VISION_MARKERS", "image_size", "regularized_size", "smart_resize",
           "image_grid", "image_tokens", "ImageCount", "count_images", "dataset_images",
           "SampleLength", "sample_lengths"]

# [S] LLaMA-Factory extras/constants.py IMAGE_PLACEHOLDER (overridable by the env var of the same name)
IMAGE_PLACEHOLDER = os.environ.get("IMAGE_PLACEHOLDER", "<image>")
# [S] LLaMA-Factory data/mm_plugin.py Qwen2VLPlugin: vision_bos_token / vision_eos_token around each image
VISION_MARKERS = 2


class ImageError(TrainfitError):
    """An image a sample names cannot be read (missing, not a PNG/JPEG, a broken header)."""


def _png_size(head: bytes) -> tuple[int, int] | None:
    # PNG: 8-byte signature, then the IHDR chunk (length, "IHDR", width, height as big-endian uint32)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return w, h
    return None


# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): 0xC0-0xCF less DHT C4, JPG C8, DAC CC
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(f) -> tuple[int, int] | None:
    f.seek(2)
    while True:
        byte = f.read(1)
        while byte and byte != b"\xff":
            byte = f.read(1)
        while byte == b"\xff":
            byte = f.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # SOI, TEM, RSTn: no length field
            continue
        if marker == 0xD9:  # EOI before a frame header
            return None
        raw = f.read(2)
        if len(raw) < 2:
            return None
        length = struct.unpack(">H", raw)[0]
        if marker in _SOF:
            body = f.read(5)
            if len(body) < 5:
                return None
            h, w = struct.unpack(">HH", body[1:5])
            return w, h
        f.seek(length - 2, 1)


def image_size(path: str | os.PathLike[str], where: str = "") -> tuple[int, int]:
    """(width, height) in pixels from a PNG or JPEG header, as PIL's Image.open reports them (EXIF orientation is
    not applied, as neither LLaMA-Factory nor the processor applies it)."""
    p = Path(path)
    at = f"{where}: " if where else ""
    try:
        with open(p, "rb") as f:
            head = f.read(24)
            size = _png_size(head)
            if size is None and head[:2] == b"\xff\xd8":
                size = _jpeg_size(f)
    except FileNotFoundError:
        raise ImageError(f"{at}image {str(p)!r} does not exist. Fix the path (relative paths are read from the "
                         "data file's folder), or remove the image from the sample.") from None
    except OSError as exc:
        raise ImageError(f"{at}image {str(p)!r} cannot be read ({exc.strerror or exc}). Check the file and its "
                         "permissions.") from None
    if size is None or min(size) <= 0:
        raise ImageError(f"{at}image {str(p)!r} is not a PNG or JPEG file trainfit can read the size of. Convert "
                         "it to PNG or JPEG.")
    return size


def image_tokens(width: int, height: int, vision: VisionTower, max_pixels: int = IMAGE_MAX_PIXELS,
                 min_pixels: int = IMAGE_MIN_PIXELS) -> int:
    """`<|image_pad|>` tokens of one image in the text sequence: t h w / merge^2 (without the two markers)."""
    t, h, w = image_grid(width, height, vision, max_pixels, min_pixels)
    return t * h * w // vision.spatial_merge_size ** 2


@dataclass(frozen=True)
class ImageCount:
    """One image of a sample: its file size in pixels and what it becomes."""

    path: str
    width: int
    height: int
    patches: int  # vision tower sequence: t h w (before the merger)
    tokens: int  # text-side tokens: patches / merge^2 + the two vision markers


def _sample_images(conv: Conversation, where: str, vision: VisionTower, max_pixels: int,
                   min_pixels: int) -> tuple[ImageCount, ...]:
    placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in conv.messages)
    if placeholders != len(conv.images):
        # [S] LLaMA-Factory data/mm_plugin.py::MMPluginMixin._validate_messages raises on this mismatch
        raise DatasetError(f"{where}: {len(conv.images)} image(s) but {placeholders} {IMAGE_PLACEHOLDER} "
                           f"placeholder(s) in the messages. Put one {IMAGE_PLACEHOLDER} in the text where each "
                           "image goes.")
    out = []
    m2 = vision.spatial_merge_size ** 2
    for path in conv.images:
        w, h = image_size(path, where)
        t, gh, gw = image_grid(w, h, vision, max_pixels, min_pixels)
        out.append(ImageCount(path, w, h, t * gh * gw, t * gh * gw // m2 + VISION_MARKERS))
    return tuple(out)


def count_images(path: str | os.PathLike[str], vision: VisionTower, *, dataset: str | None = None,
                 formatting: str | None = None, max_pixels: int = IMAGE_MAX_PIXELS,
                 min_pixels: int = IMAGE_MIN_PIXELS) -> list[tuple[ImageCount, ...]]:
    """Per sample, its images as `vision` sees them (empty tuples for text-only samples). Raises DatasetError
    (placeholders and images disagree) or ImageError (an image cannot be read)."""
    if max_pixels < min_pixels:
        # [S] LLaMA-Factory hparams/model_args.py ProcessorArguments.__post_init__
        raise DatasetError(f"image_max_pixels {max_pixels} is smaller than image_min_pixels {min_pixels}. "
                           "Raise image_max_pixels or lower image_min_pixels.")
    files, fmt, name = resolve_source(path, dataset, formatting)
    convs = read_files(files, fmt)
    return [_sample_images(c, f"{name}: sample {i + 1}", vision, max_pixels, min_pixels) for i, c in enumerate(convs)]


def dataset_images(path: str | os.PathLike[str], vision: VisionTower | None, *, model: str | None = None,
                   dataset: str | None = None, formatting: str | None = None, max_pixels: int = IMAGE_MAX_PIXELS,
                   min_pixels: int = IMAGE_MIN_PIXELS) -> list[tuple[ImageCount, ...]] | None:
    """`count_images` for a dataset with images, None for a text-only one. Images without a vision tower to
    count them are a DatasetError."""
    files, fmt, name = resolve_source(path, dataset, formatting)
    if not any(c.images for c in read_files(files, fmt)):
        return None
    if vision is None:
        what = f"model {model!r} has no vision tower" if model else "no --model is given"
        raise DatasetError(f"{name}: samples have images but {what}; image tokens depend on the vision tower. Pass "
                           "--model with a vision-language model, e.g. Qwen/Qwen2.5-VL-3B-Instruct.")
    return count_images(path, vision, dataset=dataset, formatting=formatting, max_pixels=max_pixels,
                        min_pixels=min_pixels)


@dataclass(frozen=True)
class SampleLength:
    """One sample's sequence against cutoff_len: text tokens (template included, placeholders left out), image
    tokens (with their vision markers) and the vision tower's patches."""

    sample: int  # 1-based
    text_tokens: int
    images: int
    image_tokens: int
    patches: int

    @property
    def total_tokens(self) -> int:
        return self.text_tokens + self.image_tokens


def sample_lengths(text_totals: list[int], images: list[tuple[ImageCount, ...]]) -> list[SampleLength]:
    """Per sample: its text tokens (from data.dataset) beside its image tokens."""
    return [SampleLength(i + 1, t, len(im), sum(x.tokens for x in im), sum(x.patches for x in im))
            for i, (t, im) in enumerate(zip(text_totals, images, strict=True))]
