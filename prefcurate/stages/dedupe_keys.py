"""What dedupe compares: normalized content hashes, texts to embed, and evaluation prompts.

A pair's exact identity is a hash of its normalized prompt, chosen and rejected. The
*unordered* key hashes the prompt with the two responses sorted, so a pair and its swap
share a key; ``orientation`` says which of the two orders a row has. Grouping by the
unordered key finds exact duplicates (same orientation), swapped duplicates (other
orientation) and conflicting duplicates (different tie flag) in one sort.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import unicodedata
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prefcurate.backends.embed import text_keys
from prefcurate.errors import InputError, first_line
from prefcurate.schema import render_text
from prefcurate.shards import is_stage_dir, iter_batches
from prefcurate.steps import Steps, run_steps

NORMALIZE_CHOICES = ("case", "whitespace", "nfkc", "punctuation", "none")
_KEY = np.dtype("S16")
# Python's str.split() whitespace (what ``normalizer`` uses), spelled for RE2, which reads \s
# as ASCII only.
_BLANKS = r"\t\n\x0b\x0c\r\x1c-\x1f\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"
_WS_RUN = f"[ {_BLANKS}]{{2,}}|[{_BLANKS}]"
# What ``--normalize punctuation`` removes: every character but letters, digits, marks (an
# accent that NFKC could not compose stays on its letter), "_" and whitespace (Unicode's, as
# above: RE2's \s alone would delete a non-breaking space, gluing "New York" into "NewYork").
_PUNCT_RE2 = f"[^\\pL\\pN\\pM_ {_BLANKS}]"
# JSON fields that hold an evaluation prompt, in order of preference.
PROMPT_FIELDS = ("prompt", "input", "instruction", "question", "query", "problem", "text")


def normalizer(options: Iterable[str]):
    """A text -> text function applying the chosen normalizations in Python (used for the
    evaluation prompts; ``normalize_column`` is the same on Arrow columns)."""
    opts = set(options) - {"none"}
    nfkc, case, ws, punct = "nfkc" in opts, "case" in opts, "whitespace" in opts, "punctuation" in opts

    def norm(text: str) -> str:
        if nfkc:
            text = unicodedata.normalize("NFKC", text)
        if case:
            text = text.lower()
        if punct:
            text = "".join(c for c in text if c == "_" or c.isspace() or unicodedata.category(c)[0] in "LNM")
        if ws:
            text = " ".join(text.split())
        return text

    return norm


def normalize_column(values: pa.Array, options: Iterable[str]) -> pa.Array:
    """Vectorized normalization (Arrow kernels): NFKC first, so a full-width letter is then
    lower-cased and compared like its ASCII form."""
    return run_steps(normalize_steps(values, options))


def normalize_steps(values: pa.Array, options: Iterable[str]) -> Steps[pa.Array]:
    """``normalize_column`` one kernel at a time: it yields after each (a pause point for a
    helper thread, see ``pair_key_steps``) and returns the normalized column."""
    opts = set(options) - {"none"}
    if "nfkc" in opts:
        values = _nfkc(values)
        yield
    if "case" in opts:
        values = pc.utf8_lower(values)
        yield
    if "punctuation" in opts:
        values = pc.replace_substring_regex(values, _PUNCT_RE2, "")
        yield
    if "whitespace" in opts:
        # Only what needs changing matches (a run of 2+ blanks, or one that is not a space),
        # so most of the text is copied through: 3x faster than split + join or r"\s+".
        values = pc.replace_substring_regex(values, _WS_RUN, " ")
        yield
        values = pc.utf8_trim(values, " ")
    return values


def _nfkc(values: pa.Array) -> pa.Array:
    """NFKC leaves ASCII unchanged, so only the non-ASCII strings are normalized, by Python's
    ``unicodedata`` (6x faster than Arrow's ``utf8_normalize`` on HH-RLHF text).

    Tried and dropped: normalizing only the strings holding a character that NFKC may change
    (a set built from ``unicodedata``: 0.2% of the bench's strings, against 45% non-ASCII),
    found by one RE2 scan. Same output, but Arrow's RE2 scans ~350 MB/s, so 200k prompts
    took 0.31 s instead of 0.38 s: not worth the code."""
    other = pc.invert(pc.fill_null(pc.string_is_ascii(values), True))
    if not pc.any(other).as_py():
        return values
    rows = np.flatnonzero(other.to_numpy(zero_copy_only=False))
    changed, fixed = [], []
    for row, text in zip(rows.tolist(), values.filter(other).to_pylist(), strict=True):
        norm = unicodedata.normalize("NFKC", text)
        if norm != text:  # most non-ASCII text (curly quotes, accents) is NFKC already
            changed.append(row)
            fixed.append(norm)
    if not changed:
        return values
    mask = np.zeros(len(values), bool)
    mask[changed] = True
    return pc.replace_with_mask(values, pa.array(mask), pa.array(fixed, values.type))


def render_column(messages: pa.Array, roles: bool) -> pa.Array:
    """``render_text`` (roles=False) or ``render_transcript`` (roles=True) of a whole
    list<{role, content}> column, with Arrow kernels instead of a Python loop."""
    if isinstance(messages, pa.ChunkedArray):
        messages = messages.combine_chunks()
    flat = pc.list_flatten(messages)
    content = flat.field("content").fill_null("")
    if roles:
        role = pc.utf8_capitalize(flat.field("role").fill_null(""))
        content = pc.binary_join_element_wise(role, content, ": ")
    offsets = pc.subtract(messages.offsets, messages.offsets[0])
    lists = pa.ListArray.from_arrays(offsets, content)
    return pc.binary_join(lists, "\n\n").fill_null("")


def digest(*parts: str) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x1e")  # separator: ("ab", "c") and ("a", "bc") hash apart
    return h.digest()


@dataclass
class PairKeys:
    """Per-row keys of one batch."""

    group: np.ndarray  # S16: unordered (or ordered, when swaps are not checked) pair key
    orientation: np.ndarray  # bool: chosen sorts after rejected
    prompt_hashes: list[list[bytes]] = field(default_factory=list)  # full prompt + each user turn

    @staticmethod
    def concat(parts: Sequence[PairKeys]) -> PairKeys:
        """The keys of consecutive slices of a batch, as the batch's keys."""
        if len(parts) == 1:
            return parts[0]
        return PairKeys(
            np.concatenate([p.group for p in parts]),
            np.concatenate([p.orientation for p in parts]),
            [h for p in parts for h in p.prompt_hashes],
        )


def pair_keys(batch: pa.RecordBatch, options: Sequence[str], unordered: bool, with_prompts: bool) -> PairKeys:
    """Each row's exact group key and orientation (and, ``with_prompts``, its prompt's hashes
    for decontamination)."""
    return run_steps(pair_key_steps(batch, options, unordered, with_prompts))


def pair_key_steps(
    batch: pa.RecordBatch, options: Sequence[str], unordered: bool, with_prompts: bool
) -> Steps[PairKeys]:
    """``pair_keys`` one Arrow kernel at a time: it yields after each (a few ms on 1k rows) and
    returns the keys, so a helper thread can stop between kernels while the cores are taken
    (``dedupe_ahead``). Every key is a function of its own row only, so a batch's keys are
    the concatenation of its slices' keys."""
    texts = []
    for name in ("prompt", "chosen", "rejected"):
        text = render_column(batch.column(name), roles=name == "prompt")
        yield
        texts.append((yield from normalize_steps(text, options)))
        yield
    prompt, chosen, rejected = texts
    flipped = pc.greater(chosen, rejected) if unordered else pa.array(np.zeros(batch.num_rows, bool))
    first = pc.if_else(flipped, rejected, chosen)
    second = pc.if_else(flipped, chosen, rejected)
    yield
    # The three parts joined with separators in Arrow ("p\x1ea\x1eb": ("ab", "c") and ("a", "bc")
    # hash apart), the UTF-8 bytes hashed in place: no Python strings, no re-encoding.
    joined = pc.binary_join_element_wise(prompt, first, second, "", "\x1e")
    yield
    groups = utf8_digests(joined)
    prompt_hashes: list[list[bytes]] = []
    if with_prompts:
        norm = normalizer(options)
        prompt_hashes = [prompt_digests(p, norm) for p in batch.column("prompt").to_pylist()]
    return PairKeys(groups, flipped.to_numpy(zero_copy_only=False).astype(bool), prompt_hashes)


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="prefcurate-keys")


def utf8_digests(values: pa.Array) -> np.ndarray:
    """The embedding cache's ``text_key`` (XXH3-128 of the UTF-8 bytes) of each string, as
    S16. Nulls hash as ""."""
    return text_keys(values).view(_KEY).reshape(-1)


def prompt_digests(messages: Sequence[dict[str, str]] | None, norm) -> list[bytes]:
    """Hashes under which a prompt counts as an evaluation prompt: the whole prompt's text
    and each user turn on its own (an eval question often appears as one turn of a chat)."""
    if not messages:
        return []
    out = {digest(norm(render_text(messages)))}
    out.update(digest(norm(m["content"])) for m in messages if m.get("role") == "user")
    return list(out)


def row_lengths(batch: pa.RecordBatch) -> np.ndarray:
    """Characters of prompt + chosen + rejected, for ``--keep longest``."""
    total = np.zeros(batch.num_rows, np.float64)
    for name in ("prompt", "chosen", "rejected"):
        col = batch.column(name)
        parents = pc.list_parent_indices(col).to_numpy()
        lengths = pc.utf8_length(pc.list_flatten(col).field("content")).fill_null(0).to_numpy()
        total += np.bincount(parents, weights=lengths, minlength=batch.num_rows)
    return total.astype(np.int64)


def part_columns(batch: pa.RecordBatch, columns: Sequence[str]) -> list[pa.Array]:
    """Texts to embed, one string array per message column (content only: roles carry no
    signal here)."""
    return list(_pool().map(lambda name: render_column(batch.column(name), roles=False), columns))


def part_texts(batch: pa.RecordBatch, columns: Sequence[str]) -> list[list[str]]:
    """``part_columns`` as Python lists."""
    return [col.to_pylist() for col in part_columns(batch, columns)]


@dataclass
class EvalSet:
    """Evaluation prompts to decontaminate against: a reference (id or file:line) and text each."""

    refs: list[str]
    texts: list[str]


def load_eval_set(paths: Sequence[Path]) -> EvalSet:
    refs: list[str] = []
    texts: list[str] = []
    for path in paths:
        try:
            for ref, text in _read_eval(Path(path)):
                if text and text.strip():
                    refs.append(ref)
                    texts.append(text)
        except (OSError, EOFError, UnicodeDecodeError, zlib.error, pa.ArrowException) as exc:
            # a corrupt Parquet or gzip file, bytes that are not UTF-8: one line, not a traceback
            raise InputError(f"--against {path}: unreadable ({first_line(exc)})") from None
    if paths and not texts:
        raise InputError(
            f"--against {', '.join(map(str, paths))}: no prompts found",
            "give a stage directory, a .txt file (one prompt a line) or JSON/JSONL with one of: "
            + ", ".join(PROMPT_FIELDS),
        )
    return EvalSet(refs, texts)


def _read_eval(path: Path) -> Iterable[tuple[str, str]]:
    if not path.exists():
        raise InputError(f"--against {path}: no such file or directory")
    if path.is_dir():
        if not is_stage_dir(path):
            raise InputError(
                f"--against {path}: a directory but not a stage directory", "run `prefcurate ingest` on it first"
            )
        for batch in iter_batches(path, ["id", "prompt"]):
            for rid, prompt in zip(batch.column("id").to_pylist(), batch.column("prompt").to_pylist(), strict=True):
                yield str(rid), render_text(prompt)
        return
    name = path.name.lower()
    if name.endswith((".txt", ".txt.gz")):
        for i, line in enumerate(_open_text(path), 1):
            yield f"{path.name}:{i}", line.rstrip("\n")
    elif name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        for i, line in enumerate(_open_text(path), 1):
            if line.strip():
                yield f"{path.name}:{i}", _record_prompt(_json(line, path, i), path, i)
    elif name.endswith((".json", ".json.gz")):
        data = _json(_open_text(path).read(), path, None)
        records = data.get("data", data.get("rows", [data])) if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise InputError(f"--against {path}: not a JSON array of prompts or records")
        for i, rec in enumerate(records, 1):
            yield f"{path.name}:{i}", _record_prompt(rec, path, i)
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        column = next((c for c in PROMPT_FIELDS if c in table.column_names), None)
        if column is None:
            raise InputError(f"--against {path}: no column among {', '.join(PROMPT_FIELDS)}")
        for i, value in enumerate(table.column(column).to_pylist(), 1):
            yield f"{path.name}:{i}", _as_text(value)
    else:
        raise InputError(
            f"--against {path}: unknown file type", "use .txt, .json, .jsonl or .parquet, or a stage directory"
        )


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def _json(text: str, path: Path, line: int | None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f", line {line}" if line else ""
        raise InputError(f"--against {path}{where}: invalid JSON ({exc.msg})") from None


def _record_prompt(record: Any, path: Path, line: int) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for key in PROMPT_FIELDS:
            if key in record and record[key] is not None:
                return _as_text(record[key])
    raise InputError(f"--against {path}, record {line}: no prompt field", f"one of: {', '.join(PROMPT_FIELDS)}")


def _as_text(value: Any) -> str:
    if isinstance(value, list):  # a message list
        return render_text([m for m in value if isinstance(m, dict) and "content" in m])
    return "" if value is None else str(value)
