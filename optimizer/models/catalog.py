"""GPU and model catalogs, shipped as package data (`gpus.yaml`, `models.yaml`), each entry with its source."""

from __future__ import annotations

import difflib
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import CatalogError
from ..io import read_json, shown
from ..schema import Arch, GpuSpec
from .arch import arch_from_config

__all__ = ["gpus", "models", "get_gpu", "resolve_arch", "resolve_config", "model_configs"]


def _load_yaml(filename: str) -> Any:
    text = resources.files(__package__).joinpath(filename).read_text(encoding="utf-8")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(text, Loader=loader)


@lru_cache(maxsize=1)
def gpus() -> dict[str, GpuSpec]:
    """All catalog GPUs by id, in file order."""
    return {entry["id"]: GpuSpec(**entry) for entry in _load_yaml("gpus.yaml")}


@lru_cache(maxsize=1)
def model_configs() -> dict[str, dict[str, Any]]:
    """Catalog entries by Hugging Face repo id: {"source": str, "config": config.json fields}."""
    return {entry["id"]: entry for entry in _load_yaml("models.yaml")}


@lru_cache(maxsize=1)
def models() -> dict[str, Arch]:
    return {mid: arch_from_config(e["config"], mid, e.get("source", "")) for mid, e in model_configs().items()}


def _closest(word: str, choices: list[str]) -> str:
    w = word.lower()
    lowered = {c.lower(): c for c in choices}
    tail = w.split("/")[-1]
    # a prefix match first ("Qwen/Qwen2.5-3B" -> "Qwen/Qwen2.5-3B-Instruct"), then fuzzy, then substring
    hits = [c for c in lowered if c.startswith(w) or c.split("/")[-1].startswith(tail)][:3]
    if not hits:
        hits = difflib.get_close_matches(w, list(lowered), n=3, cutoff=0.4)
    if not hits:
        hits = [c for c in lowered if tail in c][:3]
    return ", ".join(lowered[h] for h in hits)


def get_gpu(gpu_id: str) -> GpuSpec:
    table = gpus()
    if gpu_id in table:
        return table[gpu_id]
    near = _closest(gpu_id, list(table))
    hint = f" Closest: {near}." if near else ""
    raise CatalogError(f"unknown GPU {shown(gpu_id)}.{hint} Run `trainfit gpus` for the list.")


def resolve_arch(model: str) -> Arch:
    """A catalog id (Hugging Face repo id), or a path to a config.json or to a folder holding one."""
    table = models()
    if model in table:
        return table[model]
    lowered = {k.lower(): k for k in table}
    if model.lower() in lowered:
        return table[lowered[model.lower()]]
    path = _config_path(model)
    if path is not None:
        return arch_from_config(_read_config(path), str(path), source=f"read from {path}")
    near = _closest(model, list(table))
    hint = f" Closest: {near}." if near else ""
    raise CatalogError(
        f"unknown model {shown(model)}: not a catalog id and no such file.{hint} "
        "Run `trainfit models`, or pass a path to a config.json."
    )


def resolve_config(model: str) -> dict[str, Any]:
    """The raw config.json dict behind `resolve_arch(model)` (the trace builds the real transformers model from it)."""
    table = model_configs()
    lowered = {k.lower(): k for k in table}
    if model.lower() in lowered:
        return dict(table[lowered[model.lower()]]["config"])
    resolve_arch(model)  # raises the same errors as the estimate path
    path = _config_path(model)
    assert path is not None  # resolve_arch found it
    return _read_config(path)


def _config_path(model: str) -> Path | None:
    """The config.json `model` names (a file, or a folder holding one), or None when nothing is at that path."""
    path = Path(model).expanduser()
    try:
        if path.is_dir():
            path = path / "config.json"
            if not os.path.lexists(path):
                raise CatalogError(f"folder {shown(model)} holds no config.json. Point --model at a model folder or a "
                                   "config.json.")
        return path if os.path.lexists(path) else None
    except (OSError, ValueError):  # a name too long or with a NUL byte: not a path
        return None


def _read_config(path: Path) -> dict[str, Any]:
    what = "a Hugging Face config.json (or its model folder)"
    cfg = read_json(path, error=CatalogError, what=what, fix=f"Fix the syntax, or pass {what}.")
    if not isinstance(cfg, dict):
        raise CatalogError(f"{str(path)!r} is not a JSON object. Pass a Hugging Face config.json.")
    return cfg
