"""Hugging Face datasets as ingest sources: a local ``save_to_disk`` directory or a Hub id.

Both are read through ``datasets`` (imported here, only when such a source is given) as
memory-mapped Arrow tables, in bounded batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from prefcurate.errors import DataError, first_line
from prefcurate.stages.ingest_read import BATCH_ROWS, RawChunk, Source, checked_chunk


def read_hf_dir(source: Source, on_progress: Callable[[int], None]) -> Iterator[RawChunk]:
    import datasets

    assert source.path is not None
    try:
        loaded = datasets.load_from_disk(str(source.path))
    except (FileNotFoundError, ValueError, pa.ArrowInvalid) as exc:
        raise DataError(f"not a readable Hugging Face dataset ({first_line(exc)})", file=source.name) from None
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for _, dataset in splits:
        yield from _dataset_chunks(dataset, on_progress, source)


def read_hf_hub(source: Source, on_progress: Callable[[int], None]) -> Iterator[RawChunk]:
    """``hf:org/name[:split]`` through ``datasets.load_dataset`` (cached, memory-mapped)."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    split = source.split or "train"
    try:
        dataset = datasets.load_dataset(source.hub_id, split=split)
    except (ConnectionError, DatasetNotFoundError, FileNotFoundError) as exc:
        raise DataError(
            f"cannot load from the Hugging Face Hub ({first_line(exc)})",
            file=source.name,
            hint="check the dataset id and your network, or download it and ingest the local files",
        ) from None
    except ValueError as exc:
        raise DataError(f"cannot load split {split!r} ({first_line(exc)})", file=source.name) from None
    yield from _dataset_chunks(dataset, on_progress, source)


def _dataset_chunks(dataset: Any, on_progress: Callable[[int], None], source: Source) -> Iterator[RawChunk]:
    row = 1
    for table in dataset.with_format("arrow").iter(batch_size=BATCH_ROWS):
        on_progress(table.num_rows)
        yield checked_chunk(table, row, source)
        row += table.num_rows
