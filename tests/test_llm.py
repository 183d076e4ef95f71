"""The OpenAI-compatible client (retries, limits, cost) and the request cache, against a real
local HTTP server speaking the chat-completions protocol."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import sqlite3
import time

import pytest

from prefcurate.backends.cache import RequestCache, request_key
from prefcurate.backends.llm import (
    UNREACHED_RETRIES,
    CallFailed,
    ChatClient,
    TokenBucket,
    cost_usd,
    estimate_tokens,
    price_for,
    redact_url,
    resolve_api_key,
    retry_after,
)
from prefcurate.errors import ConfigError, StageFailed
from tests.fake_openai import FakeOpenAI, Reply

REQUEST = {
    "model": "judge",
    "messages": [{"role": "user", "content": "Which is better? [[A]] or [[B]]"}],
    "max_tokens": 8,
}


def complete(server: FakeOpenAI, n: int = 1, **options) -> list:
    """Run ``n`` requests through one client; returns each answer or the exception it raised."""

    async def main() -> list:
        client = ChatClient(server.base_url, "sk-test", **{"backoff": 0.01, **options})
        try:
            return await asyncio.gather(*(client.complete(REQUEST) for _ in range(n)), return_exceptions=True)
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_completion_text_and_usage():
    with FakeOpenAI(lambda r: Reply(content="[[B]]", prompt_tokens=11, completion_tokens=3)) as server:
        (answer,) = complete(server)
    assert answer.text == "[[B]]"
    assert (answer.prompt_tokens, answer.completion_tokens) == (11, 3)
    assert server.requests[0].body["messages"] == REQUEST["messages"]
    assert server.requests[0].headers["authorization"] == "Bearer sk-test"


def test_retry_after_429_is_honoured():
    failures = [Reply(status=429, headers={"Retry-After": "0.4"})]
    with FakeOpenAI(lambda r: "[[A]]", failures=failures) as server:
        (answer,) = complete(server, max_retries=2)
    assert answer.text == "[[A]]"
    assert [r.status for r in server.requests] == [429, 200]
    assert server.requests[1].time - server.requests[0].time >= 0.38


def test_retry_after_ms_and_500_backoff():
    failures = [Reply(status=503, headers={"retry-after-ms": "250"}), Reply(status=500)]
    with FakeOpenAI(lambda r: "[[A]]", failures=failures) as server:
        (answer,) = complete(server, max_retries=3, backoff=0.05)
    assert [r.status for r in server.requests] == [503, 500, 200]
    assert server.requests[1].time - server.requests[0].time >= 0.24
    assert server.requests[2].time - server.requests[1].time >= 0.025  # backoff * 2**1 / 2 at least


def test_gives_up_after_max_retries():
    with FakeOpenAI(lambda r: "[[A]]", failures=[Reply(status=500)] * 5) as server:
        (answer,) = complete(server, max_retries=2)
    assert isinstance(answer, CallFailed)
    assert "500" in str(answer)
    assert server.count == 3


def test_client_errors_are_not_retried():
    with FakeOpenAI(lambda r: "[[A]]", failures=[Reply(status=400)]) as server:
        (answer,) = complete(server, max_retries=5)
    assert isinstance(answer, CallFailed) and server.count == 1


@pytest.mark.parametrize("status", [401, 404])
def test_auth_and_not_found_stop_the_run(status):
    with FakeOpenAI(lambda r: "[[A]]", failures=[Reply(status=status)]) as server:
        (answer,) = complete(server, api_key_env="MY_KEY")
    assert isinstance(answer, StageFailed)
    assert ("$MY_KEY" in str(answer)) == (status == 401)


def test_timeout_is_retried_then_fails():
    with FakeOpenAI(lambda r: "[[A]]", delay=1.0) as server:
        (answer,) = complete(server, timeout=0.2, max_retries=1)
    assert isinstance(answer, CallFailed)
    assert "timed out" in str(answer) and "refused" not in str(answer)
    assert server.count == 2


def closed_url() -> str:
    """An endpoint on 127.0.0.1 whose port nothing listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def test_refused_connection_before_any_answer_stops_the_run():
    """Nothing listens there: every request stops the run after UNREACHED_RETRIES quick retries,
    reported as a refused connection (aiohttp's transport labels it a timeout), not max_retries
    backoffs each."""

    async def main() -> tuple[list, int]:
        client = ChatClient(closed_url(), "sk-test", backoff=0.01, max_retries=6, abort_after=50, concurrency=2)
        try:
            answers = await asyncio.gather(*(client.complete(REQUEST) for _ in range(5)), return_exceptions=True)
        finally:
            await client.aclose()
        return answers, client.usage.attempts

    answers, attempts = asyncio.run(main())
    assert all(isinstance(a, StageFailed) for a in answers), answers
    message = str(answers[0])
    assert message.startswith("cannot connect to http://127.0.0.1:") and ": connection refused" in message
    assert "timed out" not in message.lower() and "--base-url" in message
    assert UNREACHED_RETRIES + 1 <= attempts <= 5 * (UNREACHED_RETRIES + 1) < 5 * 7


def test_refused_connection_after_answers_is_retried_as_transient():
    """Once the endpoint has answered, a refused connection is a restart: retried with backoff
    like any connection error, then a row error that names the refusal."""

    async def main() -> tuple[object, object, int]:
        server = FakeOpenAI(lambda r: "[[A]]").__enter__()
        client = ChatClient(server.base_url, "sk-test", backoff=0.01, max_retries=3)
        try:
            first = await client.complete(REQUEST)
            server.__exit__(None, None, None)  # the endpoint goes away
            second = await asyncio.gather(client.complete(REQUEST), return_exceptions=True)
        finally:
            await client.aclose()
        return first, second[0], client.usage.attempts

    first, second, attempts = asyncio.run(main())
    assert first.text == "[[A]]"
    assert isinstance(second, CallFailed) and "connection refused" in str(second), second
    assert attempts == 1 + 1 + 3


def test_consecutive_failures_abort():
    with FakeOpenAI(lambda r: "[[A]]", fail_after=0) as server:
        answers = complete(server, n=6, max_retries=0, abort_after=3, concurrency=1)
    assert any(isinstance(a, StageFailed) for a in answers)
    assert "3 calls in a row failed" in str(next(a for a in answers if isinstance(a, StageFailed)))


def test_rpm_limit_spaces_requests():
    with FakeOpenAI(lambda r: "[[A]]") as server:
        complete(server, n=16, rpm=600)  # 10 per second, holding one second's worth
    times = sorted(r.time for r in server.requests)
    # The 6 beyond the first 10 come 0.1 s apart (0.6 s); unlimited, all 16 arrive within ms.
    assert times[-1] - times[0] >= 0.4


def test_token_bucket_charges_and_corrects():
    async def main() -> tuple[float, float]:
        bucket = TokenBucket(per_minute=6000)  # 100 tokens/s, holds 100
        charged = await bucket.acquire(500)  # bigger than the bucket: charged the capacity
        bucket.adjust(50)  # the answer used 50 more than charged: the balance goes negative
        start = time.monotonic()
        await bucket.acquire(10)
        return charged, time.monotonic() - start

    charged, waited = asyncio.run(main())
    assert charged == 100
    assert waited >= 0.5  # 50 owed + 10 wanted at 100/s


def test_retry_after_forms():
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after({"retry-after": date}) <= 31
    assert retry_after({}) is None
    assert retry_after({"retry-after": "soon"}) is None


def test_prices_and_cost():
    assert price_for("gpt-4o-mini-2024-07-18") == (0.15, 0.60)
    assert price_for("gpt-4o") == (2.50, 10.0)
    assert price_for("llama3.1:8b") is None
    assert price_for("llama3.1:8b", 0.1, 0.2) == (0.1, 0.2)
    assert price_for("gpt-4o", price_output=1.0) == (2.50, 1.0)
    assert cost_usd(1_000_000, 500_000, (2.0, 8.0)) == 6.0
    assert cost_usd(10, 10, None) is None


def test_estimate_and_redaction():
    assert estimate_tokens({"messages": [{"content": "x" * 400}], "max_tokens": 10}) == 110
    assert redact_url("https://user:secret@example.com:8443/v1?api-key=abc") == "https://example.com:8443/v1"


def test_api_key_resolution(monkeypatch):
    assert resolve_api_key("OPENAI_API_KEY", "http://localhost:8000/v1") == "not-needed"
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        resolve_api_key("OPENAI_API_KEY", "https://api.openai.com/v1")
    monkeypatch.setenv("OTHER_KEY", "k-1")
    assert resolve_api_key("OTHER_KEY", "https://api.openai.com/v1") == "k-1"


def test_cache_persists_in_wal_mode(tmp_path):
    path = tmp_path / "cache" / "judge.sqlite"
    key = request_key(REQUEST)
    assert key == request_key(dict(reversed(list(REQUEST.items()))))  # key order does not matter
    with RequestCache(path) as cache:
        cache.put(key, {"text": "[[A]]"})
        # Visible to another connection before close: committed as written.
        other = sqlite3.connect(path)
        assert other.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 1
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        other.close()
    with RequestCache(path, readonly=True) as cache:
        assert cache.get(key) == {"text": "[[A]]"}
        assert key in cache and len(cache) == 1
    assert RequestCache(tmp_path / "missing.sqlite", readonly=True).get(key) is None
    assert not (tmp_path / "missing.sqlite").exists()
