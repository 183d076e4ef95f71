"""ingest on hostile input: bytes that are not UTF-8, lone surrogates, date-like strings, NaN
ratings, misleading first rows, malformed CSV rows, a pretty-printed .json object, and the
``raw`` text of rejects. Every input is written by hand here; every test runs the stage."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefcurate.schema import pair_id
from prefcurate.shards import read_table
from prefcurate.stages import ingest_read
from tests.conftest import write_jsonl
from tests.test_ingest import bot, run_ingest, transcript, user


def _lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _reasons(rejects: list[dict]) -> list[tuple[int | None, str]]:
    return sorted(((r["source_row"], r["reject_reason"]) for r in rejects), key=lambda t: (t[0] is None, t[0] or 0))


def _one_line_error(result, *parts: str) -> None:
    assert result.exit_code == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for part in parts:
        assert part in result.stderr, result.stderr


# -- 1. bytes that are not UTF-8 in a JSON Lines block ----------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        b'{"prompt": "a\xff\xfeb", "chosen": "c", "rejected": "r"}',  # in a value
        b'{"prompt": "a", "chosen": "c", "rejected": "r", "n\xffote": "x"}',  # in a key
        b'{"prompt": "a", "chosen": "c\xed\xb0\x80", "rejected": "r"}',  # an encoded lone surrogate
    ],
)
def test_invalid_utf8_line_is_undecodable_and_the_rest_of_the_block_is_kept(cli, tmp_path, bad):
    good = [json.dumps({"prompt": f"q{i} é", "chosen": f"c{i}", "rejected": f"r{i}"}).encode() for i in range(4)]
    src = _lines(tmp_path / "bytes.jsonl", [good[0], good[1], bad, good[2], good[3]])
    manifest, rows, rejects = run_ingest(cli, src)
    assert _reasons(rejects) == [(3, "undecodable")]
    assert rejects[0]["raw"] == bad.decode("utf-8", "backslashreplace")  # the line, bad bytes as \xNN
    assert [r["prompt"] for r in rows] == [user(f"q{i} é") for i in range(4)]
    assert manifest.rows_in == 5


def test_invalid_utf8_in_a_parquet_string_is_a_reject_naming_the_column(cli, tmp_path):
    offsets = np.array([0, 4, 6, 8], dtype=np.int32)
    prompts = pa.Array.from_buffers(pa.string(), 3, [None, pa.py_buffer(offsets), pa.py_buffer(b"ab\xffcp2p3")])
    table = pa.table({"prompt": prompts, "chosen": ["a1", "a2", "a3"], "rejected": ["b1", "b2", "b3"]})
    pq.write_table(table, tmp_path / "bad.parquet")
    _, rows, rejects = run_ingest(cli, tmp_path / "bad.parquet")
    assert _reasons(rejects) == [(1, "undecodable:prompt")]
    assert json.loads(rejects[0]["raw"]) == {"prompt": "ab\\xffc", "chosen": "a1", "rejected": "b1"}
    assert [r["prompt"] for r in rows] == [user("p2"), user("p3")]


# -- 2. strings that look like dates stay text --------------------------------------------------


def test_date_like_strings_stay_text_exactly(cli, tmp_path):
    raw = [
        {"prompt": "When?", "chosen": "2001-01-01", "rejected": "2000-01-01"},
        {"id": "2024-01-01", "prompt": "a", "chosen": "b", "rejected": "c"},
        {"id": "2024-01-02T10:00:00", "prompt": "d", "chosen": "1999-12-31 23:59:59", "rejected": "e"},
    ]
    _, rows, rejects = run_ingest(cli, write_jsonl(tmp_path / "dates.jsonl", raw))
    assert not rejects
    got = [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]
    assert got == [(r["prompt"], r["chosen"], r["rejected"]) for r in raw]
    assert rows[0]["id"] == pair_id(user("When?"), bot("2001-01-01"), bot("2000-01-01"))
    assert [r["id"] for r in rows[1:]] == ["2024-01-01", "2024-01-02T10:00:00"]


def test_date_like_strings_in_messages_and_pairwise_outputs_stay_text(cli, tmp_path):
    chat = [{"prompt": user("Date?"), "chosen": bot("2020-02-02"), "rejected": bot("2020-02-03 10:00")}]
    _, rows, rejects = run_ingest(cli, write_jsonl(tmp_path / "chat.jsonl", chat))
    assert not rejects and rows[0]["chosen"] == bot("2020-02-02") and rows[0]["rejected"] == bot("2020-02-03 10:00")
    pairwise = [{"input": "Day?", "output_1": "2021-03-04", "output_2": "2021-03-05", "label": 2}]
    _, rows, rejects = run_ingest(cli, write_jsonl(tmp_path / "pw.jsonl", pairwise), out=Path("o2"))
    assert not rejects and (rows[0]["chosen"], rows[0]["rejected"]) == (bot("2021-03-05"), bot("2021-03-04"))


def test_date_like_fields_across_blocks_and_a_field_that_changes_type(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(ingest_read, "BLOCK_BYTES", 300)  # many blocks: later ones read the field as text at once
    raw = [
        {"id": f"2024-01-{1 + i % 28:02d}", "prompt": f"p{i}", "chosen": "2001-01-01", "rejected": f"r{i}"}
        for i in range(40)
    ]
    for i in range(30, 40):
        raw[i]["id"] = 1000 + i  # a later block where the field holds numbers
    raw[35]["rejected"] = "2001-01-01"  # a reject in a block read with the remembered schema
    _, rows, rejects = run_ingest(cli, write_jsonl(tmp_path / "blocks.jsonl", raw))
    kept = [r for i, r in enumerate(raw) if i != 35]
    assert [r["id"] for r in rows] == [str(r["id"]) for r in kept]
    assert {r["chosen"][0]["content"] for r in rows} == {"2001-01-01"}
    assert _reasons(rejects) == [(36, "identical-responses")]
    assert rejects[0]["raw"] == json.dumps(raw[35])


# -- 3. lone surrogates ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["s.json", "s.jsonl"])
def test_lone_surrogate_is_an_undecodable_reject_naming_the_field(cli, tmp_path, name):
    rows_in = [
        '{"prompt": "ok", "chosen": "a", "rejected": "b"}',
        '{"prompt": "x\\udc00y", "chosen": "a", "rejected": "b"}',
        '{"prompt": "ok2", "chosen": [{"role": "assistant", "content": "\\ud800"}], "rejected": "b"}',
    ]
    src = tmp_path / name
    src.write_text(("[" + ",\n".join(rows_in) + "]") if name.endswith(".json") else "\n".join(rows_in) + "\n")
    _, rows, rejects = run_ingest(cli, src)
    assert [r["prompt"] for r in rows] == [user("ok")]
    assert _reasons(rejects) == [(2, "undecodable:prompt"), (3, "undecodable:chosen")]
    by_row = {r["source_row"]: r["raw"] for r in rejects}
    assert "\\udc00" in by_row[2] and json.loads(by_row[2])["prompt"] == "x\udc00y"
    strict = cli("ingest", src, "-o", "strict", "--strict")
    _one_line_error(strict, f"{name}, row 2, field 'prompt'", "undecodable")


# -- 4. NaN and infinite ratings -------------------------------------------------------------


def test_nan_and_infinite_ratings_are_unrated(cli, tmp_path):
    raw = [
        {"prompt": "q1", "responses": ["r1", "r2", "r3"], "ratings": ["nan", 5, 3]},
        {"prompt": "q2", "responses": ["r1", "r2"], "ratings": ["inf", "-inf"]},
        {"prompt": "q3", "responses": ["r1", "r2", "r3"], "ratings": [2, "NaN", 2]},
    ]
    for rule in ("best-vs-worst", "best-vs-random", "all-pairs"):
        _, rows, rejects = run_ingest(cli, write_jsonl(tmp_path / "uf.jsonl", raw), "--binarize", rule, out=Path(rule))
        got = [(r["prompt"], r["chosen"], r["rejected"], r["chosen_rating"], r["rejected_rating"]) for r in rows]
        assert got[0] == (user("q1"), bot("r2"), bot("r3"), 5.0, 3.0)
        assert len(got) == 2 and got[1][:3] == (user("q3"), bot("r1"), bot("r3")) and rows[1]["tie"]
        assert _reasons(rejects) == [(2, "too-few-rated")]


def test_nan_scores_in_completions_and_pair_rows_are_no_rating(cli, tmp_path):
    def completion(text: str, score: float) -> dict:
        return {"response": text, "fine-grained_score": score, "overall_score": score}

    uf = [{"instruction": "i", "completions": [completion("x", float("nan")), completion("y", 4), completion("z", 1)]}]
    (tmp_path / "uf.jsonl").write_text(json.dumps(uf[0]) + "\n")  # json.dumps writes NaN, json.loads reads it
    _, rows, _ = run_ingest(cli, tmp_path / "uf.jsonl")
    assert [(r["chosen"], r["rejected"], r["chosen_rating"]) for r in rows] == [(bot("y"), bot("z"), 4.0)]
    pairs = pa.table(
        {"prompt": ["p", "q"], "chosen": ["a", "b"], "rejected": ["c", "d"], "score_chosen": [float("inf"), 2.0]}
    )
    pq.write_table(pairs, tmp_path / "pairs.parquet")  # the vectorized path
    _, rows, _ = run_ingest(cli, tmp_path / "pairs.parquet", out=Path("o2"))
    assert [r["chosen_rating"] for r in rows] == [None, 2.0]


# -- 5. detection past an empty first value ----------------------------------------------------


@pytest.mark.parametrize("name", ["hh.jsonl", "hh.json"])
def test_hh_rlhf_is_detected_past_an_empty_first_row(cli, tmp_path, name):
    convs = [
        ([*user("hi"), *bot("hello")], [*user("hi"), *bot("go away")]),
        ([*user("q"), *bot("a"), *user("more"), *bot("b")], [*user("q"), *bot("a"), *user("more"), *bot("no")]),
    ]
    raw = [{"chosen": "", "rejected": transcript(convs[0][1])}]
    raw += [{"chosen": transcript(c), "rejected": transcript(r)} for c, r in convs]
    src = tmp_path / name
    if name.endswith(".json"):
        src.write_text(json.dumps(raw))
    else:
        write_jsonl(src, raw)
    manifest, rows, rejects = run_ingest(cli, src)
    assert manifest.extra["files"][0]["format"] == "hh-rlhf"
    assert _reasons(rejects) == [(1, "empty:chosen")]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        (user("hi"), bot("hello"), bot("go away")),
        ([*user("q"), *bot("a"), *user("more")], bot("b"), bot("no")),
    ]


# -- 6. CSV row numbers around malformed rows ----------------------------------------------------


def test_csv_row_numbers_after_a_malformed_row(cli, tmp_path):
    path = tmp_path / "r.csv"
    path.write_text('prompt,chosen,rejected\np1,a1,b1\np2,a2\n"p3\nsecond line",a3,b3\n\np4,,b4\nq5,a5\n')
    _, rows, rejects = run_ingest(cli, path)
    assert [r["prompt"][0]["content"] for r in rows] == ["p1", "p3\nsecond line"]
    assert _reasons(rejects) == [(2, "undecodable"), (4, "empty:chosen"), (5, "undecodable")]
    assert {r["source_row"]: r["raw"] for r in rejects}[2] == "p2,a2"
    _one_line_error(cli("ingest", path, "-o", "strict", "--strict"), "r.csv, row 2", "wrong number of fields")
    # --strict stops at the first bad row in file order, whichever kind it is
    path.write_text("prompt,chosen,rejected\np1,a1,b1\np2,,b2\np3,a3\np4,a4,b4\n")
    _one_line_error(cli("ingest", path, "-o", "strict", "--strict"), "r.csv, row 2, field 'chosen'", "empty")


def test_csv_row_numbers_across_blocks(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(ingest_read, "BLOCK_BYTES", 256)  # many blocks; Arrow reports skipped rows a block ahead
    lines, expected = ["prompt,chosen,rejected"], []
    for n in range(1, 301):
        if n % 37 == 0:
            lines.append(f"p{n},a{n}")
            expected.append((n, "undecodable"))
        elif n % 11 == 0:
            lines.append(f'"p{n}\nmore",,b{n}')
            expected.append((n, "empty:chosen"))
        else:
            lines.append(f"p{n},a{n},b{n}")
    (tmp_path / "many.csv").write_text("\n".join(lines) + "\n")
    _, rows, rejects = run_ingest(cli, tmp_path / "many.csv")
    assert _reasons(rejects) == expected
    assert len(rows) == 300 - len(expected)


# -- 7. a .json holding one object over several lines ---------------------------------------------


def test_pretty_printed_json_object_is_a_one_line_error(cli, tmp_path):
    (tmp_path / "o.json").write_text('{"prompt": "p",\n "chosen": "a",\n "rejected": "b"}\n')
    _one_line_error(cli("ingest", tmp_path / "o.json", "-o", "out"), "o.json", "a JSON object over several lines")
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps({"meta": {"n": 3}, "data": rows}, indent=2))
    _one_line_error(cli("ingest", tmp_path / "d.json", "-o", "out"), "d.json", "not an array of objects", "'data'")
    (tmp_path / "one.json").write_text('{"data": [\n{"prompt": "p", "chosen": "c", "rejected": "r"}\n]}\n')
    _one_line_error(cli("ingest", tmp_path / "one.json", "-o", "out"), "one.json", "'data'")
    big = [{**rows[0], "chosen": "x" * 1000} for _ in range(100)]  # longer than the 64 KiB sniffed
    (tmp_path / "big.json").write_text(json.dumps({"data": big}, indent=1))
    _one_line_error(cli("ingest", tmp_path / "big.json", "-o", "out"), "big.json", "'data'")
    assert not Path("out").exists()


def test_empty_or_blank_json_file_is_zero_rows_like_an_empty_jsonl(cli, tmp_path):
    (tmp_path / "empty.json").write_bytes(b"")
    (tmp_path / "blank.json").write_bytes(b" \n\t\r\n  ")
    (tmp_path / "empty.json.gz").write_bytes(gzip.compress(b"", mtime=0))
    (tmp_path / "empty.jsonl").write_bytes(b"")
    # blank past the 64 KiB first read, then a real array: still read
    (tmp_path / "late.json").write_text(" " * (1 << 17) + '[{"prompt": "p", "chosen": "c", "rejected": "r"}]')
    names = ["blank.json", "empty.json", "empty.json.gz", "empty.jsonl", "late.json"]
    manifest, rows, rejects = run_ingest(cli, *(tmp_path / n for n in names))
    assert manifest.extra["records_read"] == {**dict.fromkeys(names[:4], 0), "late.json": 1}
    assert [r["prompt"] for r in rows] == [user("p")] and not rejects
    _one_line_error(cli("ingest", _lines(tmp_path / "x.json", [b"  hello"]), "-o", "out"), "x.json", "not a JSON array")


def test_json_lines_in_a_json_file_with_a_broken_first_line_still_ingest(cli, tmp_path):
    (tmp_path / "l.json").write_text('{"prompt": "p",\n{"prompt": "p2", "chosen": "c2", "rejected": "r2"}\n')
    _, rows, rejects = run_ingest(cli, tmp_path / "l.json")
    assert [r["prompt"] for r in rows] == [user("p2")]
    assert [(r["source_row"], r["reject_reason"], r["raw"]) for r in rejects] == [(1, "undecodable", '{"prompt": "p",')]


# -- 8. raw is the row as written ------------------------------------------------------------------


def test_raw_of_a_json_lines_reject_is_its_line_as_written(cli, tmp_path, monkeypatch):
    lines = [
        '{"prompt": "p1", "chosen": "c", "rejected": "r", "n": 3.5}',
        '{"prompt":"p2","chosen":"same","rejected":"same","x":1}',  # absent "n", int "x"
        '{"rejected": "r",   "prompt": "p3", "chosen": "",  "n": 3}',  # key order and spacing as written
        '{"prompt": "p4", "chosen": "c\\u00e9", "rejected": "r"}',
    ]
    fast = _lines(tmp_path / "fast.jsonl", [line.encode() for line in lines])
    _, rows, rejects = run_ingest(cli, fast)
    assert [(r["source_row"], r["raw"]) for r in rejects] == [(2, lines[1]), (3, lines[2])]
    # The same lines on the per-row path (a type change stops Arrow for the block) and on the
    # Arrow table path of another format (pairwise).
    (tmp_path / "slow.jsonl").write_text("\n".join([*lines, '{"prompt": 5, "chosen": "c", "rejected": "r"}']) + "\n")
    _, _, rejects = run_ingest(cli, tmp_path / "slow.jsonl", out=Path("o2"))
    assert [(r["source_row"], r["raw"]) for r in rejects][:2] == [(2, lines[1]), (3, lines[2])]
    pw = ['{"prompt": "q", "response_a": "A", "response_b": "B", "label": 7,  "extra": 1}', *lines[:0]]
    pw.append('{"prompt": "q2", "response_a": "A", "response_b": "B", "label": "a"}')
    _, rows, rejects = run_ingest(cli, _lines(tmp_path / "pw.jsonl", [x.encode() for x in pw]), out=Path("o3"))
    assert [(r["source_row"], r["reject_reason"], r["raw"]) for r in rejects] == [(1, "bad-value:label", pw[0])]


def test_raw_lines_across_gzip_blocks_and_crlf(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(ingest_read, "BLOCK_BYTES", 128)
    rows = [{"prompt": f"p{i}", "chosen": "c", "rejected": "c" if i % 7 == 3 else f"r{i}"} for i in range(30)]
    for i in range(0, 30, 2):
        rows[i]["n"] = i  # an int in some rows only
    lines = [json.dumps(r, separators=(",", ":")) for r in rows]  # not how json.dumps writes by default
    (tmp_path / "crlf.jsonl.gz").write_bytes(gzip.compress(("\r\n".join(lines) + "\r\n").encode(), mtime=0))
    _, kept, rejects = run_ingest(cli, tmp_path / "crlf.jsonl.gz")
    assert [(r["source_row"], r["raw"]) for r in rejects] == [(i + 1, lines[i]) for i in range(30) if i % 7 == 3]
    assert len(kept) == 30 - len(rejects)


# -- encodings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["u16.jsonl", "u16.json"])
def test_utf16_file_is_a_one_line_error(cli, tmp_path, name):
    (tmp_path / name).write_bytes('{"prompt": "p", "chosen": "c", "rejected": "r"}\n'.encode("utf-16"))
    _one_line_error(cli("ingest", tmp_path / name, "-o", "out"), name, "UTF-16")


def test_byte_order_marks_at_the_start_and_where_files_were_concatenated(cli, tmp_path):
    part = b'{"prompt": "p%d", "chosen": "c", "rejected": "r"}\n'
    data = b"\xef\xbb\xbf" + part % 1 + b"\xef\xbb\xbf" + part % 2
    (tmp_path / "cat.jsonl").write_bytes(data)
    (tmp_path / "cat.json").write_bytes(data)
    for name in ("cat.jsonl", "cat.json"):
        _, rows, rejects = run_ingest(cli, tmp_path / name, out=Path(f"out-{name}"))
        assert [r["prompt"] for r in rows] == [user("p1"), user("p2")] and not rejects


def test_output_text_is_valid_unicode(cli, tmp_path):
    """What ingest writes can be read back as Python text (the later stages' first step)."""
    src = _lines(
        tmp_path / "mixed.jsonl",
        [
            b'{"prompt": "\xc3\xa9\xff", "chosen": "c", "rejected": "r"}',
            b'{"prompt": "\xc3\xa9", "chosen": "c", "rejected": "r"}',
        ],
    )
    run_ingest(cli, src)
    assert [r["prompt"] for r in read_table(Path("out")).to_pylist()] == [user("é")]
    assert [r["reject_reason"] for r in read_table(Path("out"), subdir="rejects").to_pylist()] == ["undecodable"]
