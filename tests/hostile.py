"""Hostile inputs by class, as a user (or an attacker) would try them: each case writes files into an empty
workspace and names the `trainfit` command line to run there.

Used by tests/test_fuzz.py (every case must end in exit 0/1/3, one `Error:` line with a fix, no traceback, no hang,
no runaway memory, nothing written or left behind) and runnable as a tally:

    .venv/bin/python tests/hostile.py            # outcome counts by class (each case in a subprocess)
"""

from __future__ import annotations

import json
import os
import resource
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A config.json trainfit models (Qwen2.5-0.5B's, from its Hugging Face repo).
BASE_CONFIG = {
    "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "hidden_act": "silu",
}
# A small LLaMA-Factory config (the reference case's, trimmed).
BASE_YAML = """model_name_or_path: Qwen/Qwen2.5-3B-Instruct
quantization_bit: 4
lora_rank: 8
lora_target: all
cutoff_len: 384
per_device_train_batch_size: 1
gradient_accumulation_steps: 16
num_train_epochs: 3.0
val_size: 0.1
bf16: true
"""
# A problem with a one-point search space (fast to solve) and a dataset summary (no tokenizing).
BASE_PROBLEM = """name: p
model: Qwen/Qwen2.5-0.5B-Instruct
gpu: rtx-5060-ti-16gb
dataset:
  name: d
  summary:
    num_samples: 300
    token_length_percentiles: {50: 200, 100: 600}
margin: 0.1
search:
  finetuning_type: [lora]
  lora_rank: [8]
  lora_target: [all]
  cutoff_len: [512]
  per_device_train_batch_size: [1]
  gradient_accumulation_steps: [4]
  gradient_checkpointing: [true]
  optim: [adamw_torch_fused]
  enable_liger_kernel: [false]
objective:
  num_train_epochs: 3.0
"""
ALPACA = [{"instruction": "Say hi", "input": "", "output": "Hi there"}, {"instruction": "Add 1+1", "output": "2"}]


@dataclass
class Case:
    cls: str
    name: str
    files: dict[str, str | bytes] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)
    setup: Callable[[Path], None] | None = None  # extra setup (a FIFO, a read-only folder)
    subprocess_only: bool = False  # a hang or runaway memory must be caught from outside
    needs_permissions: bool = False  # a read-only folder: meaningless as root (root writes anyway)


def _cfg(**over) -> str:
    return json.dumps({**BASE_CONFIG, **over})


def _raw_cfg(key: str, raw: str) -> str:
    """config.json text with `key` set to a raw JSON token (1e400 parses to inf in Python's json)."""
    return json.dumps({k: v for k, v in BASE_CONFIG.items() if k != key})[:-1] + f', "{key}": {raw}}}'


def _problem(**repl: str) -> str:
    text = BASE_PROBLEM
    for old, new in repl.items():
        text = text.replace(old.replace("__", " "), new)
    return text


def _mkfifo(name: str) -> Callable[[Path], None]:
    return lambda ws: os.mkfifo(ws / name)


def _readonly(name: str) -> Callable[[Path], None]:
    def f(ws: Path) -> None:
        (ws / name).mkdir()
        (ws / name).chmod(stat.S_IRUSR | stat.S_IXUSR)
    return f


def alias_bomb(levels: int = 9) -> str:
    """"Billion laughs": 9 levels of 9 aliases each, under 1 KB, 9**9 (387 million) strings when expanded."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        refs = ",".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    lines.append(f"lora_target: *a{levels - 1}")
    return "\n".join(lines) + "\n"


def cases() -> list[Case]:
    out: list[Case] = []
    est = ["estimate", "--model", "cfg.json"]
    # 1. config.json values (through estimate --model, solve --models and a problem's model:)
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size", "max_position_embeddings")
    bad = {"zero": "0", "negative": "-8", "string": '"abc"', "null": "null", "1e400": "1e400", "fraction": "7.5",
           "huge": "1" + "0" * 30, "true": "true"}
    for f in fields:
        for label, raw in bad.items():
            out.append(Case("config.json values", f"{f}={label}", {"cfg.json": _raw_cfg(f, raw)}, est))
    for label, over in {"model_type unknown": {"model_type": "bert"}, "model_type number": {"model_type": 5},
                        "hidden not divisible by heads": {"hidden_size": 900},
                        "heads not divisible by kv heads": {"num_key_value_heads": 3},
                        "dtype number": {"torch_dtype": 16}, "tie string": {"tie_word_embeddings": "yes"},
                        "hidden_act list": {"hidden_act": ["silu"]},
                        "softcapping string": {"final_logit_softcapping": "x"},
                        "attention softcapping negative": {"attn_logit_softcapping": -1},
                        "text_config list": {"text_config": [1, 2]},
                        "text_config bad": {"model_type": "gemma3", "text_config": {"hidden_size": -1}}}.items():
        out.append(Case("config.json values", label, {"cfg.json": _cfg(**over)}, est))
    out.append(Case("config.json values", "top-level list", {"cfg.json": "[1, 2]"}, est))
    out.append(Case("config.json values", "solve --models zero heads",
                    {"cfg.json": _cfg(num_attention_heads=0), "p.yaml": BASE_PROBLEM},
                    ["solve", "p.yaml", "--models", "cfg.json", "--no-write"]))
    out.append(Case("config.json values", "problem model: string layers",
                    {"cfg.json": _cfg(num_hidden_layers="many"),
                     "p.yaml": _problem(**{"model:__Qwen/Qwen2.5-0.5B-Instruct": "model: cfg.json"})},
                    ["solve", "p.yaml", "--no-write"]))
    out.append(Case("config.json values", "problem model: 1e400 vocab",
                    {"cfg.json": _raw_cfg("vocab_size", "1e400"),
                     "p.yaml": _problem(**{"model:__Qwen/Qwen2.5-0.5B-Instruct": "model: cfg.json"})},
                    ["solve", "p.yaml", "--no-write"]))
    out.append(Case("config.json values", "data --model zero hidden",
                    {"cfg.json": _cfg(hidden_size=0), "d.json": json.dumps(ALPACA)},
                    ["data", "d.json", "--model", "cfg.json"]))

    # 2. OS errors when writing
    solve_out = ["solve", "p.yaml"]
    # does not fit, so check proposes a fix to write
    too_long = {"c.yaml": BASE_YAML.replace("cutoff_len: 384", "cutoff_len: 9000")}
    out += [
        Case("write errors", "--out onto a file", {"p.yaml": BASE_PROBLEM, "f": "x"}, solve_out + ["--out", "f"]),
        Case("write errors", "--out below a file", {"p.yaml": BASE_PROBLEM, "f": "x"}, solve_out + ["--out", "f/sub"]),
        Case("write errors", "--out in a read-only folder", {"p.yaml": BASE_PROBLEM}, solve_out + ["--out", "ro/x"],
             setup=_readonly("ro"), needs_permissions=True),
        Case("write errors", "--out is a read-only folder", {"p.yaml": BASE_PROBLEM}, solve_out + ["--out", "ro"],
             setup=_readonly("ro"), needs_permissions=True),
        Case("write errors", "300-character problem name", {"p.yaml": _problem(**{"name:__p": "name: " + "n" * 300})},
             solve_out),
        Case("write errors", "300-character --out", {"p.yaml": BASE_PROBLEM}, solve_out + ["--out", "o" * 300]),
        Case("write errors", "check --write below a file", {**too_long, "f": "x"},
             ["check", "c.yaml", "--gpu", "rtx-3060-12gb", "--write", "f/out.yaml"]),
        Case("write errors", "check --write in a read-only folder", too_long,
             ["check", "c.yaml", "--gpu", "rtx-3060-12gb", "--write", "ro/out.yaml"], setup=_readonly("ro"),
             needs_permissions=True),
        Case("write errors", "check --write 300-character name", too_long,
             ["check", "c.yaml", "--gpu", "rtx-3060-12gb", "--write", "w" * 300 + ".yaml"]),
    ]

    # 3. non-finite and extreme numbers
    def prob(label: str, old: str, new: str) -> None:
        out.append(Case("non-finite/extreme numbers", "problem " + label, {"p.yaml": _problem(**{old: new})},
                        ["solve", "p.yaml", "--no-write"]))

    prob("epochs .inf", "num_train_epochs:__3.0", "num_train_epochs: .inf")
    prob("epochs .nan", "num_train_epochs:__3.0", "num_train_epochs: .nan")
    prob("epochs 1e-300", "num_train_epochs:__3.0", "num_train_epochs: 1.0e-300")
    prob("epochs 1e300", "num_train_epochs:__3.0", "num_train_epochs: 1.0e+300")
    prob("margin .nan", "margin:__0.1", "margin: .nan")
    for value in ("[1, .nan]", "[0]", "[1.0e+300]", "[]", "[three]"):  # searched epochs, none in the objective
        text = _problem(**{"num_train_epochs:__3.0": "prefer: balanced", "enable_liger_kernel:__[false]":
                           f"enable_liger_kernel: [false]\n  num_train_epochs: {value}"})
        out.append(Case("non-finite/extreme numbers", "problem search epochs " + value, {"p.yaml": text},
                        ["solve", "p.yaml", "--no-write"]))
    prob("epochs in search and objective", "enable_liger_kernel:__[false]",
         "enable_liger_kernel: [false]\n  num_train_epochs: [1, 2]")
    prob("weight .inf", "num_train_epochs:__3.0", "num_train_epochs: 3.0\n  quality_weights: {target: .inf}")
    prob("weight .nan", "num_train_epochs:__3.0", "num_train_epochs: 3.0\n  quality_weights: {rank: .nan}")
    prob("weight 1e308", "num_train_epochs:__3.0", "num_train_epochs: 3.0\n  quality_weights: {cutoff: 1.0e+308}")
    gpu = "gpu: {name: g, memory_mib: 16000, bf16_tflops: %s, bandwidth_gbps: %s}"
    prob("custom GPU tflops 1e-300", "gpu:__rtx-5060-ti-16gb", gpu % ("1.0e-300", "400"))
    prob("custom GPU tflops .inf", "gpu:__rtx-5060-ti-16gb", gpu % (".inf", "400"))
    prob("custom GPU bandwidth .inf", "gpu:__rtx-5060-ti-16gb", gpu % ("50", ".inf"))
    prob("custom GPU bandwidth 1e-300", "gpu:__rtx-5060-ti-16gb", gpu % ("50", "1.0e-300"))
    prob("custom GPU memory huge", "gpu:__rtx-5060-ti-16gb",
         "gpu: {name: g, memory_mib: %s, bf16_tflops: 50, bandwidth_gbps: 400}" % ("9" * 40))
    prob("response share .nan", "num_samples:__300", "num_samples: 300\n    response_token_share: .nan")
    prob("num_samples huge", "num_samples:__300", "num_samples: " + "9" * 40)
    prob("percentile huge", "100:__600", "100: " + "9" * 40)

    def cfg(label: str, key: str, value: str) -> None:
        text = "\n".join(ln for ln in BASE_YAML.splitlines() if not ln.startswith(key + ":")) + f"\n{key}: {value}\n"
        out.append(Case("non-finite/extreme numbers", "config " + label, {"c.yaml": text},
                        ["estimate", "--config", "c.yaml", "--gpu", "rtx-5060-ti-16gb"]))

    cfg("epochs .inf", "num_train_epochs", ".inf")
    cfg("val_size .inf", "val_size", ".inf")
    cfg("val_size .nan", "val_size", ".nan")
    cfg("lora_dropout .nan", "lora_dropout", ".nan")
    cfg("max_grad_norm .inf", "max_grad_norm", ".inf")
    cfg("learning_rate .nan", "learning_rate", ".nan")
    cfg("cutoff_len huge", "cutoff_len", "9" * 40)
    cfg("lora_rank huge", "lora_rank", "9" * 40)
    cfg("batch huge", "per_device_train_batch_size", "9" * 40)
    cfg("lora_alpha huge", "lora_alpha", "9" * 40)
    out.append(Case("non-finite/extreme numbers", "check val_size .inf",
                    {"c.yaml": BASE_YAML.replace("val_size: 0.1", "val_size: .inf")},
                    ["check", "c.yaml", "--gpu", "rtx-5060-ti-16gb"]))
    out.append(Case("non-finite/extreme numbers", "flag --num-train-epochs inf", {},
                    ["estimate", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--num-train-epochs", "inf"]))
    out.append(Case("non-finite/extreme numbers", "flag --lora-dropout nan", {},
                    ["estimate", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--lora-dropout", "nan"]))
    out.append(Case("non-finite/extreme numbers", "flag --cutoff-len huge", {},
                    ["estimate", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--cutoff-len", "9" * 40]))

    # 4. deep nesting
    deep = 100_000
    out += [
        Case("deep nesting", "config YAML [[[...", {"c.yaml": "a: " + "[" * deep + "]" * deep + "\n"},
             ["estimate", "--config", "c.yaml"]),
        Case("deep nesting", "problem YAML {a: {a: ...", {"p.yaml": "name: " + "{a: " * deep + "1" + "}" * deep + "\n"},
             ["solve", "p.yaml", "--no-write"]),
        Case("deep nesting", "config.json [[[...", {"cfg.json": "[" * deep + "]" * deep}, est),
        Case("deep nesting", "config.json in a value", {"cfg.json": _raw_cfg("rope_scaling", "[" * deep + "]" * deep)},
             est),
        Case("deep nesting", "data .json [[[...", {"d.json": "[" * deep + "]" * deep}, ["data", "d.json"]),
        Case("deep nesting", "data .jsonl line", {"d.jsonl": '{"a": ' + "[" * deep + "]" * deep + "}\n"},
             ["data", "d.jsonl"]),
        Case("deep nesting", "dataset_info.json", {"dataset_info.json": '{"d": ' + "[" * deep + "]" * deep + "}"},
             ["data", "dataset_info.json"]),
        Case("deep nesting", "check config YAML", {"c.yaml": "a: " + "[" * deep + "]" * deep + "\n"},
             ["check", "c.yaml", "--gpu", "rtx-5060-ti-16gb"]),
    ]

    # 5. wrongly typed dataset_info.json fields
    def info(label: str, entry) -> None:
        files = {"dataset_info.json": json.dumps({"d": entry} if not isinstance(entry, tuple) else entry[0]),
                 "data.json": json.dumps(ALPACA)}
        out.append(Case("dataset_info.json types", label, files, ["data", "dataset_info.json"]))

    info("file_name number", {"file_name": 5})
    info("file_name null", {"file_name": None})
    info("file_name list", {"file_name": ["data.json"]})
    info("formatting number", {"file_name": "data.json", "formatting": 5})
    info("formatting list", {"file_name": "data.json", "formatting": ["alpaca"]})
    info("columns list", {"file_name": "data.json", "columns": ["prompt"]})
    info("columns.prompt number", {"file_name": "data.json", "columns": {"prompt": 5, "response": "output"}})
    info("columns.response list", {"file_name": "data.json", "columns": {"prompt": "instruction", "response": ["o"]}})
    info("tags string", {"file_name": "data.json", "formatting": "sharegpt", "tags": "x"})
    info("tags.role_tag number", {"file_name": "data.json", "formatting": "sharegpt", "tags": {"role_tag": 5}})
    info("ranking string", {"file_name": "data.json", "ranking": "yes"})
    info("entry list", ["data.json"])
    info("top-level list", ([{"file_name": "data.json"}],))
    info("dataset names numbers-like", ({"1": {"file_name": "data.json"}, "2": 5},))
    info("file_name /dev/zero", {"file_name": "/dev/zero"})
    info("file_name nul byte", {"file_name": "data\u0000.json"})

    # 6. YAML alias bombs
    out += [
        Case("alias bomb", "config", {"c.yaml": alias_bomb()}, ["estimate", "--config", "c.yaml"],
             subprocess_only=True),
        Case("alias bomb", "check config", {"c.yaml": alias_bomb()}, ["check", "c.yaml", "--gpu", "rtx-5060-ti-16gb"],
             subprocess_only=True),
        Case("alias bomb", "problem", {"p.yaml": alias_bomb().replace("lora_target", "name")}, ["solve", "p.yaml"],
             subprocess_only=True),
        Case("alias bomb", "problem search list", {"p.yaml": BASE_PROBLEM.replace("lora_rank: [8]", "lora_rank: *a8")
                                                    .replace("name: p\n", alias_bomb().replace("lora_target: *a8\n", "")
                                                             .replace("lol", "8").replace('"', "") + "name: p\n")},
             ["solve", "p.yaml", "--no-write"], subprocess_only=True),
    ]

    # 7. special files: FIFOs, devices, folders
    out += [
        Case("special files", "data /dev/zero", {}, ["data", "/dev/zero"], subprocess_only=True),
        Case("special files", "data /dev/zero as .json", {}, ["data", "z.json"],
             setup=lambda ws: os.symlink("/dev/zero", ws / "z.json"), subprocess_only=True),
        Case("special files", "data FIFO .jsonl", {}, ["data", "f.jsonl"], setup=_mkfifo("f.jsonl"),
             subprocess_only=True),
        Case("special files", "config FIFO", {}, ["estimate", "--config", "f.yaml"], setup=_mkfifo("f.yaml"),
             subprocess_only=True),
        Case("special files", "check config FIFO", {}, ["check", "f.yaml", "--gpu", "rtx-5060-ti-16gb"],
             setup=_mkfifo("f.yaml"), subprocess_only=True),
        Case("special files", "problem FIFO", {}, ["solve", "f.yaml"], setup=_mkfifo("f.yaml"), subprocess_only=True),
        Case("special files", "config.json FIFO", {}, ["estimate", "--model", "f.json"], setup=_mkfifo("f.json"),
             subprocess_only=True),
        Case("special files", "config /dev/null", {}, ["estimate", "--config", "/dev/null"], subprocess_only=True),
        Case("special files", "config.json /dev/zero", {}, ["estimate", "--model", "/dev/zero"], subprocess_only=True),
        Case("special files", "tokenizer /dev/zero", {"d.json": json.dumps(ALPACA)},
             ["data", "d.json", "--tokenizer", "/dev/zero"], subprocess_only=True),
        Case("special files", "dataset_info file_name FIFO",
             {"dataset_info.json": json.dumps({"d": {"file_name": "f.json"}})}, ["data", "dataset_info.json"],
             setup=_mkfifo("f.json"), subprocess_only=True),
        Case("special files", "config folder", {}, ["estimate", "--config", "."]),
        Case("special files", "problem folder", {}, ["solve", "."]),
        Case("special files", "data folder", {}, ["data", "."]),
        Case("special files", "config unreadable", {"c.yaml": BASE_YAML}, ["estimate", "--config", "c.yaml"],
             setup=lambda ws: (ws / "c.yaml").chmod(0), needs_permissions=True),
    ]

    # 8. sizes and message length
    many = "\n".join(f"k{i}: 1" for i in range(20_000))
    out += [
        Case("large inputs", "20,000 unknown config keys", {"c.yaml": BASE_YAML + many + "\n"},
             ["estimate", "--config", "c.yaml"]),
        Case("large inputs", "20,000 unknown problem keys", {"p.yaml": BASE_PROBLEM + many + "\n"},
             ["solve", "p.yaml", "--no-write"]),
        Case("large inputs", "20,000 unknown config.json-like keys in dataset_info",
             {"dataset_info.json": json.dumps({f"d{i}": {"file_name": "x.json"} for i in range(20_000)})},
             ["data", "dataset_info.json"]),
        Case("large inputs", "5 MB config YAML", {"c.yaml": BASE_YAML + "# " + "x" * 5_000_000 + "\n"},
             ["estimate", "--config", "c.yaml"], subprocess_only=True),
        Case("large inputs", "5 MB config.json", {"cfg.json": _raw_cfg("pad", '"' + "x" * 5_000_000 + '"')}, est,
             subprocess_only=True),
        Case("large inputs", "binary config", {"c.yaml": bytes(range(256)) * 10}, ["estimate", "--config", "c.yaml"]),
        Case("large inputs", "binary config.json", {"cfg.json": bytes(range(256)) * 10}, est),
    ]
    return out


# ----------------------------------------------------------------------------------------------------------
# Running a case and judging the outcome
# ----------------------------------------------------------------------------------------------------------

MEMORY_LIMIT_BYTES = 2 << 30


def prepare(case: Case, ws: Path) -> None:
    for name, content in case.files.items():
        p = ws / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")
    if case.setup:
        case.setup(ws)


def snapshot(ws: Path) -> dict[str, tuple[str, int, float]]:
    """Every path under the workspace with its kind, size and mtime (FIFOs are never opened)."""
    out = {}
    for root, dirs, files in os.walk(ws):
        for name in dirs + files:
            p = Path(root) / name
            st = p.lstat()
            out[str(p.relative_to(ws))] = (stat.filemode(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))


def run_subprocess(argv: list[str], ws: Path, timeout_s: float = 60) -> tuple[int | None, str, str]:
    """(exit code or None on timeout, stdout, stderr), under a 2 GiB address-space limit."""
    env = {**os.environ, "TRAINFIT_CACHE": str(ws / ".." / "cache"), "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run([sys.executable, "-m", "optimizer", *argv], cwd=ws, capture_output=True, text=True,
                              timeout=timeout_s, env=env, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired as exc:
        return None, exc.stdout or "", exc.stderr or ""
    return proc.returncode, proc.stdout, proc.stderr


def verdict(code: int | None, stderr: str, before: dict, after: dict, exception: BaseException | None = None) -> str:
    """"ok" or what went wrong (hang, memory, traceback, files changed, message)."""
    if code is None:
        return "hang"
    if "MemoryError" in stderr or isinstance(exception, MemoryError) or code < 0 or code == 137:
        return "memory"
    if "Traceback" in stderr or (exception is not None and not isinstance(exception, SystemExit)):
        return "traceback"
    if code not in (0, 1, 3):
        return f"exit {code}"
    if code != 0 and after != before:  # a successful solve writes its configs
        return "files changed"
    if code == 1:
        errors = [ln for ln in stderr.splitlines() if ln.startswith("Error:")]
        if len(errors) != 1:
            return "message: not one Error line"
        if len(errors[0]) > 4000:
            return "message: too long"
    return "ok"


def tally() -> None:
    import tempfile
    from collections import Counter, defaultdict
    from concurrent.futures import ThreadPoolExecutor

    all_cases = [c for c in cases() if not (c.needs_permissions and os.geteuid() == 0)]
    if len(all_cases) < len(cases()):
        print(f"(skipped {len(cases()) - len(all_cases)} permission cases: running as root)", file=sys.stderr)

    def one(case: Case) -> tuple[Case, str]:
        with tempfile.TemporaryDirectory() as tmp:
            ws = Path(tmp) / "ws"
            ws.mkdir()
            prepare(case, ws)
            before = snapshot(ws)
            code, _out, err = run_subprocess(case.argv, ws)
            after = snapshot(ws)
            for root, dirs, _files in os.walk(ws):  # let TemporaryDirectory clean read-only folders
                for d in dirs:
                    os.chmod(Path(root) / d, 0o755)
            return case, verdict(code, err, before, after)

    by_class: dict[str, Counter] = defaultdict(Counter)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for case, v in pool.map(one, all_cases):
            by_class[case.cls][v] += 1
            if v != "ok":
                print(f"  {case.cls} / {case.name}: {v}", file=sys.stderr)
    total = Counter()
    for cls, counts in by_class.items():
        total.update(counts)
        print(f"{cls:28s} {sum(counts.values()):4d} cases  " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())))
    print(f"{'all':28s} {sum(total.values()):4d} cases  " + ", ".join(f"{k} {n}" for k, n in sorted(total.items())))


if __name__ == "__main__":
    tally()
