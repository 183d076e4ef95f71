"""The score stage: hf: reward models (built here, tiny and random), judge, embedding-bt, CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from prefcurate.shards import Manifest, count_rows, read_table
from prefcurate.stages.score import ScoreConfig, ScoreStage
from tests.conftest import TINY_LAYERS, hh_rows, make_stage_dir

CHAT_TEMPLATE = "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"


def _pairs(n: int = 12) -> list[dict]:
    rows = hh_rows(n)
    return [{"prompt": r["chosen"][:60], "chosen": r["chosen"][-120:], "rejected": r["rejected"][-120:]} for r in rows]


def _build_rm(path: Path, words: list[str], template: bool, head_scale: float = 1.0) -> Path:
    """A tiny randomly initialized Llama reward model and a word-level tokenizer, saved to ``path``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(["[PAD]", "[UNK]", "<s>", "</s>", *words]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )
    if template:
        fast.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(vocab),
        **TINY_LAYERS,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=0,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.mul_(head_scale)
    fast.save_pretrained(path)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rm_dirs(tmp_path_factory):
    words = [
        w
        for w, _ in Counter(
            " ".join(p["prompt"] + " " + p["chosen"] + " " + p["rejected"] for p in _pairs()).split()
        ).most_common(400)
    ]
    words += ["user", "assistant", ":", "User:", "Assistant:"]
    root = tmp_path_factory.mktemp("rms")
    return {
        "tiny": _build_rm(root / "tiny-rm", words, template=True),
        "scaled": _build_rm(root / "scaled-rm", words, template=True, head_scale=100.0),
        "plain": _build_rm(root / "plain-rm", words, template=False),
    }


def _expected_reward(path: Path, text: str, special: bool) -> float:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok([text], add_special_tokens=special, return_tensors="pt")
    with torch.no_grad():
        return float(model(**ids).logits[0, -1])


def test_hf_member_scores_the_conversation_through_the_chat_template(tmp_path, cli, rm_dirs):
    from transformers import AutoTokenizer

    src = make_stage_dir(tmp_path / "in", _pairs())
    result = cli("score", src, "-o", tmp_path / "out", "--member", f"hf:{rm_dirs['tiny']}")
    assert result.exit_code == 0, result.stderr
    table = read_table(tmp_path / "out")
    assert table.num_rows == 12 and count_rows(tmp_path / "out", "rejects") == 0
    rc = table.column("reward_chosen__hf_tiny_rm").to_numpy()
    rr = table.column("reward_rejected__hf_tiny_rm").to_numpy()
    row = table.slice(0, 1).to_pylist()[0]
    tok = AutoTokenizer.from_pretrained(rm_dirs["tiny"])
    text = tok.apply_chat_template([*row["prompt"], *row["chosen"]], tokenize=False)
    assert text.startswith("<s> user :")
    assert rc[0] == pytest.approx(_expected_reward(rm_dirs["tiny"], text, special=False), abs=1e-4)
    # One member: the combined strength is its standardized margin, sign and all.
    margin = table.column("margin__hf_tiny_rm").to_numpy()
    np.testing.assert_allclose(margin * np.sqrt(np.mean((rc - rr) ** 2)), rc - rr, rtol=1e-6)
    np.testing.assert_allclose(table.column("margin_mean").to_numpy(), margin)
    assert set(table.column("margin_agree").to_numpy()) <= {0.0, 1.0}
    info = Manifest.load(tmp_path / "out").extra["members"]["hf_tiny_rm"]
    assert info["chat_template"] is True and info["truncated"] == 0 and info["dtype"] == "float32"


def test_truncation_is_counted_and_keeps_the_end(tmp_path, rm_dirs):
    from transformers import AutoTokenizer

    pairs = _pairs()
    src = make_stage_dir(tmp_path / "in", pairs)
    manifest, _ = ScoreStage(ScoreConfig(member=[f"hf:{rm_dirs['tiny']}"], max_length=24)).run(src, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(rm_dirs["tiny"])
    table = read_table(tmp_path / "out")
    texts = [
        tok.apply_chat_template([*r["prompt"], *r[side]], tokenize=False)
        for side in ("chosen", "rejected")
        for r in table.to_pylist()
    ]
    long = sum(len(tok(t, add_special_tokens=False)["input_ids"]) > 24 for t in texts)
    assert long > 0
    assert manifest.extra["members"]["hf_tiny_rm"]["truncated"] == long
    # Left truncation: the reward is the model's score of the last 24 tokens.
    ids = tok(texts[0], add_special_tokens=False)["input_ids"][-24:]
    tail = " ".join(tok.convert_ids_to_tokens(ids))
    expected = _expected_reward(rm_dirs["tiny"], tail, special=False)
    assert table.column("reward_chosen__hf_tiny_rm")[0].as_py() == pytest.approx(expected, abs=1e-4)


def test_without_a_chat_template_a_plain_transcript_is_scored(tmp_path, rm_dirs):
    from prefcurate.schema import render_transcript

    src = make_stage_dir(tmp_path / "in", _pairs(6))
    manifest, _ = ScoreStage(ScoreConfig(member=[f"hf:{rm_dirs['plain']}"])).run(src, tmp_path / "out")
    assert manifest.extra["members"]["hf_plain_rm"]["chat_template"] is False
    row = read_table(tmp_path / "out").slice(2, 1).to_pylist()[0]
    text = render_transcript([*row["prompt"], *row["rejected"]])
    assert row["reward_rejected__hf_plain_rm"] == pytest.approx(
        _expected_reward(rm_dirs["plain"], text, special=True), abs=1e-4
    )


def test_a_member_100x_larger_in_scale_does_not_dominate(tmp_path, rm_dirs):
    src = make_stage_dir(tmp_path / "in", _pairs())
    ScoreStage(ScoreConfig(member=[f"hf:{rm_dirs['tiny']}"])).run(src, tmp_path / "one")
    ScoreStage(ScoreConfig(member=[f"hf:{rm_dirs['tiny']}", f"hf:{rm_dirs['scaled']}"])).run(src, tmp_path / "two")
    one, two = read_table(tmp_path / "one"), read_table(tmp_path / "two")
    raw_a = two.column("reward_chosen__hf_tiny_rm").to_numpy()
    raw_b = two.column("reward_chosen__hf_scaled_rm").to_numpy()
    np.testing.assert_allclose(raw_b, 100 * raw_a, rtol=1e-3, atol=1e-4)  # really 100x in raw units
    np.testing.assert_allclose(
        two.column("margin_mean").to_numpy(), one.column("margin_mean").to_numpy(), rtol=1e-3, atol=1e-5
    )
    assert np.allclose(two.column("margin_std").to_numpy(), 0.0, atol=1e-3)


def test_judge_member_is_the_logit_of_judge_pref(tmp_path, cli):
    prefs = [1.0, 0.0, 0.5, 1.0, None, 0.75]
    pairs = [dict(p, judge_pref=q) for p, q in zip(_pairs(6), prefs, strict=True)]
    src = make_stage_dir(tmp_path / "in", pairs)
    result = cli("score", src, "-o", tmp_path / "out", "-m", "judge")
    assert result.exit_code == 0, result.stderr
    table = read_table(tmp_path / "out")
    assert "reward_chosen__judge" not in table.column_names
    m = table.column("margin__judge").to_pylist()
    assert m[0] > 0 and m[1] == pytest.approx(-m[0]) and m[2] == pytest.approx(0.0) and m[4] is None
    assert m[5] == pytest.approx(m[0] * np.log(3) / np.log(999), rel=1e-3)  # logit(.75) vs logit(1 - 1e-3)
    assert table.column("margin_agree").to_pylist()[4] is None


def test_judge_member_without_judge_pref_fails_with_a_hint(tmp_path, cli):
    src = make_stage_dir(tmp_path / "in", _pairs(4))
    result = cli("score", src, "-o", tmp_path / "out", "-m", "judge")
    assert result.exit_code == 2 and "judge_pref" in result.stderr and "prefcurate judge" in result.stderr
    assert "Traceback" not in result.stderr
    bad = cli("score", src, "-o", tmp_path / "out", "-m", "gpt4")
    assert bad.exit_code == 2 and "unknown reward member" in bad.stderr


def test_embedding_bt_on_real_rows_is_cross_fitted(tmp_path):
    pairs = _pairs(40)
    cfg = ScoreConfig(embed_model="minilm", folds=3, seeds=2)
    manifest, _ = ScoreStage(cfg).run(make_stage_dir(tmp_path / "a", pairs), tmp_path / "a-out")
    a = read_table(tmp_path / "a-out")
    rc, rr = a.column("reward_chosen__embedding_bt").to_numpy(), a.column("reward_rejected__embedding_bt").to_numpy()
    info = manifest.extra["members"]["embedding_bt"]
    np.testing.assert_allclose(a.column("margin__embedding_bt").to_numpy() * info["scale"], rc - rr, rtol=1e-4)
    assert info["folds"] == 3 and info["seeds"] == 2 and info["embed_model"].endswith("all-MiniLM-L6-v2")
    # Flip row 4's label: the models that score row 4 never saw it, so its rewards just swap.
    swapped = [dict(p) for p in pairs]
    swapped[4]["chosen"], swapped[4]["rejected"] = pairs[4]["rejected"], pairs[4]["chosen"]
    ScoreStage(cfg).run(make_stage_dir(tmp_path / "b", swapped), tmp_path / "b-out")
    b = read_table(tmp_path / "b-out")
    rc2, rr2 = b.column("reward_chosen__embedding_bt").to_numpy(), b.column("reward_rejected__embedding_bt").to_numpy()
    assert rc2[4] == pytest.approx(rr[4], abs=1e-6) and rr2[4] == pytest.approx(rc[4], abs=1e-6)
    assert not np.allclose(np.delete(rc2 - rr2, 4), np.delete(rc - rr, 4))  # other rows' models did change


def test_rescoring_replaces_earlier_strength_columns(tmp_path):
    pairs = [dict(p, judge_pref=q) for p, q in zip(_pairs(6), [1.0, 0.0, 0.5, 1.0, 0.25, 0.75], strict=True)]
    src = make_stage_dir(tmp_path / "in", pairs)
    ScoreStage(ScoreConfig(member=["judge"])).run(src, tmp_path / "s1")
    ScoreStage(ScoreConfig(member=["judge"])).run(tmp_path / "s1", tmp_path / "s2")
    names = read_table(tmp_path / "s2").column_names
    assert names.count("margin_mean") == 1 and names.count("margin__judge") == 1


def test_rescoring_a_filter_output_drops_columns_derived_from_the_old_scores(tmp_path):
    from prefcurate.stages.export import ExportConfig, ExportStage
    from prefcurate.stages.filter import FilterConfig, FilterStage

    prefs = [0.9, 0.05, 0.6, 0.1, 0.8, 0.3, 0.7, 0.95]
    src = make_stage_dir(tmp_path / "in", [dict(p, judge_pref=q) for p, q in zip(_pairs(8), prefs, strict=True)])
    ScoreStage(ScoreConfig(member=["judge"])).run(src, tmp_path / "s1")
    FilterStage(FilterConfig(flip=True, flip_below="-1", keep_top_count=6)).run(tmp_path / "s1", tmp_path / "f")
    filtered = read_table(tmp_path / "f")
    assert "adaptive_margin" in filtered.column_names and any(filtered.column("flipped").to_pylist())
    ScoreStage(ScoreConfig(member=["judge"])).run(tmp_path / "f", tmp_path / "rs")
    ScoreStage(ScoreConfig(member=["judge"])).run(src, tmp_path / "direct")
    rescored = read_table(tmp_path / "rs")
    # The columns of scoring the raw input, plus the filter's record of the swap: nothing from the old scale.
    assert set(rescored.column_names) == set(read_table(tmp_path / "direct").column_names) | {"flipped"}
    assert rescored.column("flipped").to_pylist() == filtered.column("flipped").to_pylist()
    ExportStage(ExportConfig(format="openrlhf")).run(tmp_path / "rs", tmp_path / "export")
    exported = read_table(tmp_path / "export").column_names
    assert "margin" in exported and "adaptive_margin" not in exported


def test_produces_and_requires_follow_the_members():
    cfg = ScoreConfig(member=["embedding-bt", "judge", "hf:org/My-RM"])
    assert {"judge_pref", "prompt"} <= cfg.requires()
    assert {
        "margin__embedding_bt",
        "margin__judge",
        "margin__hf_my_rm",
        "reward_chosen__hf_my_rm",
        "margin_mean",
        "margin_std",
        "margin_agree",
        "margin_worst",
    } <= cfg.produces()
    assert "reward_chosen__judge" not in cfg.produces()
    assert "judge_pref" not in ScoreConfig().requires()


@pytest.mark.gpu
def test_hf_member_runs_in_bf16_on_cuda(tmp_path, rm_dirs):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    src = make_stage_dir(tmp_path / "in", _pairs())
    ScoreStage(ScoreConfig(member=[f"hf:{rm_dirs['tiny']}"])).run(src, tmp_path / "cpu", fresh=True)
    manifest, _ = ScoreStage(ScoreConfig(member=[f"hf:{rm_dirs['tiny']}"], device="cuda")).run(
        src, tmp_path / "gpu", fresh=True
    )
    info = manifest.extra["members"]["hf_tiny_rm"]
    assert info["device"] == "cuda" and info["dtype"] == "bfloat16"
    cpu = read_table(tmp_path / "cpu").column("reward_chosen__hf_tiny_rm").to_numpy()
    gpu = read_table(tmp_path / "gpu").column("reward_chosen__hf_tiny_rm").to_numpy()
    np.testing.assert_allclose(gpu, cpu, atol=0.05)  # bf16 rounding only
    assert json.loads((tmp_path / "gpu" / "manifest.json").read_text())["rows_out"] == 12
