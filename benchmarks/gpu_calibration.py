"""Measure allocated / reserved / device peaks and step times on a real GPU for a grid of ~20 configs.

    python benchmarks/gpu_calibration.py [--gpu CATALOG_ID] [--out FILE] [--log calibration.jsonl]
    python benchmarks/gpu_calibration.py --dry-run      # on the CPU: tiny shapes, 1 step each, checks the script

The grid: LoRA / QLoRA (NF4) / full, gradient checkpointing on/off, sdpa/eager, on three catalog architectures
(Qwen2.5-0.5B, Llama-3.2-1B, Qwen3-1.7B) at reduced depth, random weights (optimizer.trace builds the model from the
catalog config.json shape; nothing is downloaded). Each config runs 3 real training steps (optimizer.trace's
TrainerStep: LLaMA-Factory's step, the same code `trainfit trace --device cuda` runs); the third is measured:
torch.cuda.max_memory_allocated / max_memory_reserved, device memory (torch.cuda.mem_get_info used, which
includes the CUDA context and any other process), and the step's wall time with synchronizes around it.
Next to each measurement: trainfit's prediction (memory.estimate, search.perf's step time for --gpu).
Budget: about 5-8 minutes on a recent datacenter GPU (each config builds its model once; the cache is
emptied between configs so that reserved memory starts from zero).
Writes benchmarks/results/gpu_calibration_<gpu>.json (gpu = the device name, lower-case, dashes).
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from optimizer.memory import estimate, large_blocks_at  # noqa: E402
from optimizer.models import catalog  # noqa: E402
from optimizer.models.arch import arch_from_config  # noqa: E402
from optimizer.schema import Plan  # noqa: E402

MODELS = {  # catalog id -> decoder layers run (reduced depth keeps each config to seconds)
    "Qwen/Qwen2.5-0.5B-Instruct": 8,
    "meta-llama/Llama-3.2-1B-Instruct": 4,
    "Qwen/Qwen3-1.7B": 4,
}
# (finetuning, gradient checkpointing, attention) per model, plus two longer/bigger batches on the first
VARIANTS = [("lora", True, "sdpa"), ("lora", False, "sdpa"), ("lora", True, "disabled"),
            ("qlora4", True, "sdpa"), ("qlora4", False, "sdpa"), ("full", True, "sdpa")]
EXTRA = [("Qwen/Qwen2.5-0.5B-Instruct", "lora", True, "sdpa", 4, 2048),
         ("Qwen/Qwen2.5-0.5B-Instruct", "full", False, "sdpa", 2, 2048)]
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "vocab_size": 512}


def grid(dry_run: bool) -> list[dict]:
    rows = []
    for model in MODELS:
        for ft, gc_on, attn in VARIANTS:
            rows.append({"model": model, "ft": ft, "gc": gc_on, "attn": attn, "batch": 2, "cutoff": 1024})
    for model, ft, gc_on, attn, b, c in EXTRA:
        rows.append({"model": model, "ft": ft, "gc": gc_on, "attn": attn, "batch": b, "cutoff": c})
    if dry_run:
        for r in rows:
            r.update(batch=1, cutoff=32)
    return rows


def plan_for(row: dict, cuda: bool) -> Plan:
    ft = "full" if row["ft"] == "full" else "lora"
    return Plan(finetuning_type=ft, quantization_bit=4 if row["ft"] == "qlora4" else None, lora_rank=16,
                lora_target="all", cutoff_len=row["cutoff"], per_device_train_batch_size=row["batch"],
                disable_gradient_checkpointing=not row["gc"], flash_attn=row["attn"], bf16=cuda,
                optim="adamw_torch", upcast_layernorm=row["ft"] == "qlora4")


def config_for(row: dict, dry_run: bool) -> dict:
    cfg = dict(catalog.resolve_config(row["model"]))
    cfg["num_hidden_layers"] = 1 if dry_run else MODELS[row["model"]]
    if dry_run:
        cfg.update(TINY)
    return cfg


def measure(row: dict, device, dry_run: bool, steps: int) -> dict:
    import torch

    from optimizer.trace.build import build_model
    from optimizer.trace.cuda import CudaProbe, materialize_real
    from optimizer.trace.patches import quiet_library_warnings
    from optimizer.trace.trainer import TrainerStep

    cuda = device.type == "cuda"
    plan = plan_for(row, cuda)
    cfg = config_for(row, dry_run)
    with quiet_library_warnings():
        built = build_model(cfg, plan, layers=cfg["num_hidden_layers"])
        materialize_real(built, plan, device)
    probe = CudaProbe(device)
    trainer = TrainerStep(built, plan, probe, device, real_scaler=True)
    times = []
    try:
        for i in range(1, steps + 1):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            stats = trainer.step(i)
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    finally:
        trainer.close()
    out = {"peak_allocated_bytes": stats.peak_bytes if cuda else None,
           "peak_reserved_bytes": probe.peak_reserved if cuda else None,
           "device_used_bytes": probe.device_used if cuda else None,
           "step_s": times[-1], "step_times_s": times}
    del trainer, built, probe
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def predicted(row: dict, gpu, dry_run: bool) -> dict:
    from optimizer.train.run import predicted_step_s

    cfg = config_for(row, dry_run)
    plan = plan_for(row, gpu is not None and not dry_run)
    arch = arch_from_config(cfg, row["model"])
    est = estimate(arch, plan)
    kind = {"loss": "loss", "optimizer": "optimizer"}.get(
        est.peak_phase, next(p.moment for p in est.phases if p.phase == est.peak_phase))
    seq = -(-plan.cutoff_len // 8) * 8
    return {"peak_allocated_bytes": est.peak_allocated_bytes, "peak_reserved_bytes": est.peak_reserved_bytes,
            "device_peak_bytes": est.device_peak_bytes, "large_blocks_bytes": large_blocks_at(arch, plan, kind),
            "step_s": predicted_step_s(arch, plan, gpu, seq) if gpu is not None else None}, plan


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", help="catalog GPU id for the predictions (default: matched from the device name)")
    ap.add_argument("--out", help="output JSON (default benchmarks/results/gpu_calibration_<gpu>.json)")
    ap.add_argument("--log", help="also append the runs to this calibration log (for `trainfit calibrate`)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, 1 step each: checks the script")
    ap.add_argument("--limit", type=int, default=0, help="run only the first N configs")
    args = ap.parse_args()

    import torch

    from optimizer.train.record import Measured, Predicted, Record, append_record, config_hash, versions

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("Error: no CUDA device. Run on a GPU, or pass --dry-run to check the script on the CPU.", file=sys.stderr)
        return 1
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    gpu = catalog.get_gpu(args.gpu) if args.gpu else None
    if gpu is None and cuda:
        from optimizer.train.run import detect_gpu

        gpu = detect_gpu()[0]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if args.out:
        out = Path(args.out)
    elif args.dry_run:  # a check of the script, not a result: kept out of the repository
        import tempfile

        out = Path(tempfile.gettempdir()) / "gpu_calibration_dry_run.json"
    else:
        out = ROOT / "benchmarks" / "results" / f"gpu_calibration_{slug}.json"
    rows = grid(args.dry_run)[: args.limit or None]
    steps = 1 if args.dry_run else 3
    t_start = time.perf_counter()
    results, records = [], []
    for i, row in enumerate(rows, 1):
        if row["ft"] == "qlora4" and not cuda:
            results.append({**row, "skipped": "bitsandbytes NF4 training needs CUDA"})
            print(f"[{i}/{len(rows)}] {row['model']} {row['ft']}: skipped on the CPU", flush=True)
            continue
        pred, plan = predicted(row, gpu, args.dry_run)
        try:
            meas = measure(row, device, args.dry_run, steps)
        except torch.cuda.OutOfMemoryError as exc:  # a grid point too big for this card: keep the rest
            gc.collect()
            torch.cuda.empty_cache()
            results.append({**row, "error": f"out of memory: {str(exc).splitlines()[0]}"})
            continue
        results.append({**row, "layers": config_for(row, args.dry_run)["num_hidden_layers"], "predicted": pred,
                        "measured": meas})
        a, r, d = meas["peak_allocated_bytes"], meas["peak_reserved_bytes"], meas["device_used_bytes"]
        print(f"[{i}/{len(rows)}] {row['model']} {row['ft']} gc={row['gc']} {row['attn']} b{row['batch']} "
              f"c{row['cutoff']}: allocated {a} (pred {pred['peak_allocated_bytes']}), reserved {r}, device {d}, "
              f"step {meas['step_s']:.3f} s", flush=True)
        records.append(Record(
            schema="trainfit.calibration/1", time=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            config=f"benchmarks/gpu_calibration.py:{i}", config_hash=config_hash(row), model=row["model"],
            gpu=gpu.id if gpu else None, device_name=name, versions=versions(), plan=plan.model_dump(mode="json"),
            steps=steps, predicted=Predicted(**pred),
            measured=Measured(peak_allocated_bytes=a, peak_reserved_bytes=r, device_peak_bytes=d,
                              step_s=meas["step_s"], tokens_per_s=row["batch"] * row["cutoff"] / meas["step_s"],
                              loss=None)))
    payload = {"device": name, "gpu": gpu.id if gpu else None, "dry_run": args.dry_run, "versions": versions(),
               "wall_s": round(time.perf_counter() - t_start, 1), "steps_per_config": steps,
               "device_note": "device_used_bytes is torch.cuda.mem_get_info used: CUDA context and other processes "
                              "included", "results": results,
               "records": [json.loads(r.line()) for r in records]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    if args.log:
        for r in records:
            append_record(r, args.log)
    print(f"wrote {out} ({len(results)} configs, {payload['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
