"""dedupe on real rows (LLMBar, HH-RLHF) with planted duplicates whose answer is known."""

from __future__ import annotations

import json
import os
import random
import tempfile
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefcurate.errors import ConfigError
from prefcurate.shards import Manifest, count_rows, read_table
from prefcurate.stages.dedupe import DedupeConfig, DedupeStage
from tests.conftest import hh_rows, llmbar_rows, make_stage_dir, write_jsonl


def _pairs(n: int = 40) -> list[dict]:
    out = []
    for k, r in enumerate(llmbar_rows("natural")[:n]):
        good, bad = (r["output_1"], r["output_2"]) if r["label"] == 1 else (r["output_2"], r["output_1"])
        out.append({"id": f"row{k}", "prompt": r["input"], "chosen": good, "rejected": bad})
    return out


def _paraphrase(text: str) -> str:
    """Case, punctuation and one dropped word: what a scraped copy of a row looks like."""
    words = text.replace(",", "").replace("!", ".").split(" ")
    if len(words) > 6:
        del words[len(words) // 2]
    return " ".join(words).lower()


def _planted() -> list[dict]:
    rows = _pairs()
    rows.append({**rows[0], "id": "exact-of-0", "prompt": "  " + rows[0]["prompt"].upper() + "\n"})
    rows.append({**rows[1], "id": "swap-of-1", "chosen": rows[1]["rejected"], "rejected": rows[1]["chosen"]})
    rows.append({**rows[2], "id": "tie-of-2", "tie": True})
    para = {key: _paraphrase(rows[3][key]) for key in ("prompt", "chosen", "rejected")}
    rows.append({"id": "para-of-3", **para})
    # Same prompt as row 4, other answers: a distinct pair that must survive --on pair.
    rows.append(
        {
            "id": "other-answers-4",
            "prompt": rows[4]["prompt"],
            "chosen": rows[5]["chosen"],
            "rejected": rows[6]["rejected"],
        }
    )
    return rows


def _run(tmp_path: Path, rows: list[dict], name: str = "out", **options) -> tuple[Manifest, dict, dict]:
    src = tmp_path / f"in-{name}"
    if not src.exists():
        make_stage_dir(src, rows)
    manifest, _ = DedupeStage(DedupeConfig(**options)).run(src, tmp_path / name, fresh=True)
    kept = read_table(tmp_path / name, ["id"]).column("id").to_pylist()
    rejects = (
        {r["id"]: r for r in read_table(tmp_path / name, subdir="rejects").to_pylist()}
        if manifest.rows_rejected
        else {}
    )
    assert manifest.rows_in == len(rows) == len(kept) + len(rejects)
    return manifest, {k: True for k in kept}, rejects


def test_planted_duplicates_are_found_with_their_reasons(tmp_path):
    manifest, kept, rejects = _run(tmp_path, _planted())
    assert {k: (v["reject_reason"], v["duplicate_of"]) for k, v in rejects.items()} == {
        "exact-of-0": ("exact-duplicate", "row0"),
        "swap-of-1": ("swapped-duplicate", "row1"),
        "tie-of-2": ("conflicting-duplicate", "row2"),
        "para-of-3": ("near-duplicate", "row3"),
    }
    assert "other-answers-4" in kept and "row4" in kept
    assert rejects["para-of-3"]["similarity"] >= manifest.extra["threshold"]
    assert manifest.reject_reasons == {
        "exact-duplicate": 1,
        "swapped-duplicate": 1,
        "conflicting-duplicate": 1,
        "near-duplicate": 1,
    }
    extra = manifest.extra
    assert extra["counts"]["near-duplicate"] == 1 and extra["exact_group_sizes"] == {"1": 39, "2": 3}
    assert extra["near_cluster_sizes"]["2"] == 1 and extra["index"] == "flat" and extra["index_device"] == "cpu"
    assert extra["model"].startswith("static-") and 0 < extra["encode_seconds"] <= extra["total_seconds"]


def test_switches_turn_each_kind_off(tmp_path):
    rows = _planted()
    _, _, rejects = _run(tmp_path, rows, "a", semantic=False)
    assert set(rejects) == {"exact-of-0", "swap-of-1", "tie-of-2"}
    _, _, rejects = _run(tmp_path, rows, "b", semantic=False, swapped=False)
    assert set(rejects) == {"exact-of-0", "tie-of-2"}
    _, _, rejects = _run(tmp_path, rows, "c", semantic=False, exact=False)
    assert set(rejects) == {"swap-of-1"}
    _, _, rejects = _run(tmp_path, rows, "d", semantic=False, normalize=["none"])
    assert set(rejects) == {"swap-of-1", "tie-of-2"}  # the upper-cased copy is no longer exact


def test_drop_conflicts_removes_both_sides(tmp_path):
    _, kept, rejects = _run(tmp_path, _planted(), semantic=False, drop_conflicts=True)
    assert {"row1", "swap-of-1", "row2", "tie-of-2"} <= set(rejects) and "row0" in kept
    assert rejects["row1"]["duplicate_of"] == "swap-of-1"


def _copies() -> list[dict]:
    """Row 0 and three copies differing only in trailing spaces (exact under normalization):
    copy2 is the longest, copy1 has the highest margin."""
    base = _pairs(6)
    rows = [{**r, "margin_mean": 0.0} for r in base]
    for k, margin in enumerate((0.1, 0.9, 0.5)):
        rows.append({**base[0], "id": f"copy{k}", "prompt": base[0]["prompt"] + " " * (k + 1), "margin_mean": margin})
    return rows


@pytest.mark.parametrize(("policy", "winner"), [("first", "row0"), ("longest", "copy2"), ("highest-margin", "copy1")])
def test_keep_policies(tmp_path, policy, winner):
    _, kept, rejects = _run(tmp_path, _copies(), semantic=False, keep=policy)
    group = {"row0", "copy0", "copy1", "copy2"}
    assert group & set(kept) == {winner}
    assert all(rejects[r]["duplicate_of"] == winner for r in group - {winner})


def test_a_later_kept_copy_is_embedded_and_found_as_near_duplicate(tmp_path):
    """--keep longest keeps a later copy (copy2) than the one the exact pass embedded (row0):
    its vector comes from the second read, so a paraphrase of row 0 still points at it."""
    para = {k: _paraphrase(_pairs(1)[0][k]) for k in ("prompt", "chosen", "rejected")}
    rows = [*_copies(), {"id": "para-of-0", **para, "margin_mean": 0.0}]
    _, kept, rejects = _run(tmp_path, rows, keep="longest")
    assert "copy2" in kept and rejects["row0"]["reject_reason"] == "exact-duplicate"
    assert (rejects["para-of-0"]["reject_reason"], rejects["para-of-0"]["duplicate_of"]) == ("near-duplicate", "copy2")
    assert set(kept) == {"row1", "row2", "row3", "row4", "row5", "copy2"}


def test_exact_copies_kept_by_the_exact_pass_are_near_duplicates(tmp_path):
    """With --no-exact every copy is embedded; the copies are then near-duplicates (cosine ~1)."""
    _, kept, rejects = _run(tmp_path, _planted(), exact=False)
    assert rejects["exact-of-0"]["reject_reason"] == "near-duplicate"
    assert rejects["exact-of-0"]["duplicate_of"] == "row0" and rejects["exact-of-0"]["similarity"] > 0.95
    assert "row0" in kept


def test_an_unloadable_model_is_one_line_before_any_output(tmp_path, cli):
    src = make_stage_dir(tmp_path / "in", _pairs(5))
    result = cli("dedupe", src, "-o", tmp_path / "out", "--model", str(tmp_path / "no-such-model"), "--quiet")
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "could not load embedding model" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_keep_random_is_seeded_and_ignores_row_order(tmp_path):
    rows = _copies()
    _, kept_a, _ = _run(tmp_path, rows, "a", semantic=False, keep="random", seed=7)
    _, kept_b, _ = _run(tmp_path, rows[::-1], "b", semantic=False, keep="random", seed=7)
    assert set(kept_a) == set(kept_b)
    winners = {
        next(
            iter(
                {"row0", "copy0", "copy1", "copy2"}
                & set(_run(tmp_path, rows, f"s{s}", semantic=False, keep="random", seed=s)[1])
            )
        )
        for s in range(8)
    }
    assert len(winners) > 1  # the seed matters


def test_highest_margin_without_the_column_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="margin_mean"):
        _run(tmp_path, _pairs(5), semantic=False, keep="highest-margin")


def test_on_prompt_keeps_per_prompt_pairs_per_cluster(tmp_path):
    base = _pairs(12)
    rows = [dict(r) for r in base]
    answers = [(base[k]["chosen"], base[k + 1]["rejected"]) for k in range(5, 10)]
    for k, (c, r) in enumerate(answers):  # five pairs on near-identical copies of prompt 0
        rows.append({"id": f"p0-{k}", "prompt": _paraphrase(base[0]["prompt"]) + "?" * k, "chosen": c, "rejected": r})
    _, kept, rejects = _run(tmp_path, rows, "pair")
    assert not any(r.startswith("p0-") for r in rejects)  # different answers: distinct pairs
    _, kept, rejects = _run(tmp_path, rows, "prompt", on="prompt", per_prompt=2)
    cluster = {"row0", *(f"p0-{k}" for k in range(5))}
    assert cluster & set(kept) == {"row0", "p0-0"}
    assert {rejects[r]["reject_reason"] for r in cluster - set(kept)} == {"near-duplicate"}
    assert all(rejects[r]["duplicate_of"] == "row0" for r in cluster - set(kept))


def test_on_response_matches_answers_across_prompts(tmp_path):
    rows = _pairs(10)
    rows.append(
        {
            "id": "same-answers",
            "prompt": rows[8]["prompt"],
            "chosen": rows[0]["chosen"],
            "rejected": rows[0]["rejected"],
        }
    )
    _, _, rejects = _run(tmp_path, rows, "pair")
    assert "same-answers" not in rejects
    _, _, rejects = _run(tmp_path, rows, "resp", on="response")
    assert rejects["same-answers"]["duplicate_of"] == "row0"


def test_decontamination_against_jsonl_txt_and_stage_dir(tmp_path):
    rows = _pairs(30)
    rows.append({**rows[7], "id": "dup-of-7"})
    evals = [
        {"prompt": rows[7]["prompt"].upper()},
        {"prompt": _paraphrase(rows[8]["prompt"]) + " Thanks!"},
        {"prompt": "What is 17 * 23?"},
    ]
    jsonl = write_jsonl(tmp_path / "eval.jsonl", evals)
    manifest, kept, rejects = _run(tmp_path, rows, "j", against=[jsonl])
    assert {k for k, v in rejects.items() if v["reject_reason"] == "contaminated"} == {"row7", "dup-of-7", "row8"}
    assert rejects["row7"]["duplicate_of"] == "eval.jsonl:1" and rejects["row7"]["similarity"] == 1.0
    assert rejects["row8"]["duplicate_of"] == "eval.jsonl:2" and 0.93 <= rejects["row8"]["similarity"] < 0.999
    assert manifest.extra["contamination"]["eval_prompts"] == 3
    txt = tmp_path / "eval.txt"
    txt.write_text(rows[9]["prompt"].replace("\n", " ") + "\n")
    _, _, rejects = _run(tmp_path, rows, "t", against=[txt], semantic=False)
    assert [k for k, v in rejects.items() if v["reject_reason"] == "contaminated"] == ["row9"]
    evaldir = make_stage_dir(
        tmp_path / "evalset", [{"id": "e1", "prompt": rows[10]["prompt"], "chosen": "a", "rejected": "b"}]
    )
    _, _, rejects = _run(tmp_path, rows, "d", against=[evaldir], semantic=False)
    assert rejects["row10"]["duplicate_of"] == "e1"


def test_on_response_with_decontamination_keeps_the_prompt_out_of_the_row_vector(tmp_path):
    """--on response with --against: prompts are embedded too (for contamination), but rows
    are compared on their responses only."""
    rows = _pairs(20)
    rows.append({**rows[3], "id": "answers-of-3", "prompt": rows[12]["prompt"]})  # same answers, other prompt
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": _paraphrase(rows[8]["prompt"]) + " Thanks!"}])
    _, kept, rejects = _run(tmp_path, rows, on="response", against=[evals])
    assert rejects["row8"]["reject_reason"] == "contaminated" and rejects["row8"]["duplicate_of"] == "eval.jsonl:1"
    assert rejects["answers-of-3"]["reject_reason"] == "near-duplicate" and rejects["answers-of-3"]["similarity"] > 0.99
    assert "row3" in kept and "row12" in kept


def test_second_run_encodes_nothing(tmp_path):
    marker = uuid.uuid4().hex  # texts no other test has cached
    rows = [{**r, "prompt": f"{r['prompt']} [{marker}]"} for r in _pairs(20)]
    segments = sorted((Path(os.environ["PREFCURATE_CACHE_DIR"]) / "embeddings").glob("static-*/*.keys.npy"))
    first, _, _ = _run(tmp_path, rows, "a", batch_size=6)  # 4 batches x 3 parts: 12 adds to the cache
    assert first.extra["texts"]["encoded"] > 0
    after = sorted((Path(os.environ["PREFCURATE_CACHE_DIR"]) / "embeddings").glob("static-*/*.keys.npy"))
    assert len(set(after) - set(segments)) == 1  # written once, as one segment, when the stage closed it
    second, _, _ = _run(tmp_path, rows, "b", threshold=0.99)
    assert second.extra["texts"]["encoded"] == 0
    assert second.extra["texts"]["cache_hits"] == second.extra["texts"]["distinct"] > 0


def test_real_hh_rows_with_planted_copies(tmp_path):
    rows = _hh(60)
    copies = [
        {"id": f"copy{k}", **{f: _paraphrase(rows[k][f]) for f in ("prompt", "chosen", "rejected")}}
        for k in (3, 17, 42)
    ]
    _, kept, rejects = _run(tmp_path, rows + copies, semantic=True, exact=True)
    planted = {f"copy{k}": f"hh{k}" for k in (3, 17, 42)}
    assert {k: rejects[k]["duplicate_of"] for k in planted if k in rejects} == planted
    # Rows in = out + rejects, on disk.
    assert count_rows(tmp_path / "out") + count_rows(tmp_path / "out", "rejects") == len(rows) + 3


def test_dedupe_is_idempotent_on_real_rows(tmp_path):
    _, kept, _ = _run(tmp_path, _planted())
    again, _ = DedupeStage(DedupeConfig()).run(tmp_path / "out", tmp_path / "again", fresh=True)
    assert again.rows_rejected == 0 and again.rows_out == len(kept)


def test_rejects_schema_has_typed_extras(tmp_path):
    _run(tmp_path, _planted(), semantic=False)
    schema = pq.read_schema(next((tmp_path / "out" / "rejects").glob("*.parquet")))
    assert str(schema.field("duplicate_of").type) == "string" and str(schema.field("similarity").type) == "double"


def test_normalize_none_cannot_mix():
    with pytest.raises(ConfigError):
        DedupeConfig(normalize=["none", "case"])


_POOL = [r["input"] for r in llmbar_rows("natural")[:3]] if True else []


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    picks=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(0, 3), st.booleans(), st.booleans()),
        min_size=1,
        max_size=14,
    ),
    seed=st.integers(0, 1000),
)
def test_exact_and_swapped_are_idempotent_and_order_insensitive(picks, seed):
    answers = [r["output_1"] for r in llmbar_rows("natural")[:4]]
    rows = []
    for k, (p, c, r, upper, tie) in enumerate(picks):
        prompt = _POOL[p].upper() if upper else _POOL[p]
        rows.append({"id": f"r{k}", "prompt": prompt, "chosen": answers[c], "rejected": answers[r], "tie": tie})
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        _, kept_a, rej_a = _run(tmp_path, rows, "a", semantic=False)
        _, kept_b, rej_b = _run(tmp_path, shuffled, "b", semantic=False)

        def content(kept: dict) -> list:
            by_id = {r["id"]: r for r in rows}
            return sorted(
                json.dumps([by_id[i]["prompt"].lower(), sorted([by_id[i]["chosen"], by_id[i]["rejected"]])])
                for i in kept
            )

        assert content(kept_a) == content(kept_b)
        again, _ = DedupeStage(DedupeConfig(semantic=False)).run(tmp_path / "a", tmp_path / "a2", fresh=True)
        assert again.rows_rejected == 0 and again.rows_out == len(kept_a)


def test_cli_dedupe(tmp_path, cli):
    src = make_stage_dir(tmp_path / "in", _planted())
    result = cli("dedupe", src, "-o", tmp_path / "out", "--no-semantic", "--keep", "first", "--quiet")
    assert result.exit_code == 0, result.stderr
    manifest = Manifest.load(tmp_path / "out")
    assert manifest.reject_reasons == {"exact-duplicate": 1, "swapped-duplicate": 1, "conflicting-duplicate": 1}
    result = cli("dedupe", src, "-o", tmp_path / "out2", "--keep", "highest-margin", "--quiet")
    assert result.exit_code == 2 and "margin_mean" in result.stderr
    result = cli("dedupe", src, "-o", tmp_path / "out3", "--against", tmp_path / "missing.jsonl", "--quiet")
    assert result.exit_code == 2 and "missing.jsonl" in result.stderr


def test_cli_help_lists_the_options(cli):
    result = cli("dedupe", "--help")
    assert result.exit_code == 0
    for option in (
        "--threshold",
        "--keep",
        "--on",
        "--per-prompt",
        "--against",
        "--no-semantic",
        "--device",
        "--model",
    ):
        assert option in result.stdout


@pytest.mark.gpu
def test_gpu_path_gives_the_cpu_answer(tmp_path):
    torch = pytest.importorskip("torch")
    from prefcurate.backends.index import gpu_available

    if not (torch.cuda.is_available() and gpu_available()):
        pytest.skip("needs CUDA torch and GPU FAISS")
    manifest, _, rejects = _run(tmp_path, _planted(), "gpu", device="cuda", model="static")
    assert manifest.extra["index_device"] == "cuda"
    _, _, cpu_rejects = _run(tmp_path, _planted(), "cpu", device="cpu", model="static")
    assert set(rejects) == set(cpu_rejects)


def test_arrow_normalization_matches_python_semantics():
    import unicodedata

    import pyarrow as pa

    from prefcurate.stages.dedupe_keys import normalize_column

    values = ["  Hello\tWORLD \n", "ＦＵＬＬ　Width", "Café  OK", "plain ascii text"]
    got = normalize_column(pa.array(values), ["case", "whitespace", "nfkc"]).to_pylist()
    assert got == [" ".join(unicodedata.normalize("NFKC", v).lower().split()) for v in values]
    assert normalize_column(pa.array(values), ["none"]).to_pylist() == values


def test_arrow_whitespace_folding_matches_str_split_for_every_unicode_blank():
    import itertools

    import pyarrow as pa

    from prefcurate.stages.dedupe_keys import normalize_column, normalizer

    blanks = [chr(c) for c in range(0x3001) if chr(c).isspace()]
    values = ["a" + b + "b" for b in blanks] + [
        "".join(blanks) + "x" + "".join(blanks),
        " x  y ",
        "",
        "\u200bzero-width",
    ]
    values += [r["chosen"] for r in _hh(30)]
    for opts in itertools.chain.from_iterable(
        itertools.combinations(["case", "whitespace", "nfkc"], k) for k in (1, 2, 3)
    ):
        norm = normalizer(opts)
        assert normalize_column(pa.array(values), opts).to_pylist() == [norm(v) for v in values], opts


def _hh(n: int) -> list[dict]:
    rows = []
    for k, r in enumerate(hh_rows(n)):
        head, _, c = r["chosen"].rpartition("\n\nAssistant:")
        _, _, j = r["rejected"].rpartition("\n\nAssistant:")
        rows.append({"id": f"hh{k}", "prompt": head.strip(), "chosen": c.strip(), "rejected": j.strip()})
    return rows


def test_same_answers_to_another_prompt_are_not_a_near_duplicate(tmp_path):
    # HH prompts 0 and 8 differ (static cosine ~0.86) but the mean over three parts with the
    # same two answers would pass 0.92: the per-part floor keeps them apart.
    rows = _hh(10)
    rows.append(
        {
            "id": "answers-of-8",
            "prompt": rows[0]["prompt"],
            "chosen": rows[8]["chosen"],
            "rejected": rows[8]["rejected"],
        }
    )
    _, _, rejects = _run(tmp_path, rows, "floor")
    assert "answers-of-8" not in rejects and "hh8" not in rejects
    _, _, rejects = _run(tmp_path, rows, "nofloor", part_threshold=0.0)
    assert {"answers-of-8", "hh8"} & set(rejects)


def test_ivf_join_matches_exact_search_with_decontamination(tmp_path):
    """--index ivf takes the CPU IVF join; on a set this small it has one cell, so after
    decontamination removed rows between embedding and search it must give exactly the
    decisions of exact search."""
    rows = _planted()
    rows.append({**rows[3], "id": "para2-of-3", "chosen": _paraphrase(rows[3]["chosen"]) + " ok"})
    jsonl = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": rows[6]["prompt"]}, {"prompt": rows[20]["prompt"]}])
    flat_manifest, flat_kept, flat_rejects = _run(tmp_path, rows, "flat", index="flat", against=[jsonl], batch_size=7)
    ivf_manifest, ivf_kept, ivf_rejects = _run(tmp_path, rows, "ivf", index="ivf", against=[jsonl], batch_size=7)
    assert ivf_manifest.extra["index_detail"].startswith("IVF join on cpu")
    assert flat_manifest.extra["index"] == "flat"
    summary = {k: (v["reject_reason"], v["duplicate_of"]) for k, v in flat_rejects.items()}
    assert summary == {k: (v["reject_reason"], v["duplicate_of"]) for k, v in ivf_rejects.items()}
    assert {"row6", "row20"} <= {k for k, v in summary.items() if v[0] == "contaminated"}
    assert {k for k, v in summary.items() if v[0] == "near-duplicate"} >= {"para-of-3"}
    assert flat_kept == ivf_kept


def test_the_decisions_do_not_depend_on_the_batch_size(tmp_path):
    # small batches: many units read, hashed and prepared ahead while the one before is embedded
    rows = _planted() + _hh(60)
    _, kept_small, rejects_small = _run(tmp_path, rows, "small", batch_size=4)
    _, kept_big, rejects_big = _run(tmp_path, rows, "big")
    assert kept_small == kept_big
    assert {k: (v["reject_reason"], v["duplicate_of"]) for k, v in rejects_small.items()} == {
        k: (v["reject_reason"], v["duplicate_of"]) for k, v in rejects_big.items()
    }
    assert {k: v["similarity"] for k, v in rejects_small.items()} == pytest.approx(
        {k: v["similarity"] for k, v in rejects_big.items()}, abs=1e-6
    )
    assert {"exact-of-0", "swap-of-1", "para-of-3"} <= set(rejects_small)


def test_rows_kept_from_the_first_pass_write_what_reading_them_again_writes(tmp_path, monkeypatch):
    """The write pass takes the first rows' columns from the exact pass (up to a byte budget)
    and reads only the others: all rows kept, some, or none, the output is the same, schema
    and row order included."""
    from prefcurate.stages import dedupe_retained

    rows = _planted() + _hh(60)
    src = tmp_path / "in"
    make_stage_dir(src, rows)
    first_pass_bytes = read_table(src, ["id", "prompt", "chosen", "rejected", "tie"]).nbytes
    outputs, kept_rows = [], []
    for name, budget in (("all", 1 << 40), ("some", first_pass_bytes // 3), ("none", 0)):
        monkeypatch.setattr(dedupe_retained, "RETAIN_BYTES", budget)
        manifest, _ = DedupeStage(DedupeConfig(batch_size=16)).run(src, tmp_path / name, fresh=True)
        kept_rows.append(manifest.extra["rows_kept_for_writing"])
        outputs.append((read_table(tmp_path / name), read_table(tmp_path / name, subdir="rejects")))
    assert kept_rows[0] == len(rows) and 0 < kept_rows[1] < len(rows) and kept_rows[2] == 0
    for data, rejects in outputs[1:]:
        assert data.equals(outputs[0][0], check_metadata=True)
        assert rejects.equals(outputs[0][1], check_metadata=True)
    assert outputs[0][0].num_rows + outputs[0][1].num_rows == len(rows) and outputs[0][1].num_rows >= 4


def _many(n: int = 5_600) -> list[dict]:
    """``n`` distinct real pairs (HH-RLHF prompts with other rows' answers) and, at the end,
    copies of a few of them: enough rows for the IVF join (over ``CPU_EXACT_MAX_ROWS``)."""
    hh = _hh(2_000)
    rows = []
    for k in range(n):
        a, b = k % len(hh), k // len(hh)  # each prompt b+1 times, with other answers each time
        rows.append(
            {
                "id": f"m{k}",
                "prompt": hh[a]["prompt"],
                "chosen": hh[(a + 1 + 37 * b) % len(hh)]["chosen"],
                "rejected": hh[(a + 5 + 101 * b) % len(hh)]["rejected"],
            }
        )
    rows.append({**rows[42], "id": "exact-of-m42", "chosen": rows[42]["chosen"].upper() + "   "})
    for k in (10, 2_500, 5_000):  # late and early originals, paraphrased at the end
        rows.append({"id": f"para-of-m{k}", **{f: _paraphrase(rows[k][f]) for f in ("prompt", "chosen", "rejected")}})
    rows.append({**rows[3], "id": "swap-of-m3", "chosen": rows[3]["rejected"], "rejected": rows[3]["chosen"]})
    return rows


@pytest.mark.slow
def test_the_join_operands_are_built_during_the_exact_pass(tmp_path):
    """With the CPU IVF join (forced here; by default from 50k rows), the exact pass's helper
    builds the join's operands as the rows are embedded: the decisions are those of exact
    search on the same rows, and they do not depend on the batch size (which moves every
    unit's bounds, and so which thread fills which rows). Below 50k rows, ``auto`` takes
    the join without building its operands ahead."""
    rows = _many()
    # --drop-conflicts also removes m3, embedded early: every later row's vectors and
    # operands move up a slot before the search
    ahead, kept, rejects = _run(tmp_path, rows, "ahead", drop_conflicts=True, index="ivf")
    assert "operands built ahead" in ahead.extra["index_detail"]
    built = ahead.extra["read_ahead"]["join_tasks"]
    assert built["helper"] + built["stage"] >= 2
    _, kept_small, rejects_small = _run(tmp_path, rows, "small", drop_conflicts=True, batch_size=700, index="ivf")
    auto, kept_auto, rejects_auto = _run(tmp_path, rows, "auto", drop_conflicts=True)
    assert auto.extra["index_detail"].startswith("IVF join") and "ahead" not in auto.extra["index_detail"]
    assert auto.extra["read_ahead"]["join_tasks"] == {"helper": 0, "stage": 0}
    flat, kept_flat, rejects_flat = _run(tmp_path, rows, "flat", drop_conflicts=True, index="flat")
    assert flat.extra["index"] == "flat" and "join_tasks" in flat.extra["read_ahead"]

    def summary(rej):
        return {k: (v["reject_reason"], v["duplicate_of"]) for k, v in rej.items()}

    assert kept == kept_small == kept_flat
    assert summary(rejects) == summary(rejects_small) == summary(rejects_flat)
    assert {"para-of-m10", "para-of-m2500", "para-of-m5000", "exact-of-m42", "m3", "swap-of-m3"} <= set(rejects)
    assert {k: v["similarity"] for k, v in rejects.items()} == pytest.approx(
        {k: v["similarity"] for k, v in rejects_flat.items()}, abs=1e-6
    )
    # --keep longest keeps the later, longer copy of m42: embedded after the pass, in a slot
    # after rows that follow it in the input, its operands built then and taken out of order
    _, kept_long, rejects_long = _run(tmp_path, rows, "long", keep="longest", index="ivf")
    _, kept_long_flat, rejects_long_flat = _run(tmp_path, rows, "long-flat", keep="longest", index="flat")
    assert kept_long == kept_long_flat and summary(rejects_long) == summary(rejects_long_flat)
    assert "exact-of-m42" in kept_long and "m42" in rejects_long  # the copy has trailing blanks: longer
    # --on response with --against: the prompt's block sits beside the row vector in the
    # matrix, outside the join's operands; contaminated rows leave the operands before the search
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": rows[7]["prompt"]}, {"prompt": rows[4_321]["prompt"]}])
    options = {"on": "response", "against": [evals]}
    resp, kept_resp, rejects_resp = _run(tmp_path, rows, "resp", index="ivf", **options)
    _, kept_resp_flat, rejects_resp_flat = _run(tmp_path, rows, "resp-flat", index="flat", **options)
    assert "operands built ahead" in resp.extra["index_detail"]
    assert kept_resp == kept_resp_flat and summary(rejects_resp) == summary(rejects_resp_flat)
    assert {"m7", "m4321"} <= {k for k, v in rejects_resp.items() if v["reject_reason"] == "contaminated"}


@pytest.mark.slow
def test_vectors_past_the_memory_budget_live_in_a_file_and_decide_the_same(tmp_path):
    """With --vector-memory 0 the row vectors and the join's operands go to temporary files
    (mapped), and every decision and similarity is what the in-memory run gives: with the
    join's operands built during the pass, under --keep longest (a later copy re-read and
    the rows reordered into new storage), and with exact search. The files have no name,
    so nothing is left beside the output."""
    rows = _many()

    def summary(rej):
        return {k: (v["reject_reason"], v["duplicate_of"], round(v["similarity"] or 0, 6)) for k, v in rej.items()}

    for name, options in {
        "ivf": {"index": "ivf", "drop_conflicts": True},
        "long": {"index": "ivf", "keep": "longest"},
        "flat": {"index": "flat"},
    }.items():
        before = {p.name for p in tmp_path.iterdir()}
        spilled, kept, rejects = _run(tmp_path, rows, f"{name}-file", vector_memory=0, **options)
        assert {p.name for p in tmp_path.iterdir()} - before == {f"{name}-file", f"in-{name}-file"}
        in_memory, kept_mem, rejects_mem = _run(tmp_path, rows, f"{name}-mem", **options)
        width = 3 * 256  # three parts of the static model
        assert spilled.extra["vectors_in_file_bytes"] >= len(rows) * width * 2 > 0
        assert "vectors_in_file_bytes" not in in_memory.extra
        assert kept == kept_mem and summary(rejects) == summary(rejects_mem)
        assert {"para-of-m10", "para-of-m2500", "para-of-m5000"} <= set(rejects)
        assert spilled.fingerprint == in_memory.fingerprint  # where the vectors live decides nothing
        if options["index"] == "ivf":  # the join's operands were in a file too
            assert "operands built ahead" in spilled.extra["index_detail"]


def test_highest_margin_without_the_column_fails_before_the_model_loads(tmp_path, cli):
    src = make_stage_dir(tmp_path / "in", _pairs(5))
    for _ in range(3):  # the error used to race the model's loading thread (exit 134 some runs)
        result = cli("dedupe", src, "-o", tmp_path / "out", "--keep", "highest-margin", "--model", "static")
        assert result.exit_code == 2 and "margin_mean" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_nothing_left_to_search_with_a_forced_ivf_index(tmp_path):
    rows = _pairs(6)
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": r["prompt"]} for r in rows])
    for on in ("pair", "prompt", "response"):  # every row contaminated: no row left to pair
        manifest, kept, rejects = _run(tmp_path, rows, f"c-{on}", against=[evals], index="ivf", on=on)
        assert not kept and {r["reject_reason"] for r in rejects.values()} == {"contaminated"}
    manifest, kept, _ = _run(tmp_path, [], "empty", index="ivf")
    assert manifest.rows_in == 0 and not kept


def test_near_contamination_checks_each_user_turn(tmp_path):
    rows = _pairs(8)
    turn = rows[3]["prompt"]
    rows.append(
        {
            "id": "chat",
            "prompt": [
                {"role": "user", "content": "Hi there, I have a question for you."},
                {"role": "assistant", "content": "Sure, go ahead."},
                {"role": "user", "content": _paraphrase(turn)},
            ],
            "chosen": "An answer.",
            "rejected": "Another answer.",
        }
    )
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": turn + " Thanks!"}])
    manifest, kept, rejects = _run(tmp_path, rows, against=[evals], semantic=False)
    assert rejects["chat"]["reject_reason"] == "contaminated" and rejects["chat"]["duplicate_of"] == "eval.jsonl:1"
    assert 0.92 <= rejects["chat"]["similarity"] < 1.0
    assert "chat" not in kept and manifest.extra["contamination"]["user_turns_checked"] == 2


def test_an_unreadable_evaluation_set_is_one_line(tmp_path, cli):
    src = make_stage_dir(tmp_path / "in", _pairs(3))
    (tmp_path / "c.parquet").write_text("garbage")
    (tmp_path / "c.jsonl.gz").write_text("garbage")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe x\n")
    (tmp_path / "s.json").write_text('"a string"')
    for name in ("c.parquet", "c.jsonl.gz", "b.txt", "s.json"):
        result = cli("dedupe", src, "-o", tmp_path / "out", "--against", tmp_path / name, "--no-semantic")
        assert result.exit_code == 2, (name, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and name in result.stderr


def test_punctuation_removal_keeps_unicode_blanks_as_blanks():
    import pyarrow as pa

    from prefcurate.stages.dedupe_keys import normalize_column, normalizer

    values = ["Where is New\u00a0York?", "New\u2028York!", "a_b, c-d.", "cafe\u0301 ok", "x\u3000y\u3002"]
    for opts in (["punctuation"], ["punctuation", "whitespace"], ["case", "whitespace", "nfkc", "punctuation"]):
        assert normalize_column(pa.array(values), opts).to_pylist() == [normalizer(opts)(v) for v in values]
    folded = normalize_column(pa.array(values), ["punctuation", "whitespace"]).to_pylist()
    assert folded[:2] == ["Where is New York", "New York"] and folded[3] == "cafe\u0301 ok"
