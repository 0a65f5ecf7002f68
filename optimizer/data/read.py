"""Read the user's data as LLaMA-Factory 0.9.5 reads an SFT dataset (the counting is in `data.dataset`).

(Just over 500 lines: one converter per LLaMA-Factory format, each with the row checks LLaMA-Factory applies, and
the dataset_info.json schema they share.)

Reading (nothing is ever written next to the data):

- alpaca records ``{"instruction", "input", "output", "system", "history": [[q, a], ...]}``: the user turn is
  ``instruction + "\\n" + input`` (either may be empty), earlier turns come from ``history``;
- sharegpt records ``{"conversations": [{"from": "human"|"gpt"|"observation"|"function_call"|"system",
  "value": ...}], "system": ...}``;
- OpenAI-style records ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}]}`` (read
  as sharegpt with role/content tags, which is how trainfit's ``dataset_info.json`` declares them);
- as a ``.json`` list or ``.jsonl`` (one record a line), or through a ``dataset_info.json`` and a dataset name
  (``file_name``, ``formatting``: alpaca | sharegpt | openai, ``columns``, ``tags``), with LLaMA-Factory's
  column and tag defaults. Through ``dataset_info.json`` an alpaca ``system``/``history`` field counts only if
  ``columns`` names it, as in LLaMA-Factory; a bare file's alpaca ``system`` and ``history`` always count.

Ranking (preference) data for stage dpo is read by `data.pairwise` through the same converters.

A row LLaMA-Factory would drop or choke on (no ``output`` string, roles out of order, an odd number of messages,
a non-string content) is a :class:`DatasetError` that names the file, the row and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TrainfitError
from ..io import MAX_DATA_BYTES, check_json_depth, join_problems, json_loads, read_json, read_text, regular_file

__all__ = ["DatasetError", "DatasetFormat", "Conversation", "read_dataset", "read_files", "record_keys",
           "resolve_source", "validate_info_entry"]



class DatasetError(TrainfitError):
    """A data file trainfit cannot read as LLaMA-Factory would (message: file, row, what is wrong, the fix)."""


# ----------------------------------------------------------------------------------------------------------
# Format (LLaMA-Factory's DatasetAttr, the fields that matter for SFT text)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetFormat:
    """How records are read: LLaMA-Factory's ``formatting``, ``columns`` and ``tags``."""

    formatting: str = "alpaca"  # alpaca | sharegpt | openai
    prompt: str | None = "instruction"
    query: str | None = "input"
    response: str | None = "output"
    history: str | None = None
    messages: str | None = "conversations"
    system: str | None = None
    tools: str | None = None
    role_tag: str | None = "from"
    content_tag: str | None = "value"
    user_tag: str | None = "human"
    assistant_tag: str | None = "gpt"
    observation_tag: str | None = "observation"
    function_tag: str | None = "function_call"
    system_tag: str | None = "system"
    images: str | None = None  # LLaMA-Factory DatasetAttr.images: the column of image paths (None: no images)
    # ranking (preference) data, read by `data.pairwise`: the chosen and rejected response columns
    ranking: bool = False
    chosen: str | None = None
    rejected: str | None = None

    @classmethod
    def from_dataset_info(cls, entry: dict[str, Any], where: str = "dataset_info.json",
                          ranking: bool = False) -> DatasetFormat:
        """LLaMA-Factory's ``DatasetAttr.join``: defaults, then ``columns`` and ``tags`` (a key left out of a given
        ``columns`` is None, as in LLaMA-Factory). `ranking`: the reader wants preference pairs (data.pairwise)."""
        formatting = entry.get("formatting", "alpaca")
        if formatting not in ("alpaca", "sharegpt", "openai"):
            raise DatasetError(f"{where}: formatting {formatting!r} is unknown. Use alpaca, sharegpt or openai.")
        if entry.get("ranking") and not ranking:
            raise DatasetError(f"{where}: a ranking (preference) dataset is not SFT data. Give an SFT dataset.")
        if ranking and not entry.get("ranking"):
            raise DatasetError(f"{where}: not a ranking (preference) dataset; stage dpo trains on chosen/rejected "
                               "pairs. Give a ranking dataset (\"ranking\": true, LLaMA-Factory's data/README.md).")
        kw: dict[str, Any] = {"formatting": formatting, "ranking": ranking}
        cols = entry.get("columns")
        if cols is not None:
            if not isinstance(cols, dict):
                raise DatasetError(f"{where}: 'columns' must be an object. Map LLaMA-Factory names to your keys.")
            for name in ("prompt", "query", "response", "history", "messages", "system", "tools", "images", "chosen",
                         "rejected"):
                kw[name] = cols.get(name)
        if ranking and not (kw.get("chosen") and kw.get("rejected")):
            # [S] LLaMA-Factory data/parser.py::DatasetAttr: chosen and rejected default to None (no column)
            raise DatasetError(f"{where}: a ranking dataset names its response columns. Add \"columns\": "
                               "{\"chosen\": \"chosen\", \"rejected\": \"rejected\"} (your keys).")
        tags = entry.get("tags")
        if tags is not None:
            if not isinstance(tags, dict):
                raise DatasetError(f"{where}: 'tags' must be an object. Map LLaMA-Factory tag names to your values.")
            for name in ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag",
                         "system_tag"):
                kw[name] = tags.get(name)
        return cls(**kw)

    @classmethod
    def for_file(cls, formatting: str) -> DatasetFormat:
        """The format of a bare data file: alpaca (with system and history), sharegpt (from/value, with system and
        tools) or openai (messages with role/content, as sharegpt tags, the way trainfit's dataset_info.json
        declares it)."""
        if formatting == "alpaca":
            return cls(history="history", system="system", images="images")
        if formatting == "sharegpt":
            return cls(formatting="sharegpt", system="system", tools="tools", images="images")
        if formatting == "openai":
            return cls(formatting="sharegpt", messages="messages", system="system", tools="tools", images="images",
                       role_tag="role",
                       content_tag="content", user_tag="user", assistant_tag="assistant", observation_tag="tool",
                       system_tag="system")
        raise DatasetError(f"dataset formatting {formatting!r} is unknown. Use alpaca, sharegpt or openai.")

    def key(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


@dataclass(frozen=True)
class Conversation:
    """One SFT sample after conversion: messages alternate (user|observation, assistant|function)."""

    messages: tuple[tuple[str, str], ...]
    system: str = ""
    tools: str = ""
    images: tuple[str, ...] = ()  # image paths, resolved as LLaMA-Factory's converter does (see _images)


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


_DATA_FILE = "a .json or .jsonl data file"


def _read_text(path: Path, limit_bytes: int = MAX_DATA_BYTES) -> str:
    """The text of a data file (or dataset_info.json) through `optimizer.io`: a regular file, within the size limit
    (1 GiB for data, see optimizer.io), UTF-8, nesting at most MAX_DEPTH levels."""
    text = read_text(path, error=DatasetError, what=_DATA_FILE, limit_bytes=limit_bytes)
    check_json_depth(text, error=DatasetError, where=str(path))
    return text


def _rows(path: Path) -> list[tuple[str, Any]]:
    """[(label, record)]: label is "row N" (a JSON list, 1-based) or "line N" (JSON Lines)."""
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise DatasetError(
            f"{path}: trainfit reads .json and .jsonl data files, not {suffix or 'files without an extension'}. "
            "Convert it to JSON (a list of records) or JSON Lines."
        )
    text = _read_text(path)
    if not text.strip():
        raise DatasetError(f"{path} is empty. Put the training samples in it (a JSON list or one JSON record a line).")
    if suffix == ".json":
        try:
            data = json_loads(text)
        except ValueError as exc:
            if not isinstance(exc, json.JSONDecodeError):
                raise DatasetError(f"{path}: {exc}") from None
            lines = [ln for ln in text.splitlines() if ln.strip()]
            if len(lines) > 1 and lines[0].lstrip().startswith("{"):
                return _jsonl_rows(path, text)  # JSON Lines in a .json file: the datasets loader reads it too
            raise DatasetError(
                f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}. Fix the syntax."
            ) from None
        if isinstance(data, dict):
            raise DatasetError(
                f"{path}: the top level is an object. LLaMA-Factory reads a list of records: [{{...}}, {{...}}]."
            )
        if not isinstance(data, list):
            raise DatasetError(f"{path}: the top level is not a list. Write the samples as a JSON list of records.")
        if not data:
            raise DatasetError(f"{path} has no samples (an empty list). Put the training samples in it.")
        return [(f"row {i + 1}", rec) for i, rec in enumerate(data)]
    return _jsonl_rows(path, text)


def _jsonl_rows(path: Path, text: str) -> list[tuple[str, Any]]:
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"line {n}", json_loads(line)))
        except ValueError as exc:
            if not isinstance(exc, json.JSONDecodeError):
                raise DatasetError(f"{path}: line {n}: {exc}") from None
            raise DatasetError(
                f"{path}: line {n} is not valid JSON ({exc.msg} at column {exc.colno}). "
                "Each line of a .jsonl file must be one complete JSON record."
            ) from None
    if not out:
        raise DatasetError(f"{path} is empty. Put the training samples in it (a JSON list or one JSON record a line).")
    return out


def _detect_format(path: Path, rows: list[tuple[str, Any]]) -> DatasetFormat:
    label, first = rows[0]
    if not isinstance(first, dict):
        raise DatasetError(f"{path}: {label} is {_kind(first)}, not a record. Each sample must be a JSON object.")
    if "conversations" in first or "messages" in first:
        key = "conversations" if "conversations" in first else "messages"
        msgs = first.get(key)
        role_content = isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) and "role" in msgs[0]
        if role_content:
            fmt = DatasetFormat.for_file("openai")
        else:
            fmt = DatasetFormat.for_file("sharegpt")
        return DatasetFormat(**{**fmt.__dict__, "messages": key})
    if "instruction" in first or "output" in first or "input" in first:
        return DatasetFormat.for_file("alpaca")
    keys = ", ".join(sorted(map(str, first)))[:200]
    raise DatasetError(
        f"{path}: {label} has neither alpaca keys (instruction/input/output) nor sharegpt/OpenAI keys "
        f"(conversations/messages); it has: {keys}. Use one of those formats, or a dataset_info.json with columns."
    )


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    return {str: "a string", list: "a list", dict: "an object", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(v), type(v).__name__)


def _text(v: Any) -> str:
    return "" if v is None else v


def _convert_alpaca(rec: dict, fmt: DatasetFormat, where: str) -> Conversation:
    msgs: list[tuple[str, str]] = []
    if fmt.history:
        hist = rec.get(fmt.history)
        if hist is not None and not isinstance(hist, list):
            raise DatasetError(f"{where}: '{fmt.history}' is {_kind(hist)}. Write it as a list of "
                               "[instruction, response] pairs, or leave it out.")
        for k, pair in enumerate(hist or []):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                    and all(isinstance(x, str) for x in pair)):
                raise DatasetError(f"{where}: '{fmt.history}' item {k + 1} is not a pair of strings. Write each "
                                   "item as [instruction, response].")
            msgs += [("user", pair[0]), ("assistant", pair[1])]
    parts = []
    for col in (fmt.prompt, fmt.query):
        if not col:
            continue
        v = rec.get(col)
        if v in (None, ""):
            continue
        if not isinstance(v, str):
            raise DatasetError(f"{where}: '{col}' is {_kind(v)}, not a string. Write it as text.")
        parts.append(v)
    response = rec.get(fmt.response) if fmt.response else None
    if not isinstance(response, str):
        what = "is missing" if response is None else f"is {_kind(response)}"
        if response is None and "chosen" in rec and "rejected" in rec:  # a preference record read as SFT data
            raise DatasetError(f"{where}: '{fmt.response or 'output'}' {what}; the row has 'chosen' and 'rejected' "
                               "(preference data). Train it with stage: dpo (trainfit data --pairwise), or give SFT "
                               "data.")
        raise DatasetError(f"{where}: '{fmt.response or 'output'}' {what}; every SFT sample needs the response "
                           "text as a string. Add it, or remove the row.")
    msgs += [("user", "\n".join(parts)), ("assistant", response)]
    return Conversation(tuple(msgs), _system(rec, fmt, where), _tools(rec, fmt, where))


def _system(rec: dict, fmt: DatasetFormat, where: str) -> str:
    if not fmt.system:
        return ""
    v = rec.get(fmt.system)
    if v is not None and not isinstance(v, str):
        raise DatasetError(f"{where}: '{fmt.system}' is {_kind(v)}, not a string. Write the system prompt as text.")
    return _text(v)


def _tools(rec: dict, fmt: DatasetFormat, where: str) -> str:
    if not fmt.tools:
        return ""
    v = rec.get(fmt.tools)
    if v is None or v == "":
        return ""
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False)
    if not isinstance(v, str):
        raise DatasetError(f"{where}: '{fmt.tools}' is {_kind(v)}. Write the tools as a JSON string or list.")
    return v


def _messages(rec: dict, fmt: DatasetFormat, where: str) -> tuple[list[dict], str, str]:
    """The message list of a sharegpt/openai record and its role and content tags, each message checked."""
    col = fmt.messages or "conversations"
    msgs = rec.get(col)
    if not isinstance(msgs, list):
        what = "is missing" if msgs is None else f"is {_kind(msgs)}"
        raise DatasetError(f"{where}: '{col}' {what}. Each sample needs a list of messages under '{col}'.")
    rt, ct = fmt.role_tag or "from", fmt.content_tag or "value"
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or rt not in m:
            raise DatasetError(f"{where}: message {k + 1} has no '{rt}'. Each message needs '{rt}' and '{ct}'.")
    return msgs, rt, ct


def _leading_system(msgs: list[dict], fmt: DatasetFormat, rt: str, ct: str, where: str) -> str | None:
    """The text of a leading system message (LLaMA-Factory takes it as the system prompt), or None."""
    if not (fmt.system_tag and msgs and msgs[0].get(rt) == fmt.system_tag):
        return None
    system = msgs[0].get(ct)
    if not isinstance(system, str):
        raise DatasetError(f"{where}: the system message's '{ct}' is {_kind(system)}, not a string. "
                           "Write the system prompt as text.")
    return system


def _convert_sharegpt(rec: dict, fmt: DatasetFormat, where: str) -> Conversation:
    msgs, rt, ct = _messages(rec, fmt, where)
    col = fmt.messages or "conversations"
    system = _leading_system(msgs, fmt, rt, ct, where)
    offset = 1
    if system is not None:
        msgs = msgs[1:]
        offset = 2
    if system is None:
        system = _system(rec, fmt, where)
    if not msgs:
        raise DatasetError(f"{where}: '{col}' has no user/assistant messages. Add at least one pair, or remove "
                           "the row.")
    odd = (fmt.user_tag, fmt.observation_tag)
    even = (fmt.assistant_tag, fmt.function_tag)
    role_of = {fmt.user_tag: "user", fmt.assistant_tag: "assistant", fmt.observation_tag: "observation",
               fmt.function_tag: "function"}
    out: list[tuple[str, str]] = []
    for k, m in enumerate(msgs):
        role = m.get(rt)
        want = odd if k % 2 == 0 else even
        if role not in want:
            names = " or ".join(repr(t) for t in want if t)
            raise DatasetError(
                f"{where}: message {k + offset} has {rt} {role!r} where {names} must come. Messages must "
                f"alternate {fmt.user_tag!r} and {fmt.assistant_tag!r}, starting with {fmt.user_tag!r} "
                "(after an optional system message)."
            )
        content = m.get(ct)
        if not isinstance(content, str):
            raise DatasetError(f"{where}: message {k + offset} '{ct}' is {_kind(content)}, not a string. "
                               "Write the message text as a string.")
        out.append((role_of[role], content))
    if len(out) % 2:
        raise DatasetError(
            f"{where}: '{col}' has an odd number of user/assistant messages ({len(out)}); the last one must be "
            f"an {fmt.assistant_tag!r} message. Add the response, or remove the trailing message."
        )
    return Conversation(tuple(out), system, _tools(rec, fmt, where))


def _convert_openai(rec: dict, fmt: DatasetFormat, where: str) -> Conversation:
    """LLaMA-Factory 0.9.5's ``formatting: openai`` (OpenAIDatasetConverter): tool results are merged into one
    observation, assistant ``tool_calls`` become a function message, and the system prompt gets
    "detailed thinking off" appended (or is that string when empty) unless tools are given."""
    msgs, rt, ct = _messages(rec, fmt, where)
    col = fmt.messages or "conversations"
    system = _leading_system(msgs, fmt, rt, ct, where)
    if system is not None:
        msgs = msgs[1:]
    else:
        system = _system(rec, fmt, where)
    role_of = {fmt.user_tag: "user", fmt.assistant_tag: "assistant", fmt.observation_tag: "observation",
               fmt.function_tag: "function"}
    aligned: list[tuple[str, str]] = []
    pending: list[str] = []
    for k, m in enumerate(msgs):
        role, content = m.get(rt), m.get(ct)
        if role in (fmt.assistant_tag, fmt.function_tag) and m.get("tool_calls"):
            content = json.dumps([tc.get("function") for tc in m["tool_calls"] if isinstance(tc, dict)],
                                 ensure_ascii=False)
            role = fmt.function_tag
        if role not in role_of:
            raise DatasetError(f"{where}: message {k + 1} has {rt} {role!r}. Use {fmt.user_tag!r}, "
                               f"{fmt.assistant_tag!r}, {fmt.observation_tag!r} or {fmt.system_tag!r}.")
        if not isinstance(content, str):
            raise DatasetError(f"{where}: message {k + 1} '{ct}' is {_kind(content)}, not a string. "
                               "Write the message text as a string.")
        if role == fmt.observation_tag:
            pending.append(content)
            continue
        if pending:
            aligned.append(("observation", "\n</tool_response>\n<tool_response>\n".join(pending)))
            pending = []
        aligned.append((role_of[role], content))
    for k, (role, _c) in enumerate(aligned):
        want = ("user", "observation") if k % 2 == 0 else ("assistant", "function")
        if role not in want:
            raise DatasetError(f"{where}: messages do not alternate user/assistant (message {k + 1} is {role}). "
                               "Fix the order.")
    if not aligned or len(aligned) % 2:
        raise DatasetError(f"{where}: '{col}' must end with an assistant message (it has {len(aligned)} "
                           "user/assistant messages). Add the response, or remove the row.")
    tools = _tools(rec, fmt, where)
    if not system:
        system = "" if tools else "detailed thinking off"
    elif not tools:
        if "detailed thinking on" not in system and "detailed thinking off" not in system:
            system += "\ndetailed thinking off"
    else:
        system += "\n"
    return Conversation(tuple(aligned), system, tools)


def resolve_source(
    path: str | os.PathLike[str], dataset: str | None, formatting: str | None, ranking: bool = False
) -> tuple[list[Path], DatasetFormat | None, str]:
    """(data files, format or None to detect, display name). `ranking`: preference pairs are wanted."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "dataset_info.json").is_file() and dataset is not None:
        p = p / "dataset_info.json"
    if p.name == "dataset_info.json":
        info = read_json(p, error=DatasetError, what="a dataset_info.json", fix="Fix the syntax.")
        if not isinstance(info, dict) or not info:
            raise DatasetError(f"{p} has no dataset entries. Add one: {{\"name\": {{\"file_name\": \"data.json\"}}}}.")
        if dataset is None:
            if len(info) != 1:
                raise DatasetError(f"{p} defines {len(info)} datasets ({_names(info)}). Name one with --dataset.")
            dataset = next(iter(info))
        if dataset not in info:
            raise DatasetError(f"Undefined dataset {dataset!r} in {p} (it has: {_names(info)}). "
                               "Use one of those names.")
        entry = info[dataset]
        where = f"{p} entry {dataset!r}"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where} is not an object. Write it as {{\"file_name\": ...}}.")
        for remote in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"):
            if remote in entry:
                raise DatasetError(f"{where} loads from {remote}; trainfit reads local files only. Download the "
                                   "data and point file_name at the local file.")
        if "file_name" not in entry:
            raise DatasetError(f"{where} has no file_name. Add the data file's name.")
        problems = validate_info_entry(entry)
        if problems:
            raise DatasetError(f"{where}: {join_problems(problems)}. Fix the entry (LLaMA-Factory's data/README.md "
                               "describes each field).")
        fmt = DatasetFormat.from_dataset_info(entry, where, ranking)
        target = (p.parent / entry["file_name"]).resolve()
        if target.is_dir():
            files = sorted(f for f in target.iterdir() if f.suffix.lower() in (".json", ".jsonl"))
            if not files:
                raise DatasetError(f"{target} holds no .json or .jsonl files. Put the data files there.")
        elif os.path.lexists(target):
            files = [regular_file(target, error=DatasetError, what=_DATA_FILE, limit_bytes=MAX_DATA_BYTES)]
        else:
            raise DatasetError(f"{where}: file_name {entry['file_name']!r} does not exist ({target}). Fix the "
                               "path; it is relative to the folder of dataset_info.json.")
        return files, fmt, f"{p}:{dataset}"
    if not os.path.lexists(p):
        raise DatasetError(f"data file {str(path)!r} does not exist. Check the path.")
    if p.is_dir():
        raise DatasetError(f"{p} is a folder. Pass a .json or .jsonl data file, or its dataset_info.json with a "
                           "dataset name.")
    p = regular_file(p, error=DatasetError, what=_DATA_FILE, limit_bytes=MAX_DATA_BYTES)
    fmt = DatasetFormat.for_file(formatting) if formatting else None
    if fmt is not None and ranking:
        fmt = DatasetFormat(**{**fmt.__dict__, "ranking": True, "chosen": "chosen", "rejected": "rejected"})
    return [p], fmt, str(p)


def _names(info: dict[str, Any], limit: int = 10) -> str:
    names = sorted(map(str, info))
    return ", ".join(names[:limit]) + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


# LLaMA-Factory 0.9.5 data/README.md: the `columns` and `tags` names a dataset_info.json entry may set.
_COLUMNS = ("prompt", "query", "response", "history", "messages", "system", "tools", "images", "videos", "audios",
            "chosen", "rejected", "kto_tag")
_TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")


def validate_info_entry(entry: dict[str, Any]) -> list[str]:
    """Everything wrong with the types of a dataset_info.json entry (empty when it reads), per LLaMA-Factory's
    data/README.md: file_name a non-empty string, formatting alpaca|sharegpt|openai, ranking a boolean, columns and
    tags objects of known names whose values are strings (or null)."""
    problems: list[str] = []
    name = entry.get("file_name")
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        problems.append(f"file_name must be a non-empty path string, found {_short(name)}")
    if "formatting" in entry and entry["formatting"] not in ("alpaca", "sharegpt", "openai"):
        problems.append(f"formatting must be alpaca, sharegpt or openai, found {_short(entry['formatting'])}")
    if "ranking" in entry and not isinstance(entry["ranking"], bool):
        problems.append(f"ranking must be true or false, found {_short(entry['ranking'])}")
    for group, known in (("columns", _COLUMNS), ("tags", _TAGS)):
        value = entry.get(group)
        if value is None:
            continue
        if not isinstance(value, dict):
            problems.append(f"{group} must be an object, found {_short(value)}")
            continue
        for k, v in value.items():
            if k not in known:
                problems.append(f"{group} names {_short(k)}, not a LLaMA-Factory {group[:-1]} name (known: "
                                f"{', '.join(known)})")
            elif v is not None and not isinstance(v, str):
                problems.append(f"{group}.{k} must be a string, found {_short(v)}")
    return problems


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value) if isinstance(value, (str, bool, type(None), int, float)) else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_dataset(
    path: str | os.PathLike[str], *, dataset: str | None = None, formatting: str | None = None
) -> list[Conversation]:
    """All samples of a data file (or of `dataset` in a dataset_info.json), converted as LLaMA-Factory does.

    `formatting` (alpaca | sharegpt | openai) applies to a bare file; without it the format is detected from the
    first record. Raises DatasetError for an unreadable file or the first malformed row."""
    files, fmt, _name = resolve_source(path, dataset, formatting)
    return read_files(files, fmt)


def record_keys(path: str | os.PathLike[str]) -> set[str]:
    """The top-level keys that occur in any record of a .json/.jsonl data file. For writing its
    dataset_info.json: LLaMA-Factory fails on a `columns` entry (e.g. "system") that no record has, and ignores a
    field (an alpaca "system" or "history") that `columns` does not name."""
    keys: set[str] = set()
    for _label, rec in _rows(Path(path).expanduser()):
        if isinstance(rec, dict):
            keys.update(map(str, rec))
    return keys


def read_files(files: list[Path], fmt: DatasetFormat | None) -> list[Conversation]:
    out: list[Conversation] = []
    for f in files:
        rows = _rows(f)
        ffmt = fmt or _detect_format(f, rows)
        conv = {"alpaca": _convert_alpaca, "sharegpt": _convert_sharegpt, "openai": _convert_openai}[ffmt.formatting]
        for label, rec in rows:
            where = f"{f}: {label}"
            if not isinstance(rec, dict):
                raise DatasetError(f"{where} is {_kind(rec)}, not a record. Each sample must be a JSON object.")
            c = conv(rec, ffmt, where)
            images = _images(rec, ffmt, where, f.parent)
            out.append(dataclasses.replace(c, images=images) if images else c)
    return out


def _images(rec: dict, fmt: DatasetFormat, where: str, media_dir: Path) -> tuple[str, ...]:
    """A record's image paths. [S] LLaMA-Factory data/converter.py::DatasetConverter._find_medias: a single value
    becomes a one-item list; a string path is joined to `media_dir` (default: the dataset folder) when that file
    exists, and kept as written otherwise."""
    if not fmt.images or rec.get(fmt.images) is None:
        return ()
    value = rec[fmt.images]
    items = value if isinstance(value, list) else [value]
    out = []
    for k, item in enumerate(items):
        if not isinstance(item, str):
            raise DatasetError(f"{where}: '{fmt.images}' item {k + 1} is {_kind(item)}, not a file path. Write "
                               "each image as a path string (relative to the data file's folder).")
        joined = media_dir / item
        out.append(str(joined) if joined.is_file() else item)
    return tuple(out)
