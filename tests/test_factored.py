"""The factored search (search/factored.py): its tables reproduce the memory model and the objectives exactly, and
CP-SAT over them (cpsat.solve_factored) finds the front brute force finds.

The declarations (memory/terms.py TERM_KNOBS, quality.TERM_INPUTS) are what make a table over a few knobs valid for
every plan: a term that read an undeclared knob would take its value from the representative plan and differ here.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from optimizer.memory import estimate
from optimizer.memory.step import step_moments
from optimizer.search.brute import solve_brute
from optimizer.search.cpsat import solve_factored
from optimizer.search.factored import KNOBS, candidate, factor, lookup, memory_of, point_index
from optimizer.search.objectives import point_quality, point_time
from optimizer.search.problem import load_problem
from optimizer.search.space import build_instance, micro_ms, opt_ms, plan_fields, plan_for

ROOT = Path(__file__).resolve().parents[1]
SINGLE_GPU = [p for p in sorted((ROOT / "problems").glob("*.yaml")) + sorted((ROOT / "tests").glob("*.yaml"))
              if "cluster:" not in p.read_text()]


def _plans(inst, limit: int, seed: int = 0):
    """Knob values of up to `limit` plans of the instance's space (all of them when it is smaller), full
    fine-tuning once per rank/target (it has neither)."""
    d = inst.domains
    space = list(itertools.product(*(range(len(d[k])) for k in KNOBS)))
    random.Random(seed).shuffle(space)
    seen = set()
    for idx in space:
        v = {k: d[k][i] for k, i in zip(KNOBS, idx)}
        if v["finetuning_type"] == "full":
            v["lora_rank"] = v["lora_target"] = None
        key = tuple(v.values())
        if key in seen:
            continue
        seen.add(key)
        yield v
        if len(seen) >= limit:
            return


@pytest.mark.parametrize("path", SINGLE_GPU, ids=lambda p: p.stem)
def test_memory_tables_reproduce_step_moments_and_the_fit(path):
    problem, base = load_problem(path)
    inst = build_instance(problem, base, enumerate_settings=False)
    fac = factor(inst)
    n = 0
    for v in _plans(inst, 400):
        plan = plan_for(inst.arch, inst.gpu, v, plan_fields(inst, v["finetuning_type"], v["lora_rank"]))
        real = {m.kind.value: m.total_bytes for m in step_moments(inst.arch, plan).moments}
        totals, fits = memory_of(fac, v)
        assert {k: t for k, t in totals.items() if t} == real, v
        assert fits == (estimate(inst.arch, plan).device_peak_bytes <= inst.budget_bytes), v
        n += 1
    assert n >= min(400, 2)


@pytest.mark.parametrize("path", SINGLE_GPU, ids=lambda p: p.stem)
def test_objective_tables_reproduce_the_objectives(path):
    problem, base = load_problem(path)
    inst = build_instance(problem, base, enumerate_settings=False)
    fac = factor(inst)
    for v in _plans(inst, 300, seed=1):
        idx = point_index(fac, v)
        ft, r, t = v["finetuning_type"], v["lora_rank"], v["lora_target"]
        c = candidate(inst, v, micro_ms(inst, ft, r, t, v["cutoff_len"], v["per_device_train_batch_size"],
                                        v["gradient_checkpointing"]), opt_ms(inst, ft, r, t))
        a, n, e = v["gradient_accumulation_steps"], v["max_samples"], v["num_train_epochs"]
        assert sum(lookup(q, idx) for q in fac.quality) == point_quality(inst, c, a, n, e), v
        ms = lookup(fac.compute_ms, idx) + lookup(fac.step_ms, idx)
        assert -(-ms // 1000) == point_time(inst, c, a, n, e), v


SMALL = [
    dict(lora_rank=[8, 32], lora_target=["attention", "all"], cutoff_len=[384, 1024],
         per_device_train_batch_size=[2, 8], gradient_accumulation_steps=[1, 4], enable_liger_kernel=[False]),
    dict(finetuning_type=["qlora4", "lora"], lora_rank=[16], lora_target=["mlp", "all"], cutoff_len=[256, 768, 1024],
         per_device_train_batch_size=[1, 4], gradient_accumulation_steps=[2, 8], gradient_checkpointing=[True],
         optim=["adamw_8bit", "adamw_torch_fused"]),
]


@pytest.mark.parametrize("space", SMALL)
def test_factored_cpsat_front_equals_brute_force(space):
    problem, base = load_problem(ROOT / "problems/qwen2.5-3b-rtx5060ti-16gb.yaml")
    problem = problem.model_copy(update={"search": problem.search.model_copy(update=space)})
    fac = factor(build_instance(problem, base, enumerate_settings=False))
    front = [(q, t, k) for q, t, k, _ in solve_factored(fac)]
    brute = [(q, t, k) for q, t, k, _ in solve_brute(build_instance(problem, base))]
    assert front and front == brute


def test_memory_evaluations_grow_with_the_term_subdomains_not_the_space():
    problem, base = load_problem(ROOT / "problems/qwen2.5-3b-rtx5060ti-16gb.yaml")
    wide = problem.model_copy(update={"search": problem.search.model_copy(update={
        "gradient_accumulation_steps": [1, 2, 4, 8, 16, 32], "max_samples": [None, 100, 200]})})
    a = factor(build_instance(problem, base, enumerate_settings=False)).evaluations
    b = factor(build_instance(wide, base, enumerate_settings=False)).evaluations
    assert a == b  # accumulation (beyond > 1) and max_samples multiply the space, not the memory tables
