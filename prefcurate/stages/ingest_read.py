"""Readers for ingest: every input turns into a stream of ``RawChunk``s of bounded size.

A chunk holds rows as an Arrow table when Arrow could parse them (the fast path), or as
Python dicts when it could not (mixed types, blank lines, a bad line in the block). Each row
carries its 1-based line or row number so a reject can point back into the file; JSON Lines
chunks also keep their block's bytes, so a reject's ``raw`` is the line exactly as written.

JSON Lines are read in byte blocks split at newlines. Each block is parsed by Arrow; if Arrow
refuses it (one undecodable line, a field whose type changes) only that block is re-read line
by line in Python, so a bad line becomes a reject instead of stopping the run, and memory stays
bounded by the block size whatever the file size. Two things Arrow's JSON reader does are
undone here: strings that look like dates or times (``"2001-01-01"``) are inferred as
timestamps, so such fields are read as strings (text stays text, exactly: ``_ArrowJson``);
and it does not check UTF-8, so a block that is not pure ASCII is validated
(``Table.validate(full=True)``, ~20 ms per 50 MB) and re-read line by line when it fails,
where the bad line becomes an ``undecodable`` reject.

Text that is not valid Unicode inside a value (invalid UTF-8 in a Parquet string, a lone
surrogate escape such as ``"\\udc00"`` in JSON) makes that row a reject ``undecodable:<field>``
(``ingest`` checks the rows it decoded in Python; Parquet and Hub batches are checked here).
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from prefcurate.errors import DataError, first_line

BLOCK_BYTES = 8 << 20
BATCH_ROWS = 16_384
HUB_PREFIX = "hf:"

_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
KNOWN_SUFFIXES = tuple(_SUFFIXES)


class BlockLines:
    """The lines of a JSON Lines block, by file line number: the ``raw`` text of a reject."""

    def __init__(self, data: bytes, first_line: int) -> None:
        self.data, self.first_line = data, first_line
        self._ends: np.ndarray | None = None

    def line(self, number: int) -> str:
        if self._ends is None:  # only for a block with a reject: one vectorized scan
            self._ends = np.flatnonzero(np.frombuffer(self.data, dtype=np.uint8) == 0x0A)
        i = number - self.first_line
        start = int(self._ends[i - 1]) + 1 if i > 0 else 0
        end = int(self._ends[i]) if i < len(self._ends) else len(self.data)
        return as_text(self.data[start:end])


@dataclass
class RawChunk:
    """Rows of one input, as an Arrow table or as Python dicts, with their row numbers."""

    rows: list[int | None]
    """1-based line (JSONL) or row number of each row (None only where it cannot be known)."""
    table: pa.Table | None = None
    records: list[dict[str, Any]] | None = None
    undecodable: list[tuple[int | None, str, str | None]] = field(default_factory=list)
    """(row number, raw text, field) of rows that cannot be decoded: a line that is not a JSON
    object or not UTF-8 (field None), or a value whose text is not valid Unicode (its field)."""
    lines: BlockLines | None = None
    """The original text of each row (JSON Lines), for rejects."""
    surrogate_escapes: bool = False
    """``records`` may hold lone surrogates: their text has a ``\\uD800``-``\\uDFFF`` escape
    (the only way json.loads makes one here, since bytes are decoded strictly)."""

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def raw(self, i: int) -> str | None:
        """Row ``i`` as written in the file, when the reader kept it (JSON Lines), else None."""
        row = self.rows[i]
        return None if self.lines is None or row is None else self.lines.line(row)


def as_text(data: bytes) -> str:
    """Bytes of an input line as text for ``raw``: invalid UTF-8 shown as ``\\xNN`` escapes."""
    return data.decode("utf-8", "backslashreplace").rstrip("\r")


@dataclass
class Source:
    """One input to ingest: a file, a local Hugging Face dataset directory, or a Hub dataset."""

    name: str
    kind: str  # jsonl | json | csv | parquet | hf-dir | hf-hub
    path: Path | None = None
    hub_id: str | None = None
    split: str | None = None

    @property
    def gzip(self) -> bool:
        return self.path is not None and self.path.suffix == ".gz"


def _kind_of(path: Path) -> str | None:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return _SUFFIXES.get(suffixes[-1].lower()) if suffixes else None


def is_hf_dataset_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    )


_GLOB_MAGIC = re.compile(r"[*?\[]")


def glob_matches(spec: str) -> list[str] | None:
    """The paths a source that is a glob pattern stands for, sorted (``*``, ``?``, ``[...]``,
    and ``**`` for any depth; names starting with a dot match only a pattern's dot), or None
    when ``spec`` is not a pattern: a Hub id, or a path that exists (a file may well be named
    ``a[1].jsonl``), or one without a wildcard. An empty list: a pattern nothing matches."""
    if spec.startswith(HUB_PREFIX) or not _GLOB_MAGIC.search(spec) or Path(spec).expanduser().exists():
        return None
    return sorted(glob.glob(os.path.expanduser(spec), recursive=True))


def expand_globs(specs: list[str]) -> list[str]:
    """``specs`` with each glob pattern replaced by its matches (a pattern that matches
    nothing is kept as it is: ``resolve_sources`` reports it)."""
    out: list[str] = []
    for spec in specs:
        matches = glob_matches(spec)
        out.extend(matches if matches else [spec])
    return out


def resolve_sources(specs: list[str]) -> list[Source]:
    """Expand ``SRC...`` into sources: files, directories of files, HF dataset dirs, ``hf:`` ids.
    A glob pattern (``data/*.jsonl.gz``, ``data/**/*.parquet``) that is not itself an existing
    path stands for its matches, sorted, each read as if given by name."""
    out: list[Source] = []
    for spec in specs:
        if spec.startswith(HUB_PREFIX):
            repo, _, split = spec[len(HUB_PREFIX) :].partition(":")
            if not repo:
                raise DataError("empty Hub dataset id", file=spec, hint="write hf:org/name or hf:org/name:split")
            out.append(Source(name=spec, kind="hf-hub", hub_id=repo, split=split or None))
            continue
        matches = glob_matches(spec)
        if matches is not None:
            if not matches:
                raise DataError("no file or directory matches this pattern", file=spec, hint="check the pattern")
            out.extend(resolve_sources(matches))
            continue
        path = Path(spec)
        if not path.exists():
            raise DataError("no such file or directory", file=spec, hint="check the path")
        if path.is_dir():
            out.extend(_dir_sources(path))
            continue
        kind = _kind_of(path)
        if kind is None:
            raise DataError(
                "not a known input format",
                file=spec,
                hint="use .jsonl, .json, .csv or .parquet (optionally .gz), or a Hugging Face dataset directory",
            )
        out.append(Source(name=path.name, kind=kind, path=path))
    return out


def is_prefcurate_dir(path: Path) -> bool:
    """A prefcurate stage or export directory: a ``data/`` directory and a ``manifest.json``
    that loads as a prefcurate manifest (another tool's ``manifest.json`` does not count)."""
    from prefcurate.shards import DATA_DIR, MANIFEST, Manifest

    return (path / MANIFEST).is_file() and (path / DATA_DIR).is_dir() and Manifest.try_load(path) is not None


def _dir_sources(path: Path) -> list[Source]:
    """The sources of a directory, walked in name order; names starting with a dot are skipped.

    A prefcurate stage or export directory, the one given or one met on the way, gives the
    files of its ``data/`` only: not ``manifest.json``, the dataset card (README.md), nor
    ``rejects/`` (the rows a stage removed are not data to curate; give ``DIR/rejects`` by
    name to read them). A Hugging Face dataset directory met on the way is read as one."""
    if is_hf_dataset_dir(path):
        return [Source(name=path.name, kind="hf-dir", path=path)]
    if is_prefcurate_dir(path):
        path = path / "data"
    base = path.parent
    out: list[Source] = []
    _walk(path, base, out)
    if not out:
        raise DataError("directory holds no .jsonl, .json, .csv or .parquet files", file=str(path))
    return out


def _walk(directory: Path, base: Path, out: list[Source]) -> None:
    # Children in name order, a directory's files where its name sorts (as sorted(rglob) did);
    # symbolic links to directories are not followed (a link loop cannot hang the walk).
    for child in sorted(directory.iterdir(), key=lambda p: p.name):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            if child.is_symlink():
                continue
            if is_hf_dataset_dir(child):
                out.append(Source(name=str(child.relative_to(base)), kind="hf-dir", path=child))
            elif is_prefcurate_dir(child):
                _walk(child / "data", base, out)
            else:
                _walk(child, base, out)
        elif child.is_file() and (kind := _kind_of(child)):
            out.append(Source(name=str(child.relative_to(base)), kind=kind, path=child))


def read_chunks(source: Source, on_progress: Callable[[int], None]) -> Iterator[RawChunk]:
    """The rows of a source as bounded chunks; ``on_progress`` gets bytes or rows consumed."""
    readers = {
        "jsonl": _read_jsonl,
        "json": _read_json,
        "csv": _read_csv,
        "parquet": _read_parquet,
        "hf-dir": _hf("read_hf_dir"),
        "hf-hub": _hf("read_hf_hub"),
    }
    return readers[source.kind](source, on_progress)


def _hf(name: str) -> Callable[[Source, Callable[[int], None]], Iterator[RawChunk]]:
    def read(source: Source, on_progress: Callable[[int], None]) -> Iterator[RawChunk]:
        from prefcurate.stages import ingest_hf

        return getattr(ingest_hf, name)(source, on_progress)

    return read


def progress_total(source: Source) -> tuple[int | None, str]:
    """Total and unit of a source's progress task: compressed bytes for text files, rows for Parquet."""
    if source.kind in ("jsonl", "json", "csv") and source.path is not None:
        return source.path.stat().st_size, "bytes"
    if source.kind == "parquet" and source.path is not None:
        try:
            return pq.ParquetFile(source.path).metadata.num_rows, "rows"
        except (pa.ArrowInvalid, OSError):
            return None, "rows"
    return None, "rows"


# -- JSON Lines -----------------------------------------------------------------------------


def _open_stream(source: Source) -> tuple[Any, Any]:
    """(raw file, decompressed stream): progress reads the raw file's position."""
    assert source.path is not None
    raw = pa.OSFile(str(source.path), "rb")
    return raw, (pa.CompressedInputStream(raw, "gzip") if source.gzip else raw)


def _byte_blocks(source: Source, on_progress: Callable[[int], None]) -> Iterator[bytes]:
    """Blocks of whole lines (each ends at a newline, except maybe the last)."""
    raw, stream = _open_stream(source)
    rest, seen = b"", 0
    try:
        while True:
            try:
                data = stream.read(BLOCK_BYTES)
            except (OSError, pa.ArrowInvalid) as exc:
                raise DataError(f"cannot decompress ({exc})", file=source.name) from None
            pos = raw.tell()
            on_progress(pos - seen)
            seen = pos
            if not data:
                break
            buf = rest + data
            cut = buf.rfind(b"\n")
            if cut < 0:
                rest = buf
                continue
            rest = buf[cut + 1 :]
            yield buf[: cut + 1]
        if rest.strip():
            yield rest
    finally:
        stream.close()
        raw.close()


def _read_jsonl(source: Source, on_progress: Callable[[int], None]) -> Iterator[RawChunk]:
    line = 1
    parser = _ArrowJson()
    for i, block in enumerate(_byte_blocks(source, on_progress)):
        if i == 0:
            _check_not_utf16(block, source)
            if block.startswith(codecs.BOM_UTF8):
                block = block[len(codecs.BOM_UTF8) :]
        n_lines = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
        table = parser.parse(block)
        # Arrow does not check UTF-8: an ASCII block cannot hold bad bytes (and Arrow refuses
        # lone surrogate escapes), any other block is validated before the fast path takes it.
        if table is not None and table.num_rows == n_lines and (block.isascii() or utf8_valid(table)):
            yield RawChunk(rows=list(range(line, line + n_lines)), table=table, lines=BlockLines(block, line))
        else:
            yield _python_block(block, line)
        line += n_lines


def _check_not_utf16(start: bytes, source: Source) -> None:
    if start.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # UTF-32 LE starts like UTF-16 LE
        raise DataError(
            "UTF-16 or UTF-32 text (byte order mark), not UTF-8",
            file=source.name,
            hint="convert it to UTF-8, e.g. iconv -f UTF-16 -t UTF-8",
        )


_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError)


class _ArrowJson:
    """Arrow's parse of the blocks of one JSON Lines file, strings kept as strings.

    Arrow infers ISO date-like strings ("2001-01-01") as timestamps; a block whose schema has a
    temporal type anywhere (nested too) is read again with those fields as strings. The fields
    are remembered and later blocks read them as strings at once (one parse, not two); where
    that does not fit a later block (the field changed type), that block is read as before.
    """

    def __init__(self) -> None:
        self.text_fields: dict[str, pa.DataType] = {}

    def parse(self, block: bytes) -> pa.Table | None:
        """The block as a table, or None. Sub-blocks of 1 MiB parse on several threads; a line
        longer than that makes Arrow refuse them, so one retry takes the block whole."""
        for size in (1 << 20, len(block) + 1):
            try:
                return self._parse(block, pa_json.ReadOptions(block_size=size))
            except _ARROW_ERRORS as exc:
                if "straddling" not in str(exc) or size > len(block):
                    return None
        return None

    def _parse(self, block: bytes, options: pa_json.ReadOptions) -> pa.Table:
        table = None
        if self.text_fields:
            try:
                table = _read_block(block, options, pa.schema(list(self.text_fields.items())))
            except _ARROW_ERRORS as exc:
                if "straddling" in str(exc):
                    raise
        if table is None:
            table = _read_block(block, options, None)
        temporal = [f for f in table.schema if _has_temporal(f.type)]
        if temporal:
            self.text_fields.update((f.name, retype(f.type, _temporal_as_text)) for f in temporal)
            schema = pa.schema([f.with_type(retype(f.type, _temporal_as_text)) for f in table.schema])
            table = _read_block(block, options, schema)
        return table


def _read_block(block: bytes, options: pa_json.ReadOptions, schema: pa.Schema | None) -> pa.Table:
    parse = pa_json.ParseOptions(explicit_schema=schema) if schema is not None else None
    return pa_json.read_json(pa.BufferReader(block), read_options=options, parse_options=parse)


def _is_temporal(dtype: pa.DataType) -> bool:
    return pa.types.is_timestamp(dtype) or pa.types.is_date(dtype) or pa.types.is_time(dtype)


def _has_temporal(dtype: pa.DataType) -> bool:
    return _is_temporal(dtype) or any(_has_temporal(dtype.field(i).type) for i in range(dtype.num_fields))


def _temporal_as_text(dtype: pa.DataType) -> pa.DataType:
    return pa.string() if _is_temporal(dtype) else dtype


def retype(dtype: pa.DataType, leaf: Callable[[pa.DataType], pa.DataType]) -> pa.DataType:
    """``dtype`` with ``leaf`` applied to every type inside lists and structs."""
    if pa.types.is_struct(dtype):
        return pa.struct([dtype.field(i).with_type(retype(dtype.field(i).type, leaf)) for i in range(dtype.num_fields)])
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        item = dtype.value_field.with_type(retype(dtype.value_type, leaf))
        return pa.list_(item) if pa.types.is_list(dtype) else pa.large_list(item)
    return leaf(dtype)


def utf8_valid(table: pa.Table) -> bool:
    """True when every string and field name of ``table`` is valid UTF-8 (Arrow's JSON and
    Parquet readers do not check; a bad one fails only when Python reads it)."""
    try:
        for f in table.schema:
            _check_names(f)
        table.validate(full=True)
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return False
    return True


def _check_names(f: pa.Field) -> None:
    f.name  # noqa: B018 -- decoding the name raises UnicodeDecodeError when it is not UTF-8
    for i in range(f.type.num_fields):
        _check_names(f.type.field(i))


_SURROGATE_ESCAPE = r"\\u[dD][89a-fA-F]"
_SURROGATE_ESCAPE_TEXT = re.compile(_SURROGATE_ESCAPE)
_SURROGATE_ESCAPE_BYTES = re.compile(_SURROGATE_ESCAPE.encode())


def _python_block(block: bytes, first_line: int) -> RawChunk:
    """Parse a block line by line: blank lines are skipped, bad lines kept as undecodable."""
    escapes = _SURROGATE_ESCAPE_BYTES.search(block) is not None
    chunk = RawChunk(rows=[], records=[], lines=BlockLines(block, first_line), surrogate_escapes=escapes)
    assert chunk.records is not None
    for offset, raw_line in enumerate(block.split(b"\n")):
        if not raw_line.strip():
            continue
        number = first_line + offset
        try:
            # Strict UTF-8 (json.loads(bytes) would guess UTF-16 for a line, and let encoded
            # surrogates through); a byte order mark where files were concatenated is skipped.
            value = json.loads(raw_line.removeprefix(codecs.BOM_UTF8).decode("utf-8"))
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            value = None
        if isinstance(value, dict):
            chunk.records.append(value)
            chunk.rows.append(number)
        else:
            chunk.undecodable.append((number, as_text(raw_line), None))
    return chunk


# -- JSON arrays ----------------------------------------------------------------------------


def _read_json(source: Source, on_progress: Callable[[int], None]) -> Iterator[RawChunk]:
    """A ``.json`` file: an array of objects, streamed object by object (or JSON Lines).

    A JSON object written over several lines (pretty-printed, or ``{"data": [...]}``) is
    neither, and is a one-line error rather than one reject per line: which key holds the
    rows, and whether the others matter, is for the user to say (``jq '.data'``)."""
    assert source.path is not None
    with open(source.path, "rb") as raw:
        binary = gzip.GzipFile(fileobj=raw) if source.gzip else raw
        text = io.TextIOWrapper(binary, encoding="utf-8-sig")
        seen = 0

        def report() -> None:
            nonlocal seen
            on_progress(raw.tell() - seen)
            seen = raw.tell()

        try:
            _check_not_utf16(binary.peek(4)[:4], source)
            head = text.read(1 << 16)
            while head and not head.strip():  # blank so far: the first value may be further on
                head = text.read(1 << 16)
            if not head:  # an empty (or blank) file: no rows, as an empty .jsonl
                report()
                return
            shape = _json_shape(head)
            if shape == "lines":
                yield from _read_jsonl(source, on_progress)
                return
            if shape == "object":
                raise DataError(
                    "a JSON object over several lines, not an array of objects or JSON Lines (one object per line)",
                    file=source.name,
                    hint=_rows_key_hint(head),
                )
            if shape != "array":
                raise DataError("not a JSON array of objects (nor JSON Lines)", file=source.name)
            yield from _json_array(source, text, head, report)
        except UnicodeDecodeError as exc:
            raise DataError(f"not UTF-8 text ({exc.reason})", file=source.name) from None
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"cannot decompress ({exc})", file=source.name) from None


def _json_shape(head: str) -> str:
    """The layout of a ``.json`` file from its first 64 KiB: "array", "lines" (JSON Lines),
    "object" (one value over several lines) or "other"."""
    text = head.lstrip()
    if text.startswith("["):
        return "array"
    if not text.startswith("{"):
        return "other"
    newline = text.find("\n")
    if newline < 0:  # one line, or a first line longer than the head: JSON Lines
        return "lines"
    # Where the first value ends, or where it stops parsing (the head may cut it short): within
    # the first line, a JSON Lines file (whose first line may be broken: that line becomes a
    # reject). A whole value past it is a value over several lines. One that stops parsing past
    # it is too, unless the next line is an object by itself: then the first line is a broken
    # JSON Lines row that happens to stop where a row could go on.
    try:
        _, end = json.JSONDecoder().raw_decode(text)
        whole = True
    except json.JSONDecodeError as exc:
        end, whole = exc.pos, False
    except RecursionError:
        return "lines"
    if end <= newline:
        return "lines"
    if whole:
        return "object"
    second = next((line for line in text[newline + 1 :].split("\n") if line.strip()), "")
    try:
        return "lines" if isinstance(json.loads(second), dict) else "object"
    except (ValueError, RecursionError):
        return "object"


def _rows_key_hint(head: str) -> str:
    try:
        value = json.loads(head)
    except (ValueError, RecursionError):
        value = None
    if isinstance(value, dict):
        keys = [k for k, v in value.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    else:  # cut short by the head: the first key, when it opens a list
        match = re.match(r'\s*\{\s*"((?:[^"\\]|\\.)*)"\s*:\s*\[', head)
        keys = [match.group(1)] if match else []
    if keys:
        return f"its rows seem to be under {keys[0]!r}: extract them, e.g. jq '.{keys[0]}' FILE > rows.json"
    return "write the rows as an array of objects, or one object per line"


def _json_array(source: Source, text: io.TextIOWrapper, buf: str, report: Callable[[], None]) -> Iterator[RawChunk]:
    decoder = json.JSONDecoder()
    pos = buf.index("[") + 1
    chunk, index, eof, want = RawChunk(rows=[], records=[]), 0, False, 1 << 16

    def skip(sep: str) -> None:
        nonlocal pos
        while pos < len(buf) and (buf[pos].isspace() or buf[pos] == sep):
            pos += 1

    while True:
        skip(",")
        if pos >= len(buf) and not eof:
            more = text.read(want)
            eof = not more
            buf, pos = buf[pos:] + more, 0
            continue
        if pos < len(buf) and buf[pos] == "]":
            break
        if pos >= len(buf):
            raise DataError("JSON array is not closed (truncated file?)", file=source.name, row=index + 1)
        try:
            value, end = decoder.raw_decode(buf, pos)
        except RecursionError:
            raise DataError("invalid JSON (nested too deeply)", file=source.name, row=index + 1) from None
        except json.JSONDecodeError as exc:
            if eof:
                raise DataError(f"invalid JSON ({exc.msg})", file=source.name, row=index + 1) from None
            more = text.read(want)
            eof, want = not more, want * 2
            buf, pos = buf[pos:] + more, 0
            continue
        want = 1 << 16
        if not chunk.surrogate_escapes and _SURROGATE_ESCAPE_TEXT.search(buf, pos, end):
            chunk.surrogate_escapes = True
        pos, index = end, index + 1
        if isinstance(value, dict):
            chunk.records.append(value)  # type: ignore[union-attr]
            chunk.rows.append(index)
        else:
            chunk.undecodable.append((index, json.dumps(value, ensure_ascii=False), None))
        if len(chunk.rows) + len(chunk.undecodable) >= BATCH_ROWS:
            report()
            yield chunk
            chunk = RawChunk(rows=[], records=[])
    report()
    if chunk.rows or chunk.undecodable:
        yield chunk


# -- CSV, Parquet ---------------------------------------------------------------------------


def _read_csv(source: Source, on_progress: Callable[[int], None]) -> Iterator[RawChunk]:
    """CSV with every column read as text, so a type never changes between blocks.

    Rows are numbered 1, 2, ... after the header (blank lines are not rows). A row with the
    wrong number of fields is skipped by Arrow and becomes an ``undecodable`` reject; Arrow
    names its record number only when it reads on one thread (it does not need more: it is
    faster that way on small machines), and the rows it kept are numbered around it."""
    assert source.path is not None
    numbers = _CsvRows()

    def invalid(row: Any) -> str:
        numbers.skipped(None if row.number is None else row.number - 1, row.text)  # the header is record 1
        return "skip"

    parse = pa_csv.ParseOptions(newlines_in_values=True, invalid_row_handler=invalid)
    read = pa_csv.ReadOptions(block_size=BLOCK_BYTES, use_threads=False)
    try:
        skip = pa_csv.ParseOptions(newlines_in_values=True, invalid_row_handler=lambda row: "skip")
        with pa_csv.open_csv(source.path, read_options=read, parse_options=skip) as probe:
            names = probe.schema.names
        convert = pa_csv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False)
        reader = pa_csv.open_csv(source.path, read_options=read, parse_options=parse, convert_options=convert)
        for batch in reader:
            on_progress(batch.num_rows)
            rows = numbers.kept(batch.num_rows)
            yield RawChunk(rows=rows, table=pa.Table.from_batches([batch]), undecodable=numbers.bad_up_to(rows))
        rest = numbers.bad_up_to(None)
        if rest:
            yield RawChunk(rows=[], records=[], undecodable=rest)
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise DataError(f"unreadable CSV ({first_line(exc)})", file=source.name) from None


class _CsvRows:
    """Row numbers of a CSV file's rows: Arrow skips malformed rows (``skipped``, called in
    file order as it parses, possibly a block ahead of the batches), and the rows it keeps are
    numbered around them: the k-th kept row is row k plus the skipped rows before it. Once a
    skipped row's number is unknown, later rows' numbers are unknown too (None, never wrong)."""

    def __init__(self) -> None:
        self.count = 0  # rows kept so far
        self.skips: list[int] = []  # numbers of skipped rows, ascending
        self.lost = False
        self.pending: list[tuple[int | None, str, str | None]] = []

    def skipped(self, number: int | None, text: str) -> None:
        if number is None:
            self.lost = True
        else:
            self.skips.append(number)
        self.pending.append((number, text, None))

    def kept(self, n: int) -> list[int | None]:
        ks = np.arange(self.count + 1, self.count + n + 1)
        self.count += n
        if self.lost:
            return [None] * n
        shift = np.asarray(self.skips, dtype=np.int64) - np.arange(len(self.skips))
        return (ks + np.searchsorted(shift, ks, side="right")).tolist()

    def bad_up_to(self, rows: list[int | None] | None) -> list[tuple[int | None, str, str | None]]:
        """Skipped rows to report with a batch of ``rows`` (those before its end), or all."""
        last = max((r for r in rows if r is not None), default=None) if rows is not None else None
        if rows is None or last is None:
            out, self.pending = self.pending, []
            return out
        out = [b for b in self.pending if b[0] is None or b[0] < last]
        self.pending = [b for b in self.pending if not (b[0] is None or b[0] < last)]
        return out


def _read_parquet(source: Source, on_progress: Callable[[int], None]) -> Iterator[RawChunk]:
    assert source.path is not None
    try:
        pf = pq.ParquetFile(source.path)
        row = 1
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            on_progress(batch.num_rows)
            yield checked_chunk(pa.Table.from_batches([batch]), row, source)
            row += batch.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"not a readable Parquet file ({first_line(exc)})", file=source.name) from None


def checked_chunk(table: pa.Table, first_row: int, source: Source) -> RawChunk:
    """A chunk of rows ``first_row, ...`` from an Arrow table read from a file that may hold
    strings that are not UTF-8 (Parquet does not check): those rows become ``undecodable``
    rejects naming the column. The check is one ``validate`` (~7 ms per 100k rows)."""
    rows: list[int | None] = list(range(first_row, first_row + table.num_rows))
    if utf8_valid(table):
        return RawChunk(rows=rows, table=table)
    try:
        names = table.column_names
        for f in table.schema:
            _check_names(f)
    except UnicodeDecodeError:
        raise DataError("column names are not UTF-8 text", file=source.name) from None
    good: list[int] = []
    bad: list[tuple[int | None, str, str | None]] = []
    for i in range(table.num_rows):  # rare: only a batch with a bad string
        row = table.slice(i, 1)
        broken = [name for name, col in zip(names, row.columns, strict=True) if not utf8_valid(pa.table({name: col}))]
        if broken:
            bad.append((rows[i], _lossy_json(row), broken[0]))
        else:
            good.append(i)
    return RawChunk(rows=[rows[i] for i in good], table=table.take(pa.array(good, pa.int64())), undecodable=bad)


def _lossy_json(row: pa.Table) -> str:
    """A one-row table as JSON, its strings read as bytes (bad UTF-8 as ``\\xNN`` escapes)."""
    as_bytes = row.cast(pa.schema([f.with_type(retype(f.type, _string_as_binary)) for f in row.schema]))
    record = as_bytes.to_pylist()[0]
    return json.dumps(record, ensure_ascii=False, default=_bytes_text)


def _string_as_binary(dtype: pa.DataType) -> pa.DataType:
    if dtype in (pa.string(), pa.string_view()):
        return pa.binary()
    return pa.large_binary() if dtype == pa.large_string() else dtype


def _bytes_text(value: Any) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)
