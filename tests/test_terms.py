"""The memory model's decomposition (memory/terms.py): memoized components reproduce `estimate` exactly, and the
components are computed over their own sub-domains, not over the product of every knob."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from optimizer.memory import estimate
from optimizer.memory.terms import COMPONENTS, SEARCH_KNOBS, TermMemo, memoized
from optimizer.search.problem import DatasetSpec, DatasetSummary, Problem, SearchSpace, load_problem
from optimizer.search.space import Instance, _domains, build_instance, plan_fields, plan_for, resolve_gpu, resolve_model

ROOT = Path(__file__).resolve().parents[1]
KNOBS = ("finetuning_type", "lora_rank", "lora_target", "gradient_checkpointing", "flash_attn", "optim",
         "enable_liger_kernel", "cutoff_len", "per_device_train_batch_size", "gradient_accumulation_steps")


def _plans(problem: Problem, base: Path | None, stride: int = 1):
    """Every memory setting of the problem's search space (accumulation: each value of the domain) as a Plan."""
    arch, gpu = resolve_model(problem, base), resolve_gpu(problem)
    domains, _ = _domains(problem, arch, gpu)
    inst = Instance(problem, arch, gpu, 0, domains, [], {})
    inst.context = {"model_params": 3e9, "model_family": "qwen", "samples_total": 300, "hidden_size": arch.hidden_size}
    for i, vals in enumerate(itertools.product(*(domains[k] for k in KNOBS))):
        if i % stride:
            continue
        knobs = dict(zip(KNOBS, vals))
        if knobs["finetuning_type"] == "full":
            knobs.update(lora_rank=None, lora_target=None)
        yield arch, plan_for(arch, gpu, knobs, plan_fields(inst, knobs["finetuning_type"], knobs["lora_rank"]))


def _check(problem: Problem, base: Path | None, stride: int) -> TermMemo:
    plans = list(_plans(problem, base, stride))
    plain = [estimate(arch, plan) for arch, plan in plans]
    with memoized() as memo:
        cached = [estimate(arch, plan) for arch, plan in plans]
    for (_, plan), a, b in zip(plans, plain, cached):
        assert a == b, plan
    assert sum(memo.calls.values()) > sum(memo.evaluations.values())  # the memo was used, and reused
    return memo


def test_memoized_terms_reproduce_estimate_on_the_reference_problem():
    problem, base = load_problem(ROOT / "problems/qwen2.5-3b-rtx5060ti-16gb.yaml")
    _check(problem, base, stride=7)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "problems").glob("*.yaml")))
def test_memoized_terms_reproduce_estimate_for_every_plan_of_the_shipped_problems(name):
    problem, base = load_problem(ROOT / "problems" / name)
    _check(problem, base, stride=1)


def test_memoized_terms_reproduce_estimate_across_precisions_and_targets():
    """full (fp32 masters), qlora8, eager attention, every target: the declarations hold where dtypes differ."""
    data = DatasetSpec(summary=DatasetSummary(num_samples=100, token_length_percentiles={50: 100, 100: 400}))
    p = Problem(name="t", model="Qwen/Qwen2.5-0.5B-Instruct", gpu="rtx-4090", dataset=data, search=SearchSpace(
        finetuning_type=["full", "qlora8", "lora"], lora_rank=[4, 16], cutoff_len=[100, 256],
        per_device_train_batch_size=[1, 3], gradient_accumulation_steps=[1, 2], flash_attn=["sdpa", "disabled"],
        optim=["adamw_torch", "paged_adamw_8bit"]))
    _check(p, None, stride=1)


def test_a_wrong_declaration_is_caught():
    """The check can fail: drop `seq` from the layer's declared fields and the memo serves stale walks."""
    fields, plan_fields = COMPONENTS["layer"]
    COMPONENTS["layer"] = (tuple(f for f in fields if f != "seq"), plan_fields)
    try:
        problem, base = load_problem(ROOT / "problems/qwen2.5-3b-rtx5060ti-16gb.yaml")
        with pytest.raises(AssertionError):
            _check(problem, base, stride=11)
    finally:
        COMPONENTS["layer"] = (fields, plan_fields)


def test_component_evaluations_grow_with_their_sub_domains_not_the_space():
    """More optimizers, liger settings and checkpointing multiply the space but not the layer walks; the head is
    not walked again per rank or target."""
    data = DatasetSpec(summary=DatasetSummary(num_samples=500, token_length_percentiles={50: 300, 100: 2000}))

    def run(**space):
        p = Problem(name="t", model="Qwen/Qwen2.5-0.5B-Instruct", gpu="rtx-4090", dataset=data,
                    search=SearchSpace(finetuning_type=["lora"], lora_target=["all"], lora_rank=[8, 16], **space))
        inst = build_instance(p)
        return inst.evaluated, inst.terms.evaluations

    cutoffs, batches = SearchSpace().cutoff_len, SearchSpace().per_device_train_batch_size
    layer_domain = 2 * len(cutoffs) * len(batches)  # rank x cutoff x batch (one type, target, attention)
    n_small, small = run(optim=["adamw_torch_fused"], enable_liger_kernel=[False], gradient_checkpointing=[True])
    n_big, big = run(optim=["adamw_torch_fused", "adamw_torch", "adamw_8bit"], enable_liger_kernel=[False, True],
                     gradient_checkpointing=[True, False])
    # twelve times the memory settings: more estimates, not twelve times more (the optimizer and liger values are
    # judged only above the staircase the earlier ones cover: space._settings)...
    assert n_small < n_big < 6 * n_small
    assert small["layer"] <= big["layer"] <= layer_domain < n_big  # ...but the walks stay within their sub-domain
    assert big["optimizer_states"] == 2 * 3  # rank x optimizer
    assert big["weights"] == 1
    assert big["head"] <= 2 * len(cutoffs) * len(batches)  # liger x cutoff x batch, whatever the ranks
    assert set(SEARCH_KNOBS) == set(COMPONENTS)
