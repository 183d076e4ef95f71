"""Rated completions (UltraFeedback and the simpler ``responses`` + ``ratings`` layout) into pairs.

Binarization rules, named so a dataset card can say which one made the data:

- ``best-vs-worst``: the highest-rated completion against the lowest (first of equals wins);
  when every rating is equal the pair is kept as a tie.
- ``best-vs-random``: the highest against one completion drawn at random among those rated
  lower (a tie against any other one when none is lower). The draw is seeded by ``--seed``
  and the row's content, not its position, so it does not change with batching or file order.
- ``all-pairs``: every pair of completions whose ratings differ by at least ``--min-gap``
  (``0`` keeps equal-rated pairs as ties). Pair ids get a ``:i-j`` suffix of completion indices.

Completions without a usable rating (missing, not a number, NaN or infinite) or text are left
out; a row with fewer than two left is a reject (``too-few-rated``), as is an all-pairs row where
no pair clears the gap (``below-min-gap``).
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Any

from prefcurate.schema import Message
from prefcurate.stages.ingest_formats import Layout, Pair, RowProblem, as_messages, is_blank

BINARIZE_RULES = ("best-vs-worst", "best-vs-random", "all-pairs")
RATING_SOURCES = ("auto", "overall", "fine-grained", "annotations")


@dataclass(frozen=True)
class Binarizer:
    rule: str = "best-vs-worst"
    min_gap: float = 0.0
    seed: int = 0
    ratings_from: str = "auto"

    def __call__(self, row: dict[str, Any], layout: Layout) -> list[Pair]:
        key = layout.prompt or "instruction"
        if key not in row:
            raise RowProblem("missing-field", key)
        prompt = as_messages(row[key], "user", key)
        if is_blank(prompt):
            raise RowProblem("empty", key)
        candidates = self._candidates(row)
        if len(candidates) < 2:
            raise RowProblem("too-few-rated")
        if self.rule == "all-pairs":
            return self._all_pairs(prompt, candidates)
        best = max(range(len(candidates)), key=lambda i: (candidates[i][2], -i))
        if self.rule == "best-vs-random":
            other = self._draw(prompt, candidates, best)
        else:
            low = min(c[2] for c in candidates)
            worst = [i for i, c in enumerate(candidates) if c[2] == low and i != best]
            other = worst[-1]
        return [_pair(prompt, candidates[best], candidates[other])]

    def _candidates(self, row: dict[str, Any]) -> list[tuple[int, list[Message], float]]:
        """(original index, response messages, rating) of usable completions."""
        if "completions" in row:
            items = row["completions"]
            if items is None:
                raise RowProblem("missing-field", "completions")
            if not isinstance(items, list):
                raise RowProblem("wrong-type", "completions")
            pairs = [(c.get("response") if isinstance(c, dict) else None, self._rating(c)) for c in items]
        else:
            responses, ratings = row.get("responses"), row.get("ratings")
            if responses is None or ratings is None:
                raise RowProblem("missing-field", "responses" if responses is None else "ratings")
            if not isinstance(responses, list) or not isinstance(ratings, list) or len(responses) != len(ratings):
                raise RowProblem("wrong-type", "ratings")
            pairs = list(zip(responses, (number(r) for r in ratings), strict=True))
        out = []
        for i, (text, rating) in enumerate(pairs):
            if rating is None or text is None:
                continue
            try:
                messages = as_messages(text, "assistant", "completions")
            except RowProblem:
                continue
            if not is_blank(messages):
                out.append((i, messages, rating))
        return out

    def _rating(self, completion: Any) -> float | None:
        if not isinstance(completion, dict):
            return None
        sources = {
            "overall": lambda: number(completion.get("overall_score")),
            "fine-grained": lambda: number(completion.get("fine-grained_score")),
            "annotations": lambda: _annotation_mean(completion.get("annotations")),
        }
        if self.ratings_from != "auto":
            return sources[self.ratings_from]()
        for name in ("fine-grained", "annotations", "overall"):
            value = sources[name]()
            if value is not None:
                return value
        return None

    def _draw(self, prompt: list[Message], candidates: list[tuple[int, list[Message], float]], best: int) -> int:
        seed_bytes = f"{self.seed}\0{prompt[-1]['content']}\0{len(candidates)}".encode()
        rng = random.Random(int.from_bytes(hashlib.blake2b(seed_bytes, digest_size=8).digest(), "big"))
        lower = [i for i, c in enumerate(candidates) if c[2] < candidates[best][2]]
        others = lower or [i for i in range(len(candidates)) if i != best]
        return rng.choice(others)

    def _all_pairs(self, prompt: list[Message], candidates: list[tuple[int, list[Message], float]]) -> list[Pair]:
        out = []
        for x in range(len(candidates)):
            for y in range(x + 1, len(candidates)):
                a, b = candidates[x], candidates[y]
                gap = abs(a[2] - b[2])
                if gap < self.min_gap or (gap == 0 and self.min_gap > 0) or a[1] == b[1]:
                    continue
                hi, lo = (b, a) if b[2] > a[2] else (a, b)
                pair = _pair(prompt, hi, lo)
                pair.id_suffix = f"{a[0]}-{b[0]}"
                out.append(pair)
        if not out:
            raise RowProblem("below-min-gap")
        return out


def _pair(prompt: list[Message], hi: tuple[int, list[Message], float], lo: tuple[int, list[Message], float]) -> Pair:
    if hi[1] == lo[1]:
        raise RowProblem("identical-responses")
    return Pair(prompt, hi[1], lo[1], tie=hi[2] == lo[2], chosen_rating=hi[2], rejected_rating=lo[2])


def number(value: Any) -> float | None:
    """A rating as a float; None (unrated) for anything else, NaN and infinities included
    (``"nan"`` is how some datasets write a missing rating)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        if isinstance(value, int | float):
            out = float(value)
        elif isinstance(value, str):
            out = float(value.strip())
        else:
            return None
    except (ValueError, OverflowError):  # not a number; an int too large for a float
        return None
    return out if math.isfinite(out) else None


def _annotation_mean(annotations: Any) -> float | None:
    """Mean of UltraFeedback's per-aspect ``Rating`` values ("N/A" and missing aspects skipped)."""
    if not isinstance(annotations, dict):
        return None
    values = []
    for aspect in annotations.values():
        entries = aspect if isinstance(aspect, list) else [aspect]
        for entry in entries:
            rating = number(entry.get("Rating")) if isinstance(entry, dict) else None
            if rating is not None:
                values.append(rating)
    return sum(values) / len(values) if values else None
