"""Emit LLaMA-Factory training YAML (`llamafactory-cli train cfg.yaml`) and `dataset_info.json` entries.

What the output must satisfy, and why:

- Only keys LLaMA-Factory's train parser accepts: `HfArgumentParser(...).parse_dict(args, allow_extra_keys=False)`
  stops at any other key (`optimizer/llamafactory/keys.yaml` lists them for 0.9.5 + transformers 5.24). The
  emitted set is also cross-version safe for 0.9.3-0.9.5: no `warmup_ratio` (transformers 5.24 dropped it; an
  integer `warmup_steps` works everywhere), no keys that only newer versions have, no `quantization_method`
  (its default is bnb in every version, but 0.9.2 spelled it `bitsandbytes`), no `plot_loss` (it hard-requires
  matplotlib).
- Floats are written as LLaMA-Factory's examples write them (`1.0e-4`, `3.0`, `0.05`): always a dot, and an
  exponent with a sign. PyYAML's YAML 1.1 resolver reads `1e-4` as a *string*; LLaMA-Factory itself loads the
  file with OmegaConf, which reads both, and this form is a float for either.
- The YAML reads back (through `optimizer.lfconfig.plan_from_dict`, the reader of `trainfit estimate`) to the
  same memory plan; `render_config` checks that before it returns.

Templates come from LLaMA-Factory 0.9.5's `extras/constants.py` (`register_model_group(..., template=...)`), which
is what its web UI picks for a hub id.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from ..errors import ConfigError
from ..schema import Plan
from ..search.objectives import optimizer_steps
from ..search.quality import WARMUP_RATIO, warmup_steps
from .read import accepted_keys, plan_from_dict

__all__ = [
    "render_config",
    "dataset_info_entry",
    "format_float",
    "warmup_steps_for",
    "DEFAULT_WARMUP_STEPS",
]

# --------------------------------------------------------------------------------------------------------------
# Scalars
# --------------------------------------------------------------------------------------------------------------


def format_float(value: float) -> str:
    """A float the way LLaMA-Factory's examples write it, and that every YAML loader reads back as the same float:
    `1.0e-4`, `5.0e-5`, `1.25e-5`, `3.0`, `0.05`. Values below 0.01 (and from 1e16 up) use `<d.d…>e<sign><exp>`
    with the shortest digits that round-trip; the rest use Python's shortest repr (`0.05`, `3.0`)."""
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"cannot write {value!r} as a LLaMA-Factory value. Use a finite number.")
    if v == 0.0:
        return "0.0"
    a = abs(v)
    if 1e-2 <= a < 1e16:
        return repr(v)  # positional in this range, with a dot ('3.0', '0.05', '1234.5')
    _sign, digits, exp = Decimal(repr(a)).normalize().as_tuple()
    assert isinstance(exp, int)
    sci = exp + len(digits) - 1
    mantissa = f"{digits[0]}." + ("".join(str(d) for d in digits[1:]) or "0")
    return f"{'-' if v < 0 else ''}{mantissa}e{'-' if sci < 0 else '+'}{abs(sci)}"


_PLAIN_STR = re.compile(r"[A-Za-z0-9_./+-][A-Za-z0-9_./+,=~-]*")
_NUMBER_LIKE = re.compile(r"[-+0-9._:eE]*")


def _format_str(s: str) -> str:
    """Plain when both PyYAML and OmegaConf read it back as this string, else a JSON (= YAML) double-quoted one."""
    if _PLAIN_STR.fullmatch(s) and not _NUMBER_LIKE.fullmatch(s):
        try:
            if yaml.safe_load(s) == s:
                return s
        except yaml.YAMLError:
            pass
    return json.dumps(s, ensure_ascii=False)


def _format_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format_float(value)
    if isinstance(value, str):
        return _format_str(value)
    raise ConfigError(f"{key}: {value!r} is not a number, a string or a boolean. Pass a scalar value.")


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------

DEFAULT_WARMUP_STEPS = 10  # when neither `extra` nor the plan's max_samples tells the number of steps

SECTIONS = ("model", "method", "dataset", "output", "train", "eval")
# LLaMA-Factory templates of the vision-language models trainfit models (models/families.py: Qwen2.5-VL)
VISION_TEMPLATES = ("qwen2_vl",)

_OUTPUT_KEYS = frozenset({
    "output_dir", "overwrite_output_dir", "logging_steps", "logging_strategy", "logging_first_step", "save_steps",
    "save_strategy", "save_total_limit", "save_only_model", "plot_loss", "report_to", "run_name", "project",
    "push_to_hub", "hub_model_id", "hub_private_repo", "hub_strategy",
})
_EVAL_KEYS = frozenset({
    "per_device_eval_batch_size", "eval_strategy", "eval_steps", "eval_delay", "eval_dataset", "val_size", "do_eval",
    "eval_accumulation_steps", "bf16_full_eval", "fp16_full_eval", "compute_accuracy", "prediction_loss_only",
    "eval_on_each_dataset", "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
    "eval_on_start", "batch_eval_metrics",
})
_CLASS_SECTION = {
    "model_args": "model", "data_args": "dataset", "finetuning_args": "method", "training_args": "train",
    "generating_args": "eval",
}

# Keys the plan or a keyword argument owns: `extra` may not set them, or the YAML and the plan would disagree.
_OWNED = frozenset({
    "model_name_or_path", "trust_remote_code", "stage", "do_train", "finetuning_type", "dataset_dir", "dataset",
    "template", "output_dir", "learning_rate", "num_train_epochs", "quantization_bit", "quantization_type",
    "double_quantization", "upcast_layernorm", "upcast_lmhead_output", "flash_attn", "disable_gradient_checkpointing",
    "use_reentrant_gc", "enable_liger_kernel", "lora_rank", "lora_alpha", "lora_dropout", "lora_target",
    "additional_target", "cutoff_len", "max_samples", "per_device_train_batch_size", "gradient_accumulation_steps",
    "bf16", "fp16", "pure_bf16", "optim", "max_grad_norm",
})


@lru_cache(maxsize=1)
def _key_sections() -> dict[str, str]:
    text = resources.files(__package__).joinpath("keys.yaml").read_text(encoding="utf-8")
    out: dict[str, str] = {}
    for cls, names in yaml.safe_load(text)["keys"].items():
        for name in names:
            out[name] = _CLASS_SECTION.get(cls, "train")
    for name in _OUTPUT_KEYS:
        out[name] = "output"
    for name in _EVAL_KEYS:
        out[name] = "eval"
    return out


def warmup_steps_for(num_samples: int, plan: Plan, num_train_epochs: float | None = None,
                     ratio: float = WARMUP_RATIO) -> int:
    """Integer warmup steps equal to `warmup_ratio: ratio` for `num_samples` training samples (after max_samples),
    counted as transformers counts optimizer steps: ceil(epochs * ceil(ceil(n / batch) / accumulation)),
    warmup = ceil(steps * ratio)."""
    if num_samples <= 0:
        raise ConfigError(f"num_samples {num_samples} must be positive. Count the training samples.")
    n = min(num_samples, plan.max_samples) if plan.max_samples else num_samples
    epochs = plan.num_train_epochs if num_train_epochs is None else num_train_epochs
    steps = optimizer_steps(epochs, n, plan.per_device_train_batch_size, plan.gradient_accumulation_steps)
    return warmup_steps(steps, ratio)


def _check_plan(plan: Plan) -> None:
    """What a valid Plan can be but a LLaMA-Factory config cannot (Plan's own rules are its validators)."""
    if plan.kbit_prepare:
        raise ConfigError("plan cannot become a LLaMA-Factory config: kbit_prepare models PEFT's "
                          "prepare_model_for_kbit_training, which LLaMA-Factory never runs; solve with kbit_prepare "
                          "false for a LLaMA-Factory config.")


def _set_true(section: dict[str, Any], plan: Plan, *keys: str) -> None:
    """Writes `key: true` for each of `keys` that is on in `plan`, in order (each key's default is false)."""
    for key in keys:
        if getattr(plan, key):
            section[key] = True


def _base_sections(plan: Plan, *, model_name_or_path: str, template: str, dataset: str, dataset_dir: str,
                   output_dir: str, learning_rate: float, num_train_epochs: float,
                   warmup_steps: int) -> dict[str, dict[str, Any]]:
    lora = plan.finetuning_type == "lora"
    model: dict[str, Any] = {"model_name_or_path": model_name_or_path, "trust_remote_code": True}
    if plan.quantization_bit is not None:
        model["quantization_bit"] = plan.quantization_bit
        if plan.quantization_bit == 4 and plan.quantization_type != "nf4":
            model["quantization_type"] = plan.quantization_type
        if plan.quantization_bit == 4 and not plan.double_quantization:
            model["double_quantization"] = False
    _set_true(model, plan, "upcast_layernorm", "upcast_lmhead_output")
    model["flash_attn"] = plan.flash_attn
    _set_true(model, plan, "disable_gradient_checkpointing")
    if not plan.use_reentrant_gc:
        model["use_reentrant_gc"] = False
    _set_true(model, plan, "enable_liger_kernel")

    method: dict[str, Any] = {"stage": plan.stage, "do_train": True, "finetuning_type": plan.finetuning_type}
    if plan.stage == "dpo":  # [S] LLaMA-Factory hparams/finetuning_args.py::RLHFArguments
        method["pref_beta"] = float(plan.pref_beta)
        method["pref_loss"] = plan.pref_loss
        if plan.pref_ftx:
            method["pref_ftx"] = float(plan.pref_ftx)
        if plan.ref_model is not None:
            method["ref_model"] = plan.ref_model
    if lora:
        method["lora_rank"] = plan.lora_rank
        method["lora_alpha"] = plan.effective_lora_alpha
        method["lora_dropout"] = float(plan.lora_dropout)
        method["lora_target"] = plan.lora_target
        if plan.additional_target:
            method["additional_target"] = plan.additional_target

    if template in VISION_TEMPLATES:
        # what the memory model assumes (LLaMA-Factory's defaults, written out): the vision tower and the merger
        # frozen [S] hparams/finetuning_args.py; images resized within the plan's image_max_pixels / image_min_pixels
        # (defaults 768*768 / 32*32 [S] hparams/model_args.py ProcessorArguments; optimizer/data/images.py counts
        # their tokens)
        model["image_max_pixels"] = plan.image_max_pixels
        model["image_min_pixels"] = plan.image_min_pixels
        method["freeze_vision_tower"] = True
        method["freeze_multi_modal_projector"] = True

    data: dict[str, Any] = {"dataset_dir": dataset_dir, "dataset": dataset, "template": template,
                            "cutoff_len": plan.cutoff_len}
    if plan.max_samples is not None:
        data["max_samples"] = plan.max_samples
    _set_true(data, plan, "packing", "neat_packing")
    data["preprocessing_num_workers"] = 4
    data["dataloader_num_workers"] = 0

    output: dict[str, Any] = {"output_dir": output_dir, "overwrite_output_dir": True, "logging_steps": 10,
                              "save_steps": 500, "report_to": "none"}

    train: dict[str, Any] = {
        "per_device_train_batch_size": plan.per_device_train_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "learning_rate": float(learning_rate),
        "num_train_epochs": float(num_train_epochs),
        "lr_scheduler_type": "cosine",
        "warmup_steps": warmup_steps,
    }
    _set_true(train, plan, "bf16", "fp16", "pure_bf16")
    train["optim"] = plan.optim
    if plan.max_grad_norm != 1.0:
        train["max_grad_norm"] = float(plan.max_grad_norm)

    # HF's default eval batch is 8: an eval pass (val_size/eval_dataset) would then OOM a plan sized for less.
    evaluation: dict[str, Any] = {"per_device_eval_batch_size": plan.per_device_train_batch_size}
    return {"model": model, "method": method, "dataset": data, "output": output, "train": train, "eval": evaluation}


def _normalized(plan: Plan, epochs: float) -> dict[str, Any]:
    """The plan fields that reach the YAML, with the fields LLaMA-Factory ignores in this plan reset to defaults."""
    d = plan.model_dump()
    d.pop("images_per_sample", None)  # a trainfit option (the dataset's), not a LLaMA-Factory key
    defaults = {name: f.default for name, f in Plan.model_fields.items()}
    d["num_train_epochs"] = float(epochs)
    d["lora_alpha"] = plan.effective_lora_alpha
    if plan.finetuning_type != "lora":
        for name in ("lora_rank", "lora_dropout", "lora_target", "additional_target"):
            d[name] = defaults[name]
        d["lora_alpha"] = 2 * defaults["lora_rank"]
    if plan.stage != "dpo":
        for name in ("pref_loss", "pref_beta", "pref_ftx", "ref_model"):
            d[name] = defaults[name]
    if plan.quantization_bit != 4:
        d["quantization_type"] = defaults["quantization_type"]
        d["double_quantization"] = defaults["double_quantization"]
    return d


def render_config(plan: Plan, *, model_name_or_path: str, template: str, dataset: str, dataset_dir: str,
                  output_dir: str, header: list[str], learning_rate: float | None = None,
                  num_train_epochs: float | None = None, extra: dict | None = None) -> str:
    """The LLaMA-Factory training YAML of `plan`: `header` as `# ` comment lines, then `### model`, `### method`,
    `### dataset`, `### output`, `### train`, `### eval` sections as in LLaMA-Factory's examples.

    learning_rate: default 1.0e-4 for LoRA, 1.0e-5 for full fine-tuning. num_train_epochs: default the plan's.
    extra: more LLaMA-Factory keys (any accepted key the plan and the keywords do not own), or a new value for a
    default one (`warmup_steps`, `logging_steps`, `save_steps`, `preprocessing_num_workers`,
    `per_device_eval_batch_size`, ...); a value of None drops a default key. Without `warmup_steps` in extra it is
    ceil(0.1 x the optimizer steps of max_samples samples) when the plan sets max_samples, else 10.
    Same input, same bytes."""
    _check_plan(plan)
    extra = dict(extra or {})
    known = accepted_keys()
    problems = []
    for key in sorted(extra, key=str):
        if not isinstance(key, str):
            problems.append(f"key {key!r} is not a string")
        elif key == "warmup_ratio":
            problems.append("warmup_ratio is not accepted with transformers 5.24 (removed from TrainingArguments); "
                            "pass an integer warmup_steps (warmup_steps_for computes one)")
        elif key not in known:
            problems.append(f"{key!r} is not a LLaMA-Factory 0.9.5 train argument")
        elif key in _OWNED:
            problems.append(f"{key!r} belongs to the plan or to a keyword argument of render_config; set it there")
    if "warmup_steps" in extra:
        w = extra["warmup_steps"]
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            problems.append(f"warmup_steps must be a non-negative integer (found {w!r}); a float is a ratio on "
                            "transformers 5 only")
    if problems:
        raise ConfigError("extra LLaMA-Factory keys rejected: " + "; ".join(problems) + ".")

    lora = plan.finetuning_type == "lora"
    lr = learning_rate if learning_rate is not None else (1.0e-4 if lora else 1.0e-5)
    epochs = num_train_epochs if num_train_epochs is not None else plan.num_train_epochs
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"learning_rate {lr!r} must be a positive number. Pass a learning rate like 1.0e-4.")
    if not (epochs > 0 and math.isfinite(epochs)):
        raise ConfigError(f"num_train_epochs {epochs!r} must be a positive number. Pass e.g. 3.0.")
    for name, value in (("model_name_or_path", model_name_or_path), ("template", template), ("dataset", dataset),
                        ("dataset_dir", dataset_dir), ("output_dir", output_dir)):
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{name} is empty. Pass a non-empty {name}.")
    if plan.max_samples:
        warmup = warmup_steps_for(plan.max_samples, plan, epochs)
    else:
        warmup = DEFAULT_WARMUP_STEPS

    sections = _base_sections(plan, model_name_or_path=model_name_or_path, template=template, dataset=dataset,
                              dataset_dir=dataset_dir, output_dir=output_dir, learning_rate=lr,
                              num_train_epochs=epochs, warmup_steps=warmup)
    where = _key_sections()
    placed = {key: name for name, keys in sections.items() for key in keys}
    for key in sorted(extra):
        value = extra[key]
        if key in placed:
            if value is None:
                del sections[placed[key]][key]
            else:
                sections[placed[key]][key] = value
        elif value is not None:
            sections[where.get(key, "train")][key] = value
    # new keys go after the defaults of their section, sorted: dict order above is insertion order, and
    # `sorted(extra)` makes it independent of the caller's dict order

    if plan.enable_liger_kernel:
        # [S] LLaMA-Factory hparams/parser.py::_check_extra_dependencies: check_version("liger-kernel",
        # mandatory=True) stops the run without it ("To fix: run `pip install liger-kernel`")
        header = [*header, "needs: pip install liger-kernel (LLaMA-Factory refuses enable_liger_kernel without it)"]
    lines = [("# " + part).rstrip() for line in header for part in str(line).splitlines() or [""]]
    if lines:
        lines.append("")
    for name in SECTIONS:
        if not sections[name]:
            continue
        lines.append(f"### {name}")
        for key, value in sections[name].items():
            if key not in known:  # a default key missing from the key list would be a trainfit bug
                raise ConfigError(f"internal: {key!r} is not in keys.yaml. Report this bug.")
            lines.append(f"{key}: {_format_value(key, value)}")
        lines.append("")
    text = "\n".join(lines).rstrip("\n") + "\n"

    # The YAML must read back to the plan it was made from (the estimate reader applies LF's defaults).
    back, model = plan_from_dict(yaml.safe_load(text), where="emitted config")
    if model != model_name_or_path or _normalized(back, epochs) != _normalized(plan, epochs):
        raise ConfigError("internal: the emitted config does not read back to the plan. Report this bug.")
    return text


# --------------------------------------------------------------------------------------------------------------
# dataset_info.json
# --------------------------------------------------------------------------------------------------------------


def dataset_info_entry(file_name: str, formatting: str, present: set[str] | None = None,
                       ranking: bool = False) -> dict:
    """One `dataset_info.json` value (the caller picks its key, the `dataset` name) for a data file in
    `dataset_dir` (or an absolute path).

    ranking (stage dpo): a preference dataset, `"ranking": true` with `chosen` and `rejected` columns (LLaMA-Factory
    data/README.md "Preference Dataset"; DatasetAttr has no default for them): alpaca records carry the two response
    strings instead of `output`, sharegpt/openai records end their messages with the user turn and carry one
    message each under `chosen` and `rejected`.

    alpaca: records {"instruction", "input", "output"} (the user turn is instruction + "\\n" + input).
    sharegpt: records {"conversations": [{"from": "human"|"gpt"|"system"..., "value": ...}]}.
    openai: records {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}]}, written as
    sharegpt with role/content tags: LLaMA-Factory 0.9.3 has no `openai` formatting."""
    if not isinstance(file_name, str) or not file_name.strip():
        raise ConfigError("dataset file name is empty. Pass the data file's name.")
    # LLaMA-Factory reads an optional column only when `columns` names it, and fails when `columns` names a
    # field no record has: with `present` (the data file's record keys) optional columns follow the data.
    pair = {"chosen": "chosen", "rejected": "rejected"} if ranking else {}
    rank = {"ranking": True} if ranking else {}
    if formatting == "alpaca":
        cols = {"prompt": "instruction", "query": "input", **(pair or {"response": "output"})}
        if present is not None:
            if "input" not in present:
                del cols["query"]
            for role, key in (("system", "system"), ("history", "history")):
                if key in present:
                    cols[role] = key
        if present is not None and "images" in present:
            cols["images"] = "images"
        return {"file_name": file_name, "formatting": "alpaca", **rank, "columns": cols}
    if formatting == "sharegpt":
        cols = {"messages": "conversations", **pair}
        if present is not None:
            for key in ("system", "tools", "images"):
                if key in present:
                    cols[key] = key
        return {"file_name": file_name, "formatting": "sharegpt", **rank, "columns": cols}
    if formatting == "openai":
        cols = {"messages": "messages", **pair}
        if present is not None and "images" in present:  # LLaMA-Factory's mllm_demo: columns.images = "images"
            cols["images"] = "images"
        return {"file_name": file_name, "formatting": "sharegpt", **rank, "columns": cols,
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant", "observation_tag": "tool", "system_tag": "system"}}
    raise ConfigError(f"dataset formatting {formatting!r} is unknown. Use alpaca, sharegpt or openai.")
