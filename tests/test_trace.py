"""The oracle (`optimizer.trace`): fake-tensor training steps measured like torch.cuda.max_memory_allocated()."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from optimizer.errors import TrainfitError  # noqa: E402
from optimizer.models.catalog import resolve_config  # noqa: E402
from optimizer.schema import Plan  # noqa: E402
from optimizer.trace import TRACE_PHASES, TraceResult, run_cuda, run_trace, run_trace_extrapolated  # noqa: E402

pytestmark = pytest.mark.trace

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
MIB = 2**20
QWEN3B = "Qwen/Qwen2.5-3B-Instruct"

# A small Qwen2 (GQA, q/k/v biases, tied embeddings) for fast structural tests.
TINY = dict(model_type="qwen2", hidden_size=128, intermediate_size=352, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True, max_position_embeddings=1024,
            hidden_act="silu", torch_dtype="bfloat16")
# Qwen2.5-0.5B-Instruct's config.json shape (24 layers; traced with 1, 2 and 4).
QWEN05B = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
               num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
               max_position_embeddings=32768, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0,
               torch_dtype="bfloat16")


def rd512(n: int) -> int:
    return -(-n // 512) * 512


def small(**kw) -> Plan:
    base = dict(cutoff_len=60, per_device_train_batch_size=2)
    base.update(kw)
    return Plan(**base)


def lora_params_per_layer(h: int, i: int, kv: int, r: int) -> int:
    # q, k, v, o, gate, up, down: r * (in + out) each
    return r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))


# ---------------------------------------------------------------------------------------------------------------
# import behaviour
# ---------------------------------------------------------------------------------------------------------------

def test_import_is_lazy():
    code = "import sys, optimizer.trace; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_missing_extra_is_a_trainfit_error(monkeypatch):
    from optimizer.trace.run import require_trace_extra

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(TrainfitError, match=r"pip install 'trainfit\[trace\]'"):
        require_trace_extra(Plan())


# ---------------------------------------------------------------------------------------------------------------
# the tracker
# ---------------------------------------------------------------------------------------------------------------

def test_tracker_counts_rounded_storages_and_frees_them():
    from optimizer.trace.tracker import StorageTracker, tracking_fake_mode

    tr = StorageTracker()
    with tracking_fake_mode(tr):
        tr.begin_step(1)
        a = torch.empty(1000, dtype=torch.float32)  # 4000 B -> 4096
        v = a.view(10, 100)  # a view: no new storage
        b = a * 2
        assert tr.current == 2 * 4096
        del a
        assert tr.current == 2 * 4096  # the view keeps the storage alive
        del v
        assert tr.current == 4096
        c = torch.empty(3, dtype=torch.bfloat16)  # 6 B -> 512
        assert tr.current == 4096 + 512
        del b, c
        st = tr.end_step()
    assert tr.current == 0
    assert st.peak_bytes == 2 * 4096
    assert st.start_bytes == 0 and st.end_bytes == 0


def test_tracker_returns_to_baseline_after_each_step():
    from optimizer.trace.tracker import StorageTracker, tracking_fake_mode

    tr = StorageTracker()
    with tracking_fake_mode(tr):
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8))
        opt = torch.optim.AdamW(model.parameters(), fused=True)
        static = tr.current
        for step in (1, 2, 3):
            tr.begin_step(step)
            x = torch.randn(32, 64)
            loss = model(x).square().mean()
            tr.set_sub_phase("bwd_loss")
            loss.backward()
            del loss, x
            tr.set_sub_phase("opt_step")
            opt.step()
            opt.zero_grad(set_to_none=True)
            tr.end_step()
    s1, s2, s3 = tr.steps[1], tr.steps[2], tr.steps[3]
    assert s1.start_bytes == static
    assert s2.start_bytes == s2.end_bytes == s3.start_bytes == s3.end_bytes  # steady state, nothing leaks
    assert s2.start_bytes > static  # optimizer state appeared in step 1
    assert s2.peak_bytes == s3.peak_bytes


@pytest.mark.parametrize("amp", [True, False])
def test_gradient_sums_are_in_place_exactly_when_eager_autograd_does_it(amp):
    """A tied weight gets two gradients; autograd's InputBuffer adds them in place only if the first one is an
    exclusively owned dense tensor (with AMP: yes; without: it is a transposed view, so no). Fake tensors never
    take the in-place path themselves; the tracker must reproduce eager autograd's choice."""
    import contextlib

    from torch.profiler import ProfilerActivity, profile

    from optimizer.trace.tracker import StorageTracker, tracked_backward, tracking_fake_mode

    def graph():
        w = torch.nn.Parameter(torch.randn(1000, 64))
        ids = torch.randint(0, 1000, (32,))
        with torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            y = torch.nn.functional.linear(torch.nn.functional.embedding(ids, w), w)
        return w, y.float().sum()

    w, loss = graph()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss.backward()
    eager_inplace = any(e.name == "aten::add_" and e.input_shapes[:1] == [[1000, 64]] for e in prof.events())
    assert eager_inplace == amp

    tr = StorageTracker()
    with tracking_fake_mode(tr), tracked_backward(tr):
        tr.calibrate()
        before = tr.inplace_accumulations
        w, loss = graph()
        tr.begin_step(1)
        tr.set_sub_phase("bwd_loss")
        loss.backward()
        del loss
        tr.end_step()
        adds = [r for r in tr.records if r.step == 1 and r.shape == (1000, 64) and r.op == "aten::add.Tensor"]
    assert (tr.inplace_accumulations - before == 1) == amp
    assert bool(adds) == (not amp)


def test_trace_has_no_leak_and_consistent_phases():
    r = run_trace(TINY, small(bf16=True), steps=3)
    assert r.end_bytes == r.static_bytes
    assert set(r.phase_peaks) == set(TRACE_PHASES)
    assert r.peak_allocated_bytes == max(r.phase_peaks.values()) == max(r.sub_phase_peaks.values())
    assert r.phase_peaks[r.peak_phase] == r.peak_allocated_bytes
    assert sum(r.peak_breakdown.values()) == r.peak_allocated_bytes
    assert r.top_tensors and r.top_tensors[0].bytes >= r.top_tensors[-1].bytes
    TraceResult.model_validate(r.model_dump())  # round-trips


# ---------------------------------------------------------------------------------------------------------------
# LoRA on Qwen2.5-3B (2 layers)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_lora_two_layers_qwen3b():
    cfg = resolve_config(QWEN3B)
    plan = Plan(cutoff_len=512, per_device_train_batch_size=1, bf16=True)
    r = run_trace(cfg, plan, layers=2)
    n, v, h = 512, 151936, 2048
    assert r.layers == 2 and r.seq_len == 512 and r.arch == "qwen2"
    assert r.trainable_params == 2 * 415_744
    assert r.all_params == 311_164_928 + 2048 + 2 * 77_076_992 + 2 * 415_744
    # load: bf16 base weights + fp32 LoRA (+ two rotary buffers); step 2 adds fused-AdamW m, v (+ step tensors)
    base = 311_164_928 + 2048 + 2 * 77_076_992
    assert r.load_bytes == pytest.approx(2 * base + 4 * r.trainable_params, abs=2 * MIB)
    assert r.static_bytes - r.load_bytes == pytest.approx(8 * r.trainable_params, abs=1 * MIB)
    # with checkpointing the peak is the cross-entropy backward: the saved fp32 log-softmax plus two fp32
    # logits-sized gradients (12 B per token x vocab), over 2 checkpoints + the fp32 final-norm input
    assert r.peak_phase == "backward" and r.peak_sub_phase == "bwd_loss"
    extra = r.peak_allocated_bytes - r.static_bytes - 12 * n * v
    assert 2 * n * h * 2 + 4 * n * h <= extra <= 2 * n * h * 2 + 4 * n * h + 1 * MIB
    big = [t for t in r.top_tensors if t.shape == [n, v]]
    assert {t.op for t in big} == {"aten::_log_softmax", "aten::nll_loss_backward", "aten::_log_softmax_backward_data"}
    assert not r.step1_measured


@pytest.mark.slow
def test_step1_derived_equals_measured():
    cfg = resolve_config(QWEN3B)
    plan = Plan(cutoff_len=128, per_device_train_batch_size=1)
    fast = run_trace(cfg, plan, layers=1)
    full = run_trace(cfg, plan, layers=1, measure_step1=True)
    assert full.step1_measured and not fast.step1_measured
    assert fast.step1_peak_bytes == full.step1_peak_bytes
    assert fast.peak_allocated_bytes == full.peak_allocated_bytes
    assert fast.sub_phase_peaks == full.sub_phase_peaks


@pytest.mark.parametrize("kw", [
    dict(bf16=True, quantization_bit=4),
    dict(fp16=True),
    dict(finetuning_type="full", bf16=True),
    dict(optim="adamw_torch"),
    dict(optim="sgd", disable_gradient_checkpointing=True, lora_dropout=0.1),
], ids=["qlora", "fp16", "full", "foreach", "sgd-nogc-dropout"])
def test_primed_step1_is_exact(kw):
    if kw.get("quantization_bit"):
        pytest.importorskip("bitsandbytes")
    plan = small(**kw)
    fast = run_trace(TINY, plan)
    full = run_trace(TINY, plan, measure_step1=True)
    assert fast.sub_phase_peaks == full.sub_phase_peaks
    assert fast.static_bytes == full.static_bytes
    assert fast.step1_peak_bytes == full.step1_peak_bytes


@pytest.mark.parametrize("model_type,extra", [
    ("llama", dict(tie_word_embeddings=False)),
    ("gemma3_text", dict(head_dim=32, sliding_window=32, query_pre_attn_scalar=32)),
    ("gemma2", dict(head_dim=32, final_logit_softcapping=30.0, sliding_window=512, query_pre_attn_scalar=32)),
    # (Glm4Config's default pad_token_id 151329 is outside the tiny vocabulary)
    ("glm4", dict(head_dim=32, partial_rotary_factor=0.5, attention_bias=True, pad_token_id=0)),
])
def test_other_families(model_type, extra):
    cfg = dict(TINY, model_type=model_type, **extra)
    r = run_trace(cfg, small(bf16=True))
    assert r.arch == model_type and r.end_bytes == r.static_bytes
    fused_gate_up = 8 * 128 if model_type == "glm4" else 0  # one gate_up_proj adapter: r (h + 2i), not 2 r (h + i)
    assert r.trainable_params == 3 * (lora_params_per_layer(128, 352, 2 * r_head_dim(cfg), 8) - fused_gate_up)
    if model_type == "gemma2":  # no sdpa in transformers: eager, with a note
        assert any("eager" in n for n in r.notes)


def r_head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


# ---------------------------------------------------------------------------------------------------------------
# extrapolation in layers
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("gc", [True, False])
def test_extrapolation_matches_direct_run(gc):
    cfg = dict(QWEN05B, num_hidden_layers=4)
    plan = Plan(cutoff_len=256, per_device_train_batch_size=1, bf16=True, disable_gradient_checkpointing=not gc)
    direct = run_trace(cfg, plan)
    ex = run_trace_extrapolated(cfg, plan, layers_a=1, layers_b=2)
    assert ex.extrapolated and ex.layers == direct.layers == 4
    assert ex.peak_allocated_bytes == pytest.approx(direct.peak_allocated_bytes, rel=0.005)
    assert ex.static_bytes == pytest.approx(direct.static_bytes, rel=0.005)
    for phase in TRACE_PHASES:
        assert ex.phase_peaks[phase] == pytest.approx(direct.phase_peaks[phase], rel=0.005)
    assert ex.peak_phase == direct.peak_phase
    assert (ex.trainable_params, ex.all_params) == (direct.trainable_params, direct.all_params)


# ---------------------------------------------------------------------------------------------------------------
# QLoRA
# ---------------------------------------------------------------------------------------------------------------

def _bnb4_bytes(out_f: int, in_f: int, double_quant: bool) -> int:
    """bitsandbytes storage of one quantized Linear (blocksize 64): packed data, absmax, nested state, codes."""
    n = out_f * in_f
    blocks = -(-n // 64)
    total = rd512(n // 2) + 512  # 4-bit data (2 per byte, whatever the storage dtype) + the 16-entry nf4/fp4 code
    if double_quant:  # uint8 absmax + fp32 absmax per 256 blocks + 256-entry fp32 code + fp32 offset
        total += rd512(blocks) + rd512(4 * -(-blocks // 256)) + 1024 + 512
    else:
        total += rd512(4 * blocks)
    return total


@pytest.mark.slow
@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_static_bytes_match_bnb_storage(double_quant):
    pytest.importorskip("bitsandbytes")
    cfg = resolve_config(QWEN3B)
    kw = dict(cutoff_len=64, per_device_train_batch_size=1, bf16=True)
    r16 = run_trace(cfg, Plan(**kw), layers=2)
    r4 = run_trace(cfg, Plan(**kw, quantization_bit=4, double_quantization=double_quant), layers=2)
    h, i, kv = 2048, 11008, 256
    linears = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
    expected = 2 * sum(_bnb4_bytes(o, k, double_quant) - rd512(2 * o * k) for o, k in linears)
    assert r4.load_bytes - r16.load_bytes == expected
    # LLaMA-Factory counts a 4-bit weight as numel * 2 * quant_storage itemsize: the unquantized count
    assert (r4.trainable_params, r4.all_params) == (r16.trainable_params, r16.all_params)
    assert r4.peak_phase == "backward"
    assert any(t.op.startswith("param:") and t.dtype == "bfloat16" and t.shape[1:] == [1] for t in r4.top_tensors)


@pytest.mark.slow
def test_qlora_full_qwen3b_matches_llamafactory_log():
    """LLaMA-Factory log for Qwen2.5-3B-Instruct, QLoRA r=8 target all:
    `trainable params: 14,966,784 || all params: 3,100,905,472 || trainable%: 0.4827`."""
    pytest.importorskip("bitsandbytes")
    cfg = resolve_config(QWEN3B)
    r = run_trace(cfg, Plan(quantization_bit=4, cutoff_len=512, per_device_train_batch_size=1, bf16=True))
    assert r.layers == 36
    assert r.trainable_params == 14_966_784
    assert r.all_params == 3_100_905_472
    assert f"{100 * r.trainable_params / r.all_params:.4f}" == "0.4827"
    assert r.peak_phase == "backward"
    assert 2.5 * GIB < r.peak_allocated_bytes < 4.5 * GIB


def test_param_counts_lora_formula():
    r = run_trace(TINY, small(lora_rank=4))
    h, i, kv = 128, 352, 64
    base = 2048 * h + 3 * (h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h) + h
    lora = 3 * lora_params_per_layer(h, i, kv, 4)
    assert (r.trainable_params, r.all_params) == (lora, base + lora)


# ---------------------------------------------------------------------------------------------------------------
# plan knobs
# ---------------------------------------------------------------------------------------------------------------

def test_full_finetuning_upcasts_to_fp32_and_pure_bf16_does_not():
    amp = run_trace(TINY, small(finetuning_type="full", bf16=True))
    pure = run_trace(TINY, small(finetuning_type="full", pure_bf16=True))
    n = amp.all_params
    assert amp.trainable_params == n
    # fused AdamW: weights + m + v in fp32 (12 B) vs bf16 (6 B) per parameter, plus one 512-B step per tensor
    assert amp.static_bytes - pure.static_bytes == pytest.approx(6 * n, rel=0.01)
    assert amp.static_bytes > 12 * n


def test_optimizers():
    fused = run_trace(TINY, small(optim="adamw_torch_fused"))
    foreach = run_trace(TINY, small(optim="adamw_torch"))
    sgd = run_trace(TINY, small(optim="sgd"))
    n_tensors = 3 * 7 * 2  # LoRA A and B of 7 linears x 3 layers
    # fused AdamW keeps its step counters on the device, foreach AdamW on the host
    assert fused.static_bytes - foreach.static_bytes == n_tensors * 512
    assert sgd.static_bytes == sgd.load_bytes + 512  # plain SGD has no state; 512 B: the Trainer's loss scalar
    assert foreach.static_bytes - sgd.static_bytes == sum(
        2 * rd512(4 * n) for n in _lora_tensor_numels(TINY, 8))
    pytest.importorskip("bitsandbytes")
    # bitsandbytes keeps 32-bit states for tensors under 4096 elements: use rank 64 (64 x 128 = 8192)
    bnb8 = run_trace(TINY, small(optim="adamw_8bit", lora_rank=64))
    foreach64 = run_trace(TINY, small(optim="adamw_torch", lora_rank=64))
    n = sum(_lora_tensor_numels(TINY, 64))
    # two uint8 states (+ fp32 absmax per 256 elements) instead of two fp32 states
    assert foreach64.static_bytes - bnb8.static_bytes == pytest.approx(6 * n, rel=0.05)


def _lora_tensor_numels(cfg: dict, r: int) -> list[int]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    return [n for _ in range(cfg["num_hidden_layers"]) for a, b in shapes for n in (r * a, r * b)]


def test_fp16_runs_grad_scaler_phase():
    r = run_trace(TINY, small(fp16=True))
    assert "opt_unscale" in r.sub_phase_peaks and "out_fp32" in r.sub_phase_peaks


def test_no_checkpointing_keeps_more_activations():
    gc = run_trace(TINY, small(bf16=True))
    nogc = run_trace(TINY, small(bf16=True, disable_gradient_checkpointing=True))
    assert nogc.peak_breakdown["fwd"] > gc.peak_breakdown["fwd"]


def test_eager_and_fa2_notes():
    eager = run_trace(TINY, small(flash_attn="disabled"))
    fa2 = run_trace(TINY, small(flash_attn="fa2"))
    sdpa = run_trace(TINY, small(flash_attn="sdpa"))
    assert any("fa2" in n for n in fa2.notes)
    # sdpa's worst case is a padded batch (a bool [b, 1, s, s] mask, an additive copy and repeated K/V per layer);
    # FA2 unpads, so fa2 traces the unmasked sdpa step (the same as sdpa on packed rows of exactly cutoff_len)
    assert fa2.peak_allocated_bytes < sdpa.peak_allocated_bytes
    assert eager.peak_breakdown.get("fwd", 0) >= sdpa.peak_breakdown.get("fwd", 0)


def test_sdpa_backend_follows_cuda_dispatch():
    fp32 = dict(TINY, torch_dtype="float32")  # GQA (4 query heads, 2 kv heads)
    # packed rows of exactly cutoff_len: no mask, so transformers asks sdpa for GQA (with a padded batch's mask it
    # repeats K/V itself and the memory-efficient kernel runs)
    math = run_trace(fp32, small(cutoff_len=64, packing=True, disable_gradient_checkpointing=True))
    assert any("math kernel" in n for n in math.notes)  # no fused CUDA kernel takes fp32 + GQA
    padded = run_trace(fp32, small(cutoff_len=64, disable_gradient_checkpointing=True))
    assert not any("math kernel" in n for n in padded.notes)
    amp = run_trace(fp32, small(cutoff_len=64, packing=True, bf16=True, disable_gradient_checkpointing=True))
    assert any("stood in" in n for n in amp.notes) and not any("math kernel" in n for n in amp.notes)
    # the math kernel keeps [B, heads, S, S] fp32 probabilities per layer
    s = 64
    assert math.peak_breakdown["fwd"] - amp.peak_breakdown["fwd"] >= 3 * 2 * 4 * s * s * 4


def test_layers_override_truncates_layer_types():
    cfg = dict(TINY, layer_types=["full_attention"] * 3)
    r = run_trace(cfg, small(), layers=1)
    assert r.layers == 1 and r.trainable_params == lora_params_per_layer(128, 352, 64, 8)


def test_lora_targets_dropout_and_additional_target():
    qv = run_trace(TINY, small(lora_target="q_proj,v_proj"))
    h, kv = 128, 64
    assert qv.trainable_params == 3 * 8 * ((h + h) + (h + kv))
    drop = run_trace(TINY, small(lora_target="q_proj,v_proj", lora_dropout=0.1, disable_gradient_checkpointing=True))
    nodrop = run_trace(TINY, small(lora_target="q_proj,v_proj", disable_gradient_checkpointing=True))
    assert drop.peak_breakdown["fwd"] > nodrop.peak_breakdown["fwd"]
    extra = run_trace(TINY, small(lora_target="q_proj", additional_target="lm_head"))
    assert extra.trainable_params == 3 * 8 * (h + h) + 2048 * h


def test_upcast_options():
    cfg = dict(TINY, hidden_size=256)  # norm weights of 256 elements: 512 B in bf16, 1024 B in fp32
    base = run_trace(cfg, small(bf16=True))
    ln = run_trace(cfg, small(bf16=True, upcast_layernorm=True))
    assert ln.load_bytes - base.load_bytes == (2 * 3 + 1) * 512
    head = run_trace(cfg, small(bf16=True, upcast_lmhead_output=True))
    # The hook's fp32 logits make the loss's logits.float() a no-op: while the CE runs, fp32 logits +
    # log-softmax (8 B per token x vocab) are live instead of bf16 logits + fp32 copy + log-softmax (10 B).
    n_v = 2 * 64 * 2048
    assert base.sub_phase_peaks["loss_ce"] - head.sub_phase_peaks["loss_ce"] == 2 * n_v
    assert base.sub_phase_peaks["bwd_loss"] == head.sub_phase_peaks["bwd_loss"]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_tiny_runs(bits):
    pytest.importorskip("bitsandbytes")
    r = run_trace(TINY, small(quantization_bit=bits, bf16=True))
    plain = run_trace(TINY, small(bf16=True))
    assert r.load_bytes < plain.load_bytes
    assert r.trainable_params == plain.trainable_params


def test_kbit_prepare_upcasts_non_quantized_params():
    pytest.importorskip("bitsandbytes")
    lf = run_trace(TINY, small(quantization_bit=4))
    prep = run_trace(TINY, small(quantization_bit=4, kbit_prepare=True))
    assert prep.load_bytes - lf.load_bytes >= 2 * 2048 * 128  # the bf16 embedding became fp32
    assert any("kbit" in n for n in prep.notes)


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------

def test_liger_is_not_traceable():
    with pytest.raises(NotImplementedError, match="Liger"):
        run_trace(TINY, small(enable_liger_kernel=True))


def test_run_cuda_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(TrainfitError, match="no CUDA device"):
        run_cuda(TINY, small())


def test_real_tensor_path_on_cpu():
    """run_cuda's code path (real weights, real GradScaler) on the CPU, where it reports no memory figures."""
    from optimizer.trace.cuda import run_on_device

    for plan in (small(), small(fp16=True), small(finetuning_type="full", bf16=True)):
        r = run_on_device(TINY, plan, layers=2, steps=2, device=torch.device("cpu"))
        assert r.layers == 2 and r.peak_allocated_bytes == 0 and r.peak_reserved_bytes is None
        fake = run_trace(TINY, plan, layers=2)
        assert (r.trainable_params, r.all_params) == (fake.trainable_params, fake.all_params)
    assert math.isfinite(r.wall_s)


def test_sub_phases_name_the_memory_models_phases_and_moments():
    # one vocabulary: every traced sub-phase maps to a schema.Phase and a schema.Moment of that phase
    from optimizer.schema import PHASES, Moment
    from optimizer.trace import MOMENT_OF_SUB, TRACE_SUB_PHASES
    from optimizer.trace.tracker import PHASE_OF_SUB

    assert TRACE_PHASES == PHASES
    assert set(MOMENT_OF_SUB) == set(TRACE_SUB_PHASES) == set(PHASE_OF_SUB) - {"setup"}
    assert {PHASE_OF_SUB[s] for s in TRACE_SUB_PHASES} == set(PHASES)
    assert all(isinstance(m, Moment) for m in MOMENT_OF_SUB.values())
