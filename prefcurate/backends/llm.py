"""An OpenAI-compatible chat client for bulk work: concurrency, rate limits, retries, cost.

Any server that speaks ``POST /v1/chat/completions`` works (OpenAI, vLLM, Ollama, llama.cpp,
TGI, LiteLLM). The ``openai`` SDK does the HTTP; its own retries are off (``max_retries=0``)
because bulk work wants different ones:

- a bounded number of requests in flight (a semaphore), released while a request waits to
  retry so a slow retry does not hold a slot;
- requests-per-minute and tokens-per-minute token buckets; the token bucket is charged the
  estimate (characters / 4 + ``max_tokens``) up front and corrected with the real ``usage``
  when the answer arrives, so a long run converges on the true rate;
- retries on 408/409/429/5xx, timeouts and connection errors, with exponential backoff and
  jitter, waiting exactly ``Retry-After`` (or OpenAI's ``retry-after-ms``) when the server says;
- errors no retry can fix stop the run at once (401/403: the key; 404: the model or URL), and
  so does a run of consecutive failures (the endpoint is down): a million rows marked
  "connection refused" help nobody, and answers already received stay in the cache;
- an endpoint that cannot be connected to at all (connection refused, unknown host) before
  it has answered once stops the run after ``UNREACHED_RETRIES`` quick retries, instead of
  every request backing off through all its retries first: nothing is listening there. Once
  the endpoint has answered, the same errors are transient (a restart) and retried as usual;
- once the run is stopped, every request still in flight or waiting to retry stops too.

A failure is reported by its real cause: some transports (the SDK's aiohttp client) label a
refused connection a timeout; the message names the refusal.

The API key is passed in by the caller and lives only in the SDK client object.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import os
import random
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

from prefcurate.errors import ConfigError, StageFailed

OPENAI_URL = "https://api.openai.com/v1"
LOCAL_KEY = "not-needed"  # local servers ignore the key; the SDK insists on one

# USD per 1M tokens (input, output), OpenAI list prices for standard requests (late 2025).
# Longest matching prefix wins, so dated snapshots (gpt-4o-2024-08-06) find their family.
# Override with --price-input/--price-output; unknown models (local ones) cost nothing known.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-5": (1.25, 10.0),
    "gpt-5-mini": (0.25, 2.0),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o": (2.50, 10.0),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4-turbo": (10.0, 30.0),
    "gpt-4": (30.0, 60.0),
    "gpt-3.5-turbo": (0.50, 1.50),
    "o1": (15.0, 60.0),
    "o1-mini": (1.10, 4.40),
    "o3": (2.0, 8.0),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
}

RETRY_STATUS = {408, 409, 429}
FATAL_STATUS = {401: "check the key in ${env}", 403: "check the key in ${env}", 404: "check --model and --base-url"}
MAX_BACKOFF = 60.0
MAX_RETRY_AFTER = 300.0
UNREACHED_RETRIES = 2  # retries of a connection that cannot be made, before the endpoint ever answered


def resolve_base_url(base_url: str | None) -> str:
    """``base_url``, else ``$OPENAI_BASE_URL``, else OpenAI's; without a trailing slash."""
    return (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL).rstrip("/")


def redact_url(url: str) -> str:
    """The URL without user:password and query string (either may carry a credential)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def resolve_api_key(env: str, base_url: str) -> str:
    """The key from ``$env``; a placeholder for other endpoints (local servers need none)."""
    key = os.environ.get(env)
    if key:
        return key
    if urlsplit(base_url).hostname == urlsplit(OPENAI_URL).hostname:
        raise ConfigError(f"${env} is not set", f"export {env}=sk-... (or --api-key-env VAR) to call OpenAI")
    return LOCAL_KEY


def price_for(
    model: str, price_input: float | None = None, price_output: float | None = None
) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens: overrides first, then the table; None if unknown."""
    matches = [name for name in PRICES if model == name or model.startswith(name + "-")]
    known = PRICES[max(matches, key=len)] if matches else None
    if price_input is None and price_output is None:
        return known
    base = known or (0.0, 0.0)
    return (base[0] if price_input is None else price_input, base[1] if price_output is None else price_output)


def cost_usd(prompt_tokens: int, completion_tokens: int, prices: tuple[float, float] | None) -> float | None:
    if prices is None:
        return None
    return round((prompt_tokens * prices[0] + completion_tokens * prices[1]) / 1e6, 6)


def estimate_tokens(request: dict[str, Any]) -> int:
    """A cheap upper-ish estimate: characters of the messages / 4, plus the answer budget."""
    chars = sum(len(str(m.get("content") or "")) for m in request.get("messages", []))
    return math.ceil(chars / 4) + int(request.get("max_tokens") or 0)


@dataclass
class Usage:
    """What a run spent (requests are calls answered or failed for good, not attempts)."""

    requests: int = 0
    attempts: int = 0
    retries: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int


class CallFailed(Exception):
    """A call that failed after its retries (or could not be retried); the row records it."""


class TokenBucket:
    """An async token bucket refilled at ``per_minute / 60`` per second.

    Holds at most one second of budget: a fresh run does not burst a whole minute's
    allowance at once (servers enforce limits over windows shorter than their names say).
    The balance may go negative after a correction (``adjust``); later callers wait it off.
    """

    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    async def acquire(self, amount: float = 1.0) -> float:
        """Wait until ``amount`` is available and take it; returns what was charged (a request
        bigger than the bucket waits for a full one and owes the rest through ``adjust``)."""
        amount = min(amount, self.capacity)
        async with self._lock:  # FIFO: no caller starves behind smaller ones
            self._refill()
            while self.tokens < amount:
                await asyncio.sleep((amount - self.tokens) / self.rate)
                self._refill()
            self.tokens -= amount
        return amount

    def adjust(self, delta: float) -> None:
        """Charge (positive) or refund (negative) after the fact."""
        self._refill()
        self.tokens = min(self.capacity, self.tokens - delta)


def retry_after(headers: Any) -> float | None:
    """Seconds the server asked to wait: ``retry-after-ms``, ``Retry-After`` seconds or HTTP date."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class ChatClient:
    """Bulk chat completions against one endpoint; one instance per event loop."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 16,
        rpm: int | None = None,
        tpm: int | None = None,
        max_retries: int = 6,
        timeout: float = 60.0,
        backoff: float = 1.0,
        abort_after: int = 0,
    ) -> None:
        try:
            import openai
        except ImportError:  # pragma: no cover - a core dependency
            from prefcurate.errors import MissingDependency

            raise MissingDependency("openai", purpose="the judge") from None
        self._openai = openai
        self._response_type = _response_type()
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key,
            max_retries=0,
            timeout=timeout,
            http_client=_http_client(openai, timeout),
        )
        self.api_key_env = api_key_env
        self.base_url = redact_url(base_url)
        self.semaphore = asyncio.Semaphore(concurrency)
        self.rpm = TokenBucket(rpm) if rpm else None
        self.tpm = TokenBucket(tpm) if tpm else None
        self.max_retries = max_retries
        self.backoff = backoff
        self.abort_after = abort_after
        self.usage = Usage()
        self._consecutive_failures = 0
        self._reached = False  # the endpoint has answered (anything, an error status included)
        self._stopped: StageFailed | None = None  # the error that stopped the run

    async def aclose(self) -> None:
        await self._client.close()

    async def complete(self, request: dict[str, Any]) -> Completion:
        """One chat completion with retries. Raises ``CallFailed`` (row error) or ``StageFailed``."""
        estimate = estimate_tokens(request)
        attempt = 0
        while True:
            self._check_stopped()
            if self.rpm:
                await self.rpm.acquire(1)
            charged = await self.tpm.acquire(estimate) if self.tpm else 0.0
            async with self.semaphore:
                self._check_stopped()
                self.usage.attempts += 1
                try:
                    # The SDK's documented raw ``post``: its auth, base URL, timeouts and
                    # error types, without re-validating the request and building a pydantic
                    # model per answer (the bulk of its per-request CPU cost).
                    response = await self._client.post("/chat/completions", body=request, cast_to=self._response_type)
                    self._reached = True
                    payload = _json_body(response)
                except (self._openai.APIError, _BadAnswer) as exc:
                    if isinstance(exc, self._openai.APIStatusError):
                        self._reached = True
                    error = exc
                else:
                    return self._accept(payload, charged)
            try:
                delay = self._retry_delay(error, attempt)
            except StageFailed as exc:
                self._stopped = exc
                raise
            if delay is None:
                self._fail(error)
            self.usage.retries += 1
            attempt += 1
            await asyncio.sleep(delay)

    def _check_stopped(self) -> None:
        """Another request stopped the run: this one stops too, with the same message."""
        if self._stopped is not None:
            raise StageFailed(self._stopped.message, self._stopped.hint)

    def _accept(self, payload: dict[str, Any], charged: float) -> Completion:
        usage = payload.get("usage") or {}
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        if self.tpm and usage:
            self.tpm.adjust(prompt + completion - charged)
        self.usage.requests += 1
        self.usage.prompt_tokens += prompt
        self.usage.completion_tokens += completion
        self._consecutive_failures = 0
        choices = payload.get("choices") or [{}]
        message = choices[0].get("message") or {}
        return Completion(text=str(message.get("content") or ""), prompt_tokens=prompt, completion_tokens=completion)

    def _retry_delay(self, error: Exception, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None when the error is final."""
        status = getattr(error, "status_code", None)
        if status in FATAL_STATUS:
            hint = FATAL_STATUS[status].replace("${env}", f"${self.api_key_env}")
            raise StageFailed(f"the endpoint answered {status}: {_message(error)}", hint)
        unreachable = _unreachable(error)
        if unreachable is not None and not self._reached and attempt >= min(self.max_retries, UNREACHED_RETRIES):
            raise StageFailed(
                f"cannot connect to {self.base_url}: {_describe(unreachable)}",
                "is the server running? check --base-url",
            )
        retryable = isinstance(error, self._openai.APIConnectionError) or (
            status is not None and (status in RETRY_STATUS or status >= 500)
        )
        if not retryable or attempt >= self.max_retries:
            return None
        asked = retry_after(getattr(getattr(error, "response", None), "headers", None))
        if asked is not None:
            return min(asked, MAX_RETRY_AFTER)
        # "Equal jitter": half fixed, half random, so clients that failed together spread out.
        ceiling = min(MAX_BACKOFF, self.backoff * 2**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _fail(self, error: Exception) -> NoReturn:
        self.usage.requests += 1
        self.usage.failed += 1
        self._consecutive_failures += 1
        message = _message(error)
        if self.abort_after and self._consecutive_failures >= self.abort_after:
            self._stopped = StageFailed(
                f"{self._consecutive_failures} calls in a row failed (last: {message})",
                "is the endpoint up? rerun to resume: answers received so far are cached",
            )
            raise self._stopped
        raise CallFailed(message)


def _response_type() -> type:
    """The raw response class the SDK's ``post`` returns uncast (httpx2 in openai 3, else httpx)."""
    try:
        import httpx2

        return httpx2.Response
    except ImportError:
        import httpx

        return httpx.Response


def _http_client(openai: Any, timeout: float) -> Any:
    """aiohttp as the SDK's transport when installed (several times cheaper per request at
    high concurrency than the default pool); None keeps the SDK's default."""
    factory = getattr(openai, "DefaultAioHttpClient", None)
    if factory is None:
        return None
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return None
    return factory(timeout=timeout)


def _json_body(response: Any) -> dict[str, Any]:
    try:
        payload = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        payload = None
    if not isinstance(payload, dict):
        raise _BadAnswer(f"not a chat completion: {response.content[:200]!r}")
    return payload


class _BadAnswer(Exception):
    """A 200 answer that is not a chat completion (a proxy's HTML page, say): a failed call."""


def _causes(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from (``__cause__``, else ``__context__``)."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and len(chain) < 16 and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _unreachable(error: BaseException) -> OSError | None:
    """The OS error behind a connection that could not be made at all (refused, unknown host),
    or None. A temporary name-resolution failure (EAI_AGAIN) does not count."""
    for cause in _causes(error):
        if isinstance(cause, ConnectionRefusedError):
            return cause
        if isinstance(cause, socket.gaierror) and cause.errno != socket.EAI_AGAIN:
            return cause
    return None


def _describe(cause: OSError) -> str:
    what = "connection refused" if isinstance(cause, ConnectionRefusedError) else "unknown host"
    detail = cause.strerror or str(cause)
    return f"{what} ({detail})" if detail and detail.lower() != what else what


def _message(error: Exception) -> str:
    status = getattr(error, "status_code", None)
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    if status:
        return f"{status}: {text}"
    unreachable = _unreachable(error)
    if unreachable is not None:  # aiohttp's transport calls a refused connection a timeout
        return _describe(unreachable)
    return f"{type(error).__name__}: {text}"
