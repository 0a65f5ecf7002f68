"""Emitters: turn a chosen `Plan` into files a trainer runs as is (LLaMA-Factory training YAML + dataset_info.json)."""

from __future__ import annotations

from .llamafactory import (
    CATALOG_TEMPLATES,
    dataset_info_entry,
    format_float,
    render_config,
    template_for,
    warmup_steps_for,
    write_text_atomic,
)

__all__ = [
    "CATALOG_TEMPLATES",
    "dataset_info_entry",
    "format_float",
    "render_config",
    "template_for",
    "warmup_steps_for",
    "write_text_atomic",
]
