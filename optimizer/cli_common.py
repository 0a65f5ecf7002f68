"""What the commands share: the LLaMA-Factory keys as flags, the one-line error boundary, the multi-GPU and
calibration context. Typer-facing, like `cli.py`; no policy here."""

from __future__ import annotations

import functools
import inspect
import typing
from enum import Enum
from typing import Any, Optional

import typer

from .errors import ConfigError, TrainfitError
from .llamafactory.read import plan_from_dict, read_yaml
from .models import catalog
from .schema import Arch, Plan


class FlashAttn(str, Enum):
    auto = "auto"
    disabled = "disabled"
    sdpa = "sdpa"
    fa2 = "fa2"


class Optim(str, Enum):
    adamw_torch = "adamw_torch"
    adamw_torch_fused = "adamw_torch_fused"
    adamw_8bit = "adamw_8bit"
    adamw_bnb_8bit = "adamw_bnb_8bit"
    paged_adamw_8bit = "paged_adamw_8bit"
    sgd = "sgd"


class FinetuningType(str, Enum):
    lora = "lora"
    full = "full"


def one_line(text: str) -> str:
    """A message as one readable line, whatever the input put into it: control characters escaped, a token longer
    than 120 characters (a pasted value) cut in its middle, and at most 2,000 characters, keeping the end (the fix)."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    text = " ".join(w if len(w) <= 120 else f"{w[:80]}...{w[-30:]}" for w in text.split(" "))
    return text if len(text) <= 2000 else f"{text[:1200]} ... {text[-700:]}"


# What a command turns into one `Error:` line: trainfit's own errors, and OS errors on a path the user gave that no
# reader converted first (e.g. a name longer than the file system allows: pathlib's is_file() raises then).
USER_ERRORS = (TrainfitError, OSError)


def fail(exc: Exception) -> None:
    if isinstance(exc, OSError) and not isinstance(exc, TrainfitError):
        where = f" {exc.filename}" if exc.filename else ""
        msg = f"cannot use{where}: {exc.strerror or exc}. Pass an existing, readable path of a valid length"
    else:
        msg = str(exc)
    typer.echo(f"Error: {one_line(msg)}", err=True)
    raise typer.Exit(1)


REPORT_HELP = "Write a self-contained HTML report (charts, offline) to this file (needs the report extra)."

# Flags named after LLaMA-Factory's keys; None = not given (the YAML's value or LLaMA-Factory's default).
_FLAG_HELP = "LLaMA-Factory key; overrides --config"


def resolve_plan(config: Optional[str], model: Optional[str], overrides: dict[str, Any]) -> tuple[Arch, Plan]:
    data: dict[str, Any] = {}
    where = "flags"
    if config:
        data = read_yaml(config)
        where = config
    for key, value in overrides.items():
        if value is not None:
            data[key] = value.value if isinstance(value, Enum) else value
    kbit = data.pop("kbit_prepare", None)
    images = data.pop("images_per_sample", None)  # a trainfit option, not a LLaMA-Factory key
    plan, yaml_model = plan_from_dict(data, where)
    if kbit:
        plan = plan.model_copy(update={"kbit_prepare": True})
    if images:
        plan = plan.model_copy(update={"images_per_sample": images})
    name = model or yaml_model
    if not name:
        raise ConfigError("no model given. Pass --model (a catalog id or a config.json path) or set "
                          "model_name_or_path.")
    return catalog.resolve_arch(name), plan


def yaml_model(config: Optional[str]) -> str:
    data = read_yaml(config) if config else {}
    if not data.get("model_name_or_path"):
        raise ConfigError("no model given. Pass --model (a catalog id or a config.json path) or set "
                          "model_name_or_path.")
    return str(data["model_name_or_path"])


def _plan_flags(
    finetuning_type: Optional[FinetuningType] = typer.Option(None, help=_FLAG_HELP),
    quantization_bit: Optional[int] = typer.Option(None, help=_FLAG_HELP + " (4 or 8)"),
    quantization_type: Optional[str] = typer.Option(None, help=_FLAG_HELP + " (nf4 or fp4)"),
    double_quantization: Optional[bool] = typer.Option(None, "--double-quantization/--no-double-quantization",
                                                       help=_FLAG_HELP),
    lora_rank: Optional[int] = typer.Option(None, help=_FLAG_HELP),
    lora_alpha: Optional[int] = typer.Option(None, help=_FLAG_HELP),
    lora_dropout: Optional[float] = typer.Option(None, help=_FLAG_HELP),
    lora_target: Optional[str] = typer.Option(None, help=_FLAG_HELP + " (all, or q_proj,v_proj,...)"),
    additional_target: Optional[str] = typer.Option(None, help=_FLAG_HELP),
    cutoff_len: Optional[int] = typer.Option(None, help=_FLAG_HELP),
    per_device_train_batch_size: Optional[int] = typer.Option(None, help=_FLAG_HELP),
    gradient_accumulation_steps: Optional[int] = typer.Option(None, help=_FLAG_HELP + " (> 1 keeps gradients live)"),
    max_samples: Optional[int] = typer.Option(None, help=_FLAG_HELP + " (no memory effect)"),
    num_train_epochs: Optional[float] = typer.Option(None, help=_FLAG_HELP + " (no memory effect)"),
    disable_gradient_checkpointing: Optional[bool] = typer.Option(
        None, "--disable-gradient-checkpointing/--gradient-checkpointing", help=_FLAG_HELP),
    use_reentrant_gc: Optional[bool] = typer.Option(None, "--use-reentrant-gc/--no-use-reentrant-gc", help=_FLAG_HELP),
    flash_attn: Optional[FlashAttn] = typer.Option(None, help=_FLAG_HELP),
    optim: Optional[Optim] = typer.Option(None, help=_FLAG_HELP),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help=_FLAG_HELP),
    fp16: Optional[bool] = typer.Option(None, "--fp16/--no-fp16", help=_FLAG_HELP),
    pure_bf16: Optional[bool] = typer.Option(None, "--pure-bf16/--no-pure-bf16", help=_FLAG_HELP),
    enable_liger_kernel: Optional[bool] = typer.Option(None, "--enable-liger-kernel/--no-enable-liger-kernel",
                                                       help=_FLAG_HELP),
    upcast_layernorm: Optional[bool] = typer.Option(None, "--upcast-layernorm/--no-upcast-layernorm", help=_FLAG_HELP),
    upcast_lmhead_output: Optional[bool] = typer.Option(None, "--upcast-lmhead-output/--no-upcast-lmhead-output",
                                                        help=_FLAG_HELP),
    max_grad_norm: Optional[float] = typer.Option(None, help=_FLAG_HELP),
    packing: Optional[bool] = typer.Option(None, "--packing/--no-packing", help=_FLAG_HELP + " (rows of cutoff_len)"),
    neat_packing: Optional[bool] = typer.Option(None, "--neat-packing/--no-neat-packing",
                                                help=_FLAG_HELP + " (a [b, 1, s, s] mask with sdpa/eager)"),
    images_per_sample: Optional[int] = typer.Option(None, min=0, help="Images per sample (vision-language models; "
                                                    "`trainfit data` counts them)."),
    image_max_pixels: Optional[int] = typer.Option(None, min=1, help=_FLAG_HELP + " (default 768*768)"),
    image_min_pixels: Optional[int] = typer.Option(None, min=1, help=_FLAG_HELP + " (default 32*32)"),
    kbit_prepare: Optional[bool] = typer.Option(None, "--kbit-prepare/--no-kbit-prepare",
                                                help="Model prepared by PEFT's prepare_model_for_kbit_training "
                                                     "(PEFT/TRL scripts, not LLaMA-Factory)."),
) -> None:
    """The LLaMA-Factory keys both `estimate` and `trace` take as flags (None = not given)."""


def _resolved_params(fn) -> list[inspect.Parameter]:
    """Parameters with real annotation objects (this module uses postponed annotations; typer needs types)."""
    hints = typing.get_type_hints(fn)
    return [p.replace(annotation=hints.get(p.name, p.annotation)) for p in inspect.signature(fn).parameters.values()]


_PLAN_FLAG_PARAMS = _resolved_params(_plan_flags)


def with_plan_flags(fn):
    """Give a command every plan flag; it receives them as one `overrides` dict."""
    sig = inspect.signature(fn)
    own = [p for p in _resolved_params(fn) if p.name != "overrides"]

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        overrides = {p.name: kwargs.pop(p.name) for p in _PLAN_FLAG_PARAMS}
        return fn(overrides=overrides, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=own + _PLAN_FLAG_PARAMS, return_annotation=None)
    return wrapper


def dist_estimate(arch, plan, est, num_gpus, engine, offload, nodes, host_ram_gib, zero_init):
    """The multi-GPU estimate when any multi-GPU flag is given, else None."""
    if num_gpus is None and engine is None and offload is None:
        return None
    from .distributed import DistSettings, parse_engine, per_gpu

    if offload not in (None, "none", "optimizer", "params"):
        raise ConfigError(f"--offload {offload!r} is not none, optimizer or params. Pick one of those.")
    dist = DistSettings(engine=parse_engine(engine or "ddp"), num_gpus=num_gpus if num_gpus is not None else 1,
                        nodes=nodes, offload=offload or "none", host_ram_gib=host_ram_gib, zero_init=zero_init)
    return per_gpu(arch, plan, dist, est)


def calibration_context(gpu_id: Optional[str]):
    """The calibration profile's allocator overheads for this GPU, when a profile exists (optimizer/train/calibrate.py);
    otherwise a no-op. Says so on stderr when one applies."""
    from .memory.allocator import calibrated
    from .train.calibrate import active_calibration

    cal, note = active_calibration(gpu_id)
    if note:
        typer.echo(note, err=True)
    return calibrated(cal)
