"""Image tokens of Qwen2.5-VL samples: header reading, LLaMA-Factory's resize, the processor's smart_resize."""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from optimizer.data.dataset import analyze_dataset
from optimizer.data.images import (
    ImageError,
    count_images,
    image_grid,
    image_size,
    image_tokens,
    regularized_size,
    smart_resize,
)
from optimizer.data.read import DatasetError
from optimizer.models.catalog import models

VISION = models()["Qwen/Qwen2.5-VL-3B-Instruct"].vision


def write_png(path, width, height):
    """A valid 1-bit grayscale PNG of width x height (all black), written without Pillow."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * height))
                     + chunk(b"IEND", b""))
    return path


def write_jpeg(path, width, height):
    """The header segments of a baseline JPEG (SOI, APP0 JFIF, DQT, SOF0, EOI): enough for a size reader."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    dqt = b"\xff\xdb" + struct.pack(">H", 67) + b"\x00" + bytes(range(1, 65))
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    path.write_bytes(b"\xff\xd8" + app0 + dqt + sof + b"\xff\xd9")
    return path


def test_header_sizes(tmp_path):
    assert image_size(write_png(tmp_path / "a.png", 640, 480)) == (640, 480)
    assert image_size(write_jpeg(tmp_path / "b.jpg", 1920, 1080)) == (1920, 1080)


def test_header_errors_are_one_line(tmp_path):
    with pytest.raises(ImageError, match=r"image '.*nope.png' does not exist. Fix the path"):
        image_size(tmp_path / "nope.png")
    (tmp_path / "x.gif").write_bytes(b"GIF89a" + b"\x00" * 20)
    with pytest.raises(ImageError, match="is not a PNG or JPEG file"):
        image_size(tmp_path / "x.gif")
    (tmp_path / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JF")
    with pytest.raises(ImageError, match="is not a PNG or JPEG file"):
        image_size(tmp_path / "cut.jpg")


def test_llamafactory_regularization_by_hand():
    # 1920x1080 > 768*768: factor sqrt(589824 / 2073600) = 8/15; int(1920 * 8/15) = 1024, int(1080 * 8/15) = 576
    assert regularized_size(1920, 1080) == (1024, 576)
    assert regularized_size(640, 480) == (640, 480)  # inside the bounds: unchanged
    assert regularized_size(20, 20) == (32, 32)  # 400 < 32*32: factor 1.6
    # 1000 < 1024 first (factor 1.0119: 10 x 101), then the side under 28 px is widened
    assert regularized_size(10, 100) == (28, 101)
    assert regularized_size(30000, 100, max_pixels=10**9) == (18000, 100)  # ratio 300 > 200: clipped to 180


def test_smart_resize_by_hand():
    # 640x480 at factor 28: round(480/28)=17 -> 476, round(640/28)=23 -> 644; 476*644 inside [3136, 12845056]
    assert smart_resize(480, 640, 28) == (476, 644)
    assert smart_resize(28, 28, 28) == (56, 56)  # 784 < 3136: beta 2, ceil
    # grid 34 x 46 patches, 391 text-side tokens (34*46/4)
    assert image_grid(640, 480, VISION) == (1, 34, 46)
    assert image_tokens(640, 480, VISION) == 391
    # 1920x1080 -> 1024x576 -> round(576/28)=21 -> 588, round(1024/28)=37 -> 1036: grid 42 x 74, 777 tokens
    assert image_grid(1920, 1080, VISION) == (1, 42, 74)
    assert image_tokens(1920, 1080, VISION) == 777


@pytest.mark.trace
def test_smart_resize_equals_transformers():
    # the module imports torchvision (not a trainfit dependency): run transformers' own smart_resize source alone
    import ast
    import importlib.util
    import math
    from pathlib import Path

    spec = importlib.util.find_spec("transformers")
    if spec is None:
        pytest.skip("transformers is not installed")
    src = (Path(spec.origin).parent / "models/qwen2_vl/image_processing_qwen2_vl.py").read_text()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "smart_resize")
    ns: dict = {"math": math}
    exec(compile(ast.Module([fn], []), "smart_resize", "exec"), ns)

    class qwen:
        smart_resize = staticmethod(ns["smart_resize"])

    for h in (28, 57, 100, 333, 480, 1000, 2048, 4000):
        for w in (28, 90, 640, 1080, 3001, 5000):
            for lo, hi in ((3136, 12845056), (3136, 768 * 768), (256 * 28 * 28, 1280 * 28 * 28)):
                assert smart_resize(h, w, 28, lo, hi) == qwen.smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def _sharegpt(tmp_path, rows):
    path = tmp_path / "vl.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def test_count_images_per_sample(tmp_path):
    write_png(tmp_path / "a.png", 640, 480)
    write_jpeg(tmp_path / "b.jpg", 1920, 1080)
    rows = [
        {"messages": [{"role": "user", "content": "<image>What is this?"}, {"role": "assistant", "content": "A cat."}],
         "images": ["a.png"]},
        {"messages": [{"role": "user", "content": "<image><image>Compare."}, {"role": "assistant", "content": "Same."}],
         "images": ["a.png", "b.jpg"]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]
    path = _sharegpt(tmp_path, rows)
    per = count_images(path, VISION)
    assert [[i.tokens for i in s] for s in per][0] == [391 + 2]
    assert len(per[1]) == 2 and per[2] == ()
    assert per[1][1].patches == 4 * (per[1][1].tokens - 2)
    smaller = count_images(path, VISION, max_pixels=256 * 256)
    assert smaller[0][0].tokens < per[0][0].tokens
    # the text count leaves the placeholders out: with and without "<image>" the text tokens agree
    text = analyze_dataset(path, model="Qwen/Qwen2.5-VL-3B-Instruct", model_type="qwen2_5_vl", cache=False)
    plain = [dict(r, messages=[dict(m, content=m["content"].replace("<image>", "")) for m in r["messages"]])
             for r in rows]
    (tmp_path / "plain").mkdir()
    plain_path = _sharegpt(tmp_path / "plain", plain)
    ref = analyze_dataset(plain_path, model="Qwen/Qwen2.5-VL-3B-Instruct", model_type="qwen2_5_vl", cache=False)
    assert [s.total for s in text.samples] == [s.total for s in ref.samples]


def test_count_images_errors(tmp_path):
    write_png(tmp_path / "a.png", 64, 64)
    rows = [{"messages": [{"role": "user", "content": "no placeholder"}, {"role": "assistant", "content": "x"}],
             "images": ["a.png"]}]
    with pytest.raises(DatasetError, match=r"sample 1: 1 image\(s\) but 0 <image> placeholder\(s\)"):
        count_images(_sharegpt(tmp_path, rows), VISION)
    rows[0]["messages"][0]["content"] = "<image>x"
    rows[0]["images"] = ["missing.png"]
    with pytest.raises(ImageError, match="sample 1: image 'missing.png' does not exist"):
        count_images(_sharegpt(tmp_path, rows), VISION)
    with pytest.raises(DatasetError, match="image_max_pixels 10 is smaller than image_min_pixels 1024"):
        count_images(_sharegpt(tmp_path, rows), VISION, max_pixels=10)


def test_cli_data_reports_text_and_image_tokens(tmp_path):
    from typer.testing import CliRunner

    from optimizer.cli import app

    write_png(tmp_path / "a.png", 640, 480)
    write_jpeg(tmp_path / "b.jpg", 1920, 1080)
    rows = [
        {"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A cat."}],
         "images": ["a.png"]},
        {"messages": [{"role": "user", "content": "<image><image>Compare."}, {"role": "assistant", "content": "x"}],
         "images": ["a.png", "b.jpg"]},
    ]
    path = str(_sharegpt(tmp_path, rows))
    res = CliRunner().invoke(app, ["data", path, "--model", "Qwen/Qwen2.5-VL-3B-Instruct", "--cutoff-len", "1024"])
    assert res.exit_code == 0, res.output
    assert "template qwen2_vl" in res.output
    # 640x480: 391 + 2 markers; 1920x1080: 777 + 2 (see test_smart_resize_by_hand)
    assert "images: 2 of 2 samples, 3 images, 1,565 image tokens" in res.output
    lines = {ln.split()[0]: ln.split() for ln in res.output.splitlines() if ln.strip()[:1].isdigit()}
    assert lines["1"][2:4] == ["1", "393"] and lines["2"][2:4] == ["2", "1172"]
    assert "over by" in res.output
    bad = CliRunner().invoke(app, ["data", path, "--model", "Qwen/Qwen2.5-3B-Instruct"])
    assert bad.exit_code == 1
    assert "samples have images but model 'Qwen/Qwen2.5-3B-Instruct' has no vision tower" in bad.output
    (tmp_path / "a.png").unlink()
    gone = CliRunner().invoke(app, ["data", path, "--model", "Qwen/Qwen2.5-VL-3B-Instruct"])
    assert gone.exit_code == 1 and "Traceback" not in gone.output
    assert gone.output.count("\n") == 1 and "image 'a.png' does not exist" in gone.output


def test_estimate_vlm_adds_the_frozen_vision_tower_and_refuses_what_is_not_modelled():
    from optimizer.errors import ConfigError
    from optimizer.memory.step import estimate
    from optimizer.models.arch import vision_param_counts
    from optimizer.schema import Plan

    vl, text = models()["Qwen/Qwen2.5-VL-3B-Instruct"], models()["Qwen/Qwen2.5-3B-Instruct"]
    plan = Plan(bf16=True, per_device_train_batch_size=2, cutoff_len=2048)
    a, b = estimate(vl, plan), estimate(text, plan)
    # LoRA `all` skips visual.*: the trainable count is the text model's (PEFT's 14,966,784 for r 8, 36 layers)
    assert a.trainable_params == b.trainable_params == 14_966_784
    assert a.all_params == 3_754_622_976 + 14_966_784
    term = next(t for ph in a.phases for t in ph.terms if t.name == "weights_vision_tower")
    # bf16: 2 bytes per parameter, each of the 422 tensors rounded up to the allocator's 512-byte blocks
    assert 2 * vision_param_counts(vl.vision).total <= term.bytes < 2 * vision_param_counts(vl.vision).total + 422 * 512
    assert a.peak_allocated_bytes - b.peak_allocated_bytes == term.bytes
    for bad, msg in ((dict(quantization_bit=4), "quantization_bit 4 with a vision-language model is not modelled"),
                     (dict(finetuning_type="full"), "finetuning_type full of a vision-language model")):
        with pytest.raises(ConfigError, match=msg):
            estimate(vl, plan.model_copy(update=bad))


def test_vl_config_emits_the_modelled_vision_keys_and_reads_back():
    import yaml

    from optimizer.llamafactory.read import plan_from_dict
    from optimizer.llamafactory.write import dataset_info_entry, render_config
    from optimizer.schema import Plan

    plan = Plan(bf16=True, per_device_train_batch_size=2, cutoff_len=1024)
    text = render_config(plan, model_name_or_path="Qwen/Qwen2.5-VL-3B-Instruct", template="qwen2_vl", dataset="d",
                         dataset_dir="data", output_dir="out", header=[])
    cfg = yaml.safe_load(text)
    assert (cfg["template"], cfg["image_max_pixels"], cfg["image_min_pixels"]) == ("qwen2_vl", 768 * 768, 32 * 32)
    assert cfg["freeze_vision_tower"] is True and cfg["freeze_multi_modal_projector"] is True
    # every key is a LLaMA-Factory 0.9.5 argument (keys.yaml); the writer spells out lora_alpha = 2 r
    assert plan_from_dict(cfg)[0] == plan.model_copy(update={"lora_alpha": 16})
    text_only = yaml.safe_load(render_config(plan, model_name_or_path="Qwen/Qwen2.5-3B-Instruct", template="qwen",
                                             dataset="d", dataset_dir="data", output_dir="out", header=[]))
    assert "image_max_pixels" not in text_only and "freeze_vision_tower" not in text_only
    # a trained vision tower is refused, not mis-modelled
    with pytest.raises(Exception, match="freeze_vision_tower: False changes memory in ways trainfit does not model"):
        plan_from_dict({**cfg, "freeze_vision_tower": False})
    with pytest.raises(Exception, match="freeze_multi_modal_projector: 'false' changes memory"):
        plan_from_dict({**cfg, "freeze_multi_modal_projector": "false"})
    # dataset_info.json names the images column when the records have one (LLaMA-Factory's mllm_demo entry)
    assert dataset_info_entry("vl.json", "openai", {"messages", "images"})["columns"] == {
        "messages": "messages", "images": "images"}
    assert dataset_info_entry("vl.json", "sharegpt", {"conversations", "images"})["columns"]["images"] == "images"
    assert "images" not in dataset_info_entry("t.json", "sharegpt", {"conversations"})["columns"]
