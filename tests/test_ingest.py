"""ingest: every input format on real rows where they exist, rejects with reasons, errors."""

from __future__ import annotations

import gzip
import json
from itertools import combinations
from pathlib import Path

import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefcurate.schema import pair_id
from prefcurate.shards import Manifest, read_table
from prefcurate.stages import ingest_read
from prefcurate.stages.ingest import IngestConfig, IngestStage
from prefcurate.stages.ingest_fast import content_ids
from tests.conftest import hh_rows, llmbar_rows, shared, write_jsonl


def run_ingest(cli, *args: str | Path, out: Path | None = None) -> tuple[Manifest, list[dict], list[dict]]:
    out = out or Path("out")
    result = cli("ingest", *args, "-o", out, "--fresh", "--quiet")
    assert result.exit_code == 0, result.stderr
    manifest = Manifest.load(out)
    rows = read_table(out).to_pylist()
    rejects = read_table(out, subdir="rejects").to_pylist()
    assert manifest.rows_in == manifest.rows_out + manifest.rows_rejected
    assert (len(rows), len(rejects)) == (manifest.rows_out, manifest.rows_rejected)
    return manifest, rows, rejects


def transcript(messages: list[dict]) -> str:
    return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def bot(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# -- real data --------------------------------------------------------------------------------


def test_hh_rlhf_transcripts_become_messages_with_shared_prefix(cli, tmp_path):
    raw = hh_rows(200)
    src = write_jsonl(tmp_path / "hh.jsonl.gz", raw)
    manifest, rows, rejects = run_ingest(cli, src)
    assert manifest.extra["files"][0]["format"] == "hh-rlhf"
    assert manifest.extra["records_read"] == {"hh.jsonl.gz": 200}
    rejected_rows = {r["source_row"] for r in rejects}
    kept = [original for i, original in enumerate(raw, start=1) if i not in rejected_rows]
    multi_turn = 0
    for original, row in zip(kept, rows, strict=True):
        # Exactly the original transcripts, turn by turn; the prompt ends on the human turn.
        assert transcript(row["prompt"] + row["chosen"]) == original["chosen"]
        assert transcript(row["prompt"] + row["rejected"]) == original["rejected"]
        assert row["prompt"][-1]["role"] == "user"
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        multi_turn += len(row["prompt"]) > 1
        assert row["source"] == "hh.jsonl.gz" and row["tie"] is False
    assert multi_turn > 20
    assert len(rows) + len(rejects) == 200
    for rej in rejects:
        assert rej["reject_reason"] in ("empty:chosen", "empty:rejected", "identical-responses")
        assert json.loads(rej["raw"]) == raw[rej["source_row"] - 1]


def test_llmbar_pairwise_label_names_the_better_output(cli):
    raw = llmbar_rows("natural")
    manifest, rows, rejects = run_ingest(cli, shared("llmbar", "natural.json"))
    assert manifest.extra["files"][0]["format"] == "pairwise"
    assert not rejects and len(rows) == len(raw) == 100
    for original, row in zip(raw, rows, strict=True):
        better, worse = ("output_1", "output_2") if original["label"] == 1 else ("output_2", "output_1")
        assert row["prompt"] == user(original["input"])
        assert row["chosen"] == bot(original[better]) and row["rejected"] == bot(original[worse])
        assert row["tie"] is False and row["source"] == "natural.json"


# -- pairwise ---------------------------------------------------------------------------------


def test_pairwise_labels_and_ties_are_kept(cli, tmp_path):
    labels = ["a", "b", "tie", 0, 1, 2, "B", "Tie (bothbad)", "model_a"]
    raw = [
        {"prompt": f"q{i}", "response_a": f"A{i}", "response_b": f"B{i}", "label": lab} for i, lab in enumerate(labels)
    ]
    raw.append({"prompt": "q", "response_a": "A", "response_b": "B", "label": "maybe"})
    _, rows, rejects = run_ingest(cli, write_jsonl(tmp_path / "pw.jsonl", raw))
    got = [(r["chosen"][0]["content"][0], r["tie"]) for r in rows]
    assert got == [
        ("A", False),
        ("B", False),
        ("A", True),
        ("A", False),
        ("B", False),
        ("A", True),
        ("B", False),
        ("A", True),
        ("A", False),
    ]
    assert [(r["reject_reason"], r["source_row"]) for r in rejects] == [("bad-value:label", 10)]


def test_pairwise_arena_one_hot_and_turn_lists(cli, tmp_path):
    raw = [
        {
            "prompt": json.dumps(["hi", "more"]),
            "response_a": json.dumps(["a1", "a2"]),
            "response_b": json.dumps(["b1", "b2"]),
            "winner_model_a": 0,
            "winner_model_b": 1,
            "winner_tie": 0,
        },
        {
            "prompt": json.dumps(["x"]),
            "response_a": json.dumps(["ax"]),
            "response_b": json.dumps(["bx"]),
            "winner_model_a": 0,
            "winner_model_b": 0,
            "winner_tie": 1,
        },
    ]
    _, rows, _ = run_ingest(cli, write_jsonl(tmp_path / "arena.jsonl", raw))
    assert rows[0]["prompt"] == user("hi")
    assert rows[0]["chosen"] == [*bot("b1"), *user("more"), *bot("b2")]
    assert rows[0]["rejected"][0]["content"] == "a1" and rows[0]["tie"] is False
    assert rows[1]["tie"] is True and rows[1]["chosen"] == bot("ax")


# -- ultrafeedback ----------------------------------------------------------------------------


def uf_rows() -> list[dict]:
    def completion(text: str, score: float, overall: float) -> dict:
        aspects = {
            "helpfulness": {"Rating": str(int(score)), "Rationale": "r"},
            "honesty": {"Rating": "N/A", "Rationale": "r"},
        }
        return {"response": text, "fine-grained_score": score, "overall_score": overall, "annotations": aspects}

    return [
        {
            "instruction": "Explain tides.",
            "completions": [
                completion("t1", 3, 9),
                completion("t2", 5, 2),
                completion("t3", 1, 7),
                completion("t4", 4, 8),
            ],
        },
        {"instruction": "Name a prime.", "completions": [completion("p1", 2, 5), completion("p2", 2, 5)]},
        {"instruction": "Lonely.", "completions": [completion("only", 4, 4)]},
    ]


@pytest.mark.parametrize("rule", ["best-vs-worst", "best-vs-random", "all-pairs"])
def test_ultrafeedback_binarize_rules(cli, tmp_path, rule):
    src = write_jsonl(tmp_path / "uf.jsonl", uf_rows())
    manifest, rows, rejects = run_ingest(cli, src, "--binarize", rule, "--seed", "3")
    assert manifest.extra["records_read"] == {"uf.jsonl": 3}
    assert [(r["reject_reason"], r["source_row"]) for r in rejects] == [("too-few-rated", 3)]
    tides = [r for r in rows if r["prompt"] == user("Explain tides.")]
    prime = [r for r in rows if r["prompt"] == user("Name a prime.")]
    ratings = {"t1": 3, "t2": 5, "t3": 1, "t4": 4}
    for r in tides:
        assert (
            r["chosen_rating"]
            == ratings[r["chosen"][0]["content"]]
            > r["rejected_rating"]
            == ratings[r["rejected"][0]["content"]]
        )
    if rule == "best-vs-worst":
        assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in tides] == [("t2", "t3")]
    elif rule == "best-vs-random":
        assert len(tides) == 1 and tides[0]["chosen"] == bot("t2")
    else:
        assert len(tides) == 6 and len({r["id"] for r in rows}) == len(rows)
    # equal ratings are a tie, never dropped
    assert prime and all(r["tie"] and r["chosen_rating"] == r["rejected_rating"] == 2 for r in prime)
    assert manifest.rows_in == len(rows) + 1


def test_ultrafeedback_all_pairs_min_gap_and_random_seed(cli, tmp_path):
    rng_rows = [
        {"prompt": f"q{i}", "responses": [f"r{i}-{k}" for k in range(4)], "ratings": [1, 2, 3, 4]} for i in range(40)
    ]
    src = write_jsonl(tmp_path / "simple.jsonl", rng_rows)
    _, rows, _ = run_ingest(cli, src, "--binarize", "all-pairs", "--min-gap", "2")
    assert len(rows) == 40 * 3  # gaps >= 2 among ratings 1..4: (1,3) (1,4) (2,4)
    assert all(r["chosen_rating"] - r["rejected_rating"] >= 2 for r in rows)

    def drawn(seed: int) -> list[str]:
        _, rows, _ = run_ingest(cli, src, "--binarize", "best-vs-random", "--seed", str(seed), out=Path(f"seed{seed}"))
        assert all(r["chosen_rating"] == 4 and r["rejected_rating"] < 4 for r in rows)
        return [r["rejected"][0]["content"] for r in rows]

    assert drawn(1) == drawn(1)
    assert drawn(1) != drawn(2)


def test_ultrafeedback_ratings_from(cli, tmp_path):
    src = write_jsonl(tmp_path / "uf.jsonl", uf_rows()[:1])
    _, rows, _ = run_ingest(cli, src, "--ratings-from", "overall")
    assert (rows[0]["chosen"], rows[0]["rejected"], rows[0]["chosen_rating"]) == (bot("t1"), bot("t2"), 9)


# -- TRL, conversational, implicit --------------------------------------------------------------


def test_trl_plain_fast_path_matches_pair_id(cli, tmp_path):
    raw = [
        {"prompt": f'Q{i} "quoted"\n\\ é', "chosen": f"good {i}\ttab", "rejected": f"bad {i}\x01"} for i in range(50)
    ]
    manifest, rows, _ = run_ingest(cli, write_jsonl(tmp_path / "trl.jsonl", raw))
    assert manifest.extra["files"][0]["format"] == "trl"
    for original, row in zip(raw, rows, strict=True):
        assert row["prompt"] == user(original["prompt"]) and row["chosen"] == bot(original["chosen"])
        assert row["id"] == pair_id(row["prompt"], row["chosen"], row["rejected"])


def test_trl_conversational_explicit_and_implicit_prompt(cli, tmp_path):
    conv = [*user("hi"), *bot("hello"), *user("joke?")]
    raw = [
        {"prompt": conv, "chosen": bot("a good joke"), "rejected": bot("no")},
        {"prompt": conv, "chosen": [*conv, *bot("a good joke")], "rejected": [*conv, *bot("no")]},
    ]
    _, rows, _ = run_ingest(cli, write_jsonl(tmp_path / "chat.jsonl", raw))
    assert rows[0]["prompt"] == rows[1]["prompt"] == conv
    assert rows[0]["chosen"] == rows[1]["chosen"] == bot("a good joke")
    assert rows[0]["id"] == rows[1]["id"]
    implicit = [{"chosen": [*conv, *bot("yes")], "rejected": [*conv, *bot("nope")]}]
    manifest, rows, _ = run_ingest(cli, write_jsonl(tmp_path / "implicit-chat.jsonl", implicit), out=Path("o2"))
    assert manifest.extra["files"][0]["format"] == "trl-chat"
    assert rows[0]["prompt"] == conv and rows[0]["rejected"] == bot("nope")


def test_implicit_string_prompt_is_shared_prefix(cli, tmp_path):
    raw = [{"chosen": "The sky is blue.", "rejected": "The sky is green."}, {"chosen": "Yes", "rejected": "No"}]
    manifest, rows, _ = run_ingest(cli, write_jsonl(tmp_path / "imp.jsonl", raw))
    assert manifest.extra["files"][0]["format"] == "implicit"
    assert (rows[0]["prompt"], rows[0]["chosen"], rows[0]["rejected"]) == (
        user("The sky is"),
        bot("blue."),
        bot("green."),
    )
    assert (rows[1]["prompt"], rows[1]["chosen"]) == ([], bot("Yes"))


# -- options ----------------------------------------------------------------------------------


def test_map_columns_and_keep_input_ids(cli, tmp_path):
    raw = [
        {"uid": f"row-{i}", "question": f"q{i}", "good": f"g{i}", "bad": f"b{i}", "prompt": "ignored"} for i in range(3)
    ]
    raw[2]["uid"] = ""
    src = write_jsonl(tmp_path / "custom.jsonl", raw)
    _, rows, _ = run_ingest(
        cli, src, "--map", "prompt=question", "--map", "chosen=good", "--map", "rejected=bad", "--map", "id=uid"
    )
    assert [r["id"] for r in rows[:2]] == ["row-0", "row-1"]
    assert rows[2]["id"] == pair_id(user("q2"), bot("g2"), bot("b2"))  # empty id: content hash
    assert rows[0]["prompt"] == user("q0")
    bad = cli("ingest", src, "-o", "x", "--map", "prompt=nope")
    assert bad.exit_code == 2 and "custom.jsonl" in bad.stderr and "'nope'" in bad.stderr


def test_format_forcing(cli, tmp_path):
    src = write_jsonl(
        tmp_path / "t.jsonl",
        [{"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi\n\nAssistant: no"}],
    )
    _, rows, _ = run_ingest(cli, src)
    assert rows[0]["prompt"] == user("hi")
    _, forced, _ = run_ingest(cli, src, "--format", "implicit", out=Path("forced"))
    assert forced[0]["chosen"] == bot("yo") and forced[0]["prompt"] == user("\n\nHuman: hi\n\nAssistant:")
    missing = cli("ingest", src, "-o", "x", "--format", "pairwise")
    assert missing.exit_code == 2 and "t.jsonl" in missing.stderr and "response_a" in missing.stderr


def test_same_input_same_ids_and_unchanged_rerun_is_skipped(cli, tmp_path):
    src = write_jsonl(tmp_path / "h.jsonl", hh_rows(30))
    _, first, _ = run_ingest(cli, src, out=Path("a"))
    _, second, _ = run_ingest(cli, src, out=Path("b"))
    assert [r["id"] for r in first] == [r["id"] for r in second]
    stage = IngestStage(IngestConfig(sources=[str(src)]))
    stage.run(None, "c")
    _, skipped = stage.run(None, "c")
    assert skipped


# -- rejects and errors -----------------------------------------------------------------------


BAD_ROWS_ARROW = [  # every line parses as JSON with consistent types: the vectorized path
    {"prompt": "p1", "chosen": "c", "rejected": "r"},
    {"prompt": "p2", "rejected": "r"},
    {"prompt": "p3", "chosen": None, "rejected": "r"},
    {"prompt": "p4", "chosen": "c", "rejected": "  \n"},
    {"prompt": "p5", "chosen": "same", "rejected": "same"},
    {"prompt": "", "chosen": "c", "rejected": "r"},
]
REASONS_ARROW = [
    "missing-field:chosen",
    "missing-field:chosen",
    "empty:rejected",
    "identical-responses",
    "empty:prompt",
]


def test_bad_rows_go_to_rejects_with_reasons(cli, tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS_ARROW)
    manifest, rows, rejects = run_ingest(cli, src)
    assert [r["reject_reason"] for r in rejects] == REASONS_ARROW
    assert [r["source_row"] for r in rejects] == [2, 3, 4, 5, 6]
    # raw is each line as written: absent keys stay absent, numbers keep their form
    assert [r["raw"] for r in rejects] == [json.dumps(r) for r in BAD_ROWS_ARROW[1:]]
    assert len(rows) == 1 and manifest.rows_in == 6
    # The same rows on the per-row path (a wrong type and an undecodable line stop Arrow).
    with open(src, "a") as f:
        f.write(json.dumps({"prompt": 7, "chosen": "c", "rejected": "r"}) + "\n{not json\n\n")
    manifest, rows, rejects = run_ingest(cli, src, out=Path("o2"))
    rejects.sort(key=lambda r: r["source_row"])
    assert [r["reject_reason"] for r in rejects] == [*REASONS_ARROW, "wrong-type:prompt", "undecodable"]
    assert [r["source_row"] for r in rejects][-2:] == [7, 8] and rejects[-1]["raw"] == "{not json"
    assert manifest.reject_reasons["missing-field:chosen"] == 2 and manifest.rows_in == 8


def test_line_numbers_across_blocks(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(ingest_read, "BLOCK_BYTES", 200)  # many small blocks, one with a bad line
    raw = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(60)]
    src = tmp_path / "blocks.jsonl.gz"
    lines = [json.dumps(r) for r in raw]
    lines[41] = "{broken"
    src.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    _, rows, rejects = run_ingest(cli, src)
    assert [(r["source_row"], r["reject_reason"]) for r in rejects] == [(42, "undecodable")]
    assert [r["prompt"][0]["content"] for r in rows] == [f"p{i}" for i in range(60) if i != 41]


def test_strict_turns_a_bad_row_into_an_error(cli, tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS_ARROW)
    result = cli("ingest", src, "-o", "out", "--strict")
    assert result.exit_code == 2
    assert "bad.jsonl, row 2, field 'chosen'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not Path("out").exists()


@pytest.mark.parametrize(
    "name, content, expect",
    [
        ("broken.parquet", b"PAR1 not really parquet", "not a readable Parquet file"),
        ("data.txt", b"hello", "not a known input format"),
        (
            "trunc.jsonl.gz",
            # mtime=0: the gzip header holds the time otherwise, and the test id with it, so two
            # pytest-xdist workers collecting in different seconds would disagree on the tests
            gzip.compress(b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n' * 50, mtime=0)[:-30],
            "decompress",
        ),
        ("cols.jsonl", b'{"question": "q", "answer": "a"}\n', "unknown columns (answer, question)"),
        ("arr.json", b'[{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": ', "row 2"),
    ],
)
def test_unreadable_file_is_one_line_error_naming_it(cli, tmp_path, name, content, expect):
    path = tmp_path / name
    path.write_bytes(content)
    result = cli("ingest", path, "-o", "out")
    assert result.exit_code == 2, result.stderr
    assert name in result.stderr and expect in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_source_and_hub_offline(cli, tmp_path):
    missing = cli("ingest", tmp_path / "nope.jsonl", "-o", "out")
    assert missing.exit_code == 2 and "nope.jsonl: no such file" in missing.stderr
    hub = cli("ingest", "hf:someone/some-dataset:test", "-o", "out")  # HF_HUB_OFFLINE=1 in tests
    assert hub.exit_code == 2 and len(hub.stderr.strip().splitlines()) == 1
    assert "hf:someone/some-dataset:test: cannot load from the Hugging Face Hub" in hub.stderr


# -- other containers ------------------------------------------------------------------------


def test_csv_parquet_json_and_directory(cli, tmp_path):
    raw = [{"prompt": f"p{i}", "chosen": f"c{i}\nline", "rejected": f'r{i}, "q"'} for i in range(5)]
    d = tmp_path / "mixed"
    d.mkdir()
    pa.csv.write_csv(pa.Table.from_pylist(raw), d / "a.csv")
    pq.write_table(pa.Table.from_pylist(raw), d / "b.parquet")
    (d / "c.json.gz").write_bytes(gzip.compress(json.dumps(raw).encode()))
    (d / "README.md").write_text("not data")
    manifest, rows, _ = run_ingest(cli, d)
    assert [f["source"] for f in manifest.extra["files"]] == ["mixed/a.csv", "mixed/b.parquet", "mixed/c.json.gz"]
    contents = [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]
    expected = [(r["prompt"], r["chosen"], r["rejected"]) for r in raw]
    assert contents == expected * 3
    assert len({r["id"] for r in rows}) == 5  # same content, same id, whatever the container


def test_csv_pairwise_labels_are_text(cli, tmp_path):
    path = tmp_path / "pw.csv"
    path.write_text('input,output_1,output_2,label\n"Say hi","hi","bye",1\n"Say no","yes","no",2\n"x","y","z",0\n')
    _, rows, _ = run_ingest(cli, path)
    assert [(r["chosen"][0]["content"], r["tie"]) for r in rows] == [("hi", False), ("no", False), ("y", True)]


def test_hf_dataset_dir_and_chat_parquet(cli, tmp_path):
    import datasets

    conv = [{"prompt": user(f"q{i}"), "chosen": bot(f"c{i}"), "rejected": bot(f"r{i}"), "id": i} for i in range(4)]
    datasets.Dataset.from_list(conv).save_to_disk(str(tmp_path / "hfds"))
    manifest, rows, _ = run_ingest(cli, tmp_path / "hfds")
    assert manifest.extra["files"][0]["format"] == "trl-chat"
    assert [r["id"] for r in rows] == ["0", "1", "2", "3"] and rows[3]["chosen"] == bot("c3")
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(conv[:2]), "test": datasets.Dataset.from_list(conv[2:])}
    )
    splits.save_to_disk(str(tmp_path / "hfdict"))
    _, rows, _ = run_ingest(cli, tmp_path / "hfdict", out=Path("o2"))
    assert sorted(r["id"] for r in rows) == ["0", "1", "2", "3"]


def test_a_stage_or_export_directory_inside_a_directory_gives_its_data_only(cli, tmp_path):
    """Walking a directory, a prefcurate stage or export directory met on the way gives the
    files of its data/: not its manifest.json, its card (README.md) nor its rejects/. A
    manifest.json that is not a prefcurate manifest is data like any other file."""
    import datasets

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "llmbar.json").write_text(json.dumps(llmbar_rows("natural")[:20]))
    pairs = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(10)]
    write_jsonl(tmp_path / "src.jsonl", [*pairs, {"prompt": "p", "chosen": "", "rejected": "r"}])
    assert cli("ingest", tmp_path / "src.jsonl", "-o", tree / "st", "--quiet").exit_code == 0
    assert Manifest.load(tree / "st").rows_rejected == 1  # rejects/ holds a row
    exported = cli("export", tree / "st", "-o", tree / "sub" / "exp", "--format", "trl", "--to", "jsonl", "--quiet")
    assert exported.exit_code == 0 and (tree / "sub" / "exp" / "README.md").is_file()
    other = [{"prompt": f"o{i}", "chosen": f"oc{i}", "rejected": f"or{i}"} for i in range(3)]
    (tree / "other" / "data").mkdir(parents=True)
    (tree / "other" / "manifest.json").write_text(json.dumps(other, indent=2))  # not a prefcurate manifest
    write_jsonl(tree / "other" / "data" / "x.jsonl", other[:2])
    conv = [{"prompt": user(f"q{i}"), "chosen": bot(f"c{i}"), "rejected": bot(f"r{i}")} for i in range(4)]
    datasets.Dataset.from_list(conv).save_to_disk(str(tree / "hfds"))

    manifest, rows, rejects = run_ingest(cli, tree)
    assert manifest.extra["records_read"] == {
        "tree/hfds": 4,
        "tree/llmbar.json": 20,
        "tree/other/data/x.jsonl": 2,
        "tree/other/manifest.json": 3,
        "tree/st/data/part-00000.parquet": 10,
        "tree/sub/exp/data/train-00000-of-00001.jsonl": 10,
    }
    assert not rejects and len(rows) == 49
    # the stage directory given itself reads the same way
    _, rows, rejects = run_ingest(cli, tree / "st", out=Path("o2"))
    assert len(rows) == 10 and not rejects


def _jsonl_pairs(path: Path, tag: str, n: int = 2) -> Path:
    return write_jsonl(
        path, [{"prompt": f"{tag}{i}", "chosen": f"c{tag}{i}", "rejected": f"r{tag}{i}"} for i in range(n)]
    )


def test_glob_patterns_in_sources(cli, tmp_path):
    d = tmp_path / "d"
    _jsonl_pairs(d / "b.jsonl.gz", "b")
    _jsonl_pairs(d / "a.jsonl", "a")
    _jsonl_pairs(d / "sub" / "c.jsonl", "c")
    _jsonl_pairs(d / "sub" / "deep" / "e.jsonl", "e")
    (d / "notes.txt").write_text("not data")

    def read(*patterns: str) -> list[str]:
        manifest, _, _ = run_ingest(cli, *patterns, out=Path("g"))
        return list(manifest.extra["records_read"])

    assert read("d/*.jsonl*") == ["a.jsonl", "b.jsonl.gz"]  # sorted, not in creation order
    assert read("d/**/*.jsonl") == ["a.jsonl", "c.jsonl", "e.jsonl"]  # ** spans any depth, none too
    assert read(str(d / "?.jsonl"), "d/[bc].jsonl.gz") == ["a.jsonl", "b.jsonl.gz"]
    assert read("d/sub/*") == ["c.jsonl", "deep/e.jsonl"]  # a matched directory reads as one
    for pattern in ("d/*.csv", "nowhere/**/*.jsonl"):
        result = cli("ingest", pattern, "-o", "none")
        assert result.exit_code == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and f"{pattern}: no file" in result.stderr


def test_glob_sources_fingerprint_their_files_and_work_in_a_recipe(cli, tmp_path):
    d = tmp_path / "d"
    _jsonl_pairs(d / "a.jsonl", "a")
    stage = IngestStage(IngestConfig(sources=[str(d / "*.jsonl")]))
    manifest, skipped = stage.run(None, tmp_path / "out")
    assert not skipped and manifest.rows_out == 2
    assert stage.run(None, tmp_path / "out")[1]  # unchanged: skipped
    _jsonl_pairs(d / "b.jsonl", "b")  # a new matching file: the stage runs again
    manifest, skipped = stage.run(None, tmp_path / "out")
    assert not skipped and manifest.rows_out == 4
    assert stage.run(None, tmp_path / "out")[1]
    _jsonl_pairs(d / "b.jsonl", "b", 3)  # a matching file changed
    manifest, skipped = stage.run(None, tmp_path / "out")
    assert not skipped and manifest.rows_out == 5

    recipe = tmp_path / "r" / "recipe.yaml"
    recipe.parent.mkdir()
    recipe.write_text("name: g\nworkdir: work\ninput:\n  sources: [../d/*.jsonl]\nstages: []\n")
    result = cli("pipeline", recipe)
    assert result.exit_code == 0, result.stderr
    ingested = Manifest.load(tmp_path / "r" / "work" / "00-ingest")
    assert ingested.rows_out == 5 and list(ingested.extra["records_read"]) == ["a.jsonl", "b.jsonl"]


def test_recipe_sources_resolve_relative_to_recipe(tmp_path):
    data = IngestConfig.resolve_recipe_paths({"sources": ["d/x.jsonl", "hf:org/name", "/abs.jsonl"]}, tmp_path)
    assert data["sources"] == [str(tmp_path / "d/x.jsonl"), "hf:org/name", "/abs.jsonl"]


# -- properties -------------------------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=40).filter(lambda s: s.strip())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_text, _text, _text), min_size=1, max_size=8))
def test_vectorized_ids_equal_pair_id(triples):
    ids = content_ids(*(pa.array([t[k] for t in triples], pa.string()) for k in range(3))).to_pylist()
    assert ids == [pair_id(user(p), bot(c), bot(r)) for p, c, r in triples]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(_text, _text, st.one_of(_text, st.sampled_from(["", " \x0b", "\x1c\u3000", "\x85"]))),
        min_size=1,
        max_size=6,
    )
)
def test_ingest_is_the_same_on_fast_and_per_row_paths(tmp_path_factory, triples):
    """JSONL (vectorized Arrow path) and a JSON array (per-row path) give identical output."""
    tmp = tmp_path_factory.mktemp("prop")
    raw = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in triples]
    write_jsonl(tmp / "rows.jsonl", raw)
    (tmp / "rows.json").write_text(json.dumps(raw))
    outs = []
    for name in ("rows.jsonl", "rows.json"):
        IngestStage(IngestConfig(sources=[str(tmp / name)])).run(None, tmp / f"out-{name}")
        data = read_table(tmp / f"out-{name}").drop_columns(["source"]).to_pylist()
        rejects = read_table(tmp / f"out-{name}", subdir="rejects")
        reasons = rejects.column("reject_reason").to_pylist() if rejects.num_rows else []
        outs.append((data, reasons))
    assert outs[0] == outs[1]
    assert len(outs[0][0]) + len(outs[0][1]) == len(raw)


def test_all_pairs_count_property():
    """all-pairs with min_gap 0 yields C(n, 2) pairs for n distinct rated responses."""
    from prefcurate.stages.ingest_formats import Layout
    from prefcurate.stages.ingest_ratings import Binarizer

    for n in range(2, 6):
        row = {"prompt": "q", "responses": [f"r{k}" for k in range(n)], "ratings": list(range(n))}
        pairs = Binarizer("all-pairs")(row, Layout("ultrafeedback", prompt="prompt"))
        assert len(pairs) == len(list(combinations(range(n), 2)))


def test_pair_ratings_are_carried_on_both_paths(cli, tmp_path):
    plain = [
        {"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "score_chosen": 8, "score_rejected": 3.5}
        for i in range(3)
    ]
    _, rows, _ = run_ingest(cli, write_jsonl(tmp_path / "plain.jsonl", plain))
    assert {(r["chosen_rating"], r["rejected_rating"]) for r in rows} == {(8.0, 3.5)}
    # UltraFeedback-binarized layout: a prompt string, full conversations as chosen/rejected.
    binarized = [
        {
            "prompt": "hi",
            "chosen": [*user("hi"), *bot("hello!")],
            "rejected": [*user("hi"), *bot("go away")],
            "score_chosen": 9.0,
            "score_rejected": 2.0,
        }
    ]
    manifest, rows, _ = run_ingest(cli, write_jsonl(tmp_path / "binarized.jsonl", binarized), out=Path("o2"))
    assert manifest.extra["files"][0]["format"] == "trl-chat"
    assert (rows[0]["prompt"], rows[0]["chosen"], rows[0]["chosen_rating"]) == (user("hi"), bot("hello!"), 9.0)


def test_sample_data_ingests(cli):
    sample = Path(__file__).resolve().parents[1] / "sample_data"
    manifest, rows, rejects = run_ingest(cli, sample)
    files = {f["source"]: (f["format"], f["records"]) for f in manifest.extra["files"]}
    assert files == {
        "sample_data/hh-rlhf-harmless-base.sample.jsonl.gz": ("hh-rlhf", 300),
        "sample_data/llmbar-natural.sample.json": ("pairwise", 100),
    }
    assert len(rows) + len(rejects) == 400


def test_json_extension_holding_json_lines(cli, tmp_path):
    path = tmp_path / "lines.json"
    path.write_text(
        '{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p2", "chosen": "c2", "rejected": "r2"}\n'
    )
    _, rows, _ = run_ingest(cli, path)
    assert [r["prompt"] for r in rows] == [user("p"), user("p2")]


@pytest.mark.parametrize("layout", ["trl-chat", "trl"])
def test_ingest_export_ingest_is_the_identity(cli, tmp_path, layout):
    """Real HH-RLHF (multi-turn) and LLMBar rows survive an export and a re-ingest unchanged."""
    pytest.importorskip("prefcurate.stages.export")
    src = tmp_path / "src"
    write_jsonl(src / "hh.jsonl", hh_rows(40))
    (src / "llmbar.json").write_text(json.dumps(llmbar_rows("natural")[:20]))
    _, first, _ = run_ingest(cli, src, out=Path("first"))
    exported = cli("export", "first", "-o", "exp", "--format", layout, "--to", "jsonl", "--quiet")
    assert exported.exit_code == 0, exported.stderr
    _, again, rejects = run_ingest(cli, Path("exp") / "data", out=Path("again"))
    assert not rejects
    keep = ("id", "prompt", "chosen", "rejected", "tie")
    if layout == "trl":  # plain strings keep only single-turn rows whole: compare those
        first = [r for r in first if len(r["prompt"]) == 1]
        again = [r for r in again if r["id"] in {f["id"] for f in first}]
        assert len(first) >= 20
    assert [{k: r[k] for k in keep} for r in again] == [{k: r[k] for k in keep} for r in first]


def test_csv_row_with_wrong_field_count_is_a_reject(cli, tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text('prompt,chosen,rejected\np1,c1,r1\n"p2\nsecond line",c2\np3,c3,r3\n')
    manifest, rows, rejects = run_ingest(cli, path)
    assert [r["prompt"][0]["content"] for r in rows] == ["p1", "p3"]
    assert [(r["reject_reason"], r["raw"]) for r in rejects] == [("undecodable", '"p2\nsecond line",c2')]
    assert manifest.rows_in == 3


def test_an_export_directory_reingests_its_data_only_and_keeps_ties(tmp_path, cli):
    rows = [
        {
            "prompt": r["input"],
            "response_a": r["output_1"],
            "response_b": r["output_2"],
            "label": "tie" if i % 4 == 0 else "a",
        }
        for i, r in enumerate(llmbar_rows("natural"))
    ]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert cli("ingest", tmp_path / "pairs.jsonl", "-o", tmp_path / "a").exit_code == 0
    for fmt, to in (("trl", "jsonl"), ("trl-chat", "parquet")):
        out = tmp_path / f"export-{fmt}"
        assert cli("export", tmp_path / "a", "-o", out, "--format", fmt, "--to", to, "--ties", "keep").exit_code == 0
        result = cli("ingest", out, "-o", tmp_path / f"b-{fmt}")  # the export root: README, manifest, rejects ignored
        assert result.exit_code == 0, result.stderr
        before = read_table(tmp_path / "a", ["id", "tie"]).to_pylist()
        after = read_table(tmp_path / f"b-{fmt}", ["id", "tie"]).to_pylist()
        assert sorted(after, key=lambda r: r["id"]) == sorted(before, key=lambda r: r["id"])
        assert sum(r["tie"] for r in after) == 25
        assert Manifest.load(tmp_path / f"b-{fmt}").rows_rejected == 0
