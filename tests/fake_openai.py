"""A local OpenAI-compatible chat-completions server for tests and benchmarks.

It speaks real HTTP/1.1 (keep-alive, Content-Length bodies) on 127.0.0.1 through asyncio
streams, so one process sustains hundreds of concurrent connections. Behaviour is scriptable:

- ``policy(request) -> str | Reply``: the answer to a request (``request`` is the JSON body);
- ``failures``: replies served first, one per request, before the policy (e.g. a 429 with
  ``Retry-After`` then a 500);
- ``fail_after``: every request after the N-th answers 500 (an endpoint that goes down);
- ``delay``: seconds before each answer (latency of a real model).

Every request is recorded (arrival time, body, headers, status answered). ``GET /stats``
returns the request count, for a server run in another process
(``python tests/fake_openai.py --delay 0.1`` prints ``PORT <n>`` and serves until killed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

_VERDICT = re.compile(r"\b(A|B|tie)\b")


@dataclass
class Reply:
    """One scripted answer: a completion (``content``) or an HTTP error (``status`` >= 400)."""

    content: str | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int = 7


@dataclass
class Recorded:
    time: float
    body: dict[str, Any]
    headers: dict[str, str]
    status: int = 200


def user_text(request: dict[str, Any]) -> str:
    """All message contents of a request joined (what a policy inspects)."""
    return "\n".join(str(m.get("content", "")) for m in request.get("messages", []))


def wants_json(request: dict[str, Any]) -> bool:
    fmt = request.get("response_format") or {}
    return fmt.get("type") in ("json_object", "json_schema")


def verdict_reply(verdict: str, request: dict[str, Any]) -> str:
    """The verdict as JSON when the request asked for JSON, else in the ``[[A]]`` convention."""
    if wants_json(request):
        return json.dumps({"reasoning": "compared both", "verdict": verdict})
    return f"Both answer the question. Final verdict: [[{'C' if verdict == 'tie' else verdict}]]"


def always(verdict: str) -> Callable[[dict[str, Any]], str]:
    return lambda request: verdict_reply(verdict, request)


def prefer_texts(preferred: Iterable[str], others: Iterable[str]) -> Callable[[dict[str, Any]], str]:
    """A judge that always picks whichever presented response is in ``preferred``."""
    good, bad = list(preferred), list(others)

    def policy(request: dict[str, Any]) -> str:
        text = user_text(request)
        pos_good = min((text.find(t) for t in good if t in text), default=-1)
        pos_bad = min((text.find(t) for t in bad if t in text), default=-1)
        if pos_good < 0 or pos_bad < 0:
            return verdict_reply("tie", request)
        return verdict_reply("A" if pos_good < pos_bad else "B", request)

    return policy


class FakeOpenAI:
    """The server; ``with FakeOpenAI(...) as server:`` runs it in a thread, ``server.base_url``."""

    def __init__(
        self,
        policy: Callable[[dict[str, Any]], str | Reply] | None = None,
        *,
        delay: float = 0.0,
        failures: Iterable[Reply] = (),
        fail_after: int | None = None,
        record_bodies: bool = True,
    ) -> None:
        self.policy = policy or always("A")
        self.delay = delay
        self.failures: deque[Reply] = deque(failures)
        self.fail_after = fail_after
        self.record_bodies = record_bodies
        self.requests: list[Recorded] = []
        self.count = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> FakeOpenAI:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run_thread, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop.close()

    async def _shutdown(self) -> None:
        """Close the listener and every open connection, so nothing outlives the loop."""
        if self._server is not None:
            self._server.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def _run_thread(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self.start())
        ready.set()
        self._loop.run_forever()

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    # -- HTTP ------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while True:
                    raw = await reader.readline()
                    if raw in (b"\r\n", b"\n", b""):
                        break
                    key, _, value = raw.decode("latin-1").partition(":")
                    headers[key.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                body = await reader.readexactly(length) if length else b""
                status, extra, payload = await self._dispatch(method, path, headers, body)
                self._write(writer, status, extra, payload)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _write(writer: asyncio.StreamWriter, status: int, headers: dict[str, str], payload: bytes) -> None:
        head = [f"HTTP/1.1 {status} {'OK' if status < 400 else 'Error'}", "Content-Type: application/json"]
        head += [f"Content-Length: {len(payload)}", "Connection: keep-alive"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)

    async def _dispatch(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if method == "GET" and path.rstrip("/").endswith("/stats"):
            return 200, {}, json.dumps({"requests": self.count}).encode()
        if method != "POST" or not path.rstrip("/").endswith("/chat/completions"):
            return 404, {}, json.dumps({"error": {"message": f"no route {method} {path}"}}).encode()
        request = json.loads(body or b"{}")
        with self._lock:
            self.count += 1
            n = self.count
            reply = self.failures.popleft() if self.failures else None
        if reply is None and self.fail_after is not None and n > self.fail_after:
            reply = Reply(status=500)
        if reply is None:
            answer = self.policy(request)
            reply = answer if isinstance(answer, Reply) else Reply(content=answer)
        record = Recorded(time.monotonic(), request if self.record_bodies else {}, headers, reply.status)
        self.requests.append(record)
        delay = self.delay if reply.delay is None else reply.delay
        if delay:
            await asyncio.sleep(delay)
        if reply.status >= 400:
            err = {"error": {"message": f"scripted {reply.status}", "type": "server_error", "code": None}}
            return reply.status, reply.headers, json.dumps(err).encode()
        return 200, reply.headers, json.dumps(self._completion(request, reply)).encode()

    @staticmethod
    def _completion(request: dict[str, Any], reply: Reply) -> dict[str, Any]:
        prompt_tokens = reply.prompt_tokens
        if prompt_tokens is None:
            prompt_tokens = max(1, len(user_text(request)) // 4)
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": reply.content},
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "total_tokens": prompt_tokens + reply.completion_tokens,
            },
        }


def main() -> None:
    """Serve in this process (benchmarks): always answers verdict A after ``--delay`` seconds."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.1)
    args = parser.parse_args()
    server = FakeOpenAI(always("A"), delay=args.delay, record_bodies=False)

    async def serve() -> None:
        await server.start(args.port)
        print(f"PORT {server.port}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
