"""Issue 15, `stage: dpo` in `trainfit solve`: the problem's stage, preference (ranking) data read and counted as
LLaMA-Factory's pairwise processor does, the DPO step in the search and the time model, the shipped DPO problem
(front, brute == CP-SAT, committed configs current, each config checked) and one error per unsupported combination."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from optimizer.check import check
from optimizer.cli import app
from optimizer.data.dataset import count_tokens
from optimizer.data.pairwise import PairTokens, count_pairs, read_pairs, truncate_pair
from optimizer.data.read import DatasetError, read_dataset, resolve_source
from optimizer.data.tokens import ApproxCounter
from optimizer.errors import ProblemError
from optimizer.llamafactory.configs import config_files
from optimizer.llamafactory.read import plan_from_dict
from optimizer.llamafactory.write import dataset_info_entry
from optimizer.memory import estimate
from optimizer.models.catalog import get_gpu, resolve_arch
from optimizer.search.perf import micro_batch_seconds
from optimizer.search.problem import load_problem
from optimizer.search.solve import solve_problem

ROOT = Path(__file__).resolve().parents[1]
DPO = "problems/qwen2.5-3b-dpo-rtx5060ti-16gb.yaml"
OUT = "configs/qwen2.5-3b-dpo-rtx5060ti-16gb"
PAIRS = ROOT / "problems" / "data" / "triz_pairs_synthetic.json"
runner = CliRunner()


# --------------------------------------------------------------------------------------------------------------
# The problem file


def _problem(tmp_path: Path, **kw) -> Path:
    base = yaml.safe_load((ROOT / DPO).read_text(encoding="utf-8"))
    base["dataset"]["file"] = str(PAIRS)
    base.update(kw)
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(base, allow_unicode=True), encoding="utf-8")
    return p


def test_the_dpo_problem_loads_with_its_stage():
    problem, _ = load_problem(ROOT / DPO)
    assert (problem.stage, problem.pref_loss, problem.pref_beta) == ("dpo", "sigmoid", 0.1)
    sft, _ = load_problem(ROOT / "problems/qwen2.5-3b-rtx5060ti-16gb.yaml")
    assert sft.stage == "sft"


@pytest.mark.parametrize("stage,expected", [
    ("kto", "stage: 'kto' is a LLaMA-Factory stage trainfit does not model; trainfit solves sft and dpo: use stage "
            "sft or dpo. Fix the problem file."),
    ("rm", "stage: 'rm' is a LLaMA-Factory stage trainfit does not model; trainfit solves sft and dpo: use stage sft "
           "or dpo. Fix the problem file."),
    ("ppo", "stage: 'ppo' is a LLaMA-Factory stage trainfit does not model; trainfit solves sft and dpo: use stage "
            "sft or dpo. Fix the problem file."),
    ("orpo", "stage: 'orpo' is not a LLaMA-Factory stage (pt, sft, rm, ppo, dpo, kto); trainfit solves sft and dpo: "
             "use stage sft or dpo. Fix the problem file."),
])
def test_unsupported_stages_get_one_error(tmp_path, stage, expected):
    p = _problem(tmp_path, stage=stage)
    with pytest.raises(ProblemError) as err:
        load_problem(p)
    assert str(err.value) == f"{p}: {expected}"
    res = runner.invoke(app, ["solve", str(p), "--no-write"])
    assert res.exit_code == 1 and res.output == f"Error: {p}: {expected}\n"


def test_dpo_with_a_cluster_gets_one_error(tmp_path):
    p = _problem(tmp_path, cluster={"count": 2})
    with pytest.raises(ProblemError) as err:
        load_problem(p)
    assert str(err.value) == (f"{p}: stage dpo with a cluster is not modelled (the per-GPU model of distributed/ "
                              "covers sft steps, not the reference model): remove cluster to solve on one GPU, or use "
                              "stage sft. Fix the problem file.")


def test_preference_keys_without_dpo_get_one_error(tmp_path):
    p = _problem(tmp_path, stage="sft", pref_loss="orpo")
    with pytest.raises(ProblemError) as err:
        load_problem(p)
    assert str(err.value) == (f"{p}: pref_loss and pref_beta apply to stage dpo only: remove them, or set stage: "
                              "dpo. Fix the problem file.")


def test_sft_data_in_a_dpo_problem_and_pairs_in_an_sft_problem_are_refused(tmp_path):
    p = _problem(tmp_path)
    raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    raw["dataset"]["file"] = str(ROOT / "problems/data/triz_synthetic.json")
    p.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    res = runner.invoke(app, ["solve", str(p), "--no-write"])
    assert res.exit_code == 1
    assert res.output == (f"Error: {ROOT}/problems/data/triz_synthetic.json: row 1: 'chosen' is missing; every "
                          "ranking sample needs 'chosen' and 'rejected' response strings. Add them, or remove the "
                          "row.\n")
    q = _problem(tmp_path, stage="sft", pref_beta=0.1)
    res = runner.invoke(app, ["solve", str(q), "--no-write"])
    assert res.exit_code == 1
    assert res.output == (f"Error: {PAIRS}: row 1: 'output' is missing; the row has 'chosen' and 'rejected' "
                          "(preference data). Train it with stage: dpo (trainfit data --pairwise), or give SFT data.\n")


# --------------------------------------------------------------------------------------------------------------
# Preference data


def _write(path: Path, records) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def test_alpaca_ranking_records_become_pairs(tmp_path):
    f = _write(tmp_path / "a.json", [{"instruction": "Q", "input": "ctx", "chosen": "good", "rejected": "bad",
                                      "system": "S", "history": [["h1", "a1"]]}])
    (pair,) = read_pairs(*resolve_source(f, None, None, ranking=True)[:2])
    assert pair.prompt == (("user", "h1"), ("assistant", "a1"), ("user", "Q\nctx"))
    assert (pair.chosen, pair.rejected, pair.system) == (("assistant", "good"), ("assistant", "bad"), "S")


def test_sharegpt_and_openai_ranking_records_become_pairs(tmp_path):
    share = _write(tmp_path / "s.json", [{
        "conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q1"},
                          {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"}],
        "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}}])
    (pair,) = read_pairs(*resolve_source(share, None, None, ranking=True)[:2])
    assert pair.prompt == (("user", "q1"), ("assistant", "a1"), ("user", "q2"))
    assert (pair.chosen, pair.rejected, pair.system) == (("assistant", "good"), ("assistant", "bad"), "S")
    oai = _write(tmp_path / "o.json", [{"messages": [{"role": "user", "content": "q"}],
                                        "chosen": {"role": "assistant", "content": "good"},
                                        "rejected": {"role": "assistant", "content": "bad"}}])
    (pair,) = read_pairs(*resolve_source(oai, None, None, ranking=True)[:2])
    assert (pair.prompt, pair.chosen[1], pair.rejected[1]) == ((("user", "q"),), "good", "bad")


def test_a_ranking_dataset_info_entry_is_read_with_its_columns(tmp_path):
    _write(tmp_path / "d.json", [{"q": "Q", "yes": "good", "no": "bad"}])
    info = {"prefs": {"file_name": "d.json", "ranking": True,
                      "columns": {"prompt": "q", "chosen": "yes", "rejected": "no"}},
            "sft": {"file_name": "d.json"}}
    _write(tmp_path / "dataset_info.json", info)
    (pair,) = read_pairs(*resolve_source(tmp_path, "prefs", None, ranking=True)[:2])
    assert (pair.prompt, pair.chosen[1], pair.rejected[1]) == ((("user", "Q"),), "good", "bad")
    with pytest.raises(DatasetError) as err:
        resolve_source(tmp_path, "sft", None, ranking=True)
    assert str(err.value) == (f"{tmp_path}/dataset_info.json entry 'sft': not a ranking (preference) dataset; stage "
                              "dpo trains on chosen/rejected pairs. Give a ranking dataset (\"ranking\": true, "
                              "LLaMA-Factory's data/README.md).")
    with pytest.raises(DatasetError) as err:
        read_dataset(tmp_path, dataset="prefs")  # the SFT reader refuses it, as before
    assert "a ranking (preference) dataset is not SFT data" in str(err.value)
    _write(tmp_path / "dataset_info.json", {"prefs": {"file_name": "d.json", "ranking": True}})
    with pytest.raises(DatasetError) as err:
        resolve_source(tmp_path, "prefs", None, ranking=True)
    assert str(err.value) == (f"{tmp_path}/dataset_info.json entry 'prefs': a ranking dataset names its response "
                              "columns. Add \"columns\": {\"chosen\": \"chosen\", \"rejected\": \"rejected\"} (your "
                              "keys).")


def test_malformed_ranking_rows_are_named(tmp_path):
    f = _write(tmp_path / "bad.json", [{"conversations": [{"from": "human", "value": "q"},
                                                          {"from": "gpt", "value": "a"}],
                                        "chosen": {"from": "gpt", "value": "x"}, "rejected": {"from": "gpt",
                                                                                              "value": "y"}}])
    with pytest.raises(DatasetError) as err:
        read_pairs(*resolve_source(f, None, None, ranking=True)[:2])
    assert str(err.value) == (f"{f}: row 1: 'conversations' must end with a 'human' message in a ranking sample "
                              "(the responses are 'chosen' and 'rejected'). Move the last response out of "
                              "'conversations', or remove the row.")
    g = _write(tmp_path / "bad2.json", [{"conversations": [{"from": "human", "value": "q"}],
                                         "chosen": {"from": "human", "value": "x"}, "rejected": {"from": "gpt",
                                                                                                 "value": "y"}}])
    with pytest.raises(DatasetError) as err:
        read_pairs(*resolve_source(g, None, None, ranking=True)[:2])
    assert str(err.value) == (f"{g}: row 1: 'chosen' has from 'human'; it must be 'gpt' (or 'function_call'). Write "
                              "it as {\"from\": \"gpt\", \"value\": \"...\"}.")


def test_pair_counts_match_the_sft_counts_of_the_same_turns(tmp_path):
    """The pairwise processor's prompt is the SFT prompt of the same conversation and each response is its SFT
    response (qwen template: no efficient_eos), so a pair's counts equal two SFT samples' (an independent path)."""
    recs = json.loads(PAIRS.read_text(encoding="utf-8"))[:40]
    sft_c = _write(tmp_path / "c.json", [{"instruction": r["instruction"], "input": r["input"],
                                          "output": r["chosen"]} for r in recs])
    sft_r = _write(tmp_path / "r.json", [{"instruction": r["instruction"], "input": r["input"],
                                          "output": r["rejected"]} for r in recs])
    _write(tmp_path / "p.json", recs)
    counter = ApproxCounter("qwen")
    pairs = count_pairs(tmp_path / "p.json", template="qwen", counter=counter).samples
    c = count_tokens(sft_c, template="qwen", counter=counter, cache=False).samples
    r = count_tokens(sft_r, template="qwen", counter=counter, cache=False).samples
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [(a.prompt, a.response, b.response)
                                                                   for a, b in zip(c, r)]
    assert all(a.prompt == b.prompt for a, b in zip(c, r))
    assert any(p.rejected > p.chosen for p in pairs) and any(p.chosen > p.rejected for p in pairs)


def test_truncation_follows_infer_seqlen_on_the_longer_response():
    # LLaMA-Factory processor_utils.infer_seqlen(300, 500, 512): neither half fits, so the response budget is
    # int(512 * 500 / 800) = 320 and the prompt keeps 512 - 320 = 192; the rejected 100 stay whole.
    assert truncate_pair(PairTokens(300, 500, 100), 512) == (192, 320, 100)
    # a short longer response (2 x 100 < 512) keeps both responses whole and cuts the prompt to 412
    assert truncate_pair(PairTokens(600, 100, 80), 512) == (412, 100, 80)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 4096))
def test_the_padded_pair_length_is_cutoff_or_prompt_plus_the_longer_response(p, c, r, cutoff):
    s, kc, kr = truncate_pair(PairTokens(p, c, r), cutoff)
    assert s + max(kc, kr) == min(cutoff, PairTokens(p, c, r).total)
    assert kc <= c and kr <= r and s <= p


# --------------------------------------------------------------------------------------------------------------
# The time model


def test_dpo_micro_batch_runs_2b_sequences_and_a_reference_forward():
    arch, gpu = resolve_arch("Qwen/Qwen2.5-3B-Instruct"), get_gpu("rtx-5060-ti-16gb")
    kw = {"finetuning_type": "lora", "gc": False, "seq_len": 512, "lora_params": 0}
    sft2 = micro_batch_seconds(arch, gpu, batch=2, **kw)
    pairs = micro_batch_seconds(arch, gpu, batch=1, pairwise=True, **kw)
    ref = micro_batch_seconds(arch, gpu, batch=1, pairwise=True, reference=True, **kw)
    assert pairs == sft2  # one pair = two sequences of the padded length
    # LoRA without checkpointing: forward + input-gradient backward = 4N (+3A); the reference forward adds 2N (+A),
    # so about half again (Kaplan et al. 2020's 2N per token forward)
    assert 1.45 < ref / pairs < 1.52


# --------------------------------------------------------------------------------------------------------------
# The shipped DPO problem


@pytest.fixture(scope="module")
def solved():
    problem, base = load_problem(ROOT / DPO)
    return problem, base, solve_problem(problem, base)


def test_dpo_front_fits_and_every_point_is_a_dpo_plan(solved):
    problem, _base, result = solved
    assert len(result.front) >= 3 and result.proven_optimal
    arch = resolve_arch(result.model)
    for s in result.front:
        assert (s.plan.stage, s.plan.pref_loss, s.plan.use_ref_model) == ("dpo", "sigmoid", True)
        est = estimate(arch, s.plan)
        assert est.device_peak_bytes == s.device_peak_bytes <= result.budget_bytes
        assert est.tokens_per_micro_batch == 2 * s.per_device_train_batch_size * s.cutoff_len
        assert s.hparams["learning_rate"] == (5e-6 if s.finetuning_type != "full" else 1e-6)


def test_dpo_front_brute_force_equals_cpsat(solved):
    problem, base, result = solved
    brute = solve_problem(problem, base, "brute")
    assert [(s.quality, s.time_s, s.plan) for s in brute.front] == [(s.quality, s.time_s, s.plan)
                                                                      for s in result.front]


def test_committed_dpo_configs_are_current_and_check_fits(solved, monkeypatch):
    problem, _base, result = solved
    monkeypatch.chdir(ROOT)
    files = config_files(result, problem, DPO, OUT, "all", "problems/data/triz_pairs_synthetic.json")
    committed = {p.name: p.read_text(encoding="utf-8") for p in (ROOT / OUT).iterdir()}
    assert committed == files, f"run: trainfit solve {DPO}"
    info = json.loads(files["dataset_info.json"])["triz_pairs"]
    assert info == {**dataset_info_entry("../../problems/data/triz_pairs_synthetic.json", "alpaca",
                                         {"instruction", "input", "chosen", "rejected"}, ranking=True)}
    assert info["ranking"] is True and info["columns"]["chosen"] == "chosen"
    gpu = get_gpu("rtx-5060-ti-16gb")
    for name in sorted(n for n in files if n.endswith(".yaml")):
        data = yaml.safe_load(files[name])
        plan, model = plan_from_dict(data, name)
        assert (data["stage"], data["pref_loss"], data["pref_beta"]) == ("dpo", "sigmoid", 0.1)
        rep = check(data, plan, resolve_arch(model), gpu, margin=0.10, config_path=name)
        assert rep.verdict == "fits", name
    res = runner.invoke(app, ["check", f"{OUT}/{min(n for n in files if n.endswith('.yaml'))}", "--gpu",
                              "rtx-5060-ti-16gb", "--margin", "0.10"])
    assert res.exit_code == 0, res.output
    assert "DPO reference forward" in res.output and "FITS" in res.output


def test_data_command_reads_pairs():
    res = runner.invoke(app, ["data", str(PAIRS), "--model", "Qwen/Qwen2.5-3B-Instruct", "--pairwise", "--cutoffs",
                              "512", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["summary"]["num_samples"] == 300
    # the synthetic pairs: cutoff_len 512 keeps 80.3% of the pairs whole and 91.1% of their response tokens
    # (approximate counts, the qwen template; the same numbers the DPO problem's solve reports in its front)
    (cov,) = out["coverage"]
    assert (round(cov["whole_share"], 3), round(cov["response_kept_share"], 3)) == (0.803, 0.911)
    text = runner.invoke(app, ["data", str(PAIRS), "--model", "Qwen/Qwen2.5-3B-Instruct", "--pairwise"]).output
    assert ": 300 pairs, template qwen" in text and "percentiles (prompt + longer response tokens" in text


def test_dpo_on_several_gpus_from_the_command_line_gets_one_error():
    res = runner.invoke(app, ["solve", DPO, "--gpus", "rtx-4090x2,rtx-4090", "--no-write"])
    assert res.exit_code == 1
    assert res.output == ("Error: --gpus rtx-4090x2: stage dpo with a cluster is not modelled (the per-GPU model of "
                          "distributed/ covers sft steps, not the reference model). Pass rtx-4090 (one GPU) for "
                          f"{DPO}.\n")


@pytest.mark.parametrize("pref_loss", ["sigmoid", "orpo"])
def test_full_and_8bit_dpo_fronts_match_brute_force_and_fit(tmp_path, pref_loss):
    """A space of full fine-tuning (a frozen reference copy) and qlora8, with and without a reference: every front point
    fits by the memory model and CP-SAT's front equals brute force's."""
    p = _problem(tmp_path, pref_loss=pref_loss, gpu="a100-80gb", search={
        "finetuning_type": ["full", "qlora8"], "lora_rank": [16], "lora_target": ["all"],
        "cutoff_len": [256, 1024], "per_device_train_batch_size": [1, 4], "gradient_accumulation_steps": [1, 4],
        "gradient_checkpointing": [True, False], "optim": ["adamw_torch_fused"], "enable_liger_kernel": [False]})
    problem, base = load_problem(p)
    a, b = solve_problem(problem, base), solve_problem(problem, base, "brute")
    assert [(s.quality, s.time_s, s.plan) for s in a.front] == [(s.quality, s.time_s, s.plan) for s in b.front]
    arch = resolve_arch(a.model)
    kinds = set()
    for s in a.front:
        assert s.plan.use_ref_model == (pref_loss == "sigmoid")
        assert estimate(arch, s.plan).device_peak_bytes == s.device_peak_bytes <= a.budget_bytes
        kinds.add(s.finetuning_type)
    assert "full" in kinds


def test_a_summary_dpo_problem_solves_and_takes_longer_than_sft(tmp_path):
    summary = {"num_samples": 300, "token_length_percentiles": {50: 350, 90: 630, 100: 1040},
               "response_token_share": 0.78}
    space = {"finetuning_type": ["lora"], "lora_rank": [8], "lora_target": ["all"], "cutoff_len": [512],
             "per_device_train_batch_size": [1], "gradient_accumulation_steps": [16], "gradient_checkpointing": [True],
             "optim": ["adamw_torch_fused"], "enable_liger_kernel": [False]}
    fronts = {}
    for stage in ("sft", "dpo"):
        p = _problem(tmp_path, stage=stage, search=space, dataset={"name": "s", "summary": summary})
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        raw.pop("pref_loss")
        p.write_text(yaml.safe_dump(raw), encoding="utf-8")
        problem, base = load_problem(p)
        fronts[stage] = solve_problem(problem, base).front
    (sft,), (dpo,) = fronts["sft"], fronts["dpo"]
    assert (sft.plan.stage, dpo.plan.stage) == ("sft", "dpo")
    # LoRA with checkpointing: forward 2N, recompute 2N, backward 2N (input gradients) per token; DPO runs two
    # sequences per sample plus a 2N reference forward: 2 x 8N / 6N ~ 2.7x the compute; perf.mfu(t) = t / (t + 350)
    # rises from ~0.5 to ~0.67 of its maximum with the doubled tokens per micro-batch (~360 -> ~720): ~2.0x the time
    assert 1.8 < dpo.time_s / sft.time_s < 2.2
    assert dpo.device_peak_bytes > sft.device_peak_bytes


def test_dpo_solve_writes_its_report(tmp_path):
    """--report works for DPO (no refusal needed): the page is written with every front point."""
    out = tmp_path / "dpo.html"
    res = runner.invoke(app, ["solve", DPO, "--no-write", "--report", str(out)])
    assert res.exit_code == 0, res.output
    page = out.read_text(encoding="utf-8")
    assert "qwen2.5-3b-dpo-rtx5060ti-16gb" in page and "p09_lora_r8_attention_c256_b2x8" in page
