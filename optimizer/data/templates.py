"""LLaMA-Factory chat templates, as data: what text (and which special tokens) each SFT turn becomes.

This mirrors how LLaMA-Factory 0.9.5 (`data/template.py`, `data/formatter.py`) turns a conversation into
token ids for supervised fine-tuning, so that trainfit can count prompt and response tokens without
LLaMA-Factory, transformers or a GPU:

- A template has slot lists for the prefix, system, user, assistant, observation (tool result) and function
  (tool call) messages. A slot is a string in which ``{{content}}`` is replaced by the message text, or a
  special-token marker (``BOS``/``EOS``) that becomes one token id.
- Turn 0's prompt is prefix + system + user; the system block is written when the sample's system text or the
  template's ``default_system`` is non-empty (Qwen2.5's ``qwen``: "You are Qwen, created by Alibaba Cloud. You
  are a helpful assistant."). Later turns' prompts are just the user slot.
- ``system_in_user`` templates (LLaMA-Factory's ``Llama2Template``: gemma*, mistral, ministral, llama2) put the
  system block's first slot in front of the first user message instead.
- ``efficient_eos`` templates (gemma2, glm4) end the sequence with one EOS token, which is supervised.
- ``reasoning`` templates (qwen3, deepseekr1: LLaMA-Factory's ``ReasoningTemplate``) prepend an empty thought,
  ``<think>\\n\\n</think>\\n\\n``, to every assistant turn that has no ``<think>``/``</think>`` of its own; with
  LLaMA-Factory's default ``enable_thinking: true`` those tokens are part of the supervised response.
- Each string element is tokenized on its own (``tokenizer.encode(elem, add_special_tokens=False)``), which is
  what :func:`render_turns` returns: per turn, the prompt (source) elements and the response (target) elements.

Tool definitions (``tools``) and tool-call turns are rendered approximately (the JSON text inside the
template's tool slots with a short preamble), not with LLaMA-Factory's exact tool prompts.

Template names are LLaMA-Factory's. :func:`template_for_model` maps a model id / ``model_type`` to one, through
the same table the config emitter uses (``optimizer.models.families.template_for``), with :data:`FALLBACK` for unknown
models.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

__all__ = [
    "BOS",
    "EOS",
    "FALLBACK",
    "ChatTemplate",
    "Element",
    "TEMPLATES",
    "get_template",
    "template_names",
    "template_for_model",
    "render_turns",
    "special_tokens",
]


class _Marker(str):
    """A special-token slot: one token id (the tokenizer's BOS or EOS)."""

    __slots__ = ()


BOS = _Marker("<<bos_token>>")
EOS = _Marker("<<eos_token>>")

Element = str  # a text element to tokenize, or a BOS/EOS marker (isinstance(x, _Marker))

FALLBACK = "fallback"
_C = "{{content}}"


@dataclass(frozen=True)
class ChatTemplate:
    """One LLaMA-Factory template (the fields that change token counts)."""

    name: str
    user: tuple[str, ...] = (_C,)
    assistant: tuple[str, ...] = (_C, EOS)
    system: tuple[str, ...] | None = None  # None: the bare text (LLaMA-Factory's default "{{content}}")
    observation: tuple[str, ...] | None = None  # None: the user slots
    function: tuple[str, ...] | None = None  # None: the assistant slots
    prefix: tuple[str, ...] = ()
    default_system: str = ""
    system_in_user: bool = False
    efficient_eos: bool = False
    reasoning: bool = False
    thought_words: tuple[str, str] = ("<think>\n", "\n</think>\n\n")
    tool_style: str = "default"  # how tool calls are written inside the function slots (approximate)
    special: tuple[str, ...] = field(default=())  # special-token strings that appear in the slots

    @property
    def system_slots(self) -> tuple[str, ...]:
        return self.system if self.system is not None else (_C,)

    @property
    def observation_slots(self) -> tuple[str, ...]:
        return self.observation if self.observation is not None else self.user

    @property
    def function_slots(self) -> tuple[str, ...]:
        return self.function if self.function is not None else self.assistant


_IM = ("<|im_start|>", "<|im_end|>")
_CHATML_USER = ("<|im_start|>user\n" + _C + "<|im_end|>\n<|im_start|>assistant\n",)
_CHATML_ASSISTANT = (_C + "<|im_end|>\n",)
_CHATML_SYSTEM = ("<|im_start|>system\n" + _C + "<|im_end|>\n",)
_QWEN_OBS = ("<|im_start|>user\n<tool_response>\n" + _C + "\n</tool_response><|im_end|>\n<|im_start|>assistant\n",)
_GEMMA_KW = dict(
    user=("<start_of_turn>user\n" + _C + "<end_of_turn>\n<start_of_turn>model\n",),
    assistant=(_C + "<end_of_turn>\n",),
    system=(_C + "\n\n",),
    observation=("<start_of_turn>tool\n" + _C + "<end_of_turn>\n<start_of_turn>model\n",),
    prefix=(BOS,),
    system_in_user=True,
    special=("<start_of_turn>", "<end_of_turn>"),
)
_LLAMA3_SPECIAL = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>")

_QWEN = ChatTemplate(
    name="qwen",
    user=_CHATML_USER,
    assistant=_CHATML_ASSISTANT,
    system=_CHATML_SYSTEM,
    observation=_QWEN_OBS,
    default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    tool_style="qwen",
    special=_IM,
)

_ALL: tuple[ChatTemplate, ...] = (
    # LLaMA-Factory's `default` (no template named): "Human: ...<eos>\nAssistant:"
    ChatTemplate(
        name="default",
        user=("Human: " + _C, EOS, "\nAssistant:"),
        assistant=(_C, EOS, "\n"),
        system=("System: " + _C, EOS, "\n"),
    ),
    ChatTemplate(name="empty", assistant=(_C,)),
    ChatTemplate(
        name="alpaca",
        user=("### Instruction:\n" + _C + "\n\n### Response:\n",),
        assistant=(_C, EOS, "\n\n"),
        default_system=(
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n"
        ),
    ),
    ChatTemplate(
        name="chatml",
        user=_CHATML_USER,
        assistant=_CHATML_ASSISTANT,
        system=_CHATML_SYSTEM,
        observation=("<|im_start|>tool\n" + _C + "<|im_end|>\n<|im_start|>assistant\n",),
        special=_IM,
    ),
    _QWEN,
    # [S] LLaMA-Factory data/template.py `qwen2_vl`: "copied from qwen template", default_system "You are a helpful
    # assistant."; its qwen2_vl mm_plugin turns each <image> into image tokens (counted in optimizer.data.images)
    replace(_QWEN, name="qwen2_vl", default_system="You are a helpful assistant."),
    ChatTemplate(
        name="qwen3",
        user=_CHATML_USER,
        assistant=_CHATML_ASSISTANT,
        system=_CHATML_SYSTEM,
        observation=_QWEN_OBS,
        reasoning=True,
        tool_style="qwen",
        special=_IM + ("<think>", "</think>"),
    ),
    ChatTemplate(
        name="qwen3_nothink",
        user=_CHATML_USER,
        assistant=_CHATML_ASSISTANT,
        system=_CHATML_SYSTEM,
        observation=_QWEN_OBS,
        tool_style="qwen",
        special=_IM,
    ),
    ChatTemplate(
        name="smollm2",
        user=_CHATML_USER,
        assistant=_CHATML_ASSISTANT,
        system=_CHATML_SYSTEM,
        default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face.",
        special=_IM,
    ),
    ChatTemplate(
        name="cpm4",
        user=_CHATML_USER,
        assistant=_CHATML_ASSISTANT,
        system=_CHATML_SYSTEM,
        observation=("<|im_start|>tool\n" + _C + "<|im_end|>\n<|im_start|>assistant\n",),
        prefix=(BOS,),
        special=_IM,
    ),
    ChatTemplate(
        name="llama2",
        user=(BOS, "[INST] " + _C + " [/INST]"),
        system=("<<SYS>>\n" + _C + "\n<</SYS>>\n\n",),
        system_in_user=True,
    ),
    ChatTemplate(
        name="llama3",
        user=(
            "<|start_header_id|>user<|end_header_id|>\n\n" + _C + "<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        assistant=(_C + "<|eot_id|>",),
        system=("<|start_header_id|>system<|end_header_id|>\n\n" + _C + "<|eot_id|>",),
        function=(_C + "<|eot_id|>",),
        observation=(
            "<|start_header_id|>ipython<|end_header_id|>\n\n" + _C + "<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        prefix=(BOS,),
        tool_style="llama3",
        special=_LLAMA3_SPECIAL,
    ),
    ChatTemplate(
        name="mistral",
        user=("[INST] " + _C + "[/INST]",),
        assistant=(" " + _C, EOS),
        system=(_C + "\n\n",),
        function=("[TOOL_CALLS] " + _C, EOS),
        observation=('[TOOL_RESULTS] {"content": ' + _C + "}[/TOOL_RESULTS]",),
        prefix=(BOS,),
        system_in_user=True,
        tool_style="mistral",
        special=("[INST]", "[/INST]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
    ),
    ChatTemplate(
        name="ministral",
        user=("[INST]" + _C + "[/INST]",),
        assistant=(_C, EOS),
        system=(_C + "\n\n",),
        function=("[TOOL_CALLS]" + _C, EOS),
        observation=('[TOOL_RESULTS]{"content": ' + _C + "}[/TOOL_RESULTS]",),
        prefix=(BOS,),
        system_in_user=True,
        tool_style="mistral",
        special=("[INST]", "[/INST]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
    ),
    ChatTemplate(
        name="mistral_small",
        user=("[INST]" + _C + "[/INST]",),
        system=("[SYSTEM_PROMPT]" + _C + "[/SYSTEM_PROMPT]",),
        function=("[TOOL_CALLS]" + _C, EOS),
        observation=('[TOOL_RESULTS]{"content": ' + _C + "}[/TOOL_RESULTS]",),
        prefix=(BOS,),
        tool_style="mistral",
        special=("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CALLS]", "[TOOL_RESULTS]",
                 "[/TOOL_RESULTS]"),
    ),
    ChatTemplate(name="gemma", **_GEMMA_KW),
    ChatTemplate(name="gemma2", efficient_eos=True, **_GEMMA_KW),
    ChatTemplate(name="gemma3", **_GEMMA_KW),
    ChatTemplate(
        name="phi",
        user=("<|user|>\n" + _C + "<|end|>\n<|assistant|>\n",),
        assistant=(_C + "<|end|>\n",),
        system=("<|system|>\n" + _C + "<|end|>\n",),
        special=("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"),
    ),
    ChatTemplate(
        name="phi_small",
        user=("<|user|>\n" + _C + "<|end|>\n<|assistant|>\n",),
        assistant=(_C + "<|end|>\n",),
        system=("<|system|>\n" + _C + "<|end|>\n",),
        # LLaMA-Factory's prefix is the set {"<|endoftext|>"}; `_convert_elements_to_ids` only emits a token for
        # a set holding "bos_token" or "eos_token", so that prefix adds nothing.
        special=("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"),
    ),
    ChatTemplate(
        name="phi4",
        user=("<|im_start|>user<|im_sep|>" + _C + "<|im_end|><|im_start|>assistant<|im_sep|>",),
        assistant=(_C + "<|im_end|>",),
        system=("<|im_start|>system<|im_sep|>" + _C + "<|im_end|>",),
        special=_IM + ("<|im_sep|>",),
    ),
    ChatTemplate(
        name="phi4_mini",
        user=("<|user|>" + _C + "<|end|><|assistant|>",),
        assistant=(_C + "<|end|>",),
        system=("<|system|>" + _C + "<|end|>",),
        special=("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"),
    ),
    ChatTemplate(
        name="deepseekr1",
        user=("<｜User｜>" + _C + "<｜Assistant｜>",),
        prefix=(BOS,),
        reasoning=True,
        special=("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"),
    ),
    # [S] LLaMA-Factory 0.9.5 data/template.py `glm4`: prefix "[gMASK]<sop>" (text), no EOS after each answer but
    # one at the end (efficient_eos); stop words <|user|>, <|observation|> (added as special tokens, EOS kept)
    ChatTemplate(
        name="glm4",
        user=("<|user|>\n" + _C + "<|assistant|>",),
        assistant=("\n" + _C,),
        system=("<|system|>\n" + _C,),
        function=(_C,),
        observation=("<|observation|>\n" + _C + "<|assistant|>",),
        prefix=("[gMASK]<sop>",),
        efficient_eos=True,
        special=("[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|system|>", "<|observation|>"),
    ),
    # Not a LLaMA-Factory template: what trainfit counts with when it does not know the model's template. A
    # ChatML-shaped frame (about 5 tokens per message, like most chat formats), no default system prompt.
    ChatTemplate(
        name=FALLBACK,
        user=_CHATML_USER,
        assistant=_CHATML_ASSISTANT,
        system=_CHATML_SYSTEM,
        special=_IM,
    ),
)

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in _ALL}


def template_names() -> list[str]:
    return sorted(TEMPLATES)


def get_template(name: str) -> ChatTemplate:
    """The template called `name` (a LLaMA-Factory template name, or "fallback")."""
    from ..errors import ConfigError

    if name in TEMPLATES:
        return TEMPLATES[name]
    raise ConfigError(
        f"chat template {name!r} is not one trainfit can count tokens with. Use one of "
        f"{', '.join(template_names())} (LLaMA-Factory's names), or 'fallback' for an approximate ChatML frame."
    )


def template_for_model(model_id: str, model_type: str | None = None) -> str:
    """LLaMA-Factory template name for a model id (catalog id, hub id or local folder named after it), using the
    emitter's table and rules; :data:`FALLBACK` when nothing matches."""
    from ..errors import TrainfitError
    from ..models.families import template_for

    mtype = model_type
    model_id, local_type = _local_model(model_id)
    mtype = mtype or local_type
    if mtype is None:
        try:
            from ..models.catalog import model_configs

            entry = {k.lower(): v for k, v in model_configs().items()}.get(model_id.strip().lower())
            mtype = entry["config"].get("model_type") if entry else None
        except Exception:
            mtype = None
    try:
        name = template_for(model_id, mtype or "")
    except TrainfitError:
        return FALLBACK
    return name if name in TEMPLATES else FALLBACK


def _local_model(model: str) -> tuple[str, str | None]:
    """(name to match, model_type) for a local model folder or config.json path; (model, None) otherwise."""
    from pathlib import Path

    p = Path(model).expanduser()
    cfg = p if p.is_file() else p / "config.json"
    if not cfg.is_file():
        return model, None
    from ..errors import TrainfitError
    from ..io import read_json

    try:
        mtype = read_json(cfg, error=TrainfitError, what="a config.json").get("model_type")
    except (TrainfitError, AttributeError):
        mtype = None
    return str(cfg.parent.resolve()), mtype if isinstance(mtype, str) else None


def special_tokens(template: ChatTemplate) -> tuple[str, ...]:
    """The special-token strings the template writes (each one token id for its own tokenizer)."""
    return template.special


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------


def _apply(slots: Iterable[str], content: str) -> list[Element]:
    out: list[Element] = []
    for slot in slots:
        if isinstance(slot, _Marker):
            out.append(slot)
        else:
            out.append(slot.replace(_C, content, 1))
    return out


def _tool_calls_text(content: str, style: str) -> str:
    """A function-call message (JSON: one call or a list of {"name", "arguments"}) as the model would write it.
    LLaMA-Factory rejects content that is not JSON; so does this (ValueError)."""
    from ..io import check_json_depth, json_loads

    check_json_depth(content, error=ValueError, where="the function call")
    calls = json_loads(content)
    if not isinstance(calls, list):
        calls = [calls]
    parts = []
    for call in calls:
        if not isinstance(call, dict) or "name" not in call or "arguments" not in call:
            raise ValueError("a function call needs 'name' and 'arguments'")
        name, args = call["name"], call["arguments"]
        if style == "qwen":
            parts.append("<tool_call>\n" + json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
                         + "\n</tool_call>")
        elif style == "llama3":
            parts.append(json.dumps({"name": name, "parameters": args}, ensure_ascii=False))
        elif style == "mistral":
            parts.append(json.dumps({"name": name, "arguments": args}, ensure_ascii=False))
        else:
            parts.append(f"Action: {name}\nAction Input: {json.dumps(args, ensure_ascii=False)}")
    if style == "mistral":
        return "[" + ", ".join(parts) + "]"
    return "\n".join(parts)


def _tools_text(tools: str) -> str:
    """Approximate system-prompt text for a tool list (LLaMA-Factory writes a template-specific preamble of
    about 60-90 tokens plus each tool's JSON)."""
    return (
        "\n\n# Tools\n\nYou may call one or more functions to assist with the user query. The functions, as JSON "
        "signatures, are listed below.\n" + tools + "\nTo call a function, reply with a JSON object holding the "
        "function name and its arguments, inside the tool-call markers this model uses."
    )


def render_turns(
    template: ChatTemplate,
    messages: list[tuple[str, str]],
    system: str = "",
    tools: str = "",
) -> list[tuple[list[Element], list[Element]]]:
    """[(prompt elements, response elements)] per turn for an SFT sample, as LLaMA-Factory encodes it.

    `messages` alternate (user|observation, assistant|function), starting with a user/observation message and
    ending with an assistant/function one. Raises ValueError for a function message whose content is not a
    JSON tool call."""
    sys_text = system or template.default_system
    rendered: list[list[Element]] = []
    for i, (role, content) in enumerate(messages):
        elements: list[Element] = []
        system_prefix = ""
        if i == 0:
            elements += list(template.prefix)
            if sys_text or tools:
                full = sys_text + (_tools_text(tools) if tools else "")
                if template.system_in_user:
                    first = template.system_slots[0]
                    system_prefix = first.replace(_C, full, 1) if not isinstance(first, _Marker) else ""
                else:
                    elements += _apply(template.system_slots, full)
        if role == "user":
            elements += _apply(template.user, system_prefix + content)
        elif role == "observation":  # Llama2Template fuses the system text into a user message only
            elements += _apply(template.observation_slots, content)
        elif role == "assistant":
            elements += _apply(template.assistant, content)
        elif role == "function":
            elements += _apply(template.function_slots, _tool_calls_text(content, template.tool_style))
        else:  # pragma: no cover - the reader only produces the four roles
            raise ValueError(f"unexpected role {role!r}")
        rendered.append(elements)

    turns = [(rendered[i], rendered[i + 1]) for i in range(0, len(rendered), 2)]
    if template.reasoning:
        open_t, close_t = (w.strip() for w in template.thought_words)
        thought = template.thought_words[0] + template.thought_words[1]
        for k, (_src, tgt) in enumerate(turns):
            answer = messages[2 * k + 1][1]
            if open_t not in answer and close_t not in answer:
                # enable_thinking (default true): the empty thought is supervised, a separate encode call
                turns[k] = (_src, [thought] + tgt)
    return turns
