"""`trainfit calibrate`: per-GPU allocator overheads and a time factor, fitted from the calibration log.

Per GPU (the catalog id each record's prediction is for; records without CUDA memory figures are skipped):
- reserved overhead: torch.cuda.max_memory_reserved - max_memory_allocated = a + b * allocated, least squares
  over the records' measured peaks (b = 0 with one record or one distinct peak, or when the fit's slope is
  negative: then a is the mean overhead). It replaces the segment model of `memory.allocator.reserved_bytes`.
- CUDA context: the median of (NVML device peak - max_memory_reserved); it replaces CUDA_CONTEXT_BYTES.
- time factor: the median of measured / predicted step time (search.perf's model; stored and printed, the
  search's time model does not read it yet).

The profile (JSON) is read by `estimate --gpu`, `check` and `solve` when it exists (`TRAINFIT_CALIBRATION`:
a path, or `off`; default <cache>/calibration_profile.json). Without a profile every number is unchanged.
"""

from __future__ import annotations

import json
import os
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..memory.allocator import CUDA_CONTEXT_BYTES, AllocatorCalibration, reserved_bytes
from .record import CalibrationError, Record, read_log

__all__ = ["PROFILE_SCHEMA", "GpuCalibration", "Profile", "FitError", "calibrate_log", "fit_gpu", "load_profile",
           "default_profile_path", "active_calibration", "calibration_text"]

PROFILE_SCHEMA = "trainfit.calibration-profile/1"
_STRICT = ConfigDict(extra="forbid")


class FitError(BaseModel):
    """Mean and max absolute relative error of one figure over a GPU's records, before and after calibration."""

    model_config = _STRICT
    figure: str = Field(description="reserved (at the measured allocated peak), device, or step time.")
    records: int
    before_mean: float = Field(description="Mean |predicted - measured| / measured with the sourced model.")
    before_max: float
    after_mean: float = Field(description="The same with the calibration.")
    after_max: float


class GpuCalibration(BaseModel):
    model_config = _STRICT
    gpu: str = Field(description="Catalog GPU id.")
    device_names: list[str] = Field(description="torch.cuda.get_device_name() of the runs.")
    records: int = Field(description="Records with CUDA memory figures.")
    reserved_intercept_bytes: int = Field(description="a in reserved - allocated = a + b * allocated.")
    reserved_slope: float = Field(description="b in reserved - allocated = a + b * allocated.")
    cuda_context_bytes: int = Field(description="Median of NVML device peak - max_memory_reserved (the model's "
                                    f"{CUDA_CONTEXT_BYTES} B when no record has an NVML figure).")
    context_measured: bool = Field(description="Whether cuda_context_bytes comes from records.")
    time_factor: float | None = Field(description="Median measured / predicted step time (None: no timed record).")
    errors: list[FitError]

    def allocator(self) -> AllocatorCalibration:
        return AllocatorCalibration(gpu=self.gpu, reserved_intercept_bytes=self.reserved_intercept_bytes,
                                    reserved_slope=self.reserved_slope, cuda_context_bytes=self.cuda_context_bytes)


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    schema_: Literal["trainfit.calibration-profile/1"] = Field(alias="schema", description="The profile format.")
    created: str = Field(description="UTC time, ISO 8601.")
    source_log: str = Field(description="The calibration log it was fitted from.")
    gpus: dict[str, GpuCalibration] = Field(description="Catalog GPU id -> its calibration.")

    def text(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2, sort_keys=True) + "\n"


def _linear_fit(xs: list[int], ys: list[int]) -> tuple[float, float]:
    """(intercept, slope >= 0) of least squares y = a + b x."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if len(xs) < 2 or sxx == 0:
        return my, 0.0
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    if b < 0:
        return my, 0.0
    return my - b * mx, b


def _err(pairs: list[tuple[float, float, float]], figure: str) -> FitError:
    """pairs: (before, after, measured)."""
    eb = [abs(b - m) / m for b, _, m in pairs]
    ea = [abs(a - m) / m for _, a, m in pairs]
    return FitError(figure=figure, records=len(pairs), before_mean=statistics.fmean(eb), before_max=max(eb),
                    after_mean=statistics.fmean(ea), after_max=max(ea))


def fit_gpu(gpu: str, records: list[Record]) -> GpuCalibration | None:
    """The calibration of one GPU from its records; None when no record has CUDA memory figures."""
    mem = [r for r in records if r.measured.peak_allocated_bytes and r.measured.peak_reserved_bytes]
    if not mem:
        return None
    xs = [r.measured.peak_allocated_bytes for r in mem]
    ys = [r.measured.peak_reserved_bytes - r.measured.peak_allocated_bytes for r in mem]
    a, b = _linear_fit(xs, ys)
    dev = [r for r in mem if r.measured.device_peak_bytes]
    ctx = round(statistics.median([r.measured.device_peak_bytes - r.measured.peak_reserved_bytes for r in dev])) \
        if dev else CUDA_CONTEXT_BYTES
    cal = AllocatorCalibration(gpu=gpu, reserved_intercept_bytes=round(a), reserved_slope=b, cuda_context_bytes=ctx)
    timed = [r for r in records if r.measured.step_s and r.predicted.step_s and r.device_name != "cpu"]
    factor = statistics.median([r.measured.step_s / r.predicted.step_s for r in timed]) if timed else None
    # Errors at the measured allocated peak, so that they show the allocator model alone.
    res = []
    for r in mem:
        alloc = r.measured.peak_allocated_bytes
        res.append((reserved_bytes(alloc, r.predicted.large_blocks_bytes), cal.reserved_bytes(alloc),
                    r.measured.peak_reserved_bytes))
    errors = [_err(res, "reserved")]
    if dev:
        errors.append(_err([(reserved_bytes(r.measured.peak_allocated_bytes, r.predicted.large_blocks_bytes)
                             + CUDA_CONTEXT_BYTES, cal.reserved_bytes(r.measured.peak_allocated_bytes) + ctx,
                             r.measured.device_peak_bytes) for r in dev], "device"))
    if timed:
        errors.append(_err([(r.predicted.step_s, r.predicted.step_s * factor, r.measured.step_s) for r in timed],
                           "step time"))
    return GpuCalibration(gpu=gpu, device_names=sorted({r.device_name for r in mem}), records=len(mem),
                          reserved_intercept_bytes=round(a), reserved_slope=b, cuda_context_bytes=ctx,
                          context_measured=bool(dev), time_factor=factor, errors=errors)


def calibrate_log(path: str | os.PathLike[str]) -> Profile:
    """Read a log and fit every GPU it has CUDA records for."""
    records = read_log(path)
    by_gpu: dict[str, list[Record]] = {}
    for r in records:
        if r.gpu:
            by_gpu.setdefault(r.gpu, []).append(r)
    gpus = {g: c for g, rs in sorted(by_gpu.items()) if (c := fit_gpu(g, rs)) is not None}
    if not gpus:
        raise CalibrationError(f"{path}: none of its {len(records)} record(s) has CUDA memory figures (runs on the "
                               "CPU, or without --gpu). Run `trainfit train CONFIG.yaml --gpu ID` on a GPU first.")
    return Profile(schema=PROFILE_SCHEMA, created=datetime.now(UTC).isoformat(timespec="seconds"),
                   source_log=str(path), gpus=gpus)


def default_profile_path() -> Path:
    from ..data.dataset import cache_dir

    return cache_dir() / "calibration_profile.json"


def load_profile(path: str | os.PathLike[str]) -> Profile:
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalibrationError(f"calibration profile {str(path)!r} does not exist. Run `trainfit calibrate LOG` or "
                               "unset TRAINFIT_CALIBRATION.") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CalibrationError(f"{path} is not JSON. Regenerate it with `trainfit calibrate LOG`, or set "
                               "TRAINFIT_CALIBRATION=off.") from None
    if not isinstance(obj, dict) or obj.get("schema") != PROFILE_SCHEMA:
        raise CalibrationError(f"{path} is not a trainfit calibration profile (expected schema {PROFILE_SCHEMA!r}). "
                               "Regenerate it with `trainfit calibrate LOG`, or set TRAINFIT_CALIBRATION=off.")
    try:
        return Profile.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise CalibrationError(f"{path}: {'.'.join(str(x) for x in err['loc'])}: {err['msg']}. Regenerate it with "
                               "`trainfit calibrate LOG`.") from None


def active_calibration(gpu_id: str | None) -> tuple[AllocatorCalibration | None, str]:
    """The calibration `estimate`, `check` and `solve` use for `gpu_id`, and a one-line note for stderr ('' when
    none applies). TRAINFIT_CALIBRATION: a profile path, or `off`; default <cache>/calibration_profile.json when
    it exists."""
    env = os.environ.get("TRAINFIT_CALIBRATION", "")
    if env.lower() == "off" or not gpu_id:
        return None, ""
    path = Path(env).expanduser() if env else default_profile_path()
    if not env and not path.is_file():
        return None, ""
    cal = load_profile(path).gpus.get(gpu_id)
    if cal is None:
        return None, ""
    return cal.allocator(), (f"calibrated for {gpu_id} by {path} ({cal.records} run(s)): reserved - allocated = "
                             f"{cal.reserved_intercept_bytes / 2**20:.0f} MiB + {cal.reserved_slope:.4f} x allocated, "
                             f"CUDA context {cal.cuda_context_bytes / 2**20:.0f} MiB")


def calibration_text(profile: Profile, out: str) -> str:
    """What moved and the errors before and after, per GPU."""
    mib = 2 ** 20
    lines = []
    for g, c in profile.gpus.items():
        lines.append(f"{g} ({', '.join(c.device_names)}): {c.records} run(s)")
        lines.append(f"  reserved - allocated: segment model -> {c.reserved_intercept_bytes / mib:,.1f} MiB + "
                     f"{c.reserved_slope:.4f} x allocated")
        lines.append(f"  CUDA context: {CUDA_CONTEXT_BYTES / mib:,.1f} MiB -> {c.cuda_context_bytes / mib:,.1f} MiB"
                     + ("" if c.context_measured else " (no NVML figure: unchanged)"))
        lines.append("  time factor (measured / predicted): "
                     + (f"{c.time_factor:.3f}" if c.time_factor is not None else "none (no timed GPU run)"))
        for e in c.errors:
            lines.append(f"  {e.figure:<10} error over {e.records} run(s): mean {e.before_mean:.1%} -> "
                         f"{e.after_mean:.1%}, max {e.before_max:.1%} -> {e.after_max:.1%}")
    lines.append(f"wrote {out} (estimate --gpu, check and solve use it; TRAINFIT_CALIBRATION=off ignores it)")
    return "\n".join(lines)
