"""The search space as factored tables: each term of the memory model and of the objectives over its own knobs.

A plan is one value per knob (MEM_KNOBS, gradient_accumulation_steps, max_samples, num_train_epochs). Nothing here
enumerates plans:

- memory: every moment of the step (memory/step.py `step_moments`, flat: forward, loss, [reference], cross-entropy
  backward, top and bottom layer backward, lm_head backward, [embedding gradient], optimizer step) is a sum of named
  terms, and each term depends on a few knobs only (memory/terms.py TERM_KNOBS, checked by tests/test_factored.py).
  The terms of a moment are grouped by knob set (a set inside a larger one joins it), and each group becomes one
  table over its knobs, read from `step_moments` at one representative plan per point of the group's sub-domain
  (the other knobs at their first values: by the declaration they do not matter). The device bound is exact: the
  peak is the first moment of largest total (the one `estimate` reports), and it fits when its total plus the
  allocator's overhead at that moment (allocator.reserved_overhead of large_blocks_at, over OVERHEAD_KNOBS) is at
  most allocator.allocated_limit(budget, managed bytes) (over MANAGED_KNOBS).
- quality: the sum of quality.quality_terms, each term rounded to integer units (objectives.quality_units) and
  tabled over the knobs behind its declared inputs (quality.TERM_INPUTS).
- time: micro-batches(rows, batch, epochs) x t_micro(type, rank, targets, cutoff, batch, checkpointing) + optimizer
  steps(rows, batch, accumulation, epochs) x t_opt(type, rank, targets), in whole seconds (objectives.point_time);
  rows are the samples kept by max_samples, or with packing the packed rows at cutoff_len (objectives.rows_used).

`evaluations` counts the memory-model calls (`step_moments` at distinct representative plans): it grows with the
sizes of the groups' sub-domains, not with the space. search/cpsat.py states these tables as CP-SAT constraints.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from ..memory.allocator import allocated_limit, large_blocks_at, reserved_overhead
from ..memory.step import step_moments
from ..memory.terms import MANAGED_KNOBS, OVERHEAD_KNOBS, PAIRWISE_TERMS, TERM_KNOBS, memoized, term_knobs
from . import quality as qm
from .objectives import MEM_KNOBS, Candidate, micro_batches, optimizer_steps, point_plan, quality_units, rows_used
from .space import Instance, micro_ms, opt_ms, plan_fields, plan_for

__all__ = ["KNOBS", "Table", "Factored", "factor", "MAX_TABLE_ENTRIES"]

KNOBS = MEM_KNOBS + ("gradient_accumulation_steps", "max_samples", "num_train_epochs")
_T = ("finetuning_type", "lora_rank", "lora_target")
# a plan dict key of quality.quality_terms -> the knobs it is a function of (the instance fixes the rest)
_QUALITY_INPUT_KNOBS = {
    "finetuning_type": ("finetuning_type",), "lora_rank": ("finetuning_type", "lora_rank"),
    "lora_target": ("finetuning_type", "lora_target"), "num_train_epochs": ("num_train_epochs",),
    "effective_batch": ("per_device_train_batch_size", "gradient_accumulation_steps"),
    # packing: the trainer steps over packed rows, and their count depends on cutoff_len (objectives.rows_used)
    "optimizer_steps": ("max_samples", "cutoff_len", "per_device_train_batch_size", "gradient_accumulation_steps",
                        "num_train_epochs"),
    "samples_used": ("max_samples",), "kept_token_share": ("cutoff_len",),
}
# What one solve builds: the entries of all tables together (each memory entry is one step_moments call).
MAX_TABLE_ENTRIES = 400_000


@dataclass
class Table:
    """Values over the knobs' domain indices: values[(i_1, ..., i_k)]. Points missing from `values` are not plans
    (full fine-tuning exists at rank and target index 0 only)."""

    name: str
    knobs: tuple[str, ...]
    values: dict[tuple[int, ...], int]


@dataclass
class Factored:
    inst: Instance
    sizes: dict[str, int]  # knob -> domain size ("accumulating": the classes present, 1 or 2)
    moments: list[str]  # Moment values in step_moments' flat order (those some plan has)
    memory: dict[str, list[Table]]  # moment -> its groups' tables (summed: the moment's allocated bytes)
    overhead: dict[str, Table]  # moment -> allocator overhead were it the peak
    limit: Table  # allocated_limit of the budget and the managed bytes
    quality: list[Table]
    compute_ms: Table  # micro-batches x one micro-batch's ms
    step_ms: Table  # optimizer steps x one step's ms
    evaluations: int = 0
    accumulating: list[bool] = field(default_factory=list)  # class index -> accumulation > 1

    def accumulating_index(self, accum_index: int) -> int:
        a = self.inst.domains["gradient_accumulation_steps"][accum_index]
        return self.accumulating.index(a > 1)


def _points(inst: Instance, knobs: tuple[str, ...], sizes: dict[str, int]):
    """Index tuples of the knobs' sub-domain; full fine-tuning only at rank/target index 0."""
    ft_dom = inst.domains["finetuning_type"]
    ranges = [range(sizes[k]) for k in knobs]
    pos = {k: i for i, k in enumerate(knobs)}
    for idx in itertools.product(*ranges):
        full = "finetuning_type" in pos and ft_dom[idx[pos["finetuning_type"]]] == "full"
        if full and any(idx[pos[k]] for k in ("lora_rank", "lora_target") if k in pos):
            continue
        yield idx


def _merge(knob_sets: list[tuple[str, ...]]) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Each knob set -> the first maximal set (in declaration order) that contains it."""
    uniq = list(dict.fromkeys(knob_sets))
    maximal = [s for s in uniq if not any(set(s) < set(o) for o in uniq)]
    maximal = list(dict.fromkeys(tuple(sorted(s, key=KNOBS_ORDER.index)) for s in maximal))
    return {s: next(m for m in maximal if set(s) <= set(m)) for s in uniq}


KNOBS_ORDER = KNOBS + ("accumulating",)


def factor(inst: Instance) -> Factored:
    """The instance's tables (one GPU). Raises ValueError for what the factored model does not cover (several GPUs,
    an active allocator calibration); the caller then enumerates."""
    if inst.dist is not None:
        raise ValueError("several GPUs: the per-GPU memory is not factored")
    d = inst.domains
    accum = d["gradient_accumulation_steps"]
    classes = sorted({a > 1 for a in accum})
    sizes = {k: len(d[k]) for k in KNOBS}
    sizes["accumulating"] = len(classes)
    k0 = _knobs(inst, {})
    pairwise = plan_for(inst.arch, inst.gpu, k0, plan_fields(inst, k0["finetuning_type"], k0["lora_rank"])).pairwise
    names = [n for n in TERM_KNOBS if pairwise or n not in PAIRWISE_TERMS]
    groups = _merge([term_knobs(n, pairwise) for n in names] + [OVERHEAD_KNOBS, MANAGED_KNOBS])
    group_of = {n: groups[term_knobs(n, pairwise)] for n in names}
    sets = list(dict.fromkeys(group_of.values()))
    # a moment exists or not by the finetuning type (the embedding-gradient moment: full fine-tuning only); every
    # group reads it, so a group's entries are 0 exactly where its moment does not exist
    assert all("finetuning_type" in s for s in sets), sets
    total = sum(sum(1 for _ in _points(inst, s, sizes)) for s in sets)
    if total > MAX_TABLE_ENTRIES:
        raise ValueError(f"{total:,} memory table entries")

    cache: dict[tuple, object] = {}
    mem: dict[tuple[str, tuple[str, ...]], dict] = {}
    over: dict[str, dict] = {}
    lim: dict[tuple, int] = {}
    kinds: list[str] = []
    with memoized(inst.terms):
        for s in sets:
            for idx in _points(inst, s, sizes):
                point = dict(zip(s, idx))
                knobs = _knobs(inst, point, classes)
                key = tuple(sorted((k, v) for k, v in knobs.items()))
                sm = cache.get(key)
                if sm is None:
                    plan = plan_for(inst.arch, inst.gpu, knobs, plan_fields(inst, knobs["finetuning_type"],
                                                                             knobs["lora_rank"]))
                    sm = cache[key] = (plan, step_moments(inst.arch, plan))
                plan, moments = sm
                for m in moments.moments:
                    if m.kind.value not in kinds:
                        kinds.append(m.kind.value)
                    mem.setdefault((m.kind.value, s), {})[idx] = sum(b for name, b, _ in m.terms
                                                                     if group_of[name] == s)
                    if s == groups[OVERHEAD_KNOBS]:
                        sub = tuple(point[k] for k in OVERHEAD_KNOBS)
                        over.setdefault(m.kind.value, {})[sub] = reserved_overhead(
                            large_blocks_at(inst.arch, plan, m.kind))
                if s == groups[MANAGED_KNOBS]:
                    limit = allocated_limit(inst.budget_bytes, moments.managed_bytes)
                    if limit is None:
                        raise ValueError("an allocator calibration is active")
                    lim[tuple(point[k] for k in MANAGED_KNOBS)] = limit
    order = _flat_order(kinds)
    memory = {}
    for kind in order:
        tabs = []
        for s in sets:
            vals = mem.get((kind, s), {})
            # a point where the moment does not exist (e.g. no embedding-gradient moment without full fine-tuning)
            # counts 0 for it: that moment is then never the peak (every existing moment holds the weights)
            full_vals = {idx: vals.get(idx, 0) for idx in _points(inst, s, sizes)}
            if any(full_vals.values()):
                tabs.append(Table(f"{kind}:{'+'.join(s)}", s, full_vals))
        memory[kind] = tabs
    fac = Factored(
        inst=inst, sizes=sizes, moments=order, memory=memory,
        overhead={k: Table(f"overhead:{k}", OVERHEAD_KNOBS, v) for k, v in over.items()},
        limit=Table("limit", MANAGED_KNOBS, lim),
        quality=_quality_tables(inst, sizes), evaluations=len(cache), accumulating=classes,
        **_time_tables(inst, sizes),
    )
    inst.evaluated = len(cache)
    return fac


def _flat_order(kinds: list[str]) -> list[str]:
    from ..schema import Moment

    flat = [Moment.VISION_FORWARD, Moment.FORWARD_LAST_LAYER, Moment.LOSS_FORWARD, Moment.REFERENCE_FORWARD,
            Moment.CE_BACKWARD,
            Moment.LAYER_BACKWARD_TOP, Moment.LAYER_BACKWARD_BOTTOM, Moment.LM_HEAD_BACKWARD,
            Moment.EMBEDDING_GRAD_END, Moment.OPTIMIZER_STEP]
    return [m.value for m in flat if m.value in kinds]


def _knobs(inst: Instance, point: dict[str, int], classes: list[bool] | None = None) -> dict:
    """The representative plan's knobs of a sub-domain point (domain indices): the point's values, every other knob
    at its first value; full fine-tuning has no rank or target."""
    d = inst.domains
    out = {k: d[k][point.get(k, 0)] for k in MEM_KNOBS}
    if "accumulating" in point and classes is not None:
        later = classes[point["accumulating"]]
        out["gradient_accumulation_steps"] = min(a for a in d["gradient_accumulation_steps"] if (a > 1) == later)
    else:
        out["gradient_accumulation_steps"] = d["gradient_accumulation_steps"][0]
    if out["finetuning_type"] == "full":
        out["lora_rank"] = out["lora_target"] = None
    return out


def candidate(inst: Instance, values: dict, micro: int = 0, opt: int = 0) -> Candidate:
    """The Candidate of knob values (MEM_KNOBS; full fine-tuning: rank and target None, index 0)."""
    d = inst.domains
    vals = {k: values.get(k, d[k][0]) for k in MEM_KNOBS}
    if vals["finetuning_type"] == "full":
        vals["lora_rank"] = vals["lora_target"] = None
    index = tuple(0 if vals[k] is None else d[k].index(vals[k]) for k in MEM_KNOBS)
    return Candidate(**vals, index=index, micro_ms=micro, opt_ms=opt)


def _value(inst: Instance, k: str, i: int):
    return inst.domains[k][i]


def _quality_tables(inst: Instance, sizes: dict[str, int]) -> list[Table]:
    """One table per term of quality.quality_terms over the knobs behind its declared inputs."""
    tables = []
    for name, inputs in qm.TERM_INPUTS.items():
        if "learning_rate" in inputs:
            continue  # the search does not set a learning rate: the term is absent from its plans
        knobs = tuple(k for k in KNOBS if any(k in _QUALITY_INPUT_KNOBS[i] for i in inputs))
        vals = {}
        for idx in _points(inst, knobs, sizes):
            point = {k: _value(inst, k, i) for k, i in zip(knobs, idx)}
            c = candidate(inst, point)
            accum = point.get("gradient_accumulation_steps", inst.domains["gradient_accumulation_steps"][0])
            samples = point.get("max_samples", inst.domains["max_samples"][0])
            epochs = point.get("num_train_epochs", inst.domains["num_train_epochs"][0])
            vals[idx] = quality_units(point_plan(inst, c, accum, samples, epochs), inst.context).get(name, 0)
        if any(vals.values()):
            tables.append(Table(f"quality:{name}", knobs, vals))
    return tables


def _time_tables(inst: Instance, sizes: dict[str, int]) -> dict[str, Table]:
    d = inst.domains
    mk = _T + ("cutoff_len", "per_device_train_batch_size", "gradient_checkpointing")
    micro = {}
    for idx in _points(inst, mk, sizes):
        v = dict(zip(mk, (_value(inst, k, i) for k, i in zip(mk, idx))))
        if v["finetuning_type"] == "full":
            v["lora_rank"] = v["lora_target"] = None
        micro[idx] = micro_ms(inst, v["finetuning_type"], v["lora_rank"], v["lora_target"], v["cutoff_len"],
                              v["per_device_train_batch_size"], v["gradient_checkpointing"])
    opt = {}
    for idx in _points(inst, _T, sizes):
        ft, r, t = (_value(inst, k, i) for k, i in zip(_T, idx))
        opt[idx] = opt_ms(inst, ft, None if ft == "full" else r, None if ft == "full" else t)
    # time in ms = micro-batches x t_micro + optimizer steps x t_opt (objectives.point_time): two tables, each a
    # product over its knobs, so the sum is linear in the tables
    samples_k = ("max_samples", "num_train_epochs")
    compute, step = {}, {}
    n_gpu = inst.num_gpus
    pos = {k: i for i, k in enumerate(mk)}
    for (si, smp), (ei, epochs) in itertools.product(enumerate(d["max_samples"]), enumerate(d["num_train_epochs"])):
        for idx, v in micro.items():
            b = d["per_device_train_batch_size"][idx[pos["per_device_train_batch_size"]]]
            n = -(-rows_used(inst, d["cutoff_len"][idx[pos["cutoff_len"]]], smp) // n_gpu)
            compute[(si, ei) + idx] = micro_batches(epochs, n, b) * v
        for ci, c in enumerate(d["cutoff_len"]):
            n = -(-rows_used(inst, c, smp) // n_gpu)
            for bi, b in enumerate(d["per_device_train_batch_size"]):
                for ai, a in enumerate(d["gradient_accumulation_steps"]):
                    steps = optimizer_steps(epochs, n, b, a)
                    for tidx, v in opt.items():
                        step[(si, ei, ci, bi, ai) + tidx] = steps * v
    return {
        "compute_ms": Table("compute_ms", samples_k + mk, compute),
        "step_ms": Table("step_ms", samples_k + ("cutoff_len", "per_device_train_batch_size",
                                                 "gradient_accumulation_steps") + _T, step),
    }


def point_index(fac: Factored, values: dict) -> dict[str, int]:
    """Domain indices of a plan's knob values (full fine-tuning: rank and target at index 0), with `accumulating`."""
    d = fac.inst.domains
    idx = {}
    for k in KNOBS:
        v = values.get(k)
        idx[k] = 0 if v is None else d[k].index(v)
    idx["accumulating"] = fac.accumulating_index(idx["gradient_accumulation_steps"])
    return idx


def lookup(t: Table, idx: dict[str, int]) -> int:
    return t.values[tuple(idx[k] for k in t.knobs)]


def memory_of(fac: Factored, values: dict) -> tuple[dict[str, int], bool]:
    """What the tables say of one plan: each moment's allocated bytes, and whether the plan fits (its peak moment,
    the first of largest total, within the allocated limit). The same arithmetic the CP-SAT model states."""
    idx = point_index(fac, values)
    totals = {k: sum(lookup(t, idx) for t in fac.memory[k]) for k in fac.moments}
    peak = max(fac.moments, key=lambda k: totals[k])
    over = lookup(fac.overhead[peak], idx) if peak in fac.overhead else 0
    return totals, totals[peak] + over <= lookup(fac.limit, idx)
