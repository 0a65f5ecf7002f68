"""search.num_train_epochs: epochs as a dimension of the search (time and quality, never memory)."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from optimizer.cli import app
from optimizer.llamafactory.configs import config_files
from optimizer.memory import estimate
from optimizer.search.brute import non_dominated, solve_brute
from optimizer.search.cpsat import solve_cpsat
from optimizer.search.objectives import optimizer_steps
from optimizer.search.problem import DatasetSpec, DatasetSummary, Objective, Problem, SearchSpace
from optimizer.search.quality import WARMUP_RATIO, warmup_steps
from optimizer.search.solve import solve_problem
from optimizer.search.space import build_instance

DATA = DatasetSpec(summary=DatasetSummary(num_samples=800, token_length_percentiles={50: 300, 90: 900, 100: 2000}))
SPACE = dict(finetuning_type=["lora", "qlora4"], lora_rank=[8, 32], lora_target=["attention", "all"],
             cutoff_len=[512, 1024, 2048], per_device_train_batch_size=[1, 4], gradient_accumulation_steps=[1, 4, 16],
             gradient_checkpointing=[True], optim=["adamw_torch_fused"], enable_liger_kernel=[False])


def _problem(epochs=None, objective_epochs=None) -> Problem:
    return Problem(name="ep", model="Qwen/Qwen2.5-0.5B-Instruct", gpu="rtx-3060-12gb", dataset=DATA,
                   search=SearchSpace(**SPACE, num_train_epochs=epochs),
                   objective=Objective(num_train_epochs=objective_epochs))


def test_the_front_over_epochs_is_the_front_of_the_fronts_of_each_epoch_value():
    """Exact by construction: the front of a union of spaces is the front of the union of their fronts, so the
    searched front must equal the merge of one solve per epochs value (objective vectors; keys differ by the
    epochs' position)."""
    values = [1.0, 3.0, 2.0]
    both = solve_cpsat(build_instance(_problem(values)))
    assert both == solve_brute(build_instance(_problem(values)))
    parts = []
    for i, e in enumerate(values):
        for q, t, k, p in solve_brute(build_instance(_problem(objective_epochs=e))):
            parts.append((q, t, k[:-1] + (i,), p))
    assert [(q, t, k) for q, t, k, _ in both] == [(q, t, k) for q, t, k, _ in non_dominated(parts)]
    assert len({p[3] for *_, p in both}) > 1  # epochs trade against time on this front


def test_one_searched_value_is_the_objective_value():
    a = solve_problem(_problem([2.0]))
    b = solve_problem(_problem(objective_epochs=2.0))
    assert [s.model_dump(exclude={"hparam_sources"}) for s in a.front] == \
        [s.model_dump(exclude={"hparam_sources"}) for s in b.front]
    assert a.front[0].hparam_sources["num_train_epochs"] == a.epochs_source == "search.num_train_epochs"
    assert a.searched_epochs == b.searched_epochs == [2.0]


def test_each_point_carries_its_epochs_in_time_steps_warmup_plan_and_config():
    problem = _problem([1.0, 2.5])
    res = solve_problem(problem)
    assert {s.num_train_epochs for s in res.front} == {1.0, 2.5}
    assert res.num_train_epochs == res.front[res.recommended].num_train_epochs
    inst = build_instance(problem)
    files = config_files(res, problem, "ep.yaml", "out", "all", None)
    for i, s in enumerate(res.front):
        n = inst.samples_used[s.max_samples]
        assert s.optimizer_steps == optimizer_steps(s.num_train_epochs, n, s.per_device_train_batch_size,
                                                    s.gradient_accumulation_steps)
        assert s.epoch_s == round(s.time_s / s.num_train_epochs, 1)
        assert s.plan.num_train_epochs == s.hparams["num_train_epochs"] == s.num_train_epochs
        assert s.hparams["warmup_steps"] == warmup_steps(s.optimizer_steps, WARMUP_RATIO)
        # epochs never change memory: the point's peak is the estimate of its plan at any epochs
        other = s.plan.model_copy(update={"num_train_epochs": 7.0})
        assert estimate(inst.arch, other).device_peak_bytes == s.device_peak_bytes
        name = next(f for f in files if f.startswith(f"p{i + 1:02d}_"))
        assert name.endswith(f"_e{s.num_train_epochs:g}.yaml")
        cfg = yaml.safe_load(files[name].split("\n", 1)[1])
        assert cfg["num_train_epochs"] == s.num_train_epochs and cfg["warmup_steps"] == s.hparams["warmup_steps"]


def test_more_epochs_on_the_front_take_longer_at_equal_settings():
    res = solve_problem(_problem([1.0, 3.0]))
    knobs = ("finetuning_type", "lora_rank", "lora_target", "cutoff_len", "per_device_train_batch_size",
             "gradient_accumulation_steps", "max_samples", "gradient_checkpointing")
    by = {}
    for s in res.front:
        by.setdefault(tuple(getattr(s, k) for k in knobs), {})[s.num_train_epochs] = s.time_s
    pairs = [v for v in by.values() if len(v) == 2]
    assert pairs  # the front holds some setting at both epochs values (else this test checks nothing)
    for v in pairs:
        assert v[3.0] > v[1.0]


def test_epochs_set_twice_is_one_error_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "name": "ep", "model": "Qwen/Qwen2.5-0.5B-Instruct", "gpu": "rtx-3060-12gb",
        "dataset": {"summary": {"num_samples": 100, "token_length_percentiles": {50: 200, 100: 400}}},
        "search": {"num_train_epochs": [1, 2]}, "objective": {"num_train_epochs": 3}}))
    res = CliRunner().invoke(app, ["solve", str(path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 1
    assert "num_train_epochs is set twice" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()
    path.write_text(path.read_text().replace("objective:\n  num_train_epochs: 3\n", "").replace("- 2\n", "- 0\n"))
    res = CliRunner().invoke(app, ["solve", str(path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 1 and "num_train_epochs values must be between" in res.output, res.output


def test_the_table_shows_epochs_when_searched():
    from optimizer.report import front_table

    text = front_table(solve_problem(_problem([1.0, 2.0])))
    assert " epochs " in text.splitlines()[1] and "epochs: searched 1, 2 (search.num_train_epochs)" in text
    assert " epochs " not in front_table(solve_problem(_problem())).splitlines()[1]


def test_fewest_gpus_recommends_only_what_the_rule_lets_balanced_consider():
    """prefer fewest_gpus used to take the fastest point within the score's resolution whatever it gave up: with
    epochs searched on the 4 x RTX 4090 problem it dropped an epoch (a third of the optimizer steps) to save 9 min,
    under the rule's 15 min. Now its candidates are the points objectives.eligible passes."""
    from optimizer.search.objectives import FrontRow, eligible
    from optimizer.search.problem import load_problem

    p, base = load_problem("problems/qwen2.5-7b-full-4x4090.yaml")
    p = p.model_copy(update={"search": p.search.model_copy(update={"num_train_epochs": [2.0, 1.0, 3.0]}),
                             "objective": p.objective.model_copy(update={"num_train_epochs": None})})
    assert p.objective.prefer == "fewest_gpus"
    res = solve_problem(p, base)
    rows = [FrontRow(quality=s.quality, time_s=s.time_s, supervised_tokens=s.supervised_tokens,
                     optimizer_steps=s.optimizer_steps, epochs=s.num_train_epochs) for s in res.front]
    anchor, passing = eligible(rows, None)
    assert res.recommended in passing
    assert res.front[res.recommended].num_train_epochs == res.front[anchor].num_train_epochs == 3.0


def test_a_large_cpsat_model_suggests_the_brute_force_solver(monkeypatch):
    import optimizer.search.solve as solve_mod

    monkeypatch.setattr(solve_mod, "LITERALS_HINT", 10)
    res = solve_problem(_problem([1.0, 2.0]))
    hint = [n for n in res.notes if n.startswith("CP-SAT held")]
    assert len(hint) == 1 and "--solver brute" in hint[0]
    assert not any(n.startswith("CP-SAT held") for n in solve_problem(_problem([1.0, 2.0]), method="brute").notes)
    monkeypatch.setattr(solve_mod, "LITERALS_HINT", 10**9)
    assert not any(n.startswith("CP-SAT held") for n in solve_problem(_problem([1.0, 2.0])).notes)
