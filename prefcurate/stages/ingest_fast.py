"""The vectorized path for TRL rows with plain string prompt/chosen/rejected columns.

Most large preference files are this shape, so it is worth avoiding a Python object per row:
validation is Arrow compute over whole columns, message lists are built from the string
buffers directly (one ``{role, content}`` per row via list offsets ``0..n``), and content
ids are hashed from bytes that Arrow assembles. The bytes are exactly ``schema.pair_key``'s:
``json.dumps`` with ``ensure_ascii=False`` escapes only ``"``, ``\\`` and control characters,
which Arrow string replacement reproduces; the rare row holding a control character other
than ``\\n`` falls back to ``schema.pair_id`` itself.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prefcurate.schema import MESSAGE, MESSAGES, pair_id

_FIELDS = ("prompt", "chosen", "rejected")
_STRING_TYPES = (pa.string(), pa.large_string(), pa.string_view())
# What Python's str.isspace() calls whitespace (the per-row path uses str.strip()).
BLANK = r"^[\s\p{Z}\x0b\x1c-\x1f\x85]*$"
# json.dumps escapes these besides '"' and '\\'; only '\n' is common enough to replace in bulk.
_RARE_CONTROL = r"[\x00-\x09\x0b-\x1f]"
# Rating columns a pair may carry (UltraFeedback-binarized writes score_chosen/score_rejected).
RATING_ALIASES = {
    "chosen_rating": ("chosen_rating", "score_chosen"),
    "rejected_rating": ("rejected_rating", "score_rejected"),
}
_ESCAPES = (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"))


def applicable(table: pa.Table) -> bool:
    """True when prompt/chosen/rejected are string columns (TRL standard format) and the
    optional id and rating columns have types that cast without a per-row decision."""
    schema = table.schema
    if not all(f in schema.names and schema.field(f).type in _STRING_TYPES for f in _FIELDS):
        return False
    if "id" in schema.names and not _scalar(schema.field("id").type):
        return False
    for names in RATING_ALIASES.values():
        for name in names:
            if name in schema.names and not (
                pa.types.is_integer(schema.field(name).type)
                or pa.types.is_floating(schema.field(name).type)
                or pa.types.is_null(schema.field(name).type)
            ):
                return False
    return True


def _scalar(dtype: pa.DataType) -> bool:
    return dtype in _STRING_TYPES or pa.types.is_integer(dtype) or pa.types.is_null(dtype)


def ratings(table: pa.Table) -> dict[str, pa.Array]:
    """chosen_rating/rejected_rating from the first alias column present, else nulls; NaN and
    infinities are no rating (null), as on the per-row path."""
    out = {}
    for target, names in RATING_ALIASES.items():
        name = next((n for n in names if n in table.column_names), None)
        col = table[name].combine_chunks().cast(pa.float64()) if name else pa.nulls(table.num_rows, pa.float64())
        finite = pc.is_finite(col)
        if not pc.all(finite).as_py():
            col = pc.if_else(finite, col, pa.nulls(len(col), pa.float64()))
        out[target] = col
    return out


def _text(table: pa.Table, name: str) -> pa.Array:
    return table[name].combine_chunks().cast(pa.string())


def row_reasons(table: pa.Table) -> np.ndarray | None:
    """None when every row is good; else per row None or its first problem (``empty:chosen``...)."""
    cols = {f: _text(table, f) for f in _FIELDS}
    checks = [(pc.is_null(cols[f]), f"missing-field:{f}") for f in _FIELDS]
    checks += [(pc.match_substring_regex(cols[f], BLANK), f"empty:{f}") for f in _FIELDS]
    checks.append((pc.equal(cols["chosen"], cols["rejected"]), "identical-responses"))
    # Converting a mask to numpy costs more than asking Arrow whether it has a hit (rarely).
    masks = [(_bools(m), r) for m, r in checks if pc.any(m).as_py()]
    if not masks:
        return None
    reasons = np.full(table.num_rows, None, dtype=object)
    free = np.ones(table.num_rows, dtype=bool)
    for mask, reason in masks:
        hit = mask & free
        reasons[hit] = reason
        free &= ~hit
    return reasons


def _bools(mask: pa.Array) -> np.ndarray:
    """A boolean Arrow mask as numpy, null as False."""
    if mask.null_count:
        mask = pc.and_kleene(mask, pc.is_valid(mask))
    return np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)


def single_messages(role: str, text: pa.Array) -> pa.Array:
    """One ``{role, content}`` message per row, without a Python object per row."""
    n = len(text)
    roles = repeated_string(role, n)
    struct = pa.StructArray.from_arrays([roles, text], fields=list(MESSAGE))
    return pa.ListArray.from_arrays(_int32s(np.arange(n + 1, dtype=np.int32)), struct, type=MESSAGES)


# Arrays are built from buffers here: pa.array(ndarray) and pa.scalar() import pandas (a
# third of a second and ~50 MB) on first use, which nothing else in ingest needs.
def _int32s(values: np.ndarray) -> pa.Array:
    return pa.Array.from_buffers(pa.int32(), len(values), [None, pa.py_buffer(values)])


def repeated_string(value: str, n: int) -> pa.Array:
    """``value`` n times as a string array."""
    data = value.encode()
    offsets = np.arange(0, len(data) * (n + 1), len(data), dtype=np.int32) if data else np.zeros(n + 1, np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data * n)])


def all_false(n: int) -> pa.Array:
    return pa.Array.from_buffers(pa.bool_(), n, [None, pa.py_buffer(bytes((n + 7) // 8))])


def canonical_columns(table: pa.Table) -> dict[str, pa.Array]:
    """prompt/chosen/rejected message columns and ids of rows already validated."""
    cols = {f: _text(table, f) for f in _FIELDS}
    out = {
        "prompt": single_messages("user", cols["prompt"]),
        "chosen": single_messages("assistant", cols["chosen"]),
        "rejected": single_messages("assistant", cols["rejected"]),
    }
    out["id"] = _ids(table, cols)
    return out


def _ids(table: pa.Table, cols: dict[str, pa.Array]) -> pa.Array:
    if "id" not in table.column_names:
        return content_ids(cols["prompt"], cols["chosen"], cols["rejected"])
    given = table["id"].combine_chunks().cast(pa.string())
    missing = pc.or_kleene(pc.is_null(given), pc.equal(pc.utf8_trim_whitespace(given), "")).fill_null(True)
    if not pc.any(missing).as_py():
        return given
    idx = pa.array(np.flatnonzero(missing.to_numpy(zero_copy_only=False)))
    hashed = content_ids(*(cols[f].take(idx) for f in _FIELDS))
    values = given.to_pylist()
    for i, h in zip(idx.to_pylist(), hashed.to_pylist(), strict=True):
        values[i] = h
    return pa.array(values, pa.string())


def _escape(text: pa.Array) -> pa.Array:
    """JSON string escaping of '\\', '"' and newlines; a pass only for characters present."""
    present = _data(text)
    for old, new in _ESCAPES:
        if old.encode() in present:
            text = pc.replace_substring(text, old, new)
    return text


def _data(text: pa.Array) -> bytes:
    """The bytes of a string array's values (a cheap copy: ``in`` on bytes is a memchr)."""
    buffer = text.buffers()[2]
    if buffer is None or len(text) == 0:
        return b""
    offsets = np.frombuffer(text.buffers()[1], dtype=np.int32)
    start, end = int(offsets[text.offset]), int(offsets[text.offset + len(text)])
    return buffer.slice(start, end - start).to_pybytes()


def content_ids(prompt: pa.Array, chosen: pa.Array, rejected: pa.Array) -> pa.Array:
    """``schema.pair_id`` of single-turn string pairs, from Arrow-built key bytes."""
    n = len(prompt)
    if n == 0:
        return pa.array([], pa.string())
    pieces = ('[[["user","', '"]],[["assistant","', '"]],[["assistant","', '"]]]', "")
    head, mid, mid2, tail, sep = (repeated_string(p, n) for p in pieces)
    keys = pc.binary_join_element_wise(head, _escape(prompt), mid, _escape(chosen), mid2, _escape(rejected), tail, sep)
    offsets = np.frombuffer(keys.buffers()[1], dtype=np.int32)[keys.offset : keys.offset + n + 1].tolist()
    data = memoryview(keys.buffers()[2]) if keys.buffers()[2] is not None else memoryview(b"")
    blake = hashlib.blake2b
    digests = b"".join([blake(data[offsets[i] : offsets[i + 1]], digest_size=16).digest() for i in range(n)])
    # One hex string for the whole batch, cut into 32-character ids by fixed offsets.
    hex_ids = pa.py_buffer(digests.hex().encode("ascii"))
    ids = pa.Array.from_buffers(
        pa.string(), n, [None, _int32s(np.arange(0, 32 * (n + 1), 32, dtype=np.int32)).buffers()[1], hex_ids]
    )
    # Rows with a control character json.dumps writes as \uXXXX: let pair_id itself hash them.
    # Escaped keys hold no newline, so any byte below 0x20 marks such a row (rare: check first).
    raw = np.frombuffer(data, dtype=np.uint8)[offsets[0] : offsets[-1]]
    if not len(raw) or raw.min() >= 0x20:
        return ids
    patched = ids.to_pylist()
    for i in np.flatnonzero(pc.match_substring_regex(keys, _RARE_CONTROL).to_numpy(zero_copy_only=False)):
        p, c, r = prompt[i].as_py(), chosen[i].as_py(), rejected[i].as_py()
        patched[i] = pair_id(
            [{"role": "user", "content": p}],
            [{"role": "assistant", "content": c}],
            [{"role": "assistant", "content": r}],
        )
    return pa.array(patched, pa.string())
