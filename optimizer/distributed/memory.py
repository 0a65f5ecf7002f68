"""Memory per GPU under DDP, DeepSpeed ZeRO-1/2/3 and FSDP, and host RAM per node. PURE, int bytes.

The single-GPU `estimate` gives the activation terms (never sharded by any of these engines: ZeRO paper,
Rajbhandari et al. 2020, Sec. 5 partitions model states only; LLaMA-Factory #5972). This module replaces its
model-state terms (weights, adapters, gradients, optimizer states) with what each engine keeps on one rank, and
adds the engine's buffers (DDP gradient buckets, ZeRO reduce buckets, gathered parameters).

Legend: N GPUs in all, n per node, T trainable parameters, F frozen base bytes, h hidden_size.
Rules carry [S] (read in the named source) or [T] (checked by optimizer/trace/distributed.py on fake ranks).
"""

from __future__ import annotations

import dataclasses

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError
from ..memory import estimate, layer_forward, setting_for
from ..memory.allocator import device_peak_for, large_blocks_at
from ..memory.precision import FP32, Setting
from ..memory.static import (
    _bnb8_state_bytes,
    _sum_alloc,
    base_weight_bytes,
    linear_weight_bytes,
    paged_state_bytes,
    trainable_tensor_numels,
)
from ..models.arch import layer_linears, param_counts
from ..schema import Arch, Estimate, MemoryTerm, Moment, PhasePeak, Plan
from ..units import alloc_bytes, ceil_div
from .engines import DEEPSPEED, DistSettings, validate, zero_values

__all__ = ["DistEstimate", "per_gpu", "activation_plan", "shards_text"]

Groups = tuple[tuple[int, int, int], ...]  # (numel, count, bytes per element) of trainable tensors

# Terms of the single-GPU estimate that are model states (rebuilt per engine below).
_STATE_TERMS = {"weights_decoder_linears", "weights_embed_tokens", "weights_lm_head", "weights_norms", "adapters",
                "optimizer_states", "grads", "optimizer_step_temporaries"}
# [S] accelerate accelerator.py: native_amp is off under DeepSpeed (DeepSpeed casts the module itself), and FSDP
# full fine-tuning keeps bf16 parameters (LLaMA-Factory adapter.py: no fp32 upcast under ZeRO-3/FSDP): no fp32
# weight for autocast to cast, so these terms vanish.
_CAST_TERMS = {"autocast_weight_cache", "lm_head_weight_cast"}


class DistEstimate(BaseModel):
    """Per-GPU memory of one rank, host RAM of one node, and which engine shards what."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    engine: str = Field(description="ddp, zero1, zero2, zero3, fsdp, fsdp2 or fsdp_grad_op.")
    num_gpus: int = Field(description="World size.")
    nodes: int = Field(description="Machines.")
    offload: str = Field(description="none, optimizer or params.")
    phases: list[PhasePeak] = Field(description="Per-GPU peak allocated bytes of each phase, term by term.")
    peak_phase: str = Field(description="The phase holding the per-GPU peak.")
    peak_allocated_bytes: int = Field(description="Per-GPU predicted torch.cuda.max_memory_allocated().")
    device_peak_bytes: int = Field(description="Per-GPU nvidia-smi estimate (reserved + CUDA context; NCCL "
                                   "buffers not included).")
    single_gpu_peak_allocated_bytes: int = Field(description="The same plan on one GPU, for comparison.")
    host_terms: list[MemoryTerm] = Field(description="Host RAM per node: loading terms and steady offload terms "
                                         "(see detail).")
    host_peak_bytes: int = Field(description="Host RAM per node at its worst moment (loading or steady offload).")
    shards: list[str] = Field(description="Which engine shards what, in words.")
    notes: list[str] = Field(default_factory=list, description="Assumptions.")


def activation_plan(plan: Plan, engine: str) -> Plan:
    """The plan whose single-GPU dtypes match the engine's: DeepSpeed casts the whole module to bf16 and turns
    autocast off ([S] deepspeed runtime/engine.py::_configure_distributed_model, _cast_module_mixed_precision;
    accelerate: native_amp off under DeepSpeed); FSDP full fine-tuning keeps the checkpoint's bf16 parameters
    ([S] LLaMA-Factory model/adapter.py::init_adapter: cast_trainable_params_to_fp32 stays False under
    ZeRO-3/FSDP without quantization) -- the single-GPU `pure_bf16` setting in both cases."""
    bf = plan.bf16 or plan.pure_bf16
    if bf and (engine in DEEPSPEED or (engine.startswith("fsdp") and plan.finetuning_type == "full")):
        return plan.model_copy(update={"pure_bf16": True, "bf16": False, "fp16": False})
    return plan


def _compute_setting(arch: Arch, plan: Plan, engine: str) -> Setting | None:
    """The dtypes the step computes in when the engine changes them, else None. Under FSDP with bf16 mixed
    precision the fp32 LoRA shards are all-gathered as bf16 (MixedPrecisionPolicy param_dtype: [S] torch
    _fully_shard/_fsdp_param.py::init_all_gather_outputs; FSDP1 MixedPrecision the same), so PEFT's
    `_cast_input_dtype(x, lora_A.weight.dtype)` and autocast's casts of each adapter input never happen: the
    activations are those of bf16 adapters under autocast. [T] accuracy_multi LoRA no-GC rows (a fp32-adapter
    walk overstated Qwen3-0.6B s512 N=2 by 5.7%)."""
    if not (engine.startswith("fsdp") and plan.finetuning_type != "full" and plan.bf16 and not plan.pure_bf16):
        return None
    return dataclasses.replace(setting_for(arch, plan), lora_w=2)


def _shard(groups: Groups, N: int, w: int | None = None) -> Groups:
    """Each tensor split on its first dimension over N ranks, padded ([S] torch distributed/fsdp/_fully_shard/
    _fsdp_param.py: Shard(0) with padding to a multiple of N; FSDP1 flat parameters pad the same way)."""
    return tuple((ceil_div(n, N), k, w or ew) for n, k, ew in groups)


def _flat(T: int, N: int, w: int) -> int:
    """One flat partition of T elements over N ranks ([S] deepspeed stage_1_and_2.py / stage3.py: the bit16 and
    fp32 groups are flattened and split in N equal, aligned partitions)."""
    return alloc_bytes(ceil_div(T, N) * w)


def _opt_states(groups: Groups, optim: str) -> int:
    """The same rules as memory.static.optimizer_state_bytes, on the given (possibly sharded) tensors."""
    if optim in ("adamw_torch", "adamw_torch_fused"):
        step = alloc_bytes(FP32) if optim == "adamw_torch_fused" else 0
        return 2 * _sum_alloc(groups) + sum(k for _, k, _ in groups) * step
    if optim in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"):
        return _bnb8_state_bytes(groups)
    return 0


def _step_temps(groups: Groups, optim: str, clip: bool) -> int:
    n_t = sum(k for _, k, _ in groups)
    c = n_t * alloc_bytes(FP32) + alloc_bytes(n_t * FP32) + alloc_bytes(FP32) if clip else 0
    return c + (_sum_alloc(groups) if optim == "adamw_torch" else 0)


def _frozen_parts(arch: Arch, st: Setting) -> tuple[int, int, int]:
    """(shardable, never sharded, norms) bytes of the frozen base (LoRA). A 4-bit weight's packed data is a
    parameter stored as the 16-bit quant_storage dtype and shards like one; its QuantState (absmax, code, nested
    statistics) is a Python attribute, not a parameter, so every rank keeps all of it ([S] bitsandbytes
    nn/modules.py::Params4bit; LLaMA-Factory sets bnb_4bit_quant_storage = compute dtype "crucial for fsdp+qlora")."""
    if st.full:
        return 0, 0, 0
    w = base_weight_bytes(arch, st)
    L = arch.num_hidden_layers
    if st.quant == 4:
        packed = L * sum(alloc_bytes(ceil_div(m.weight_numel, 4) * 2) for m in layer_linears(arch))
        fixed = w["decoder_linears"] - packed
    else:
        packed, fixed = w["decoder_linears"], 0
    return packed + w["embed_tokens"] + w["lm_head"], fixed, w["norms"]


def _layer_unsharded(arch: Arch, st: Setting, lora_numel: int) -> int:
    """One decoder layer's parameters as the all-gather materializes them: 16-bit (FSDP MixedPrecision
    param_dtype bf16 / DeepSpeed's bf16 module), 4-bit packed data for QLoRA, LoRA adapters of the layer."""
    lin = sum(linear_weight_bytes(m, st) if st.quant else alloc_bytes(m.weight_numel * 2) for m in layer_linears(arch))
    if st.quant == 4:
        lin = sum(alloc_bytes(ceil_div(m.weight_numel, 4) * 2) for m in layer_linears(arch))
    pc = param_counts(arch)
    return lin + alloc_bytes(pc.per_layer_norms * 2) + alloc_bytes(lora_numel * 2)


def per_gpu(arch: Arch, plan: Plan, dist: DistSettings, single: Estimate | None = None) -> DistEstimate:
    """The per-GPU breakdown of `plan` on `dist.num_gpus` GPUs with `dist.engine`, plus host RAM per node."""
    validate(dist, plan)
    if arch.is_moe:
        raise ConfigError(f"{arch.name} is a mixture-of-experts model; trainfit models MoE on one GPU only (how "
                          "FSDP/ZeRO shard the fused 3-D experts is not modelled). Plan it for one GPU.")
    eng, N, n_node = dist.engine, dist.num_gpus, dist.gpus_per_node
    aplan = activation_plan(plan, eng)
    cst = _compute_setting(arch, aplan, eng)
    # FSDP changes which backward moment is largest (gradients appear unit by unit): rebuild them all. DDP/ZeRO keep
    # the single-GPU estimate's moment (their rules are not per-moment; not traced).
    base = estimate(arch, aplan, cst, all_moments=eng.startswith("fsdp"))
    one = single.peak_allocated_bytes if single is not None else estimate(arch, plan).peak_allocated_bytes
    st = setting_for(arch, aplan)
    L, V, H = arch.num_hidden_layers, arch.vocab_size, arch.hidden_size
    groups: Groups = trainable_tensor_numels(arch, aplan, st)
    T = sum(n * k for n, k, _ in groups)
    weights = base_weight_bytes(arch, st)
    frozen_shardable, frozen_fixed, norms = _frozen_parts(arch, st)
    off_opt = dist.offload in ("optimizer", "params")
    off_par = dist.offload == "params"
    clip = plan.max_grad_norm > 0
    lora_layer_numel = 0 if st.full else sum(n * k for n, k, w in groups if w == st.lora_w) // L
    lay = layer_forward(arch, st)
    zv = zero_values(arch, dist)

    static: list[tuple[str, int, str]] = []  # every phase
    grads_bwd: list[tuple[str, int, str]] = []  # backward and optimizer phases
    opt_only: list[tuple[str, int, str]] = []  # optimizer phase
    ws = {"fwd": 0, "loss": 0, "bwd": 0, "emb": 0}  # gathered parameters per phase kind (emb: end of backward)
    grads_by_moment: dict[Moment, int] = {}  # grads term per backward moment where it differs from grads_bwd
    host: list[tuple[str, int, str]] = []
    shards: list[str] = []
    notes: list[str] = []
    trainable_single = _sum_alloc(groups)
    weight_terms = [("weights_" + k, v, "frozen, full copy" if not st.full else "trainable, full copy")
                    for k, v in weights.items()]
    pc = param_counts(arch)
    model_numel = pc.total

    if eng == "ddp":
        static += weight_terms
        if not st.full:
            static.append(("adapters", trainable_single, "LoRA A/B, full copy"))
        static.append(("optimizer_states", _opt_states(groups, plan.optim), f"{plan.optim}, full copy"))
        # [S] torch/csrc/distributed/c10d/reducer.cpp::Reducer::initialize_buckets: one flat gradient tensor per
        # bucket (bucket_cap_mb 25, first bucket 1 MiB: torch nn/parallel/distributed.py), allocated at
        # construction and kept; with gradient_as_bucket_view=False (the default, also accelerate's) param.grad
        # is a separate tensor, so the gradients exist twice.
        n_buckets = max(1, ceil_div(trainable_single, dist.ddp_bucket_cap_mb * 1024 * 1024))
        static.append(("ddp_gradient_buckets", alloc_bytes(trainable_single) + 512 * (n_buckets - 1),
                       f"a flat copy of every trainable gradient in {n_buckets} bucket(s) of <= "
                       f"{dist.ddp_bucket_cap_mb} MB"))
        grads_bwd.append(("grads", trainable_single, "param.grad of every trainable tensor"))
        opt_only.append(("optimizer_step_temporaries", _step_temps(groups, plan.optim, clip), "clip norms"))
        shards.append("DDP shards nothing: every GPU holds the whole model, its gradients and optimizer states, "
                      "plus a bucketed copy of the gradients for all-reduce.")
        host.append(("load_checkpoint_per_rank", n_node * alloc_bytes(model_numel * st.ckpt_w),
                     f"{n_node} ranks each load the full checkpoint in host RAM before moving it to their GPU"))
    elif eng in DEEPSPEED:
        tw = st.train_w if st.full else 2 if (plan.bf16 or plan.pure_bf16 or plan.fp16) else FP32
        stage = int(eng[-1])
        rbs = zv.reduce_bucket_size
        # trainable parameters: the bit16 copy DeepSpeed trains (full on every rank for stages 1-2)
        if stage < 3:
            static += weight_terms if not st.full else [("weights_trainable_bf16", alloc_bytes(T * tw),
                                                          "bit16 flat groups, full copy")]
            if not st.full:
                static.append(("adapters", alloc_bytes(T * tw), "LoRA A/B cast to bf16 by DeepSpeed, full copy"))
        master = _flat(T, N, FP32)
        states = 2 * master if plan.optim in ("adamw_torch", "adamw_torch_fused") else (
            2 * _flat(T, N, 1) + 2 * _flat(ceil_div(T, 256), N, FP32) if "8bit" in plan.optim else 0)
        if not off_opt:
            # [S] stage_1_and_2.py / stage3.py: single_partition_of_fp32_groups (fp32 master partition); the
            # wrapped torch optimizer's states live on that partition.
            static.append(("fp32_master_partition", master, f"fp32 master weights, 1/{N}"))
            static.append(("optimizer_states", states, f"{plan.optim} states of the fp32 partition, 1/{N}"))
            opt_only.append(("fp32_grad_partition", master, f"fp32 gradient of the partition for the step, 1/{N}"))
        else:
            host.append(("offloaded_optimizer", n_node * (2 * master + states),
                         f"{n_node} ranks x (fp32 master + fp32 grad + {plan.optim} states) of 1/{N}, pinned"))
        if stage == 1:
            # [S] stage_1_and_2.py: stage 1 keeps full bit16 gradients until the step; setup_buckets: "ZeRO-1 stages
            # the fp32 accumulator" -> reduce_bucket_size elements of fp32
            grads_bwd.append(("grads", alloc_bytes(T * tw), "full bit16 gradients (stage 1 partitions only states)"))
            static.append(("zero_reduce_bucket", alloc_bytes(rbs * FP32),
                           f"ipg bucket, reduce_bucket_size {rbs:.3g} fp32"))
            shards.append(f"ZeRO-1 shards the fp32 master weights and optimizer states (1/{N}); gradients and weights "
                          "stay whole on every GPU.")
        elif stage == 2:
            # [S] stage_1_and_2.py: grads_in_partition (bit16, the rank's partition), allocated once; setup_buckets:
            # one ipg buffer of reduce_bucket_size elements (two with overlap_comm; LLaMA-Factory sets it false)
            static.append(("zero_reduce_bucket", alloc_bytes(rbs * tw), f"ipg bucket, reduce_bucket_size {rbs:.3g}"))
            if not off_opt:
                grads_bwd.append(("grads_partition", _flat(T, N, tw), f"bit16 gradient partition, 1/{N}"))
            shards.append(f"ZeRO-2 shards gradients, fp32 master weights and optimizer states of the trainable "
                          f"parameters (1/{N}); the weights (for LoRA: the whole frozen base) stay whole on every GPU.")
        else:
            pt = zv.persistence_threshold
            persistent = sum(k * alloc_bytes(n * tw) for n, k, _ in groups if n < pt)
            part = _flat(sum(n * k for n, k, _ in groups if n >= pt), N, tw)
            if not off_par:
                # [S] partition_parameters.py: params under stage3_param_persistence_threshold elements are never
                # partitioned (ds_persist); the rest keep 1/N of their elements.
                static.append(("params_partition", part + (ceil_div(frozen_shardable, N) if not st.full else 0),
                               f"bf16 partitions of the parameters, 1/{N}"))
            else:
                host.append(("offloaded_params", n_node * (part + ceil_div(frozen_shardable, N)),
                             f"{n_node} ranks x their 1/{N} bf16 parameter partition, pinned"))
            static.append(("persistent_params", persistent + norms + frozen_fixed,
                           f"params under stage3_param_persistence_threshold ({pt}) and 4-bit quant states, whole"))
            static.append(("zero_reduce_bucket", alloc_bytes(rbs * tw),
                           f"ipg bucket, reduce_bucket_size {rbs:.3g} (auto h^2)"))
            if not off_opt:
                # [S] stage3.py: grad_partitions_flat_buffer, dtype gradient_accumulation_dtype (= model dtype)
                static.append(("grads_partition", _flat(T, N, tw), f"bf16 gradient partition, 1/{N}"))
            layer_b = _layer_unsharded(arch, st, lora_layer_numel)
            prefetch = min(zv.prefetch_bucket_size * 2, layer_b)
            head = alloc_bytes(V * H * 2)
            live = zv.max_live_parameters * 2
            # [S] stage3.py / partitioned_param_coordinator.py: a module's params are all-gathered before its
            # forward/backward and released after; up to stage3_prefetch_bucket_size elements of the next
            # modules are fetched ahead; stage3_max_live_parameters caps the total.
            ws["fwd"] = min(layer_b + prefetch, live)
            ws["bwd"] = min(layer_b + prefetch, live)
            ws["loss"] = min(max(head, layer_b) + prefetch, live)
            shards.append(f"ZeRO-3 shards everything it can: weights (the frozen base too), gradients, fp32 master "
                          f"weights and optimizer states (1/{N}); one layer (+ prefetch) is gathered at a time.")
            if not dist.zero_init:
                notes.append("zero_init off: every rank builds the full model before DeepSpeed partitions it; the "
                             "steady state is the same, the loading peak is the full model per rank (host RAM below).")
        load = alloc_bytes(model_numel * st.ckpt_w)
        if eng == "zero3" and dist.zero_init:
            host.append(("load_checkpoint_per_node", n_node * ceil_div(load, N) + load // max(L, 1),
                         "zero.Init: each rank materializes its partition (+ one layer's shards while loading)"))
        else:
            host.append(("load_checkpoint_per_node", n_node * load,
                         f"{n_node} ranks each load the full checkpoint ([S] deepspeed "
                         "estimate_zero*_model_states_mem_needs cpu_mem: params x gpus_per_node without zero.Init)"))
        if off_opt:
            shards.append("Offload: the fp32 master weights, fp32 gradients and optimizer states live in pinned host "
                          "RAM; the step runs on the CPU (DeepSpeedCPUAdam).")
        notes.append("DeepSpeed's communication buffers outside torch's allocator (NCCL) are not counted.")
    else:  # FSDP
        full_fsdp = st.full
        tw_groups = groups  # LoRA adapters fp32 (PEFT); full fine-tuning bf16 (see activation_plan)
        sh = _shard(tw_groups, N)
        root_b = alloc_bytes(V * H * 2) * (1 if arch.tie_word_embeddings else 2) + alloc_bytes(H * 2)
        layer_b = _layer_unsharded(arch, st, lora_layer_numel)
        if not off_par:
            if full_fsdp:
                static.append(("params_shard", _sum_alloc(sh), f"trainable parameters, 1/{N} each (Shard(0))"))
            else:
                static.append(("frozen_shard", ceil_div(frozen_shardable + norms, N) + frozen_fixed,
                               f"frozen base 1/{N}" + (" + 4-bit quant states (whole)" if frozen_fixed else "")))
                static.append(("adapters_shard", _sum_alloc(sh), f"LoRA A/B fp32, 1/{N}"))
            static.append(("optimizer_states", _opt_states(sh, plan.optim), f"{plan.optim} of the shards, 1/{N}"))
            grads_bwd.append(("grads_shard", _sum_alloc(sh), f"sharded gradients, 1/{N}"))
            if eng != "fsdp_grad_op" and plan.gradient_accumulation_steps == 1:
                # [S] torch _fully_shard/_fsdp_param_group.py::post_backward: a unit's sharded gradient appears
                # when its own post-backward reduce-scatters it, and HF Trainer's zero_grad (set_to_none) dropped
                # the previous step's; the root unit (embeddings, lm_head, final norm) reduces last, after the
                # embedding gradient. [T] accuracy_multi full fine-tuning rows.
                root_g = (alloc_bytes(ceil_div(V * H, N) * 2) * (1 if arch.tie_word_embeddings else 2)
                          + alloc_bytes(ceil_div(H, N) * 2)) if full_fsdp else 0
                # The root's unsharded lm_head gradient (16-bit, V x H) waits from the lm_head backward to the
                # root's reduce-scatter; tied, the embedding-end transient of the single-GPU estimate holds it there.
                head_g = alloc_bytes(V * H * 2) if full_fsdp else 0
                grads_by_moment = {Moment.LAYER_BACKWARD_TOP: head_g, Moment.CE_BACKWARD: 0,
                                   Moment.LM_HEAD_BACKWARD: 0,
                                   Moment.LAYER_BACKWARD_BOTTOM: (_sum_alloc(sh) - root_g) * (L - 1) // L + head_g,
                                   Moment.EMBEDDING_GRAD_END: _sum_alloc(sh) - root_g
                                   + (0 if arch.tie_word_embeddings else head_g)}
            opt_only.append(("optimizer_step_temporaries", _step_temps(sh, plan.optim, clip),
                             "clip norms of the shards"))
        else:
            # [S] torch FSDP CPUOffload(offload_params=True): sharded params and grads on the CPU, optimizer on the CPU
            static.append(("frozen_quant_states", frozen_fixed, "4-bit quant states (whole)"))
            host.append(("offloaded_shards", n_node * (3 * _sum_alloc(sh) + _opt_states(sh, plan.optim)
                                                        + ceil_div(frozen_shardable + norms, N)),
                         f"{n_node} ranks x (param + grad + step copy + optimizer states of 1/{N}), pinned"))
        # [S] torch FSDP1 _runtime_utils.py::_post_forward_reshard: the root unit is not resharded after forward
        # (FSDP2 fully_shard: the root's reshard_after_forward is False); LLaMA-Factory's fsdp_config.yaml:
        # TRANSFORMER_BASED_WRAP (one unit per decoder layer), BACKWARD_PRE prefetch, forward_prefetch false.
        if eng == "fsdp_grad_op":
            ws["fwd"] = root_b + L * layer_b
            ws["loss"] = ws["bwd"] = root_b + L * layer_b
            shards.append(f"FSDP SHARD_GRAD_OP shards gradients and optimizer states (1/{N}) and stores weights 1/{N}, "
                          "but keeps every layer's gathered weights from forward to backward.")
        else:
            # [S] torch _fully_shard/_fsdp_param_group.py::wait_for_unshard: in forward the flat all-gather output
            # of a layer is kept (comm_ctx.all_gather_state) until the next layer's copy-out, so the last layer's
            # stays through the loss.
            ws["fwd"] = root_b + 2 * layer_b
            ws["loss"] = root_b + layer_b
            # [S] _fsdp_param_group.py::post_backward + _fsdp_collectives.py::foreach_reduce: a unit's gradients
            # are copied into one flat reduce-scatter input (reduce dtype = param_dtype bf16) that comm_ctx
            # .reduce_scatter_states keeps until the next unit's post-backward (reduce_scatter_max_input_buffers
            # 1); the layers' gathered weights are resharded after their backward, so at the embedding gradient
            # only the root's weights and the bottom layer's reduce-scatter input are left.
            # With gradient checkpointing the recompute runs the layer's forward hooks in FORWARD state, so
            # wait_for_unshard keeps the layer's all-gather output (comm_ctx.all_gather_state) beside its copied-out
            # parameters while the next layer's all-gather is prefetched: three layers at the top; at the bottom
            # no prefetch but the layer above's reduce-scatter input. [T] accuracy_multi Mistral/Phi rows.
            rs_in = alloc_bytes((pc.per_layer if full_fsdp else lora_layer_numel) * 2)
            fsdp2 = eng == "fsdp2"  # the all_gather_state rules below are FSDP2's (FSDP1 gathers into the flat param)
            gc_kept = layer_b if fsdp2 and full_fsdp and not plan.disable_gradient_checkpointing else 0
            ws["bwd"] = root_b + 2 * layer_b + gc_kept
            ws["bwd_bottom"] = root_b + layer_b + gc_kept + rs_in
            ws["emb"] = root_b + rs_in
            # [T] the first layer's forward: the root's flat all-gather output is still held (all_gather_state)
            # beside the root's copied-out weights while the first layer is gathered and copied out.
            ws["fwd_first"] = 2 * root_b + 2 * layer_b if fsdp2 else 0
            shards.append(f"FSDP FULL_SHARD shards weights (the frozen base too), gradients and optimizer states "
                          f"(1/{N}); one layer is gathered in forward, two in backward (prefetch), the root unit "
                          "(embeddings, lm_head) stays gathered from forward to backward.")
        load = alloc_bytes(model_numel * st.ckpt_w)
        host.append(("load_checkpoint_per_node", load if dist.cpu_ram_efficient_loading else n_node * load,
                     "cpu_ram_efficient_loading: rank 0 loads, the others start on meta and receive shards"
                     if dist.cpu_ram_efficient_loading else f"{n_node} ranks each load the full checkpoint"))

    phases = _rebuild(base, static, grads_bwd, opt_only, ws, eng, st, lay, L, grads_by_moment)
    if ws.get("fwd_first"):
        fwd = next(p for p in phases if p.phase == "forward")
        keep = [t for t in fwd.terms if t.name not in ("gathered_params", "activations_layers")]
        phases.append(PhasePeak(phase=fwd.phase, kind=fwd.kind, moment="the first decoder layer's forward",
                                terms=[MemoryTerm(name="gathered_params", bytes=ws["fwd_first"],
                                                  detail="the root's all-gather output and weights + the first "
                                                         "layer's all-gather output and weights")] + keep))
    # every backward moment was rebuilt (the engine changes which one is largest); keep the largest per phase
    phases = [max((p for p in phases if p.phase == ph), key=lambda p: p.total_bytes)
              for ph in dict.fromkeys(p.phase for p in phases)]
    peak = max(phases, key=lambda p: p.total_bytes)
    host_terms = [MemoryTerm(name=a, bytes=int(b), detail=d) for a, b, d in host if b]
    load_b = sum(t.bytes for t in host_terms if t.name.startswith("load_"))
    steady = sum(t.bytes for t in host_terms if not t.name.startswith("load_"))
    notes.append("Activations are not sharded by any engine: they are the single-GPU estimate's terms.")
    notes.append("Host RAM leaves out each process's own baseline (Python, CUDA, NCCL: a few GiB per rank).")
    return DistEstimate(
        engine=eng, num_gpus=N, nodes=dist.nodes, offload=dist.offload, phases=phases, peak_phase=peak.phase,
        peak_allocated_bytes=peak.total_bytes,
        # the allocator model of one GPU (memory.allocator): the peak moment's large blocks, paged (managed) optimizer
        # states where the engine keeps torch's optimizer (DDP), the CUDA context (or a calibration profile's)
        device_peak_bytes=device_peak_for(peak.total_bytes, large_blocks_at(arch, aplan, peak.kind),
                                          paged_state_bytes(arch, aplan, st) if eng == "ddp" else 0),
        single_gpu_peak_allocated_bytes=one, host_terms=host_terms, host_peak_bytes=max(load_b, steady),
        shards=shards, notes=notes,
    )


def _rebuild(base: Estimate, static, grads_bwd, opt_only, ws, eng: str, st: Setting, lay, L: int,
             grads_by_moment: dict[Moment, int]) -> list[PhasePeak]:
    """Each single-GPU phase with its model-state terms replaced by the engine's."""
    sharded_grads = eng not in ("ddp", "zero1")
    # gradient accumulation: the earlier micro-batches' (sharded) gradients are held through every phase
    ga_held = any(t.name == "accumulated_grads" for ph in base.phases for t in ph.terms)
    out = []
    for ph in base.phases:
        keep = []
        for t in ph.terms:
            if t.name in _STATE_TERMS or (eng != "ddp" and t.name in _CAST_TERMS):
                continue
            if sharded_grads and t.name == "accumulated_grads":
                # the earlier micro-batches' gradients live in the sharded grads term (added below): [S] FSDP2
                # post_backward reduce-scatters every micro-batch into the sharded .grad ([T] accuracy_multi ga2
                # row); deepspeed stage_1_and_2.py copies each reduced bucket into grads_in_partition and drops
                # param.grad; stage3.py accumulates into grad_partitions_flat_buffer
                continue
            b = t.bytes
            if sharded_grads and st.full and t.name == "activations_layers" and ph.kind == Moment.LAYER_BACKWARD_BOTTOM:
                b -= (L - 1) * lay.param_grad_bytes  # the layers' gradients above are in the sharded grads term
            keep.append(MemoryTerm(name=t.name, bytes=b, detail=t.detail))
        kind = {"forward": "fwd", "loss": "loss"}.get(ph.phase, "bwd")
        if ph.kind in (Moment.CE_BACKWARD, Moment.LM_HEAD_BACKWARD):
            kind = "loss"
        if ph.kind == Moment.EMBEDDING_GRAD_END and ws.get("emb"):
            kind = "emb"
        if ph.kind == Moment.LAYER_BACKWARD_BOTTOM and ws.get("bwd_bottom"):
            kind = "bwd_bottom"
        extra = list(static)
        if ph.phase == "backward" and ph.kind in grads_by_moment:
            extra += [(n, grads_by_moment[ph.kind], d + " (units reduced so far)") for n, _, d in grads_bwd]
        elif ph.phase in ("backward", "optimizer") or (sharded_grads and ga_held):
            extra += grads_bwd
        if ph.phase == "optimizer":
            extra += opt_only
        elif ws[kind]:
            extra.append(("gathered_params", ws[kind], f"all-gathered 16-bit weights held at this moment ({eng})"))
        terms = [MemoryTerm(name=n, bytes=int(b), detail=d) for n, b, d in extra if b] + keep
        out.append(PhasePeak(phase=ph.phase, kind=ph.kind, moment=ph.moment, terms=terms))
    return out


def shards_text(d: DistEstimate) -> str:
    return "\n".join(d.shards)
