"""export: write the pairs in a trainer's layout, as a Hugging Face Hub dataset directory.

Layouts (``--format``):

- ``trl``: TRL's standard preference format, plain strings. ``prompt`` is the user's text
  when the prompt is one user turn; a longer prompt becomes a transcript, one
  ``Role: content`` block per message joined by blank lines (``schema.render_transcript``),
  ending with ``"\\n\\nAssistant:"`` so the model sees where its reply starts.
  ``chosen``/``rejected`` are the assistant contents (several messages joined by blank lines).
  An empty prompt (no messages: an implicit-prompt pair with no shared prefix) is ``""``,
  whatever the other rows of its batch hold (``export_layouts.prompt_text``).
- ``trl-chat``: TRL's conversational format: ``prompt``, ``chosen``, ``rejected`` as
  ``[{role, content}]`` lists (lossless; the default).
- ``openrlhf``: OpenRLHF's reward-model / DPO layout: ``chosen`` and ``rejected`` are whole
  conversations (prompt messages + the response), read by ``--apply_chat_template
  --chosen_key chosen --rejected_key rejected`` (do *not* pass ``--prompt_key``: OpenRLHF
  would prepend the prompt a second time; for DPO it takes the prompt as ``chosen[:-1]``).
  ``prompt`` (the prompt messages) is kept for reference; ``margin`` is OpenRLHF's
  margin-loss key.
- ``kto``: TRL's unpaired conversational format ``prompt``/``completion``/``label``: each
  pair becomes a desirable row (chosen, ``label=true``) and an undesirable row (rejected,
  ``false``), adjacent and sharing the pair's ``id``.

Every layout keeps ``id`` and ``source``; ``margin`` (``margin_mean`` from score, else the
judge's ``judge_pref`` as ``logit(pref)``, the same transform the score stage uses) and
``adaptive_margin`` when the input has them; ``tie`` with ``--ties keep``.

Design decisions: the base stage counts *pairs* (rows in = pairs out + rejects); the data
writer turns pairs into layout rows, so kto's doubling is recorded as ``rows_written`` in the
manifest next to the pair count. The writer streams (one open file per split, rotated every
``--shard-rows`` rows, renamed ``train-00000-of-00003`` when the count is known), writes JSON
Lines with polars' vectorised writer, and the dataset card's figures are accumulated on the
same pass, so exporting reads the input once.
"""

from __future__ import annotations

import io
import os
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from prefcurate.schema import MESSAGES
from prefcurate.shards import DATA_DIR, DEFAULT_ROWS_PER_SHARD, Manifest, StageOutput, shard_paths
from prefcurate.stages.base import BatchResult, Stage, StageConfig, StageContext, StageInput, as_table, split
from prefcurate.stages.export_layouts import (
    layout_schema,
    stable_fraction,
    to_layout,
)

SPLITS = ("train", "test")


class ExportConfig(StageConfig):
    """Options of ``prefcurate export`` (and a recipe's ``output``)."""

    format: Literal["trl", "trl-chat", "openrlhf", "kto"] = Field(
        "trl-chat",
        description="Layout: trl (strings), trl-chat (message lists), openrlhf (full conversations), "
        "kto (unpaired rows).",
    )
    to: Literal["parquet", "jsonl"] = Field("parquet", description="File type of the data files.")
    ties: Literal["drop", "keep"] = Field(
        "drop", description="drop: tied pairs go to rejects/ (reason tie); keep: export them with a tie column."
    )
    test_size: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Share of pairs in a test split, chosen by a stable hash of the id (0: train only).",
    )
    shard_rows: int = Field(DEFAULT_ROWS_PER_SHARD, ge=1, description="Rows per data file.")
    license: str = Field(
        "other", description="License written in the dataset card (an SPDX-like Hub id, e.g. mit, cc-by-4.0)."
    )
    name: str | None = Field(
        None, description="Dataset name for the card's title (default: the output directory's name)."
    )

    def produces(self) -> set[str]:
        return set()


def prefetch(batches: Iterator[pa.RecordBatch], depth: int = 2) -> Iterator[pa.RecordBatch]:
    """Read the next ``depth`` batches on a thread while the caller works on this one.

    Parquet decoding releases the GIL, so reading, deciding and writing (the writer's own
    thread) overlap on two cores; memory holds ``depth`` more batches, whatever the size."""
    slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        slots.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(done)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            slots.put(exc)

    reader = threading.Thread(target=produce, name="export-reader", daemon=True)
    reader.start()
    try:
        while (item := slots.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join()


# -- the writer ---------------------------------------------------------------------------
class _SplitFiles:
    """One split's rotating data files, named ``{split}-NNNNN-of-MMMMM.{ext}`` at close."""

    def __init__(self, directory: Path, split_name: str, to: str, rows_per_file: int, schema: pa.Schema) -> None:
        self.directory, self.split, self.to = directory, split_name, to
        self.rows_per_file, self.schema = rows_per_file, schema
        self.paths: list[Path] = []
        self.rows = 0
        self._in_file = 0
        self._handle: Any = None

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._handle is None:
                self._open()
            room = self.rows_per_file - self._in_file
            head, table = table.slice(0, room), table.slice(room)
            self._append(head)
            self._in_file += head.num_rows
            self.rows += head.num_rows
            if self._in_file >= self.rows_per_file:
                self._close_file()

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f".{self.split}-{len(self.paths):05d}.{self.to}"
        self.paths.append(path)
        self._in_file = 0
        if self.to == "parquet":
            self._handle = pq.ParquetWriter(path, self.schema, compression="zstd", use_dictionary=["source"])
        else:
            self._handle = open(path, "wb")  # noqa: SIM115 - closed in _close_file

    def _append(self, table: pa.Table) -> None:
        if self.to == "parquet":
            self._handle.write_table(table)
            return
        import polars as pl

        # polars writes JSON Lines from the Arrow buffers in Rust: no per-row Python.
        buffer = io.BytesIO()
        pl.from_arrow(table).write_ndjson(buffer)
        self._handle.write(buffer.getbuffer())

    def _close_file(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def close(self, keep_empty: bool) -> list[Path]:
        if not self.paths and keep_empty:
            self._open()
            if self.to == "parquet":
                self._handle.write_table(self.schema.empty_table())
        self._close_file()
        total = len(self.paths)
        final = [self.directory / f"{self.split}-{i:05d}-of-{total:05d}.{self.to}" for i in range(total)]
        for tmp, dest in zip(self.paths, final, strict=True):
            os.replace(tmp, dest)
        self.paths = final
        return final


class HubDatasetWriter:
    """Takes pair tables (what the base writes as ``data``), routes each pair to its split by
    a stable hash of its id, and writes the layout's rows. Duck-types ``ShardWriter``.

    Conversion and file writes run on one background thread, at most ``MAX_PENDING`` batches
    behind the caller: reading and deciding the next batch overlaps with writing this one
    (Arrow, numpy and polars release the GIL), so two cores are both busy, and memory stays
    bounded by a few batches."""

    MAX_PENDING = 2

    def __init__(self, directory: Path, config: ExportConfig) -> None:
        self.directory, self.config = directory, config
        self.rows = 0  # pairs, as the base counts them
        self.schema: pa.Schema | None = None
        self.splits: dict[str, _SplitFiles] = {}
        self.closed = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="export-writer")
        self._pending: deque[Future[None]] = deque()

    def _open_splits(self, extras: list[str]) -> None:
        self.schema = layout_schema(self.config.format, extras)
        self.splits = {
            s: _SplitFiles(self.directory, s, self.config.to, self.config.shard_rows, self.schema) for s in SPLITS
        }

    @property
    def started(self) -> bool:
        """``ShardWriter.started``: whether the layout's schema is fixed."""
        return self.schema is not None

    def write(self, pairs: pa.Table | pa.RecordBatch) -> None:
        pairs = as_table(pairs)
        if self.schema is None:
            self._open_splits([c for c in pairs.column_names if c in ("tie", "margin", "adaptive_margin")])
        if not pairs.num_rows:
            return
        self.rows += pairs.num_rows
        self._pending.append(self._pool.submit(self._write_now, pairs))
        while len(self._pending) > self.MAX_PENDING:
            self._pending.popleft().result()

    def _write_now(self, pairs: pa.Table) -> None:
        if self.config.test_size > 0:
            test = stable_fraction(pairs["id"].combine_chunks()) < self.config.test_size
            parts = {"train": pairs.filter(pa.array(~test)), "test": pairs.filter(pa.array(test))}
        else:
            parts = {"train": pairs}
        assert self.schema is not None
        for name, part in parts.items():
            if part.num_rows:
                self.splits[name].write(to_layout(part, self.config.format, self.schema))

    def finish(self) -> None:
        """``ShardWriter.finish``: nothing to start early here (each file takes its rows as
        they come, and ``ExportOutput.commit`` closes this writer first)."""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        while self._pending:
            self._pending.popleft().result()
        self._pool.shutdown()
        if self.schema is None:
            self._open_splits([])
        for name, files in self.splits.items():
            files.close(keep_empty=name == "train")

    def discard(self) -> None:
        """Stop writing after a failure (the caller removes the directory)."""
        self.closed = True
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)
        for files in self.splits.values():
            files._close_file()

    def figures(self) -> dict[str, Any]:
        return {
            "rows_written": {s: f.rows for s, f in self.splits.items() if f.paths},
            "files": {s: [f"{DATA_DIR}/{p.name}" for p in f.paths] for s, f in self.splits.items() if f.paths},
        }


class ExportOutput(StageOutput):
    """A stage output whose data is a Hub dataset layout and which ships its dataset card."""

    def __init__(self, final_dir: str | Path, config: ExportConfig) -> None:
        super().__init__(final_dir)
        self.config = config
        self.data = HubDatasetWriter(self.tmp_dir / DATA_DIR, config)  # type: ignore[assignment]

    def commit(self, manifest: Manifest) -> Path:
        self.data.close()
        figures = self.data.figures()  # type: ignore[attr-defined]
        figures["rows_written_total"] = sum(figures["rows_written"].values())
        manifest.extra.update(figures)
        return super().commit(manifest)

    def before_publish(self, manifest: Manifest) -> None:
        from prefcurate.card import write_card

        write_card(self.tmp_dir, title=self.config.name or self.final_dir.name)


# -- the stage ----------------------------------------------------------------------------
class ExportStage(Stage):
    """Write a training-ready dataset (TRL, TRL chat, OpenRLHF, KTO) with a dataset card.

    Hugging Face Hub layout: OUT/data/train-00000-of-0000N.{parquet,jsonl}, OUT/README.md
    (the card), OUT/manifest.json and OUT/rejects/ (ties dropped with --ties drop)."""

    name: ClassVar[str] = "export"
    config_cls: ClassVar[type[StageConfig]] = ExportConfig
    config: ExportConfig

    def open_output(self, output_dir: str | Path, rows_per_shard: int | None = None) -> StageOutput:
        return ExportOutput(output_dir, self.config)

    def process(self, source: StageInput | None, ctx: StageContext) -> Iterator[BatchResult]:
        from prefcurate.stats import FigureAccumulator, footer_ranges

        assert source is not None, "export needs an input directory"
        self._configure(source)
        floats = [c for c in (self._margin_from, "adaptive_margin") if c and c in source.columns]
        ranges = footer_ranges(shard_paths(source.dir), floats) or {}
        if self._margin_from in ranges:
            lo, hi = ranges.pop(self._margin_from)
            ranges["margin"] = (
                (lo, hi) if self._margin_from == "margin_mean" else tuple(self._judge_margin(np.array([lo, hi])))
            )
        floats = ["margin"] * (self._margin_from is not None) + ["adaptive_margin"] * self._has_adaptive
        schema = pa.schema(
            [("chosen", MESSAGES), ("rejected", MESSAGES), ("source", pa.string())]
            + [(c, pa.float64()) for c in floats]
        )
        self._figures = FigureAccumulator(schema, unit="chars", float_ranges=ranges)
        self._ties = 0
        task = ctx.progress.task(self.name, total=source.num_rows)
        for batch in prefetch(source.batches()):
            result = self.process_batch(batch, ctx)
            task.advance(result.rows_consumed)
            yield result
        ctx.extra.update(
            format=self.config.format,
            to=self.config.to,
            pairs_exported=self._figures.rows,
            margin_from=self._margin_from,
            ties={"count": self._ties, "policy": self.config.ties},
            figures=self._figures.result(),
        )

    def _configure(self, source: StageInput) -> None:
        """What the input holds that the pair columns (``_pairs``) depend on."""
        self._margin_from = next((c for c in ("margin_mean", "judge_pref") if c in source.columns), None)
        self._has_adaptive = "adaptive_margin" in source.columns
        self._has_tie = "tie" in source.columns

    def empty_output(self, source: StageInput | None) -> pa.Table | None:
        """No pair came (an empty input): the pair columns a batch of this input would give
        (``_pairs``: no ``tie`` with ``--ties drop``, ``margin`` from a scored or judged
        input), so the files have the layout's columns of a non-empty export."""
        if source is None or source.schema is None:
            return None
        self._configure(source)
        return self._pairs(source.schema.empty_table())

    @staticmethod
    def _judge_margin(pref: np.ndarray) -> np.ndarray:
        from prefcurate.backends.reward import judge_margin

        return judge_margin(pref)

    def process_batch(self, batch: pa.RecordBatch, ctx: StageContext) -> BatchResult:
        table = as_table(batch)
        tie = np.asarray(pc.fill_null(table["tie"], False)) if self._has_tie else np.zeros(table.num_rows, bool)
        self._ties += int(tie.sum())
        if self.config.ties == "drop" and tie.any():
            result = split(table, ~tie, "tie")
        else:
            result = BatchResult(table)
        result.kept = self._pairs(result.kept)
        self._figures.add(result.kept)
        return result

    def _pairs(self, table: pa.Table) -> pa.Table:
        """The columns the layouts need: canonical pair columns plus tie and margins."""
        cols: dict[str, Any] = {c: table[c] for c in ("id", "prompt", "chosen", "rejected")}
        cols["source"] = table["source"] if "source" in table.column_names else pa.nulls(table.num_rows, pa.string())
        if self.config.ties == "keep":
            cols["tie"] = table["tie"] if self._has_tie else pa.array(np.zeros(table.num_rows, bool))
        if self._margin_from == "margin_mean":
            cols["margin"] = table["margin_mean"].cast(pa.float64())
        elif self._margin_from == "judge_pref":
            pref = np.asarray(pc.fill_null(table["judge_pref"].cast(pa.float64()), np.nan), dtype=np.float64)
            cols["margin"] = pa.array(self._judge_margin(pref), pa.float64(), from_pandas=True)
        if self._has_adaptive:
            cols["adaptive_margin"] = table["adaptive_margin"].cast(pa.float64())
        return pa.table(cols)
