"""The `trainfit` command line. Thin: parse, call one library function, render."""

from __future__ import annotations

import os
import sys
from enum import Enum
from typing import Optional

import typer

from .cli_common import (
    REPORT_HELP,
    USER_ERRORS,
    calibration_context,
    dist_estimate,
    fail,
    one_line,
    resolve_plan,
    with_plan_flags,
    yaml_model,
)
from .errors import ConfigError
from .llamafactory.read import plan_from_dict, read_yaml
from .memory import DEFAULT_MARGIN, setting_for
from .memory import estimate as run_estimate
from .models import catalog
from .models.arch import param_counts
from .report import estimate_json, estimate_table, gpus_table, models_table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="The best fine-tuning config that fits your GPU: memory model, search, LLaMA-Factory configs.")


@app.command()
@with_plan_flags
def estimate(
    config: Optional[str] = typer.Option(None, "--config", "-c", help="A LLaMA-Factory training YAML."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Catalog id or path to a config.json (or its folder); overrides "
                                             "model_name_or_path."),
    gpu: Optional[str] = typer.Option(None, "--gpu", "-g",
                                      help="Catalog GPU id for the verdict (see `trainfit gpus`)."),
    margin: float = typer.Option(DEFAULT_MARGIN, min=0.0, max=0.99,
                                 help="Share of GPU memory to keep free for 'fits with margin'."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    report: Optional[str] = typer.Option(None, "--report", help=REPORT_HELP),
    force: bool = typer.Option(False, "--force", help="Overwrite the --report file if it exists."),
    num_gpus: Optional[int] = typer.Option(None, "--num-gpus", help="GPUs in all (per-GPU estimate)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="ddp (default), zero1-3, fsdp, fsdp2, fsdp_grad_op."),
    offload: Optional[str] = typer.Option(None, "--offload", help="none, optimizer or params (CPU offload)."),
    nodes: int = typer.Option(1, "--nodes", help="Machines the GPUs are spread over."),
    host_ram_gib: Optional[float] = typer.Option(None, "--host-ram-gib", help="Host RAM per node, GiB."),
    zero_init: bool = typer.Option(True, "--zero-init/--no-zero-init", help="ZeRO-3: built under zero.Init."),
    overrides: Optional[dict] = None,  # filled by with_plan_flags
) -> None:
    """Peak GPU memory of one training step, term by term and phase by phase, and whether it fits."""
    try:
        arch, plan = resolve_plan(config, model, overrides)
        spec = catalog.get_gpu(gpu) if gpu else None
        with calibration_context(gpu):
            est = run_estimate(arch, plan)
        dist = dist_estimate(arch, plan, est, num_gpus, engine, offload, nodes, host_ram_gib, zero_init)
        if report:
            if dist is not None:
                raise ConfigError("--report covers one GPU for now. Drop --report or the multi-GPU flags.")
            from .io import write_text_atomic
            from .report_html import estimate_report

            html = estimate_report(est.model_dump(mode="json"), plan.model_dump(mode="json"),
                                   spec.model_dump(mode="json") if spec else None, margin)
            write_text_atomic(report, html, force=force)
    except USER_ERRORS as exc:
        fail(exc)
        return
    if dist is not None:
        from .distributed.report import dist_json, dist_table
        from .llamafactory.launch import launch_text

        typer.echo(dist_json(dist, spec, margin) if json_out else dist_table(dist, spec, margin))
        if not json_out:
            typer.echo(launch_text(plan, dist, config or "train.yaml"))
        return
    typer.echo(estimate_json(est, spec, plan, margin) if json_out else estimate_table(est, spec, margin))


@app.command()
@with_plan_flags
def trace(
    config: Optional[str] = typer.Option(None, "--config", "-c", help="A LLaMA-Factory training YAML."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Catalog id or path to a config.json (or its folder); overrides "
                                             "model_name_or_path."),
    layers: Optional[int] = typer.Option(None, "--layers", min=1, help="Run a shortened model of N decoder layers."),
    extrapolate: bool = typer.Option(False, "--extrapolate",
                                     help="Run 1 and 2 layers and extrapolate linearly to the full depth."),
    device: str = typer.Option("cpu", "--device",
                               help="cpu (fake tensors, no GPU needed) or cuda (a real step on the GPU)."),
    top: int = typer.Option(10, "--top", min=0, help="Largest live tensors to list at the peak."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    overrides: Optional[dict] = None,  # filled by with_plan_flags
) -> None:
    """Run two real training steps (fake tensors on the CPU, or --device cuda) and measure the peak: the oracle."""
    from .report import trace_table
    from .trace import run_cuda, run_trace, run_trace_extrapolated

    try:
        arch, plan = resolve_plan(config, model, overrides)
        setting_for(arch, plan)  # the same validation as estimate (lora_target names, quantization, ...)
        cfg = catalog.resolve_config(model or yaml_model(config))
        if device == "cuda":
            result = run_cuda(cfg, plan, layers=layers)
        elif device != "cpu":
            raise ConfigError(f"--device {device!r} is not cpu or cuda. Use --device cpu (fake tensors) or cuda.")
        elif extrapolate:
            result = run_trace_extrapolated(cfg, plan)
        else:
            result = run_trace(cfg, plan, layers=layers, top=top)
    except USER_ERRORS as exc:
        fail(exc)
        return
    except NotImplementedError as exc:
        fail(ConfigError(f"{exc}"))
        return
    typer.echo(result.model_dump_json(indent=2) if json_out else trace_table(result))


@app.command()
def gpus(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the GPU catalog."""
    table = list(catalog.gpus().values())
    if json_out:
        import json

        typer.echo(json.dumps([g.model_dump() for g in table], indent=2))
    else:
        typer.echo(gpus_table(table))


@app.command()
def models(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the model catalog (ids are Hugging Face repo ids)."""
    archs = list(catalog.models().values())
    counts = {a.name: param_counts(a).total for a in archs}
    if json_out:
        import json

        typer.echo(json.dumps([{**a.model_dump(), "params": counts[a.name]} for a in archs], indent=2))
    else:
        typer.echo(models_table(archs, counts))


@app.command()
def check(
    config: str = typer.Argument(..., help="A LLaMA-Factory training YAML."),
    gpu: str = typer.Option(..., "--gpu", "-g", help="Catalog GPU id (see `trainfit gpus`)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Overrides model_name_or_path."),
    margin: float = typer.Option(DEFAULT_MARGIN, min=0.0, max=0.99, help="Share of GPU memory to keep free."),
    optimize: bool = typer.Option(False, "--optimize", help="Propose the smallest fitting change even when it fits."),
    write: Optional[str] = typer.Option(None, "--write", help="Write the config with the fix applied to this path."),
    force: bool = typer.Option(False, "--force", help="Overwrite the --write and --report files if they exist."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    report: Optional[str] = typer.Option(None, "--report", help=REPORT_HELP),
    num_gpus: Optional[int] = typer.Option(None, "--num-gpus", help="GPUs in all (multi-GPU check)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="ddp, zero1-3, fsdp, fsdp2, fsdp_grad_op; default: "
                                         "the config's deepspeed JSON, else ddp."),
    offload: Optional[str] = typer.Option(None, "--offload", help="none, optimizer or params (CPU offload)."),
    nodes: int = typer.Option(1, "--nodes", help="Machines the GPUs are spread over."),
    host_ram_gib: Optional[float] = typer.Option(None, "--host-ram-gib", help="Host RAM per node, GiB."),
    zero_init: bool = typer.Option(True, "--zero-init/--no-zero-init", help="ZeRO-3: built under zero.Init."),
    images_per_sample: int = typer.Option(0, "--images-per-sample", min=0,
                                          help="Images per sample (vision-language models; `trainfit data` counts "
                                               "them)."),
) -> None:
    """Does a LLaMA-Factory config fit the GPU, why not, and the smallest change that fits.
    Exit codes: 0 fits, 3 does not fit, 1 bad input."""
    from .check import check as run_check
    from .check import patch_yaml
    from .io import read_text, write_text_atomic
    from .report import check_text

    try:
        data = read_yaml(config)
        if num_gpus is not None or engine is not None or offload is not None or data.get("deepspeed"):
            from .check import check_multi
            from .distributed.advice import advice_text
            from .report import multi_check_extras

            if write or report:
                raise ConfigError("--write and --report cover one GPU for now. Drop them or the multi-GPU flags.")
            spec = catalog.get_gpu(gpu)
            adv, dist, plan = check_multi(data, config, model, spec, margin, num_gpus=num_gpus, engine=engine,
                                          offload=offload, nodes=nodes, host_ram_gib=host_ram_gib, zero_init=zero_init)
            one = {k: v for k, v in data.items() if k != "deepspeed"}
            with calibration_context(gpu):
                single = run_check(one, plan, catalog.resolve_arch(model or str(one.get("model_name_or_path"))),
                                   spec, margin=margin, config_path=config)
            extras = multi_check_extras(single)
            typer.echo(adv.model_dump_json(indent=2) if json_out else advice_text(adv, spec))
            if extras and not json_out:
                typer.echo(extras)
            if adv.verdict == "does_not_fit":
                raise typer.Exit(3)
            return
        plan, yaml_model = plan_from_dict(dict(data), config)
        if images_per_sample:
            plan = plan.model_copy(update={"images_per_sample": images_per_sample})
        name = model or yaml_model
        if not name:
            raise ConfigError("no model given. Pass --model or set model_name_or_path.")
        arch = catalog.resolve_arch(name)
        spec = catalog.get_gpu(gpu)
        with calibration_context(gpu):
            rep = run_check(data, plan, arch, spec, margin=margin, config_path=config, optimize=optimize)
        if write:
            if rep.fix is None:
                raise ConfigError(f"nothing to write: {rep.fix_note or 'no change is needed'}. Drop --write or pass "
                                  f"--optimize.")
            text = read_text(config, error=ConfigError, what="a LLaMA-Factory training YAML")
            write_text_atomic(write, patch_yaml(text, rep.fix.changes), force=force)
        if report:
            from .report_html import estimate_report

            ev = rep.eval.model_dump(mode="json") if rep.eval else None
            if ev is not None:
                ev["device_peak_bytes"] = rep.eval_device_peak_bytes
            html = estimate_report(rep.estimate.model_dump(mode="json"), plan.model_dump(mode="json"),
                                   spec.model_dump(mode="json"), margin, ev)
            write_text_atomic(report, html, force=force)
    except USER_ERRORS as exc:
        fail(exc)
        return
    typer.echo(rep.model_dump_json(indent=2) if json_out else check_text(rep))
    if write and not json_out:
        typer.echo(f"wrote {write}", err=True)
    if rep.verdict == "does_not_fit":
        raise typer.Exit(3)


@app.command()
def data(
    path: str = typer.Argument(...,
                               help="A LLaMA-Factory data file (.json/.jsonl, alpaca/sharegpt/openai) or a "
                                    "dataset_info.json."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Catalog id or config.json path: picks the chat template and tokenizer."),
    template: Optional[str] = typer.Option(None, "--template",
                                           help="LLaMA-Factory template name (overrides the model's)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer",
                                            help="Path to a tokenizer.json (or its folder) for exact counts."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset name inside a dataset_info.json."),
    formatting: Optional[str] = typer.Option(None, "--formatting",
                                             help="alpaca, sharegpt or openai (default: detected)."),
    cutoffs: str = typer.Option("256,384,512,768,1024,1536,2048,4096", "--cutoffs",
                                help="cutoff_len values for the coverage table."),
    cutoff_len: int = typer.Option(2048, "--cutoff-len", min=1,
                                   help="cutoff_len the per-sample text + image tokens are held against."),
    image_max_pixels: int = typer.Option(768 * 768, "--image-max-pixels", min=1,
                                         help="LLaMA-Factory image_max_pixels (default 768*768)."),
    image_min_pixels: int = typer.Option(32 * 32, "--image-min-pixels", min=1,
                                         help="LLaMA-Factory image_min_pixels (default 32*32)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    pairwise: bool = typer.Option(False, "--pairwise", help="Preference (ranking) data for stage dpo: chosen/rejected "
                                  "pairs, each as long as its prompt + the longer response."),
) -> None:
    """Token lengths of a dataset under the model's chat template: histogram, percentiles, cutoff coverage; with
    images (a vision-language --model), text and image tokens per sample against --cutoff-len."""
    from .data.dataset import analyze_dataset
    from .data.images import dataset_images, sample_lengths
    from .report import data_text, images_text

    try:
        try:
            cuts = sorted({int(c) for c in cutoffs.split(",") if c.strip()})
        except ValueError:
            raise ConfigError(f"--cutoffs {cutoffs!r} is not a comma list of integers. Pass e.g. "
                              f"256,512,1024.") from None
        if not cuts or min(cuts) <= 0:
            raise ConfigError("--cutoffs needs positive integers. Pass e.g. 256,512,1024.")
        arch = catalog.resolve_arch(model) if model else None
        tokens = analyze_dataset(path, model=model, model_type=arch.model_type if arch else None, template=template,
                                 tokenizer=tokenizer, dataset=dataset, formatting=formatting, pairwise=pairwise)
        images = None if pairwise else dataset_images(
            path, arch.vision if arch else None, model=model, dataset=dataset, formatting=formatting,
            max_pixels=image_max_pixels, min_pixels=image_min_pixels)
        rows = sample_lengths([s.total for s in tokens.samples], images) if images is not None else None
    except USER_ERRORS as exc:
        fail(exc)
        return
    if json_out:
        import json
        from dataclasses import asdict

        typer.echo(json.dumps({
            "source": tokens.source, "template": tokens.template, "tokenizer": tokens.tokenizer, "exact": tokens.exact,
            "summary": tokens.summary().model_dump(), "coverage": [asdict(c) for c in tokens.coverage_table(cuts)],
            **({"cutoff_len": cutoff_len, "samples": [asdict(r) for r in rows]} if rows is not None else {}),
        }, indent=2))
    else:
        typer.echo(data_text(tokens, cuts))
        if rows is not None:
            typer.echo(images_text(rows, cutoff_len, image_max_pixels, image_min_pixels))


class Solver(str, Enum):
    cpsat = "cpsat"
    brute = "brute"


class Pick(str, Enum):
    all = "all"
    best_quality = "best-quality"
    fastest = "fastest"
    balanced = "balanced"


@app.command()
def solve(
    problems: list[str] = typer.Argument(..., help="Problem YAML file(s) (see problems/)."),
    models: Optional[str] = typer.Option(None, "--models", help="Comma list of models: solve each problem for each."),
    gpus_: Optional[str] = typer.Option(None, "--gpus", help="Comma list of GPU ids (`rtx-4090x2`: up to 2 of "
                                        "them): solve each problem on each."),
    solver: Solver = typer.Option(Solver.cpsat, "--solver", help="cpsat, or brute (enumeration, small spaces)."),
    pick: Optional[Pick] = typer.Option(None, "--pick", help="Configs to write: all front points (default for one "
                                        "problem) or one labelled point (default balanced for several)."),
    out: Optional[str] = typer.Option(None, "--out", help="Folder for the configs (default configs/<problem>/)."),
    write: bool = typer.Option(True, "--write/--no-write", help="Write the LLaMA-Factory configs."),
    force: bool = typer.Option(False, "--force", help="Overwrite configs that exist with other content."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    jobs: int = typer.Option(0, "--jobs", min=0, help="Parallel solves for several problems (0 = one per CPU)."),
    timings: bool = typer.Option(False, "--timings", help="Report the solve's wall time (solve_s; otherwise the "
                                 "output is byte-identical run to run)."),
    report: Optional[str] = typer.Option(None, "--report", help=REPORT_HELP + " Several problems: the matrix."),
) -> None:
    """The Pareto front of quality vs training time under the memory bound, and LLaMA-Factory configs."""
    from .llamafactory.configs import config_files, write_configs
    from .report import front_table
    from .search.batch import expand, gpu_spec, run_batch, summary_matrix
    from .search.problem import load_problem

    try:
        loaded = [(path, *load_problem(path)) for path in problems]
        model_list = [m.strip() for m in (models or "").split(",") if m.strip()]
        gpu_list = [g.strip() for g in (gpus_ or "").split(",") if g.strip()]
        for m in model_list:
            catalog.resolve_arch(m)
        for g in gpu_list:
            catalog.get_gpu(gpu_spec(g)[0])
        items = expand(loaded, model_list, gpu_list)
    except USER_ERRORS as exc:
        fail(exc)
        return
    single = len(items) == 1
    chosen = (pick or (Pick.all if single else Pick.balanced)).value
    if single:
        path, problem, base = items[0]
        from .search.solve import solve_problem

        try:
            with calibration_context(problem.gpu if isinstance(problem.gpu, str) else None):
                result = solve_problem(problem, base, solver.value, timings)
        except USER_ERRORS as exc:
            fail(exc)
            return
        results = [(path, problem, base, result, None)]
    else:
        results = run_batch(items, solver.value, jobs, timings)
    try:
        for path, problem, base, result, _err in results:
            if result is None or not (write or (report and single)):
                continue
            if out and single:
                out_dir = out
            else:
                out_dir = f"{out.rstrip('/')}/{problem.name}" if out else f"configs/{problem.name}"
            data = str(base / problem.dataset.file) if problem.dataset.file else None
            if data:
                data = os.path.relpath(data)
            if report and single:
                from .io import write_text_atomic
                from .report_html import solve_page

                every = config_files(result, problem, path, out_dir, "all", data)
                write_text_atomic(report, solve_page(result, every), force=force)
            if write:
                files = config_files(result, problem, path, out_dir, chosen, data)
                written, same = write_configs(files, out_dir, force=force)
                if not json_out:
                    typer.echo(f"{problem.name}: {written} file(s) written to {out_dir}/, {same} unchanged", err=True)
        if report and not single:
            from .io import write_text_atomic
            from .report_html import batch_report

            rows = [{"model": r.model if r else pr.model, "gpu": r.gpu if r else str(pr.gpu),
                     "result": r.model_dump(mode="json") if r else None, "error": e} for _, pr, _, r, e in results]
            write_text_atomic(report, batch_report(rows), force=force)
    except USER_ERRORS as exc:
        fail(exc)
        return
    if json_out:
        import json

        payload = [r.model_dump(mode="json") if r else {"problem": pr.name, "error": e} for _, pr, _, r, e in results]
        typer.echo(json.dumps(payload[0] if single else payload, indent=2))
    elif single:
        typer.echo(front_table(results[0][3]))
    else:
        typer.echo(summary_matrix(results))
    if any(r is None for *_, r, _e in results):
        raise typer.Exit(3)


@app.command()
def train(
    config: str = typer.Argument(..., help="A LLaMA-Factory training YAML (e.g. one `trainfit solve` wrote)."),
    gpu: Optional[str] = typer.Option(None, "--gpu", "-g", help="Catalog GPU id for the check and the predictions "
                                      "(default: GPU 0's NVML name; none on a machine without a GPU)."),
    margin: float = typer.Option(DEFAULT_MARGIN, min=0.0, max=0.99, help="Share of GPU memory to keep free."),
    force: bool = typer.Option(False, "--force", help="Train even when the check says it does not fit."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop after N optimizer steps (a short "
                                            "measuring run)."),
    log: Optional[str] = typer.Option(None, "--log", help="Calibration log to append to (default "
                                      "$TRAINFIT_CACHE/calibration.jsonl, ~/.cache/trainfit)."),
) -> None:
    """Check the config, train it with LLaMA-Factory, and log predicted vs measured memory and time.
    Exit codes: 0 trained, 3 does not fit (nothing loaded; --force trains anyway), 1 bad input."""
    from .report import check_text
    from .train.record import append_record, default_log_path
    from .train.run import preflight, run_training, train_text

    try:
        with calibration_context(gpu):
            pre = preflight(config, gpu, margin)
    except USER_ERRORS as exc:
        fail(exc)
        return
    if pre.note:
        typer.echo(pre.note, err=True)
    if pre.report is not None and pre.report.verdict == "does_not_fit":
        typer.echo(check_text(pre.report), err=not force)
        if not force:
            raise typer.Exit(3)
        typer.echo("--force: training anyway", err=True)
    try:
        rec = run_training(pre, max_steps=max_steps)
        path = log or str(default_log_path())
        append_record(rec, path)
    except USER_ERRORS as exc:
        fail(exc)
        return
    typer.echo(train_text(rec, path))


@app.command()
def calibrate(
    log: str = typer.Argument(..., help="A calibration log (JSON lines that `trainfit train` appends)."),
    out: Optional[str] = typer.Option(None, "--out", help="Profile to write (default $TRAINFIT_CACHE/"
                                      "calibration_profile.json, which estimate, check and solve read)."),
    force: bool = typer.Option(False, "--force", help="Overwrite the profile if it exists."),
) -> None:
    """Fit per-GPU allocator overheads (reserved - allocated, CUDA context) and a time factor from measured runs."""
    from .io import write_text_atomic
    from .train.calibrate import calibrate_log, calibration_text, default_profile_path

    try:
        profile = calibrate_log(log)
        path = out or str(default_profile_path())
        write_text_atomic(path, profile.text(), force=force)
    except USER_ERRORS as exc:
        fail(exc)
        return
    typer.echo(calibration_text(profile, path))


def main() -> None:
    try:
        app()
    except USER_ERRORS as exc:  # pragma: no cover - commands catch their own
        print(f"Error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(1)
    except (MemoryError, RecursionError) as exc:  # pragma: no cover - the readers bound what they accept
        print(f"Error: trainfit ran out of {'memory' if isinstance(exc, MemoryError) else 'stack'} on this input. "
              "Pass a smaller file, and report it as a bug (the readers should have refused it).", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
