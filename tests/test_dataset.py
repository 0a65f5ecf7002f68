"""The data path: reading LLaMA-Factory datasets, rendering them with its chat templates, counting tokens,
LLaMA-Factory's truncation (infer_seqlen), cutoff coverage, the summary, the cache, and the shipped synthetic
TRIZ set.

Runs without the `tokenizers` package (the approximation path); the real-tokenizer tests skip without it, and
the vocabulary-package test skips without quicktok-v1.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

import pytest

from optimizer.data.dataset import (
    SampleTokens,
    analyze_dataset,
    count_tokens,
    coverage,
    infer_seqlen,
    summarize,
    token_pairs,
    truncate,
)
from optimizer.data.read import Conversation, DatasetError, read_dataset
from optimizer.data.templates import BOS, EOS, TEMPLATES, get_template, render_turns, template_for_model
from optimizer.data.tokens import (
    ApproxCounter,
    count_with_specials,
    find_tokenizer_json,
    resolve_counter,
    tokenizer_family,
)
from optimizer.errors import TrainfitError
from optimizer.search.problem import DatasetSummary

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ROOT / "problems" / "data" / "triz_synthetic.json"


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:
        return False
    return True


HAS_TOKENIZERS = _importable("tokenizers")
HAS_QUICKTOK = _importable("quicktok")


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    """A private trainfit cache and an empty Hugging Face cache for every test."""
    monkeypatch.setenv("TRAINFIT_CACHE", str(tmp_path_factory.mktemp("trainfit-cache")))
    hf = tmp_path_factory.mktemp("hf")
    monkeypatch.setenv("HF_HOME", str(hf))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf / "hub"))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)


def write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


class CharCounter:
    """A fake tokenizer: one token per character (special-token strings are split off by the caller)."""

    id = "test-chars"
    exact = True
    has_bos = True
    handles_special = False
    description = "one token per character"

    def __init__(self):
        self.calls = 0

    def count_batch(self, texts):
        self.calls += 1
        return [len(t) for t in texts]


# ----------------------------------------------------------------------------------------------------------
# Reading every format
# ----------------------------------------------------------------------------------------------------------


def test_alpaca_json(tmp_path):
    p = write(tmp_path / "a.json", [
        {"instruction": "Translate", "input": "hello", "output": "привет", "system": "Be brief.",
         "history": [["q0", "a0"]]},
        {"instruction": "Only instruction", "output": "ok"},
        {"instruction": "", "input": "only input", "output": "fine"},
    ])
    convs = read_dataset(p)
    assert convs[0] == Conversation(
        (("user", "q0"), ("assistant", "a0"), ("user", "Translate\nhello"), ("assistant", "привет")), "Be brief.", "")
    assert convs[1].messages == (("user", "Only instruction"), ("assistant", "ok"))
    assert convs[2].messages == (("user", "only input"), ("assistant", "fine"))


def test_alpaca_jsonl(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i1", "output": "o1"}, {"instruction": "i2", "input": "x",
                                                                                      "output": "o2"}])
    convs = read_dataset(p)
    assert [c.messages for c in convs] == [(("user", "i1"), ("assistant", "o1")),
                                            (("user", "i2\nx"), ("assistant", "o2"))]


def test_jsonl_content_in_a_json_file(tmp_path):
    p = tmp_path / "lines.json"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n', encoding="utf-8")
    assert len(read_dataset(p)) == 2


def test_sharegpt_with_system_message(tmp_path):
    p = write(tmp_path / "s.json", [{"conversations": [
        {"from": "system", "value": "SYS"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
        {"from": "human", "value": "more"}, {"from": "gpt", "value": "sure"}]}])
    (conv,) = read_dataset(p)
    assert conv.system == "SYS"
    assert conv.messages == (("user", "hi"), ("assistant", "hello"), ("user", "more"), ("assistant", "sure"))


def test_openai_messages(tmp_path):
    p = write_jsonl(tmp_path / "o.jsonl", [{"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "let me check"}, {"role": "tool", "content": "20C"},
        {"role": "assistant", "content": "It is 20C."}]}])
    (conv,) = read_dataset(p)
    assert conv.system == "S"
    assert conv.messages == (("user", "weather?"), ("assistant", "let me check"), ("observation", "20C"),
                             ("assistant", "It is 20C."))
    assert read_dataset(p, formatting="openai") == [conv]


def test_dataset_info_custom_columns_and_tags(tmp_path):
    write(tmp_path / "qa.json", [{"question": "Q?", "answer": "A.", "sys": "S", "input": "ignored"}])
    write(tmp_path / "chat.json", [{"dialog": [{"speaker": "me", "text": "hi"}, {"speaker": "bot", "text": "yo"}]}])
    write(tmp_path / "dataset_info.json", {
        "qa": {"file_name": "qa.json", "columns": {"prompt": "question", "response": "answer", "system": "sys"}},
        "chat": {"file_name": "chat.json", "formatting": "sharegpt", "columns": {"messages": "dialog"},
                 "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}},
    })
    info = tmp_path / "dataset_info.json"
    # `columns` replaces the defaults, as in LLaMA-Factory: no query column, so "input" is not read
    assert read_dataset(info, dataset="qa") == [Conversation((("user", "Q?"), ("assistant", "A.")), "S", "")]
    assert read_dataset(tmp_path, dataset="chat")[0].messages == (("user", "hi"), ("assistant", "yo"))
    with pytest.raises(DatasetError, match=r"Undefined dataset 'nope'"):
        read_dataset(info, dataset="nope")


def test_dataset_info_alpaca_system_only_with_columns(tmp_path):
    """LLaMA-Factory reads an alpaca `system`/`history` only when `columns` names it; a bare file always does."""
    rows = [{"instruction": "i", "output": "o", "system": "S", "history": [["a", "b"]]}]
    write(tmp_path / "d.json", rows)
    write(tmp_path / "dataset_info.json", {"plain": {"file_name": "d.json"}, "full": {
        "file_name": "d.json", "columns": {"prompt": "instruction", "query": "input", "response": "output",
                                           "system": "system", "history": "history"}}})
    plain = read_dataset(tmp_path / "dataset_info.json", dataset="plain")[0]
    full = read_dataset(tmp_path / "dataset_info.json", dataset="full")[0]
    bare = read_dataset(tmp_path / "d.json")[0]
    assert plain == Conversation((("user", "i"), ("assistant", "o")), "", "")
    assert full == bare == Conversation((("user", "a"), ("assistant", "b"), ("user", "i"), ("assistant", "o")),
                                        "S", "")


def test_dataset_info_openai_formatting_adds_lf_system_suffix(tmp_path):
    write(tmp_path / "m.json", [{"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "yo"}]}])
    write(tmp_path / "dataset_info.json", {"m": {
        "file_name": "m.json", "formatting": "openai", "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}})
    (conv,) = read_dataset(tmp_path / "dataset_info.json", dataset="m")
    assert conv.system == "detailed thinking off"  # LLaMA-Factory 0.9.5's OpenAIDatasetConverter does this


# ----------------------------------------------------------------------------------------------------------
# Malformed input
# ----------------------------------------------------------------------------------------------------------


def test_missing_output_names_file_and_row(tmp_path):
    p = write(tmp_path / "bad.json", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(DatasetError) as exc:
        read_dataset(p)
    assert str(exc.value) == (f"{p}: row 2: 'output' is missing; every SFT sample needs the response text as a "
                              "string. Add it, or remove the row.")
    assert isinstance(exc.value, TrainfitError)
    assert "\n" not in str(exc.value)


def test_non_string_output(tmp_path):
    p = write(tmp_path / "bad.json", [{"instruction": "a", "output": 42}])
    with pytest.raises(DatasetError) as exc:
        read_dataset(p)
    assert str(exc.value) == (f"{p}: row 1: 'output' is a number; every SFT sample needs the response text as a "
                              "string. Add it, or remove the row.")


def test_bad_jsonl_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n', encoding="utf-8")
    with pytest.raises(DatasetError) as exc:
        read_dataset(p)
    assert str(exc.value) == (f"{p}: line 3 is not valid JSON (Expecting value at column 32). Each line of a "
                              ".jsonl file must be one complete JSON record.")


def test_sharegpt_roles_out_of_order(tmp_path):
    p = write(tmp_path / "s.json", [
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}])
    with pytest.raises(DatasetError) as exc:
        read_dataset(p)
    assert str(exc.value) == (
        f"{p}: row 2: message 2 has from 'human' where 'gpt' or 'function_call' must come. Messages must "
        "alternate 'human' and 'gpt', starting with 'human' (after an optional system message).")


def test_sharegpt_odd_message_count(tmp_path):
    p = write(tmp_path / "s.json", [{"conversations": [{"from": "human", "value": "a"}]}])
    with pytest.raises(DatasetError, match=r"row 1: 'conversations' has an odd number of user/assistant messages"):
        read_dataset(p)


def test_row_not_an_object(tmp_path):
    p = write(tmp_path / "s.json", [{"instruction": "a", "output": "b"}, "oops"])
    with pytest.raises(DatasetError) as exc:
        read_dataset(p)
    assert str(exc.value) == f"{p}: row 2 is a string, not a record. Each sample must be a JSON object."


def test_unknown_record_shape(tmp_path):
    p = write(tmp_path / "s.json", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DatasetError, match=r"row 1 has neither alpaca keys"):
        read_dataset(p)


@pytest.mark.parametrize("content", ["", "   \n\n", "\ufeff"])
def test_empty_file(tmp_path, content):
    p = tmp_path / "empty.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError) as exc:
        read_dataset(p)
    assert str(exc.value) == (f"{p} is empty. Put the training samples in it (a JSON list or one JSON record a "
                              "line).")


def test_empty_list_and_bad_json(tmp_path):
    p = tmp_path / "e.json"
    p.write_text("[]", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"has no samples"):
        read_dataset(p)
    p.write_text('[{"instruction": "a",]', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"is not valid JSON: .* at line 1 column"):
        read_dataset(p)
    p.write_text('{"instruction": "a", "output": "b"}', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"the top level is an object"):
        read_dataset(p)


def test_missing_file_and_other_types(tmp_path):
    with pytest.raises(DatasetError, match=r"does not exist"):
        read_dataset(tmp_path / "nope.json")
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"reads .json and .jsonl data files, not .csv"):
        read_dataset(csv)
    bad = tmp_path / "latin1.json"
    bad.write_bytes('[{"instruction": "caf\xe9", "output": "x"}]'.encode("latin-1"))
    with pytest.raises(DatasetError, match=r"is not UTF-8 text"):
        read_dataset(bad)


def test_reader_writes_nothing_next_to_the_data(tmp_path):
    write(tmp_path / "a.json", [{"instruction": "i", "output": "o"}])
    before = sorted(os.listdir(tmp_path))
    count_tokens(tmp_path / "a.json", template="qwen", counter=ApproxCounter("qwen"))
    assert sorted(os.listdir(tmp_path)) == before


# ----------------------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------------------


def test_qwen_rendering_has_default_system():
    turns = render_turns(get_template("qwen"), [("user", "Hi"), ("assistant", "Hello")])
    assert turns == [(
        ["<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n",
         "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"],
        ["Hello<|im_end|>\n"],
    )]
    own = render_turns(get_template("qwen"), [("user", "Hi"), ("assistant", "Hello")], system="S")
    assert own[0][0][0] == "<|im_start|>system\nS<|im_end|>\n"


def test_multiturn_every_assistant_turn_is_a_target():
    msgs = [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]
    turns = render_turns(get_template("llama3"), msgs)
    assert len(turns) == 2
    assert turns[0][0][0] is BOS
    assert turns[1][0] == ["<|start_header_id|>user<|end_header_id|>\n\nc<|eot_id|>"
                           "<|start_header_id|>assistant<|end_header_id|>\n\n"]
    assert turns[1][1] == ["d<|eot_id|>"]


def test_mistral_puts_system_into_first_user_message():
    turns = render_turns(get_template("mistral"), [("user", "Q"), ("assistant", "A")], system="S")
    assert turns == [([BOS, "[INST] S\n\nQ[/INST]"], [" A", EOS])]


def test_gemma2_efficient_eos_and_qwen3_empty_thought(tmp_path):
    p = write(tmp_path / "a.json", [{"instruction": "Q", "output": "A"}])
    g2 = count_tokens(p, template="gemma2", counter=CharCounter(), cache=False).samples[0]
    assert g2.extra == 1 and g2.response == g2.turns[0][1] + 1
    q3 = render_turns(get_template("qwen3"), [("user", "Q"), ("assistant", "A")])
    assert q3[0][1] == ["<think>\n\n</think>\n\n", "A<|im_end|>\n"]
    has_thought = render_turns(get_template("qwen3"), [("user", "Q"), ("assistant", "<think>x</think>A")])
    assert has_thought[0][1] == ["<think>x</think>A<|im_end|>\n"]
    nothink = render_turns(get_template("qwen3_nothink"), [("user", "Q"), ("assistant", "A")])
    assert nothink[0][1] == ["A<|im_end|>\n"]


def test_glm4_template_as_llamafactory_writes_it():
    # LLaMA-Factory 0.9.5 data/template.py `glm4`: prefix "[gMASK]<sop>", "<|system|>\n", "<|user|>\n...<|assistant|>",
    # answers "\n..." without EOS, one EOS at the end (efficient_eos)
    msgs = [("user", "Q"), ("assistant", "A"), ("user", "Q2"), ("assistant", "A2")]
    assert render_turns(get_template("glm4"), msgs, system="S") == [
        (["[gMASK]<sop>", "<|system|>\nS", "<|user|>\nQ<|assistant|>"], ["\nA"]),
        (["<|user|>\nQ2<|assistant|>"], ["\nA2"]),
    ]
    assert get_template("glm4").efficient_eos


def test_required_templates_exist():
    for name in ("qwen", "qwen3", "qwen3_nothink", "llama3", "mistral", "gemma", "gemma2", "gemma3", "phi", "phi4",
                 "fallback"):
        assert name in TEMPLATES
    with pytest.raises(TrainfitError, match=r"chat template 'qwen25' is not one"):
        get_template("qwen25")


@pytest.mark.parametrize("model,template", [
    ("Qwen/Qwen2.5-3B-Instruct", "qwen"),
    ("Qwen/Qwen3-8B", "qwen3"),
    ("meta-llama/Llama-3.1-8B-Instruct", "llama3"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "mistral"),
    ("google/gemma-2-9b-it", "gemma2"),
    ("google/gemma-3-12b-it", "gemma3"),
    ("microsoft/Phi-3.5-mini-instruct", "phi"),
    ("microsoft/phi-4", "phi4"),
    ("zai-org/GLM-4-9B-0414", "glm4"),
    ("someone/unknown-model", "fallback"),
])
def test_template_for_model(model, template):
    assert template_for_model(model) == template


@pytest.mark.parametrize("model,family", [
    ("Qwen/Qwen2.5-3B-Instruct", "qwen"), ("Qwen/Qwen3-8B", "qwen"), ("meta-llama/Llama-3.2-1B-Instruct", "llama3"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "sp32k"), ("mistralai/Mistral-Nemo-Instruct-2407", "tekken"),
    ("google/gemma-2-2b-it", "gemma"), ("microsoft/phi-4", "cl100k"), ("microsoft/Phi-3.5-mini-instruct", "sp32k"),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "deepseek"), ("HuggingFaceTB/SmolLM2-1.7B-Instruct", "smollm2"),
    ("zai-org/GLM-4-9B-0414", "glm4"), ("/models/GLM-Z1-32B-0414", "glm4"),
])
def test_tokenizer_family(model, family):
    assert tokenizer_family(model) == family


# ----------------------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------------------


def test_counts_by_hand_with_a_char_tokenizer(tmp_path):
    p = write(tmp_path / "a.json", [{"instruction": "ab", "input": "c", "output": "xyz"}])
    (smp,) = count_tokens(p, template="qwen", counter=CharCounter(), cache=False).samples
    sys_ = len("system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.") + 2 + 1  # 2 specials
    user = len("user\nab\nc") + 2 + len("\n") + 1 + len("assistant\n")  # <|im_start|> <|im_end|> \n <|im_start|>
    assert smp.turns == ((sys_ + user, len("xyz") + 1 + 1),)
    assert smp.prompt == sys_ + user and smp.response == 5 and smp.total == sys_ + user + 5


def test_special_tokens_count_one_each():
    assert count_with_specials(CharCounter(), ["<|im_start|>ab<|im_end|>"], ["<|im_start|>", "<|im_end|>"]) == [4]


def test_approximation_rules():
    q, ll = ApproxCounter("qwen"), ApproxCounter("llama3")
    assert q.count_batch(["1234567"]) == [7]  # Qwen: one token per digit
    assert ll.count_batch(["1234567"]) == [3]  # Llama 3: up to three digits a token
    assert q.count_batch([""]) == [0]
    english = "The quick brown fox jumps over the lazy dog. " * 20
    assert 180 <= q.count_batch([english])[0] <= 220  # 200 real tokens
    assert not q.exact and q.id.startswith("approx-")


def test_huge_sample(tmp_path):
    big = ("Большой текст про изобретательские задачи и противоречия. " * 18000)  # ~1 MB of UTF-8 text
    assert len(big.encode("utf-8")) > 1_000_000
    p = write(tmp_path / "big.json", [{"instruction": "Summarize", "input": big, "output": "ok"},
                                      {"instruction": "short", "output": "fine"}])
    t0 = time.perf_counter()
    res = count_tokens(p, template="qwen", counter=ApproxCounter("qwen"), cache=False)
    assert time.perf_counter() - t0 < 30
    big_s = res.samples[0]
    assert 100_000 < big_s.prompt < 600_000
    cov = res.coverage(2048)
    assert cov.whole_share == 0.5 and cov.max_tokens == 2048
    assert res.summary().token_length_percentiles[100] == big_s.total


# ----------------------------------------------------------------------------------------------------------
# infer_seqlen, truncation, coverage, summary
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source,target,cutoff,expected", [
    (100, 50, 1024, (100, 50)),  # fits: nothing cut
    (1000, 100, 512, (412, 100)),  # short response (2*100 < 512): keep it, cut the prompt
    (100, 1000, 512, (100, 412)),  # short prompt (2*100 < 512): keep it, cut the response
    (600, 400, 512, (308, 204)),  # both long: response gets int(512 * 400/1000) = 204
    (300, 300, 512, (256, 256)),  # both exactly half or more: proportional
    (3, 3, 5, (3, 2)),  # int(5 * 0.5) = 2 for the response, the prompt keeps 3
    (10, 10, 0, (0, 0)),  # no budget left
    (0, 700, 512, (0, 512)),  # a response alone is cut to the cutoff
    (256, 256, 512, (256, 256)),  # exactly the cutoff: whole
])
def test_infer_seqlen(source, target, cutoff, expected):
    assert infer_seqlen(source, target, cutoff) == expected


def test_truncate_turn_by_turn():
    smp = SampleTokens(((10, 20), (30, 40)))
    assert truncate(smp, 1000) == (100, 60)
    # turn 1 fits (30 used); turn 2 gets 20: int(20 * 40/70) = 11 response, 9 prompt
    assert truncate(smp, 50) == (50, 31)
    assert truncate(smp, 30) == (30, 20)  # turn 2 skipped: nothing left
    eos = SampleTokens(((10, 20),), extra=1)  # efficient_eos reserves one token, which is supervised
    assert truncate(eos, 31) == (31, 21)


def test_truncate_efficient_eos_budget():
    # budget 20 for (10, 20): 2*20 < 20 is false; 2*10 < 20 is false -> int(20 * 20/30) = 13, prompt 7
    assert infer_seqlen(10, 20, 20) == (7, 13)
    assert truncate(SampleTokens(((10, 20),), extra=1), 21) == (21, 14)


def test_coverage_table_on_a_tiny_dataset():
    samples = [SampleTokens(((50, 50),)), SampleTokens(((100, 100),)), SampleTokens(((150, 250),)),
               SampleTokens(((30, 20), (30, 20)))]
    c = coverage(samples, 200)
    assert c.whole_share == 0.75  # 100, 200 and 100 fit; 400 does not
    # the 400 one: int(200 * 250/400) = 125 response tokens of 250 kept
    assert c.response_kept_share == pytest.approx((50 + 100 + 125 + 40) / (50 + 100 + 250 + 40))
    assert c.mean_tokens == pytest.approx((100 + 200 + 200 + 100) / 4)
    assert c.max_tokens == 200 and c.truncated == 1
    assert coverage(samples, 100).whole_share == 0.5
    assert coverage(samples, 400).whole_share == 1.0
    assert token_pairs(samples) == [(50, 50), (100, 100), (150, 250), (60, 40)]


def test_summary_coverage_truncates_by_llamafactorys_rule():
    """A data summary's kept share (search/perf.summary_coverage) applies infer_seqlen to its quantile samples: with
    one length, prompt 200 + response 800 at cutoff 600 keeps 600 - 200 = 400 response tokens (the short prompt is
    kept whole), not the proportional 480."""
    from optimizer.search.perf import summary_coverage

    assert summary_coverage({0: 1000, 100: 1000}, 0.8, 600) == 0.5
    assert summary_coverage({0: 1000, 100: 1000}, 0.2, 600) == 1.0  # a short response is kept whole
    assert summary_coverage({0: 1000, 100: 1000}, 0.5, 600) == int(600 * 0.5) / 500  # both cut in proportion


def test_summary_coverage_tracks_the_exact_coverage_of_the_reference_data():
    """The summary of the reference data (13 percentiles, one response share) against the exact per-sample
    truncation: within 5 points at every cutoff (measured: 128 -0.3, 256 +4.5, 384 +1.5, 512 -0.6, 768 +0.2)."""
    from optimizer.search.perf import summary_coverage

    measured = count_tokens(ROOT / "problems/data/triz_synthetic.json", template="qwen",
                            counter=ApproxCounter(tokenizer_family("Qwen/Qwen2.5-3B-Instruct", "qwen2", "qwen")),
                            formatting="alpaca")
    s = measured.summary()
    for cutoff in (128, 256, 384, 512, 768, 1024):
        exact = measured.coverage(cutoff).response_kept_share
        assert abs(summary_coverage(s.token_length_percentiles, s.response_token_share, cutoff) - exact) <= 0.05


def test_summary():
    samples = [SampleTokens(((t - t // 2, t // 2),)) for t in range(1, 101)]  # totals 1..100
    s = summarize(samples)
    assert isinstance(s, DatasetSummary)
    assert s.num_samples == 100
    assert list(s.token_length_percentiles) == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99, 100]
    assert s.token_length_percentiles[0] == 1 and s.token_length_percentiles[50] == 50
    assert s.token_length_percentiles[95] == 95 and s.token_length_percentiles[100] == 100
    assert s.response_token_share == pytest.approx(sum(t // 2 for t in range(1, 101)) / 5050)


# ----------------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------------


def test_cache_second_call_does_not_retokenize(tmp_path):
    p = write(tmp_path / "a.json", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)])
    counter = CharCounter()
    first = count_tokens(p, template="qwen", counter=counter)
    assert counter.calls == 1 and not first.from_cache
    second = count_tokens(p, template="qwen", counter=counter)
    assert counter.calls == 1 and second.from_cache
    assert second.samples == first.samples
    files = list((Path(os.environ["TRAINFIT_CACHE"]) / "tokens").iterdir())
    assert len(files) == 1 and not files[0].name.startswith(".tmp")
    count_tokens(p, template="llama3", counter=counter)  # another template: counted again
    assert counter.calls == 2
    write(p, [{"instruction": "changed", "output": "x"}])  # new content: counted again
    assert count_tokens(p, template="qwen", counter=counter).samples[0].turns != first.samples[0].turns
    assert counter.calls == 3


def test_unwritable_cache_is_skipped(tmp_path, monkeypatch):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x", encoding="utf-8")
    monkeypatch.setenv("TRAINFIT_CACHE", str(blocker))
    p = write(tmp_path / "a.json", [{"instruction": "q", "output": "a"}])
    assert count_tokens(p, template="qwen", counter=CharCounter()).samples


def test_corrupt_cache_entry_is_recomputed(tmp_path):
    p = write(tmp_path / "a.json", [{"instruction": "q", "output": "a"}])
    counter = CharCounter()
    count_tokens(p, template="qwen", counter=counter)
    (entry,) = (Path(os.environ["TRAINFIT_CACHE"]) / "tokens").iterdir()
    entry.write_text("{not json", encoding="utf-8")
    assert not count_tokens(p, template="qwen", counter=counter).from_cache
    assert counter.calls == 2


# ----------------------------------------------------------------------------------------------------------
# The shipped synthetic TRIZ set
# ----------------------------------------------------------------------------------------------------------


def test_synthetic_dataset_shape_and_determinism():
    data = json.loads(SYNTHETIC.read_text(encoding="utf-8"))
    assert len(data) == 300
    assert all(set(r) == {"instruction", "input", "output"} and r["instruction"] and r["output"] for r in data)
    assert 0.4 < sum(bool(r["input"]) for r in data) / 300 < 0.9
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import make_synthetic_dataset as gen
    finally:
        sys.path.pop(0)
    assert gen.dumps(gen.generate()) == SYNTHETIC.read_text(encoding="utf-8")


def test_synthetic_dataset_about_80_percent_whole_at_384():
    res = count_tokens(SYNTHETIC, template="qwen", counter=ApproxCounter("qwen"))
    assert len(res.samples) == 300
    at384 = res.coverage(384).whole_share
    assert 0.75 <= at384 <= 0.85, at384
    assert res.coverage(256).whole_share < at384 < res.coverage(512).whole_share <= res.coverage(1024).whole_share
    s = res.summary()
    assert s.num_samples == 300 and 0.5 < s.response_token_share < 0.9


def test_analyze_dataset_end_to_end():
    res = analyze_dataset(SYNTHETIC, model="Qwen/Qwen2.5-3B-Instruct")
    assert res.template == "qwen" and len(res.samples) == 300
    assert res.summary().token_length_percentiles[100] > 384


# ----------------------------------------------------------------------------------------------------------
# Real tokenizers (optional packages)
# ----------------------------------------------------------------------------------------------------------


def _tiny_tokenizer_json(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "user": 3, "assistant": 4, "system": 5}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": None}), encoding="utf-8")
    return folder / "tokenizer.json"


@pytest.mark.skipif(not HAS_TOKENIZERS, reason="needs the tokenizers package")
def test_tokenizer_json_counter_and_resolution(tmp_path):
    path = _tiny_tokenizer_json(tmp_path / "model")
    counter = resolve_counter(str(tmp_path / "model"))
    assert counter.exact and counter.id.startswith("hf:") and counter.has_bos is False
    assert counter.count_batch(["hello world", "<|im_start|>user\nhello<|im_end|>"]) == [2, 4]
    assert resolve_counter(tokenizer=path).id == counter.id
    p = write(tmp_path / "a.json", [{"instruction": "hello", "output": "world"}])
    (smp,) = count_tokens(p, template="qwen", counter=counter, cache=False).samples
    assert smp.response == 2  # "world" + <|im_end|>; the trailing "\n" is no token for Whitespace


@pytest.mark.skipif(not HAS_TOKENIZERS, reason="needs the tokenizers package")
def test_hf_cache_lookup(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    base = hub / "models--Org--Model"
    _tiny_tokenizer_json(base / "snapshots" / "abc123")
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("abc123", encoding="utf-8")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert find_tokenizer_json("Org/Model") == base / "snapshots" / "abc123" / "tokenizer.json"
    assert resolve_counter("Org/Model").id.startswith("hf:")
    assert find_tokenizer_json("Org/Other") is None


def test_missing_tokenizer_file_is_an_error(tmp_path):
    with pytest.raises(TrainfitError, match=r"does not exist"):
        resolve_counter(tokenizer=tmp_path / "nope.json")


def test_no_tokenizer_anywhere_falls_back_to_the_approximation():
    c = resolve_counter("Qwen/Qwen2.5-3B-Instruct", use_packages=False)
    assert isinstance(c, ApproxCounter) and c.family == "qwen"


@pytest.mark.skipif(not HAS_QUICKTOK, reason="needs quicktok-v1 (exact Qwen vocabulary)")
def test_synthetic_dataset_with_the_real_qwen_tokenizer():
    counter = resolve_counter("Qwen/Qwen2.5-3B-Instruct")
    assert counter.exact
    real = count_tokens(SYNTHETIC, template="qwen", counter=counter)
    assert 0.78 <= real.coverage(384).whole_share <= 0.83
    approx = count_tokens(SYNTHETIC, template="qwen", counter=ApproxCounter("qwen"))
    errs = sorted(abs(a.total - r.total) / r.total for a, r in zip(approx.samples, real.samples))
    assert errs[len(errs) // 2] < 0.06 and errs[-1] < 0.2


def test_local_model_folder_and_config_json(tmp_path):
    folder = tmp_path / "Qwen2.5-3B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}), encoding="utf-8")
    assert template_for_model(str(folder)) == "qwen"
    assert template_for_model(str(folder / "config.json")) == "qwen"
    assert tokenizer_family(str(folder / "config.json")) == "qwen"
    assert find_tokenizer_json(str(folder / "config.json")) is None


def test_record_keys(tmp_path):
    from optimizer.data.read import record_keys

    p = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o"},
                                           {"instruction": "i", "output": "o", "system": "S"}])
    assert record_keys(p) == {"instruction", "output", "system"}
