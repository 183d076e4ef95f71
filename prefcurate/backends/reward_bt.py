"""``embedding-bt``: a cross-fitted Bradley-Terry reward on sentence embeddings, trained on the
data being scored. Offline, no reward model needed.

A response ``x`` to a prompt ``p`` gets the features

    phi(p, x) = [e_x, log1p(words(x)), e_x * e_p, cos(e_x, e_p)]

(``e_*`` are L2-normalized embeddings from ``backends.embed`` and its on-disk cache; ``e_p``
embeds the last user turn, which is what the response answers, while long transcripts would
be truncated by the encoder). The reward is a linear ``r(p, x) = w . phi(p, x)``, so the
margin is ``w . (phi(p, c) - phi(p, r))`` and ``reward_chosen - reward_rejected = margin``.
The ``e_x * e_p`` block makes the preference prompt-conditioned: which direction in
embedding space is "better" depends on what was asked. It gets a smaller prior weight
(``PROMPT_WEIGHT``): on HH-RLHF-sized data (~2k pairs) it only helps when shrunk harder than
the response block (benchmarks/bench_score.py).

Why these choices:

- **Cross-fitting.** Rows are split into ``folds``; the model that scores a row never saw it,
  so a mislabeled pair cannot teach the model its own wrong label (the reason a model
  trained on all data is blind to label noise). Several ``seeds`` redraw the fold split,
  and a row's reward is the mean of the fold models that held it out: folds x seeds members.
- **No intercept, symmetric data.** A pair and its swap are the same evidence, so the model
  must satisfy ``margin(c, r) = -margin(r, c)``. With no intercept the logistic loss of a
  pair and of its label-0 swap are equal, so symmetric augmentation is done exactly by
  presenting each pair once in a random order (same optimum, half the rows).
- **Scale, not center.** Feature columns are divided by their RMS over the training rows
  (centering would break the antisymmetry), so one L2 penalty fits every block.
- **C by inner cross-validation** on each fold model's own training rows, from a grid of
  ``C * n_train`` (the penalty relative to the data, so one grid serves 2k and 100k pairs;
  a fold model's choices never depend on the rows it scores). Label noise makes the
  optimum strongly regularized: on HH-RLHF with 20% flips ``C * n ~ 0.5``.
- **Bounded memory.** At most ``max_train_rows`` pairs (a seeded random sample) are kept in
  memory for training; when the data is larger, a second streaming pass scores every row
  from the (cached) embeddings.
- Ties are scored but never trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from prefcurate.schema import render_text

C_GRID = (0.2, 0.6, 2.0, 6.0, 20.0)  # values of C * n_train
PROMPT_WEIGHT = 0.4
INNER_FOLDS = 3
MAX_TUNE_ROWS = 20_000
SMALL_FIT = 10_000_000  # matrix entries below which one BLAS thread is fastest


@dataclass
class PairBlock:
    """A block of rows: their positions in the dataset and what the features need."""

    index: np.ndarray  # row positions, int64
    prompt: list[str]
    chosen: list[str]
    rejected: list[str]
    tie: np.ndarray  # bool


def block_from_batch(batch: object, start: int) -> PairBlock:
    """Texts of an Arrow batch with prompt/chosen/rejected (and optional tie) columns."""
    cols = batch.schema.names  # type: ignore[attr-defined]
    n = batch.num_rows  # type: ignore[attr-defined]
    prompts = [last_user_turn(m) for m in batch.column("prompt").to_pylist()]  # type: ignore[attr-defined]
    chosen = [render_text(m) for m in batch.column("chosen").to_pylist()]  # type: ignore[attr-defined]
    rejected = [render_text(m) for m in batch.column("rejected").to_pylist()]  # type: ignore[attr-defined]
    tie = np.zeros(n, dtype=bool)
    if "tie" in cols:
        tie = np.array([bool(t) for t in batch.column("tie").to_pylist()], dtype=bool)  # type: ignore[attr-defined]
    return PairBlock(np.arange(start, start + n, dtype=np.int64), prompts, chosen, rejected, tie)


def last_user_turn(messages: Sequence[dict[str, str]] | None) -> str:
    """The last user message (what the response answers); the whole text when there is none."""
    for m in reversed(messages or []):
        if m.get("role") == "user":
            return m["content"]
    return render_text(messages)


@dataclass
class Embedded:
    """Embeddings (float16: what the cache holds, so nothing is lost) and word counts."""

    index: np.ndarray
    e_p: np.ndarray
    e_c: np.ndarray
    e_r: np.ndarray
    words_c: np.ndarray
    words_r: np.ndarray
    tie: np.ndarray

    @staticmethod
    def concat(parts: list[Embedded], dim: int) -> Embedded:
        if not parts:
            z = np.zeros((0, dim), np.float16)
            return Embedded(np.zeros(0, np.int64), z, z, z, np.zeros(0), np.zeros(0), np.zeros(0, bool))
        return Embedded(*(np.concatenate([getattr(p, f) for p in parts]) for f in Embedded.__dataclass_fields__))

    def take(self, rows: np.ndarray) -> Embedded:
        return Embedded(*(getattr(self, f)[rows] for f in Embedded.__dataclass_fields__))


def embed_block(block: PairBlock, encode: Callable[[list[str]], np.ndarray]) -> Embedded:
    """Encode a block's texts in one call so each distinct text (a shared prompt) is encoded once."""
    n = len(block.prompt)
    vecs = encode([*block.prompt, *block.chosen, *block.rejected]).astype(np.float16)
    words_c = np.array([len(t.split()) for t in block.chosen], dtype=np.float64)
    words_r = np.array([len(t.split()) for t in block.rejected], dtype=np.float64)
    return Embedded(block.index, vecs[:n], vecs[n : 2 * n], vecs[2 * n :], words_c, words_r, block.tie)


def response_features(e_x: np.ndarray, e_p: np.ndarray, words: np.ndarray) -> np.ndarray:
    """phi(p, x) for a block of responses, float32 (n, 2*dim + 2)."""
    e_x = e_x.astype(np.float32)
    e_p = e_p.astype(np.float32)
    cos = np.einsum("ij,ij->i", e_x, e_p)[:, None]
    return np.hstack([e_x, np.log1p(words)[:, None].astype(np.float32), e_x * e_p, cos])


def feature_weights(dim: int) -> np.ndarray:
    """Prior weight of each feature column: the prompt-conditioned block is shrunk harder."""
    return np.concatenate([np.ones(dim + 1), np.full(dim + 1, PROMPT_WEIGHT)]).astype(np.float32)


def pair_features(emb: Embedded) -> tuple[np.ndarray, np.ndarray]:
    return response_features(emb.e_c, emb.e_p, emb.words_c), response_features(emb.e_r, emb.e_p, emb.words_r)


@dataclass
class BTModel:
    """One fold model: ``reward = (phi / scale) . w``."""

    w: np.ndarray
    scale: np.ndarray
    C: float

    def reward(self, feats: np.ndarray) -> np.ndarray:
        return (feats / self.scale) @ self.w


def fit_bt(
    diff: np.ndarray, rng: np.random.Generator, c_grid: Sequence[float] = C_GRID, weights: np.ndarray | None = None
) -> BTModel:
    """Fit a no-intercept logistic BT model on pair differences, ``C * n`` chosen by inner CV."""
    if diff.shape[0] < 2:  # nothing to learn from (tiny data, all ties): a model that abstains
        return BTModel(np.zeros(diff.shape[1], np.float32), np.ones(diff.shape[1], np.float32), float("nan"))
    scale = np.sqrt(np.mean(diff.astype(np.float64) ** 2, axis=0)).astype(np.float32)
    scale[scale < 1e-8] = 1.0
    if weights is not None:
        scale = scale / weights
    x = diff / scale
    # Half the pairs each way (shuffled): both classes present even for tiny data.
    sign = rng.permutation(x.shape[0]) % 2 == 0
    x = np.where(sign[:, None], x, -x)
    y = sign.astype(np.int64)
    cn = c_grid[0] if len(c_grid) == 1 else _tune_c(x, y, rng, c_grid)
    C = cn / max(x.shape[0], 1)
    return BTModel(_fit_path(x, y, [C])[0], scale, cn)


def _fit_path(x: np.ndarray, y: np.ndarray, cs: Sequence[float]) -> list[np.ndarray]:
    """Weights for each C (ascending: each fit warm-starts from the previous one)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    if np.unique(y).size < 2:
        return [np.zeros(x.shape[1], dtype=np.float32) for _ in cs]
    model = LogisticRegression(fit_intercept=False, max_iter=500, tol=1e-5, warm_start=True)
    out = []
    # Small fits are dominated by BLAS thread hand-offs (40x slower on a busy 2-core box).
    with threadpool_limits(1 if x.size < SMALL_FIT else None):
        for C in cs:
            model.set_params(C=C)
            model.fit(x, y)
            out.append(model.coef_[0].astype(np.float32))
    return out


def _tune_c(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, c_grid: Sequence[float]) -> float:
    """The ``C * n`` with the lowest held-out log loss over ``INNER_FOLDS`` folds of the training rows."""
    if x.shape[0] > MAX_TUNE_ROWS:
        keep = rng.choice(x.shape[0], MAX_TUNE_ROWS, replace=False)
        x, y = x[keep], y[keep]
    fold = rng.permutation(x.shape[0]) % INNER_FOLDS
    grid = sorted(c_grid)
    losses = np.zeros(len(grid))
    for k in range(INNER_FOLDS):
        tr, te = fold != k, fold == k
        n_tr = max(int(tr.sum()), 1)
        for j, w in enumerate(_fit_path(x[tr], y[tr], [c / n_tr for c in grid])):
            z = x[te] @ w
            losses[j] += np.logaddexp(0.0, -np.where(y[te] == 1, z, -z)).sum()
    return float(grid[int(np.argmin(losses))])


@dataclass
class CrossFitBT:
    """``seeds`` fold splits x ``folds`` models; each row scored by the models that held it out."""

    n: int
    folds: int = 5
    seeds: int = 3
    c_grid: Sequence[float] = C_GRID
    models: dict[tuple[int, int], BTModel] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Fold of row i under seed s: a balanced random split, by row position (not content),
        # so editing a row's content never moves it to another fold.
        self.assign = (
            np.stack(
                [
                    (np.random.default_rng([s, 0x5EED]).permutation(self.n) % self.folds).astype(np.int8)
                    for s in range(self.seeds)
                ]
            )
            if self.n
            else np.zeros((self.seeds, 0), np.int8)
        )

    def fit(self, train: Embedded, on_model: Callable[[], None] | None = None) -> None:
        """Fit every fold model on the non-tie training rows outside its fold."""
        fc, fr = pair_features(train)
        diff = fc - fr
        weights = feature_weights(train.e_c.shape[1])
        usable = ~train.tie
        for s in range(self.seeds):
            fold = self.assign[s, train.index]
            for k in range(self.folds):
                rows = usable & (fold != k)
                rng = np.random.default_rng([s, k, 0xB7])
                self.models[(s, k)] = fit_bt(diff[rows], rng, self.c_grid, weights)
                if on_model is not None:
                    on_model()

    def rewards(self, emb: Embedded) -> tuple[np.ndarray, np.ndarray]:
        """(reward_chosen, reward_rejected) of a block: mean over seeds of the held-out fold model."""
        fc, fr = pair_features(emb)
        rc = np.zeros(len(emb.index))
        rr = np.zeros(len(emb.index))
        for s in range(self.seeds):
            fold = self.assign[s, emb.index]
            for k in range(self.folds):
                rows = fold == k
                if rows.any():
                    model = self.models[(s, k)]
                    rc[rows] += model.reward(fc[rows])
                    rr[rows] += model.reward(fr[rows])
        return rc / self.seeds, rr / self.seeds

    def chosen_c(self) -> list[float]:
        return [m.C for m in self.models.values() if np.isfinite(m.C)]


def train_sample(n: int, max_rows: int, seed: int = 0) -> np.ndarray:
    """Boolean mask of the rows kept in memory for training (all of them when n <= max_rows)."""
    if n <= max_rows:
        return np.ones(n, dtype=bool)
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng([seed, 0x5A]).choice(n, max_rows, replace=False)] = True
    return mask


def score_embedding_bt(
    blocks: Callable[[], Iterator[PairBlock]],
    n: int,
    encode: Callable[[list[str]], np.ndarray],
    dim: int,
    *,
    folds: int = 5,
    seeds: int = 3,
    max_train_rows: int = 100_000,
    c_grid: Sequence[float] = C_GRID,
    on_model: Callable[[], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, CrossFitBT]:
    """Cross-fitted rewards for all ``n`` rows. ``blocks()`` streams the data (called twice
    when the data is larger than ``max_train_rows``); ``encode`` is an embedder's encode."""
    sample = train_sample(n, max_train_rows)
    parts = []
    for block in blocks():
        keep = sample[block.index]
        if keep.any():
            sub = _sub_block(block, keep)
            parts.append(embed_block(sub, encode))
    train = Embedded.concat(parts, dim)
    model = CrossFitBT(n, folds, seeds, c_grid)
    model.fit(train, on_model)
    rc, rr = np.full(n, np.nan), np.full(n, np.nan)
    if sample.all():
        rc[train.index], rr[train.index] = model.rewards(train)
        return rc, rr, model
    for block in blocks():
        emb = embed_block(block, encode)
        rc[emb.index], rr[emb.index] = model.rewards(emb)
    return rc, rr, model


def _sub_block(block: PairBlock, keep: np.ndarray) -> PairBlock:
    pick = np.flatnonzero(keep)
    return PairBlock(
        block.index[pick],
        [block.prompt[i] for i in pick],
        [block.chosen[i] for i in pick],
        [block.rejected[i] for i in pick],
        block.tie[pick],
    )
