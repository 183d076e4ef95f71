"""Readers for ingest: every input turns into a stream of ``RawChunk``s of bounded size.

A chunk holds rows as an Arrow table when Arrow could parse them (the fast path), or as
Python dicts when it could not (mixed types, blank lines, a bad line in the block). Each row
carries its 1-based line or row number so a reject can point back into the file.

JSON Lines are read in byte blocks split at newlines. Each block is parsed by Arrow; if Arrow
refuses it (one undecodable line, a field whose type changes) only that block is re-read line
by line in Python, so a bad line becomes a reject instead of stopping the run, and memory stays
bounded by the block size whatever the file size.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from prefcurate.errors import DataError

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


@dataclass
class RawChunk:
    """Rows of one input, as an Arrow table or as Python dicts, with their row numbers."""

    rows: list[int]
    """1-based line (JSONL) or row number of each row."""
    table: pa.Table | None = None
    records: list[dict[str, Any]] | None = None
    undecodable: list[tuple[int | None, str]] = field(default_factory=list)
    """(row number, raw text) of lines that are not a JSON object."""

    @property
    def num_rows(self) -> int:
        return len(self.rows)


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


def resolve_sources(specs: list[str]) -> list[Source]:
    """Expand ``SRC...`` into sources: files, directories of files, HF dataset dirs, ``hf:`` ids."""
    out: list[Source] = []
    for spec in specs:
        if spec.startswith(HUB_PREFIX):
            repo, _, split = spec[len(HUB_PREFIX) :].partition(":")
            if not repo:
                raise DataError("empty Hub dataset id", file=spec, hint="write hf:org/name or hf:org/name:split")
            out.append(Source(name=spec, kind="hf-hub", hub_id=repo, split=split or None))
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


def _dir_sources(path: Path) -> list[Source]:
    if is_hf_dataset_dir(path):
        return [Source(name=path.name, kind="hf-dir", path=path)]
    if (path / "manifest.json").is_file() and (path / "data").is_dir():
        # A prefcurate stage or export directory: its rows are under data/ (not the manifest,
        # the card or rejects/).
        path = path / "data"
    files = [
        f
        for f in sorted(path.rglob("*"))
        if f.is_file() and _kind_of(f) and not any(p.startswith(".") for p in f.relative_to(path).parts)
    ]
    if not files:
        raise DataError("directory holds no .jsonl, .json, .csv or .parquet files", file=str(path))
    return [Source(name=str(f.relative_to(path.parent)), kind=_kind_of(f) or "", path=f) for f in files]


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
    for i, block in enumerate(_byte_blocks(source, on_progress)):
        if i == 0 and block.startswith(codecs.BOM_UTF8):
            block = block[len(codecs.BOM_UTF8) :]
        n_lines = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
        table = _arrow_block(block)
        if table is not None and table.num_rows == n_lines:
            yield RawChunk(rows=list(range(line, line + n_lines)), table=table)
        else:
            yield _python_block(block, line)
        line += n_lines


def _arrow_block(block: bytes) -> pa.Table | None:
    """Arrow's parse of a block, or None. Sub-blocks of 1 MiB parse on several threads; a line
    longer than that makes Arrow refuse them, so one retry takes the block whole."""
    for size in (1 << 20, len(block) + 1):
        try:
            return pa_json.read_json(pa.BufferReader(block), read_options=pa_json.ReadOptions(block_size=size))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            if "straddling" not in str(exc) or size > len(block):
                return None
    return None


def _python_block(block: bytes, first_line: int) -> RawChunk:
    """Parse a block line by line: blank lines are skipped, bad lines kept as undecodable."""
    chunk = RawChunk(rows=[], records=[])
    assert chunk.records is not None
    for offset, raw_line in enumerate(block.split(b"\n")):
        if not raw_line.strip():
            continue
        number = first_line + offset
        try:
            value = json.loads(raw_line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            value = None
        if isinstance(value, dict):
            chunk.records.append(value)
            chunk.rows.append(number)
        else:
            chunk.undecodable.append((number, raw_line.decode("utf-8", "replace").rstrip("\r")))
    return chunk


# -- JSON arrays ----------------------------------------------------------------------------


def _read_json(source: Source, on_progress: Callable[[int], None]) -> Iterator[RawChunk]:
    """A ``.json`` file: an array of objects, streamed object by object (or JSON Lines)."""
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
            head = text.read(1 << 16)
            first = head.lstrip()[:1]
            if first == "{":
                yield from _read_jsonl(source, on_progress)
                return
            if first != "[":
                raise DataError("not a JSON array of objects (nor JSON Lines)", file=source.name)
            yield from _json_array(source, text, head, report)
        except UnicodeDecodeError as exc:
            raise DataError(f"not UTF-8 text ({exc.reason})", file=source.name) from None
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"cannot decompress ({exc})", file=source.name) from None


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
        except json.JSONDecodeError as exc:
            if eof:
                raise DataError(f"invalid JSON ({exc.msg})", file=source.name, row=index + 1) from None
            more = text.read(want)
            eof, want = not more, want * 2
            buf, pos = buf[pos:] + more, 0
            continue
        want = 1 << 16
        pos, index = end, index + 1
        if isinstance(value, dict):
            chunk.records.append(value)  # type: ignore[union-attr]
            chunk.rows.append(index)
        else:
            chunk.undecodable.append((index, json.dumps(value, ensure_ascii=False)))
        if len(chunk.rows) + len(chunk.undecodable) >= BATCH_ROWS:
            report()
            yield chunk
            chunk = RawChunk(rows=[], records=[])
    report()
    if chunk.rows or chunk.undecodable:
        yield chunk


# -- CSV, Parquet ---------------------------------------------------------------------------


def _read_csv(source: Source, on_progress: Callable[[int], None]) -> Iterator[RawChunk]:
    """CSV with every column read as text, so a type never changes between blocks."""
    assert source.path is not None
    bad: list[tuple[int | None, str]] = []

    def invalid(row: Any) -> str:
        # A row with the wrong number of fields is a reject; its line number is unknown when
        # values may hold newlines (Arrow reports None then), so source_row stays null.
        bad.append((row.number, row.text))
        return "skip"

    parse = pa_csv.ParseOptions(newlines_in_values=True, invalid_row_handler=invalid)
    read = pa_csv.ReadOptions(block_size=BLOCK_BYTES)
    try:
        skip = pa_csv.ParseOptions(newlines_in_values=True, invalid_row_handler=lambda row: "skip")
        with pa_csv.open_csv(source.path, read_options=read, parse_options=skip) as probe:
            names = probe.schema.names
        convert = pa_csv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False)
        reader = pa_csv.open_csv(source.path, read_options=read, parse_options=parse, convert_options=convert)
        row = 1
        for batch in reader:
            on_progress(batch.num_rows)
            yield RawChunk(
                rows=list(range(row, row + batch.num_rows)), table=pa.Table.from_batches([batch]), undecodable=bad[:]
            )
            bad.clear()
            row += batch.num_rows
        if bad:
            yield RawChunk(rows=[], records=[], undecodable=bad[:])
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise DataError(f"unreadable CSV ({first_line(exc)})", file=source.name) from None


def _read_parquet(source: Source, on_progress: Callable[[int], None]) -> Iterator[RawChunk]:
    assert source.path is not None
    try:
        pf = pq.ParquetFile(source.path)
        row = 1
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            on_progress(batch.num_rows)
            yield RawChunk(rows=list(range(row, row + batch.num_rows)), table=pa.Table.from_batches([batch]))
            row += batch.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"not a readable Parquet file ({first_line(exc)})", file=source.name) from None


def first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
