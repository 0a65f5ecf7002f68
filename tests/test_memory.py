"""The memory model: golden numbers from real artifacts, and properties."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optimizer.memory import count_params, estimate, quant4_bytes
from optimizer.models.arch import layer_linears, param_counts
from optimizer.models.catalog import resolve_arch
from optimizer.report import estimate_json
from optimizer.schema import Plan
from optimizer.units import alloc_bytes

QWEN3B = "Qwen/Qwen2.5-3B-Instruct"


def test_reference_case_counts_match_the_llamafactory_log():
    # Real log line of the reference case (LLaMA-Factory, Qwen2.5-3B-Instruct, 4-bit, lora_rank 8, target all):
    # "trainable params: 14,966,784 || all params: 3,100,905,472 || trainable%: 0.4827"
    plan = Plan(quantization_bit=4, lora_rank=8, lora_target="all", bf16=True)
    assert count_params(resolve_arch(QWEN3B), plan) == (14_966_784, 3_100_905_472)


# PEFT 0.21.2 `get_nb_trainable_parameters()` of `get_peft_model(AutoModelForCausalLM.from_config(cfg) on the
# meta device, LoraConfig(r, target_modules))`, transformers 5.24.0, run on 2026-11-29 with the catalog configs.
# (trainable, all): PEFT's `all` is the base count + adapters, as LLaMA-Factory prints it.
PEFT_COUNTS = [
    ("meta-llama/Llama-3.1-8B-Instruct", 16, "all", 41_943_040, 8_072_204_288),
    ("Qwen/Qwen3-4B", 32, "q_proj,v_proj", 11_796_480, 4_034_264_576),
    ("microsoft/Phi-3.5-mini-instruct", 8, "all", 12_582_912, 3_833_662_464),
    ("google/gemma-2-2b-it", 64, "all", 83_066_880, 2_697_408_768),
    ("mistralai/Mistral-7B-Instruct-v0.3", 4, "gate_proj,up_proj,down_proj", 7_077_888, 7_255_101_440),
    ("Qwen/Qwen2.5-7B-Instruct", 8, "all", 20_185_088, 7_635_801_600),
]


@pytest.mark.parametrize("model,rank,target,trainable,total", PEFT_COUNTS)
def test_lora_counts_match_peft(model, rank, target, trainable, total):
    plan = Plan(lora_rank=rank, lora_target=target)
    assert count_params(resolve_arch(model), plan) == (trainable, total)


# bitsandbytes 0.50.2 `functional.quantize_4bit(w_bf16, blocksize=64, quant_type="nf4",
# quant_storage=torch.bfloat16, compress_statistics=dq)` on real CPU tensors (2026-11-29); tensor bytes of
# packed data, absmax, code (+ state2.absmax, state2.code, offset with double quantization).
BNB_TENSORS = {
    ((2048, 2048), False): [2097152, 262144, 64],
    ((2048, 2048), True): [2097152, 65536, 64, 1024, 1024, 4],
    ((256, 2048), True): [262144, 8192, 64, 128, 1024, 4],
    ((11008, 2048), False): [11272192, 1409024, 64],
    ((11008, 2048), True): [11272192, 352256, 64, 5504, 1024, 4],
}


@pytest.mark.parametrize("shape,dq", list(BNB_TENSORS))
def test_4bit_bytes_match_bitsandbytes(shape, dq):
    expected = sum(alloc_bytes(b) for b in BNB_TENSORS[(shape, dq)])
    assert quant4_bytes(shape[0] * shape[1], dq) == expected


def test_only_linear_layers_are_quantized_embeddings_stay_16bit():
    arch = resolve_arch(QWEN3B)
    e16 = estimate(arch, Plan(bf16=True, per_device_train_batch_size=1, cutoff_len=512))
    e4 = estimate(arch, Plan(bf16=True, per_device_train_batch_size=1, cutoff_len=512, quantization_bit=4))
    c16 = {t.name: t.bytes for t in e16.phases[0].terms}
    c4 = {t.name: t.bytes for t in e4.phases[0].terms}
    assert c4["weights_embed_tokens"] == c16["weights_embed_tokens"] == alloc_bytes(151936 * 2048 * 2)
    linear_numel = sum(m.weight_numel for m in layer_linears(arch)) * arch.num_hidden_layers
    # NF4 + double quantization: about 0.516 bytes per parameter
    assert 0.515 < c4["weights_decoder_linears"] / linear_numel < 0.52


def _plan(**kw) -> Plan:
    base = dict(bf16=True, per_device_train_batch_size=1, cutoff_len=512)
    base.update(kw)
    return Plan(**base)


MODELS = ["Qwen/Qwen2.5-3B-Instruct", "meta-llama/Llama-3.2-1B-Instruct", "mistralai/Mistral-7B-Instruct-v0.3",
          "Qwen/Qwen3-4B", "microsoft/Phi-3.5-mini-instruct", "google/gemma-2-2b-it"]
plans = st.fixed_dictionaries({
    "model": st.sampled_from(MODELS),
    "quantization_bit": st.sampled_from([None, 4, 8]),
    "lora_rank": st.sampled_from([4, 8, 16, 64]),
    "lora_target": st.sampled_from(["all", "q_proj,v_proj", "o_proj"]),
    "cutoff_len": st.integers(16, 4096),
    "per_device_train_batch_size": st.integers(1, 8),
    "disable_gradient_checkpointing": st.booleans(),
    "flash_attn": st.sampled_from(["auto", "disabled", "sdpa"]),
    "optim": st.sampled_from(["adamw_torch", "adamw_torch_fused", "adamw_8bit", "sgd"]),
    "lora_dropout": st.sampled_from([0.0, 0.05]),
})


def _make(d: dict) -> tuple:
    d = dict(d)
    model = d.pop("model")
    arch = resolve_arch(model)
    if model.startswith("microsoft") and d["lora_target"] != "all":
        d["lora_target"] = "qkv_proj" if d["lora_target"] == "q_proj,v_proj" else "o_proj"
    return arch, _plan(**d)


@settings(max_examples=60, deadline=None)
@given(plans, st.integers(1, 8))
def test_peak_is_monotone_in_batch(d, extra):
    arch, plan = _make(d)
    bigger = plan.model_copy(update={"per_device_train_batch_size": plan.per_device_train_batch_size + extra})
    assert estimate(arch, bigger).peak_allocated_bytes >= estimate(arch, plan).peak_allocated_bytes


@settings(max_examples=60, deadline=None)
@given(plans, st.integers(1, 2048))
def test_peak_is_monotone_in_cutoff_len(d, extra):
    arch, plan = _make(d)
    longer = plan.model_copy(update={"cutoff_len": plan.cutoff_len + extra})
    assert estimate(arch, longer).peak_allocated_bytes >= estimate(arch, plan).peak_allocated_bytes


@settings(max_examples=60, deadline=None)
@given(plans)
def test_checkpointing_never_raises_the_peak(d):
    # Below ~40 tokens per micro-batch the bottom layer's backward can dominate (all adapter gradients
    # exist), and reentrant checkpointing then adds its kept input and recomputed output (4 x N x H bytes,
    # ~0.1 MiB): a real effect of no practical size, excluded here.
    d = {**d, "cutoff_len": max(d["cutoff_len"], 64)}
    arch, plan = _make(d)
    on = plan.model_copy(update={"disable_gradient_checkpointing": False})
    off = plan.model_copy(update={"disable_gradient_checkpointing": True})
    assert estimate(arch, on).peak_allocated_bytes <= estimate(arch, off).peak_allocated_bytes


# [T] `run_trace_extrapolated(resolve_config(model), plan).phase_peaks`: trainfit trace (a real HF-Trainer step on
# fake tensors, every allocation counted, 1- and 2-layer runs extrapolated to the model's depth), torch 2.13.0+cpu,
# transformers 5.24.0, peft 0.21.2, accelerate 1.15.0; grid configs 1, 9, 50, 51, 53, 55 of optimizer/trace/grid.py
# (50-55: gradient accumulation, two traced micro-batches). Bytes of torch.cuda.max_memory_allocated per phase.
# Re-traced with the padded-batch worst case (an attention_mask reaches sdpa: bool [b, 1, s, s] mask, additive copy
# and repeated K/V per layer; optimizer/memory/precision.py::attention_mask_kind).
TRACED_PHASES = [
    ("Qwen/Qwen2.5-0.5B-Instruct", dict(cutoff_len=512, per_device_train_batch_size=2),
     dict(forward=1141676032, loss=2655934464, backward=2956448768, optimizer=1058853888)),
    ("Qwen/Qwen2.5-0.5B-Instruct", dict(cutoff_len=256, per_device_train_batch_size=2, finetuning_type="full"),
     dict(forward=6698483200, loss=7745203712, backward=8451325952, optimizer=7904836608)),
    ("Qwen/Qwen2.5-0.5B-Instruct", dict(cutoff_len=256, per_device_train_batch_size=2, finetuning_type="full",
                                        gradient_accumulation_steps=2),
     dict(forward=8674626560, loss=9721347072, backward=9159358464, optimizer=7904848896)),
    ("Qwen/Qwen2.5-0.5B-Instruct", dict(cutoff_len=256, per_device_train_batch_size=2, finetuning_type="full",
                                        gradient_accumulation_steps=2, disable_gradient_checkpointing=True),
     dict(forward=9485769728, loss=10536743936, backward=10690408448, optimizer=7904848896)),
    ("Qwen/Qwen2.5-7B-Instruct", dict(cutoff_len=256, finetuning_type="full", pure_bf16=True, bf16=False,
                                      gradient_accumulation_steps=2),
     dict(forward=61009466880, loss=61373327872, backward=62153727488, optimizer=60925294592)),
    ("meta-llama/Llama-3.2-1B-Instruct", dict(cutoff_len=1024, per_device_train_batch_size=2,
                                              gradient_accumulation_steps=4, disable_gradient_checkpointing=True),
     dict(forward=6937466880, loss=9310429184, backward=9827245056, optimizer=2562137088)),
]


@pytest.mark.parametrize("model,kw,traced", TRACED_PHASES, ids=[f"{i}" for i in range(len(TRACED_PHASES))])
def test_each_phase_matches_its_trace(model, kw, traced):
    # every phase's peak, not only the step's, against the tracer (the cuBLAS workspaces the CPU trace cannot
    # see are left out): a term missing from a phase that is not the peak shows here. The step's peak holds the
    # grid's 0.5%; the other phases 2.5%: the forward phase (not the peak in any of these) is off by up to 2%
    # (Llama-3.2-1B without checkpointing: the trace's forward is 128 MiB higher), a known gap of the model.
    est = estimate(resolve_arch(model), _plan(**kw))
    assert [p.phase for p in est.phases] == list(traced)
    for p in est.phases:
        ws = sum(t.bytes for t in p.terms if t.name.startswith("cublas_workspace"))
        err = (p.total_bytes - ws - traced[p.phase]) / traced[p.phase]
        bound = 0.005 if p.phase == est.peak_phase else 0.025
        assert abs(err) <= bound, f"{p.phase}: {100 * err:+.2f}%"
    assert est.peak_phase == max(traced, key=lambda k: traced[k])


def test_accumulated_gradients_match_the_trace_and_a_hand_count():
    # Qwen2.5-0.5B full fine-tuning under bf16 AMP: fp32 gradients for every parameter. The traced forward peak
    # grows by the gradients of the first micro-batch plus the second micro-batch's inputs, which HF Trainer
    # fetches up front (input_ids, attention_mask, labels: 3 x [2, 256] int64 = 3 x 4096 bytes, not modelled):
    # 8,674,495,488 - 6,698,352,128 bytes above. By hand: 494,032,768 parameters x 4 bytes (HF's count,
    # tests/test_catalog.py) + the 512-byte rounding of 290 tensors (24 layers x (7 weights + 3 biases + 2 norms)
    # + embed_tokens + final norm), at most 290 x 512.
    arch = resolve_arch("Qwen/Qwen2.5-0.5B-Instruct")
    base = _plan(cutoff_len=256, per_device_train_batch_size=2, finetuning_type="full")
    one, two = estimate(arch, base), estimate(arch, base.model_copy(update={"gradient_accumulation_steps": 2}))
    traced = 8674495488 - 6698352128 - 3 * 4096
    assert two.phases[0].total_bytes - one.phases[0].total_bytes == traced
    assert 0 <= traced - 494_032_768 * 4 <= 290 * 512
    # any value above 1 is the second micro-batch again
    eight = estimate(arch, base.model_copy(update={"gradient_accumulation_steps": 8}))
    assert eight.peak_allocated_bytes == two.peak_allocated_bytes


@settings(max_examples=60, deadline=None)
@given(plans)
def test_parts_are_positive_and_weights_match_the_parameter_count(d):
    arch, plan = _make(d)
    est = estimate(arch, plan)
    # the JSON a script reads carries every term of the peak, none empty
    obj = json.loads(estimate_json(est, None, plan))
    peak = next(p for p in est.phases if p.phase == est.peak_phase)
    assert set(obj["components"]) == {t.name for t in peak.terms}
    assert all(v > 0 for v in obj["components"].values())
    # the weight terms agree with the parameter count: 16-bit weights are 2 bytes per parameter plus at most
    # one 512-byte rounding per tensor
    if plan.quantization_bit is None and arch.torch_dtype == "bfloat16":
        w = sum(t.bytes for t in est.phases[0].terms if t.name.startswith("weights_"))
        n = param_counts(arch)
        tensors = n.layers * (len(layer_linears(arch)) * 2 + arch.norms_per_layer + 2) + 3
        assert 0 <= w - 2 * n.total <= 512 * tensors
    assert est.peak_allocated_bytes < est.peak_reserved_bytes < est.device_peak_bytes


@settings(max_examples=60, deadline=None)
@given(plans, st.integers(1, 10_000), st.floats(0.1, 100), st.integers(2, 256))
def test_keys_that_do_not_change_memory_never_change_it(d, max_samples, epochs, accum):
    arch, plan = _make(d)
    other = plan.model_copy(update={"max_samples": max_samples, "num_train_epochs": epochs})
    a, b = estimate(arch, plan), estimate(arch, other)
    assert (a.peak_allocated_bytes, a.peak_reserved_bytes, a.device_peak_bytes) == (
        b.peak_allocated_bytes, b.peak_reserved_bytes, b.device_peak_bytes)
    # accumulation: every value above 1 gives the peak of 2, and it is never below that of 1
    two = estimate(arch, plan.model_copy(update={"gradient_accumulation_steps": 2}))
    many = estimate(arch, plan.model_copy(update={"gradient_accumulation_steps": accum}))
    assert many.peak_allocated_bytes == two.peak_allocated_bytes >= a.peak_allocated_bytes


def test_liger_kernel_removes_most_of_the_logits_term():
    arch = resolve_arch(QWEN3B)
    plain = estimate(arch, _plan(cutoff_len=4096))
    liger = estimate(arch, _plan(cutoff_len=4096, enable_liger_kernel=True))
    assert plain.peak_allocated_bytes - liger.peak_allocated_bytes > 5 * 2**30


def test_upcast_lmhead_output_does_not_raise_the_peak():
    # [T] the loss upcasts the logits to fp32 anyway: the hook's fp32 copy makes the loss's `.float()` a no-op,
    # so the loss phase gets smaller and the cross-entropy backward (the peak) stays the same
    arch = resolve_arch(QWEN3B)
    plain, up = estimate(arch, _plan()), estimate(arch, _plan(upcast_lmhead_output=True))
    assert up.peak_allocated_bytes == plain.peak_allocated_bytes
    loss = lambda e: next(p.total_bytes for p in e.phases if p.phase == "loss")
    assert loss(up) < loss(plain)


def test_full_finetuning_with_amp_keeps_fp32_masters_and_pure_bf16_does_not():
    arch = resolve_arch("Qwen/Qwen2.5-0.5B-Instruct")
    amp = estimate(arch, _plan(finetuning_type="full"))
    pure = estimate(arch, _plan(finetuning_type="full", pure_bf16=True, bf16=False))
    w_amp = sum(t.bytes for t in amp.phases[0].terms if t.name.startswith("weights_"))
    w_pure = sum(t.bytes for t in pure.phases[0].terms if t.name.startswith("weights_"))
    assert w_amp == pytest.approx(2 * w_pure, rel=0.01)
    assert amp.trainable_params == amp.all_params == 494_032_768


def test_kbit_prepare_upcasts_embeddings_to_fp32():
    arch = resolve_arch(QWEN3B)
    lf = estimate(arch, _plan(quantization_bit=4))
    peft = estimate(arch, _plan(quantization_bit=4, kbit_prepare=True))
    emb = lambda e: next(t.bytes for t in e.phases[0].terms if t.name == "weights_embed_tokens")
    assert emb(peft) == 2 * emb(lf)


def test_device_peak_equals_estimates_on_the_grid():
    """memory.step.device_peak (what the search judges plans by) is estimate's device peak, on every grid row."""
    from optimizer.memory.step import device_peak
    from optimizer.models import catalog
    from optimizer.trace.grid import GRID

    for model, plan in GRID:
        arch = catalog.resolve_arch(model)
        assert device_peak(arch, plan) == estimate(arch, plan).device_peak_bytes, (model, plan)


# [T] fake-tensor traces, `run_fake(resolve_config(model), plan, layers=n)` (optimizer/trace/run.py), bf16, cutoff_len
# 1024, QLoRA 4-bit without checkpointing: the step's peak (cross-entropy backward) with 1 and 2 decoder layers
# (Phi-3.5 padded: 2 and 3). Their difference is what one layer keeps for backward.
PER_LAYER_TRACES = [
    # Gemma 2 eager attention: the soft-capped scores' tanh output [1, 8, 1024, 1024] bf16 is saved
    ("google/gemma-2-2b-it", dict(flash_attn="disabled"), (1, 2), (5_103_170_048, 5_355_705_344)),
    # Phi-3.5 packed rows: flash sdpa's output in the contiguous query's layout, copied for o_proj (whose adapter
    # saves the copy)
    ("microsoft/Phi-3.5-mini-instruct", dict(packing=True), (1, 2), (1_001_443_840, 1_214_496_768)),
    # Phi-3.5 padded: the memory-efficient kernel's output needs no copy
    ("microsoft/Phi-3.5-mini-instruct", dict(), (2, 3), (1_206_099_968, 1_414_958_592)),
]


@pytest.mark.parametrize("model,kw,layers,traced", PER_LAYER_TRACES, ids=["gemma2-eager", "phi3-packed", "phi3-padded"])
def test_qlora_without_checkpointing_keeps_per_layer_what_the_trace_keeps(model, kw, layers, traced):
    plan = _plan(cutoff_len=1024, quantization_bit=4, disable_gradient_checkpointing=True, **kw)
    arch = resolve_arch(model)
    a, b = (estimate(arch.model_copy(update={"num_hidden_layers": n}), plan).peak_allocated_bytes for n in layers)
    assert abs((b - a) - (traced[1] - traced[0])) <= 64 * 1024, f"{b - a:,} vs {traced[1] - traced[0]:,}"
