"""The multi-GPU oracle: play rank 0 of N on fake tensors with torch.distributed's fake process group.

`dist.init_process_group("fake", store=FakeStore())` makes every collective return at once without moving data
([S] torch/testing/_internal/distributed/fake_pg.py; torchtitan scripts/estimate/estimation.py runs FSDP2 the same
way), so one process runs the real FSDP2 (`fully_shard`) or DDP code of one rank while `StorageTracker` counts the
bytes that rank would allocate. DDP and DeepSpeed's engine are not traced (its ZeRO code needs an accelerator and real
collectives; see tests/test_distributed.py for what is cross-checked against DeepSpeed's own estimators).
"""

from __future__ import annotations

import contextlib
from typing import Any

from ..errors import ConfigError
from ..schema import Plan

__all__ = ["run_fake_rank", "run_rank_extrapolated", "TRACED_ENGINES", "GRID_MULTI", "UNTRACED_ENGINES"]

TRACED_ENGINES = ("fsdp2",)
# Why the other engines have no rank oracle (benchmarks/accuracy_multi.py prints these).
UNTRACED_ENGINES = {
    "ddp": "its C++ Reducer reads parameter data across ranks (_verify_params_across_processes); fake tensors "
           "have none",
    "zero1/zero2/zero3": "DeepSpeed's engine needs an accelerator and real collectives; its model states are "
                         "cross-checked against DeepSpeed's own estimators (tests/test_distributed.py)",
    "fsdp/fsdp_grad_op": "FSDP1 flat parameters are not traced; the model shares FSDP2's rules",
    "fsdp2 + QLoRA": "bitsandbytes re-wraps the all-gathered 4-bit weight as Params4bit in forward "
                     "(nn/modules.py::fix_4bit_weight_quant_state_from_module), which a FakeTensor cannot become",
}

_Q05, _L1, _Q3 = "Qwen/Qwen2.5-0.5B-Instruct", "meta-llama/Llama-3.2-1B-Instruct", "Qwen/Qwen3-0.6B"
_SMOL, _M7, _PHI = "HuggingFaceTB/SmolLM2-1.7B-Instruct", "mistralai/Mistral-7B-Instruct-v0.3", \
    "microsoft/Phi-3.5-mini-instruct"


def _p(**kw: Any) -> Plan:
    return Plan(**{"bf16": True, "per_device_train_batch_size": 1, **kw})


_NOGC = {"disable_gradient_checkpointing": True}
_FULL = {"finetuning_type": "full"}
# The FSDP2 accuracy grid (model, plan, N): tied and untied embeddings, biases, q/k norms, MHA, fused qkv, LoRA and
# full fine-tuning, 2/4/8 GPUs, checkpointing on and off, gradient accumulation.
GRID_MULTI: list[tuple[str, Plan, int]] = [
    (_Q05, _p(cutoff_len=256), 2),
    (_Q05, _p(cutoff_len=256), 4),
    (_Q05, _p(cutoff_len=256), 8),
    (_Q05, _p(cutoff_len=1024, per_device_train_batch_size=2), 4),
    (_Q05, _p(cutoff_len=256, **_FULL), 4),
    (_Q05, _p(cutoff_len=256, **_FULL, **_NOGC), 2),
    (_Q05, _p(cutoff_len=512, **_FULL), 8),
    (_Q05, _p(cutoff_len=512, **_NOGC), 4),
    (_Q05, _p(cutoff_len=256, gradient_accumulation_steps=2, **_FULL), 4),
    (_L1, _p(cutoff_len=512), 4),
    (_L1, _p(cutoff_len=256, **_FULL), 8),
    (_L1, _p(cutoff_len=512, **_NOGC), 2),
    (_L1, _p(cutoff_len=512, **_FULL, **_NOGC), 4),
    (_Q3, _p(cutoff_len=512, **_NOGC), 2),
    (_Q3, _p(cutoff_len=512), 8),
    (_Q3, _p(cutoff_len=256, **_FULL), 4),
    (_Q3, _p(cutoff_len=256, **_FULL, **_NOGC), 2),
    (_SMOL, _p(cutoff_len=512), 4),
    (_SMOL, _p(cutoff_len=512, **_FULL), 8),
    (_SMOL, _p(cutoff_len=256, **_NOGC), 2),
    (_M7, _p(cutoff_len=512), 8),
    (_M7, _p(cutoff_len=256, **_FULL), 8),
    (_M7, _p(cutoff_len=1024, **_NOGC), 4),
    (_PHI, _p(cutoff_len=512), 4),
    (_PHI, _p(cutoff_len=256, **_FULL), 8),
]


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialized")
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _decoder_layers(hf_model: Any) -> list[Any]:
    inner = getattr(hf_model, "model", hf_model)
    return list(inner.layers)


def run_fake_rank(config: dict[str, Any], plan: Plan, engine: str, world_size: int, *, layers: int | None = None,
                  steps: int = 2) -> dict[str, int]:
    """Peak allocated bytes of rank 0 and its static bytes (step start), for `engine` in TRACED_ENGINES.

    DDP is not traceable this way: its C++ Reducer checks parameter shapes across ranks by reading tensor data
    (`_verify_params_across_processes`), which fake tensors do not have.
    """
    if engine not in TRACED_ENGINES:
        raise ConfigError(f"engine {engine!r} is not traced; traced engines: {', '.join(TRACED_ENGINES)}.")
    from ..distributed.memory import activation_plan
    from .build import build_model
    from .patches import quiet_library_warnings

    aplan = activation_plan(plan, engine)
    with quiet_library_warnings():
        built = build_model(config, aplan, layers=layers)
    with fake_process_group(world_size):
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world_size,))  # outside fake mode: the mesh reads real rank tensors
        return _traced_steps(built, aplan, plan, mesh, steps)


@contextlib.contextmanager
def _fsdp2_storage_resizes(tracker: Any):
    """FSDP2 frees and re-allocates unsharded parameters by resizing their storage (`_fsdp_param.py::free_storage`
    `storage.resize_(0)`, `alloc_storage`), which returns the memory to the CUDA caching allocator. A resize is
    not a storage death, so the tracker would keep counting it: report both to the tracker."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    resized: set[int] = set()
    real_alloc, real_free = _fsdp_param.alloc_storage, _fsdp_param.free_storage

    def free_storage(tensor: Any) -> None:
        key = tensor.untyped_storage()._cdata
        entry = tracker._live.get(key)
        real_free(tensor)
        if entry is not None and not entry[0].released and not entry[0].host:
            rec = entry[0]
            tracker.t += 1
            rec.t_free, rec.released = tracker.t, True
            tracker.current -= rec.nbytes
            resized.add(key)

    def alloc_storage(tensor: Any) -> None:
        key = tensor.untyped_storage()._cdata
        real_alloc(tensor)
        if key in resized:
            resized.discard(key)
            tracker._live.pop(key, None)
            tracker.track(tensor, "fsdp2:unsharded_param")

    saved = [(m, m.alloc_storage, m.free_storage) for m in (_fsdp_param, _fsdp_param_group)
             if hasattr(m, "free_storage")] + [(_fsdp_param_group, _fsdp_param_group.alloc_storage, None)]
    _fsdp_param.alloc_storage, _fsdp_param.free_storage = alloc_storage, free_storage
    _fsdp_param_group.alloc_storage = alloc_storage
    try:
        yield
    finally:
        for mod, a, f in saved:
            mod.alloc_storage = a
            if f is not None:
                mod.free_storage = f


def _traced_steps(built: Any, aplan: Plan, plan: Plan, mesh: Any, steps: int) -> dict[str, int]:
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from .build import materialize
    from .patches import trace_patches
    from .run import _after_first_optimizer_step
    from .tracker import StorageTracker, tracked_backward, tracking_fake_mode
    from .trainer import TrainerStep

    tracker = StorageTracker()
    stats = {}
    with trace_patches(bnb4=bool(built.bnb4), bnb8=bool(built.bnb8), bnb_optim=False), \
            tracking_fake_mode(tracker), tracked_backward(tracker), _fsdp2_storage_resizes(tracker):
        tracker.calibrate()
        materialize(built, aplan)
        # LLaMA-Factory's fsdp2_config.yaml: bf16 mixed precision -> MixedPrecisionPolicy(param_dtype=bf16);
        # one unit per decoder layer (TRANSFORMER_BASED_WRAP), then the root
        bf = plan.bf16 or plan.pure_bf16
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if bf else MixedPrecisionPolicy()
        for layer in _decoder_layers(built.hf_model):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(built.model, mesh=mesh, mp_policy=mp)
        trainer = TrainerStep(built, aplan, tracker, torch.device("cpu"))
        try:
            for i in range(1, steps + 1):
                stats[i] = trainer.step(i)
                if i == 1:
                    _after_first_optimizer_step(tracker, trainer, built, aplan)
        finally:
            trainer.close()
    m = stats[steps]
    return {"peak_allocated_bytes": m.peak_bytes, "static_bytes": m.start_bytes,
            **{"sub:" + k: v for k, v in m.sub_peaks.items()}}


def run_rank_extrapolated(config: dict[str, Any], plan: Plan, engine: str, world_size: int,
                          layers_a: int = 3, layers_b: int = 4) -> dict[str, int]:
    """Rank 0 traced with `layers_a` and `layers_b` decoder layers, extrapolated linearly to the full depth: each
    sub-phase's peak on its own, the peak the largest of them (as trace.run.run_extrapolated does: the step's peak
    can sit in the loss with 1 layer and in backward with 2, so extrapolating the two peaks would mix moments)."""
    from .run import _num_layers

    target = _num_layers(config)
    a = run_fake_rank(config, plan, engine, world_size, layers=layers_a)
    b = run_fake_rank(config, plan, engine, world_size, layers=layers_b)
    span = layers_b - layers_a
    out = {k: int(round(a.get(k, 0) + (b[k] - a.get(k, 0)) * (target - layers_a) / span)) for k in b}
    out["peak_allocated_bytes"] = max(v for k, v in out.items() if k.startswith("sub:"))
    return out
