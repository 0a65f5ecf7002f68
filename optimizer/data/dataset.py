"""Know the user's data: count prompt and response tokens per sample the way LLaMA-Factory 0.9.5 builds them
(read by `data.read`), and turn the counts into what the solver needs.

Counting (see :mod:`optimizer.chat_templates` for the rendering): every assistant turn is supervised
(``mask_history: false``, ``train_on_prompt: false``), each turn's prompt (source) and response (target) tokens
are kept apart, because LLaMA-Factory truncates turn by turn with :func:`infer_seqlen`. Counts are cached under
``$TRAINFIT_CACHE`` (default ``~/.cache/trainfit``), keyed by the data's content hash, the tokenizer id, the
template and the reading format, and written atomically; a repeated call only hashes the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..schema import DatasetSummary
from .images import IMAGE_PLACEHOLDER
from .read import Conversation, DatasetError, read_files, resolve_source
from .templates import BOS, EOS, ChatTemplate, get_template, render_turns, template_for_model
from .tokens import TokenCounter, count_with_specials, resolve_counter

__all__ = [
    "SampleTokens",
    "DatasetTokens",
    "Coverage",
    "SUMMARY_PERCENTILES",
    "count_tokens",
    "analyze_dataset",
    "infer_seqlen",
    "truncate",
    "coverage",
    "coverage_table",
    "greedy_knapsack_count",
    "packed_rows",
    "summarize",
    "token_pairs",
    "cache_dir",
]

CACHE_VERSION = 2  # 2: the <image> placeholders of samples with images are not counted as text
SUMMARY_PERCENTILES = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99, 100)


# ----------------------------------------------------------------------------------------------------------
# Token counts
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleTokens:
    """One sample's token counts: per turn (prompt/source tokens, response/target tokens), plus `extra` tokens at
    the end (the supervised EOS of an ``efficient_eos`` template)."""

    turns: tuple[tuple[int, int], ...]
    extra: int = 0

    @property
    def prompt(self) -> int:
        return sum(s for s, _ in self.turns)

    @property
    def response(self) -> int:
        return sum(t for _, t in self.turns) + self.extra

    @property
    def total(self) -> int:
        return self.prompt + self.response


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's truncation of one turn to `cutoff_len` tokens (``processor_utils.infer_seqlen``): a short
    response (under half the budget) is kept whole and the prompt cut; else a short prompt is kept and the response
    cut; else both are cut in proportion (the response gets ``int(cutoff * target / (source + target))``).
    Returns (kept source tokens, kept target tokens)."""
    if target_len * 2 < cutoff_len:
        max_target = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target = cutoff_len - source_len
    else:
        # the same float expression as LLaMA-Factory, so that rounding matches it exactly
        max_target = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target = min(max_target, target_len)
    new_source = min(max(cutoff_len - new_target, 0), source_len)
    return new_source, new_target


def truncate(sample: SampleTokens, cutoff_len: int) -> tuple[int, int]:
    """(sequence length, supervised tokens) of a sample after LLaMA-Factory's SFT truncation at `cutoff_len`:
    turn by turn, each turn's budget is what earlier turns left (``SupervisedDatasetProcessor``)."""
    total = sample.extra  # efficient_eos reserves its EOS first
    kept_response = 0
    for s, t in sample.turns:
        if total >= cutoff_len:
            break
        s2, t2 = infer_seqlen(s, t, cutoff_len - total)
        total += s2 + t2
        kept_response += t2
    return total, kept_response + sample.extra


@dataclass(frozen=True)
class Coverage:
    """What cutoff_len keeps of a dataset."""

    cutoff_len: int
    whole_share: float  # samples kept whole
    response_kept_share: float  # supervised (response) tokens kept
    tokens_kept_share: float  # all tokens kept
    mean_tokens: float  # mean sequence length after truncation
    max_tokens: int  # longest sequence after truncation
    truncated: int  # samples cut
    packed_rows: int = 0  # rows of cutoff_len tokens that `packing: true` makes of the dataset (`packed_rows`)


def coverage(samples: Sequence[SampleTokens], cutoff_len: int) -> Coverage:
    """Exact LLaMA-Factory truncation of every sample at `cutoff_len`."""
    if cutoff_len <= 0:
        raise ValueError("cutoff_len must be positive")
    if not samples:
        raise ValueError("no samples")
    whole = kept_tok = kept_resp = all_tok = all_resp = 0
    longest = 0
    for smp in samples:
        length, resp = truncate(smp, cutoff_len)
        total, response = smp.total, smp.response
        whole += length == total and resp == response
        kept_tok += length
        kept_resp += resp
        all_tok += total
        all_resp += response
        longest = max(longest, length)
    n = len(samples)
    return Coverage(
        cutoff_len=cutoff_len,
        whole_share=whole / n,
        response_kept_share=kept_resp / all_resp if all_resp else 1.0,
        tokens_kept_share=kept_tok / all_tok if all_tok else 1.0,
        mean_tokens=kept_tok / n,
        max_tokens=longest,
        truncated=n - whole,
        packed_rows=packed_rows(samples, cutoff_len),
    )


def greedy_knapsack_count(lengths: Iterable[int], capacity: int) -> int:
    """How many knapsacks LLaMA-Factory's greedy packing fills ([S] data/processor/processor_utils.py::
    greedy_knapsack: sort ascending, then fill one knapsack at a time with the longest length that still fits,
    until none fits). Equal lengths are interchangeable, so a count per length gives the same knapsacks without
    the list pops (quadratic on large datasets)."""
    import bisect
    from collections import Counter

    left = Counter(lengths)
    distinct = sorted(left)
    rows = 0
    while distinct:
        rows += 1
        room = capacity
        while True:
            i = bisect.bisect(distinct, room) - 1
            if i < 0:
                break
            length = distinct[i]
            room -= length
            left[length] -= 1
            if not left[length]:
                distinct.pop(i)
        if room == capacity:  # nothing fits an empty knapsack: LLaMA-Factory drops such samples before packing
            break
    return rows


def packed_rows(samples: Sequence[SampleTokens], cutoff_len: int) -> int:
    """Rows (micro-batch samples) that `packing: true` makes of the dataset at `cutoff_len`.

    [S] LLaMA-Factory hparams/data_args.py::__post_init__ lowers cutoff_len by 1 when packing; data/processor/
    supervised.py::PackedSupervisedDatasetProcessor encodes each sample at that cutoff (the same turn-by-turn
    truncation), drops any still longer, packs the lengths with greedy_knapsack(lengths, cutoff_len - 1) and pads
    every knapsack to cutoff_len tokens."""
    capacity = cutoff_len - 1
    if capacity <= 0:
        return len(samples)
    lengths = [n for n in (truncate(s, capacity)[0] for s in samples) if n <= capacity]
    return greedy_knapsack_count(lengths, capacity)


def coverage_table(samples: Sequence[SampleTokens], cutoffs: Iterable[int]) -> list[Coverage]:
    return [coverage(samples, c) for c in cutoffs]


def _percentile(sorted_vals: Sequence[int], p: float) -> int:
    """Nearest-rank percentile (p=0: the minimum)."""
    n = len(sorted_vals)
    if p <= 0:
        return sorted_vals[0]
    rank = math.ceil(p / 100 * n)
    return sorted_vals[min(max(rank, 1), n) - 1]


def summarize(samples: Sequence[SampleTokens], percentiles: Iterable[int] = SUMMARY_PERCENTILES) -> DatasetSummary:
    """A DatasetSummary: sample count, total-length percentiles (nearest rank), response token share."""
    if not samples:
        raise DatasetError("the dataset has no samples. Put training samples in it.")
    return summary_of([s.total for s in samples], sum(s.response for s in samples), percentiles)


def summary_of(lengths: Sequence[int], response_tokens: int,
               percentiles: Iterable[int] = SUMMARY_PERCENTILES) -> DatasetSummary:
    """The DatasetSummary of per-sample lengths (nearest-rank percentiles, the 50th and 100th always) and the
    response tokens among them (their share of all tokens, within [1e-6, 1])."""
    totals = sorted(max(1, n) for n in lengths)
    pct = {int(p): _percentile(totals, p) for p in percentiles}
    pct.setdefault(50, _percentile(totals, 50))
    pct[100] = totals[-1]
    total = sum(lengths)
    share = response_tokens / total if total else 1.0
    return DatasetSummary(num_samples=len(totals), token_length_percentiles=dict(sorted(pct.items())),
                          response_token_share=min(1.0, max(share, 1e-6)))


def token_pairs(samples: Sequence[SampleTokens]) -> list[tuple[int, int]]:
    """Exact (prompt tokens, response tokens) per sample."""
    return [(s.prompt, s.response) for s in samples]


@dataclass(frozen=True)
class DatasetTokens:
    """Token counts of a whole dataset, with what produced them."""

    source: str
    template: str
    tokenizer_id: str
    tokenizer: str  # description
    exact: bool  # True when the tokenizer is the real one (the template rendering is always LLaMA-Factory's)
    samples: tuple[SampleTokens, ...] = field(repr=False)
    from_cache: bool = False

    def summary(self) -> DatasetSummary:
        return summarize(self.samples)

    def coverage(self, cutoff_len: int) -> Coverage:
        return coverage(self.samples, cutoff_len)

    def coverage_table(self, cutoffs: Iterable[int]) -> list[Coverage]:
        return coverage_table(self.samples, cutoffs)

    def pairs(self) -> list[tuple[int, int]]:
        return token_pairs(self.samples)


def cache_dir() -> Path:
    env = os.environ.get("TRAINFIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "trainfit"


def _files_digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _cache_key(digest: str, fmt_key: str, template: ChatTemplate, counter_id: str) -> str:
    h = hashlib.sha256()
    for part in (str(CACHE_VERSION), digest, fmt_key, repr(template), counter_id):
        h.update(part.encode("utf-8") + b"\0")
    return h.hexdigest()[:40]


def _cache_load(path: Path) -> list[SampleTokens] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != CACHE_VERSION:
            return None
        extra = int(data["extra"])
        return [SampleTokens(tuple((row[i], row[i + 1]) for i in range(0, len(row), 2)), extra)
                for row in data["samples"]]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _cache_store(path: Path, samples: list[SampleTokens], meta: dict[str, Any]) -> None:
    """Atomic write (temp file in the same folder + rename); a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "version": CACHE_VERSION,
            **meta,
            "extra": samples[0].extra if samples else 0,
            "samples": [[x for turn in s.turns for x in turn] for s in samples],
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(payload, f, separators=(",", ":"))
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError:
        pass


def _count_conversations(convs: Sequence[Conversation], template: ChatTemplate, counter: TokenCounter,
                         where: str) -> list[SampleTokens]:
    rendered = []
    for i, c in enumerate(convs):
        try:
            # an image's <image> placeholder becomes image tokens (optimizer.data.images), not text
            msgs = [(r, t.replace(IMAGE_PLACEHOLDER, "")) for r, t in c.messages] if c.images else list(c.messages)
            rendered.append(render_turns(template, msgs, c.system, c.tools))
        except (ValueError, TypeError) as exc:
            raise DatasetError(f"{where}: sample {i + 1} has a function-call message that is not a JSON tool call "
                               f"({exc}). Write it as {{\"name\": ..., \"arguments\": {{...}}}}.") from None
    unique: dict[str, int] = {}
    for turns in rendered:
        for src, tgt in turns:
            for el in (*src, *tgt):
                if el is not BOS and el is not EOS and el and el not in unique:
                    unique[el] = len(unique)
    texts = list(unique)
    counts = count_with_specials(counter, texts, template.special) if texts else []
    bos = 1 if getattr(counter, "has_bos", True) else 0

    def n(elements: list[str]) -> int:
        total = 0
        for el in elements:
            if el is BOS:
                total += bos
            elif el is EOS:
                total += 1
            elif el:
                total += counts[unique[el]]
        return total

    extra = 1 if template.efficient_eos else 0
    return [SampleTokens(tuple((n(src), n(tgt)) for src, tgt in turns), extra) for turns in rendered]


def count_tokens(
    path: str | os.PathLike[str],
    *,
    template: str | ChatTemplate,
    counter: TokenCounter,
    dataset: str | None = None,
    formatting: str | None = None,
    cache: bool = True,
) -> DatasetTokens:
    """Per-sample token counts of a dataset rendered with `template` and counted with `counter`.

    `path`: a .json/.jsonl file, or a dataset_info.json (or its folder) with `dataset` naming the entry.
    With `cache`, results are read from / written to :func:`cache_dir` (``tokens/<key>.json``)."""
    tpl = get_template(template) if isinstance(template, str) else template
    files, fmt, name = resolve_source(path, dataset, formatting)
    key = entry = None
    if cache:
        digest = _files_digest(files)
        key = _cache_key(digest, fmt.key() if fmt else "detect", tpl, counter.id)
        entry = cache_dir() / "tokens" / f"{key}.json"
        hit = _cache_load(entry)
        if hit is not None and hit:
            return DatasetTokens(name, tpl.name, counter.id, counter.description, counter.exact, tuple(hit), True)
    convs = read_files(files, fmt)
    samples = _count_conversations(convs, tpl, counter, name)
    if cache and entry is not None:
        _cache_store(entry, samples, {"source": name, "template": tpl.name, "tokenizer": counter.id})
    return DatasetTokens(name, tpl.name, counter.id, counter.description, counter.exact, tuple(samples), False)


def analyze_dataset(
    path: str | os.PathLike[str],
    *,
    model: str | None = None,
    model_type: str | None = None,
    template: str | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    dataset: str | None = None,
    formatting: str | None = None,
    cache: bool = True,
    pairwise: bool = False,
):
    """Count a dataset for a model: the template from `template` or the model (LLaMA-Factory's name), the best
    offline tokenizer (:func:`optimizer.tokens.resolve_counter`). `pairwise`: preference pairs (stage dpo), counted
    by :func:`optimizer.data.pairwise.count_pairs` (a PairwiseTokens; else a DatasetTokens)."""
    tpl_name = template or (template_for_model(model, model_type) if model else "fallback")
    counter = resolve_counter(model, model_type=model_type, tokenizer=tokenizer, template=tpl_name)
    if pairwise:
        from .pairwise import count_pairs

        return count_pairs(path, template=tpl_name, counter=counter, dataset=dataset, formatting=formatting)
    return count_tokens(path, template=tpl_name, counter=counter, dataset=dataset, formatting=formatting,
                        cache=cache)
