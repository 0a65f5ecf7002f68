"""The snapshot: every number trainfit computes, byte for byte, so that moving code provably changes nothing.

It holds `estimate()`'s JSON over the accuracy grid (each with its evaluation pass), every shipped problem's
front (CP-SAT) and every file `trainfit solve` emits for it, and `trainfit check` on the reference case's
own configs. No torch: it runs in seconds.

When a change alters a number on purpose, regenerate and review the diff:

    TRAINFIT_UPDATE_SNAPSHOT=1 python -m pytest tests/test_snapshot.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "snapshot.json"


def build_snapshot() -> dict[str, object]:
    import yaml

    from optimizer.check import check
    from optimizer.llamafactory.configs import config_files
    from optimizer.llamafactory.read import plan_from_dict
    from optimizer.memory import estimate, eval_estimate
    from optimizer.models.catalog import get_gpu, resolve_arch
    from optimizer.search.problem import load_problem
    from optimizer.search.solve import solve_problem
    from optimizer.trace.grid import GRID

    snap: dict[str, object] = {}
    for i, (model, plan) in enumerate(GRID):
        arch = resolve_arch(model)
        snap[f"estimate/{i:02d} {model}"] = json.loads(estimate(arch, plan).model_dump_json())
        snap[f"eval/{i:02d} {model}"] = json.loads(eval_estimate(arch, plan, eval_batch=2).model_dump_json())
    for path in sorted((ROOT / "problems").glob("*.yaml")):
        rel = path.relative_to(ROOT).as_posix()
        problem, base = load_problem(rel)
        result = solve_problem(problem, base)
        dump = result.model_dump(mode="json")
        dump.pop("solve_s", None)
        snap[f"front/{path.stem}"] = dump
        data = os.path.relpath(base / problem.dataset.file, ROOT) if problem.dataset.file else None
        files = config_files(result, problem, rel, f"configs/{problem.name}", "all", data)
        for name, text in sorted(files.items()):
            snap[f"emit/{path.stem}/{name}"] = text
    gpu = get_gpu("rtx-5060-ti-16gb")
    for path in sorted((ROOT / "configs" / "reference-case").glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        plan, model = plan_from_dict(data, path.name)
        rep = check(data, plan, resolve_arch(model), gpu, margin=0.10, config_path=path.name)
        snap[f"check/{path.name}"] = json.loads(rep.model_dump_json())
    return snap


@pytest.fixture(scope="module")
def snapshot() -> dict[str, object]:
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return build_snapshot()
    finally:
        os.chdir(cwd)


def test_snapshot_is_unchanged(snapshot):
    text = json.dumps(snapshot, indent=1, sort_keys=True) + "\n"
    if os.environ.get("TRAINFIT_UPDATE_SNAPSHOT"):
        GOLDEN.write_text(text, encoding="utf-8")
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert sorted(golden) == sorted(snapshot), "entries added or removed: regenerate (see the docstring)"
    changed = [k for k in sorted(golden) if golden[k] != snapshot[k]]
    assert not changed, f"{len(changed)} entries changed, first: {changed[:5]}"
