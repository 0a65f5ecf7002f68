"""Problem + catalog -> an instance: finite sorted domains and the integer tables both solvers use.

Every memory number comes from `memory.estimate` (the single source of truth); the objectives from
`objectives` (quality, time, optimizer steps). Floats become integers once, rounded conservatively (memory up,
quality to the nearest 1e-4, time up to the millisecond), so CP-SAT and brute force see identical numbers.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..distributed import DistSettings, comm_time_s, per_gpu
from ..errors import ConfigError, ProblemError
from ..memory import budget_bytes, count_params, estimate
from ..memory.precision import padded_length, setting_for
from ..memory.step import context_window_problem, device_peak
from ..memory.terms import TermMemo, memoized
from ..models import catalog
from ..models.arch import layer_linears
from ..models.families import family_of
from ..schema import Arch, GpuSpec, Plan
from ..units import GIB
from . import quality as qm
from .objectives import MEM_KNOBS, Candidate
from .perf import (
    expected_padded_len,
    expected_padded_len_samples,
    mean_length,
    micro_batch_seconds,
    optimizer_step_seconds,
    packed_rows_estimate,
    summary_coverage,
)
from .problem import CustomGpu, DatasetSummary, Problem

__all__ = ["Instance", "build_instance", "enumerate_instance", "plan_for", "micro_ms", "opt_ms"]


@dataclass
class Instance:
    problem: Problem
    arch: Arch
    gpu: GpuSpec
    budget_bytes: int
    domains: dict[str, list]
    combos: list[Candidate]
    samples_used: dict[int | None, int]  # max_samples value -> samples trained on
    # the first num_train_epochs value searched (domains["num_train_epochs"]: the problem's values, or its one value,
    # or the recipe's for the data size); memory never reads it
    epochs: float = 3.0
    epochs_source: str = "the problem file"
    context: dict = field(default_factory=dict)  # what quality.quality needs of the model and the data
    coverage: dict[int, float] = field(default_factory=dict)  # cutoff_len -> share of supervised tokens kept
    quality_cache: dict[tuple, int] = field(default_factory=dict)
    summary: DatasetSummary | None = None  # the data's summary (given, or measured from the data file)
    lengths: tuple[int, ...] = ()  # measured total tokens per sample, sorted (empty without a data file)
    packed_rows: dict[int, int] = field(default_factory=dict)  # packing: cutoff_len -> rows of the whole data set
    evaluated: int = 0  # estimates (plans judged by the memory model)
    terms: TermMemo = field(default_factory=TermMemo)  # the memory model's components, computed per sub-domain
    min_peak: tuple[int, tuple] | None = None  # smallest device peak seen and its knobs
    host_limited: bool = False  # some plan fit nothing because of the host RAM per node
    notes: list[str] = field(default_factory=list)
    dist: DistSettings | None = None  # several GPUs (problem.cluster): engine, count, offload of this instance
    # plan_fields, micro_ms and opt_ms by their arguments: pure functions of them and of the instance, called once per
    # memory setting otherwise (the search calls them for thousands of settings that share a few argument values)
    memo: dict[tuple, object] = field(default_factory=dict)
    images_per_sample: int = 0  # vision-language models: images per sample priced in every plan (problem.dataset)

    @property
    def num_gpus(self) -> int:
        return self.dist.num_gpus if self.dist is not None else 1


def resolve_gpu(problem: Problem) -> GpuSpec:
    g = problem.gpu
    if isinstance(g, CustomGpu):
        return GpuSpec(id="custom", name=g.name, memory_mib=g.memory_mib, bandwidth_gbps=g.bandwidth_gbps,
                       bf16_tflops=g.bf16_tflops if g.bf16 else None, fp16_tflops=g.bf16_tflops,
                       compute_capability=g.compute_capability, architecture="custom", bf16=g.bf16,
                       flash_attn2=g.flash_attn2, source="problem file")
    return catalog.get_gpu(g)


def resolve_model(problem: Problem, base: Path | None) -> Arch:
    name = problem.model
    if base is not None and name not in catalog.model_configs():
        cand = base / name
        if cand.exists():
            name = str(cand)
    return catalog.resolve_arch(name)


def _target_names(arch: Arch, target: str) -> str:
    if target == "all":
        return "all"
    return ",".join(m.name for m in layer_linears(arch) if m.group == ("attn" if target == "attention" else "mlp"))


def model_family(arch: Arch) -> str:
    """The family quality.recommended_hparams knows (its learning-rate exponent): qwen or llama (the default)."""
    return "qwen" if arch.model_type.startswith("qwen") else "llama"


def hparams_for(inst: Instance, finetuning_type: str, lora_rank: int | None,
                optimizer_steps: float | None = None) -> dict:
    """quality.recommended_hparams for a plan of this instance (values and `sources`)."""
    ctx = inst.context
    return qm.recommended_hparams(finetuning_type, ctx["model_params"], ctx["model_family"], lora_rank or 8,
                                  ctx["samples_total"], hidden_size=ctx["hidden_size"],
                                  optimizer_steps=optimizer_steps, stage=ctx.get("stage", "sft"))


def plan_fields(inst: Instance, finetuning_type: str, lora_rank: int | None) -> dict:
    """The Plan fields the recipe sets (lora_dropout has a memory effect, so the search plans with it). Shared per
    (type, rank) on the instance: read it, never change it."""
    key = ("plan_fields", finetuning_type, lora_rank)
    out = inst.memo.get(key)
    if out is None:
        out = inst.memo[key] = _plan_fields(inst, finetuning_type, lora_rank)
    return out


def _plan_fields(inst: Instance, finetuning_type: str, lora_rank: int | None) -> dict:
    h = hparams_for(inst, finetuning_type, lora_rank)
    out = {"max_grad_norm": h["max_grad_norm"], "num_train_epochs": inst.epochs}
    if inst.problem.stage == "dpo":  # the memory model prices the DPO step from these (memory/preference.py)
        out.update(stage="dpo", pref_loss=inst.problem.pref_loss, pref_beta=inst.problem.pref_beta)
    ds = inst.problem.dataset
    if ds.packing or ds.neat_packing:
        out.update(packing=True, neat_packing=ds.neat_packing)
    if inst.arch.vision is not None:  # the emitted configs carry the problem's image sizes
        out.update(images_per_sample=inst.images_per_sample, image_max_pixels=ds.image_max_pixels,
                   image_min_pixels=ds.image_min_pixels)
    if finetuning_type != "full":
        out.update(lora_alpha=h["lora_alpha"], lora_dropout=h["lora_dropout"])
    return out


def plan_for(arch: Arch, gpu: GpuSpec, knobs: dict, fields: dict | None = None) -> Plan:
    """The LLaMA-Factory plan of one point of the search space (`fields`: recipe values, see plan_fields)."""
    ft = knobs["finetuning_type"]
    full = ft == "full"
    return Plan(**(fields or {}),
        finetuning_type="full" if full else "lora",
        quantization_bit={"qlora4": 4, "qlora8": 8}.get(ft),
        lora_rank=knobs.get("lora_rank") or 8,
        lora_target="all" if full else _target_names(arch, knobs["lora_target"]),
        cutoff_len=knobs["cutoff_len"],
        per_device_train_batch_size=knobs["per_device_train_batch_size"],
        gradient_accumulation_steps=knobs.get("gradient_accumulation_steps", 1),
        max_samples=knobs.get("max_samples"),
        disable_gradient_checkpointing=not knobs["gradient_checkpointing"],
        flash_attn=knobs["flash_attn"],
        optim=knobs["optim"],
        bf16=gpu.bf16,
        fp16=not gpu.bf16,
        enable_liger_kernel=knobs["enable_liger_kernel"],
    )


def _domains(problem: Problem, arch: Arch, gpu: GpuSpec) -> tuple[dict[str, list], list[str]]:
    s = problem.search
    notes = []
    attn = [a for a in s.flash_attn if a != "fa2" or gpu.flash_attn2 == "yes"]
    if len(attn) < len(s.flash_attn):
        notes.append(f"fa2 dropped: {gpu.name} has FlashAttention-2 support '{gpu.flash_attn2}'")
    if not attn:
        raise ProblemError(f"search.flash_attn allows only fa2, which {gpu.name} lacks. Add auto or sdpa.")
    window = arch.max_position_embeddings
    beyond = [c for c in s.cutoff_len if window is not None and c > window]
    if beyond:
        raise ProblemError(f"search.cutoff_len: {context_window_problem(max(beyond), window)}. Remove "
                           f"{', '.join(map(str, sorted(set(beyond))))} from search.cutoff_len.")
    liger = list(s.enable_liger_kernel)
    if not family_of(arch.model_type).liger:
        liger = [False]
    fts, targets = _modelled_types(arch, gpu, s, notes), list(s.lora_target)
    if arch.is_moe and not _target_names(arch, "mlp"):  # routed experts only: no nn.Linear in the MLP block
        targets = [t for t in targets if t != "mlp"] or targets
        if len(targets) < len(s.lora_target):
            notes.append(f"{arch.name} is a mixture-of-experts model: lora_target mlp dropped (the routed experts are "
                         "not nn.Linear)")
    # Domains keep the problem file's order (duplicates dropped): ties between plans with equal quality and
    # time go to the values listed first, dimension by dimension in MEM_KNOBS order, then accumulation and
    # max_samples.
    domains = {
        "finetuning_type": _unique(fts),
        "lora_rank": _unique(s.lora_rank),
        "lora_target": _unique(targets),
        "cutoff_len": _unique(s.cutoff_len),
        "per_device_train_batch_size": _unique(s.per_device_train_batch_size),
        "gradient_checkpointing": _unique(s.gradient_checkpointing),
        "flash_attn": _unique(attn),
        "optim": _unique(s.optim),
        "enable_liger_kernel": _unique(liger),
        "gradient_accumulation_steps": _unique(s.gradient_accumulation_steps),
        "max_samples": _unique(s.max_samples),
        "num_train_epochs": [],  # set by build_instance (the recipe's value needs the data size)
    }
    return domains, notes


def _modelled_types(arch: Arch, gpu: GpuSpec, s, notes: list[str]) -> list[str]:
    """The finetuning types of the search the memory model covers for this model: each is probed with its plan at
    the space's first values (precision.setting_for refuses, e.g., a quantized vision-language model or fp32 experts
    of a full MoE fine-tune); the refused ones are dropped with a note, or one error if none is left."""
    kept, refused = [], {}
    for ft in s.finetuning_type:
        probe = plan_for(arch, gpu, {"finetuning_type": ft, "lora_rank": s.lora_rank[0], "lora_target": "all",
                                     "cutoff_len": min(s.cutoff_len), "per_device_train_batch_size": 1,
                                     "gradient_checkpointing": True, "flash_attn": "auto", "optim": "adamw_torch",
                                     "enable_liger_kernel": False})
        try:
            setting_for(arch, probe)
        except ConfigError as exc:
            refused[ft] = str(exc)
            continue
        kept.append(ft)
    if not kept:
        raise ProblemError(f"search.finetuning_type {', '.join(refused)}: none is modelled for {arch.name}: "
                           f"{next(iter(refused.values()))}")
    for ft, why in refused.items():
        notes.append(f"finetuning_type {ft} dropped: {why}")
    return kept


def _unique(values: list) -> list:
    return list(dict.fromkeys(values))


def build_instance(problem: Problem, base: Path | None = None, dist: DistSettings | None = None,
                   enumerate_settings: bool = True) -> Instance:
    """The instance of one GPU, or of `dist` (several GPUs: per-GPU memory from distributed.per_gpu, host RAM per
    node bounded by dist.host_ram_gib, samples split over the GPUs, communication per optimizer step).
    `enumerate_settings=False`: domains, data and objectives' context only (search/factored.py builds its tables
    from them); otherwise every memory setting is judged too (`enumerate_instance`)."""
    arch = resolve_model(problem, base)
    gpu = resolve_gpu(problem)
    domains, notes = _domains(problem, arch, gpu)
    budget = budget_bytes(gpu.memory_bytes, problem.margin)
    inst = Instance(problem, arch, gpu, budget, domains, [], {}, notes=notes, dist=dist)
    measured = None
    if problem.dataset.file:
        from ..data.dataset import analyze_dataset

        data_path = (base / problem.dataset.file) if base is not None else Path(problem.dataset.file)
        model_id = arch.name if arch.name in catalog.model_configs() else None
        tok = problem.dataset.tokenizer
        if tok == "approx":
            from ..data.dataset import count_tokens, template_for_model
            from ..data.tokens import ApproxCounter, tokenizer_family

            tpl = template_for_model(model_id, arch.model_type) if model_id else "fallback"
            counter = ApproxCounter(tokenizer_family(model_id, arch.model_type, tpl))
            if problem.stage == "dpo":  # preference pairs: a sample's length is prompt + the longer response
                from ..data.pairwise import count_pairs

                measured = count_pairs(data_path, template=tpl, counter=counter, formatting=problem.dataset.formatting)
            else:
                measured = count_tokens(data_path, template=tpl, counter=counter,
                                        formatting=problem.dataset.formatting)
        else:
            path = None if tok == "auto" else ((base / tok) if base is not None else Path(tok))
            measured = analyze_dataset(data_path, model=model_id, model_type=arch.model_type, tokenizer=path,
                                       formatting=problem.dataset.formatting, pairwise=problem.stage == "dpo")
        inst.summary = measured.summary()
        inst.lengths = tuple(sorted(sm.total for sm in measured.samples))
        how = "exact tokenizer" if measured.exact else "approximate token counts"
        notes.append(f"data: {len(inst.lengths)} samples measured from {problem.dataset.file} ({how}, "
                     f"template {measured.template})")
    else:
        inst.summary = problem.dataset.summary
    measured = _images(inst, measured, data_path if problem.dataset.file else None)
    if measured is not None:
        inst.summary = measured.summary()
        inst.lengths = tuple(sorted(sm.total for sm in measured.samples))
    ds = inst.summary
    if measured is not None:
        cov = {c: measured.coverage(c).response_kept_share for c in domains["cutoff_len"]}
        supervised = float(sum(sm.response for sm in measured.samples))
    else:
        cov = {c: summary_coverage(ds.token_length_percentiles, ds.response_token_share, c)
               for c in domains["cutoff_len"]}
        supervised = ds.num_samples * ds.response_token_share * mean_length(ds.token_length_percentiles)
    inst.coverage = cov
    inst.context = {
        "model_params": count_params(arch, Plan(finetuning_type="full"))[1], "num_layers": arch.num_hidden_layers,
        "hidden_size": arch.hidden_size, "intermediate_size": arch.intermediate_size,
        "kv_size": arch.num_key_value_heads * arch.head_dim, "samples_total": ds.num_samples,
        "supervised_tokens_total": supervised, "model_family": model_family(arch), "stage": problem.stage,
    }
    if problem.search.num_train_epochs is not None:
        domains["num_train_epochs"] = _unique(problem.search.num_train_epochs)
        inst.epochs_source = "search.num_train_epochs"
    elif problem.objective.num_train_epochs is not None:
        domains["num_train_epochs"] = [problem.objective.num_train_epochs]
    else:
        epochs, inst.epochs_source = qm.recipe_epochs(ds.num_samples)
        domains["num_train_epochs"] = [epochs]
    inst.epochs = domains["num_train_epochs"][0]
    for n in domains["max_samples"]:
        inst.samples_used[n] = ds.num_samples if n is None else min(n, ds.num_samples)
    if problem.dataset.packing or problem.dataset.neat_packing:
        from ..data.dataset import packed_rows

        inst.packed_rows = {c: packed_rows(measured.samples, c) if measured is not None else
                            packed_rows_estimate(ds.token_length_percentiles, ds.num_samples, c)
                            for c in domains["cutoff_len"]}
    if enumerate_settings:
        enumerate_instance(inst)
    return inst


def _images(inst: Instance, measured, data_path: Path | None):
    """The images each sample of a vision-language problem holds (problem.dataset.images_per_sample, or the most one
    sample of the data file has), set on the instance; cutoff_len values too short for their tokens dropped. With a
    data file of images, each sample's image tokens join its first turn's prompt (LLaMA-Factory expands the <image>
    placeholders before truncation: data/mm_plugin.py process_messages): the measured samples returned."""
    from dataclasses import replace

    from ..memory.precision import sample_image_tokens

    problem, arch = inst.problem, inst.arch
    spec = problem.dataset
    if arch.vision is None:
        if spec.images_per_sample:
            raise ProblemError(f"dataset.images_per_sample {spec.images_per_sample}: {arch.name} has no vision tower. "
                               "Remove images_per_sample, or solve for a vision-language model, e.g. "
                               "Qwen/Qwen2.5-VL-3B-Instruct.")
        if data_path is not None and problem.stage != "dpo":  # a data file of images: one clear error
            from ..data.read import read_files, resolve_source

            files, fmt, _ = resolve_source(data_path, None, spec.formatting)
            if any(c.images for c in read_files(files, fmt)):
                raise ProblemError(f"dataset {spec.file}: samples have images but {arch.name} has no vision tower. "
                                   "Set the problem's model to a vision-language model (e.g. "
                                   "Qwen/Qwen2.5-VL-3B-Instruct), or remove the images from the data.")
        return measured
    counts = None
    if data_path is not None and measured is not None and problem.stage != "dpo":
        from ..data.images import dataset_images

        counts = dataset_images(data_path, arch.vision, model=arch.name, formatting=spec.formatting,
                                max_pixels=spec.image_max_pixels, min_pixels=spec.image_min_pixels)
    n = spec.images_per_sample
    if n is None:
        n = max((len(c) for c in counts), default=0) if counts else 0
    if n and (problem.stage == "dpo" or spec.packing or spec.neat_packing):
        what = "stage dpo" if problem.stage == "dpo" else "packing"
        raise ProblemError(f"{what} with images is not modelled yet. Solve without it, or set "
                           "dataset.images_per_sample: 0 for text-only samples.")
    inst.images_per_sample = n
    if not n:
        return measured
    need = sample_image_tokens(arch, n, spec.image_max_pixels, spec.image_min_pixels)
    cutoffs = inst.domains["cutoff_len"]
    short = [c for c in cutoffs if c < need]
    if len(short) == len(cutoffs):
        raise ProblemError(f"search.cutoff_len: {n} image(s) per sample at image_max_pixels {spec.image_max_pixels} "
                           f"take {need} tokens, more than every cutoff_len ({', '.join(map(str, cutoffs))}). Add a "
                           f"cutoff_len of at least {need}, or lower dataset.image_max_pixels.")
    inst.domains["cutoff_len"] = [c for c in cutoffs if c >= need]
    how = "dataset.images_per_sample" if spec.images_per_sample is not None else "the most in one sample of the data"
    inst.notes.append(f"images: {n} per sample ({how}), each priced at image_max_pixels {spec.image_max_pixels:,}: "
                      f"{need} tokens of every cutoff_len" + (f"; cutoff_len {', '.join(map(str, short))} dropped "
                                                               "(too short for them)" if short else "") +
                      "; the time objective leaves out the vision tower's compute")
    if counts is None:
        return measured
    samples = tuple(replace(sm, turns=((sm.turns[0][0] + sum(x.tokens for x in c), sm.turns[0][1]),) + sm.turns[1:])
                    if c and sm.turns else sm for sm, c in zip(measured.samples, counts, strict=True))
    return replace(measured, samples=samples)


def enumerate_instance(inst: Instance) -> Instance:
    """The memory settings judged by the memory model (a staircase per setting of the other knobs, memory-only knob
    values above what earlier ones cover: `_settings`), the feasible ones a solve needs kept as `inst.combos`: what
    brute force (the oracle) and CP-SAT search."""
    domains = inst.domains
    cutoffs, batches = sorted(domains["cutoff_len"]), sorted(domains["per_device_train_batch_size"])
    outer = ["finetuning_type", "lora_rank", "lora_target", "gradient_checkpointing", "flash_attn", "optim",
             "enable_liger_kernel"]
    check_size(domains)
    # memory depends on accumulation only through `> 1` (memory/step.py: the accumulated gradients are live from
    # the second micro-batch on), so each setting is judged once per class present: 1, and the smallest value > 1
    accums = domains["gradient_accumulation_steps"]
    classes = ([1] if 1 in accums else []) + ([min(a for a in accums if a > 1)] if any(a > 1 for a in accums) else [])
    with memoized(inst.terms):
        _settings(inst, domains, outer, cutoffs, batches, classes)
    inst.combos.sort(key=lambda c: c.index)
    return inst


def _settings(inst: Instance, domains: dict, outer: list[str], cutoffs: list[int], batches: list[int],
              classes: list[int]) -> None:
    """The settings a solve needs, per (type, rank, targets, checkpointing): the flash_attn, optim and liger values
    change memory only (the objectives never read them), so at each (cutoff, batch) and accumulation class only the
    first of them in the search space's order that fits can win a tie-break: every later one has the same
    objectives and a larger key (MEM_KNOBS order puts them after the rest). They are walked in that order and each
    is judged only above the staircase the earlier ones cover (`_staircase`); a setting is kept for the classes
    where it is that first fit (Candidate.fits_single / fits_accumulated)."""
    seen_full = set()
    covered: dict[int, list[int]] = {}
    group = None
    for vals in itertools.product(*(domains[k] for k in outer)):
        knobs = dict(zip(outer, vals))
        if knobs["finetuning_type"] == "full":
            # rank and target do not apply: one representative (the first values) stands for them
            key = tuple(v for k, v in knobs.items() if k not in ("lora_rank", "lora_target"))
            if key in seen_full:
                continue
            seen_full.add(key)
            knobs["lora_rank"] = None
            knobs["lora_target"] = None
        g = tuple(knobs[k] for k in outer if k not in MEMORY_ONLY)
        if g != group:  # product order: the memory-only knobs vary fastest, so a group's settings are consecutive
            group, covered = g, {a: [-1] * len(cutoffs) for a in classes}
        fit = {a: _staircase(inst, knobs, cutoffs, batches, a, covered[a]) for a in classes}
        single, accumulated = fit.get(1, set()), (fit[classes[-1]] if classes[-1] > 1 else set())
        for cutoff in cutoffs:
            for batch in batches:
                if (cutoff, batch) in single or (cutoff, batch) in accumulated:
                    _add_combo(inst, knobs, cutoff, batch, (cutoff, batch) in single, (cutoff, batch) in accumulated)


# Memory knobs no objective reads (objectives.point_objectives: quality and time depend on the type, rank, targets,
# cutoff, batch, checkpointing, accumulation, max_samples and epochs only)
MEMORY_ONLY = ("flash_attn", "optim", "enable_liger_kernel")


# What one solve handles: memory settings (memory knobs without accumulation and max_samples; each costs a few
# memory-model terms and one table row) and points (settings x accumulation x max_samples x epochs: brute force
# enumerates them, CP-SAT's model has one literal per objective group). Measured: 10^5 settings build in ~30 s and
# ~1 GiB (python benchmarks/solve.py); a valid problem once reached 6 GiB in 38 s before this check existed (issue 16).
MAX_SETTINGS = 200_000
MAX_POINTS = 20_000_000


def space_size(domains: dict[str, list]) -> tuple[int, int]:
    """(memory settings, points) of the search space: full fine-tuning counts once for every rank and target."""
    rest = 1
    for k in ("cutoff_len", "per_device_train_batch_size", "gradient_checkpointing", "flash_attn", "optim",
              "enable_liger_kernel"):
        rest *= len(domains[k])
    fts = domains["finetuning_type"]
    lora = sum(1 for f in fts if f != "full") * len(domains["lora_rank"]) * len(domains["lora_target"])
    settings = (lora + (1 if "full" in fts else 0)) * rest
    points = settings * len(domains["gradient_accumulation_steps"]) * len(domains["max_samples"])
    return settings, points * max(1, len(domains.get("num_train_epochs", ())))


def check_size(domains: dict[str, list]) -> None:
    """Refuse a space larger than one solve handles, up front, with its size and the dimensions to pin."""
    settings, points = space_size(domains)
    if settings <= MAX_SETTINGS and points <= MAX_POINTS:
        return
    widest = sorted(((len(v), k) for k, v in domains.items() if len(v) > 1), reverse=True)[:4]
    dims = ", ".join(f"{k} ({n} values)" for n, k in widest)
    raise ProblemError(
        f"the search space has {points:,} plans ({settings:,} memory settings), more than one solve handles "
        f"({MAX_POINTS:,} plans, {MAX_SETTINGS:,} memory settings). Pin or shorten the widest dimensions in "
        f"search: {dims}."
    )


def _staircase(inst: Instance, knobs: dict, cutoffs: list[int], batches: list[int], accum: int,
               covered: list[int]) -> set[tuple]:
    """Feasible (cutoff, batch) pairs above `covered` (per sorted cutoff, the largest sorted batch position an earlier
    setting already fits, -1: none), for fixed other knobs and accumulation; `covered` is raised to include them.
    The peak is monotone in both (property-tested in tests/test_memory.py), so the feasible set is a staircase:
    walk it with at most |C| + |B| estimates, none at or below `covered`."""
    out = set()
    j = len(batches) - 1
    for i in range(len(cutoffs)):
        # invariant: no batch above j fits at this cutoff (monotone in cutoff: none fitted above j at the last one)
        while j > covered[i]:
            if _evaluate(inst, knobs, cutoffs[i], batches[j], accum) <= inst.budget_bytes:
                break
            j -= 1
        if j > covered[i]:
            out.update((cutoffs[i], batches[jj]) for jj in range(covered[i] + 1, j + 1))
            covered[i] = j
    return out


def _evaluate(inst: Instance, knobs: dict, cutoff: int, batch: int, accum: int):
    plan = plan_for(inst.arch, inst.gpu, {**knobs, "cutoff_len": cutoff, "per_device_train_batch_size": batch,
                                          "gradient_accumulation_steps": accum},
                    plan_fields(inst, knobs["finetuning_type"], knobs["lora_rank"]))
    inst.evaluated += 1
    if inst.dist is not None:
        peak = dist_peak(inst, plan, estimate(inst.arch, plan))
    else:
        peak = device_peak(inst.arch, plan)
    if peak < NOT_RUNNABLE and (inst.min_peak is None or peak < inst.min_peak[0]):
        inst.min_peak = (peak, tuple(sorted({**knobs, "cutoff_len": cutoff,
                                             "per_device_train_batch_size": batch}.items())))
    return peak


# A peak above every budget: the engine cannot run the plan, or the host RAM per node is exceeded. Never reported
# as a smallest peak.
NOT_RUNNABLE = 1 << 62


def dist_peak(inst: Instance, plan: Plan, est) -> int:
    """Per-GPU device peak of `plan` under inst.dist; a plan the engine cannot run (distributed.validate) or whose
    host peak per node exceeds dist.host_ram_gib counts as not fitting (a peak above every budget)."""
    dist = inst.dist
    try:
        d = per_gpu(inst.arch, plan, dist, est)
    except ConfigError:
        return NOT_RUNNABLE
    if dist.host_ram_gib is not None and d.host_peak_bytes > dist.host_ram_gib * GIB:
        inst.host_limited = True
        return NOT_RUNNABLE
    return d.device_peak_bytes


def micro_ms(inst: Instance, ft: str, lora_rank: int | None, lora_target: str | None, cutoff: int, batch: int,
             gc: bool) -> int:
    """One micro-batch, ms (ceil): perf.micro_batch_seconds at the data's expected padded length."""
    key = ("micro_ms", ft, lora_rank, lora_target, cutoff, batch, gc)
    ms = inst.memo.get(key)
    if ms is None:
        ms = inst.memo[key] = _micro_ms(inst, ft, lora_rank, lora_target, cutoff, batch, gc)
    return ms


def _micro_ms(inst: Instance, ft: str, lora_rank: int | None, lora_target: str | None, cutoff: int, batch: int,
              gc: bool) -> int:
    plan = plan_for(inst.arch, inst.gpu, {"finetuning_type": ft, "lora_rank": lora_rank, "lora_target": lora_target,
                                          "cutoff_len": cutoff, "per_device_train_batch_size": batch,
                                          "gradient_checkpointing": gc, "flash_attn": "auto", "optim": "adamw_torch",
                                          "enable_liger_kernel": False}, plan_fields(inst, ft, lora_rank))
    trainable, _ = count_params(inst.arch, plan)
    if plan.packed:  # every packed row is cutoff_len long (padded up to a multiple of 8)
        seq = padded_length(cutoff)
    elif inst.lengths:
        seq = expected_padded_len_samples(inst.lengths, cutoff, batch)
    else:
        seq = expected_padded_len(inst.summary.token_length_percentiles, cutoff, batch)
    micro_s = micro_batch_seconds(inst.arch, inst.gpu, finetuning_type=ft, gc=gc, batch=batch, seq_len=seq,
                                  lora_params=0 if ft == "full" else trainable, pairwise=plan.pairwise,
                                  reference=plan.use_ref_model)
    return math.ceil(micro_s * 1000)


def opt_ms(inst: Instance, ft: str, lora_rank: int | None, lora_target: str | None, plan: Plan | None = None) -> int:
    """One optimizer step, ms (ceil), with the communication of several GPUs (not overlapped; distributed/comm.py).
    `plan`: a plan of these knobs, when the caller has one (several GPUs need it)."""
    if inst.dist is not None:  # the communication reads the plan: not shared
        return _opt_ms(inst, ft, lora_rank, lora_target, plan)
    key = ("opt_ms", ft, lora_rank, lora_target)
    ms = inst.memo.get(key)
    if ms is None:
        ms = inst.memo[key] = _opt_ms(inst, ft, lora_rank, lora_target, plan)
    return ms


def _opt_ms(inst: Instance, ft: str, lora_rank: int | None, lora_target: str | None, plan: Plan | None) -> int:
    plan = plan or plan_for(inst.arch, inst.gpu, {"finetuning_type": ft, "lora_rank": lora_rank,
                                                  "lora_target": lora_target, "cutoff_len": 512,
                                                  "per_device_train_batch_size": 1, "gradient_checkpointing": True,
                                                  "flash_attn": "auto", "optim": "adamw_torch",
                                                  "enable_liger_kernel": False})
    trainable, _ = count_params(inst.arch, plan)
    opt_s = optimizer_step_seconds(trainable, inst.gpu)
    if inst.dist is not None:
        total = count_params(inst.arch, Plan(finetuning_type="full"))[1]
        d = per_gpu(inst.arch, plan, inst.dist)
        opt_s += comm_time_s(d, trainable, max(total - trainable, 0) if ft != "full" else 0, inst.gpu).seconds
    return math.ceil(opt_s * 1000)


def _add_combo(inst: Instance, knobs: dict, cutoff: int, batch: int, single: bool, accumulated: bool) -> None:
    full = {**knobs, "cutoff_len": cutoff, "per_device_train_batch_size": batch}
    ft = knobs["finetuning_type"]
    plan = plan_for(inst.arch, inst.gpu, full, plan_fields(inst, ft, knobs["lora_rank"]))
    index = tuple(
        0 if full[k] is None else inst.domains[k].index(full[k]) for k in MEM_KNOBS
    )
    inst.combos.append(Candidate(
        **{k: full[k] for k in MEM_KNOBS}, index=index,
        micro_ms=micro_ms(inst, ft, knobs["lora_rank"], knobs["lora_target"], cutoff, batch,
                          knobs["gradient_checkpointing"]),
        opt_ms=opt_ms(inst, ft, knobs["lora_rank"], knobs["lora_target"], plan),
        fits_single=single, fits_accumulated=accumulated,
    ))
