"""File I/O at the edge: YAML mappings read with one-line errors, text written atomically (nothing half-written)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .errors import TrainfitError

__all__ = ["read_mapping", "write_text_atomic"]


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


def write_text_atomic(path: str | os.PathLike[str], text: str, *, force: bool) -> None:
    """Write `text` (UTF-8, bytes as given) to `path` through a temp file in the same folder and an atomic
    rename; create missing parent folders. Without `force` an existing file is never replaced, also when it
    appears while writing. On any failure the temp file is removed."""
    p = Path(path)
    if p.is_dir():
        raise TrainfitError(f"{p} is a folder. Pass a file path.")
    if p.exists() and not force:
        raise TrainfitError(f"{p} exists. Pass --force to overwrite it.")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            mode = p.stat().st_mode & 0o777 if p.exists() else 0o644
        except OSError:
            mode = 0o644
        os.chmod(tmp, mode)
        if force:
            os.replace(tmp, p)
        else:
            try:
                os.link(tmp, p)  # fails if `p` appeared meanwhile: no overwrite race
            except FileExistsError:
                raise TrainfitError(f"{p} exists. Pass --force to overwrite it.") from None
            except OSError:  # no hard links here (some network/FAT file systems)
                if p.exists():
                    raise TrainfitError(f"{p} exists. Pass --force to overwrite it.") from None
                os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
