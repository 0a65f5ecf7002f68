"""Vision-language models in `trainfit solve`: the images of the data priced in every plan, configs that carry them."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from optimizer.cli import app
from optimizer.errors import ProblemError
from optimizer.memory import estimate
from optimizer.memory.precision import sample_image_tokens
from optimizer.schema import Moment
from optimizer.search.problem import load_problem
from optimizer.search.solve import solve_problem
from optimizer.search.space import build_instance
from tests.test_images import write_jpeg, write_png

VL3 = "Qwen/Qwen2.5-VL-3B-Instruct"
SEARCH = {"lora_rank": [8], "lora_target": ["all"], "cutoff_len": [512, 1024, 2048, 4096],
          "per_device_train_batch_size": [1, 2], "gradient_accumulation_steps": [1, 8],
          "gradient_checkpointing": [True, False], "enable_liger_kernel": [False]}


def _problem(tmp_path, model=VL3, images=True, **dataset):
    write_png(tmp_path / "a.png", 640, 480)
    write_jpeg(tmp_path / "b.jpg", 1920, 1080)
    rows = []
    for i in range(40):
        two = i % 4 == 0
        user = ("<image><image>" if two else "<image>") if images else ""
        user += "Compare them." if two else "What is shown?"
        row = {"messages": [{"role": "user", "content": user + " " + "word " * (20 + i)},
                            {"role": "assistant", "content": "An answer. " * (10 + 8 * i)}]}
        if images:
            row["images"] = ["a.png", "b.jpg"] if two else ["a.png"]
        rows.append(row)
    (tmp_path / "data.json").write_text(json.dumps(rows), encoding="utf-8")
    spec = {"name": "vl", "model": model, "gpu": "rtx-4090",
            "dataset": {"file": "data.json", "formatting": "openai", "tokenizer": "approx", **dataset},
            "search": SEARCH}
    path = tmp_path / "vl.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def test_the_data_files_images_are_priced_in_every_plan_of_the_front(tmp_path):
    problem, base = load_problem(_problem(tmp_path))
    inst = build_instance(problem, base, enumerate_settings=False)
    # the most images one sample holds; two 768^2 images take 2 x (27 x 27 + 2) = 1,462 tokens of cutoff_len
    assert inst.images_per_sample == 2
    need = sample_image_tokens(inst.arch, 2, 768 * 768, 32 * 32)
    assert need == 1462
    assert inst.domains["cutoff_len"] == [2048, 4096]
    assert any("cutoff_len 512, 1024 dropped" in n for n in inst.notes)
    # each sample's image tokens join its length: 30 samples of one 640x480 image (391 + 2 markers) and 10 of it and
    # a 1920x1080 one (777 + 2): 30 x 393 + 10 x 1,172 = 23,510 tokens more than the same text without images
    text_dir = tmp_path / "plain"
    text_dir.mkdir()
    text = build_instance(*load_problem(_problem(text_dir, images=False)), enumerate_settings=False)
    assert text.images_per_sample == 0 and 1024 in text.domains["cutoff_len"]
    assert sum(inst.lengths) - sum(text.lengths) == 23_510
    res = solve_problem(problem, base)
    assert res.front
    for s in res.front:
        assert (s.plan.images_per_sample, s.plan.image_max_pixels) == (2, 768 * 768)
        est = estimate(inst.arch, s.plan)
        assert est.device_peak_bytes == s.device_peak_bytes <= res.budget_bytes
        assert any(n.startswith("images: 2 per micro-batch") for n in est.notes)


def test_images_per_sample_from_the_problem_and_the_vision_forward_moment(tmp_path):
    problem, base = load_problem(_problem(tmp_path, images_per_sample=1, image_max_pixels=512 * 512))
    inst = build_instance(problem, base, enumerate_settings=False)
    assert inst.images_per_sample == 1 and inst.domains["cutoff_len"] == [512, 1024, 2048, 4096]
    res = solve_problem(problem, base)
    plan = res.front[0].plan
    assert (plan.images_per_sample, plan.image_max_pixels) == (1, 512 * 512)
    from optimizer.memory.step import step_moments

    assert Moment.VISION_FORWARD in [m.kind for m in step_moments(inst.arch, plan).moments]


def test_solve_writes_configs_that_load_the_images(tmp_path):
    path = _problem(tmp_path)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["solve", str(path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "note: images: 2 per sample (the most in one sample of the data)" in res.output
    first = sorted(out.glob("p01_*.yaml"))[0]
    cfg = yaml.safe_load(first.read_text(encoding="utf-8"))
    assert cfg["template"] == "qwen2_vl" and cfg["image_max_pixels"] == 768 * 768
    assert cfg["freeze_vision_tower"] is True and cfg["cutoff_len"] >= 2048
    info = json.loads((out / "dataset_info.json").read_text(encoding="utf-8"))
    assert info["train"]["columns"]["images"] == "images"


def test_what_is_not_modelled_is_one_clear_error(tmp_path):
    problem, base = load_problem(_problem(tmp_path))
    qlora = problem.search.model_copy(update={"finetuning_type": ["qlora4"]})
    only_qlora = problem.model_copy(update={"search": qlora})
    with pytest.raises(ProblemError, match=r"search.finetuning_type qlora4: none is modelled for Qwen/Qwen2.5-VL-3B-"
                                           r"Instruct: .*quantization_bit 4 with a vision-language model is not mod"):
        build_instance(only_qlora, base)
    text_model = problem.model_copy(update={"model": "Qwen/Qwen2.5-3B-Instruct", "dataset": problem.dataset.model_copy(
        update={"images_per_sample": 1})})
    with pytest.raises(ProblemError, match="images_per_sample 1: Qwen/Qwen2.5-3B-Instruct has no vision tower"):
        build_instance(text_model, base)
    text_only = problem.model_copy(update={"model": "Qwen/Qwen2.5-3B-Instruct"})
    with pytest.raises(ProblemError, match="samples have images but Qwen/Qwen2.5-3B-Instruct has no vision tower"):
        build_instance(text_only, base)
    packed = problem.model_copy(update={"dataset": problem.dataset.model_copy(update={"packing": True})})
    with pytest.raises(ProblemError, match="packing with images is not modelled yet"):
        build_instance(packed, base)
    tall = problem.model_copy(update={"search": problem.search.model_copy(update={"cutoff_len": [512, 1024]})})
    with pytest.raises(ProblemError, match="take 1462 tokens, more than every cutoff_len"):
        build_instance(tall, base)
    small = CliRunner().invoke(app, ["solve", str(_problem(tmp_path)), "--gpus", "rtx-5060-ti-16gb",
                                     "--out", str(tmp_path / "o")])
    assert small.exit_code != 0 and "Traceback" not in small.output
    assert "Relax: fewer or smaller images (dataset.images_per_sample, dataset.image_max_pixels" in small.output
    assert "qlora4" not in small.output
    bad = tmp_path / "bad.yaml"
    spec = yaml.safe_load((tmp_path / "vl.yaml").read_text(encoding="utf-8"))
    spec["dataset"]["image_max_pixels"] = 100
    bad.write_text(yaml.safe_dump(spec), encoding="utf-8")
    res = CliRunner().invoke(app, ["solve", str(bad), "--out", str(tmp_path / "o2")])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "image_max_pixels 100 is smaller than image_min_pixels 1024" in res.output
    assert not (tmp_path / "o2").exists()
