"""Preference (ranking) data for `stage: dpo`: read chosen/rejected pairs and count their tokens the way LLaMA-Factory
0.9.5 builds a DPO batch.

Reading ([S] LLaMA-Factory data/converter.py, `ranking: true`; data/README.md "Preference Dataset"):

- alpaca records ``{"instruction", "input", "chosen", "rejected", "system", "history"}``: the prompt is built as for
  SFT (``data.read``), ``chosen`` and ``rejected`` are the two response strings;
- sharegpt records ``{"conversations": [... ending with a user message], "chosen": {"from": "gpt", "value": ...},
  "rejected": {...}}`` (and the OpenAI form with role/content): the messages are the prompt, ``chosen`` and
  ``rejected`` are one assistant (or function) message each;
- a bare file (``chosen``/``rejected`` keys), or a dataset_info.json entry with ``"ranking": true`` whose
  ``columns`` name ``chosen`` and ``rejected`` (LLaMA-Factory has no default for them).

Counting ([S] data/processor/pairwise.py::PairwiseDatasetProcessor._encode_data_example): the prompt is every
message before the response, rendered as one prompt (``template.encode_oneturn``); ``efficient_eos`` templates add
the EOS to both responses; then ``infer_seqlen(prompt, max(chosen, rejected), cutoff_len)`` gives one budget for
the prompt and one response budget that truncates both responses. The collator
([S] data/collator.py::PairwiseDataCollatorWithPadding) puts the b chosen then the b rejected sequences in one
batch of 2b rows padded to the longest, so a pair's padded length is min(cutoff_len, prompt + max(chosen,
rejected)) (infer_seqlen keeps exactly that many tokens of prompt + the longer response): `PairTokens.total`.
Reasoning templates (e.g. qwen3): the empty thought is rendered as for SFT (data.templates.render_turns), which adds
it to every turn's response lacking one; LLaMA-Factory's ReasoningTemplate.encode_oneturn adds it to the last
response only (and strips thoughts from earlier turns), so a multi-turn prompt counts the empty thought's few tokens
once per earlier turn too many. Single-turn pairs count exactly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..schema import DatasetSummary
from .dataset import SUMMARY_PERCENTILES, Coverage, _count_conversations, infer_seqlen, summary_of
from .read import (
    Conversation,
    DatasetError,
    DatasetFormat,
    _convert_alpaca,
    _convert_openai,
    _convert_sharegpt,
    _detect_format,
    _kind,
    _rows,
    resolve_source,
)
from .templates import ChatTemplate, get_template
from .tokens import TokenCounter

__all__ = ["Pair", "PairTokens", "PairwiseTokens", "read_pairs", "count_pairs", "truncate_pair"]


@dataclass(frozen=True)
class Pair:
    """One preference sample: the prompt messages (ending with a user/observation message) and two responses."""

    prompt: tuple[tuple[str, str], ...]
    chosen: tuple[str, str]  # (role, content): assistant or function
    rejected: tuple[str, str]
    system: str = ""
    tools: str = ""


@dataclass(frozen=True)
class PairTokens:
    """One pair's token counts: the prompt (all messages before the response) and each response (with the EOS of an
    efficient_eos template)."""

    prompt: int
    chosen: int
    rejected: int

    @property
    def total(self) -> int:
        """What the collator pads to before truncation: the prompt plus the longer response."""
        return self.prompt + max(self.chosen, self.rejected)

    @property
    def response(self) -> int:
        """Supervised tokens: both responses (the DPO loss reads the log-probs of each)."""
        return self.chosen + self.rejected


def truncate_pair(pair: PairTokens, cutoff_len: int) -> tuple[int, int, int]:
    """(kept prompt, kept chosen, kept rejected) at `cutoff_len`: one infer_seqlen on (prompt, longer response), its
    response budget applied to both responses (module docstring)."""
    source, target = infer_seqlen(pair.prompt, max(pair.chosen, pair.rejected), cutoff_len)
    return source, min(pair.chosen, target), min(pair.rejected, target)


def pair_coverage(pairs: Sequence[PairTokens], cutoff_len: int) -> Coverage:
    """What cutoff_len keeps of preference data: lengths are padded pair lengths (prompt + longer response),
    supervised tokens both responses, all tokens both sequences."""
    if cutoff_len <= 0:
        raise ValueError("cutoff_len must be positive")
    if not pairs:
        raise ValueError("no samples")
    whole = kept_tok = kept_resp = all_tok = all_resp = kept_len = longest = 0
    for p in pairs:
        s, c, r = truncate_pair(p, cutoff_len)
        whole += (s, c, r) == (p.prompt, p.chosen, p.rejected)
        kept_tok += 2 * s + c + r
        all_tok += 2 * p.prompt + p.chosen + p.rejected
        kept_resp += c + r
        all_resp += p.response
        kept_len += s + max(c, r)
        longest = max(longest, s + max(c, r))
    n = len(pairs)
    return Coverage(cutoff_len=cutoff_len, whole_share=whole / n,
                    response_kept_share=kept_resp / all_resp if all_resp else 1.0,
                    tokens_kept_share=kept_tok / all_tok if all_tok else 1.0, mean_tokens=kept_len / n,
                    max_tokens=longest, truncated=n - whole)


def summarize_pairs(pairs: Sequence[PairTokens], percentiles: Iterable[int] = SUMMARY_PERCENTILES) -> DatasetSummary:
    """A DatasetSummary of pairs: percentiles of the padded pair length (prompt + longer response) and the longer
    response's share of it, so that the summary-based estimates (search/perf.py, search/quality.py coverage) see
    the sequence the collator pads to."""
    if not pairs:
        raise DatasetError("the dataset has no samples. Put preference pairs in it.")
    return summary_of([p.total for p in pairs], sum(max(p.chosen, p.rejected) for p in pairs), percentiles)


@dataclass(frozen=True)
class PairwiseTokens:
    """Token counts of a preference dataset, with what produced them (the interface of data.dataset.DatasetTokens)."""

    source: str
    template: str
    tokenizer_id: str
    tokenizer: str
    exact: bool
    samples: tuple[PairTokens, ...] = field(repr=False)
    pairwise = True  # what report.data_text reads to label pairs

    def summary(self) -> DatasetSummary:
        return summarize_pairs(self.samples)

    def coverage(self, cutoff_len: int) -> Coverage:
        return pair_coverage(self.samples, cutoff_len)

    def coverage_table(self, cutoffs: Iterable[int]) -> list[Coverage]:
        return [pair_coverage(self.samples, c) for c in cutoffs]


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


def _response_message(rec: dict, col: str, fmt: DatasetFormat, where: str) -> dict:
    """A sharegpt/openai chosen or rejected message: an object with an assistant (or function) role and text."""
    rt, ct = fmt.role_tag or "from", fmt.content_tag or "value"
    m = rec.get(col)
    example = f'{{"{rt}": "{fmt.assistant_tag}", "{ct}": "..."}}'
    if not isinstance(m, dict):
        what = "is missing" if m is None else f"is {_kind(m)}"
        raise DatasetError(f"{where}: '{col}' {what}; a ranking sample needs it as one message, {example}. Add it, "
                           "or remove the row.")
    if m.get(rt) not in (fmt.assistant_tag, fmt.function_tag):
        raise DatasetError(f"{where}: '{col}' has {rt} {m.get(rt)!r}; it must be {fmt.assistant_tag!r} (or "
                           f"{fmt.function_tag!r}). Write it as {example}.")
    if not isinstance(m.get(ct), str):
        raise DatasetError(f"{where}: '{col}' '{ct}' is {_kind(m.get(ct))}, not a string. Write the response as text.")
    return m


def _convert_pair(rec: dict, fmt: DatasetFormat, where: str) -> Pair:
    chosen_col, rejected_col = fmt.chosen or "chosen", fmt.rejected or "rejected"
    if fmt.formatting == "alpaca":
        for col in (chosen_col, rejected_col):
            if not isinstance(rec.get(col), str):
                what = "is missing" if rec.get(col) is None else f"is {_kind(rec.get(col))}"
                raise DatasetError(f"{where}: '{col}' {what}; every ranking sample needs '{chosen_col}' and "
                                   f"'{rejected_col}' response strings. Add them, or remove the row.")
        conv = _convert_alpaca(rec, replace(fmt, response=chosen_col), where)
        return Pair(conv.messages[:-1], conv.messages[-1], ("assistant", rec[rejected_col]), conv.system, conv.tools)
    col = fmt.messages or "conversations"
    msgs = rec.get(col)
    rt = fmt.role_tag or "from"
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and \
            msgs[-1].get(rt) not in (fmt.user_tag, fmt.observation_tag):
        raise DatasetError(f"{where}: '{col}' must end with a {fmt.user_tag!r} message in a ranking sample (the "
                           f"responses are '{chosen_col}' and '{rejected_col}'). Move the last response out of "
                           f"'{col}', or remove the row.")
    convert = _convert_openai if fmt.formatting == "openai" else _convert_sharegpt  # as data.read.read_files
    out: list[Conversation] = []
    for resp_col in (chosen_col, rejected_col):
        m = _response_message(rec, resp_col, fmt, where)
        out.append(convert({**rec, col: [*(msgs if isinstance(msgs, list) else []), m]}, fmt, where))
    c, r = out
    return Pair(c.messages[:-1], c.messages[-1], r.messages[-1], c.system, c.tools)


def read_pairs(files: list[Path], fmt: DatasetFormat | None) -> list[Pair]:
    """Every pair of the files (format detected from the first record when `fmt` is None)."""
    out: list[Pair] = []
    for f in files:
        rows = _rows(f)
        ffmt = fmt or _detect_format(f, rows)
        if not ffmt.ranking:
            ffmt = replace(ffmt, ranking=True, chosen="chosen", rejected="rejected")
        for label, rec in rows:
            where = f"{f}: {label}"
            if not isinstance(rec, dict):
                raise DatasetError(f"{where} is {_kind(rec)}, not a record. Each sample must be a JSON object.")
            out.append(_convert_pair(rec, ffmt, where))
    return out


def count_pairs(
    path: str | os.PathLike[str],
    *,
    template: str | ChatTemplate,
    counter: TokenCounter,
    dataset: str | None = None,
    formatting: str | None = None,
) -> PairwiseTokens:
    """Per-pair token counts of a preference dataset rendered with `template` and counted with `counter` (not
    cached: each pair renders twice, chosen and rejected)."""
    tpl = get_template(template) if isinstance(template, str) else template
    files, fmt, name = resolve_source(path, dataset, formatting, ranking=True)
    pairs = read_pairs(files, fmt)
    convs = [Conversation(p.prompt + (resp,), p.system, p.tools) for p in pairs for resp in (p.chosen, p.rejected)]
    counted = _count_conversations(convs, tpl, counter, name)
    samples = []
    for i in range(0, len(counted), 2):
        c, r = counted[i], counted[i + 1]
        last_c, last_r = c.turns[-1][1] + c.extra, r.turns[-1][1] + r.extra
        samples.append(PairTokens(prompt=c.total - last_c, chosen=last_c, rejected=last_r))
    return PairwiseTokens(name, tpl.name, counter.id, counter.description, counter.exact, tuple(samples))
