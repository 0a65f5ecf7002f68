"""Errors a user can cause. Each message reads `what is wrong. How to fix it.`"""

from __future__ import annotations

__all__ = ["TrainfitError", "ProblemError", "CatalogError", "ConfigError", "InfeasibleError"]


class TrainfitError(Exception):
    """Base class: the CLI prints `Error: <message>` and exits 1, without a traceback."""


class CatalogError(TrainfitError):
    """An unknown GPU or model id, or an unreadable config.json."""


class ConfigError(TrainfitError):
    """A LLaMA-Factory YAML or a flag that LLaMA-Factory would reject or that trainfit cannot model."""


class ProblemError(TrainfitError):
    """A problem file that does not validate."""


class InfeasibleError(TrainfitError):
    """No plan of the search space fits the memory bound."""
