"""The canonical pair schema and helpers to render its messages.

Every stage reads and writes rows of this shape, plus the columns earlier stages added:

- ``id``        string. The input's own id when it had one, else a content hash (see ``pair_id``).
- ``prompt``    list of ``{role, content}``: the conversation before the compared turn.
- ``chosen``    list of ``{role, content}``: the preferred assistant turn(s).
- ``rejected``  list of ``{role, content}``: the other assistant turn(s).
- ``source``    string: where the row came from (file name or Hub id).
- ``tie``       bool: the annotators rated both responses equal (kept, never silently dropped).
- ``chosen_rating`` / ``rejected_rating``  float or null: ratings the input carried
  (UltraFeedback scores, pairwise scores), kept for filters and stats.

Messages are lists, not strings, so multi-turn data survives exactly; exporters render them
into whatever layout a trainer wants.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)

CORE_COLUMNS = ("id", "prompt", "chosen", "rejected", "source", "tie")
RATING_COLUMNS = ("chosen_rating", "rejected_rating")

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", MESSAGES),
        ("chosen", MESSAGES),
        ("rejected", MESSAGES),
        ("source", pa.string()),
        ("tie", pa.bool_()),
        ("chosen_rating", pa.float64()),
        ("rejected_rating", pa.float64()),
    ]
)

REJECT_STAGE = "reject_stage"
REJECT_REASON = "reject_reason"

Message = dict[str, str]


def pair_key(prompt: Sequence[Message], chosen: Sequence[Message], rejected: Sequence[Message]) -> bytes:
    """Canonical bytes of a pair's content: the same pair gives the same bytes on any machine."""
    return json.dumps(
        [_plain(prompt), _plain(chosen), _plain(rejected)], ensure_ascii=False, separators=(",", ":")
    ).encode("utf-8")


def pair_id(prompt: Sequence[Message], chosen: Sequence[Message], rejected: Sequence[Message]) -> str:
    """A stable 16-byte content hash (hex) of a pair: blake2b, independent of platform and version."""
    return hashlib.blake2b(pair_key(prompt, chosen, rejected), digest_size=16).hexdigest()


def _plain(messages: Sequence[Message]) -> list[list[str]]:
    return [[m["role"], m["content"]] for m in messages]


def user(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[Message]:
    return [{"role": "assistant", "content": text}]


def render_text(messages: Iterable[Message] | None) -> str:
    """Plain text of a message list: content joined by blank lines, roles dropped.

    Used where a single string is needed and roles carry no signal (lengths, embeddings of a
    response). For a prompt of several turns prefer ``render_transcript``.
    """
    if not messages:
        return ""
    return "\n\n".join(m["content"] for m in messages)


def render_transcript(messages: Iterable[Message] | None) -> str:
    """A readable transcript, one ``Role: content`` block per message (judge prompts, embeddings)."""
    if not messages:
        return ""
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def is_single_user_turn(messages: Sequence[Message]) -> bool:
    return len(messages) == 1 and messages[0]["role"] == "user"


def empty_table(schema: pa.Schema = SCHEMA) -> pa.Table:
    return schema.empty_table()


def to_pylist(value: Any) -> Any:
    """Arrow scalar or array -> plain Python (``None`` stays ``None``)."""
    return value.as_py() if hasattr(value, "as_py") else value
