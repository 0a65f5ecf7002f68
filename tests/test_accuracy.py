"""The memory model against the oracle: estimate within 2% of a traced training step on the whole grid."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from optimizer.memory import CUBLAS_WORKSPACE_BYTES, estimate
from optimizer.models.catalog import resolve_arch, resolve_config
from optimizer.trace import run_trace, run_trace_extrapolated
from optimizer.trace.grid import ERROR_BOUND, GRID

pytestmark = [pytest.mark.trace, pytest.mark.slow]


def test_the_grid_is_broad():
    archs = {resolve_arch(m).name for m, _ in GRID}
    assert len(GRID) >= 40 and len(archs) >= 4
    plans = [p for _, p in GRID]
    assert any(p.quantization_bit == 4 for p in plans) and any(p.finetuning_type == "full" for p in plans)
    assert {p.gradient_checkpointing for p in plans} == {True, False}
    assert {p.flash_attn for p in plans} >= {"auto", "disabled"}
    assert min(p.cutoff_len for p in plans) <= 128 and max(p.cutoff_len for p in plans) >= 4096
    assert {p.per_device_train_batch_size for p in plans} >= {1, 2, 4}
    accum = [p for p in plans if p.gradient_accumulation_steps > 1]
    assert {(p.finetuning_type, p.gradient_checkpointing) for p in accum} == {
        ("full", True), ("full", False), ("lora", True), ("lora", False)}
    vocab = {resolve_arch(m).vocab_size for m, _ in GRID}
    assert min(vocab) <= 32768 and max(vocab) >= 151936
    assert {resolve_arch(m).tie_word_embeddings for m, _ in GRID} == {True, False}


@pytest.mark.parametrize("model,plan", GRID, ids=[f"{i:02d}-{m.split('/')[1]}" for i, (m, _) in enumerate(GRID)])
def test_estimate_matches_the_trace(model, plan):
    trace = run_trace_extrapolated(resolve_config(model), plan)
    est = estimate(resolve_arch(model), plan).peak_allocated_bytes - 2 * CUBLAS_WORKSPACE_BYTES
    err = abs(est - trace.peak_allocated_bytes) / trace.peak_allocated_bytes
    assert err <= ERROR_BOUND, f"estimate {est:,} vs trace {trace.peak_allocated_bytes:,} ({100 * err:.2f}%)"


def test_full_depth_reference_case_matches():
    # the reference case at its real depth (36 layers), no extrapolation: LoRA r8 all, 4-bit, cutoff 512
    from optimizer.schema import Plan

    plan = Plan(quantization_bit=4, lora_rank=8, cutoff_len=512, per_device_train_batch_size=1, bf16=True)
    model = "Qwen/Qwen2.5-3B-Instruct"
    trace = run_trace(resolve_config(model), plan)
    est = estimate(resolve_arch(model), plan)
    assert ((trace.trainable_params, trace.all_params) == (est.trainable_params, est.all_params)
            == (14_966_784, 3_100_905_472))
    err = (abs(est.peak_allocated_bytes - 2 * CUBLAS_WORKSPACE_BYTES - trace.peak_allocated_bytes)
           / trace.peak_allocated_bytes)
    assert err <= ERROR_BOUND
