"""Write a solve result as ready-to-run LLaMA-Factory configs (+ dataset_info.json). I/O at the edge."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import __version__
from ..distributed import DistSettings
from ..errors import TrainfitError
from ..io import WriteError, make_parents, os_error_message, remove_folders, write_text_atomic
from ..models.families import template_for
from ..search.problem import Problem
from ..search.solve import Solution, SolveResult
from ..units import GIB
from .launch import deepspeed_key, launch_command, launch_files
from .write import dataset_info_entry, format_float, render_config

__all__ = ["config_files", "write_configs", "picked"]


def picked(result: SolveResult, pick: str) -> list[int]:
    """Indices of the front points to write: all, or the one labelled best-quality / fastest / balanced."""
    if pick == "all":
        return list(range(len(result.front)))
    return [i for i, s in enumerate(result.front) if pick in s.labels][:1]


def _stem(i: int, s: Solution, epochs: bool = False) -> str:
    """The file name of front point i; `epochs`: the search had several num_train_epochs values (they name it)."""
    parts = [f"p{i + 1:02d}", s.finetuning_type]
    if s.finetuning_type != "full":
        parts += [f"r{s.lora_rank}", s.lora_target or "all"]
    parts += [f"c{s.cutoff_len}", f"b{s.per_device_train_batch_size}x{s.gradient_accumulation_steps}"]
    if epochs:
        parts.append(f"e{s.num_train_epochs:g}")
    if s.engine is not None:
        parts += [f"g{s.num_gpus}", s.engine] + ([f"off-{s.offload}"] if s.offload != "none" else [])
    return "_".join(parts)


def _dur(seconds: float) -> str:
    m = round(seconds / 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m} min"


def config_files(result: SolveResult, problem: Problem, problem_path: str, out_dir: str, pick: str,
                 data_file: str | None) -> dict[str, str]:
    """{relative file name: text}: one YAML per picked front point and the dataset_info.json.

    `out_dir` is written into the configs as `dataset_dir` exactly as given (relative paths resolve against the
    folder `llamafactory-cli train` runs in, as in LLaMA-Factory), and `data_file` is referenced relative to it."""
    ds = problem.dataset
    files: dict[str, str] = {}
    if data_file:
        file_name = os.path.relpath(data_file, out_dir) if not os.path.isabs(data_file) else data_file
    else:
        file_name = f"{ds.name}.json"
    present = None
    if data_file and os.path.isfile(data_file):
        from ..data.read import record_keys

        present = record_keys(data_file)
    info = {ds.name: dataset_info_entry(file_name, ds.formatting, present, ranking=problem.stage == "dpo")}
    files["dataset_info.json"] = json.dumps(info, indent=2, sort_keys=True) + "\n"
    # A model read from a folder's config.json is loaded by LLaMA-Factory from the folder (and named by it).
    model_ref = os.path.dirname(result.model) if os.path.basename(result.model) == "config.json" else result.model
    template = template_for(model_ref, _model_type(result))
    for i in picked(result, pick):
        s = result.front[i]
        stem = _stem(i, s, result.several_epochs)
        path = f"{out_dir.rstrip('/')}/{stem}.yaml"
        dist = None
        run = f"CUDA_VISIBLE_DEVICES=0 llamafactory-cli train {path}"
        if s.engine is not None:
            dist = DistSettings(engine=s.engine, num_gpus=s.num_gpus, nodes=s.nodes, offload=s.offload)
            run = launch_command(dist, path)
        header = [
            f"trainfit {__version__}: front point {i + 1} of {len(result.front)} for problem {result.problem!r}"
            + (f" ({', '.join(s.labels)})" if s.labels else ""),
            f"predicted peak{' per GPU' if dist else ''} on {result.gpu} ({result.gpu_total_bytes / GIB:.2f} GiB): "
            f"device {s.device_peak_bytes / GIB:.2f} GiB "
            f"(allocated {s.peak_allocated_bytes / GIB:.2f} GiB), headroom {s.headroom_bytes / GIB:.2f} GiB "
            f"({100 * s.headroom_bytes / result.gpu_total_bytes:.0f}%)",
            f"estimated training time: {_dur(s.time_s)} for {s.num_train_epochs:g} epochs "
            f"({_dur(s.epoch_s)} per epoch); "
            f"quality score {s.quality:.4f}; keeps {s.kept_token_share:.0%} of the supervised tokens",
            f"run (in the folder trainfit solve ran in): {run}",
            f"regenerate: trainfit solve {problem_path}",
        ]
        if s.plan.stage == "dpo":
            ref = f"none ({s.plan.pref_loss} is reference-free)"
            if s.plan.use_ref_model:
                ref = "the adapter-disabled policy" if s.plan.finetuning_type == "lora" else "a frozen model copy"
            header.append(f"stage dpo, pref_loss {s.plan.pref_loss}: {s.per_device_train_batch_size} pair(s) = "
                          f"{2 * s.per_device_train_batch_size} sequences (chosen + rejected) per micro-batch; "
                          f"reference model: {ref}")
        if not data_file:
            header.append(f"data: put your {ds.formatting} file at {out_dir.rstrip('/')}/{file_name}")
        if i == result.recommended:
            header.append(f"recommended: {result.why}")
        header.append("hyperparameters (recipe values, search/quality.py recommended_hparams):")
        for key, value in s.hparams.items():
            shown = format_float(value) if isinstance(value, float) else str(value).lower()
            header.append(f"  {key}: {shown} - {s.hparam_sources[key]}")
        extra: dict = {"warmup_steps": s.hparams["warmup_steps"]}
        if dist is not None:
            header.insert(2, f"{s.num_gpus} GPUs on {s.nodes} node(s), engine {s.engine}, offload {s.offload}; "
                          + (f"host RAM per node {s.host_peak_bytes / GIB:.2f} GiB" if s.host_peak_bytes else ""))
            key = deepspeed_key(dist, path)
            if key:
                extra["deepspeed"] = key
            for fpath, text in launch_files(s.plan, dist, path).items():
                files[os.path.basename(fpath)] = text
        if s.hparams.get("use_rslora"):
            extra["use_rslora"] = True
        files[f"{stem}.yaml"] = render_config(
            s.plan, model_name_or_path=model_ref, template=template, dataset=ds.name, dataset_dir=out_dir.rstrip("/"),
            output_dir=f"saves/{result.problem}/{stem}", header=header, learning_rate=s.hparams["learning_rate"],
            num_train_epochs=s.num_train_epochs, extra=extra,
        )
    return files


def _model_type(result: SolveResult) -> str:
    from ..models.catalog import resolve_arch

    return resolve_arch(result.model).model_type


def write_configs(files: dict[str, str], out_dir: str, *, force: bool, root: Path | None = None) -> tuple[int, int]:
    """Write the files under root/out_dir. A file with identical content is left alone (no overwrite); a file
    with other content, or a trainfit config of an earlier front that the new front lacks, needs `force` (which
    replaces or removes it). All conflicts are checked before anything is written. On an OS error (a read-only
    folder, a file in the way, a name too long) it raises `cannot write <path>: <reason>. <fix>` and removes the
    files and folders this call created (a file replaced under `force` stays replaced). (written, unchanged)"""
    base = (root or Path.cwd()) / out_dir
    conflicts = []
    todo = {}
    stale = []
    try:
        for name, text in files.items():
            p = base / name
            if p.is_file():
                if p.read_text(encoding="utf-8") == text:
                    continue
                if not force:
                    conflicts.append(str(Path(out_dir) / name))
                    continue
            todo[p] = text
        if base.is_dir():
            for p in sorted(base.glob("p[0-9][0-9]_*.yaml")):
                if p.name not in files and p.is_file() and p.read_text(encoding="utf-8").startswith("# trainfit"):
                    stale.append(p)
                    if not force:
                        conflicts.append(f"{Path(out_dir) / p.name} (from an earlier front)")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc if isinstance(exc, UnicodeDecodeError) else exc.strerror
        raise WriteError(f"cannot write {out_dir}: reading what is there failed ({reason}). Pass --out DIR to write "
                         "elsewhere.") from None
    if conflicts:
        raise TrainfitError(
            f"{len(conflicts)} file(s) under {out_dir} exist with other content ({', '.join(conflicts[:3])}"
            f"{', ...' if len(conflicts) > 3 else ''}). Pass --force to overwrite them or --out DIR to write elsewhere."
        )
    created = make_parents(base) if todo else []
    new: list[Path] = []
    try:
        for p, text in todo.items():
            existed = p.exists()
            write_text_atomic(p, text, force=force)
            if not existed:
                new.append(p)
        for p in stale:  # with --force: configs of an earlier front that is no longer current
            try:
                p.unlink()
            except OSError as exc:
                raise WriteError(os_error_message(p, exc)) from None
    except TrainfitError:
        for p in new:
            p.unlink(missing_ok=True)
        remove_folders(created)
        raise
    return len(todo), len(files) - len(todo)
