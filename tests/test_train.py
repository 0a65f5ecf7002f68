"""`trainfit train` (the check before anything heavy loads) and `trainfit calibrate` (hand-made records: the fit,
the profile, and how estimate/check figures move with it; bad logs)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from optimizer.cli import app
from optimizer.memory import estimate
from optimizer.memory.allocator import CUDA_CONTEXT_BYTES, ROUND_LARGE, calibrated, device_peak_for, reserved_bytes
from optimizer.models import catalog
from optimizer.schema import Plan
from optimizer.train.calibrate import calibrate_log, load_profile
from optimizer.train.record import Measured, Predicted, Record, append_record, read_log
from optimizer.units import GIB, MIB, round_up

runner = CliRunner()

# A config that does not fit a 12 GB card: Qwen2.5-7B LoRA at batch 8 x 4096 tokens without checkpointing.
BIG = textwrap.dedent("""\
    model_name_or_path: Qwen/Qwen2.5-7B-Instruct
    stage: sft
    do_train: true
    finetuning_type: lora
    lora_target: all
    dataset: alpaca_en_demo
    template: qwen
    cutoff_len: 4096
    per_device_train_batch_size: 8
    disable_gradient_checkpointing: true
    bf16: true
    output_dir: saves/big
""")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINFIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TRAINFIT_CALIBRATION", raising=False)


def test_train_stops_with_the_fix_before_loading_torch(tmp_path):
    cfg = tmp_path / "big.yaml"
    cfg.write_text(BIG)
    # A fresh interpreter, so that "torch was not imported" means something (this test process may have it).
    code = textwrap.dedent(f"""
        import sys
        from typer.testing import CliRunner
        from optimizer.cli import app
        res = CliRunner().invoke(app, ["train", {str(cfg)!r}, "--gpu", "rtx-3060-12gb"])
        heavy = sorted(m for m in ("torch", "transformers", "llamafactory", "peft") if m in sys.modules)
        print("EXIT", res.exit_code, "HEAVY", heavy)
        print(res.output)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "TRAINFIT_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "EXIT 3 HEAVY []" in proc.stdout, proc.stdout
    assert "DOES NOT FIT" in proc.stdout
    assert "smallest change" in proc.stdout.lower(), proc.stdout
    assert not (tmp_path / "cache" / "calibration.jsonl").exists()


def _record(gpu: str, alloc: int | None, reserved: int | None, device: int | None, *, step_s: float | None = 1.0,
            predicted_step_s: float | None = 0.8, device_name: str = "NVIDIA GeForce RTX 4090") -> Record:
    return Record(
        schema="trainfit.calibration/1", time="2026-01-01T00:00:00+00:00", config="c.yaml", config_hash="0" * 64,
        model="Qwen/Qwen2.5-0.5B-Instruct", gpu=gpu, device_name=device_name, versions={"torch": "2.13.0"},
        plan={}, steps=3,
        predicted=Predicted(peak_allocated_bytes=alloc or GIB, peak_reserved_bytes=(alloc or GIB) + 100 * MIB,
                            device_peak_bytes=(alloc or GIB) + 400 * MIB, large_blocks_bytes=[64 * MIB] * 3,
                            step_s=predicted_step_s),
        measured=Measured(peak_allocated_bytes=alloc, peak_reserved_bytes=reserved, device_peak_bytes=device,
                          step_s=step_s, tokens_per_s=1000.0, loss=1.5),
    )


def _log(tmp_path, records) -> str:
    path = tmp_path / "calibration.jsonl"
    for r in records:
        append_record(r, path)
    return str(path)


# Hand-made: overhead (reserved - allocated) is 200 MiB at 1 GiB and 400 MiB at 3 GiB allocated, so the line is
# slope 200 MiB / 2 GiB = 0.09765625 and intercept 200 MiB - 0.09765625 x 1 GiB = 100 MiB. Context (device -
# reserved): 500 MiB and 520 MiB -> median 510 MiB. Time: measured / predicted 1.0 / 0.8 and 1.2 / 0.8 -> median 1.375.
HAND = [(GIB, GIB + 200 * MIB, GIB + 700 * MIB, 1.0), (3 * GIB, 3 * GIB + 400 * MIB, 3 * GIB + 920 * MIB, 1.2)]


def test_calibrate_fits_the_documented_overheads(tmp_path):
    log = _log(tmp_path, [_record("rtx-4090", a, r, d, step_s=s) for a, r, d, s in HAND]
               + [_record("rtx-4090", None, None, None, device_name="cpu")])  # CPU runs carry no memory figures
    prof = calibrate_log(log)
    c = prof.gpus["rtx-4090"]
    assert c.records == 2
    assert c.reserved_slope == pytest.approx(0.09765625)
    assert c.reserved_intercept_bytes == 100 * MIB
    assert c.cuda_context_bytes == 510 * MIB
    assert c.time_factor == pytest.approx((1.0 / 0.8 + 1.2 / 0.8) / 2)
    errs = {e.figure: e for e in c.errors}
    assert errs["reserved"].after_mean < 0.01  # the line goes through both points (up to 2 MiB rounding)
    assert errs["step time"].after_mean < errs["step time"].before_mean


def test_profile_moves_reserved_and_device_as_documented(tmp_path):
    log = _log(tmp_path, [_record("rtx-4090", a, r, d, step_s=s) for a, r, d, s in HAND])
    out = tmp_path / "profile.json"
    res = runner.invoke(app, ["calibrate", log, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "CUDA context: 273.8 MiB -> 510.0 MiB" in res.output
    assert "reserved - allocated: segment model -> 100.0 MiB + 0.0977 x allocated" in res.output
    cal = load_profile(out).gpus["rtx-4090"].allocator()
    peak, blocks = 5 * GIB, [300 * MIB] * 3
    with calibrated(cal):
        r = reserved_bytes(peak, blocks)
        d = device_peak_for(peak, blocks, managed=7 * MIB)
    assert r == round_up(peak + cal.reserved_intercept_bytes + round(cal.reserved_slope * peak), ROUND_LARGE)
    assert d == r + 7 * MIB + 510 * MIB
    # outside the block (and without a profile) the sourced model is back
    assert reserved_bytes(peak, blocks) != r
    assert device_peak_for(peak, blocks) == reserved_bytes(peak, blocks) + CUDA_CONTEXT_BYTES

    # estimate --gpu reads the profile (TRAINFIT_CALIBRATION); the allocated peak does not move, reserved and device do
    args = ["estimate", "-m", "Qwen/Qwen2.5-0.5B-Instruct", "--cutoff-len", "512", "--gpu", "rtx-4090", "--json"]
    plain = json.loads(runner.invoke(app, args, env={"TRAINFIT_CALIBRATION": "off"}).stdout)
    res = runner.invoke(app, args, env={"TRAINFIT_CALIBRATION": str(out)})
    assert res.exit_code == 0, res.output
    cal_est = json.loads(res.stdout)
    assert "calibrated for rtx-4090" in res.stderr
    est = estimate(catalog.resolve_arch("Qwen/Qwen2.5-0.5B-Instruct"), Plan(cutoff_len=512))
    assert plain["peak_reserved_bytes"] == est.peak_reserved_bytes
    assert plain["device_peak_bytes"] == est.device_peak_bytes
    assert cal_est["peak_allocated_bytes"] == est.peak_allocated_bytes
    a = est.peak_allocated_bytes
    want = round_up(a + cal.reserved_intercept_bytes + round(cal.reserved_slope * a), ROUND_LARGE)
    assert cal_est["peak_reserved_bytes"] == want
    assert cal_est["device_peak_bytes"] == want + 510 * MIB
    # another GPU of the catalog is not calibrated by this profile
    other = runner.invoke(app, [*args[:-3], "--gpu", "rtx-3090", "--json"], env={"TRAINFIT_CALIBRATION": str(out)})
    assert json.loads(other.stdout)["device_peak_bytes"] == est.device_peak_bytes


def test_check_uses_the_profile(tmp_path):
    log = _log(tmp_path, [_record("rtx-3060-12gb", a, r, d) for a, r, d, _ in HAND])
    out = tmp_path / "cache" / "calibration_profile.json"  # the default path: read without TRAINFIT_CALIBRATION
    assert runner.invoke(app, ["calibrate", log]).exit_code == 0
    assert out.is_file()
    cfg = tmp_path / "big.yaml"
    cfg.write_text(BIG)
    cal = json.loads(runner.invoke(app, ["check", str(cfg), "--gpu", "rtx-3060-12gb", "--json"]).stdout)
    off = json.loads(runner.invoke(app, ["check", str(cfg), "--gpu", "rtx-3060-12gb", "--json"],
                                   env={"TRAINFIT_CALIBRATION": "off"}).stdout)
    assert cal["estimate"]["peak_allocated_bytes"] == off["estimate"]["peak_allocated_bytes"]
    assert cal["device_peak_bytes"] != off["device_peak_bytes"]
    # the profile exists: a second calibrate needs --force
    again = runner.invoke(app, ["calibrate", log])
    assert again.exit_code == 1 and "--force" in again.output


@pytest.mark.parametrize("content, message", [
    ("not json at all\n", "line 1 is not JSON"),
    ('{"name": "x", "value": 1}\n', "line 1 is not a trainfit calibration record (schema None, expected "
                                    "'trainfit.calibration/1'). Pass the log `trainfit train` writes."),
    ('{"schema": "trainfit.calibration/1", "time": "t"}\n', "line 1: config: Field required"),
    ("", "holds no records"),
])
def test_bad_logs_get_one_line_errors(tmp_path, content, message):
    path = tmp_path / "log.jsonl"
    path.write_text(content)
    res = runner.invoke(app, ["calibrate", str(path), "--out", str(tmp_path / "p.json")])
    assert res.exit_code == 1
    assert res.output.startswith("Error: ") and message in res.output and res.output.count("\n") == 1, res.output
    assert not (tmp_path / "p.json").exists()


def test_log_without_gpu_records_and_missing_log(tmp_path):
    log = _log(tmp_path, [_record(None, None, None, None, device_name="cpu")])
    res = runner.invoke(app, ["calibrate", log])
    assert res.exit_code == 1 and "has CUDA memory figures" in res.output
    res = runner.invoke(app, ["calibrate", str(tmp_path / "nope.jsonl")])
    assert res.exit_code == 1 and "does not exist" in res.output
    assert len(read_log(log)) == 1


def test_without_a_profile_nothing_moves(tmp_path):
    """The default cache has no profile: the CLI's figures are the library's."""
    args = ["estimate", "-m", "Qwen/Qwen2.5-0.5B-Instruct", "--gpu", "rtx-4090", "--json"]
    res = runner.invoke(app, args)
    est = estimate(catalog.resolve_arch("Qwen/Qwen2.5-0.5B-Instruct"), Plan())
    assert json.loads(res.stdout)["device_peak_bytes"] == est.device_peak_bytes
    assert "calibrated" not in res.stderr


def test_callback_records_phases_on_cpu():
    pytest.importorskip("transformers")
    from optimizer.train.callback import MeasureCallback

    cb = MeasureCallback()
    state = SimpleNamespace(global_step=0, num_input_tokens_seen=0)
    cb.on_step_begin(None, state, None)
    cb.on_pre_optimizer_step(None, state, None)
    cb.on_optimizer_step(None, state, None)
    state.global_step, state.num_input_tokens_seen = 1, 128
    cb.on_step_end(None, state, None)
    cb.on_log(None, state, None, logs={"loss": 2.5})
    (s,) = cb.steps
    assert s.step == 1 and s.tokens == 128 and s.step_s >= s.forward_backward_s >= 0
    assert s.allocated_bytes is None and s.device_bytes is None  # no CUDA here
    assert cb.losses == [2.5]
