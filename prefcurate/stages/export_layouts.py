"""The export layouts, vectorised over Arrow arrays, and the stable id hash for splits.

Each function works on whole columns (no per-row Python): a 16k-row batch is converted in a
few Arrow/numpy kernels, which is what keeps JSON Lines export near the writer's own speed.
See ``prefcurate.stages.export`` for what each layout means to a trainer.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prefcurate.schema import MESSAGES

FORMATS = ("trl", "trl-chat", "openrlhf", "kto")


# -- layouts ------------------------------------------------------------------------------
def _offsets(col: pa.ListArray) -> np.ndarray:
    offs = np.asarray(col.offsets, dtype=np.int64)
    return offs - offs[0]


def _join_per_row(col: pa.ListArray, pieces: pa.Array, sep: str) -> pa.Array:
    """Join each row's pieces (aligned with the list's flattened values) with ``sep``."""
    lists = pa.ListArray.from_arrays(pa.array(_offsets(col), pa.int32()), pieces)
    return pc.fill_null(pc.binary_join(lists, sep), "")


def messages_text(col: pa.ListArray) -> pa.Array:
    """Contents joined by blank lines (``schema.render_text``), vectorised."""
    return _join_per_row(col, pc.struct_field(pc.list_flatten(col), "content"), "\n\n")


def prompt_text(col: pa.ListArray) -> pa.Array:
    """A single user turn -> its content; else a ``Role: content`` transcript + Assistant cue."""
    flat = pc.list_flatten(col)
    roles, contents = pc.struct_field(flat, "role"), pc.struct_field(flat, "content")
    labelled = pc.binary_join_element_wise(pc.utf8_capitalize(roles), contents, ": ")
    transcript = pc.binary_join_element_wise(_join_per_row(col, labelled, "\n\n"), "\n\nAssistant:", "")
    offs = _offsets(col)
    lengths = np.diff(offs)
    first = np.where(lengths > 0, offs[:-1], 0)
    if len(flat) == 0:
        return pa.array([""] * len(col), pa.string())
    single = (lengths == 1) & np.asarray(pc.equal(roles.take(first), "user").fill_null(False))
    text = pc.if_else(pa.array(single), contents.take(first), transcript)
    # an empty prompt is "", whatever the other rows hold (not a bare Assistant cue)
    return pc.if_else(pa.array(lengths == 0), pa.scalar("", pa.string()), text)


def concat_lists(a: pa.ListArray, b: pa.ListArray) -> pa.ListArray:
    """Row-wise concatenation of two list arrays (prompt + response), vectorised."""
    oa, ob = _offsets(a), _offsets(b)
    la, lb = np.diff(oa), np.diff(ob)
    out = np.zeros(len(a) + 1, np.int64)
    np.cumsum(la + lb, out=out[1:])
    va, vb = pc.list_flatten(a), pc.list_flatten(b)
    rows_a, rows_b = np.repeat(np.arange(len(a)), la), np.repeat(np.arange(len(b)), lb)
    perm = np.empty(out[-1], np.int64)
    perm[out[rows_a] + np.arange(len(va)) - oa[rows_a]] = np.arange(len(va))
    perm[out[rows_b] + la[rows_b] + np.arange(len(vb)) - ob[rows_b]] = len(va) + np.arange(len(vb))
    values = pa.concat_arrays([va, vb]).take(pa.array(perm))
    return pa.ListArray.from_arrays(pa.array(out, pa.int32()), values)


def layout_schema(fmt: str, extras: list[str]) -> pa.Schema:
    """The output schema of a layout; ``extras`` are the optional tie/margin columns present."""
    text = pa.string() if fmt == "trl" else MESSAGES
    if fmt == "kto":
        fields = [("id", pa.string()), ("prompt", MESSAGES), ("completion", MESSAGES), ("label", pa.bool_())]
    else:
        fields = [("id", pa.string()), ("prompt", text), ("chosen", text), ("rejected", text)]
    fields.append(("source", pa.string()))
    fields += [(c, pa.bool_() if c == "tie" else pa.float64()) for c in extras]
    return pa.schema(fields)


def to_layout(pairs: pa.Table, fmt: str, schema: pa.Schema) -> pa.Table:
    """Canonical pairs (plus tie/margin columns) -> rows of the layout ``fmt``."""
    pairs = pairs.combine_chunks()
    cols = {
        name: pairs[name].chunk(0) if pairs[name].num_chunks else pairs[name].combine_chunks()
        for name in pairs.column_names
    }
    extras = [
        f.name for f in schema if f.name not in ("id", "prompt", "chosen", "rejected", "completion", "label", "source")
    ]
    keep = {c: cols[c] for c in ("id", "source", *extras)}
    if fmt == "kto":
        n = pairs.num_rows
        order = pa.array(np.stack([np.arange(n), np.arange(n) + n], axis=1).ravel())
        doubled = {c: pa.concat_arrays([v, v]).take(order) for c, v in keep.items()}
        doubled["prompt"] = pa.concat_arrays([cols["prompt"], cols["prompt"]]).take(order)
        doubled["completion"] = pa.concat_arrays([cols["chosen"], cols["rejected"]]).take(order)
        doubled["label"] = pa.array(np.tile([True, False], n))
        return pa.table({f.name: doubled[f.name] for f in schema}).cast(schema)
    if fmt == "trl":
        body = {
            "prompt": prompt_text(cols["prompt"]),
            "chosen": messages_text(cols["chosen"]),
            "rejected": messages_text(cols["rejected"]),
        }
    elif fmt == "openrlhf":
        body = {
            "prompt": cols["prompt"],
            "chosen": concat_lists(cols["prompt"], cols["chosen"]),
            "rejected": concat_lists(cols["prompt"], cols["rejected"]),
        }
    else:
        body = {"prompt": cols["prompt"], "chosen": cols["chosen"], "rejected": cols["rejected"]}
    return pa.table({f.name: ({**keep, **body})[f.name] for f in schema}).cast(schema)


# -- deterministic split ------------------------------------------------------------------
def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the output (uint64 wraps)."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def stable_fraction(ids: pa.Array) -> np.ndarray:
    """A number in [0, 1) per id, the same on every machine and version: a polynomial hash of
    the UTF-8 bytes (mod 2**64, vectorised over the Arrow buffer), then mixed."""
    ids = ids.cast(pa.large_string())
    n = len(ids)
    offs = np.frombuffer(ids.buffers()[1], np.int64)[ids.offset : ids.offset + n + 1]
    data = (
        np.frombuffer(ids.buffers()[2], np.uint8)[offs[0] : offs[-1]]
        if n and offs[-1] > offs[0]
        else np.zeros(0, np.uint8)
    )
    rel = offs - offs[0]
    with np.errstate(over="ignore"):
        base = np.uint64(0x100000001B3)
        powers = np.cumprod(np.full(len(data), base, np.uint64)) if len(data) else np.zeros(0, np.uint64)
        terms = np.append((data.astype(np.uint64) + np.uint64(1)) * powers, np.uint64(0))
        sums = np.add.reduceat(terms, np.minimum(rel[:-1], len(data)))
        # reduceat gives the element itself for an empty segment; an empty id hashes to 0.
        sums[np.diff(rel) == 0] = 0
        # Divide out base**start (base is odd, so invertible mod 2**64) to make each hash
        # depend on the id alone, not on where it sits in the buffer.
        inverse = np.uint64(pow(int(base), -1, 1 << 64))
        inv_powers = np.append(np.uint64(1), np.cumprod(np.full(max(len(data), 1), inverse, np.uint64)))
        h = _mix64(sums * inv_powers[rel[:-1]])
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
