"""The judge stage against a real OpenAI-compatible server on 127.0.0.1 (tests/fake_openai.py),
on real HH-RLHF and LLMBar pairs."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefcurate.errors import StageFailed
from prefcurate.shards import Manifest, read_table
from prefcurate.stages.judge import DryRunDone, JudgeConfig, JudgeStage
from prefcurate.stages.judge_session import Answer, Plan
from tests.conftest import REPO, hh_rows, llmbar_rows, make_stage_dir
from tests.fake_openai import FakeOpenAI, Reply, always, prefer_texts, user_text, verdict_reply, wants_json

SENTINEL = "sk-SENTINEL-3f9a1c77e2"


def hh_pairs(n: int) -> list[dict]:
    """Real HH-RLHF pairs: the last Assistant turn is the response, the rest the prompt."""
    out = []
    for row in hh_rows(4 * n):
        head, _, chosen = row["chosen"].rpartition("\n\nAssistant:")
        _, _, rejected = row["rejected"].rpartition("\n\nAssistant:")
        chosen, rejected = chosen.strip(), rejected.strip()
        if chosen and rejected and chosen not in rejected and rejected not in chosen:
            out.append({"prompt": head.strip(), "chosen": chosen, "rejected": rejected})
    return out[:n]


def llmbar_pairs(n: int) -> list[dict]:
    """Real LLMBar pairs (label says which output is better) whose texts can be told apart:
    neither response occurs inside the other or in the prompt (the fake judge finds them)."""
    out = []
    for r in llmbar_rows("natural"):
        pair = {"prompt": r["input"], "chosen": r[f"output_{r['label']}"], "rejected": r[f"output_{3 - r['label']}"]}
        c, j, p = pair["chosen"], pair["rejected"], pair["prompt"]
        if c and j and c not in j and j not in c and c not in p and j not in p:
            out.append(pair)
    return out[:n]


def stage_dir(tmp_path: Path, pairs: list[dict], name: str = "in") -> Path:
    return make_stage_dir(tmp_path / name, pairs)


def judge(inp: Path, out: Path, server: FakeOpenAI, fresh: bool = False, **options):
    config = JudgeConfig(model="judge-test", base_url=server.base_url, backoff=0.01, **options)
    manifest, _ = JudgeStage(config).run(inp, out, fresh=fresh)
    return manifest, read_table(out).to_pylist()


def responses_in_order(request: dict, pair: dict) -> tuple[str, str]:
    text = user_text(request)
    first_chosen = text.find(pair["chosen"]) < text.find(pair["rejected"])
    return ("chosen", "rejected") if first_chosen else ("rejected", "chosen")


def test_both_orders_are_requested(tmp_path):
    pairs = hh_pairs(6)
    with FakeOpenAI(always("A")) as server:
        manifest, rows = judge(stage_dir(tmp_path, pairs), tmp_path / "out", server)
    assert server.count == 12
    for pair in pairs:
        orders = {responses_in_order(r.body, pair) for r in server.requests if pair["chosen"] in user_text(r.body)}
        assert orders == {("chosen", "rejected"), ("rejected", "chosen")}
    # A judge that always says "A" is pure position bias: half credit, never consistent.
    assert {r["judge_pref"] for r in rows} == {0.5}
    assert all(r["judge_consistent"] is False and r["judge_votes"] == ["A", "A"] for r in rows)
    assert manifest.extra["requests"] == 12 and manifest.extra["consistent_share"] == 0.0


@pytest.mark.parametrize(
    ("policy", "pref", "consistent", "votes"),
    [
        ("chosen", 1.0, True, ["A", "B"]),
        ("rejected", 0.0, True, ["B", "A"]),
        ("tie", 0.5, True, ["tie", "tie"]),
        ("B", 0.5, False, ["B", "B"]),
    ],
)
def test_swap_arithmetic(tmp_path, policy, pref, consistent, votes):
    pairs = llmbar_pairs(5)
    chosen, rejected = [p["chosen"] for p in pairs], [p["rejected"] for p in pairs]
    policies = {"chosen": prefer_texts(chosen, rejected), "rejected": prefer_texts(rejected, chosen)}
    with FakeOpenAI(policies.get(policy) or always(policy)) as server:
        _, rows = judge(stage_dir(tmp_path, pairs), tmp_path / "out", server)
    assert [r["judge_pref"] for r in rows] == [pref] * 5
    assert [r["judge_consistent"] for r in rows] == [consistent] * 5
    assert all(r["judge_votes"] == votes and r["judge_error"] is None for r in rows)
    assert all(r["judge_model"] == "judge-test" for r in rows)


def test_no_swap_asks_once(tmp_path):
    pairs = llmbar_pairs(4)
    with FakeOpenAI(prefer_texts([p["chosen"] for p in pairs], [p["rejected"] for p in pairs])) as server:
        _, rows = judge(stage_dir(tmp_path, pairs), tmp_path / "out", server, swap=False)
    assert server.count == 4
    assert all(
        responses_in_order(r.body, p) == ("chosen", "rejected") for r, p in zip(server.requests, pairs, strict=False)
    )
    assert [(r["judge_pref"], r["judge_consistent"], r["judge_votes"]) for r in rows] == [(1.0, None, ["A"])] * 4


def test_custom_template_and_verdict_patterns(tmp_path):
    """A paper's prompt used as written: free-text 'Output (a)/(b)' answers, no JSON."""
    template = tmp_path / "llmbar.j2"
    template.write_text(
        "Instruction: {{ prompt }}\n\nOutput (a): {{ response_a }}\n\nOutput (b): {{ response_b }}\n\n"
        "Which is better, Output (a) or Output (b)? Do NOT output any other words.\n"
    )
    pairs = llmbar_pairs(4)
    chosen = [p["chosen"] for p in pairs]

    def policy(request: dict) -> str:
        text = user_text(request)
        a = text.split("Output (a): ", 1)[1].split("\n\nOutput (b): ", 1)[0]
        return "Output (a)" if a in chosen else "Output (b)"

    with FakeOpenAI(policy) as server:
        _, rows = judge(
            stage_dir(tmp_path, pairs), tmp_path / "out", server,
            template=template, verdict_a=r"Output \(a\)", verdict_b=r"Output \(b\)", verdict_tie="(?i)tie",
        )  # fmt: skip
    bodies = [r.body for r in server.requests]  # in the order they arrived, which concurrency decides
    assert all("response_format" not in body for body in bodies)  # JSON mode is off for a user template
    prompt = template.read_text().rstrip("\n").replace("{{ prompt }}", "User: " + pairs[0]["prompt"])
    for a, b in (("chosen", "rejected"), ("rejected", "chosen")):  # the pair in both orders, as written
        expected = prompt.replace("{{ response_a }}", pairs[0][a]).replace("{{ response_b }}", pairs[0][b])
        assert [{"role": "user", "content": expected}] in [body["messages"] for body in bodies]
    assert [r["judge_pref"] for r in rows] == [1.0] * 4
    assert rows[0]["judge_votes"] == ["A", "B"]


def test_bad_template_is_a_config_error(tmp_path, cli):
    template = tmp_path / "t.j2"
    template.write_text("Compare {{ response_a }} with {{ answer_b }}")
    inp = stage_dir(tmp_path, llmbar_pairs(2))
    result = cli(
        "judge", inp, "-o", tmp_path / "out", "-m", "x", "--base-url", "http://127.0.0.1:9/v1", "--template", template
    )
    assert result.exit_code == 2
    assert "template" in result.stderr and "does not use response_b" in result.stderr
    for bad in (["--verdict-a", "(unclosed"], ["--api-key-env", "sk-abc123"]):
        result = cli("judge", inp, "-o", tmp_path / "out", "-m", "x", *bad)
        assert result.exit_code == 2 and bad[0].lstrip("-").replace("-", "_") in result.stderr
        assert "sk-abc123" not in result.stderr


def test_json_mode_parses_fenced_json_and_sends_schema(tmp_path):
    pairs = llmbar_pairs(3)

    def policy(request: dict) -> str:
        assert wants_json(request)
        return '```json\n{"reasoning": "B is more accurate", "verdict": "Response B"}\n```'

    with FakeOpenAI(policy) as server:
        _, rows = judge(stage_dir(tmp_path, pairs), tmp_path / "out", server, rationale=True, json_schema=True)
    fmt = server.requests[0].body["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["schema"]["properties"]["verdict"]["enum"] == ["A", "B", "tie"]
    assert all(r["judge_votes"] == ["B", "B"] and r["judge_pref"] == 0.5 for r in rows)
    assert rows[0]["judge_rationale"] == ["B is more accurate"] * 2


def test_retries_on_429_and_500(tmp_path):
    failures = [Reply(status=429, headers={"Retry-After": "0.3"}), Reply(status=500)]
    with FakeOpenAI(always("tie"), failures=failures) as server:
        manifest, rows = judge(stage_dir(tmp_path, llmbar_pairs(1)), tmp_path / "out", server, swap=False)
    assert [r.status for r in server.requests] == [429, 500, 200]
    assert server.requests[1].time - server.requests[0].time >= 0.28  # Retry-After honoured
    assert rows[0]["judge_error"] is None and rows[0]["judge_votes"] == ["tie"]
    assert manifest.extra["retries"] == 2 and manifest.extra["requests"] == 1 and manifest.extra["attempts"] == 3


def test_failed_calls_mark_rows_and_are_not_cached(tmp_path):
    pairs = llmbar_pairs(4)
    inp = stage_dir(tmp_path, pairs)
    doomed = pairs[0]["chosen"]

    def failing(request: dict) -> str | Reply:
        # The server fails every time on pair 0 shown chosen-first; everything else succeeds.
        if responses_in_order(request, pairs[0]) == ("chosen", "rejected") and doomed in user_text(request):
            return Reply(status=500)
        return verdict_reply("A", request)

    with FakeOpenAI(failing) as server:
        manifest, rows = judge(inp, tmp_path / "out", server, max_retries=1)
        assert server.count == 8 + 1  # one retry of the doomed request
        errors = [r["judge_error"] for r in rows]
        assert errors[0].startswith("chosen-first: 500") and errors[1:] == [None] * 3
        assert rows[0]["judge_pref"] is None and rows[0]["judge_consistent"] is None
        assert rows[0]["judge_votes"] == [None, "A"]
        assert manifest.extra["errors"] == 1 and manifest.extra["failed"] == 1 and manifest.rows_out == 4
        server.policy = always("A")  # the endpoint recovers
        _, rows = judge(inp, tmp_path / "out", server, fresh=True)
    assert server.count == 9 + 1  # only the failed request is asked again
    assert all(r["judge_error"] is None for r in rows)


def test_unparseable_answers_are_errors_and_not_cached(tmp_path):
    pairs = llmbar_pairs(4)
    inp = stage_dir(tmp_path, pairs)
    hedge = pairs[1]["chosen"]

    def policy(request: dict) -> str:
        return "I cannot decide." if hedge in user_text(request) else verdict_reply("A", request)

    with FakeOpenAI(policy) as server:
        manifest, rows = judge(inp, tmp_path / "out", server, drop_errors=True)
        assert manifest.rows_in == 4 and manifest.rows_out == 3 and manifest.rows_rejected == 1
        assert manifest.reject_reasons == {"judge-error": 1}
        rejected = read_table(tmp_path / "out", subdir="rejects").to_pylist()
        assert "unparseable" in rejected[0]["judge_error"] and rejected[0]["id"] == read_table(inp)["id"][1].as_py()
        assert manifest.extra["unparseable"] == 2
        judge(inp, tmp_path / "out", server, fresh=True, drop_errors=True)
    assert server.count == 8 + 2  # the two unparseable answers are asked again, the rest are cached


def test_interrupted_run_resumes_without_repeating(tmp_path):
    pairs = hh_pairs(20)
    inp = stage_dir(tmp_path, pairs)
    with FakeOpenAI(always("A"), fail_after=15) as server:
        with pytest.raises(StageFailed, match="in a row failed"):
            judge(inp, tmp_path / "out", server, max_retries=0, abort_after=4, concurrency=4)
        assert not (tmp_path / "out").exists()
        sent, server.fail_after = server.count, None  # the endpoint comes back
        manifest, rows = judge(inp, tmp_path / "out", server)
    assert server.count - sent == 40 - 15
    assert manifest.extra["cache_hits"] == 15 and len(rows) == 20


def test_killed_process_resumes_without_repeating(tmp_path):
    """SIGKILL mid-run: every answer received before the kill is in the cache."""
    inp = stage_dir(tmp_path, hh_pairs(30))
    env = {**os.environ, "OPENAI_API_KEY": SENTINEL, "PREFCURATE_QUIET": "1"}
    with FakeOpenAI(always("B"), delay=0.05) as server:
        cmd = [sys.executable, "-m", "prefcurate", "judge", str(inp), "-o", str(tmp_path / "out"), "-m", "judge-test",
               "--base-url", server.base_url, "--concurrency", "2"]  # fmt: skip
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while server.count < 20 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log = proc.stderr.read().decode()
        proc.stderr.close()
        sent_before = server.count
        assert 20 <= sent_before < 60, log
        with sqlite3.connect(tmp_path / "cache" / "judge.sqlite") as db:
            cached = db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
        assert cached >= sent_before - 2  # at most the requests in flight at the kill were lost
        manifest, rows = judge(inp, tmp_path / "out", server)
    assert server.count - sent_before == 60 - cached
    assert len(rows) == 30 and all(r["judge_votes"] == ["B", "B"] for r in rows)


def test_relabel_flips_pairs_the_judge_consistently_rejects(tmp_path):
    pairs = llmbar_pairs(6)
    # The judge agrees with the labels on the first 4 pairs and prefers "rejected" on the last 2.
    good = [p["chosen"] for p in pairs[:4]] + [p["rejected"] for p in pairs[4:]]
    bad = [p["rejected"] for p in pairs[:4]] + [p["chosen"] for p in pairs[4:]]
    inp = stage_dir(tmp_path, pairs)
    with FakeOpenAI(prefer_texts(good, bad)) as server:
        _, annotated = judge(inp, tmp_path / "a", server)
        _, relabelled = judge(inp, tmp_path / "b", server, relabel=True)
    assert [r["judge_pref"] for r in annotated] == [1.0] * 4 + [0.0] * 2
    assert not any(r["flipped"] for r in annotated)
    assert [r["flipped"] for r in relabelled] == [False] * 4 + [True] * 2
    assert [r["judge_pref"] for r in relabelled] == [1.0] * 6
    for row, pair in zip(relabelled, pairs, strict=True):
        winner = pair["rejected"] if row["flipped"] else pair["chosen"]
        assert row["chosen"][0]["content"] == winner


def test_rating_method(tmp_path):
    pairs = llmbar_pairs(4)
    chosen = {p["chosen"] for p in pairs}

    def policy(request: dict) -> str:
        text = user_text(request)
        response = text.split("[Response]\n", 1)[1].split("\n[End of Response]", 1)[0]
        score = 8 if response in chosen else 3
        if wants_json(request):
            return json.dumps({"helpfulness": score, "honesty": 9, "instruction_following": score, "truthfulness": 9})
        return f"helpfulness: {score}\nhonesty: 9\ninstruction following: {score}\ntruthfulness: 9"

    for json_mode in (True, False):
        with FakeOpenAI(policy) as server:
            _, rows = judge(stage_dir(tmp_path, pairs, f"in{json_mode}"), tmp_path / f"out{json_mode}", server,
                            method="rating", json_mode=json_mode)  # fmt: skip
        assert server.count == 8  # each response rated on its own
        assert [(r["judge_pref"], r["judge_votes"]) for r in rows] == [(1.0, ["A"])] * 4
        assert rows[0]["judge_chosen_score"] == 8.5 and rows[0]["judge_rejected_score"] == 6.0


def any_judge(request: dict) -> str:
    """A verdict for a pairwise request, ratings for a rating request."""
    if "[Response]" in user_text(request):
        return json.dumps({"helpfulness": 7, "honesty": 8, "instruction_following": 7, "truthfulness": 8})
    return verdict_reply("A", request)


@pytest.mark.parametrize(
    "options",
    [{}, {"relabel": True, "drop_errors": True}, {"method": "rating", "rationale": True}, {"rationale": True}],
)
def test_empty_input_gets_the_judge_columns_and_sends_nothing(tmp_path, options):
    """An empty input writes the columns a judged batch writes, with the same types, so a
    later ``score -m judge`` or ``filter --drop-judge-inconsistent`` runs; nothing is sent."""
    from prefcurate.shards import read_schema
    from prefcurate.stages.filter import FilterConfig, FilterStage
    from prefcurate.stages.score import ScoreConfig, ScoreStage

    empty = stage_dir(tmp_path, [], "empty")
    with FakeOpenAI(any_judge) as server:
        manifest, rows = judge(empty, tmp_path / "out-empty", server, **options)
        assert server.count == 0 and rows == [] and manifest.rows_out == 0
        assert manifest.extra["requests"] == 0
        judge(stage_dir(tmp_path, llmbar_pairs(2)), tmp_path / "out-full", server, **options)
        assert server.count > 0
    schema = read_schema(tmp_path / "out-empty")
    assert schema is not None and "judge_pref" in schema.names and "judge_consistent" in schema.names
    assert schema == read_schema(tmp_path / "out-full")
    FilterStage(FilterConfig(drop_judge_inconsistent=True)).run(tmp_path / "out-empty", tmp_path / "filtered")
    ScoreStage(ScoreConfig(member=["judge"])).run(tmp_path / "out-empty", tmp_path / "scored")
    assert "margin__judge" in read_schema(tmp_path / "scored").names


def test_usage_and_cost_in_manifest(tmp_path):
    pairs = llmbar_pairs(3)
    with FakeOpenAI(lambda r: Reply(content=verdict_reply("A", r), prompt_tokens=1000, completion_tokens=10)) as server:
        manifest, _ = judge(stage_dir(tmp_path, pairs), tmp_path / "out", server, price_input=2.0, price_output=8.0)
    extra = Manifest.load(tmp_path / "out").extra
    assert extra["prompt_tokens"] == 6000 and extra["completion_tokens"] == 60
    assert extra["cost_usd"] == pytest.approx((6000 * 2.0 + 60 * 8.0) / 1e6)
    assert extra["model"] == "judge-test" and extra["base_url"] == server.base_url
    assert extra["requests"] == 6 and extra["cache_hits"] == 0 and extra["errors"] == 0


def test_dry_run_counts_calls_and_sends_nothing(tmp_path, cli):
    pairs = llmbar_pairs(5)
    inp = stage_dir(tmp_path, pairs)
    with FakeOpenAI(always("A")) as server:
        args = ("judge", inp, "-o", tmp_path / "out", "-m", "gpt-4o-mini", "--base-url", server.base_url)
        result = cli(*args, "--dry-run")
        assert result.exit_code == 0, result.stderr
        assert server.count == 0 and not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
        line = result.stderr.strip()
        assert "\n" not in line and "10 calls" in line and "$" in line
        assert cli(*args, "--no-swap").exit_code == 0  # half of them, now cached
        assert "5 calls" in cli(*args, "--dry-run").stderr and "5 more cached" in cli(*args, "--dry-run").stderr
    with pytest.raises(DryRunDone) as done:
        JudgeStage(JudgeConfig(model="x", base_url=server.base_url, dry_run=True)).run(inp, tmp_path / "o2")
    assert done.value.estimate["calls"] == 10 and done.value.estimate["cost_usd"] is None  # another model


def test_cli_run_and_key_never_written(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", SENTINEL)
    pairs = hh_pairs(8)
    inp = stage_dir(tmp_path, pairs)
    with FakeOpenAI(always("A"), failures=[Reply(status=500)] * 2) as server:
        result = cli("judge", inp, "-o", tmp_path / "out", "-m", "judge-test", "--base-url", server.base_url,
                     "--api-key-env", "JUDGE_KEY", "--rationale", "--max-retries=0", "--concurrency=1")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert server.requests[0].headers["authorization"] == f"Bearer {SENTINEL}"  # the key was used
    manifest = Manifest.load(tmp_path / "out")
    assert manifest.rows_in == manifest.rows_out + manifest.rows_rejected == 8
    assert manifest.params["api_key_env"] == "JUDGE_KEY"
    files = [p for p in tmp_path.rglob("*") if p.is_file() and "home" not in p.parts]
    assert any(p.suffix == ".sqlite" for p in files) and any(p.name == "manifest.json" for p in files)
    for path in files:
        assert SENTINEL.encode() not in path.read_bytes(), path
    assert SENTINEL not in result.stdout + result.stderr


def test_auth_error_stops_with_hint(tmp_path, cli):
    inp = stage_dir(tmp_path, llmbar_pairs(2))
    with FakeOpenAI(lambda r: Reply(status=401)) as server:
        result = cli("judge", inp, "-o", tmp_path / "out", "-m", "judge-test", "--base-url", server.base_url)
    assert result.exit_code == 1
    assert "401" in result.stderr and "$OPENAI_API_KEY" in result.stderr
    assert not (tmp_path / "out").exists()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: bound, then closed (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_judge_process(tmp_path: Path, inp: Path, base_url: str, *options: str) -> tuple[int, str, float]:
    """The real command in its own process, as a user runs it: (exit code, stderr, seconds).
    A separate process, so that whatever asyncio prints at exit or collection is seen too."""
    env = {**os.environ, "PREFCURATE_QUIET": "1"}
    cmd = [sys.executable, "-m", "prefcurate", "judge", str(inp), "-o", str(tmp_path / "out"), "-m", "judge-test",
           "--base-url", base_url, *options]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr, time.monotonic() - started


def test_unreachable_endpoint_fails_fast_in_one_line(tmp_path):
    """Connection refused before the endpoint ever answered: the run stops after a couple of quick
    retries (not every request's full backoff, ~45 s), names the refusal (aiohttp's transport calls
    it a timeout), and nothing follows the error line (no unretrieved task tracebacks)."""
    inp = stage_dir(tmp_path, llmbar_pairs(40))
    url = f"http://127.0.0.1:{closed_port()}/v1"
    code, stderr, seconds = run_judge_process(tmp_path, inp, url, "--concurrency", "4")
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1, stderr
    assert lines[0].startswith(f"error: cannot connect to {url}: connection refused"), stderr
    assert "timed out" not in stderr
    assert seconds < 30, seconds  # the default backoff retries twice, ~1.5-3 s; it was ~45 s
    assert not (tmp_path / "out").exists()


def test_endpoint_failing_stops_the_run_in_one_line(tmp_path):
    """The endpoint answers the first batch (one answer slowly) and fails every other call: the
    later batches fail while the first is still waiting, the run stops after --abort-after
    failures in a row with one line, and the batches that failed meanwhile are awaited, not
    printed after it as unretrieved task tracebacks."""
    pairs = llmbar_pairs(40)
    inp = stage_dir(tmp_path, pairs)
    first_batch = [p["chosen"] for p in pairs[:8]]  # the stage reads max(8, concurrency) rows a batch

    def policy(request: dict) -> str | Reply:
        text = user_text(request)
        if pairs[0]["chosen"] in text:
            return Reply(content=verdict_reply("A", request), delay=1.5)
        if any(chosen in text for chosen in first_batch):
            return verdict_reply("A", request)
        return Reply(status=500)

    with FakeOpenAI(policy) as server:
        code, stderr, _ = run_judge_process(
            tmp_path, inp, server.base_url, "--concurrency", "4", "--max-retries", "0", "--abort-after", "6"
        )
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1, stderr
    assert "6 calls in a row failed (last: 500" in lines[0], stderr
    assert not (tmp_path / "out").exists()


def test_unchanged_rerun_is_skipped_and_options_fingerprinted(tmp_path):
    pairs = llmbar_pairs(3)
    inp = stage_dir(tmp_path, pairs)
    with FakeOpenAI(always("A")) as server:
        judge(inp, tmp_path / "out", server)
        config = JudgeConfig(model="judge-test", base_url=server.base_url, backoff=0.01, concurrency=3)
        _, skipped = JudgeStage(config).run(inp, tmp_path / "out")  # concurrency does not change output
        assert skipped
        _, skipped = JudgeStage(config.model_copy(update={"rationale": True})).run(inp, tmp_path / "out")
        assert not skipped
    assert server.count == 12  # the rationale prompt differs: new requests


def test_recipe_validates(monkeypatch):
    from prefcurate.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "judge-local.yaml")
    (spec,) = [s for s in recipe.stages if s.name == "judge"]
    assert spec.config.base_url.startswith("http://localhost") and spec.config.swap


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["A", "B", "tie"]), min_size=2, max_size=2), st.text(max_size=40))
def test_swap_law_and_parsing(votes, noise):
    """Swapping chosen and rejected mirrors the preference (pref -> 1 - pref) and keeps
    consistency; every verdict survives rendering as JSON or in the [[X]] convention."""
    plan = Plan.from_config(JudgeConfig(model="m", base_url="http://127.0.0.1:9/v1"))
    # The same judge on the swapped pair sees the orders reversed: its votes come in reverse.
    forward = plan.combine([Answer(label=v) for v in votes])
    backward = plan.combine([Answer(label=v) for v in reversed(votes)])
    assert forward.pref + backward.pref == 1.0
    assert forward.consistent == backward.consistent
    for as_json in (True, False):
        request = {"response_format": {"type": "json_object"}} if as_json else {}
        text = noise.replace("[", "(") + "\n" + verdict_reply(votes[0], request)
        assert plan.parse(text).label == votes[0]


def test_a_template_failing_on_a_row_and_a_url_with_credentials_are_one_line(tmp_path, cli):
    template = tmp_path / "first.j2"  # fine for a prompt with messages, fails on an empty one
    template.write_text("Q: {{ prompt_messages[0].content }}\nA: {{ response_a }}\nB: {{ response_b }}\n")
    inp = stage_dir(tmp_path, [{"prompt": [], "chosen": "Paris is the capital.", "rejected": "Lyon is."}])
    with FakeOpenAI(always("A")) as server:
        result = cli(
            "judge", inp, "-o", tmp_path / "out", "-m", "x", "--base-url", server.base_url, "--template", template
        )
        assert result.exit_code == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "rendering a pair failed" in result.stderr
        assert not server.requests
        netloc = server.base_url.split("//", 1)[1]
        result = cli("judge", inp, "-o", tmp_path / "out", "-m", "x", "--base-url", f"http://user:pw@{netloc}")
        assert result.exit_code == 2 and "credentials in the URL" in result.stderr and "pw" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not server.requests
    assert not (tmp_path / "out").exists()
