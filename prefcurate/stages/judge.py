"""The judge stage: an LLM compares chosen and rejected, debiased by position swap, cached.

Streaming, with one event loop per run: input batches of about ``concurrency`` rows are read
one at a time and each becomes a task on the loop; up to ``WINDOW`` batches are in flight, so
the requests of later batches keep the semaphore busy while the head batch's stragglers
finish (a retry waiting on ``Retry-After`` does not drain the pipe). Finished batches leave
in input order, so memory holds ``WINDOW`` batches whatever the input size. No thread: the
loop runs while the stage waits for its head batch and pauses only while that batch is
written.

Each request is looked up in a SQLite cache under ``workdir/cache/`` first (key: endpoint,
model, messages, sampling parameters; never the key) and every answer that parses is written
there as it arrives, so an interrupted run, rerun, repeats no request. Rows whose calls fail
or whose answers do not parse keep a ``judge_error`` and stay in the output (or go to
rejects with ``--drop-errors``); a rerun with ``--fresh`` retries only those requests.

Columns: ``judge_pref`` (share of orders chosen won, a tie counting 1/2), ``judge_consistent``
(both orders agree; null without swap or with ``rating``), ``judge_votes`` (raw verdicts in
request order: first chosen shown as A, then rejected as A; ``rating``: one vote, A = chosen),
``judge_model``, ``judge_error``, ``flipped``, and ``judge_rationale`` /
``judge_chosen_score`` / ``judge_rejected_score`` when asked. Votes and rationales always
refer to the input's labels, also on rows ``--relabel`` flipped.

The stage overrides ``process``, so under the Ray engine it runs on the driver: it waits on
the network, and one event loop keeps hundreds of requests in flight at little CPU.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import typer
from pydantic import Field, field_validator, model_validator

from prefcurate.errors import ConfigError
from prefcurate.stages.base import (
    BatchResult,
    Stage,
    StageConfig,
    StageContext,
    StageInput,
    as_table,
    request_cache,
    split,
)
from prefcurate.stages.judge_session import JudgeSession, Plan, RowVerdict

WINDOW = 8
OPERATIONAL = {
    "api_key_env", "concurrency", "rpm", "tpm", "max_retries", "timeout", "backoff",
    "abort_after", "price_input", "price_output", "dry_run",
}  # fmt: skip


class JudgeConfig(StageConfig):
    """LLM-as-judge over any OpenAI-compatible endpoint, position-debiased and cached."""

    model: str = Field(
        ..., description="Judge model name as the endpoint knows it.", json_schema_extra={"cli": {"flags": ["-m"]}}
    )
    base_url: str | None = Field(
        None,
        description="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (default: $OPENAI_BASE_URL, or OpenAI).",
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="Environment variable holding the API key (never written anywhere); local servers need none.",
    )
    method: Literal["pairwise", "rating"] = Field(
        "pairwise",
        description="pairwise: which of two responses is better; "
        "rating: each response rated 1-10 per aspect, verdict from the difference.",
    )
    template: Path | None = Field(
        None,
        description="Jinja2 file replacing the pairwise prompt "
        "(variables: prompt, response_a, response_b, prompt_messages).",
    )
    system: str | None = Field(
        None, description="System message (default: the built-in judge instructions; none with --template)."
    )
    aspects: list[str] = Field(
        ["helpfulness", "honesty", "instruction_following", "truthfulness"],
        description="Rubric aspects for --method rating.",
    )
    swap: bool = Field(True, description="Judge each pair in both orders (A/B and B/A) to cancel position bias.")
    json_mode: bool | None = Field(
        None,
        description="Ask for JSON output (response_format); default: on for built-in prompts, off with --template.",
    )
    json_schema: bool = Field(False, description="With JSON mode, send a strict json_schema instead of json_object.")
    verdict_a: str | None = Field(
        None, description=r"Regex meaning 'A is better' in a free-text answer (default \[\[A\]\])."
    )
    verdict_b: str | None = Field(None, description=r"Regex meaning 'B is better' (default \[\[B\]\]).")
    verdict_tie: str | None = Field(None, description=r"Regex meaning a tie (default \[\[C\]\] or [[tie]]).")
    rationale: bool = Field(False, description="Ask for a short rationale and keep it in judge_rationale.")
    relabel: bool = Field(
        False, description="Swap chosen and rejected where the judge consistently prefers rejected (flipped=True)."
    )
    drop_errors: bool = Field(
        False,
        description="Send rows whose judging failed to rejects (reason judge-error) instead of keeping them annotated.",
    )
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature.")
    max_tokens: int = Field(512, ge=1, description="Answer token budget per request.")
    seed: int | None = Field(None, description="Sampling seed, for endpoints that honour one.")
    concurrency: int = Field(16, ge=1, description="Requests in flight at once.")
    rpm: int | None = Field(None, ge=1, description="Requests-per-minute limit.")
    tpm: int | None = Field(None, ge=1, description="Tokens-per-minute limit (estimated up front, corrected by usage).")
    max_retries: int = Field(6, ge=0, description="Retries per request on 429, 5xx, timeouts and connection errors.")
    timeout: float = Field(60.0, gt=0, description="Seconds before a request times out (then it is retried).")
    backoff: float = Field(
        1.0, ge=0, description="First retry delay in seconds, doubled per retry, with jitter (Retry-After wins)."
    )
    abort_after: int = Field(
        50, ge=0, description="Stop the run after this many consecutive failed calls (endpoint down); 0: never."
    )
    price_input: float | None = Field(
        None, ge=0, description="USD per 1M input tokens (default: the price table for known OpenAI models)."
    )
    price_output: float | None = Field(None, ge=0, description="USD per 1M output tokens.")
    dry_run: bool = Field(
        False, description="Print the number of calls and the estimated cost, then exit without calling."
    )

    @field_validator("aspects")
    @classmethod
    def _aspects(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one aspect")
        return value

    @field_validator("base_url")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        # user:password@ cannot ride beside the API key's Authorization header (the client refuses
        # both), and would be one step from the manifest
        if value is not None:
            parts = urlsplit(value)
            if parts.username or parts.password:
                raise ValueError(
                    "credentials in the URL are not supported: put the key in $OPENAI_API_KEY (--api-key-env)"
                )
        return value

    @field_validator("api_key_env")
    @classmethod
    def _key_name(cls, value: str) -> str:
        # A key pasted here would land in the manifest: only a variable's name is accepted.
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError("expected the NAME of an environment variable (e.g. OPENAI_API_KEY), not a key")
        return value

    @field_validator("verdict_a", "verdict_b", "verdict_tie")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regex: {exc}") from None
        return value

    @model_validator(mode="after")
    def _template(self) -> JudgeConfig:
        """Validate before work (``pipeline --check``): the template compiles and fits the method."""
        if self.template is not None:
            if self.method == "rating":
                raise ValueError("--template replaces the pairwise prompt: use it with --method pairwise")
            from prefcurate.stages.judge_templates import load_user_template

            try:
                load_user_template(self.template)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return self

    def use_json(self) -> bool:
        return self.json_mode if self.json_mode is not None else self.template is None

    def produces(self) -> set[str]:
        cols = {"judge_pref", "judge_consistent", "judge_votes", "judge_model", "judge_error", "flipped"}
        if self.rationale:
            cols.add("judge_rationale")
        if self.method == "rating":
            cols |= {"judge_chosen_score", "judge_rejected_score"}
        return cols

    def fingerprint_params(self) -> dict[str, Any]:
        from prefcurate.backends.llm import redact_url, resolve_base_url

        params = {k: v for k, v in self.model_dump(mode="json").items() if k not in OPERATIONAL}
        params["base_url"] = redact_url(resolve_base_url(self.base_url))
        if self.template is not None and Path(self.template).is_file():
            params["template_sha"] = hashlib.blake2b(Path(self.template).read_bytes(), digest_size=12).hexdigest()
        return params


class DryRunDone(typer.Exit):
    """Raised after ``--dry-run`` printed its estimate: the CLI exits 0, nothing is written.
    Library callers catch it and read ``estimate``."""

    def __init__(self, estimate: dict[str, Any]) -> None:
        super().__init__(0)
        self.estimate = estimate


class JudgeStage(Stage):
    """Judge each pair with an LLM (pairwise with position swap, or rubric ratings) over any
    OpenAI-compatible endpoint; annotate judge_pref/judge_consistent, optionally relabel."""

    name = "judge"
    config_cls = JudgeConfig
    reject_extras: ClassVar[dict[str, pa.DataType]] = {}
    config: JudgeConfig

    def manifest_params(self) -> dict[str, Any]:
        from prefcurate.backends.llm import redact_url

        params = self.config.model_dump(mode="json")
        if params.get("base_url"):
            params["base_url"] = redact_url(params["base_url"])
        return params

    def empty_output(self, source: StageInput | None) -> pa.Table | None:
        """An empty input still gets every judge column, typed as a judged batch writes them
        (``annotate`` on no rows), so later stages (``score -m judge``, ``filter
        --drop-judge-inconsistent``) find them."""
        if source is None or source.schema is None:
            return None
        return annotate(source.schema.empty_table(), [], self.config)

    def process(self, source: StageInput | None, ctx: StageContext) -> Iterator[BatchResult]:
        assert source is not None, "judge needs an input directory"
        cfg = self.config
        plan = Plan.from_config(cfg)
        cache_path = request_cache(ctx.workdir)[0] / "judge.sqlite"
        if cfg.dry_run:
            self._dry_run(source, plan, cache_path)
        if source.num_rows == 0:
            # Nothing to judge: open no client (no request, not even a connection) and no cache;
            # the base writes ``empty_output``'s schema.
            ctx.extra.update(JudgeSession(cfg, plan, cache_path, ctx.progress.task("judge", total=0)).figures())
            return
        session = JudgeSession(cfg, plan, cache_path, ctx.progress.task("judge", total=source.num_rows, unit="pairs"))
        loop = asyncio.new_event_loop()
        pending: deque[tuple[pa.RecordBatch, asyncio.Task[list[RowVerdict]]]] = deque()
        try:
            loop.run_until_complete(session.open())
            rows_per_batch = max(8, cfg.concurrency)
            for batch in source.batches(batch_rows=rows_per_batch):
                pending.append((batch, loop.create_task(session.judge_batch(batch))))
                while len(pending) >= WINDOW:
                    head, task = pending.popleft()
                    yield self._result(head, loop.run_until_complete(task))
            while pending:
                head, task = pending.popleft()
                yield self._result(head, loop.run_until_complete(task))
            ctx.extra.update(session.figures())
        finally:
            # Stop whatever is still running (an error or an interrupt), then close cleanly. The
            # batches still queued are awaited too, also those that already failed: ``all_tasks``
            # lists only unfinished tasks, and a failed task nobody awaited is printed with its
            # traceback when it is collected, after the error line.
            leftover = list({*(task for _, task in pending), *asyncio.all_tasks(loop)})
            pending.clear()
            for task in leftover:
                task.cancel()
            loop.run_until_complete(session.close(leftover))
            loop.close()

    def _result(self, batch: pa.RecordBatch, verdicts: list[RowVerdict]) -> BatchResult:
        table = annotate(as_table(batch), verdicts, self.config)
        if self.config.drop_errors:
            keep = pc.is_null(table["judge_error"]).to_numpy(zero_copy_only=False)
            return split(table, keep, "judge-error")
        return BatchResult(table)

    def _dry_run(self, source: StageInput, plan: Plan, cache_path: Path) -> None:
        from prefcurate.backends.cache import RequestCache
        from prefcurate.backends.llm import cost_usd, estimate_tokens, price_for

        cfg = self.config
        calls = cached = prompt_tokens = 0
        with RequestCache(cache_path, readonly=True) as cache:
            for batch in source.batches(columns=["prompt", "chosen", "rejected"]):
                for row in batch.to_pylist():
                    for request in plan.requests(row):
                        calls += 1
                        if plan.key(request) in cache:
                            cached += 1
                        else:
                            prompt_tokens += estimate_tokens(request) - cfg.max_tokens
        todo = calls - cached
        prices = price_for(cfg.model, cfg.price_input, cfg.price_output)
        cost = cost_usd(prompt_tokens, todo * cfg.max_tokens, prices)
        cost_text = f"~${cost:,.2f}" if cost is not None else "cost unknown (set --price-input/--price-output)"
        sys.stderr.write(
            f"judge --dry-run: {todo:,} calls to {cfg.model} for {source.num_rows:,} pairs"
            f" ({cached:,} more cached), ~{prompt_tokens:,} input + up to {todo * cfg.max_tokens:,} output"
            f" tokens, {cost_text}; nothing sent\n"
        )
        sys.stderr.flush()
        raise DryRunDone(
            {
                "calls": todo,
                "cached": cached,
                "prompt_tokens": prompt_tokens,
                "cost_usd": cost,
                "pairs": source.num_rows,
            }
        )


JUDGE_COLUMNS = (
    "judge_pref", "judge_consistent", "judge_votes", "judge_model", "judge_error", "flipped",
    "judge_rationale", "judge_chosen_score", "judge_rejected_score",
)  # fmt: skip


def annotate(table: pa.Table, verdicts: list[RowVerdict], cfg: JudgeConfig) -> pa.Table:
    """Append the judge columns (replacing those of an earlier judge run); relabel if asked."""
    table = table.drop_columns([c for c in JUDGE_COLUMNS if c in table.column_names])
    n = table.num_rows
    cols: dict[str, pa.Array] = {
        "judge_pref": pa.array([v.pref for v in verdicts], pa.float64()),
        "judge_consistent": pa.array([v.consistent for v in verdicts], pa.bool_()),
        "judge_votes": pa.array([v.votes for v in verdicts], pa.list_(pa.string())),
        "judge_model": pa.array([cfg.model] * n, pa.string()),
        "judge_error": pa.array([v.error for v in verdicts], pa.string()),
    }
    if cfg.rationale:
        cols["judge_rationale"] = pa.array([v.rationales for v in verdicts], pa.list_(pa.string()))
    if cfg.method == "rating":
        cols["judge_chosen_score"] = pa.array([v.scores[0] if v.scores else None for v in verdicts], pa.float64())
        cols["judge_rejected_score"] = pa.array([v.scores[1] if v.scores else None for v in verdicts], pa.float64())
    flip = [bool(cfg.relabel and v.pref == 0.0) for v in verdicts]
    cols["flipped"] = pa.array(flip, pa.bool_())
    for name, values in cols.items():
        table = table.append_column(name, values)
    if any(flip):
        table = _flip(table, pa.array(flip))
    return table


def _flip(table: pa.Table, mask: pa.Array) -> pa.Table:
    """Swap chosen/rejected (and their ratings and scores) where ``mask``; the judge now agrees."""
    pairs = [
        ("chosen", "rejected"),
        ("chosen_rating", "rejected_rating"),
        ("judge_chosen_score", "judge_rejected_score"),
    ]
    for left, right in pairs:
        if left not in table.column_names or right not in table.column_names:
            continue
        a, b = table[left], table[right]
        table = table.set_column(table.column_names.index(left), left, pc.if_else(mask, b, a))
        table = table.set_column(table.column_names.index(right), right, pc.if_else(mask, a, b))
    pref = table["judge_pref"]
    idx = table.column_names.index("judge_pref")
    return table.set_column(idx, "judge_pref", pc.if_else(mask, pc.subtract(1.0, pref), pref))
