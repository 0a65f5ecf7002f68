"""File I/O at the edge, in one place: every file a user hands trainfit is read here, every file trainfit writes
is written here.

Readers refuse hostile files before they cost anything:
- regular files only (a FIFO, a device such as /dev/zero, a socket or a folder gets a one-line error; `stat` is
  checked before the file is opened and `fstat` again after a non-blocking open, so a FIFO never blocks);
- a size limit per kind of file (below), checked on `stat` and again while reading (`/proc` files lie);
- JSON: nesting depth bounded by a linear scan *before* `json.loads` (whose C parser recurses), numbers must be
  finite and fit in 64 bits (`1e400` parses to inf, `[1e999]` to a list of inf);
- YAML: a SafeLoader whose composer counts its depth *while* parsing (PyYAML's composer recurses), whose node
  graph is measured with aliases expanded before anything is constructed (a "billion laughs" file under 1 KB
  expands to 9**9 nodes: refused after reading ~100 events), and whose numbers must be finite and fit in 64 bits.

Writers (`write_text_atomic`) turn every OS error into `cannot write <path>: <reason>. <fix>` and leave nothing
behind: not the temp file, not a folder they created.

The limits. YAML/JSON settings files (LLaMA-Factory configs, problems, config.json, dataset_info.json) are a few
KB (the largest config.json of the catalog is 2 KB, a LLaMA-Factory example YAML under 2 KB); 1 MiB is 500x that,
and keeps the worst case of the pure-Python YAML loader this module needs for its checks near 2 s (it parses about
0.45 MB/s: 2.8 MiB of 99,000 keys took 6.4 s on the development machine). Data files: 1 GiB,
because the reader holds the text and its Python objects (about 5-10x the text) in memory, so 1 GiB of JSON is
already 5-10 GiB of RAM; the length statistics trainfit needs converge long before that (sample a larger set).
tokenizer.json: 256 MiB (the largest common ones, Gemma 3's, are 33 MB). Depth 64: LLaMA-Factory data nests 4
levels (record > messages > message > tool call), configs 2-3; the JSON and YAML parsers recurse once per level.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .errors import TrainfitError

__all__ = ["read_mapping", "read_text", "read_bytes", "read_json", "parse_json", "check_json_depth", "json_loads",
           "parse_yaml", "regular_file", "write_text_atomic", "make_parents", "remove_folders", "os_error_message",
           "join_problems", "shown", "WriteError", "MAX_SETTINGS_BYTES", "MAX_DATA_BYTES", "MAX_TOKENIZER_BYTES",
           "MAX_DEPTH", "MAX_YAML_NODES"]

MIB = 1 << 20
MAX_SETTINGS_BYTES = 1 * MIB  # configs, problems, config.json, dataset_info.json (see the module docstring)
MAX_DATA_BYTES = 1024 * MIB  # LLaMA-Factory data files (.json/.jsonl)
MAX_TOKENIZER_BYTES = 256 * MIB  # tokenizer.json
MAX_DEPTH = 64  # nesting of JSON arrays/objects and YAML collections
MAX_YAML_NODES = 200_000  # YAML nodes with aliases expanded (20,000 keys of a mapping are 40,001 nodes)
INT64_MAX = (1 << 63) - 1
MAX_LISTED = 10  # problems listed in one error message; the rest are counted


class WriteError(TrainfitError, OSError):
    """An OS error while writing (also an OSError, for callers that catch those)."""


def shown(value: object, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters: a message quotes what the user typed, not all of it."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def join_problems(problems: list[str], limit: int = MAX_LISTED) -> str:
    """`a; b; c` for at most `limit` problems, then `... and K more`: an error message stays a readable line."""
    shown = "; ".join(problems[:limit])
    return shown + (f"; ... and {len(problems) - limit} more" if len(problems) > limit else "")


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _size(n: int) -> str:
    return f"{n / MIB:.0f} MiB" if n >= MIB else f"{n} bytes"


def regular_file(path: str | os.PathLike[str], *, error: type[TrainfitError], what: str,
                 limit_bytes: int = MAX_SETTINGS_BYTES, missing: str | None = None) -> Path:
    """The path, if it names a readable regular file of at most `limit_bytes` (symlinks followed).
    `what`: the file to pass instead, as in "Pass <what>."; `missing`: the whole message for an absent file."""
    p = Path(path).expanduser()
    shown = repr(str(path))
    try:
        st = os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        raise error(missing or f"{shown} does not exist. Pass {what}.") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise error(f"cannot read {shown}: {reason}. Pass {what}.") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{shown} is a folder. Pass {what}.")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{shown} is {_kind(st.st_mode)}, not a regular file. Pass {what}.")
    if st.st_size > limit_bytes:
        raise error(f"{shown} is {_size(st.st_size)}, over trainfit's {_size(limit_bytes)} limit for this file. "
                    f"Pass {what} (a smaller one).")
    return p


def read_bytes(path: str | os.PathLike[str], *, error: type[TrainfitError], what: str,
               limit_bytes: int = MAX_SETTINGS_BYTES, missing: str | None = None) -> bytes:
    """The bytes of a regular file (see `regular_file`), read without ever blocking on a FIFO."""
    p = regular_file(path, error=error, what=what, limit_bytes=limit_bytes, missing=missing)
    shown = repr(str(path))
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"cannot read {shown}: {exc.strerror}. Check its permissions, or pass {what}.") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between stat and open
            raise error(f"{shown} is not a regular file. Pass {what}.")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(8 * MIB, limit_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit_bytes:
                raise error(f"{shown} is over trainfit's {_size(limit_bytes)} limit for this file. "
                            f"Pass {what} (a smaller one).")
    except OSError as exc:
        raise error(f"cannot read {shown}: {exc.strerror}. Pass {what}.") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def read_text(path: str | os.PathLike[str], *, error: type[TrainfitError], what: str,
              limit_bytes: int = MAX_SETTINGS_BYTES, missing: str | None = None) -> str:
    """UTF-8 text (a leading BOM is dropped) of a regular file of at most `limit_bytes`."""
    raw = read_bytes(path, error=error, what=what, limit_bytes=limit_bytes, missing=missing)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{str(path)!r} is not UTF-8 text (bad byte at offset {exc.start}). Save it as UTF-8, or "
                    f"pass {what}.") from None


# JSON: strings (with escapes) and the structural brackets outside them.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_INNERMOST = re.compile(r"\[\]|\{\}")


def _json_too_deep(text: str, limit: int) -> bool:
    """Whether JSON `text` nests arrays/objects deeper than `limit`, in linear time without recursion: strip the
    strings, keep the brackets, and peel the innermost pairs, one level per pass (C-speed `re.sub`)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    for _ in range(limit):
        peeled = _INNERMOST.sub("", brackets)
        if len(peeled) == len(brackets):
            return False  # balanced and done, or unbalanced: json.loads reports the syntax error
        brackets = peeled
    return len(_INNERMOST.sub("", brackets)) < len(brackets)


class _Refused(ValueError):
    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.message, self.fix = message, fix


def _json_float(s: str) -> float:
    value = float(s)
    if not math.isfinite(value):
        raise _Refused(f"the number {s[:40]} is out of range (not a finite 64-bit float)", "Write a finite number.")
    return value


def _json_int(s: str) -> int:
    if len(s.lstrip("-")) > 19 or abs(int(s)) > INT64_MAX:
        raise _Refused(f"the number {s[:40]}{'...' if len(s) > 40 else ''} does not fit in 64 bits",
                       "Write a smaller number.")
    return int(s)


def _json_constant(s: str) -> float:
    raise _Refused(f"{s} is not a finite number (JSON has no {s})", "Write a finite number.")


def check_json_depth(text: str, *, error: type[TrainfitError], where: str) -> None:
    """Refuse JSON (or JSON Lines) text that nests deeper than MAX_DEPTH, before any parser recurses into it."""
    if _json_too_deep(text, MAX_DEPTH):
        raise error(f"{where} nests arrays/objects deeper than {MAX_DEPTH} levels. Flatten it: no config or data "
                    "file of LLaMA-Factory needs more than 5 levels.")


def json_loads(text: str) -> Any:
    """`json.loads` with finite floats and 64-bit integers. Raises json.JSONDecodeError for bad syntax and
    ValueError (str: "what. How to fix.") for a refused number. Call `check_json_depth` first."""
    try:
        return json.loads(text, parse_float=_json_float, parse_int=_json_int, parse_constant=_json_constant)
    except _Refused as exc:
        raise ValueError(f"{exc.message}. {exc.fix}") from None
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as exc:  # RecursionError cannot pass check_json_depth
        raise ValueError(f"it is not valid JSON ({str(exc)[:200]}). Fix the syntax.") from None


def parse_json(text: str, *, error: type[TrainfitError], where: str, fix: str = "Fix the file.") -> Any:
    """`json_loads` with the depth bound; `where` names the file in messages, `fix` ends a syntax error's."""
    check_json_depth(text, error=error, where=where)
    try:
        return json_loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}. {fix}") from None
    except ValueError as exc:
        raise error(f"{where}: {exc}") from None


def read_json(path: str | os.PathLike[str], *, error: type[TrainfitError], what: str,
              limit_bytes: int = MAX_SETTINGS_BYTES, missing: str | None = None, fix: str | None = None) -> Any:
    """A JSON file through `read_text` and `parse_json`."""
    text = read_text(path, error=error, what=what, limit_bytes=limit_bytes, missing=missing)
    return parse_json(text, error=error, where=repr(str(path)), fix=fix or f"Fix the syntax, or pass {what}.")


class _YamlRefused(yaml.YAMLError):
    def __init__(self, message: str, mark: Any, fix: str):
        super().__init__(message)
        self.message, self.mark, self.fix = message, mark, fix


_FLATTEN = "Flatten it: LLaMA-Factory configs and problem files need 3 levels."
_NO_ALIASES = "Write a smaller file: settings need a few hundred values, not repeated *aliases."


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader with a depth bound while composing, the alias-expanded size measured before
    constructing, and finite floats / 64-bit integers."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _YamlRefused(f"nests deeper than {MAX_DEPTH} levels", self.peek_event().start_mark, _FLATTEN)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: Any) -> Any:
        _measure(node)
        return super().construct_document(node)

    def construct_yaml_str(self, node: Any) -> str:
        value = super().construct_yaml_str(node)
        bad = next((c for c in value if c not in "\t\n\r" and not c.isprintable() and ord(c) < 0xA0), None)
        if bad is not None:
            raise _YamlRefused(f"a string holds the control character U+{ord(bad):04X}", node.start_mark,
                               "Remove it (settings are plain text).")
        return value

    def construct_yaml_float(self, node: Any) -> float:
        value = super().construct_yaml_float(node)
        if not math.isfinite(value):
            raise _YamlRefused(f"{node.value!r} is not a finite number", node.start_mark, "Write a finite number.")
        return value

    def construct_yaml_int(self, node: Any) -> int:
        digits = node.value.replace("_", "").lstrip("+-")
        if len(digits) > 22:  # before int() (0b/0o/0x forms are longer than their decimal value)
            raise _YamlRefused(f"the number {node.value[:40]}... does not fit in 64 bits", node.start_mark,
                               "Write a smaller number.")
        value = super().construct_yaml_int(node)
        if abs(value) > INT64_MAX:
            raise _YamlRefused(f"the number {node.value} does not fit in 64 bits", node.start_mark,
                               "Write a smaller number.")
        return value


_BoundedLoader.add_constructor("tag:yaml.org,2002:str", _BoundedLoader.construct_yaml_str)
_BoundedLoader.add_constructor("tag:yaml.org,2002:float", _BoundedLoader.construct_yaml_float)
_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [x for pair in node.value for x in pair]
    return []


def _measure(root: Any) -> None:
    """Refuse a node graph whose alias-expanded size exceeds MAX_YAML_NODES or depth MAX_DEPTH, or that contains
    itself (`&a [*a]`). Iterative, each distinct node visited once: a billion-laughs file costs its own size."""
    done: dict[int, tuple[int, int]] = {}  # id -> (expanded nodes, expanded depth)
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            kids = [done[id(k)] for k in _children(node)]
            size = 1 + sum(s for s, _ in kids)
            depth = 1 + max((d for _, d in kids), default=0)
            if size > MAX_YAML_NODES:
                raise _YamlRefused(f"holds more than {MAX_YAML_NODES:,} values (each *alias counted as the values it "
                                   "repeats)", node.start_mark, _NO_ALIASES)
            if depth > MAX_DEPTH:
                raise _YamlRefused(f"nests (through its &anchors and *aliases) deeper than {MAX_DEPTH} levels",
                                   node.start_mark, _NO_ALIASES)
            done[key] = (size, depth)
            continue
        if key in done:
            continue
        if key in on_path:
            raise _YamlRefused("has an *alias inside its own &anchor (a value that contains itself)", node.start_mark,
                               "Remove the *alias from inside its &anchor.")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in done)


def parse_yaml(text: str, *, error: type[TrainfitError], where: str) -> Any:
    """One YAML document through the bounded SafeLoader; `where` names the file in messages."""
    loader = None
    try:
        loader = _BoundedLoader(text)  # its Reader refuses control characters here
        return loader.get_single_data()
    except _YamlRefused as exc:
        line = f" at line {exc.mark.line + 1}" if exc.mark is not None else ""
        raise error(f"{where}{line} {exc.message}. {exc.fix}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise error(f"{where} is not valid YAML{line}. Fix the syntax.") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_mapping(path: str | Path, *, error: type[TrainfitError], what: str, missing: str,
                 not_mapping: str) -> dict[str, Any]:
    """A YAML file whose document is a mapping. `what`: the kind of file (for messages); `missing`: the sentence for
    an absent file; `not_mapping`: the sentence when the YAML is not a mapping."""
    text = read_text(path, error=error, what=what, missing=missing)
    data = parse_yaml(text, error=error, where=repr(str(path)))
    if not isinstance(data, dict):
        raise error(not_mapping)
    return data


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------

_FIX = {
    errno.EACCES: "Pick a folder you can write to (--out/--write), or fix its permissions.",
    errno.EPERM: "Pick a folder you can write to (--out/--write), or fix its permissions.",
    errno.EROFS: "The file system is read-only: pick another folder (--out/--write).",
    errno.ENOTDIR: "A file is in the way of a folder on that path: pick another path, or move the file.",
    errno.EEXIST: "A file is in the way of a folder on that path: pick another path, or move the file.",
    errno.EISDIR: "A folder is in the way: pick a file path.",
    errno.ENAMETOOLONG: "Use a shorter name or path (at most 255 bytes a name).",
    errno.ENOSPC: "Free some disk space, or write elsewhere (--out/--write).",
    errno.EDQUOT: "Free some disk space (quota exceeded), or write elsewhere (--out/--write).",
}


def os_error_message(path: str | os.PathLike[str], exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    return f"cannot write {path}: {reason}. {_FIX.get(exc.errno or 0, 'Check the path and its permissions.')}"


def make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return those created (outermost first) so a failure can remove
    them. Raises WriteError."""
    created: list[Path] = []
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
    except OSError as exc:
        remove_folders(created)
        raise WriteError(os_error_message(folder, exc)) from None
    return created


def remove_folders(created: list[Path]) -> None:
    """Remove folders made by `make_parents` (innermost first) if they are empty."""
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            break


def write_text_atomic(path: str | os.PathLike[str], text: str, *, force: bool) -> None:
    """Write `text` (UTF-8, bytes as given) to `path` through a temp file in the same folder and an atomic
    rename; create missing parent folders. Without `force` an existing file is never replaced, also when it
    appears while writing. On any failure nothing is left: not the temp file, not the folders it created.
    OS errors become WriteError: `cannot write <path>: <reason>. <fix>`."""
    p = Path(path)
    try:
        if p.is_dir():
            raise WriteError(f"{p} is a folder. Pass a file path.")
        if p.exists() and not force:
            raise TrainfitError(f"{p} exists. Pass --force to overwrite it.")
    except OSError as exc:
        raise WriteError(os_error_message(p, exc)) from None
    created = make_parents(p.parent)
    tmp = None
    ok = False
    try:
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name[:64]}.", suffix=".tmp")
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
            except OSError:  # no hard links here (some network/FAT file systems); os.replace reports real errors
                if p.exists():
                    raise TrainfitError(f"{p} exists. Pass --force to overwrite it.") from None
                os.replace(tmp, p)
        ok = True
    except OSError as exc:
        if isinstance(exc, WriteError):
            raise
        raise WriteError(os_error_message(p, exc)) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if not ok:
            remove_folders(created)
