"""Input formats for ingest: detection from a file's columns, and one normalizer per format.

A normalizer turns one raw row (a dict, after ``--map``) into canonical ``Pair``s or raises
``RowProblem(reason, field)``; the stage turns problems into rejects (or errors under
``--strict``). Detection looks at column names first and at the first non-empty value only
where names cannot tell (a ``chosen``/``rejected`` file may hold HH-RLHF transcripts, plain
strings or message lists).

| format        | columns                                                                  |
|---------------|--------------------------------------------------------------------------|
| trl           | prompt, chosen, rejected: strings                                        |
| trl-chat      | chosen, rejected (and maybe prompt): message lists                       |
| implicit      | chosen, rejected: strings; the prompt is their shared prefix             |
| hh-rlhf       | chosen, rejected: "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts       |
| pairwise      | a prompt (prompt, input, instruction or question), two responses         |
|               | (response_a/_b, output_1/_2 or response_1/_2) and label, or Chatbot      |
|               | Arena's winner_model_a / winner_model_b / winner_tie                     |
| ultrafeedback | instruction or prompt; completions[] (UltraFeedback) or responses+ratings |
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prefcurate.errors import DataError
from prefcurate.schema import Message

FORMATS = ("trl", "trl-chat", "implicit", "hh-rlhf", "pairwise", "ultrafeedback")
PROMPT_KEYS = ("prompt", "input", "instruction", "question")
RESPONSE_PAIRS = (("response_a", "response_b"), ("output_1", "output_2"), ("response_1", "response_2"))
LABEL_KEYS = ("label", "winner", "preference")
ARENA_KEYS = ("winner_model_a", "winner_model_b", "winner_tie")
_TIE_WORDS = ("tie", "draw", "equal", "same", "both", "neither")


class RowProblem(Exception):
    """A row that cannot become a pair: ``reason`` (e.g. ``missing-field``) and the field."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.field = reason, field

    @property
    def label(self) -> str:
        return f"{self.reason}:{self.field}" if self.field else self.reason


@dataclass(slots=True)
class Pair:
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    tie: bool = False
    chosen_rating: float | None = None
    rejected_rating: float | None = None
    id_suffix: str | None = None
    """Set when one input row yields several pairs (all-pairs): keeps input ids unique."""


@dataclass(frozen=True)
class Layout:
    """A detected format and the column names it reads."""

    format: str
    prompt: str | None = None
    response_a: str | None = None
    response_b: str | None = None
    label: str | None = None
    numbered: bool = False  # response columns *_1/*_2: labels 1/2 (0 = tie); else a/b: 0/1 (2 = tie)


# -- detection ------------------------------------------------------------------------------


def detect(columns: Sequence[str], first_value: Callable[[str], Any], forced: str | None, file: str) -> Layout:
    """The layout of a file from its columns (``forced``: the format the user named)."""
    cols = set(columns)
    prompt = next((k for k in PROMPT_KEYS if k in cols), None)
    pair = next((p for p in RESPONSE_PAIRS if set(p) <= cols), None)
    fmt = forced or _guess(cols, pair, first_value)
    if fmt is None:
        raise DataError(
            f"unknown columns ({', '.join(sorted(cols)) or 'none'})",
            file=file,
            hint="expected prompt/chosen/rejected, chosen/rejected, a pairwise or an UltraFeedback layout; "
            "rename with --map prompt=COLUMN or name the layout with --format",
        )
    needs = _required(fmt, prompt, pair, cols)
    missing = [c for c in needs if c not in cols]
    if missing:
        raise DataError(
            f"format {fmt!r} needs column(s) {', '.join(missing)}; found {', '.join(sorted(cols))}",
            file=file,
            hint="map your columns with --map NAME=COLUMN",
        )
    if fmt == "pairwise":
        assert pair is not None
        label = next((k for k in LABEL_KEYS if k in cols), None)
        if label is None and set(ARENA_KEYS) <= cols:
            label = "arena"
        numbered = pair[0].endswith("_1")
        return Layout(fmt, prompt=prompt, response_a=pair[0], response_b=pair[1], label=label, numbered=numbered)
    if fmt == "ultrafeedback":
        return Layout(fmt, prompt=next((k for k in ("instruction", "prompt") if k in cols), prompt))
    if fmt in ("trl", "trl-chat"):
        return Layout(fmt, prompt="prompt" if "prompt" in cols else None)
    return Layout(fmt)


def _guess(cols: set[str], pair: tuple[str, str] | None, first_value: Callable[[str], Any]) -> str | None:
    if "completions" in cols or {"responses", "ratings"} <= cols:
        return "ultrafeedback"
    if pair is not None and (any(k in cols for k in LABEL_KEYS) or set(ARENA_KEYS) <= cols):
        return "pairwise"
    if not {"chosen", "rejected"} <= cols:
        return None
    sample = first_value("chosen")
    if "prompt" in cols:
        return "trl-chat" if isinstance(sample, list) or isinstance(first_value("prompt"), list) else "trl"
    if isinstance(sample, list):
        return "trl-chat"
    if isinstance(sample, str) and (sample.startswith("Human:") or "\n\nHuman:" in sample):
        return "hh-rlhf"
    return "implicit"


def _required(fmt: str, prompt: str | None, pair: tuple[str, str] | None, cols: set[str]) -> list[str]:
    if fmt == "pairwise":
        if pair is None:
            return ["response_a", "response_b"]
        has_label = any(k in cols for k in LABEL_KEYS) or set(ARENA_KEYS) <= cols
        return ([] if prompt else ["prompt"]) + ([] if has_label else ["label"])
    if fmt == "ultrafeedback":
        need = [] if ("instruction" in cols or "prompt" in cols) else ["instruction"]
        return need + ([] if "completions" in cols else ["responses", "ratings"])
    if fmt == "trl":
        return ["prompt", "chosen", "rejected"]
    return ["chosen", "rejected"]


# -- messages -------------------------------------------------------------------------------


def as_messages(value: Any, role: str, field: str) -> list[Message]:
    """A string (one ``role`` message), a message dict, or a list of message dicts."""
    if value is None:
        raise RowProblem("missing-field", field)
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowProblem("wrong-type", field)
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise RowProblem("wrong-type", field)
        out.append({"role": m["role"], "content": m["content"]})
    return out


def is_blank(messages: list[Message]) -> bool:
    return not messages or all(not m["content"].strip() for m in messages)


def check_pair(pair: Pair, prompt_required: bool = True) -> Pair:
    if prompt_required and is_blank(pair.prompt):
        raise RowProblem("empty", "prompt")
    for name in ("chosen", "rejected"):
        if is_blank(getattr(pair, name)):
            raise RowProblem("empty", name)
    if pair.chosen == pair.rejected:
        raise RowProblem("identical-responses")
    return pair


def _shared_turns(a: list[Message], b: list[Message]) -> int:
    """Length of the longest shared prefix of two conversations, ending on a non-assistant turn."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    while k > 0 and a[k - 1]["role"] == "assistant":
        k -= 1
    return k


# -- normalizers ----------------------------------------------------------------------------


def trl_row(row: dict[str, Any], layout: Layout) -> list[Pair]:
    """TRL standard or conversational, with an explicit prompt or an implicit (shared) one."""
    # Fields in the order the vectorized path checks them, so both give the same reason.
    prompt = as_messages(_get(row, layout.prompt), "user", layout.prompt) if layout.prompt else None
    chosen = as_messages(_get(row, "chosen"), "assistant", "chosen")
    rejected = as_messages(_get(row, "rejected"), "assistant", "rejected")
    tie = row.get("tie") is True  # a tie exported with `export --ties keep` stays a tie
    if prompt is None:
        k = _shared_turns(chosen, rejected)
        return [check_pair(Pair(chosen[:k], chosen[k:], rejected[k:], tie=tie), prompt_required=False)]
    # Conversational rows may repeat the prompt at the head of chosen/rejected.
    n = len(prompt)
    if chosen[:n] == prompt and rejected[:n] == prompt and len(chosen) > n and len(rejected) > n:
        chosen, rejected = chosen[n:], rejected[n:]
    return [check_pair(Pair(prompt, chosen, rejected, tie=tie))]


def implicit_row(row: dict[str, Any], layout: Layout) -> list[Pair]:
    """chosen/rejected strings: the prompt is their shared prefix, cut back to a whitespace."""
    chosen, rejected = _get(row, "chosen"), _get(row, "rejected")
    if isinstance(chosen, list) or isinstance(rejected, list):
        return trl_row(row, Layout("trl-chat"))
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            raise RowProblem("missing-field", name)
        if not isinstance(value, str):
            raise RowProblem("wrong-type", name)
    if chosen == rejected:
        raise RowProblem("identical-responses")
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    cut = max(chosen.rfind(" ", 0, k), chosen.rfind("\n", 0, k)) + 1 if k else 0
    head = chosen[:cut].rstrip()
    prompt = [{"role": "user", "content": head}] if head.strip() else []
    pair = Pair(
        prompt, [{"role": "assistant", "content": chosen[cut:]}], [{"role": "assistant", "content": rejected[cut:]}]
    )
    return [check_pair(pair, prompt_required=False)]


_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_transcript(text: Any, field: str) -> list[Message]:
    """``\\n\\nHuman: ...\\n\\nAssistant: ...`` into messages; content keeps its exact text."""
    if text is None:
        raise RowProblem("missing-field", field)
    if not isinstance(text, str):
        raise RowProblem("wrong-type", field)
    if not text.strip():
        raise RowProblem("empty", field)
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise RowProblem("bad-transcript", field)
    out = []
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        out.append(
            {
                "role": "user" if role == "Human" else "assistant",
                "content": content[1:] if content.startswith(" ") else content,
            }
        )
    return out


def hh_row(row: dict[str, Any], layout: Layout) -> list[Pair]:
    chosen = parse_transcript(_get(row, "chosen"), "chosen")
    rejected = parse_transcript(_get(row, "rejected"), "rejected")
    if chosen == rejected:
        raise RowProblem("identical-responses")
    k = _shared_turns(chosen, rejected)
    if k == 0:
        raise RowProblem("bad-transcript", "chosen")
    return [check_pair(Pair(chosen[:k], chosen[k:], rejected[k:]))]


def pairwise_row(row: dict[str, Any], layout: Layout) -> list[Pair]:
    assert layout.prompt and layout.response_a and layout.response_b
    arena = layout.label == "arena"
    raw_prompt, raw_a, raw_b = (_get(row, k) for k in (layout.prompt, layout.response_a, layout.response_b))
    winner = (
        _arena_winner(row)
        if arena
        else _label_winner(_get(row, layout.label or "label"), layout.numbered, layout.label or "label")
    )
    if arena:
        prompt, a, b = _arena_turns(raw_prompt, raw_a, raw_b, layout)
    else:
        prompt = as_messages(raw_prompt, "user", layout.prompt)
        a = as_messages(raw_a, "assistant", layout.response_a)
        b = as_messages(raw_b, "assistant", layout.response_b)
    chosen, rejected = (b, a) if winner == "b" else (a, b)
    return [check_pair(Pair(prompt, chosen, rejected, tie=winner == "tie"))]


def _label_winner(value: Any, numbered: bool, field: str) -> str:
    """'a' | 'b' | 'tie'. Numeric labels index the response columns (see ``Layout.numbered``)."""
    if value is None:
        raise RowProblem("missing-field", field)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("a", "model_a", "response_a", "output_1", "response_1"):
            return "a"
        if text in ("b", "model_b", "response_b", "output_2", "response_2"):
            return "b"
        if text.startswith(_TIE_WORDS):
            return "tie"
        value = int(text) if text.lstrip("-").isdigit() else None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        order = {1: "a", 2: "b", 0: "tie"} if numbered else {0: "a", 1: "b", 2: "tie"}
        if value in order:
            return order[value]
    raise RowProblem("bad-value", field)


def _arena_winner(row: dict[str, Any]) -> str:
    flags = [_truthy(row.get(k)) for k in ARENA_KEYS]
    if sum(flags) != 1:
        raise RowProblem("bad-value", "winner_model_a")
    return ("a", "b", "tie")[flags.index(True)]


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def _arena_turns(
    raw_prompt: Any, raw_a: Any, raw_b: Any, layout: Layout
) -> tuple[list[Message], list[Message], list[Message]]:
    """Chatbot-Arena rows hold JSON-encoded lists of turns: each model answered every user turn."""
    assert layout.prompt and layout.response_a and layout.response_b
    users = _json_list(raw_prompt, layout.prompt)
    answers_a, answers_b = _json_list(raw_a, layout.response_a), _json_list(raw_b, layout.response_b)
    if not users:
        raise RowProblem("empty", layout.prompt)

    def conversation(answers: list[str]) -> list[Message]:
        out: list[Message] = []
        for i, answer in enumerate(answers):
            if i:
                out.append({"role": "user", "content": users[i] if i < len(users) else ""})
            out.append({"role": "assistant", "content": answer})
        return out

    return [{"role": "user", "content": users[0]}], conversation(answers_a), conversation(answers_b)


def _json_list(value: Any, field: str) -> list[str]:
    if value is None:
        raise RowProblem("missing-field", field)
    if isinstance(value, str) and value.startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = [value]
    elif isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise RowProblem("wrong-type", field)
    return ["" if v is None else str(v) for v in value]


def _get(row: dict[str, Any], key: str) -> Any:
    if key not in row:
        raise RowProblem("missing-field", key)
    return row[key]


NORMALIZERS: dict[str, Callable[[dict[str, Any], Layout], list[Pair]]] = {
    "trl": trl_row,
    "trl-chat": trl_row,
    "implicit": implicit_row,
    "hh-rlhf": hh_row,
    "pairwise": pairwise_row,
}
