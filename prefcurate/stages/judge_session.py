"""The judge's request plan (what to ask, how to read the answers) and its async session.

``Plan`` is pure: it turns a row into requests, an answer text into a verdict, and a row's
answers into ``RowVerdict``. ``JudgeSession`` runs on the stage's event loop: cache look-up,
one call per distinct request in flight (duplicate pairs or a response shared by several
pairs share one call), cache write on a parsable answer, live figures.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from prefcurate.schema import render_text
from prefcurate.stages.judge_templates import Patterns, Prompts, load_user_template, parse_ratings, parse_verdict

if TYPE_CHECKING:
    from prefcurate.backends.cache import RequestCache
    from prefcurate.backends.llm import ChatClient
    from prefcurate.stages.base import ProgressTask
    from prefcurate.stages.judge import JudgeConfig

CHOSEN_WINS = ({"A": 1.0, "B": 0.0, "tie": 0.5}, {"A": 0.0, "B": 1.0, "tie": 0.5})  # order 0: chosen is A


@dataclass
class Answer:
    label: str | None = None
    ratings: dict[str, float] | None = None
    rationale: str | None = None
    error: str | None = None


@dataclass
class RowVerdict:
    pref: float | None
    consistent: bool | None
    votes: list[str | None]
    error: str | None = None
    rationales: list[str | None] = field(default_factory=list)
    scores: tuple[float, float] | None = None


@dataclass
class Plan:
    cfg: JudgeConfig
    prompts: Prompts
    patterns: Patterns
    base_url: str
    extra: dict[str, Any]

    @classmethod
    def from_config(cls, cfg: JudgeConfig) -> Plan:
        from prefcurate.backends.llm import redact_url, resolve_base_url

        template = load_user_template(cfg.template) if cfg.template is not None else None
        json_mode = cfg.use_json()
        prompts = Prompts(cfg.method, json_mode, cfg.rationale, tuple(cfg.aspects), cfg.system, template)
        extra: dict[str, Any] = {"temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
        if cfg.seed is not None:
            extra["seed"] = cfg.seed
        if json_mode:
            extra["response_format"] = (
                {"type": "json_schema", "json_schema": prompts.json_schema()}
                if cfg.json_schema
                else {"type": "json_object"}
            )
        patterns = Patterns.build(cfg.verdict_a, cfg.verdict_b, cfg.verdict_tie)
        return cls(cfg, prompts, patterns, redact_url(resolve_base_url(cfg.base_url)), extra)

    def requests(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The row's requests: pairwise (chosen, rejected) then (rejected, chosen); rating: one each."""
        prompt, chosen, rejected = row["prompt"] or [], render_text(row["chosen"]), render_text(row["rejected"])
        if self.cfg.method == "rating":
            messages = [self.prompts.rating(prompt, chosen), self.prompts.rating(prompt, rejected)]
        else:
            messages = [self.prompts.pairwise(prompt, chosen, rejected)]
            if self.cfg.swap:
                messages.append(self.prompts.pairwise(prompt, rejected, chosen))
        return [{"model": self.cfg.model, "messages": m, **self.extra} for m in messages]

    def key(self, request: dict[str, Any]) -> str:
        from prefcurate.backends.cache import request_key

        return request_key({"base_url": self.base_url, **request})

    def parse(self, text: str) -> Answer:
        if self.cfg.method == "rating":
            ratings = parse_ratings(text, tuple(self.cfg.aspects))
            if ratings is not None:
                return Answer(ratings=ratings, rationale=text)
        else:
            label, rationale = parse_verdict(text, self.patterns)
            if label is not None:
                return Answer(label=label, rationale=rationale)
        return Answer(error=f"unparseable answer: {text[:200]!r}")

    def combine(self, answers: list[Answer]) -> RowVerdict:
        names = ("chosen", "rejected") if self.cfg.method == "rating" else ("chosen-first", "rejected-first")
        errors = [f"{names[i]}: {a.error}" for i, a in enumerate(answers) if a.error]
        rationales = [a.rationale for a in answers] if self.cfg.rationale else []
        if self.cfg.method == "rating":
            return self._combine_ratings(answers, errors, rationales)
        votes = [a.label for a in answers]
        if errors:
            return RowVerdict(None, None, votes, "; ".join(errors), rationales)
        wins = [CHOSEN_WINS[i][label] for i, label in enumerate(votes) if label is not None]
        consistent = (wins[0] == wins[1]) if len(wins) == 2 else None
        return RowVerdict(sum(wins) / len(wins), consistent, votes, None, rationales)

    def _combine_ratings(self, answers: list[Answer], errors: list[str], rationales: list[str | None]) -> RowVerdict:
        if errors:
            return RowVerdict(None, None, [], "; ".join(errors), rationales)
        chosen, rejected = (sum(a.ratings.values()) / len(a.ratings) for a in answers if a.ratings)
        pref = 1.0 if chosen > rejected else 0.0 if chosen < rejected else 0.5
        vote = {1.0: "A", 0.0: "B", 0.5: "tie"}[pref]
        return RowVerdict(pref, None, [vote], None, rationales, (chosen, rejected))


class JudgeSession:
    """Judges batches on the running event loop; owns the client and the cache."""

    def __init__(self, cfg: JudgeConfig, plan: Plan, cache_path: Path, task: ProgressTask) -> None:
        self.cfg, self.plan, self.cache_path, self.task = cfg, plan, cache_path, task
        self.client: ChatClient | None = None
        self.cache: RequestCache | None = None
        self._inflight: dict[str, asyncio.Future[Answer]] = {}
        self.cache_hits = self.unparseable = self.row_errors = self.rows = self.consistent = 0
        self.pref_sum = 0.0
        self.started = time.monotonic()
        self._shown = 0.0

    async def open(self) -> None:
        from prefcurate.backends.cache import RequestCache
        from prefcurate.backends.llm import ChatClient, resolve_api_key, resolve_base_url

        cfg = self.cfg
        base_url = resolve_base_url(cfg.base_url)
        self.client = ChatClient(
            base_url,
            resolve_api_key(cfg.api_key_env, base_url),
            api_key_env=cfg.api_key_env,
            concurrency=cfg.concurrency,
            rpm=cfg.rpm,
            tpm=cfg.tpm,
            max_retries=cfg.max_retries,
            timeout=cfg.timeout,
            backoff=cfg.backoff,
            abort_after=cfg.abort_after,
        )
        self.cache = RequestCache(self.cache_path)
        self.started = time.monotonic()

    async def close(self, tasks: list[asyncio.Task[Any]]) -> None:
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()
        if self.cache is not None:
            self.cache.close()

    async def judge_batch(self, batch: pa.RecordBatch) -> list[RowVerdict]:
        rows = batch.select(["prompt", "chosen", "rejected"]).to_pylist()
        return list(await asyncio.gather(*(self._judge_row(row) for row in rows)))

    async def _judge_row(self, row: dict[str, Any]) -> RowVerdict:
        answers = await asyncio.gather(*(self._ask(r) for r in self.plan.requests(row)))
        verdict = self.plan.combine(list(answers))
        self.rows += 1
        if verdict.error:
            self.row_errors += 1
        else:
            self.pref_sum += verdict.pref or 0.0
            self.consistent += bool(verdict.consistent)
        self.task.advance(1)
        self._show()
        return verdict

    async def _ask(self, request: dict[str, Any]) -> Answer:
        assert self.cache is not None
        key = self.plan.key(request)
        cached = self.cache.get(key)
        if cached is not None:
            answer = self.plan.parse(cached["text"])
            if answer.error is None:  # else the verdict patterns changed: ask again
                self.cache_hits += 1
                return answer
        running = self._inflight.get(key)
        if running is not None:
            self.cache_hits += 1
            return await asyncio.shield(running)
        future = asyncio.ensure_future(self._call(key, request))
        self._inflight[key] = future
        try:
            return await future
        finally:
            self._inflight.pop(key, None)

    async def _call(self, key: str, request: dict[str, Any]) -> Answer:
        from prefcurate.backends.llm import CallFailed

        assert self.client is not None and self.cache is not None
        try:
            completion = await self.client.complete(request)
        except CallFailed as exc:
            return Answer(error=str(exc))
        answer = self.plan.parse(completion.text)
        if answer.error is None:
            usage = {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens}
            self.cache.put(key, {"text": completion.text, "usage": usage})
        else:
            self.unparseable += 1
        return answer

    def _show(self) -> None:
        now = time.monotonic()
        if now - self._shown < 0.5 or self.client is None:
            return
        self._shown = now
        rate = self.client.usage.requests / max(now - self.started, 1e-9)
        self.task.describe(f"judge {rate:,.1f} req/s, {self.cache_hits:,} cached, {self.row_errors:,} errors")

    def figures(self) -> dict[str, Any]:
        """What goes into the manifest's ``extra`` (and therefore into stats and the card)."""
        from prefcurate.backends.llm import Usage, cost_usd, price_for

        usage = self.client.usage if self.client is not None else Usage()  # no client: nothing was sent
        prices = price_for(self.cfg.model, self.cfg.price_input, self.cfg.price_output)
        judged = self.rows - self.row_errors
        figures: dict[str, Any] = {
            "model": self.cfg.model,
            "base_url": self.plan.base_url,
            "method": self.cfg.method,
            "swap": self.cfg.swap,
            "cache_hits": self.cache_hits,
            "errors": self.row_errors,
            "unparseable": self.unparseable,
            "mean_pref": round(self.pref_sum / judged, 4) if judged else None,
            "consistent_share": round(self.consistent / judged, 4)
            if judged and self.plan.prompts.method == "pairwise" and self.cfg.swap
            else None,
            "price_per_1m": list(prices) if prices else None,
        }
        figures.update(usage.as_dict())
        figures["cost_usd"] = cost_usd(usage.prompt_tokens, usage.completion_tokens, prices)
        return figures
