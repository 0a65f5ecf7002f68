"""trainfit: the best fine-tuning config that fits your GPU."""

from .errors import CatalogError, ConfigError, InfeasibleError, ProblemError, TrainfitError
from .models.arch import arch_from_config, layer_linears, param_counts
from .models.catalog import get_gpu, gpus, models, resolve_arch
from .schema import Arch, Estimate, GpuSpec, Plan

__all__ = [
    "Arch", "Estimate", "GpuSpec", "Plan",
    "TrainfitError", "CatalogError", "ConfigError", "ProblemError", "InfeasibleError",
    "arch_from_config", "layer_linears", "param_counts",
    "get_gpu", "gpus", "models", "resolve_arch",
]
__version__ = "0.1.0"
