"""Read a YAML file that must hold a mapping, with one-line errors (no traceback, nothing written)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import TrainfitError

__all__ = ["read_mapping"]


def read_mapping(path: str | Path, *, error: type[TrainfitError], what: str, missing: str, not_mapping: str) -> dict[str, Any]:
    """`what`: the kind of file (for messages); `missing`: the sentence for an absent file; `not_mapping`: the
    sentence when the YAML is not a mapping."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise error(f"{str(path)!r} is a folder. Pass {what}.")
    if not p.is_file():
        raise error(missing)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise error(f"{str(path)!r} is not valid YAML{where}. Fix the syntax.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {str(path)!r} ({exc}). Pass a readable UTF-8 YAML file.") from None
    if not isinstance(data, dict):
        raise error(not_mapping)
    return data
