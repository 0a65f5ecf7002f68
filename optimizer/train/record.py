"""The calibration log: one JSON object per line, one line per `trainfit train` run (predicted vs measured)."""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import TrainfitError

__all__ = ["LOG_SCHEMA", "Predicted", "Measured", "StepRecord", "Record", "CalibrationError", "append_record",
           "read_log", "default_log_path", "config_hash", "versions"]

LOG_SCHEMA = "trainfit.calibration/1"
_STRICT = ConfigDict(extra="forbid")


class CalibrationError(TrainfitError):
    """A calibration log or profile that cannot be read."""


class Predicted(BaseModel):
    model_config = _STRICT
    peak_allocated_bytes: int = Field(description="memory.estimate: predicted torch.cuda.max_memory_allocated().")
    peak_reserved_bytes: int = Field(description="memory.estimate: predicted torch.cuda.max_memory_reserved().")
    device_peak_bytes: int = Field(description="memory.estimate: predicted device peak (reserved + CUDA context).")
    large_blocks_bytes: list[int] = Field(
        default_factory=list, description="memory.large_blocks_at at the peak (the allocator model's input).")
    step_s: float | None = Field(default=None, description="search.perf: one optimizer step (accumulation x "
                                 "micro-batch + optimizer) at the measured tokens per micro-batch; None without a GPU.")


class Measured(BaseModel):
    model_config = _STRICT
    peak_allocated_bytes: int | None = Field(description="Max over steps of torch.cuda.max_memory_allocated() "
                                             "(reset at each step begin); None on the CPU.")
    peak_reserved_bytes: int | None = Field(description="Max over steps of torch.cuda.max_memory_reserved(); None on "
                                            "the CPU.")
    device_peak_bytes: int | None = Field(description="Max NVML memory of this process (nvidia-smi's figure); None "
                                          "without pynvml or on the CPU.")
    step_s: float | None = Field(description="Median step time (steps after the first when there are several).")
    tokens_per_s: float | None = Field(description="Input tokens (padded) per second over the same steps.")
    loss: float | None = Field(description="The last logged training loss.")


class StepRecord(BaseModel):
    model_config = _STRICT
    step: int
    step_s: float
    forward_backward_s: float | None = Field(description="on_step_begin -> on_pre_optimizer_step (all micro-batches).")
    optimizer_s: float | None = Field(description="on_pre_optimizer_step -> on_optimizer_step (clipping + step).")
    other_s: float | None = Field(description="on_optimizer_step -> on_step_end (scheduler, zero_grad).")
    tokens: int | None = Field(description="Input tokens of the step (state.num_input_tokens_seen delta).")
    allocated_bytes: int | None
    reserved_bytes: int | None
    device_bytes: int | None


class Record(BaseModel):
    """One line of the calibration log."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    schema_: Literal["trainfit.calibration/1"] = Field(alias="schema", description="The log format.")
    time: str = Field(description="UTC time of the run's end, ISO 8601.")
    config: str = Field(description="The training YAML.")
    config_hash: str = Field(description="sha256 of the arguments LLaMA-Factory got (canonical JSON).")
    model: str
    gpu: str | None = Field(description="Catalog GPU id the prediction is for (None: no check).")
    device_name: str = Field(description="What ran the step: torch.cuda.get_device_name(), or 'cpu'.")
    versions: dict[str, str | None]
    plan: dict[str, Any]
    steps: int
    predicted: Predicted
    measured: Measured
    per_step: list[StepRecord] = Field(default_factory=list)

    def line(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)


def default_log_path() -> Path:
    from ..data.dataset import cache_dir

    return cache_dir() / "calibration.jsonl"


def config_hash(args: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("trainfit", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "llamafactory"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def append_record(rec: Record, path: str | os.PathLike[str]) -> None:
    """Append one line (the log is append-only; a run never rewrites earlier lines)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a", encoding="utf-8") as fh:
        fh.write(rec.line() + "\n")


def read_log(path: str | os.PathLike[str]) -> list[Record]:
    """Every record of a log; a file that is not a trainfit calibration log raises one CalibrationError."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"calibration log {str(path)!r} does not exist. Run `trainfit train CONFIG.yaml` first "
                               f"(it appends to {default_log_path()}).")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CalibrationError(f"{path} is not a text file. Pass the JSON-lines log `trainfit train` writes.") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path} line {n} is not JSON ({exc.msg}). Pass the JSON-lines log `trainfit train` "
                                   "writes.") from None
        if not isinstance(obj, dict) or obj.get("schema") != LOG_SCHEMA:
            found = obj.get("schema") if isinstance(obj, dict) else type(obj).__name__
            raise CalibrationError(f"{path} line {n} is not a trainfit calibration record (schema {found!r}, expected "
                                   f"{LOG_SCHEMA!r}). Pass the log `trainfit train` writes.")
        try:
            out.append(Record.model_validate(obj))
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise CalibrationError(f"{path} line {n}: {loc}: {err['msg']} ({len(exc.errors())} problem(s)). Pass the "
                                   "log `trainfit train` writes, or remove the line.") from None
    if not out:
        raise CalibrationError(f"{path} holds no records. Run `trainfit train CONFIG.yaml` to add some.")
    return out
