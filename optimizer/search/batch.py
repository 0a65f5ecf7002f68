"""Several problems at once: expand models x GPUs, solve in parallel, summarize."""

from __future__ import annotations

import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from ..errors import ProblemError, TrainfitError
from ..units import GIB
from .problem import DPO_CLUSTER, Cluster, Problem
from .solve import SolveResult, solve_problem

__all__ = ["expand", "run_batch", "summary_matrix"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text.split("/")[-1]).strip("-").lower()


def gpu_spec(spec: str) -> tuple[str, int | None]:
    """`rtx-4090x2` -> ("rtx-4090", 2): a catalog id, optionally with `x<count>` for that many of it (a cluster whose
    search covers 1..count GPUs with the default engines); `rtx-4090` -> ("rtx-4090", None)."""
    m = re.fullmatch(r"(.+?)x(\d+)", spec)
    return (m.group(1), int(m.group(2))) if m else (spec, None)


def expand(loaded: list[tuple[str, Problem, Path]], models: list[str], gpus: list[str]):
    """Each problem, or each problem x model x GPU when lists are given (names get -<model>-<gpu>). A GPU given as
    `<id>x<count>` replaces the problem's cluster with `count` of that GPU (its host RAM and nodes kept)."""
    out = []
    for path, problem, base in loaded:
        ms = models or [problem.model]
        gs = gpus or [problem.gpu]
        for m in ms:
            for g in gs:
                if not models and not gpus:
                    out.append((path, problem, base))
                    continue
                gname = g if isinstance(g, str) else _slug(g.name)
                name = f"{problem.name}--{_slug(m)}--{gname}"
                update: dict = {"model": m, "gpu": g, "name": name}
                if isinstance(g, str) and gpus:
                    gid, count = gpu_spec(g)
                    update["gpu"] = gid
                    if count is not None and count > 1 and problem.stage == "dpo":
                        raise ProblemError(f"--gpus {g}: {DPO_CLUSTER}. Pass {gid} (one GPU) for {path}.")
                    if count is not None:
                        old = problem.cluster
                        keep = {"host_ram_gib": old.host_ram_gib, "nodes": 1} if old else {}
                        update["cluster"] = None if count == 1 else Cluster(count=count, **keep)
                out.append((path, problem.model_copy(update=update), base))
    return out


def _solve_one(args):
    problem_json, base, method, timings = args
    problem = Problem.model_validate_json(problem_json)
    try:
        return solve_problem(problem, Path(base) if base else None, method, timings).model_dump_json(), None
    except TrainfitError as exc:
        return None, str(exc)


def run_batch(items, method: str, jobs: int = 0, timings: bool = False):
    """Solve in parallel processes with a progress line on stderr. [(path, problem, base, result|None, error|None)]"""
    workers = jobs or os.cpu_count() or 1
    results: list = [None] * len(items)
    args = [(p.model_dump_json(), str(b) if b else None, method, timings) for _, p, b in items]
    done = 0
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futs = {pool.submit(_solve_one, a): i for i, a in enumerate(args)}
        for fut in as_completed(futs):
            i = futs[fut]
            res_json, err = fut.result()
            path, problem, base = items[i]
            res = SolveResult.model_validate_json(res_json) if res_json else None
            results[i] = (path, problem, base, res, err)
            done += 1
            bar = "#" * (20 * done // len(items))
            if sys.stderr.isatty():
                print(f"\r[{bar:<20s}] {done}/{len(items)} solved", end="", file=sys.stderr, flush=True)
            elif done == len(items) or done % max(1, len(items) // 10) == 0:
                print(f"[{bar:<20s}] {done}/{len(items)} solved", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return results


def summary_matrix(results) -> str:
    """Best (recommended) config per model and GPU."""
    rows: dict[str, dict[str, str]] = {}
    cols: list[str] = []
    for _, problem, _, res, err in results:
        gpu = problem.gpu if isinstance(problem.gpu, str) else problem.gpu.name
        if problem.cluster is not None:
            gpu = f"{gpu}x{problem.cluster.count}"
        if gpu not in cols:
            cols.append(gpu)
        if res is None:
            cell = "infeasible" if err and err.startswith("no plan") else "error"
        else:
            s = res.front[res.recommended]
            kind = s.finetuning_type + ("" if s.finetuning_type == "full" else f" r{s.lora_rank} {s.lora_target}")
            setup = f" {s.num_gpus}x {s.engine}" if s.num_gpus > 1 else ""
            setup += f" {s.num_train_epochs:g}ep" if res.several_epochs else ""
            cell = (f"{kind} c{s.cutoff_len} b{s.per_device_train_batch_size}{setup} "
                    f"{s.device_peak_bytes / GIB:.1f}G {s.time_s / 60:.0f}min")
        rows.setdefault(problem.model, {})[gpu] = cell
    width = max([len(c) for r in rows.values() for c in r.values()] + [len(c) for c in cols] + [10])
    mw = max(len(m) for m in rows)
    lines = [f"{'model':{mw}s} | " + " | ".join(f"{c:{width}s}" for c in cols)]
    for m, r in rows.items():
        lines.append(f"{m:{mw}s} | " + " | ".join(f"{r.get(c, ''):{width}s}" for c in cols))
    return "\n".join(lines)
