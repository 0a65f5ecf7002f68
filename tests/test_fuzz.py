"""Hostile input at every edge: no traceback, no hang, no runaway memory, nothing written.

Three layers:
1. every case of tests/hostile.py (config.json values, write errors, non-finite numbers, deep nesting,
   dataset_info.json types, alias bombs, FIFOs/devices, large inputs): in-process through typer's CliRunner, or in
   a subprocess with a timeout and a 2 GiB address-space limit where a hang or runaway memory must be caught;
2. hypothesis: mutations of the shipped LLaMA-Factory configs, of a problem, of config.json files of the catalog
   and of data files / dataset_info.json (hostile values in random places, truncated or garbled text);
3. a file under 1 KB (alias bomb, nesting bomb) under RLIMIT_AS 1 GiB: one clean error line, a small peak RSS.

Every run must end with exit 0 (or 3: does not fit / infeasible), or 1 with exactly one `Error:` line that says
how to fix it, no traceback; on exit 1 the workspace is byte-for-byte unchanged.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from optimizer.cli import app
from optimizer.errors import TrainfitError

sys.path.insert(0, str(Path(__file__).parent))
from hostile import (
    ALPACA,
    BASE_CONFIG,
    BASE_PROBLEM,
    REPO,
    alias_bomb,
    cases,
    prepare,
    run_subprocess,
    verdict,
)

runner = CliRunner()
# "what. How to fix." : a second sentence (or clause after ':'/';') that starts with a capital or a backtick.
FIX = re.compile(r"[.:;)]\s+[A-Z`(]")


def tree(ws: Path) -> dict[str, tuple]:
    """Every path under `ws` with its mode, size, mtime and (regular files) content hash; FIFOs are not opened."""
    out = {}
    for root, dirs, files in os.walk(ws):
        for name in dirs + files:
            p = Path(root) / name
            st_ = p.lstat()
            digest = ""
            if p.is_file() and not p.is_symlink() and os.access(p, os.R_OK) and st_.st_size < 64 << 20:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(ws))] = (st_.st_mode, st_.st_size, st_.st_mtime_ns, digest)
    return out


def invoke(ws: Path, argv: list[str]):
    """The CLI in-process with `ws` as the working folder; (exit code, stderr, exception or None)."""
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        res = runner.invoke(app, argv, env={"TRAINFIT_CACHE": str(ws.parent / "cache")})
    finally:
        os.chdir(cwd)
    exc = res.exception if not isinstance(res.exception, SystemExit) else None
    return res.exit_code, res.stderr, exc


def assert_clean(code: int | None, stderr: str, before: dict, after: dict, exc: BaseException | None, what: str):
    v = verdict(code, stderr, before, after, exc)
    if exc is not None:
        raise AssertionError(f"{what}: {type(exc).__name__}: {exc}") from exc
    assert v == "ok", f"{what}: {v}\n{stderr[-2000:]}"
    assert code in (0, 1, 3), f"{what}: exit {code}"
    if code != 0:
        errors = [ln for ln in stderr.splitlines() if ln.startswith("Error:")]
        assert len(errors) == (1 if code == 1 else len(errors)), f"{what}: {stderr}"
        if code == 1:
            assert FIX.search(errors[0][7:]), f"{what}: the message does not say how to fix it: {errors[0]}"
            assert len(errors[0]) < 4000, f"{what}: a {len(errors[0])}-character error line"
    if code == 1:
        assert after == before, f"{what}: files changed on an error: {set(after.items()) ^ set(before.items())}"


# ----------------------------------------------------------------------------------------------------------
# 1. The hostile cases
# ----------------------------------------------------------------------------------------------------------

ALL = [c for c in cases() if not (c.needs_permissions and os.geteuid() == 0)]
IN_PROCESS = [c for c in ALL if not c.subprocess_only]
# Hostile-looking but valid: a null optional config.json field takes transformers' default; a `text_config` that is
# not an object is ignored (the top-level fields are read).
ACCEPTED = {"num_key_value_heads=null", "head_dim=null", "max_position_embeddings=null", "text_config list"}
OUTSIDE = [c for c in ALL if c.subprocess_only]


@pytest.mark.parametrize("case", IN_PROCESS, ids=[f"{c.cls}: {c.name}" for c in IN_PROCESS])
def test_hostile_case_in_process(case, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    prepare(case, ws)
    before = tree(ws)
    code, stderr, exc = invoke(ws, case.argv)
    assert_clean(code, stderr, before, tree(ws), exc, case.name)
    if case.name not in ACCEPTED:
        assert code == 1, f"{case.name}: accepted (exit {code})"
    for root, dirs, _files in os.walk(ws):  # let tmp_path's cleanup into read-only folders
        for d in dirs:
            os.chmod(Path(root) / d, 0o755)


def test_hostile_cases_in_subprocesses(tmp_path):
    """FIFOs, devices, alias bombs, over-limit files: each in its own process, 60 s and 2 GiB at most."""

    def one(i_case):
        i, case = i_case
        ws = tmp_path / f"ws{i}"
        ws.mkdir()
        prepare(case, ws)
        before = tree(ws)
        code, _out, err = run_subprocess(case.argv, ws, timeout_s=60)
        return case, code, err, before, tree(ws)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        for case, code, err, before, after in pool.map(one, enumerate(OUTSIDE)):
            assert_clean(code, err, before, after, None, case.name)
            assert code == 1, f"{case.name}: accepted (exit {code})"


def test_the_messages_of_the_main_hostile_classes(tmp_path):
    """Exact text for one case per class (a regression shows here first)."""
    (tmp_path / "cfg.json").write_text(json.dumps({**BASE_CONFIG, "hidden_size": 0, "num_key_value_heads": 3}))
    code, err, _ = invoke(tmp_path, ["estimate", "--model", "cfg.json"])
    assert (code, err.strip()) == (1, (
        "Error: cfg.json: config.json hidden_size must be between 1 and 131,072, found 0; num_attention_heads 14 is "
        "not divisible by num_key_value_heads 3. Fix these fields (copy them from the model's Hugging Face "
        "config.json), or pass the config.json of a decoder-only causal LM."))
    (tmp_path / "c.yaml").write_text(alias_bomb())
    code, err, _ = invoke(tmp_path, ["estimate", "--config", "c.yaml"])
    assert (code, err.strip()) == (1, (
        "Error: 'c.yaml' at line 6 holds more than 200,000 values (each *alias counted as the values it repeats). "
        "Write a smaller file: settings need a few hundred values, not repeated *aliases."))
    os.mkfifo(tmp_path / "f.yaml")
    code, err, _ = invoke(tmp_path, ["estimate", "--config", "f.yaml"])
    assert (code, err.strip()) == (1, "Error: 'f.yaml' is a FIFO (named pipe), not a regular file. Pass the path "
                                      "of a LLaMA-Factory training YAML.")
    (tmp_path / "many.yaml").write_text("".join(f"k{i}: 1\n" for i in range(20_000)))
    code, err, _ = invoke(tmp_path, ["estimate", "--config", "many.yaml"])
    assert code == 1 and len(err) < 2000 and err.rstrip().endswith("; ... and 19990 more. Fix these keys.")


def test_writers_report_permission_errors_and_leave_nothing(tmp_path, monkeypatch):
    """A read-only folder, emulated (the tests may run as root, which writes anyway): EACCES on mkdir and on the
    temp file."""
    from optimizer.io import WriteError, write_text_atomic
    from optimizer.llamafactory.configs import write_configs

    def denied(*_a, **_k):
        raise PermissionError(errno.EACCES, "Permission denied")

    before = tree(tmp_path)
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(WriteError) as err:
        write_text_atomic(tmp_path / "a" / "b" / "out.yaml", "x\n", force=False)
    assert str(err.value) == (f"cannot write {tmp_path / 'a' / 'b' / 'out.yaml'}: Permission denied. Pick a folder "
                              "you can write to (--out/--write), or fix its permissions.")
    with pytest.raises(TrainfitError):
        write_configs({"dataset_info.json": "{}\n", "p01_x.yaml": "# trainfit\n"}, "configs/p", force=False,
                      root=tmp_path)
    assert tree(tmp_path) == before  # no configs/, no configs/p/, no temp file


def test_write_configs_removes_what_it_wrote_when_a_later_file_fails(tmp_path, monkeypatch):
    from optimizer import io
    from optimizer.llamafactory.configs import write_configs

    real = io.write_text_atomic
    calls = []

    def second_fails(p, text, *, force):
        calls.append(p)
        if len(calls) == 2:
            raise io.WriteError(f"cannot write {p}: No space left on device. Free some disk space.")
        real(p, text, force=force)

    monkeypatch.setattr("optimizer.llamafactory.configs.write_text_atomic", second_fails)
    with pytest.raises(TrainfitError, match="No space left"):
        write_configs({"a.json": "{}\n", "b.yaml": "x\n"}, "configs/p", force=False, root=tmp_path)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------
# 2. hypothesis: mutations of shipped inputs
# ----------------------------------------------------------------------------------------------------------

HOSTILE = st.one_of(
    st.sampled_from([0, -1, 1, -(2**63), 2**63 - 1, 2**64, 10**40, 1e-300, 1e308, float("inf"), float("-inf"),
                     float("nan"), "", "x" * 5000, "all", None, True, False, [], {}, [[[[]]]], {"a": {"b": []}},
                     "../../etc/passwd", "/dev/zero", "\x00"]),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.lists(st.one_of(st.integers(-5, 5000), st.text(max_size=5)), max_size=4),
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated(draw, seed, keep=()):
    """`seed` with 1-3 random edits: a value replaced by a hostile one, a key removed, an unknown key added."""
    obj = copy.deepcopy(seed)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(obj) if p and p not in keep]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if op == "replace":
            parent[path[-1]] = copy.deepcopy(draw(HOSTILE))
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=12))] = copy.deepcopy(draw(HOSTILE))
    return obj


@st.composite
def garbled(draw, text):
    """The text as is, cut short, or with a few random characters inserted."""
    how = draw(st.sampled_from(["as is", "as is", "cut", "insert"]))
    if how == "cut":
        return text[: draw(st.integers(0, len(text)))]
    if how == "insert":
        at = draw(st.integers(0, len(text)))
        return text[:at] + draw(st.text(min_size=1, max_size=5)) + text[at:]
    return text


def _yaml(obj) -> str:
    return yaml.safe_dump(obj, allow_unicode=True, sort_keys=False)


def _run_fuzz(files: dict[str, str], argv: list[str], what: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        ws.mkdir()
        for name, text in files.items():
            (ws / name).write_text(text, encoding="utf-8", errors="surrogatepass")
        before = tree(ws)
        code, stderr, exc = invoke(ws, argv)
        assert_clean(code, stderr, before, tree(ws), exc, f"{what} {argv}")


SHIPPED_CONFIGS = sorted((REPO / "configs").glob("*/*.yaml"))[:6]
CONFIG_SEEDS = [yaml.safe_load(p.read_text()) for p in SHIPPED_CONFIGS]
# 150 examples a target: about 10 s in all; TRAINFIT_FUZZ_EXAMPLES=1500 for a longer hunt (about 2 min).
FUZZ = settings(max_examples=int(os.environ.get("TRAINFIT_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.data())
def test_fuzz_llamafactory_configs(data):
    seed = data.draw(st.sampled_from(CONFIG_SEEDS))
    text = data.draw(garbled(_yaml(data.draw(mutated(seed)))))
    cmd = data.draw(st.sampled_from([["estimate", "--config", "c.yaml", "--gpu", "rtx-5060-ti-16gb"],
                                     ["check", "c.yaml", "--gpu", "rtx-3060-12gb"]]))
    _run_fuzz({"c.yaml": text}, cmd, "config")


@FUZZ
@given(st.data())
def test_fuzz_problems(data):
    seed = yaml.safe_load(BASE_PROBLEM)
    # the search space stays small (its size bound is the search's business): its lists are edited, not dropped
    obj = data.draw(mutated(seed, keep={("search",)}))
    if not isinstance(obj.get("search"), dict):
        obj["search"] = seed["search"]
    text = data.draw(garbled(_yaml(obj)))
    _run_fuzz({"p.yaml": text}, ["solve", "p.yaml", "--out", "out"], "problem")


def _catalog_configs() -> list[dict]:
    from optimizer.models.catalog import model_configs

    return [BASE_CONFIG] + [e["config"] for e in list(model_configs().values())[:8]]


@FUZZ
@given(st.data())
def test_fuzz_config_json(data):
    seed = data.draw(st.sampled_from(_catalog_configs()))
    text = data.draw(garbled(json.dumps(data.draw(mutated(seed)))))
    _run_fuzz({"cfg.json": text}, ["estimate", "--model", "cfg.json", "--cutoff-len", "256"], "config.json")


SHAREGPT = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "system": "s"}]
OPENAI = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]


@FUZZ
@given(st.data())
def test_fuzz_data_files(data):
    records = data.draw(mutated(data.draw(st.sampled_from([ALPACA, SHAREGPT, OPENAI]))))
    kind = data.draw(st.sampled_from(["json", "jsonl", "info"]))
    if kind == "jsonl" and isinstance(records, list):
        text = "\n".join(json.dumps(r) for r in records) + "\n"
    else:
        text = json.dumps(records)
    files = {"d.json" if kind != "jsonl" else "d.jsonl": data.draw(garbled(text))}
    argv = ["data", "d.json" if kind != "jsonl" else "d.jsonl"]
    if kind == "info":
        entry = data.draw(mutated({"file_name": "d.json", "formatting": "sharegpt",
                                   "columns": {"messages": "conversations", "system": "system"},
                                   "tags": {"role_tag": "from", "content_tag": "value"}}))
        files["dataset_info.json"] = json.dumps({"ds": entry})
        argv = ["data", "dataset_info.json"]
    _run_fuzz(files, argv, "data")


# ----------------------------------------------------------------------------------------------------------
# 3. A 1 KB file never makes trainfit big
# ----------------------------------------------------------------------------------------------------------

BOMBS = {
    "alias bomb": ("c.yaml", alias_bomb(), ["estimate", "--config", "c.yaml"]),
    "YAML nesting bomb": ("c.yaml", "a: " + "[" * 400 + "]" * 400 + "\n", ["estimate", "--config", "c.yaml"]),
    "JSON nesting bomb": ("cfg.json", "[" * 500 + "]" * 500, ["estimate", "--model", "cfg.json"]),
    "data nesting bomb": ("d.json", "[" * 500 + "]" * 500, ["data", "d.json"]),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_a_1kb_file_stays_small(name, tmp_path):
    file, text, argv = BOMBS[name]
    assert len(text.encode()) <= 1024
    (tmp_path / file).write_text(text)
    script = ("import atexit, resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
              "atexit.register(lambda: print('peak_kib', [ln.split()[1] for ln in open('/proc/self/status') "
              "if ln.startswith('VmHWM')][0])); "
              "sys.argv = ['trainfit'] + sys.argv[1:]; from optimizer.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", script, *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    # VmHWM: this process's peak RSS (ru_maxrss would include the forking pytest's, kept across exec)
    peak_mib = int(proc.stdout.split("peak_kib")[-1]) / 1024
    assert peak_mib < 400, f"peak RSS {peak_mib:.0f} MiB"
