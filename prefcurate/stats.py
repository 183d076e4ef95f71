"""Figures over a stage directory (any stage's output, export output included, or a loose
directory of shards such as ``rejects/``), as one JSON-able dict.

Design decisions:

- **Streaming, bounded memory.** Rows are read batch by batch and only the columns a figure
  needs. Nothing kept grows with the row count: integer lengths go into a ``bincount``
  (bounded by the longest text), floats into a fixed grid, sources into a capped counter.
- **Token length = whitespace-separated words** (ASCII whitespace), counted with numpy on
  the raw UTF-8 buffer of each Arrow string array: no per-row Python and about twice as fast
  as Arrow's regex kernels. ``unit="chars"`` counts characters instead (the dataset card
  uses it because it is nearly free). Lengths are integers, so quantiles are exact.
- **Float columns** (``margin*``, ``judge_pref``, ``similarity``, ratings, ...): the range
  comes from the Parquet footers' min/max statistics when every file has them, else from a
  first pass over just those columns; the second pass fills a 2,000-bin grid, so quantiles
  are exact to 1/2000 of the range and mean/std are exact.
- **Rejects by stage** are read from ``rejects/`` (only ``reject_stage``/``reject_reason``)
  of this directory and of every upstream stage directory named by the lineage that still
  holds the run the lineage describes (same fingerprint); for the others the counts come
  from the lineage entry itself and are marked ``"from": "manifest"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from prefcurate.errors import DataError, InputError
from prefcurate.schema import REJECT_REASON, REJECT_STAGE
from prefcurate.shards import DATA_DIR, MANIFEST, REJECTS_DIR, Manifest
from prefcurate.stats_figures import (
    FigureAccumulator,
    FloatDistribution,
    IntDistribution,
    text_lengths,
    word_counts,
)

__all__ = ["FigureAccumulator", "IntDistribution", "compute_stats", "text_lengths", "word_counts"]

BATCH_ROWS = 16_384


# -- reading a directory ------------------------------------------------------------------
def data_files(directory: str | Path) -> list[Path]:
    """The data files of a stage directory (``data/``), or of a loose directory of shards. A
    directory with no manifest and no shards of its own but a ``data/`` holding some (a stage
    or export directory copied without its manifest) gives those of ``data/``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: no such directory", "give a stage directory or a directory of shards")
    if (directory / MANIFEST).is_file():
        return _shards(directory / DATA_DIR)
    files = _shards(directory) or _shards(directory / DATA_DIR)
    if not files:
        raise InputError(f"{directory}: no .parquet or .jsonl files", "give a stage directory (with manifest.json)")
    return files


def _shards(base: Path) -> list[Path]:
    return sorted([*base.glob("*.parquet"), *base.glob("*.jsonl")])


def iter_file_batches(files: Sequence[Path], columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Batches of Parquet or JSON Lines files; ``columns`` keeps those a file has."""
    for path in files:
        if path.suffix == ".parquet":
            pf = pq.ParquetFile(path)
            cols = None if columns is None else [c for c in columns if c in pf.schema_arrow.names]
            yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=cols)
            continue
        if path.stat().st_size == 0:  # an empty split file: no rows, nothing to infer
            continue
        try:
            reader = pj.open_json(path, read_options=pj.ReadOptions(block_size=64 << 20))
            for batch in reader:
                if columns is not None:
                    batch = batch.select([c for c in columns if c in batch.schema.names])
                yield batch
        except pa.ArrowInvalid as exc:
            raise DataError(f"unreadable JSON Lines ({exc})", file=str(path)) from None


def file_schema(files: Sequence[Path]) -> pa.Schema | None:
    """The schema of the first file (shards of one directory share one schema)."""
    for path in files:
        if path.suffix == ".parquet":
            return pq.read_schema(path)
        for batch in iter_file_batches([path]):
            return batch.schema
    return None


def footer_ranges(files: Sequence[Path], columns: Sequence[str]) -> dict[str, tuple[float, float]] | None:
    """(min, max) of float columns from Parquet footers; None if any file lacks them."""
    lo = {c: math.inf for c in columns}
    hi = {c: -math.inf for c in columns}
    for path in files:
        if path.suffix != ".parquet":
            return None
        meta = pq.ParquetFile(path).metadata
        names = [meta.schema.column(i).path for i in range(meta.num_columns)]
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            for c in columns:
                if c not in names:
                    continue
                st = group.column(names.index(c)).statistics
                if group.num_rows and (st is None or not st.has_min_max):
                    if st is not None and st.null_count == group.num_rows:
                        continue
                    return None
                if st is not None and st.has_min_max:
                    lo[c], hi[c] = min(lo[c], float(st.min)), max(hi[c], float(st.max))
    return {c: (lo[c], hi[c]) for c in columns if math.isfinite(lo[c]) and math.isfinite(hi[c])}


def float_ranges(files: Sequence[Path], columns: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Ranges from footers, else from a first pass over only these columns."""
    if not columns:
        return {}
    ranges = footer_ranges(files, columns)
    if ranges is not None:
        return ranges
    dists = {c: FloatDistribution() for c in columns}
    for batch in iter_file_batches(files, columns):
        for c in batch.schema.names:
            dists[c].add(batch[c])
    return {c: (d.min, d.max) for c, d in dists.items() if d.n}


# -- rejects and lineage ------------------------------------------------------------------
def _count_rejects(files: Sequence[Path]) -> dict[str, dict[str, int]]:
    """{stage: {reason: rows}} from only the reject columns of these files."""
    out: dict[str, dict[str, int]] = {}
    for batch in iter_file_batches(files, [REJECT_STAGE, REJECT_REASON]):
        if REJECT_REASON not in batch.schema.names:
            continue
        stage = batch[REJECT_STAGE] if REJECT_STAGE in batch.schema.names else pa.nulls(batch.num_rows, pa.string())
        table = pa.table({"s": pc.fill_null(stage, "(unknown)"), "r": pc.fill_null(batch[REJECT_REASON], "(none)")})
        for row in table.group_by(["s", "r"]).aggregate([([], "count_all")]).to_pylist():
            reasons = out.setdefault(row["s"], {})
            reasons[row["r"]] = reasons.get(row["r"], 0) + row["count_all"]
    return out


def reject_figures(directory: Path, manifest: Manifest) -> dict[str, Any]:
    """Rejects per stage of the whole lineage: read from disk where the stage dir still holds
    the same run, else taken from the lineage entry."""
    lineage = manifest.lineage or [manifest.summary()]
    # The directory of lineage[i] is lineage[i + 1]["input"]; the last one is ``directory``.
    dirs: list[str | None] = [entry.get("input") for entry in lineage[1:]] + [str(directory)]
    by_stage = []
    for entry, where in zip(lineage, dirs, strict=True):
        found = Manifest.try_load(where) if where else None
        if found is not None and found.fingerprint == entry.get("fingerprint"):
            counts = _count_rejects(sorted((Path(where) / REJECTS_DIR).glob("*.parquet")))
            reasons = counts.get(entry["stage"], {})
            for stage, other in counts.items():
                if stage != entry["stage"]:
                    reasons.update({f"{stage}:{r}": n for r, n in other.items()})
            origin = "rejects"
        else:
            reasons, origin = dict(entry.get("reject_reasons") or {}), "manifest"
        by_stage.append(
            {
                "stage": entry["stage"],
                "from": origin,
                "directory": where,
                "total": sum(reasons.values()),
                "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
            }
        )
    return {"total": sum(s["total"] for s in by_stage), "by_stage": by_stage}


def lineage_figures(manifest: Manifest) -> list[dict[str, Any]]:
    keep = ("stage", "rows_in", "rows_out", "rows_rejected", "reject_reasons", "wall_seconds", "params", "extra")
    return [{k: entry.get(k) for k in keep} for entry in (manifest.lineage or [manifest.summary()])]


# -- the entry point ----------------------------------------------------------------------
def compute_stats(directory: str | Path, unit: str = "words") -> dict[str, Any]:
    """Figures of a stage directory (or a loose directory of shards) as a JSON-able dict."""
    directory = Path(directory)
    files = data_files(directory)
    manifest = Manifest.try_load(directory)
    schema = file_schema(files) or pa.schema([])
    floats = [f.name for f in schema if pa.types.is_floating(f.type)]
    acc = FigureAccumulator(schema, unit=unit, float_ranges=float_ranges(files, floats))
    wanted = [*acc.text, *acc.floats, *(c for c in ("source", "tie", "label") if c in schema.names)]
    for path in files:
        for batch in iter_file_batches([path], wanted):
            missing = [c for c in wanted if c not in batch.schema.names]
            if missing:  # a loose directory mixing datasets (shards of one stage share a schema)
                raise DataError(
                    f"no column {', '.join(missing)}, which {files[0].name} has: one dataset's files at a time",
                    file=str(path),
                )
            acc.add(batch)
    figures: dict[str, Any] = {
        "directory": str(directory),
        "stage": manifest.stage if manifest else None,
        "format": (manifest.params.get("format") if manifest and manifest.stage == "export" else None),
        "columns": list(schema.names),
        **acc.result(),
    }
    if manifest is not None:
        figures["rejects"] = reject_figures(directory, manifest)
        figures["lineage"] = lineage_figures(manifest)
    elif REJECT_REASON in schema.names:
        counts = _count_rejects(files)
        figures["rejects"] = {
            "total": sum(sum(r.values()) for r in counts.values()),
            "by_stage": [
                {"stage": s, "from": "rejects", "directory": str(directory), "total": sum(r.values()), "reasons": r}
                for s, r in counts.items()
            ],
        }
    return figures
