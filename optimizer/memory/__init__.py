"""The training-memory model (a package; modules in pipeline order):
- precision: dtypes, LoRA targets, padded length (`Setting`); static: parameter counts, weights, adapters,
  gradients, optimizer states; autograd: the op tape; layer: one decoder layer; head: logits and loss;
  allocator: workspaces, segments, context; step: the phases and `estimate`; evaluation: the eval pass.

The model: peak allocated bytes of one steady-state optimizer step.

PURE: no I/O, no printing. Every term is an int number of bytes, rounded per tensor the way PyTorch's
CUDA caching allocator rounds (`units.alloc_bytes`, 512 B). The step mirrors `llamafactory-cli train` on
one CUDA GPU (LLaMA-Factory 0.9.5, transformers 5.24, PEFT 0.21, bitsandbytes 0.50, accelerate 1.15,
torch 2.13): the second optimizer step, when the optimizer states exist.

Legend: b batch, s padded sequence length (cutoff_len rounded up to a multiple of 8: LLaMA-Factory's
SFT collator pads with `pad_to_multiple_of=8`), N = b*s tokens, H hidden, I intermediate, L layers,
V vocabulary, r LoRA rank, c compute-dtype bytes (2 under bf16/fp16 autocast).

How the activation terms are made: `layer_forward` walks one decoder layer op by op (`Walk`), allocating
each output and keeping what autograd saves for backward, so shared tensors count once and the forward
transient peak falls out. The walk encodes what the libraries do; each rule names its source:
- [S] read in a library's source (file and function named),
- [T] measured with `trainfit trace` (optimizer/trace: a real PyTorch step on fake tensors, every
  allocation counted), see tests/test_accuracy.py for the grid it is checked on.
"""

from .allocator import (
    CUBLAS_WORKSPACE_BYTES,
    CUDA_CONTEXT_BYTES,
    DEFAULT_MARGIN,
    budget_bytes,
    device_peak_for,
    fits,
    large_blocks_at,
    reserved_bytes,
)
from .evaluation import eval_estimate
from .layer import LayerActivations, layer_forward
from .precision import Setting, lora_targets, setting_for
from .static import count_params, quant4_bytes
from .step import context_window_problem, estimate

__all__ = [
    "CUBLAS_WORKSPACE_BYTES",
    "CUDA_CONTEXT_BYTES",
    "DEFAULT_MARGIN",
    "LayerActivations",
    "Setting",
    "budget_bytes",
    "context_window_problem",
    "count_params",
    "device_peak_for",
    "estimate",
    "eval_estimate",
    "fits",
    "large_blocks_at",
    "layer_forward",
    "lora_targets",
    "quant4_bytes",
    "reserved_bytes",
    "setting_for",
]
