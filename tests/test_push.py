"""``prefcurate push`` and a recipe's ``output.push``, against a local Hub on 127.0.0.1.

The fake Hub (tests/fake_hub.py) speaks the endpoints huggingface_hub uses to create a repo,
a branch, list a revision's files (the tree API, paginated), and one commit (preupload, LFS
batch + PUT + verify, NDJSON commit with added and deleted files). Xet uploads
are switched off with ``HF_HUB_DISABLE_XET`` (documented, users have it too), so parquet
shards travel over the LFS batch API. huggingface_hub reads some settings once at import,
so the fixture sets both the environment and the already-imported constants.
"""

from __future__ import annotations

import fnmatch
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import hh_rows, write_jsonl
from tests.fake_hub import FakeHub

TOKEN = "hf_testtoken_9f8e7d6c5b4a"
# huggingface_hub's LFS upload passes a file object as httpx `data=`, which httpx deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def _front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    from huggingface_hub import constants

    with FakeHub(tmp_path / "hub-store", token=TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "home" / "hf" / "token"))
        yield server


def _hh_jsonl(tmp_path: Path, n: int = 300) -> Path:
    return write_jsonl(tmp_path / "raw" / "hh.jsonl", hh_rows(n))


@pytest.fixture
def export_dir(tmp_path: Path, cli: Any) -> Path:
    raw = _hh_jsonl(tmp_path)
    assert cli("ingest", raw, "-o", tmp_path / "ingested", "-q").exit_code == 0
    result = cli(
        "export", tmp_path / "ingested", "-o", tmp_path / "export", "--test-size", "0.2", "--license", "mit", "-q"
    )
    assert result.exit_code == 0, result.stderr
    return tmp_path / "export"


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_push_uploads_shards_card_in_one_commit(hub: FakeHub, export_dir: Path, tmp_path: Path, cli: Any) -> None:
    result = cli(
        "push",
        export_dir,
        "--repo-id",
        "curators/hh-clean",
        "--private",
        "--revision",
        "curated",
        "--commit-message",
        "first cut",
    )
    assert result.exit_code == 0, result.stderr
    assert "datasets/curators/hh-clean/tree/curated" in result.stderr

    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert (commit.repo, commit.revision, commit.summary) == ("curators/hh-clean", "curated", "first cut")
    assert hub.repos["curators/hh-clean"].type == "dataset"
    assert hub.repos["curators/hh-clean"].private is True
    assert hub.files("curators/hh-clean", "main") == {}  # the branch got the commit, main did not

    local = sorted(p.relative_to(export_dir).as_posix() for p in (export_dir / "data").iterdir())
    shards = [p for p in commit.paths if p.startswith("data/")]
    assert shards == local and any(p.startswith("data/test-") for p in shards)
    assert set(commit.paths) == {"README.md", *shards}  # no manifest with local paths, no rejects

    stored = hub.repo_dir("curators/hh-clean", "curated")
    for rel in shards:  # the same rows, byte for byte through LFS
        assert pq.read_table(stored / rel).equals(pq.read_table(export_dir / rel))

    card = (stored / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["license"] == "mit"
    assert meta["task_categories"] and meta["size_categories"] == ["n<1K"]
    (config,) = meta["configs"]
    patterns = {f["split"]: f["path"] for f in config["data_files"]}
    assert set(patterns) == {"train", "test"}
    for split, pattern in patterns.items():
        assert [s for s in shards if fnmatch.fnmatch(s, pattern)] == [
            s for s in shards if s.startswith(f"data/{split}-")
        ]
    assert "| ingest |" in card and "| export |" in card
    assert 'load_dataset("curators/hh-clean")' in card

    # Parquet went through the LFS batch API (xet off), small text files inline in the commit.
    assert sum("/info/lfs/objects/batch" in path for _, path, _ in hub.requests) == 1
    assert sum(method == "PUT" for method, _, _ in hub.requests) == len(shards)

    # The token went only into Authorization headers: the LFS PUT (pre-signed upload) carried none.
    assert all(
        auth == f"Bearer {TOKEN}"
        for method, path, auth in hub.requests
        if path.startswith("/api/") and method == "POST"
    )
    assert all(auth is None for method, _, auth in hub.requests if method == "PUT")
    for root in (hub.root, export_dir, tmp_path / "home"):
        assert _files_containing(root, TOKEN.encode()) == []
    assert TOKEN not in result.stdout + result.stderr


def test_pushed_dataset_loads_with_datasets(hub: FakeHub, export_dir: Path, cli: Any) -> None:
    from datasets import load_dataset

    recipe = export_dir.parent / "made-with.yaml"
    recipe.write_text("name: hh\ninput: {sources: [hh.jsonl]}\n")
    assert cli("push", export_dir, "--repo-id", "curators/hh-load", "--recipe", recipe).exit_code == 0
    assert hub.files("curators/hh-load")["recipe.yaml"] == recipe.read_bytes()
    ds = load_dataset(str(hub.repo_dir("curators/hh-load")))  # splits from the card's configs
    local = {
        s: sum(pq.ParquetFile(p).metadata.num_rows for p in (export_dir / "data").glob(f"{s}-*"))
        for s in ("train", "test")
    }
    assert {s: ds[s].num_rows for s in ds} == local
    assert set(ds["train"].column_names) >= {"id", "prompt", "chosen", "rejected"}


def _recipe(tmp_path: Path, push: str) -> Path:
    raw = _hh_jsonl(tmp_path, 120)
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "# curated HH-RLHF, pushed to the Hub\n"
        "name: hh-push\n"
        f"input:\n  sources: [{raw}]\n"
        "output:\n  dir: out/hh\n  format: trl\n  license: mit\n"
        f"{push}"
    )
    return path


def test_pipeline_pushes_from_recipe_with_login_token(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Any
) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(constants.HF_TOKEN_PATH).write_text(TOKEN)  # what `hf auth login` leaves
    recipe = _recipe(tmp_path, "  push:\n    repo_id: curators/hh-recipe\n")
    result = cli("pipeline", recipe, "-q")
    assert result.exit_code == 0, result.stderr
    assert "pushed:" in result.stderr
    (commit,) = hub.commits
    assert commit.revision == "main" and hub.repos["curators/hh-recipe"].private is False
    files = hub.files("curators/hh-recipe")
    assert files["recipe.yaml"] == recipe.read_bytes()
    card = files["README.md"].decode()
    assert "prefcurate pipeline recipe.yaml" in card
    assert _front_matter(card)["configs"][0]["data_files"] == [{"split": "train", "path": "data/train-*.parquet"}]
    table = pq.read_table(io.BytesIO(files[next(p for p in files if p.startswith("data/train-"))]))
    assert {"prompt", "chosen", "rejected"} <= set(table.column_names)
    assert table.num_rows == sum(
        pq.ParquetFile(p).metadata.num_rows for p in (tmp_path / "out" / "hh" / "data").glob("*.parquet")
    )
    assert not any(TOKEN.encode() in blob for blob in files.values())


def test_no_token_is_one_line_error_before_any_work(
    hub: FakeHub, export_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Any
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    result = cli("push", export_dir, "--repo-id", "curators/x")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "no Hugging Face token found" in result.stderr
    assert "hf auth login" in result.stderr and "HF_TOKEN" in result.stderr

    recipe = _recipe(tmp_path, "  push: curators/x\n")
    result = cli("pipeline", recipe)
    assert result.exit_code == 2 and "no Hugging Face token found" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / ".prefcurate").exists()  # no stage ran
    assert hub.requests == []


def test_bad_push_options_name_the_key(hub: FakeHub, tmp_path: Path, cli: Any) -> None:
    recipe = _recipe(tmp_path, "  push:\n    repo_id: curators/x\n    privat: true\n")
    result = cli("pipeline", recipe, "--check")
    assert result.exit_code == 2
    assert "output.push.privat" in result.stderr
    recipe.write_text(recipe.read_text().replace("curators/x\n    privat: true", "not-a-repo-id"))
    result = cli("pipeline", recipe, "--check")
    assert result.exit_code == 2 and "output.push.repo_id" in result.stderr


def test_rejected_token_and_non_export_dir(
    hub: FakeHub, export_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Any
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_123456")
    result = cli("push", export_dir, "--repo-id", "curators/x")
    assert result.exit_code == 2 and "refused the token" in result.stderr
    assert "hf_wrong_token_123456" not in result.stderr and hub.commits == []

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = cli("push", tmp_path / "ingested", "--repo-id", "curators/x")
    assert result.exit_code == 2 and "not an export" in result.stderr

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 at import gives
    result = cli("push", export_dir, "--repo-id", "curators/x")
    assert result.exit_code == 2 and "unset HF_HUB_OFFLINE" in result.stderr
    assert hub.commits == []


def test_recipe_with_the_token_inline_is_not_uploaded(hub: FakeHub, tmp_path: Path, cli: Any) -> None:
    recipe = _recipe(tmp_path, f"  push: curators/leak   # token {TOKEN}\n")
    result = cli("pipeline", recipe, "-q")
    assert result.exit_code == 2
    assert "recipe.yaml contains your Hub token" in result.stderr and TOKEN not in result.stderr
    assert hub.commits == [] and os.path.isdir(tmp_path / "out" / "hh")


def _export(tmp_path: Path, cli: Any, name: str, *options: str) -> Path:
    """Another export of the ``export_dir`` fixture's ingested rows (it must have run)."""
    out = tmp_path / name
    result = cli("export", tmp_path / "ingested", "-o", out, "--test-size", "0.2", "-q", *options)
    assert result.exit_code == 0, result.stderr
    return out


def _local_files(export: Path) -> set[str]:
    return {f"data/{p.name}" for p in (export / "data").iterdir()}


def _rows_by_split(files: dict[str, bytes], card: str) -> dict[str, int]:
    """Rows per split as the Hub would serve them: the card's configs globs over the repo's files."""
    (config,) = _front_matter(card)["configs"]
    return {
        f["split"]: sum(
            pq.read_table(io.BytesIO(blob)).num_rows for p, blob in files.items() if fnmatch.fnmatch(p, f["path"])
        )
        for f in config["data_files"]
    }


def _local_rows(export: Path) -> dict[str, int]:
    return {
        s: sum(pq.ParquetFile(p).metadata.num_rows for p in (export / "data").glob(f"{s}-*")) for s in ("train", "test")
    }


def test_pushing_again_replaces_the_data_and_keeps_other_files(
    hub: FakeHub, export_dir: Path, tmp_path: Path, cli: Any
) -> None:
    from huggingface_hub import HfApi

    many = _export(tmp_path, cli, "many", "--shard-rows", "100")  # 3 train shards
    one = _export(tmp_path, cli, "one")  # 1 train shard; the test shard keeps its name
    assert len([p for p in _local_files(many) if p.startswith("data/train-")]) > 1
    assert cli("push", many, "--repo-id", "curators/again").exit_code == 0
    assert {p for p in hub.files("curators/again") if p.startswith("data/")} == _local_files(many)

    # The owner adds files of their own: prefcurate's push must leave them alone.
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.upload_file(path_or_fileobj=b"notes", path_in_repo="NOTES.md", repo_id="curators/again", repo_type="dataset")
    api.upload_file(
        path_or_fileobj=b"keep", path_in_repo="extra/keep.txt", repo_id="curators/again", repo_type="dataset"
    )
    hub.tree_page_size = 2  # the listing of the repo spans pages
    before = len(hub.commits)

    result = cli("push", one, "--repo-id", "curators/again")  # the repo exists: a 409 create is fine
    assert result.exit_code == 0, result.stderr
    assert len(hub.commits) == before + 1  # still one commit: adds and deletes together
    commit = hub.commits[-1]
    stale = _local_files(many) - _local_files(one)
    assert stale and commit.deleted == sorted(stale)
    assert "removed" in result.stderr
    files = hub.files("curators/again")
    assert {p for p in files if p.startswith("data/")} == _local_files(one)
    assert files["NOTES.md"] == b"notes" and files["extra/keep.txt"] == b"keep"
    assert _rows_by_split(files, files["README.md"].decode()) == _local_rows(one)

    # What the Hub serves loads with exactly the pushed rows (the repo as stored on disk).
    from datasets import load_dataset

    stored = hub.repo_dir("curators/again")
    assert sorted(p.name for p in (stored / "data").iterdir()) == sorted(p.name for p in (one / "data").iterdir())
    ds = load_dataset(str(stored))
    assert {s: ds[s].num_rows for s in ds} == _local_rows(one)


def test_pushing_to_a_new_branch_drops_the_shards_it_inherits_from_main(
    hub: FakeHub, export_dir: Path, tmp_path: Path, cli: Any
) -> None:
    many = _export(tmp_path, cli, "many", "--shard-rows", "100")
    jsonl = _export(tmp_path, cli, "jsonl", "--to", "jsonl")
    assert cli("push", many, "--repo-id", "curators/branchy").exit_code == 0
    result = cli("push", jsonl, "--repo-id", "curators/branchy", "--revision", "v2")
    assert result.exit_code == 0, result.stderr

    v2 = hub.files("curators/branchy", "v2")  # created from main, with main's parquet shards
    assert {p for p in v2 if p.startswith("data/")} == _local_files(jsonl)
    (config,) = _front_matter(v2["README.md"].decode())["configs"]
    assert {f["path"] for f in config["data_files"]} == {"data/train-*.jsonl", "data/test-*.jsonl"}
    assert hub.commits[-1].deleted == sorted(_local_files(many))
    main = hub.files("curators/branchy", "main")  # the branch's push left main as it was
    assert {p for p in main if p.startswith("data/")} == _local_files(many)
