"""One HF Trainer (transformers v5) + accelerate training step, as it runs on one CUDA GPU.

What is mirrored (transformers trainer.py, trainer_optimizer.py; accelerate accelerator.py):
- the optimizer (`create_optimizer`): two param groups (decay / no decay), torch AdamW with fused=True
  (adamw_torch_fused) or foreach=True (adamw_torch: the CUDA default), torch SGD, bitsandbytes 8-bit AdamW;
- `accelerator.prepare(model)` under AMP: forward = convert_outputs_to_fp32(autocast(forward)), so the logits
  come back as an fp32 copy (dropped with the outputs before backward, as `compute_loss` keeps only the loss);
- `compute_loss`: labels and `num_items_in_batch` passed to the model (CE with reduction=sum, then divided);
- fp16: GradScaler loss scaling, unscale before clipping, scale update;
- gradient accumulation: forward + backward per micro-batch, the optimizer step after the last (two
  micro-batches stand for any gradient_accumulation_steps > 1, see `TrainerStep.micro_batches`);
- `clip_grad_norm_(model.parameters(), max_grad_norm)` when max_grad_norm > 0, `optimizer.step()`,
  `model.zero_grad()` (set_to_none=True).
- `stage: dpo` (LLaMA-Factory train/dpo/trainer.py::CustomDPOTrainer.get_batch_loss_metrics): the policy's
  concatenated forward over 2b sequences (no labels to the model: `model(**batch).logits.to(float32)`, then
  trainer_utils.py::get_batch_logps: `logits[:, :-1].log_softmax(-1)` gathered at the labels), then the
  reference's concatenated forward under no_grad (LoRA: the same model inside PEFT's `disable_adapter()`; full:
  a second frozen model), then the preference loss on [b] log-probs; the policy's fp32 logits stay referenced
  (for the logits/chosen metrics) until the loss is returned.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import ConfigError
from ..schema import Plan
from .build import BuiltModel, padded_seq_len

__all__ = ["Probe", "TrainerStep", "decay_parameter_names"]

_NO_DECAY = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")]


class Probe(Protocol):
    def begin_step(self, step: int) -> None: ...
    def set_sub_phase(self, name: str) -> None: ...
    def end_step(self) -> Any: ...


def decay_parameter_names(model: nn.Module) -> set[str]:
    """HF Trainer.get_decay_parameter_names: no decay for LayerNorm modules, biases and *norm* names."""
    out: set[str] = set()

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            child_prefix = f"{prefix}.{name}" if prefix else name
            if isinstance(child, nn.LayerNorm):
                continue
            walk(child, child_prefix)
        for name, _ in module.named_parameters(recurse=False):
            full = f"{prefix}.{name}" if prefix else name
            if not any(p.search(full.lower()) for p in _NO_DECAY):
                out.add(full)

    walk(model, "")
    return out


def make_optimizer(model: nn.Module, plan: Plan) -> torch.optim.Optimizer:
    decay = decay_parameter_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": 0.0},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError("no trainable parameters: nothing to optimize.")
    lr, betas, eps = 5e-5, (0.9, 0.999), 1e-8  # HF TrainingArguments defaults (values do not change memory)
    if plan.optim == "adamw_torch_fused":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    if plan.optim == "adamw_torch":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)
    if plan.optim == "sgd":
        return torch.optim.SGD(groups, lr=lr, foreach=True)
    if plan.optim in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        return bnb.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0, optim_bits=8,
                               is_paged=plan.optim.startswith("paged"))
    raise ConfigError(f"optim {plan.optim!r} is not traced.")


class _FakeGradScaler:
    """torch.amp.GradScaler's device-side work, without its value reads (found_inf.item())."""

    def __init__(self, device: torch.device) -> None:
        self.scale_t = torch.full((), 65536.0, dtype=torch.float32, device=device)
        self.growth_tracker = torch.full((), 0, dtype=torch.int32, device=device)
        self.found_inf: torch.Tensor | None = None

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_t.to(device=loss.device, non_blocking=True)

    def unscale_(self, params: list[torch.Tensor]) -> None:
        inv_scale = self.scale_t.double().reciprocal().float()
        found_inf = torch.full((), 0.0, dtype=torch.float32, device=self.scale_t.device)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        self.found_inf = found_inf

    def update(self) -> None:
        if self.found_inf is not None:
            torch._amp_update_scale_(self.scale_t, self.growth_tracker, self.found_inf, 2.0, 0.5, 2000)
        self.found_inf = None


def image_grids(built: BuiltModel, plan: Plan) -> list[tuple[int, int, int]]:
    """The image grids (t, h, w) of one micro-batch: images_per_sample per sequence, each at the plan's
    image_max_pixels (optimizer.models.vision.plan_image_grid); empty for a text-only model or plan."""
    vc = getattr(built.config, "vision_config", None)
    if vc is None or not plan.images_per_sample:
        return []
    from ..memory.vision import image_grids as plan_grids
    from ..schema import VisionTower

    vision = VisionTower(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in vc.to_dict().items() if k in VisionTower.model_fields})
    return plan_grids(vision, plan)


class TrainerStep:
    """Drives training steps of a built, materialized model; reports sub-phase changes to a probe."""

    def __init__(self, built: BuiltModel, plan: Plan, probe: Probe, device: torch.device, *, real_scaler: bool = False,
                 ref: BuiltModel | None = None):
        self.built = built
        self.ref = ref
        self.plan = plan
        self.probe = probe
        self.device = device
        self.model = built.model
        self.model.train()
        self.seq = padded_seq_len(plan)
        self.batch = plan.per_device_train_batch_size * (2 if plan.pairwise else 1)  # chosen + rejected
        self.vocab = int(built.config.get_text_config().vocab_size)
        self.amp_dtype = torch.bfloat16 if plan.bf16 else (torch.float16 if plan.fp16 else None)
        self.optimizer = make_optimizer(self.model, plan)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.scaler: Any = None
        if plan.fp16:
            if real_scaler:
                self.scaler = torch.amp.GradScaler(device.type)
            else:
                self.scaler = _FakeGradScaler(device)
        self.tr_loss = torch.zeros((), device=device)  # HF Trainer's running loss scalar
        from ..memory.precision import attention_mask_kind

        self.mask_kind = attention_mask_kind(plan, built.attn_impl)
        self.grids = image_grids(built, plan)
        self._hooks = self._install_hooks()

    # -- phase hooks -------------------------------------------------------------------------------------------
    def _install_hooks(self) -> list[Any]:
        probe = self.probe

        def pre_head(module: nn.Module, args: Any) -> None:
            if not torch.is_grad_enabled():  # the DPO reference pass (LoRA: adapters disabled)
                probe.set_sub_phase("ref_loss")
                return
            probe.set_sub_phase("lm_head")
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.requires_grad:
                x.register_hook(lambda g: probe.set_sub_phase("bwd_layers"))

        def post_head(module: nn.Module, args: Any, output: Any) -> None:
            if not torch.is_grad_enabled():
                return
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda g: probe.set_sub_phase("bwd_lm_head"))
            probe.set_sub_phase("loss_ce")

        head = self.built.lm_head
        hooks = [head.register_forward_pre_hook(pre_head, prepend=True),
                 head.register_forward_hook(post_head, prepend=True)]
        if self.ref is not None:
            hooks.append(self.ref.lm_head.register_forward_pre_hook(pre_head, prepend=True))
        visual = getattr(getattr(self.built.hf_model, "model", None), "visual", None)
        if self.grids and visual is not None:
            def pre_visual(module: nn.Module, args: Any) -> None:
                if torch.is_grad_enabled():
                    probe.set_sub_phase("vision_fwd")

            def post_visual(module: nn.Module, args: Any, output: Any) -> None:
                if torch.is_grad_enabled():
                    probe.set_sub_phase("fwd")

            hooks += [visual.register_forward_pre_hook(pre_visual), visual.register_forward_hook(post_visual)]
        return hooks

    def close(self) -> None:
        for h in self._hooks:
            h.remove()

    # -- the step ------------------------------------------------------------------------------------------------
    def _batch(self) -> dict[str, torch.Tensor]:
        shape = (self.batch, self.seq)
        input_ids = torch.randint(0, self.vocab, shape, device=self.device)
        batch = {
            "input_ids": input_ids,
            "attention_mask": torch.ones(shape, dtype=torch.long, device=self.device),
            "labels": input_ids.clone(),
        }
        if self.mask_kind == "float":
            # LLaMA-Factory data/collator.py::prepare_4d_attention_mask (neat_packing): [b, 1, s, s] in the compute
            # dtype, built on the CPU by the collator and moved to the device with the batch
            batch["attention_mask"] = torch.zeros((self.batch, 1, self.seq, self.seq), dtype=self.built.compute_dtype,
                                                  device=self.device)
        if self.plan.packed:
            # data/processor/supervised.py::PackedSupervisedDatasetProcessor: position ids restart per packed sample
            batch["position_ids"] = torch.zeros(shape, dtype=torch.long, device=self.device)
        if self.grids:
            # LLaMA-Factory data/collator.py::MultiModalDataCollatorForSeq2Seq: the processor's pixel_values (fp32
            # [patches, channels x temporal_patch x patch^2]) and image_grid_thw, and mrope position ids [3, b, s]
            # from the model's get_rope_index, all moved to the device with the batch
            vc = self.built.config.vision_config
            patches = sum(t * h * w for t, h, w in self.grids)
            row = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
            batch["pixel_values"] = torch.zeros((patches, row), dtype=torch.float32, device=self.device)
            batch["image_grid_thw"] = torch.zeros((len(self.grids), 3), dtype=torch.long, device=self.device)
            batch["position_ids"] = torch.zeros((3, *shape), dtype=torch.long, device=self.device)
        return batch

    def _model_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The mask (and position ids) the model gets. A 2-D mask reaches transformers' masking_utils, which on a GPU
        drops an all-ones mask (`fast_all`) and otherwise builds a bool [b, 1, s, s] mask; on fake tensors it cannot
        read the values and always builds it, which is the padded worst case (`mask_kind` bool). Where that worst
        case has no padding (`none`: packed rows of exactly cutoff_len) the mask is not passed."""
        out = {k: inputs[k] for k in ("position_ids", "pixel_values", "image_grid_thw") if k in inputs}
        if self.mask_kind != "none":  # a 4-D neat_packing mask (sdpa or eager) or a padded 2-D one
            out["attention_mask"] = inputs["attention_mask"]
        return out

    def _forward(self, inputs: dict[str, torch.Tensor], num_items: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": inputs["input_ids"], "labels": inputs["labels"], "num_items_in_batch": num_items,
                  **self._model_inputs(inputs)}
        if self.amp_dtype is not None:
            from accelerate.utils.operations import convert_to_fp32

            with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype):
                outputs = self.model(**kwargs)
            self.probe.set_sub_phase("out_fp32")
            outputs = convert_to_fp32(outputs)
        else:
            outputs = self.model(**kwargs)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        del outputs  # compute_loss returns only the loss: logits die here, before backward
        return loss

    # -- DPO ------------------------------------------------------------------------------------------------------
    def _fp32_logits(self, model: nn.Module, inputs: dict[str, torch.Tensor], ref: bool) -> torch.Tensor:
        """`model(**batch, return_dict=True, use_cache=False).logits.to(torch.float32)`; under AMP accelerate's
        convert_outputs_to_fp32 already made the logits fp32 (`.to` returns them as they are)."""
        ids = inputs["input_ids"].clone()  # nested_detach(batch, clone=True)
        if self.amp_dtype is not None:
            from accelerate.utils.operations import convert_to_fp32

            with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype):
                outputs = model(input_ids=ids, return_dict=True, use_cache=False, **self._model_inputs(inputs))
            if not ref:
                self.probe.set_sub_phase("out_fp32")
            outputs = convert_to_fp32(outputs)
        else:
            outputs = model(input_ids=ids, return_dict=True, use_cache=False, **self._model_inputs(inputs))
        logits = outputs.logits.to(torch.float32)
        del outputs, ids
        return logits

    @staticmethod
    def _batch_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LLaMA-Factory train/trainer_utils.py::get_batch_logps (`labels[labels == IGNORE_INDEX] = 0` written as
        masked_fill: the same [2b, s-1] int64 buffer, without a data-dependent index)."""
        labels = labels[:, 1:].clone()
        logits = logits[:, :-1, :]
        loss_mask = labels != -100
        labels = labels.masked_fill(~loss_mask, 0)
        per_token = torch.gather(logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
        return (per_token * loss_mask).sum(-1), loss_mask.sum(-1)

    def _dpo_loss(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch.nn.functional as F

        plan = self.plan
        half = self.batch // 2
        all_logits = self._fp32_logits(self.model, inputs, ref=False)
        logps, length = self._batch_logps(all_logits, inputs["labels"].clone())
        if plan.pref_loss in ("ipo", "orpo", "simpo"):
            logps = logps / length
        chosen, rejected = logps.split(half, dim=0)
        chosen_logits, rejected_logits = all_logits.split(half, dim=0)  # kept for the logits/* metrics
        del all_logits
        chosen_avg = chosen if plan.pref_loss in ("ipo", "orpo", "simpo") else chosen / length.split(half)[0]
        if plan.use_ref_model:
            self.probe.set_sub_phase("ref_fwd")
            if self.ref is None:
                ctx = self.model.disable_adapter()
                ref_model = self.model
            else:
                from contextlib import nullcontext

                ctx, ref_model = nullcontext(), self.ref.model
            with torch.no_grad(), ctx:
                ref_logits = self._fp32_logits(ref_model, inputs, ref=True)
                ref_logps, _ = self._batch_logps(ref_logits, inputs["labels"].clone())
                del ref_logits
            ref_chosen, ref_rejected = ref_logps.split(half, dim=0)
            # TRL trainer/dpo_trainer.py::dpo_loss, sigmoid: -logsigmoid(beta * (policy - reference log-ratios))
            logits = (chosen - rejected) - (ref_chosen - ref_rejected)
            losses = -F.logsigmoid(plan.pref_beta * logits)
            beta = plan.pref_beta
            rewards = beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()
        elif plan.pref_loss == "simpo":
            losses = -F.logsigmoid(plan.pref_beta * ((chosen - rejected) - 0.5 / max(plan.pref_beta, 1e-6)))
            rewards = plan.pref_beta * chosen.detach(), plan.pref_beta * rejected.detach()
        else:  # orpo: CustomDPOTrainer.odds_ratio_loss
            log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
            losses = -chosen + plan.pref_beta * -F.logsigmoid(log_odds)
            rewards = plan.pref_beta * chosen.detach(), plan.pref_beta * rejected.detach()
        if plan.pref_ftx > 1e-6:
            losses = losses + plan.pref_ftx * -chosen_avg
        metrics = [r.mean() for r in rewards] + [chosen_logits.mean(), rejected_logits.mean()]
        loss = losses.mean()
        del metrics, chosen_logits, rejected_logits, rewards, losses
        # transformers Trainer.training_step: model_accepts_loss_kwargs is False -> divide by the accumulation steps
        return loss / self.plan.gradient_accumulation_steps

    def optimizer_phase(self) -> None:
        plan = self.plan
        if self.scaler is not None:
            self.probe.set_sub_phase("opt_unscale")
            if isinstance(self.scaler, _FakeGradScaler):
                self.scaler.unscale_(self.trainable)
            else:
                self.scaler.unscale_(self.optimizer)
        if plan.max_grad_norm > 0:
            self.probe.set_sub_phase("opt_clip")
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), plan.max_grad_norm, foreach=True)
            del norm
        self.probe.set_sub_phase("opt_step")
        if self.scaler is not None and not isinstance(self.scaler, _FakeGradScaler):
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
            if self.scaler is not None:
                self.scaler.update()
        self.probe.set_sub_phase("opt_zero_grad")
        self.model.zero_grad(set_to_none=True)

    def micro_batches(self) -> int:
        """Micro-batches run per optimizer step: 1, or 2 under gradient accumulation. HF Trainer's inner loop runs
        forward + `loss.backward()` per micro-batch and the optimizer after the last; from the second micro-batch
        on, every parameter's .grad from the earlier ones is live and AccumulateGrad adds the new gradient into it
        in place ([S] torch/csrc/autograd/functions/accumulate_grad.h, case 2.3). The third and later
        micro-batches repeat the second, so two measure the peak of any gradient_accumulation_steps > 1."""
        return min(self.plan.gradient_accumulation_steps, 2)

    def step(self, index: int) -> Any:
        self.probe.begin_step(index)
        # [S] transformers trainer.py::get_batch_samples: the step's micro-batches are fetched up front and
        # num_items_in_batch counts the labels of all of them
        batches = [self._batch() for _ in range(self.micro_batches())]
        counts = [b["labels"].ne(-100).sum() for b in batches]
        num_items = counts[0] if len(counts) == 1 else torch.stack(counts).sum()
        del counts
        for micro, inputs in enumerate(batches):
            if micro:
                self.probe.set_sub_phase("fwd")
            loss = self._dpo_loss(inputs) if self.plan.pairwise else self._forward(inputs, num_items)
            self.probe.set_sub_phase("bwd_loss")
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            self.tr_loss = self.tr_loss + loss.detach()
            del loss
        self.optimizer_phase()
        del inputs, batches, num_items
        return self.probe.end_step()

    def prime_step(self, index: int) -> Any:
        """Step 1 without forward/backward: gradients appear as backward would leave them, then the optimizer
        phase runs for real (it creates the optimizer state)."""
        self.probe.begin_step(index)
        inputs = self._batch()
        num_items = inputs["labels"].ne(-100).sum()
        self.probe.set_sub_phase("bwd_layers")
        for p in self.trainable:
            p.grad = torch.zeros_like(p)
        self.optimizer_phase()
        del inputs, num_items
        return self.probe.end_step()
