"""Emitted configs: the committed reference configs are current; every shipped config reads back and fits."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from optimizer.check import check
from optimizer.cli import app
from optimizer.llamafactory.configs import config_files
from optimizer.llamafactory.read import plan_from_dict
from optimizer.models.catalog import get_gpu, resolve_arch
from optimizer.search.problem import load_problem
from optimizer.search.solve import solve_problem

REF = "problems/qwen2.5-3b-rtx5060ti-16gb.yaml"
OUT = "configs/qwen2.5-3b-rtx5060ti-16gb"
runner = CliRunner()


@pytest.fixture(scope="module")
def regenerated() -> dict[str, str]:
    problem, base = load_problem(REF)
    result = solve_problem(problem, base)
    return config_files(result, problem, REF, OUT, "all", "problems/data/triz_synthetic.json")


def test_committed_reference_configs_are_current(regenerated):
    committed = {p.name: p.read_text(encoding="utf-8") for p in Path(OUT).iterdir()}
    assert set(committed) == set(regenerated), "run: trainfit solve " + REF
    for name, text in regenerated.items():
        assert committed[name] == text, f"{OUT}/{name} is stale: run `trainfit solve {REF}`"


def test_every_emitted_config_reads_back_and_fits_its_gpu():
    gpu = get_gpu("rtx-5060-ti-16gb")
    for path in sorted(Path(OUT).glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        plan, model = plan_from_dict(data, str(path))
        rep = check(data, plan, resolve_arch(model), gpu, margin=0.10, config_path=str(path))
        assert rep.verdict == "fits", path
        assert data["per_device_eval_batch_size"] == plan.per_device_train_batch_size
        assert Path(data["dataset_dir"], "dataset_info.json").is_file()
        assert path.read_text().startswith("# trainfit")


def test_solve_rewrites_nothing_when_current_and_refuses_other_content(tmp_path):
    res = runner.invoke(app, ["solve", REF, "--out", str(tmp_path / "c"), "--pick", "balanced"])
    assert res.exit_code == 0, res.output
    again = runner.invoke(app, ["solve", REF, "--out", str(tmp_path / "c"), "--pick", "balanced"])
    assert again.exit_code == 0
    target = next((tmp_path / "c").glob("p*.yaml"))
    target.write_text("edited\n")
    res = runner.invoke(app, ["solve", REF, "--out", str(tmp_path / "c"), "--pick", "balanced"])
    assert res.exit_code == 1
    assert "exist with other content" in res.output and "--force" in res.output
    assert target.read_text() == "edited\n"
    forced = runner.invoke(app, ["solve", REF, "--out", str(tmp_path / "c"), "--pick", "balanced", "--force"])
    assert forced.exit_code == 0
    assert target.read_text() != "edited\n"


def test_solve_json_and_brute(tmp_path):
    import json

    problem = "problems/qwen2.5-7b-rtx3060-12gb.yaml"
    a = json.loads(runner.invoke(app, ["solve", problem, "--json", "--no-write"]).output)
    b = json.loads(runner.invoke(app, ["solve", "problems/qwen2.5-7b-rtx3060-12gb.yaml", "--json", "--no-write",
                                       "--solver", "brute"]).output)
    def vectors(r):
        return [(s["quality"], s["time_s"], s["plan"]) for s in r["front"]]

    assert vectors(a) == vectors(b)
    assert a["proven_optimal"] is True


def test_batch_models_by_gpus_prints_a_matrix(tmp_path):
    res = runner.invoke(app, ["solve", "problems/qwen2.5-7b-rtx3060-12gb.yaml", "--models",
                              "Qwen/Qwen2.5-0.5B-Instruct,Qwen/Qwen2.5-7B-Instruct", "--gpus", "rtx-3060-12gb,t4",
                              "--out", str(tmp_path), "--jobs", "2"])
    assert res.exit_code == 0, res.output
    assert "Qwen/Qwen2.5-0.5B-Instruct" in res.output and "t4" in res.output
    assert len(list(tmp_path.glob("*/p*.yaml"))) == 4


def test_infeasible_solve_exits_1_with_the_smallest_peak(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("name: x\nmodel: Qwen/Qwen2.5-72B-Instruct\ngpu: t4\n"
                 "dataset: {summary: {num_samples: 10, token_length_percentiles: {50: 100, 100: 200}}}\n")
    res = runner.invoke(app, ["solve", str(f), "--no-write"])
    assert res.exit_code == 1
    assert res.output.startswith("Error: no plan of the search space fits ")
    assert "the smallest device peak is " in res.output and "Relax:" in res.output


@pytest.mark.parametrize("pick", ["best-quality", "fastest", "balanced", "all"])
def test_one_point_front_writes_a_config_for_every_pick(pick):
    from optimizer.search.problem import DatasetSpec, DatasetSummary, Problem, SearchSpace

    space = SearchSpace(finetuning_type=["lora"], lora_rank=[8], lora_target=["all"], cutoff_len=[512],
                        per_device_train_batch_size=[1], gradient_accumulation_steps=[4], gradient_checkpointing=[True],
                        optim=["adamw_torch_fused"], enable_liger_kernel=[False])
    data = DatasetSpec(summary=DatasetSummary(num_samples=200, token_length_percentiles={50: 300, 100: 800}))
    problem = Problem(name="one", model="Qwen/Qwen2.5-0.5B-Instruct", gpu="rtx-3060-12gb", dataset=data, search=space)
    result = solve_problem(problem)
    assert len(result.front) == 1
    assert result.front[0].labels == ["best-quality", "fastest", "balanced"]
    files = config_files(result, problem, "p.yaml", "out", pick, None)
    assert sorted(files) == ["dataset_info.json", "p01_lora_r8_all_c512_b1x4.yaml"]


def test_a_search_space_past_the_context_window_is_rejected(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("name: x\nmodel: Qwen/Qwen2.5-0.5B-Instruct\ngpu: t4\n"
                 "dataset: {summary: {num_samples: 10, token_length_percentiles: {50: 100, 100: 200}}}\n"
                 "search: {cutoff_len: [512, 65536]}\n")
    res = runner.invoke(app, ["solve", str(f), "--no-write"])
    assert res.exit_code == 1
    # Qwen2.5-0.5B-Instruct's config.json: max_position_embeddings 32768
    assert res.output.startswith("Error: search.cutoff_len: cutoff_len 65536 exceeds the model's context window "
                                 "(max_position_embeddings 32768)")
    assert res.output.rstrip().endswith("Remove 65536 from search.cutoff_len.")
