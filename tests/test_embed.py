"""Embedding backend: the packaged models load offline, vectors are unit length, and the
on-disk cache makes a second encode of the same texts free."""

from __future__ import annotations

import json
import threading
import uuid

import numpy as np
import pytest

from prefcurate.backends.embed import EmbeddingCache, get_embedder, loads_quietly, resolve_device
from prefcurate.errors import InputError
from tests.conftest import hh_rows, llmbar_rows


def _texts(n: int) -> list[str]:
    """Real texts with a fresh marker: the model cache is shared by the session (the static
    model is distilled once), so a marker keeps other tests' cached vectors out."""
    marker = uuid.uuid4().hex[:8]
    return [f"{r['output_1']} ({marker})" for r in llmbar_rows("natural")[:n]]


def test_static_vectors_are_unit_float32_and_one_per_text(model_cache_dir):
    emb = get_embedder("static", "cpu", model_cache_dir)
    texts = _texts(20)
    vecs = emb.encode(texts)
    assert vecs.shape == (20, emb.dim) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=2e-3)
    assert emb.name.startswith("static-") and emb.device == "cpu"


def test_each_distinct_text_is_encoded_once(model_cache_dir):
    emb = get_embedder("static", "cpu", model_cache_dir)
    texts = _texts(10)
    vecs = emb.encode(texts + texts[:4] + texts)
    assert emb.stats.encoded == 10 and emb.stats.distinct == 10 and emb.stats.requested == 24
    np.testing.assert_array_equal(vecs[:4], vecs[10:14])


def test_prepared_texts_encode_like_the_column_they_came_from(model_cache_dir, tmp_path):
    import pyarrow as pa

    from prefcurate.backends.embed import prepare_steps
    from prefcurate.steps import run_steps

    texts = _texts(12)
    column = pa.array(texts + texts[:5] + [None, texts[7]])
    rows = np.array([0, 3, 12, 15, 17, 18])
    results = []
    for prepared in (False, True):
        emb = get_embedder("static", "cpu", tmp_path / f"cache-{prepared}")
        arg = run_steps(prepare_steps(column)) if prepared else column
        vecs, inverse = emb.encode_distinct(arg, rows=rows)
        results.append((vecs[inverse], emb.stats.encoded, emb.stats.requested))
        emb.close()
    (plain, n_plain, asked_plain), (prep, n_prep, asked_prep) = results
    np.testing.assert_array_equal(plain, prep)
    # rows 0 and 12, 3 and 15 are one text each; row 17 is the null (""), 18 a repeat of row 7
    assert (n_plain, asked_plain) == (n_prep, asked_prep) == (4, 6)
    assert np.array_equal(prep[0], prep[2]) and np.array_equal(prep[1], prep[3])


def test_cache_survives_a_new_embedder_and_returns_identical_vectors(model_cache_dir):
    root = model_cache_dir
    texts = _texts(30)
    first = get_embedder("static", "cpu", root)
    a = first.encode(texts)
    first.close()
    second = get_embedder("static", "cpu", root)
    b = second.encode(list(reversed(texts)))
    assert second.stats.encoded == 0 and second.stats.cache_hits == 30
    np.testing.assert_array_equal(a, b[::-1])
    assert [p.name for p in (root / "embeddings").glob("static-*/*.keys.npy")]


def test_fresh_vectors_get_the_same_float16_bits_as_numpys_cast():
    """The encoder's float32 -> float16 store (torch's cast) must round exactly as numpy's
    does, subnormals and overflow included: the cache and a first run have to agree bit for
    bit with what any reader of the ``.npy`` segments computes."""
    from prefcurate.backends.embed import _store_f16

    rng = np.random.default_rng(0)
    magnitude = rng.choice([1e-9, 3e-6, 1e-3, 1.0, 300.0, 7e4], size=(4000, 1))
    vecs = (rng.standard_normal((4000, 64)) * magnitude).astype(np.float32)
    rows = rng.permutation(6000)[:4000]
    out = np.zeros((6000, 64), np.float16)
    _store_f16(out, rows, vecs)
    want = np.zeros_like(out)
    with np.errstate(over="ignore"):
        want[rows] = vecs
    np.testing.assert_array_equal(out.view(np.uint16), want.view(np.uint16))


def test_cache_merges_small_segments_without_losing_a_vector(tmp_path):
    rng = np.random.default_rng(0)
    cache = EmbeddingCache(tmp_path / "c", 8)
    keys = rng.integers(0, 2**63, size=(60, 2), dtype=np.uint64)
    vecs = rng.standard_normal((60, 8)).astype(np.float16)
    for k in range(0, 60, 3):  # 20 segments of 3 texts, one text written twice
        cache.add(keys[k : k + 3], vecs[k : k + 3])
    cache.add(keys[:1], vecs[:1])
    assert cache.segments == 21
    reopened = EmbeddingCache(tmp_path / "c", 8)  # more small segments than allowed: merged on open
    assert reopened.segments == 1 and len(reopened) == 60
    assert len(list((tmp_path / "c").glob("*.npy"))) == 2
    out = np.zeros((61, 8), np.float16)
    probe = np.concatenate([keys[::-1], rng.integers(0, 2**63, size=(1, 2), dtype=np.uint64)])
    hit = reopened.lookup(probe, out)
    assert hit[:60].all() and not hit[60]
    np.testing.assert_array_equal(out[:60], vecs[::-1])


def _deferred_cache(tmp_path, rng, n: int):
    """(root, a 4-d cache there with ``defer`` set, n random keys, their random vectors)."""
    root = tmp_path / "c"
    cache = EmbeddingCache(root, 4)
    cache.defer = True
    keys = rng.integers(0, 2**63, size=(n, 2), dtype=np.uint64)
    return root, cache, keys, rng.standard_normal((n, 4)).astype(np.float16)


def test_deferred_adds_are_found_at_once_and_written_as_one_segment(tmp_path):
    """With ``defer``, adds below the checkpoint size stay in memory (lookups see them) until
    flush or close writes them, together, as one segment; an add that reaches it is written
    at once. Without, every add is a segment on disk."""
    from prefcurate.backends.embed import _CHECKPOINT_TEXTS

    rng = np.random.default_rng(2)
    root, cache, keys, vecs = _deferred_cache(tmp_path, rng, 30)
    for k in range(0, 30, 10):
        cache.add(keys[k : k + 10], vecs[k : k + 10])
    out = np.zeros((30, 4), np.float16)
    assert cache.lookup(keys, out).all() and (out == vecs).all()
    assert not list(root.glob("*.npy"))  # nothing on disk yet
    cache.close()
    assert len(list(root.glob("*.keys.npy"))) == 1
    again = EmbeddingCache(root, 4)
    out[:] = 0
    assert again.segments == 1 and again.lookup(keys, out).all() and (out == vecs).all()
    again.defer = True
    big = rng.integers(0, 2**63, size=(_CHECKPOINT_TEXTS, 2), dtype=np.uint64)
    again.add(big, np.zeros((_CHECKPOINT_TEXTS, 4), np.float16))
    assert len(list(root.glob("*.keys.npy"))) == 2  # written without a flush
    again.defer = False
    again.add(keys[:1] + 1, vecs[:1])
    assert len(list(root.glob("*.keys.npy"))) == 3


def test_written_vectors_are_read_from_their_file_not_kept_in_memory(tmp_path):
    """Once a segment is on disk, the cache reads its vectors from the file: a long run's
    memory does not grow with every text it encodes. Shown by changing the file's bytes in
    place after the write: a lookup sees the new values, which a copy in memory would not."""
    root, cache, keys, vecs = _deferred_cache(tmp_path, np.random.default_rng(3), 20)
    cache.add(keys[:8], vecs[:8])
    cache.add(keys[8:], vecs[8:])  # two adds, one segment file: each add's rows at their offset
    cache.flush()
    (path,) = root.glob("*.vecs.npy")
    out = np.zeros((20, 4), np.float16)
    assert cache.lookup(keys, out).all() and (out == vecs).all()
    with open(path, "r+b") as f:  # the same file (inode) rewritten: what a memory map shows
        f.seek(-vecs.nbytes, 2)
        f.write((vecs * 2).tobytes())
    out[:] = 0
    assert cache.lookup(keys[::-1], out).all()
    np.testing.assert_array_equal(out, (vecs * 2)[::-1])


def test_only_a_distilled_static_model_loads_quietly(model_cache_dir, tmp_path):
    """What dedupe may load on a background thread: reading the distilled static model. A
    distill or a transformer load silences stderr process-wide, so they are not."""
    get_embedder("static", "cpu", model_cache_dir).close()  # distilled once per session
    assert loads_quietly("static", "cpu", model_cache_dir)
    assert loads_quietly("auto", "cpu", model_cache_dir)
    assert not loads_quietly("static", "cpu", tmp_path / "fresh")  # would distill first
    assert not loads_quietly("minilm", "cpu", model_cache_dir)
    assert not loads_quietly("no-such-org/no-such-model", "cpu", model_cache_dir)


def test_lookups_between_adds_find_every_segment_so_far(tmp_path):
    """Segments added after the first lookup live in a second level until it is merged into
    the main one: a lookup must see both, before and after each merge."""
    rng = np.random.default_rng(1)
    cache = EmbeddingCache(tmp_path / "c", 4)
    keys = rng.integers(0, 2**63, size=(400, 2), dtype=np.uint64)
    vecs = rng.standard_normal((400, 4)).astype(np.float16)
    cache.add(keys[:100], vecs[:100])
    stranger = rng.integers(0, 2**63, size=(1, 2), dtype=np.uint64)
    for stop in range(110, 401, 10):  # ten at a time: several merges into the main level on the way
        cache.add(keys[stop - 10 : stop], vecs[stop - 10 : stop])
        probe = np.concatenate([keys[:stop][::-1], stranger])
        out = np.zeros((stop + 1, 4), np.float16)
        hit = cache.lookup(probe, out)
        assert hit[:stop].all() and not hit[stop]
        np.testing.assert_array_equal(out[:stop], vecs[:stop][::-1])


def test_cache_ignores_half_written_and_foreign_segments(tmp_path):
    cache = EmbeddingCache(tmp_path / "c", 4)
    keys = np.array([[1, 2], [3, 4]], np.uint64)
    cache.add(keys, np.ones((2, 4), np.float16))
    np.save(tmp_path / "c" / "lonely.vecs.npy", np.ones((2, 4), np.float16))  # keys never renamed in
    np.save(tmp_path / "c" / "other.keys.npy", keys)  # vectors of another width
    np.save(tmp_path / "c" / "other.vecs.npy", np.ones((2, 5), np.float16))
    (tmp_path / "c" / ".x.keys.npy.tmp-1").write_bytes(b"partial")
    again = EmbeddingCache(tmp_path / "c", 4)
    out = np.zeros((2, 4), np.float16)
    assert again.segments == 1 and again.lookup(keys, out).all() and (out == 1).all()


def test_two_writers_on_one_cache_do_not_lose_or_corrupt_vectors(model_cache_dir):
    root = model_cache_dir
    texts = _texts(60)
    embedders = [get_embedder("static", "cpu", root) for _ in range(2)]
    results: dict[int, np.ndarray] = {}

    def work(k: int) -> None:
        results[k] = embedders[k].encode(texts[k * 20 : k * 20 + 40], batch_size=7)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    third = get_embedder("static", "cpu", root)
    again = third.encode(texts[:60])
    assert third.stats.encoded == 0
    np.testing.assert_array_equal(again[20:40], results[0][20:40])
    np.testing.assert_array_equal(again[20:40], results[1][:20])


def test_paraphrase_is_closer_than_an_unrelated_text(model_cache_dir):
    rows = hh_rows(3)
    a = rows[0]["chosen"].rsplit("Assistant:", 1)[-1]
    para = a.replace(",", "").lower()
    other = rows[2]["rejected"].rsplit("Assistant:", 1)[-1]
    emb = get_embedder("static", "cpu", model_cache_dir)
    va, vp, vo = emb.encode([a, para, other])
    assert va @ vp > 0.95 > va @ vo


def test_packaged_minilm_loads_offline(model_cache_dir):
    emb = get_embedder("minilm", "cpu", model_cache_dir)
    vecs = emb.encode(["a cat sat on the mat", "a kitten sat on the rug", "quarterly tax filing deadline"])
    assert emb.dim == 384 and emb.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]


def test_unknown_model_is_one_line_input_error(model_cache_dir):
    with pytest.raises(InputError) as err:
        get_embedder("no-such-org/no-such-model-xyz", "cpu", model_cache_dir)
    assert "no-such-model-xyz" in str(err.value) and "\n" not in str(err.value)


def test_auto_device_is_cpu_without_cuda_and_cuda_is_refused():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert resolve_device("auto") == "cpu"
    with pytest.raises(InputError):
        resolve_device("cuda")


@pytest.mark.gpu
def test_minilm_on_cuda_matches_cpu(model_cache_dir):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    texts = _texts(16)
    gpu = get_embedder("auto", "auto", model_cache_dir / "gpu")
    assert gpu.device == "cuda" and gpu.name == "sentence-transformers/all-MiniLM-L6-v2"
    cpu = get_embedder("minilm", "cpu", model_cache_dir / "cpu")
    np.testing.assert_allclose(gpu.encode(texts), cpu.encode(texts), atol=2e-2)


def test_an_arrow_column_hits_the_entries_of_python_strings_even_with_trailing_zero_bytes(model_cache_dir):
    """Keys hashed from Arrow buffers (what a stage passes) equal ``text_key`` of the Python
    strings, including keys whose last byte is zero (numpy's S16 drops it on conversion to
    bytes), so both spellings of the same texts share cache entries."""
    import pyarrow as pa

    from prefcurate.backends.embed import text_key, text_keys

    marker = uuid.uuid4().hex[:8]
    zero_tail = [t for t in (f"probe {marker} {n}" for n in range(5000)) if text_key(t)[-1] == 0][:3]
    texts = _texts(40) + zero_tail
    assert len(zero_tail) == 3
    assert text_keys(pa.array(texts)).tobytes() == b"".join(text_key(t) for t in texts)
    first = get_embedder("static", "cpu", model_cache_dir)
    a = first.encode(pa.array(texts + texts[:5]))
    assert first.stats.encoded == len(texts) and first.stats.requested == len(texts) + 5
    second = get_embedder("static", "cpu", model_cache_dir)
    b = second.encode(texts)
    assert second.stats.encoded == 0 and second.stats.cache_hits == len(texts)
    np.testing.assert_array_equal(a[: len(texts)], b)
    np.testing.assert_array_equal(a[len(texts) :], b[:5])


def test_lone_surrogates_and_nulls_are_encoded_not_refused(model_cache_dir):
    """Arrow refuses lone surrogates in strings; such Python texts still get a vector, keyed
    like ``text_key``; a null in an Arrow column embeds as the empty text."""
    import pyarrow as pa

    from prefcurate.backends.embed import text_key, text_keys

    marker = uuid.uuid4().hex[:8]
    odd = [f"broken \ud800 surrogate {marker}", f"fine {marker}"]
    emb = get_embedder("static", "cpu", model_cache_dir)
    vecs = emb.encode(odd)
    assert vecs.shape == (2, emb.dim) and emb.stats.encoded == 2
    binary = pa.array([t.encode("utf-8", "surrogatepass") for t in odd], pa.binary())
    assert text_keys(binary).tobytes() == b"".join(text_key(t) for t in odd)
    nulls = emb.encode(pa.array(["", None], pa.string()))
    np.testing.assert_array_equal(nulls[0], nulls[1])


def test_static_pooling_matches_model2vec_encode(model_cache_dir):
    """The stage's own mean pooling gives model2vec's vectors: same tokens (character cut,
    truncation, unknown tokens dropped), same mean, for short, long and token-less texts."""
    from prefcurate.backends.embed import _normalize

    emb = get_embedder("static", "cpu", model_cache_dir)
    assert emb._table is not None  # the distilled model has no token weights: the fast path
    assert emb._model is None  # read without model2vec's loader
    rows = hh_rows(40)
    texts = [r["chosen"] for r in rows] + [r["rejected"][:40] for r in rows]
    texts += ["", "   ", "x" * 300, " ".join(r["chosen"] for r in rows)]  # empty, one unknown token, > 512 tokens
    ours = emb._encode_batch(texts)
    # the mean itself, text by text in float64: each text's known token rows of the table
    tok = emb.tokens
    cut = tok.max_length * tok.median_token_length
    table = np.asarray(emb._table, np.float64)
    mean = np.zeros((len(texts), emb.dim))
    for k, text in enumerate(texts):
        ids = [i for i in tok.tokenizer.encode(text[:cut], add_special_tokens=False).ids if i != tok.unk_token_id]
        if ids:
            mean[k] = table[ids].mean(axis=0)
    np.testing.assert_allclose(ours, _normalize(mean), atol=1e-6)
    theirs = _normalize(np.asarray(emb.model.encode(texts, use_multiprocessing=False), np.float32))
    np.testing.assert_allclose(ours, theirs, atol=2e-3)
    assert not ours[-4:-1].any() and np.linalg.norm(ours[-1]) > 0.99
    model = emb.model  # model2vec's own load of the same directory
    assert (emb.tokens.max_length, emb.tokens.median_token_length, emb.tokens.unk_token_id) == (
        model.max_length,
        model.median_token_length,
        model.unk_token_id,
    )
    np.testing.assert_array_equal(emb._table, np.asarray(model.embedding, np.float32))


def test_a_static_model_the_fast_reader_does_not_know_loads_through_model2vec(model_cache_dir, tmp_path):
    """A directory with token weights, or whose config names no max_length, is loaded by
    model2vec (weights: pooled by model2vec too) and encodes as the plain model does (weights
    of one change nothing)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from prefcurate.backends.embed import STATIC_NAME, StaticEmbedder

    plain = model_cache_dir / "models" / STATIC_NAME
    texts = [r["chosen"] for r in hh_rows(20)]
    reference = StaticEmbedder(plain, "plain", tmp_path / "c0")._encode_batch(texts)
    weighted = tmp_path / "weighted"
    shutil.copytree(plain, weighted)
    tensors = load_file(str(weighted / "model.safetensors"))
    save_file(
        {**tensors, "weights": np.ones(len(tensors["embeddings"]), np.float64)}, str(weighted / "model.safetensors")
    )
    emb = StaticEmbedder(weighted, "weighted", tmp_path / "c1")
    assert emb._model is not None and emb._table is None
    np.testing.assert_allclose(emb._encode_batch(texts), reference, atol=2e-3)
    no_length = tmp_path / "no-length"
    shutil.copytree(plain, no_length)
    config = json.loads((no_length / "config.json").read_text())
    del config["max_length"]
    (no_length / "config.json").write_text(json.dumps(config))
    emb = StaticEmbedder(no_length, "no-length", tmp_path / "c2")
    assert emb._model is not None and emb._table is not None
    np.testing.assert_allclose(emb._encode_batch(texts), reference, atol=1e-6)
