"""The memory model's structure: each component of a step's moments depends on a few knobs only.

`estimate` (memory/step.py) stays the single source of truth: it builds every moment's peak as a sum of terms, and
each term's bytes come from one component below (weights, adapters, optimizer states, a decoder layer's walk, the
head...). A component is a function of the `Setting` fields and `Plan` fields it declares in COMPONENTS, nothing
else; inside `memoized()` estimate computes each component once per distinct setting of those fields and reuses it
for every plan that shares them. So a search over many plans runs the expensive parts (the layer walk, the head)
over their own small sub-domains (finetuning type x rank x targets x attention x padded length x batch for the
layer; type x attention x liger x length x batch for the head), never over the product of every knob; what is left
per plan is the moments' sums, the max over moments and the allocator's rounding (memory/allocator.py), which are
arithmetic.

Exact by construction (the same code computes the same numbers), and checked: tests/test_terms.py runs every plan
of the shipped problems through one shared memo and requires each Estimate to equal the plain one, byte for byte
(a declaration that misses a field the component reads makes a reused value stale and fails it).

SEARCH_KNOBS states the same structure in the search space's terms (search/space.py MEM_KNOBS): which knobs a
component, and so each term built from it, depends on. The composition adds gradient checkpointing (which layer
terms count: checkpoints or saved activations) and `gradient_accumulation_steps > 1` (accumulated gradients
live), the only way accumulation reaches memory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from operator import attrgetter

from ..schema import Plan
from .precision import Setting
from .step import _MEMO

__all__ = ["COMPONENTS", "SEARCH_KNOBS", "TERM_KNOBS", "PAIRWISE_TERMS", "OVERHEAD_KNOBS", "MANAGED_KNOBS", "TermMemo",
           "memoized", "term_knobs"]

# Setting fields fixed by the finetuning type (and the problem's precision flags): the dtypes and quantization.
_DTYPES = ("amp", "c", "ckpt_w", "train_w", "embed_w", "norm_w", "stream", "lora_w", "full", "quant", "double_quant",
           "gemma_norm", "mixed16", "fp16")
_ADAPTER = ("targets", "rank")
_TOKENS = ("seq", "batch")
_PLAN_TRAINABLE = ("finetuning_type", "quantization_bit", "lora_rank", "lora_target", "additional_target")

# component -> (Setting fields, Plan fields) it reads (memory/static.py, layer.py, autograd.py, head.py)
COMPONENTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "weights": (_DTYPES, ()),
    "adapters": (_DTYPES + _ADAPTER, _PLAN_TRAINABLE),
    "grads": (_DTYPES + _ADAPTER, _PLAN_TRAINABLE),
    "params": (_DTYPES + _ADAPTER, _PLAN_TRAINABLE),
    "optimizer_states": (_DTYPES + _ADAPTER, _PLAN_TRAINABLE + ("optim",)),
    "paged_states": (_DTYPES + _ADAPTER, _PLAN_TRAINABLE + ("optim",)),
    "optimizer_step_temporaries": (_DTYPES + _ADAPTER, _PLAN_TRAINABLE + ("optim", "max_grad_norm")),
    "activations_shared": (_DTYPES + ("attn",) + _TOKENS, ()),
    "attention_mask": (("mask",) + _TOKENS, ()),
    # the layer walk reads every Setting field but gc (checkpointing only decides how step.py counts it)
    "layer": (_DTYPES + _ADAPTER + ("attn", "lora_dropout", "mask") + _TOKENS, ()),
    "layer_no_grad": (_DTYPES + _ADAPTER + ("attn", "lora_dropout", "mask") + _TOKENS, ()),
    "head": (_DTYPES + ("attn",) + _TOKENS, ("enable_liger_kernel", "upcast_lmhead_output", "additional_target")),
    "preference": (_DTYPES + _ADAPTER + ("attn", "mask") + _TOKENS,
                   ("enable_liger_kernel", "upcast_lmhead_output", "additional_target", "stage", "pref_loss",
                    "ref_model")),
    "reference_weights": (_DTYPES, ("stage", "pref_loss", "ref_model")),
}

# the same, in search knobs (lora_dropout is the recipe's, a function of the finetuning type)
_T = ("finetuning_type", "lora_rank", "lora_target")
_TOK = ("cutoff_len", "per_device_train_batch_size")
SEARCH_KNOBS: dict[str, tuple[str, ...]] = {
    "weights": ("finetuning_type",),
    "adapters": _T, "grads": _T, "params": _T,
    "optimizer_states": _T + ("optim",), "paged_states": _T + ("optim",),
    "optimizer_step_temporaries": _T + ("optim",),
    "activations_shared": ("finetuning_type", "flash_attn") + _TOK,
    "attention_mask": ("flash_attn",) + _TOK,
    "layer": _T + ("flash_attn",) + _TOK, "layer_no_grad": _T + ("flash_attn",) + _TOK,
    "head": ("finetuning_type", "flash_attn", "enable_liger_kernel") + _TOK,
    "preference": _T + ("flash_attn", "enable_liger_kernel", "stage") + _TOK,
    "reference_weights": ("finetuning_type", "stage"),
}


def _getter(fields: tuple[str, ...]):
    """The fields' values as one tuple (operator.attrgetter, in C: the memo builds a key per component per plan)."""
    if not fields:
        return lambda _obj: ()
    get = attrgetter(*fields)
    return (lambda obj: (get(obj),)) if len(fields) == 1 else get


# a declaration -> its getters (keyed by the declaration itself, so a changed declaration gets its own)
_KEYS: dict[tuple, tuple] = {}


class TermMemo:
    """Components by (name, the fields they declare); `evaluations` counts the computations per component."""

    def __init__(self) -> None:
        self._values: dict[tuple, object] = {}
        self.evaluations: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def get(self, name: str, st: Setting, plan: Plan, fn):
        declared = COMPONENTS[name]
        getters = _KEYS.get(declared)
        if getters is None:
            getters = _KEYS[declared] = (_getter(declared[0]), _getter(declared[1]))
        key = (name, getters[0](st), getters[1](plan))
        self.calls[name] += 1
        try:
            return self._values[key]
        except KeyError:
            self.evaluations[name] += 1
            value = self._values[key] = fn()
            return value


@contextmanager
def memoized(memo: TermMemo | None = None) -> Iterator[TermMemo]:
    """Within the block, `estimate` computes each component once per setting of its declared fields. One memo holds
    one model and one problem's fixed flags (the key leaves out what is fixed within a search: the arch)."""
    memo = memo or TermMemo()
    token = _MEMO.set(memo)
    try:
        yield memo
    finally:
        _MEMO.reset(token)


# Each term of a moment (memory/step.py step_moments, by name) -> the search knobs its bytes depend on (the problem's
# fixed flags aside). "accumulating" is `gradient_accumulation_steps > 1`, the only way accumulation reaches memory.
# The search builds its memory tables over these knobs only (search/factored.py); tests/test_factored.py checks, on
# every plan of the shipped problems, that the tables' sums equal step_moments' totals (an undeclared dependency
# makes two plans that share the declared knobs disagree, and fails it).
_ACC = ("accumulating",)
_HEAD = ("finetuning_type", "flash_attn", "enable_liger_kernel") + _TOK
TERM_KNOBS: dict[str, tuple[str, ...]] = {
    "weights_decoder_linears": ("finetuning_type",), "weights_embed_tokens": ("finetuning_type",),
    "weights_lm_head": ("finetuning_type",), "weights_norms": ("finetuning_type",),
    "reference_model_weights": ("finetuning_type",), "weights_vision_tower": ("finetuning_type",),
    "weights_experts": ("finetuning_type",),
    "vision_inputs": _TOK, "vision_activations": ("finetuning_type",) + _TOK,
    "vision_outputs": ("finetuning_type",) + _TOK, "vision_forward_working": ("finetuning_type",),
    "adapters": _T, "optimizer_states": _T + ("optim",), "optimizer_step_temporaries": _T + ("optim",),
    "cublas_workspace": (), "cublas_workspace_backward": (),
    "activations_shared": ("finetuning_type", "flash_attn") + _TOK,
    "attention_mask": ("finetuning_type", "flash_attn", "gradient_checkpointing") + _TOK,
    "activations_layers": _T + ("flash_attn", "gradient_checkpointing") + _ACC + _TOK,
    "autocast_weight_cache": ("finetuning_type", "gradient_checkpointing"),
    "accumulated_grads": _T + _ACC, "grads": _T + _ACC,
    "embedding_grad_transient": ("finetuning_type",) + _ACC,
    "hidden_grad": ("finetuning_type",) + _TOK,
    "final_norm_saved": _HEAD, "lm_head_weight_cast": _HEAD, "logits_and_loss": _HEAD, "loss_saved": _HEAD,
    "loss_backward": _HEAD, "lm_head_backward": _HEAD,
}
# DPO only: the preference component's terms (they read the adapter)
PAIRWISE_TERMS = {"policy_logits_and_logps": tuple(dict.fromkeys(_T + _HEAD)),
                  "reference_forward": tuple(dict.fromkeys(_T + _HEAD))}
TERM_KNOBS.update(PAIRWISE_TERMS)
# DPO (a pairwise plan): the head's terms come from the preference component, which also reads the adapter.
PAIRWISE_HEAD_TERMS = ("logits_and_loss", "loss_saved", "loss_backward", "lm_head_backward")
# allocator.large_blocks_at (the peak moment's big blocks): the compute dtype, the tokens and the liger kernel
OVERHEAD_KNOBS = ("finetuning_type", "enable_liger_kernel") + _TOK
# step_moments' managed bytes (paged optimizer states): the trainable tensors and the optimizer
MANAGED_KNOBS = _T + ("optim",)


def term_knobs(name: str, pairwise: bool = False) -> tuple[str, ...]:
    """The search knobs a term of step_moments depends on (TERM_KNOBS; DPO's head terms read the adapter too)."""
    knobs = TERM_KNOBS[name]
    return tuple(dict.fromkeys(_T + knobs)) if pairwise and name in PAIRWISE_HEAD_TERMS else knobs
