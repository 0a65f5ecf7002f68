"""packing / neat_packing and sdpa's padded-batch mask: the mask rule, the knapsack row count, the memory terms,
the LLaMA-Factory keys and the search's time model."""

from __future__ import annotations

import bisect
import random

import pytest
from typer.testing import CliRunner

from optimizer.cli import app
from optimizer.data.dataset import SampleTokens, greedy_knapsack_count, packed_rows
from optimizer.errors import ConfigError
from optimizer.llamafactory.read import accepted_keys, plan_from_dict
from optimizer.llamafactory.write import render_config
from optimizer.memory import estimate
from optimizer.memory.precision import attention_mask_kind
from optimizer.models.catalog import resolve_arch
from optimizer.schema import Plan
from optimizer.search.objectives import point_time
from optimizer.search.problem import DatasetSpec, DatasetSummary, Problem, SearchSpace
from optimizer.search.space import build_instance

Q05 = "Qwen/Qwen2.5-0.5B-Instruct"  # GQA: 14 query heads, 2 key/value heads


def _plan(**kw) -> Plan:
    return Plan(**{"bf16": True, "per_device_train_batch_size": 2, "cutoff_len": 1024, **kw})


@pytest.mark.parametrize("kw,attn,kind", [
    ({}, "sdpa", "bool"),  # any batch can hold a pad token (pad_to_multiple_of=8, even one sample)
    ({"packing": True}, "sdpa", "none"),  # rows of exactly cutoff_len, an all-ones mask
    ({"packing": True, "cutoff_len": 1020}, "sdpa", "bool"),  # the collator pads 1020 to 1024 with mask 0
    ({"neat_packing": True}, "sdpa", "float"),
    ({}, "eager", "none"),  # eager builds its own mask (head.py)
    ({"neat_packing": True}, "eager", "float"),
    ({"flash_attn": "fa2"}, "sdpa", "none"),
    ({"flash_attn": "fa2", "neat_packing": True, "per_device_train_batch_size": 1}, "sdpa", "none"),
])
def test_which_mask_sdpa_gets(kw, attn, kind):
    assert attention_mask_kind(_plan(**kw), attn) == kind


def test_packing_rules_are_enforced():
    with pytest.raises(ValueError, match="stage sft only"):
        Plan(stage="dpo", packing=True)
    with pytest.raises(ValueError, match="bsz|per_device_train_batch_size 1"):
        Plan(neat_packing=True, flash_attn="fa2", per_device_train_batch_size=2)
    assert Plan(neat_packing=True).packed and not Plan(packing=False).packed


def _knapsacks_by_the_book(numbers: list[int], capacity: int) -> int:
    """LLaMA-Factory's greedy packing written out as its docstring states it: sort, then fill each knapsack with the
    largest remaining number that fits, until none does."""
    numbers = sorted(numbers)
    count = 0
    while numbers:
        room, took = capacity, False
        while True:
            i = bisect.bisect(numbers, room) - 1
            if i < 0:
                break
            room -= numbers.pop(i)
            took = True
        count += 1
        if not took:
            break
    return count


def test_knapsack_count():
    # by hand: [5, 5] then [4, 3, 2, 1]
    assert greedy_knapsack_count([5, 5, 4, 3, 2, 1], 10) == 2
    rng = random.Random(7)
    for _ in range(200):
        cap = rng.randint(8, 400)
        xs = [rng.randint(1, cap) for _ in range(rng.randint(1, 150))]
        assert greedy_knapsack_count(xs, cap) == _knapsacks_by_the_book(xs, cap)


def test_packed_rows_truncate_at_cutoff_minus_one():
    # packing lowers cutoff_len by 1 (LLaMA-Factory data_args.py): capacity 10 at cutoff_len 11
    samples = [SampleTokens(((2, 3),)), SampleTokens(((1, 4),)), SampleTokens(((3, 1),)), SampleTokens(((2, 1),))]
    assert packed_rows(samples, 11) == 2  # 5 + 5 | 4 + 3
    assert packed_rows(samples, 10) == 2  # capacity 9: 5 + 4 | 5 + 3
    long = [SampleTokens(((20, 20),))] * 3  # each truncated to a full row of 10
    assert packed_rows(long, 11) == 3


def _term(est, phase: str, name: str) -> int:
    p = next(p for p in est.phases if p.phase == phase)
    return sum(t.bytes for t in p.terms if t.name == name)


def test_mask_terms_and_their_lifetimes():
    arch = resolve_arch(Q05)
    b, s = 2, 1024
    padded = estimate(arch, _plan(disable_gradient_checkpointing=True))
    assert _term(padded, "forward", "attention_mask") == b * s * s  # bool, made once per forward
    assert _term(padded, "backward", "attention_mask") == 0  # without checkpointing it dies with the forward
    gc = estimate(arch, _plan())
    assert _term(gc, "backward", "attention_mask") == b * s * s  # the checkpointed layers' inputs hold it
    neat = estimate(arch, _plan(neat_packing=True))
    assert _term(neat, "optimizer", "attention_mask") == 2 * b * s * s  # bf16, part of the batch all step
    packed = estimate(arch, _plan(packing=True, disable_gradient_checkpointing=True))
    # no mask: GQA inside sdpa; the padded worst case keeps repeated K/V + an additive mask per layer
    per_layer = 2 * b * s * arch.q_dim * 2 + b * s * s * 2
    gap = padded.peak_allocated_bytes - packed.peak_allocated_bytes
    assert 0.9 * arch.num_hidden_layers * per_layer <= gap <= 1.1 * arch.num_hidden_layers * per_layer
    assert any("worst case with padding" in n for n in padded.notes)
    assert not any("worst case with padding" in n for n in packed.notes)


def test_llamafactory_keys_round_trip():
    plan, _ = plan_from_dict({"stage": "pt", "cutoff_len": 1024})
    assert plan.packing is True  # LLaMA-Factory parser.py: packing defaults to true for pt
    plan, _ = plan_from_dict({"neat_packing": True, "cutoff_len": 1024, "bf16": True})
    assert plan.neat_packing
    with pytest.raises(ConfigError, match="stage sft only"):
        plan_from_dict({"stage": "dpo", "packing": True})
    text = render_config(_plan(neat_packing=True), model_name_or_path=Q05, template="qwen", dataset="d",
                         dataset_dir="data", output_dir="out", header="")
    assert "packing: true" in text and "neat_packing: true" in text
    import yaml

    data = yaml.safe_load(text)
    assert set(data) <= accepted_keys()
    again, _ = plan_from_dict(data)
    assert again.packed and again.neat_packing


def test_data_command_reports_packed_rows(tmp_path):
    rows = [{"instruction": "word " * 30, "output": "reply " * 30} for _ in range(40)]
    import json

    f = tmp_path / "d.json"
    f.write_text(json.dumps(rows))
    out = CliRunner().invoke(app, ["data", str(f), "--cutoffs", "128,1024", "--json"])
    assert out.exit_code == 0, out.output
    got = json.loads(out.output)
    length = got["summary"]["token_length_percentiles"]["100"]  # every sample has the same length
    assert got["summary"]["token_length_percentiles"]["0"] == length and 64 <= length <= 127
    # identical samples: floor(capacity / length) per row, capacity = cutoff_len - 1
    assert [c["packed_rows"] for c in got["coverage"]] == [-(-40 // (c // length)) for c in (127, 1023)]


def test_search_counts_packed_rows():
    data = {"num_samples": 1000, "token_length_percentiles": {50: 200, 100: 400}}
    space = SearchSpace(finetuning_type=["lora"], lora_rank=[8], lora_target=["all"], cutoff_len=[2048],
                        per_device_train_batch_size=[1], gradient_accumulation_steps=[1], gradient_checkpointing=[True],
                        optim=["adamw_torch_fused"], enable_liger_kernel=[False])
    plain = build_instance(Problem(name="t", model=Q05, gpu="rtx-4090", search=space,
                                   dataset=DatasetSpec(summary=DatasetSummary(**data))))
    packed = build_instance(Problem(name="t", model=Q05, gpu="rtx-4090", search=space,
                                    dataset=DatasetSpec(summary=DatasetSummary(**data), packing=True)))
    rows = packed.packed_rows[2048]
    assert 1000 * 200 / 2047 <= rows <= 1000 * 300 / 2047  # mean length between p50 and the mean's upper bound
    c_plain, c_packed = plain.combos[0], packed.combos[0]
    assert c_packed.micro_ms > c_plain.micro_ms  # 2048-token rows instead of ~300-token samples
    assert point_time(packed, c_packed, 1, None, 3.0) < point_time(plain, c_plain, 1, None, 3.0)


def test_estimate_flags():
    args = ["estimate", "--model", Q05, "--cutoff-len", "1024", "--per-device-train-batch-size", "2", "--bf16"]
    neat = CliRunner().invoke(app, args + ["--neat-packing"])
    assert neat.exit_code == 0, neat.output
    assert "neat_packing: a block-diagonal [b, 1, s, s] mask" in neat.output
    bad = CliRunner().invoke(app, args + ["--neat-packing", "--flash-attn", "fa2"])
    assert bad.exit_code == 1
    assert "neat_packing with flash_attn fa2 needs per_device_train_batch_size 1" in bad.output


def test_check_names_the_packing_pitfalls_and_key_effects():
    from optimizer.check import check
    from optimizer.models.catalog import get_gpu

    arch, gpu = resolve_arch(Q05), get_gpu("rtx-4090")
    base = {"model_name_or_path": Q05, "stage": "sft", "do_train": True, "dataset": "d", "template": "qwen",
            "cutoff_len": 4096, "per_device_train_batch_size": 2, "bf16": True}
    neat = {**base, "neat_packing": True}
    plan, _ = plan_from_dict(neat)
    rep = check(neat, plan, arch, gpu, margin=0.1, config_path="neat.yaml")
    pit = next(p for p in rep.pitfalls if p.key == "neat_packing")
    assert "(64 MiB here)" in pit.problem  # 2 x 4096^2 x 2 bytes
    effect = next(e for e in rep.key_effects if e.key == "neat_packing")
    assert effect.saves_bytes < 0  # costs memory versus the default
    packed = {**base, "packing": True, "disable_gradient_checkpointing": True}
    plan, _ = plan_from_dict(packed)
    rep = check(packed, plan, arch, gpu, margin=0.1, config_path="packed.yaml")
    assert any(p.key == "packing" and "attend to each other" in p.problem for p in rep.pitfalls)
    effect = next(e for e in rep.key_effects if e.key == "packing")
    assert effect.saves_bytes > 0  # rows of exactly cutoff_len: no padded-batch mask, no repeated K/V
