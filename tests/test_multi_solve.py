"""Problems with a cluster: validation, the merged front (CP-SAT = brute force), emitted launch files, and the
committed configs of the shipped multi-GPU problems are current."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from optimizer.errors import ProblemError
from optimizer.llamafactory.configs import config_files
from optimizer.llamafactory.write import accepted_keys
from optimizer.search.problem import Problem, load_problem
from optimizer.search.solve import solve_problem

SHIPPED = ["problems/qwen2.5-7b-full-4x4090.yaml", "problems/llama3.1-70b-2x4090.yaml"]


def _problem(tmp_path, cluster: dict) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({
        "name": "t", "model": "Qwen/Qwen2.5-7B-Instruct", "gpu": "rtx-4090", "cluster": cluster,
        "dataset": {"summary": {"num_samples": 500, "token_length_percentiles": {50: 400, 100: 1024}}},
        "search": {"finetuning_type": ["full"], "cutoff_len": [512], "per_device_train_batch_size": [1, 2],
                   "gradient_accumulation_steps": [1, 4], "optim": ["adamw_torch_fused"],
                   "enable_liger_kernel": [False], "gradient_checkpointing": [True]},
    }))
    return p


@pytest.mark.parametrize("cluster, needle", [
    ({"count": 0}, "cluster.count: Input should be greater than or equal to 1"),
    ({"count": 2, "offload": ["params"], "engines": ["zero3"]}, "offload needs host_ram_gib"),
    ({"count": 2, "engines": ["megatron"]}, "is not something LLaMA-Factory launches"),
])
def test_cluster_validation_errors(tmp_path, cluster, needle):
    with pytest.raises(ProblemError) as exc:
        load_problem(_problem(tmp_path, cluster))
    assert needle in str(exc.value)


def test_single_gpu_problem_has_no_cluster_fields():
    problem, base = load_problem("problems/qwen2.5-7b-rtx3060-12gb.yaml")
    dump = solve_problem(problem, base).model_dump(mode="json")
    assert "engine" not in dump["front"][0] and "num_gpus" not in dump["front"][0]


def test_cluster_front_cpsat_equals_brute_and_uses_several_gpus(tmp_path):
    problem, base = load_problem(_problem(tmp_path, {"count": 4, "engines": ["ddp", "zero3", "fsdp2"]}))
    a, b = solve_problem(problem, base, "cpsat"), solve_problem(problem, base, "brute")
    assert [(s.quality, s.time_s) for s in a.front] == [(s.quality, s.time_s) for s in b.front]
    # full fine-tuning of 7B does not fit one 24 GB card: every point shards over several GPUs
    assert a.front and all(s.num_gpus > 1 and s.engine in ("zero3", "fsdp2") for s in a.front)
    for s in a.front:
        assert s.device_peak_bytes <= a.budget_bytes
        # global batch: the optimizer steps are per rank (ceil(500 / N) samples)
        per_rank = math.ceil(500 / s.num_gpus)
        micro = math.ceil(per_rank / s.per_device_train_batch_size)
        assert s.optimizer_steps == math.ceil(s.num_train_epochs * math.ceil(micro / s.gradient_accumulation_steps))


def test_fewest_gpus_recommends_no_more_gpus_than_balanced(tmp_path):
    path = _problem(tmp_path, {"count": 4, "engines": ["zero3", "fsdp2"]})
    data = yaml.safe_load(path.read_text())
    data["objective"] = {"prefer": "fewest_gpus"}
    problem = Problem(**data)
    fewest = solve_problem(problem, tmp_path)
    balanced = solve_problem(problem.model_copy(update={"objective": problem.objective.model_copy(
        update={"prefer": "balanced"})}), tmp_path)
    assert fewest.front[fewest.recommended].num_gpus <= balanced.front[balanced.recommended].num_gpus
    assert fewest.why.startswith("fewest_gpus")


@pytest.mark.parametrize("ref", SHIPPED)
def test_committed_multi_gpu_configs_are_current(ref):
    problem, base = load_problem(ref)
    out = f"configs/{problem.name}"
    result = solve_problem(problem, base)
    assert len(result.front) >= 2 and all(s.num_gpus > 1 for s in result.front)
    files = config_files(result, problem, ref, out, "all", None)
    committed = {p.name: p.read_text(encoding="utf-8") for p in Path(out).iterdir()}
    assert set(committed) == set(files), f"run: trainfit solve {ref}"
    for name, text in files.items():
        assert committed[name] == text, f"{out}/{name} is stale: run `trainfit solve {ref}`"
    known = accepted_keys()
    for name, text in files.items():
        if name.endswith(".yaml") and name.startswith("p"):
            data = yaml.safe_load(text)
            assert set(data) <= known, set(data) - known
            assert "FORCE_TORCHRUN=1" in text or "accelerate launch" in text
            if "deepspeed" in data:
                assert Path(data["deepspeed"]).name in files


def test_batch_gpus_take_a_count():
    """`--gpus rtx-4090x2`: the problem solved on up to two RTX 4090s (a cluster), named so in the matrix."""
    from typer.testing import CliRunner

    from optimizer.cli import app
    from optimizer.search.batch import gpu_spec

    assert gpu_spec("rtx-4090x2") == ("rtx-4090", 2) and gpu_spec("a100-80gb") == ("a100-80gb", None)
    res = CliRunner().invoke(app, ["solve", "problems/qwen2.5-7b-rtx3060-12gb.yaml", "--models",
                                   "Qwen/Qwen2.5-7B-Instruct", "--gpus", "rtx-3060-12gb,rtx-4090x2", "--no-write",
                                   "--jobs", "1"])
    assert res.exit_code == 0, res.output
    header = [ln for ln in res.output.splitlines() if ln.startswith("model")][0]
    assert "rtx-4090x2" in header and "rtx-3060-12gb" in header
    bad = CliRunner().invoke(app, ["solve", "problems/qwen2.5-7b-rtx3060-12gb.yaml", "--gpus", "rtx-40900x2"])
    assert bad.exit_code == 1 and "unknown GPU 'rtx-40900'" in bad.output


def test_review_fixes_cluster_edges(tmp_path):
    """No GPU count to search, host RAM that rules everything out, NaN host RAM, and --report on a multi-GPU front:
    each one clear line (found by a review)."""
    from typer.testing import CliRunner

    from optimizer.cli import app

    base = ("name: c1\nmodel: Qwen/Qwen2.5-7B-Instruct\ngpu: rtx-4090\n"
            "dataset: {summary: {num_samples: 100, token_length_percentiles: {50: 100, 100: 200}}}\n"
            "search: {finetuning_type: [full], cutoff_len: [512], per_device_train_batch_size: [1], "
            "gradient_accumulation_steps: [1]}\n")
    run = CliRunner().invoke
    f = tmp_path / "p.yaml"
    f.write_text(base + "cluster: {count: 6, nodes: 3, gpu_counts: powers_of_two}\n")
    res = run(app, ["solve", str(f), "--no-write"])
    assert res.exit_code == 1 and "no GPU count to search" in res.output
    f.write_text(base + "cluster: {count: 2, host_ram_gib: 0.5, offload: [none, optimizer]}\n")
    res = run(app, ["solve", str(f), "--no-write"])
    assert res.exit_code == 1 and "Host RAM per node (0.5 GiB) also ruled plans out" in res.output
    assert "4294967296" not in res.output
    res = run(app, ["estimate", "--config", "configs/reference-case/balanced.yaml", "--num-gpus", "2", "--engine",
                    "zero3", "--host-ram-gib", "nan"])
    assert res.exit_code == 1 and "not a finite, non-negative number" in res.output
    res = run(app, ["solve", "problems/llama3.1-70b-2x4090.yaml", "--no-write", "--report", str(tmp_path / "r.html")])
    assert res.exit_code == 1 and "--report covers one GPU for now" in res.output
    assert not (tmp_path / "r.html").exists()
