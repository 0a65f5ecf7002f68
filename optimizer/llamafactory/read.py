"""Read a LLaMA-Factory training YAML the way `llamafactory-cli train` does, into a `Plan`.

LLaMA-Factory parses the YAML with `HfArgumentParser(...).parse_dict(args, allow_extra_keys=False)`
([S] llamafactory/hparams/parser.py::_parse_args): a key that no argument class defines stops the run with
`ValueError: Some keys are not used by the HfArgumentParser`. The accepted keys ship in
`optimizer/llamafactory/keys.yaml` (with how they were extracted).
"""

from __future__ import annotations

import difflib
import math
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ConfigError
from ..io import MAX_LISTED, join_problems, read_mapping
from ..schema import Plan

__all__ = ["accepted_keys", "read_yaml", "plan_from_dict", "eval_settings", "EvalSettings", "PLAN_KEYS", "NOT_MODELLED"]

PLAN_KEYS = tuple(k for k in Plan.model_fields if k not in ("kbit_prepare", "images_per_sample"))

# Keys LLaMA-Factory accepts whose memory effect trainfit does not model: refusing is more honest than a
# wrong number. (key, value that is harmless)
NOT_MODELLED: dict[str, Any] = {
    "use_unsloth": False, "use_unsloth_gc": False, "use_galore": False, "use_apollo": False, "use_badam": False,
    "use_adam_mini": False, "use_muon": False, "use_dora": False, "pissa_init": False, "use_llama_pro": False,
    "fsdp": None, "shift_attn": False, "mixture_of_depths": None,
    "train_from_scratch": False, "resize_vocab": False, "torch_compile": False, "fp8": False,
    # vision-language models: only the frozen vision tower and merger are modelled (optimizer/memory/precision.py)
    "freeze_vision_tower": True, "freeze_multi_modal_projector": True, "freeze_language_model": False,
    # [S] LLaMA-Factory model/model_utils/moe.py::configure_moe: a non-zero coefficient sets the config's
    # output_router_logits, so every MoE layer's router logits live until the loss and the aux loss runs on them
    "moe_aux_loss_coef": None,
}

# `deepspeed:` (a LLaMA-Factory train argument naming a DeepSpeed JSON) is accepted and ignored by the single-GPU plan:
# `check` and `estimate` read its JSON for the per-GPU estimate (optimizer/check.py::check_multi, cli.py).

# [S] LLaMA-Factory hparams/generating_args.py: GeneratingArguments.max_new_tokens default 1024.
GENERATE_MAX_NEW_TOKENS = 1024


@lru_cache(maxsize=1)
def accepted_keys() -> frozenset[str]:
    text = resources.files(__package__).joinpath("keys.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    keys: set[str] = set()
    for names in data["keys"].values():
        keys.update(names)
    return frozenset(keys)


def read_yaml(path: str | Path) -> dict[str, Any]:
    return read_mapping(
        path, error=ConfigError, what="the path of a LLaMA-Factory training YAML",
        missing=f"config file {str(path)!r} does not exist. Pass the path of a LLaMA-Factory training YAML.",
        not_mapping=f"{str(path)!r} is not a mapping of LLaMA-Factory keys. Pass a training YAML.",
    )


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _lower_bool(value: Any) -> Any:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def plan_from_dict(data: dict[str, Any], where: str = "config") -> tuple[Plan, str | None]:
    """(plan, model_name_or_path). Applies LLaMA-Factory's defaults to absent keys; collects every problem."""
    problems: list[str] = []
    known = accepted_keys()
    unknown = [key for key in data if key not in known]
    for n, key in enumerate(unknown):
        near = difflib.get_close_matches(str(key), sorted(known), n=1) if n < MAX_LISTED else []  # only those shown
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        problems.append(f"key {_short(key)} is not a LLaMA-Factory 0.9.5 train argument{hint}; LLaMA-Factory stops "
                        "with 'Some keys are not used by the HfArgumentParser'")
    for key, value in data.items():  # flags arrive here unchecked; YAML numbers are checked by the reader
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{key}: {value!r} is not a finite number")
        elif isinstance(value, int) and abs(value) >= 1 << 63:
            problems.append(f"{key}: {_short(value)} does not fit in 64 bits")
    for key, harmless in NOT_MODELLED.items():
        if key not in data or data[key] is None:
            continue
        if harmless is True:  # a default-true switch: only true is harmless
            bad = _lower_bool(data[key]) is not True
        else:
            bad = data[key] not in (harmless, None, False, "", "none")
        if bad:
            problems.append(f"{key}: {_short(data[key])} changes memory in ways trainfit does not model yet; "
                            "remove it to estimate")
    stage = data.get("stage", "sft")
    if stage not in ("sft", "pt", "dpo"):
        # rm (value head + pairwise loss), kto (unpaired with a KL batch) and ppo (policy, value, reward and
        # reference models) run other steps
        problems.append(f"stage {stage!r} is not modelled (sft, pt and dpo are); estimate it as sft or dpo")
    if data.get("quantization_method", "bnb") not in ("bnb", "bitsandbytes"):
        problems.append(f"quantization_method {data['quantization_method']!r} is not modelled (bnb is)")
    ft = data.get("finetuning_type", "lora")
    if ft not in ("lora", "full"):
        problems.append(f"finetuning_type {ft!r} is not modelled (lora and full are)")
    fields = {k: _lower_bool(data[k]) for k in PLAN_KEYS if k in data}
    if fields.get("stage") == "pt":  # pretraining runs the same step as sft (labels = inputs, transformers' loss)
        fields["stage"] = "sft"
        # [S] LLaMA-Factory hparams/parser.py: packing None -> True when stage == pt
        if fields.get("packing") is None:
            fields["packing"] = True
    if "lora_target" in fields and isinstance(fields["lora_target"], list):
        fields["lora_target"] = ",".join(str(t) for t in fields["lora_target"])
    if "additional_target" in fields and isinstance(fields["additional_target"], list):
        fields["additional_target"] = ",".join(str(t) for t in fields["additional_target"])
    if fields.get("flash_attn") is False:
        fields["flash_attn"] = "disabled"
    plan = None
    if not problems:
        try:
            plan = Plan(**fields)
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(x) for x in err["loc"])
                if not loc:  # a cross-field rule of Plan
                    problems.append(str(err["ctx"]["error"]) if "ctx" in err else err["msg"])
                    continue
                problems.append(f"{loc}: {err['msg'].lower()} (found {_short(err.get('input'))})")
    if problems:
        raise ConfigError(f"{where}: " + join_problems(problems) + ". Fix these keys.")
    model = data.get("model_name_or_path")
    return plan, (str(model) if model is not None else None)


class EvalSettings(BaseModel):
    """The evaluation keys that decide evaluation memory, with HF's / LLaMA-Factory's defaults."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    per_device_eval_batch_size: int = Field(default=8, gt=0, description="HF default 8.")
    eval_accumulation_steps: int | None = Field(default=None, gt=0, description="HF default None (keep on GPU).")
    compute_accuracy: bool = Field(default=False, description="LLaMA-Factory: keep argmax ids per eval batch.")
    predict_with_generate: bool = Field(default=False, description="Generate during evaluation (a KV cache).")
    max_new_tokens: int = Field(
        default=GENERATE_MAX_NEW_TOKENS, gt=0, description="LLaMA-Factory GeneratingArguments default."
    )
    val_size: float = Field(default=0.0, ge=0, description="Share (< 1) or count (>= 1) of samples held out.")


def eval_settings(data: dict[str, Any], where: str = "config") -> EvalSettings:
    try:
        return EvalSettings(**{k: _lower_bool(v) for k, v in data.items() if k in EvalSettings.model_fields})
    except ValidationError as exc:
        msgs = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg'].lower()} (found {_short(e.get('input'))})"
                for e in exc.errors()]
        raise ConfigError(f"{where}: " + join_problems(msgs) + ". Fix these keys.") from None
