"""The ``ingest`` stage: raw preference files in, canonical pairs out.

Readers (``ingest_read``) stream each source as bounded chunks; the format is detected per file
from its columns (``ingest_formats``), or named with ``--format``; each row becomes one pair (or
several, for rated completions: ``ingest_ratings``) or a reject with a reason. Plain TRL string
rows take a vectorized Arrow path (``ingest_fast``) with the same ids and reasons as the
per-row path.

Ingest rejects keep the raw input row (``raw``): a JSON Lines row as its line, exactly as written;
other rows as JSON. With it go ``source`` and the 1-based ``source_row``, because a row that could
not be read does not fit the canonical schema. A row holding text that is not valid Unicode (a
lone surrogate such as ``"\\udc00"``, invalid UTF-8 in a Parquet string) is rejected as
``undecodable:<field>``, as a line that is not a JSON object is ``undecodable``: such text cannot
be hashed or written.
``rows_in`` counts what came out: pairs produced plus records rejected; the records read per
file are in the manifest's ``extra.records_read``.
"""

from __future__ import annotations

import json
import queue
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from prefcurate.errors import DataError
from prefcurate.schema import REJECT_REASON, SCHEMA, pair_id
from prefcurate.shards import files_fingerprint, fingerprint
from prefcurate.stages import ingest_fast
from prefcurate.stages.base import BatchResult, Stage, StageConfig, StageContext, StageInput
from prefcurate.stages.ingest_formats import NORMALIZERS, Layout, Pair, RowProblem, detect
from prefcurate.stages.ingest_ratings import Binarizer
from prefcurate.stages.ingest_ratings import number as _number
from prefcurate.stages.ingest_read import (
    HUB_PREFIX,
    RawChunk,
    Source,
    expand_globs,
    progress_total,
    read_chunks,
    resolve_sources,
)

REJECT_SCHEMA = pa.schema(
    [("raw", pa.string()), ("source", pa.string()), ("source_row", pa.int64()), (REJECT_REASON, pa.string())]
)


class IngestConfig(StageConfig):
    """Read raw preference data (JSONL, JSON, CSV, Parquet, Hugging Face datasets) into canonical pairs."""

    sources: list[str] = Field(
        ...,
        min_length=1,
        description="Input files (.jsonl, .json, .csv, .parquet, optionally .gz), glob patterns of them "
        "(quoted: 'data/*.jsonl.gz', 'data/**/*.parquet'), directories of them (a prefcurate stage or export "
        "directory, also one inside, gives its data/ files, not its rejects/), local Hugging Face dataset "
        "directories, or Hub ids hf:org/name[:split].",
        json_schema_extra={"cli": {"argument": True}},
    )
    format: Literal["auto", "trl", "trl-chat", "implicit", "hh-rlhf", "pairwise", "ultrafeedback"] = Field(
        "auto", description="Input layout; auto detects it per file from the columns."
    )
    map: dict[str, str] = Field(
        default_factory=dict,
        description="Rename input columns before detection, NAME=COLUMN (e.g. prompt=question, id=uid).",
    )
    binarize: Literal["best-vs-worst", "best-vs-random", "all-pairs"] = Field(
        "best-vs-worst", description="How rated completions (ultrafeedback) become pairs."
    )
    min_gap: float = Field(
        0.0, ge=0, description="all-pairs: smallest rating gap for a pair (0 keeps equal ratings as ties)."
    )
    seed: int = Field(0, description="Seed of the best-vs-random draw.")
    ratings_from: Literal["auto", "overall", "fine-grained", "annotations"] = Field(
        "auto",
        description="UltraFeedback rating per completion: auto = fine-grained_score, else the annotations' "
        "mean, else overall_score.",
    )
    strict: bool = Field(False, description="Stop at the first bad row instead of sending it to rejects/.")

    def requires(self) -> set[str]:
        return set()

    def produces(self) -> set[str]:
        return set(SCHEMA.names)

    @classmethod
    def resolve_recipe_paths(cls, data: dict[str, Any], base: Path) -> dict[str, Any]:
        """Recipe sources are relative to the recipe file (Hub ids stay as they are)."""
        sources = data.get("sources")
        if isinstance(sources, str):
            sources = [sources]
        if isinstance(sources, list):
            data["sources"] = [
                s if str(s).startswith(HUB_PREFIX) or Path(str(s)).expanduser().is_absolute() else str(base / str(s))
                for s in sources
            ]
        return data


class IngestStage(Stage):
    """Read raw preference data (JSONL, JSON, CSV, Parquet, Hugging Face datasets) into canonical pairs.

    Formats are detected per file (trl, trl-chat, implicit, hh-rlhf, pairwise, ultrafeedback);
    bad rows go to rejects/ with a reason; ties are kept with tie=True.
    """

    name = "ingest"
    config_cls = IngestConfig
    takes_input: ClassVar[bool] = False
    config: IngestConfig

    def empty_output(self, source: StageInput | None) -> pa.Table:
        return SCHEMA.empty_table()

    def input_paths(self) -> list[Path]:
        return [Path(s) for s in expand_globs(self._local_sources())]

    def _local_sources(self) -> list[str]:
        return [s for s in self.config.sources if not s.startswith(HUB_PREFIX)]

    def input_fingerprint(self, source: StageInput | None) -> str:
        # Glob patterns count by the files they match now: a new matching file reruns the stage.
        local = expand_globs(self._local_sources())
        hub = [s for s in self.config.sources if s.startswith(HUB_PREFIX)]
        return fingerprint(files_fingerprint(local), hub)

    def process(self, source: StageInput | None, ctx: StageContext) -> Iterator[BatchResult]:
        files: list[dict[str, Any]] = []
        for src in resolve_sources(list(self.config.sources)):
            stats = {"source": src.name, "format": None, "records": 0, "pairs": 0, "rejected": 0}
            files.append(stats)
            yield from self._ingest(src, ctx, stats)
        records: dict[str, int] = {}
        for stats in files:
            records[stats["source"]] = records.get(stats["source"], 0) + stats["records"]
        ctx.extra["records_read"] = records
        ctx.extra["files"] = files

    def _ingest(self, src: Source, ctx: StageContext, stats: dict[str, Any]) -> Iterator[BatchResult]:
        total, unit = progress_total(src)
        task = ctx.progress.task(src.name if src.path is None else src.path.name, total=total, unit=unit)

        def results() -> Iterator[BatchResult]:
            layout: Layout | None = None
            for chunk in read_chunks(src, task.advance):
                stats["records"] += chunk.num_rows + len(chunk.undecodable)
                if layout is None and chunk.num_rows:
                    layout = self._detect(src, chunk)
                    stats["format"] = layout.format
                result = self._chunk(src, chunk, layout)
                stats["pairs"] += result.kept.num_rows
                stats["rejected"] += result.rejected.num_rows if result.rejected is not None else 0
                yield result

        yield from in_background(results())

    # -- one chunk ------------------------------------------------------------------------
    def _detect(self, src: Source, chunk: RawChunk) -> Layout:
        mapping = self._renames(_columns(chunk), src)
        # Detection looks at a column's first non-empty value: a file may well start with a
        # row whose chosen is "" (a reject), and its format is in the rows after it.
        if chunk.table is not None:
            table = _rename_table(chunk.table, mapping)
            columns = table.column_names

            def first(name: str) -> Any:
                return _first_filled(table[name])
        else:
            records = [_rename_record(r, mapping) for r in chunk.records or []]
            columns = sorted({k for r in records for k in r})

            def first(name: str) -> Any:
                return _first_filled_value(r.get(name) for r in records)

        forced = None if self.config.format == "auto" else self.config.format
        return detect(columns, first, forced, src.name)

    def _renames(self, columns: list[str], src: Source) -> dict[str, str]:
        """``--map NAME=COLUMN`` as {column: name}; a mapped column must exist in the file."""
        for name, column in self.config.map.items():
            if column not in columns:
                raise DataError(
                    f"column {column!r} (from --map {name}={column}) not found; columns: {', '.join(columns)}",
                    file=src.name,
                )
        return {column: name for name, column in self.config.map.items()}

    def _chunk(self, src: Source, chunk: RawChunk, layout: Layout | None) -> BatchResult:
        rejects = _Rejects(src.name)
        if self.config.strict and chunk.undecodable:
            self._strict_before_undecodable(src, chunk, layout)
        for row, text, field in chunk.undecodable:
            problem = RowProblem("undecodable", field)
            self._problem(src, row, problem)
            rejects.add(text, row, problem.label)
        if layout is None or not chunk.num_rows:
            return BatchResult(SCHEMA.empty_table(), rejects.table())
        mapping = {column: name for name, column in self.config.map.items()}
        if chunk.table is not None:
            mapped = _rename_table(chunk.table, mapping)
            if layout.format == "trl" and ingest_fast.applicable(mapped):
                return self._fast(src, chunk, mapped, rejects)
            records = chunk.table.to_pylist()
        else:
            records = chunk.records or []
        # Strings Arrow made are valid UTF-8; ones json.loads made from a surrogate escape may
        # hold a lone surrogate (the reader flags such chunks: a scan of the raw text is cheaper).
        check_text = chunk.table is None and chunk.surrogate_escapes
        rows = _Rows()
        normalize = self._normalizer(layout)
        for i, (record, row) in enumerate(zip(records, chunk.rows, strict=True)):
            mapped_record = _rename_record(record, mapping)
            try:
                bad = _bad_text_field(mapped_record) if check_text else None
                if bad is not None:
                    raise RowProblem("undecodable", bad)
                pairs = normalize(mapped_record, layout)
            except RowProblem as problem:
                self._problem(src, row, problem)
                rejects.add(chunk.raw(i) or _dump(record), row, problem.label)
                continue
            rows.add(pairs, mapped_record.get("id"), _given_ratings(mapped_record))
        return BatchResult(rows.table(src.name), rejects.table())

    def _strict_before_undecodable(self, src: Source, chunk: RawChunk, layout: Layout | None) -> None:
        """--strict stops at the first bad row in file order: check the rows before the first
        undecodable one (rows are in file order) before that one is reported."""
        first = min((u[0] for u in chunk.undecodable if u[0] is not None), default=None)
        if first is None or layout is None:
            return
        k = next((i for i, row in enumerate(chunk.rows) if row is None or row > first), chunk.num_rows)
        if k:
            head = RawChunk(
                rows=chunk.rows[:k],
                table=chunk.table.slice(0, k) if chunk.table is not None else None,
                records=chunk.records[:k] if chunk.records is not None else None,
                lines=chunk.lines,
            )
            self._chunk(src, head, layout)  # raises at a bad row

    def _fast(self, src: Source, chunk: RawChunk, mapped: pa.Table, rejects: _Rejects) -> BatchResult:
        reasons = ingest_fast.row_reasons(mapped)
        if reasons is not None:
            bad = np.flatnonzero(np.not_equal(reasons, None))
            self._problem(src, chunk.rows[bad[0]], _problem_of(reasons[bad[0]]))
            for i in bad.tolist():
                raw = chunk.raw(i) or _dump(chunk.table.slice(i, 1).to_pylist()[0])  # type: ignore[union-attr]
                rejects.add(raw, chunk.rows[i], reasons[i])
            mapped = mapped.filter(pa.array(np.equal(reasons, None)))
        cols = ingest_fast.canonical_columns(mapped)
        n = mapped.num_rows
        table = pa.table(
            {
                **cols,
                "source": ingest_fast.repeated_string(src.name, n),
                "tie": _tie_column(mapped),
                **ingest_fast.ratings(mapped),
            }
        ).select(SCHEMA.names)
        return BatchResult(table.cast(SCHEMA), rejects.table())

    def _normalizer(self, layout: Layout) -> Any:
        if layout.format == "ultrafeedback":
            cfg = self.config
            return Binarizer(cfg.binarize, cfg.min_gap, cfg.seed, cfg.ratings_from)
        return NORMALIZERS[layout.format]

    def _problem(self, src: Source, row: int | None, problem: RowProblem) -> None:
        if self.config.strict:
            raise DataError(
                _message(problem, src),
                file=src.name,
                row=row,
                field=problem.field,
                hint="fix the row, or run without --strict to send bad rows to rejects/",
            )


def in_background(results: Iterator[BatchResult], depth: int = 2) -> Iterator[BatchResult]:
    """Produce results in a worker thread while the caller writes the previous ones.

    Parsing, Arrow compute and Parquet writing release the GIL, so on two cores reading
    chunk N+1 overlaps writing chunk N. At most ``depth`` results wait in the queue (memory
    stays bounded); an error in the worker is raised here; stopping early stops the worker.
    """
    out: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for result in results:
                if not put(("result", result)):
                    return
            put(("done", None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(("error", exc))

    worker = threading.Thread(target=work, name="prefcurate-ingest", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = out.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join()


def _message(problem: RowProblem, src: Source) -> str:
    if problem.reason != "undecodable":
        return problem.reason.replace("-", " ")
    if problem.field is not None:
        return "undecodable: text that is not valid Unicode (a lone surrogate or bad UTF-8)"
    if src.kind == "csv":
        return "undecodable: a row with the wrong number of fields"
    return "undecodable: not a JSON object, or not UTF-8 text"


def _problem_of(label: str) -> RowProblem:
    reason, _, field = label.partition(":")
    return RowProblem(reason, field or None)


def _columns(chunk: RawChunk) -> list[str]:
    if chunk.table is not None:
        return chunk.table.column_names
    return sorted({k for r in chunk.records or [] for k in r})


def _rename_table(table: pa.Table, mapping: dict[str, str]) -> pa.Table:
    if not mapping:
        return table
    targets = set(mapping.values())
    # A column already named like a mapping target is replaced by the mapped one.
    keep = [c for c in table.column_names if c in mapping or c not in targets]
    table = table.select(keep)
    return table.rename_columns([mapping.get(c, c) for c in keep])


def _rename_record(record: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    if not mapping:
        return record
    targets = set(mapping.values())
    return {mapping.get(k, k): v for k, v in record.items() if k in mapping or k not in targets}


def _given_ratings(record: dict[str, Any]) -> tuple[float | None, float | None]:
    """Ratings a pair row carries itself (``chosen_rating`` or ``score_chosen``, ...)."""
    out = []
    for names in ingest_fast.RATING_ALIASES.values():
        value = next((record[n] for n in names if record.get(n) is not None), None)
        out.append(_number(value))
    return out[0], out[1]


def _dump(record: Any) -> str:
    return json.dumps(record, ensure_ascii=False, default=str)


def _first_filled(column: pa.ChunkedArray) -> Any:
    """The first non-null, non-blank value of a column (else its first non-null value)."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        # No Python scalar in compute calls: wrapping one imports pandas (~0.2 s).
        filled = pc.indices_nonzero(pc.invert(pc.match_substring_regex(column, ingest_fast.BLANK)))
        if len(filled):
            return column[filled[0].as_py()].as_py()
        column = column.drop_null()
        return column[0].as_py() if len(column) else None
    return _first_filled_value(v.as_py() for v in column.drop_null())


def _first_filled_value(values: Iterator[Any]) -> Any:
    fallback = None
    for value in values:
        if value is None:
            continue
        blank = not value.strip() if isinstance(value, str) else isinstance(value, list | dict) and not value
        if not blank:
            return value
        if fallback is None:
            fallback = value
    return fallback


_SURROGATE = re.compile("[\ud800-\udfff]")


def _bad_text_field(record: dict[str, Any]) -> str | None:
    """The first field of a row decoded by json.loads whose key or value holds a lone surrogate
    (from an escape like "\\udc00": not Unicode text, so it cannot be hashed or written)."""
    for key, value in record.items():
        if not key.isascii() and _SURROGATE.search(key):
            return _printable(key)
        if not _valid_text(value):
            return key
    return None


def _valid_text(value: Any) -> bool:
    if isinstance(value, str):
        return value.isascii() or not _SURROGATE.search(value)
    if isinstance(value, list):
        return all(_valid_text(v) for v in value)
    if isinstance(value, dict):
        return all(_valid_text(k) and _valid_text(v) for k, v in value.items())
    return True


def _printable(text: str) -> str:
    """Text with lone surrogates written as ``\\udXXX`` escapes (as JSON would), so it can be stored."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _Rows:
    """Canonical rows collected column by column on the per-row path."""

    def __init__(self) -> None:
        self.cols: dict[str, list[Any]] = {name: [] for name in SCHEMA.names if name != "source"}

    def add(self, pairs: list[Pair], given_id: Any, ratings: tuple[float | None, float | None]) -> None:
        base = None if given_id is None or not str(given_id).strip() else str(given_id)
        c = self.cols
        for p in pairs:
            if p.chosen_rating is None and p.rejected_rating is None:
                p.chosen_rating, p.rejected_rating = ratings
            if base is None:
                c["id"].append(pair_id(p.prompt, p.chosen, p.rejected))
            else:
                c["id"].append(f"{base}:{p.id_suffix}" if p.id_suffix else base)
            c["prompt"].append(p.prompt)
            c["chosen"].append(p.chosen)
            c["rejected"].append(p.rejected)
            c["tie"].append(p.tie)
            c["chosen_rating"].append(p.chosen_rating)
            c["rejected_rating"].append(p.rejected_rating)

    def table(self, source: str) -> pa.Table:
        n = len(self.cols["id"])
        return pa.table({**self.cols, "source": [source] * n}, schema=SCHEMA)


class _Rejects:
    def __init__(self, source: str) -> None:
        self.source = source
        self.raw: list[str] = []
        self.rows: list[int | None] = []
        self.reasons: list[str] = []

    def add(self, raw: str, row: int | None, reason: str) -> None:
        self.raw.append(raw if _valid_text(raw) else _printable(raw))
        self.rows.append(row)
        self.reasons.append(reason)

    def table(self) -> pa.Table | None:
        if not self.raw:
            return None
        n = len(self.raw)
        return pa.table(
            {"raw": self.raw, "source": [self.source] * n, "source_row": self.rows, REJECT_REASON: self.reasons},
            schema=REJECT_SCHEMA,
        )


def _tie_column(table: pa.Table) -> pa.Array:
    """A boolean ``tie`` input column (as `export --ties keep` writes) is kept; else no ties."""
    if "tie" in table.column_names and pa.types.is_boolean(table.schema.field("tie").type):
        return table.column("tie").combine_chunks().fill_null(False)
    return ingest_fast.all_false(table.num_rows)
