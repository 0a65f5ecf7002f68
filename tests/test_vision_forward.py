"""The vision tower's forward on a micro-batch's images (optimizer/memory/vision.py): estimate, check, the trace."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from optimizer.cli import app
from optimizer.errors import ConfigError
from optimizer.memory import CUBLAS_WORKSPACE_BYTES, estimate
from optimizer.memory.precision import setting_for
from optimizer.memory.step import step_moments
from optimizer.memory.vision import vision_step, window_lengths
from optimizer.models.catalog import resolve_arch
from optimizer.models.vision import plan_image_grid
from optimizer.schema import Moment, Plan

VL3 = "Qwen/Qwen2.5-VL-3B-Instruct"


def _plan(**kw) -> Plan:
    return Plan(**{"bf16": True, "per_device_train_batch_size": 1, "cutoff_len": 1024, **kw})


def test_a_768_pixel_image_is_a_54_by_54_patch_grid_cut_into_49_windows():
    # smart_resize(768, 768, 28) = 756 x 756 -> 54 x 54 patches; merged 27 x 27 in windows of 112 / 2 / 14 = 4:
    # 36 windows of 4x4 merged tokens (64 patches), 12 of 4x3 (48), 1 of 3x3 (36) [T] the traced sdpa calls of a
    # windowed block: 36 outputs [1, 16, 64, 80], 12 of 48, 1 of 36
    v = resolve_arch(VL3).vision
    grid = plan_image_grid(v, 768 * 768, 32 * 32)
    assert grid == (1, 54, 54)
    lengths = window_lengths(grid, v.spatial_merge_size, v.window_size, v.patch_size)
    assert sorted(lengths, reverse=True) == [64] * 36 + [48] * 12 + [36] and sum(lengths) == 54 * 54


def test_the_tower_keeps_what_the_trace_measured():
    # [T] run_fake(Qwen/Qwen2.5-VL-3B-Instruct, 1 decoder layer, one 768^2 image, cutoff_len 1024, bf16, LoRA,
    # checkpointing): the tensors allocated during the vision forward and live at the step's peak (cross-entropy
    # backward) add up to 4,342,036,992 bytes; the text embedding output [1, 1024, 2048] bf16 is held beside them
    arch = resolve_arch(VL3)
    plan = _plan(images_per_sample=1)
    vis = vision_step(arch, plan, setting_for(arch, plan))
    assert vis.patches == 2916 and vis.images == 1
    assert vis.saved_bytes == 4_342_036_992 + 1024 * 2048 * 2
    # without checkpointing PEFT does not call enable_input_require_grads: nothing of the tower is saved
    nogc = plan.model_copy(update={"disable_gradient_checkpointing": True})
    assert vision_step(arch, nogc, setting_for(arch, nogc)).saved_bytes == 0


def test_the_vision_forward_is_a_moment_and_the_step_peak_matches_the_trace():
    arch = resolve_arch(VL3).model_copy(update={"num_hidden_layers": 1})
    plan = _plan(images_per_sample=1)
    kinds = [m.kind for m in step_moments(arch, plan).moments]
    assert kinds[0] is Moment.VISION_FORWARD
    assert Moment.VISION_FORWARD not in [m.kind for m in step_moments(arch, _plan()).moments]
    # [T] the same trace: peak 8,360,026,112 bytes at the cross-entropy backward (28,672 below the estimate without
    # its two cuBLAS workspaces, as the text-only step of this model)
    est = estimate(arch, plan)
    assert est.peak_allocated_bytes - 2 * CUBLAS_WORKSPACE_BYTES == 8_359_997_440
    assert any(n.startswith("images: 1 per micro-batch") for n in est.notes)
    # more images, more memory; text-only plans of the same model keep their numbers
    assert estimate(arch, _plan(images_per_sample=2, cutoff_len=2048)).peak_allocated_bytes > \
        estimate(arch, _plan(cutoff_len=2048)).peak_allocated_bytes


def test_image_plans_the_model_does_not_cover_get_one_error():
    with pytest.raises(ConfigError, match="images_per_sample 1 needs a vision-language model"):
        estimate(resolve_arch("Qwen/Qwen2.5-3B-Instruct"), _plan(images_per_sample=1))
    with pytest.raises(ConfigError, match=r"take 1462 tokens, more than cutoff_len 1024 \(image tokens count"):
        estimate(resolve_arch(VL3), _plan(images_per_sample=2))
    with pytest.raises(ConfigError, match="stage dpo with images is not modelled yet"):
        estimate(resolve_arch(VL3), _plan(images_per_sample=1, stage="dpo"))
    with pytest.raises(ValueError, match="image_max_pixels 100 is smaller than image_min_pixels 1024"):
        _plan(image_max_pixels=100)


def test_estimate_and_check_show_the_vision_forward(tmp_path):
    res = CliRunner().invoke(app, ["estimate", "-m", VL3, "--bf16", "--per-device-train-batch-size", "1",
                                   "--cutoff-len", "1024", "--images-per-sample", "1"])
    assert res.exit_code == 0, res.output
    assert "vision_activations" in res.output and "vision_inputs" in res.output
    assert "note: images: 1 per micro-batch (1 per sample at image_max_pixels 589,824), 2,916 patches" in res.output
    assert "vision forward peak" in res.output
    cfg = tmp_path / "vl.yaml"
    cfg.write_text(f"model_name_or_path: {VL3}\nstage: sft\ndo_train: true\nfinetuning_type: lora\ntemplate: qwen2_vl\n"
                   "cutoff_len: 1024\nper_device_train_batch_size: 1\nbf16: true\nimage_max_pixels: 262144\n"
                   "dataset: mllm_demo\noutput_dir: out\n", encoding="utf-8")
    res = CliRunner().invoke(app, ["check", str(cfg), "-g", "h100-sxm-80gb", "--images-per-sample", "2"])
    assert res.exit_code == 0, res.output
    # 512^2 pixels: 36 x 36 patches, 2 images = 2,592 patches, 648 image tokens
    assert "images: 2 per micro-batch (2 per sample at image_max_pixels 262,144), 2,592 patches" in res.output
    assert "vision_activations" in res.output


@pytest.mark.trace
@pytest.mark.slow
def test_the_tracer_runs_the_tower_on_images():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from optimizer.models.catalog import resolve_config
    from optimizer.trace.run import run_fake

    plan = _plan(images_per_sample=2, image_max_pixels=256 * 256, cutoff_len=512)
    trace = run_fake(resolve_config(VL3), plan, layers=1)
    assert "vision_fwd" in trace.sub_phase_peaks
    arch = resolve_arch(VL3).model_copy(update={"num_hidden_layers": 1})
    by_kind = {m.kind: m for m in step_moments(arch, plan).moments}
    est = by_kind[Moment.CE_BACKWARD].total_bytes - 2 * CUBLAS_WORKSPACE_BYTES
    assert abs(est - trace.sub_phase_peaks["bwd_loss"]) / trace.sub_phase_peaks["bwd_loss"] < 0.001
    vf = by_kind[Moment.VISION_FORWARD].total_bytes - CUBLAS_WORKSPACE_BYTES
    assert abs(vf - trace.sub_phase_peaks["vision_fwd"]) / trace.sub_phase_peaks["vision_fwd"] < 0.005
