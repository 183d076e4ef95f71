"""Push an exported dataset to the Hugging Face Hub: shards, dataset card and recipe in ONE commit.

Why one commit: a dataset repo whose card describes shards that are not there yet (or the
other way round) is never visible to anyone; a failed push leaves the repo as it was.

What is uploaded from an export directory ``DIR``:

- ``data/<split>-*.parquet`` (or ``.jsonl``) in the Hub's dataset layout, so the Hub's
  viewer and ``datasets.load_dataset`` find the splits from the card's ``configs``;
- ``README.md``: the dataset card built from the manifests by ``prefcurate.card``, with a
  ``configs`` entry that matches the uploaded files;
- ``recipe.yaml``: the recipe the data was made with, when pushed from a recipe.

Pushing again (to the same repo, or to a branch created from ``main``) replaces the dataset:
``data/`` belongs to prefcurate, so the same commit deletes every file under ``data/`` of the
target revision that this export does not have (old shards, a split no longer exported, the
other file type), and after a push the revision's ``data/`` is exactly the export's: the
card's ``configs`` globs (``data/train-*.parquet``) match only the rows just exported.
Nothing outside ``data/`` is deleted: ``README.md`` is overwritten, ``recipe.yaml`` too when
one is pushed, and any other file (a user's own notes, ``.gitattributes``, other folders) is
left as it is.

The token comes from the usual Hub login (``hf auth login``) or ``HF_TOKEN``; it is never
read from a file of ours, never logged, and a push refuses to upload a text file that
contains it. ``HF_ENDPOINT`` is honoured at call time (a private Hub, or tests).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from prefcurate import __version__
from prefcurate.errors import InputError, MissingDependency, StageFailed
from prefcurate.shards import DATA_DIR, Manifest, require_stage_dir

DATA_SUFFIXES = (".parquet", ".jsonl")
_SPLIT = re.compile(r"^(?P<split>[A-Za-z][A-Za-z0-9_]*)-")


class PushConfig(BaseModel):
    """Where and how to push an exported dataset to the Hugging Face Hub."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    repo_id: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$",
        description="Dataset repository on the Hub, as ORG/NAME (created if missing).",
    )
    private: bool = Field(False, description="Create the repository as private (ignored if it already exists).")
    revision: str | None = Field(None, description="Branch to commit to (created from main if missing); default main.")
    commit_message: str | None = Field(None, description="Commit message; default names the dataset and row count.")


@dataclass
class PushFile:
    path_in_repo: str
    content: Path | bytes


def resolve_token() -> str:
    """The Hub token from the usual login or ``HF_TOKEN``; a one-line error when there is none."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise InputError(
            "no Hugging Face token found",
            "run `hf auth login`, or export HF_TOKEN=... with a token that can write to the repo",
        )
    return token


def hub_endpoint() -> str | None:
    """``HF_ENDPOINT`` read now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_ENDPOINT") or None


def data_files(directory: Path) -> list[PushFile]:
    """The exported shards, already named ``data/<split>-NNNNN-of-NNNNN.<ext>`` by export."""
    files = []
    for path in sorted((directory / DATA_DIR).iterdir() if (directory / DATA_DIR).is_dir() else []):
        if not path.is_file() or not path.name.endswith(DATA_SUFFIXES):
            continue
        files.append(PushFile(f"data/{path.name}", path))
    if not files:
        raise InputError(
            f"{directory}: no data files under {DATA_DIR}/", "push the output directory of `prefcurate export`"
        )
    return files


def stale_data_files(remote_files: list[str], files: list[PushFile]) -> list[str]:
    """Files under ``data/`` in the target revision that the export does not have: the push deletes them.

    ``remote_files`` are the revision's file paths; only paths under ``data/`` are ever returned,
    so files a user keeps elsewhere in the repo survive a push.
    """
    keep = {f.path_in_repo for f in files}
    return sorted(p for p in remote_files if p.startswith(f"{DATA_DIR}/") and p not in keep)


def split_configs(files: list[PushFile]) -> list[dict[str, Any]]:
    """The card's ``configs`` entry: one data_files pattern per split found in the file names."""
    splits: dict[str, set[str]] = {}
    for f in files:
        name = f.path_in_repo.split("/", 1)[1]
        m = _SPLIT.match(name)
        split = m["split"] if m else "train"
        suffix = next(s for s in DATA_SUFFIXES if name.endswith(s))
        splits.setdefault(split, set()).add(suffix)
    data = [
        {"split": s, "path": f"data/{s}-*{next(iter(sfx))}" if len(sfx) == 1 else f"data/{s}-*"}
        for s, sfx in sorted(splits.items())
    ]
    return [{"config_name": "default", "data_files": data}]


def with_configs(card: str, configs: list[dict[str, Any]]) -> str:
    """Set ``configs`` in the card's YAML front matter to what is uploaded (the files decide)."""
    m = re.match(r"---\n(.*?)\n---\n?", card, re.S)
    meta = (yaml.safe_load(m.group(1)) or {}) if m else {}
    body = card[m.end() :] if m else card
    meta["configs"] = configs
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()
    return f"---\n{front}\n---\n{body if body.startswith(chr(10)) else chr(10) + body}"


def build_push_card(directory: Path, configs: list[dict[str, Any]], repo_id: str, recipe_name: str | None) -> str:
    """``prefcurate.card``'s card, with configs matching the upload and the repo id filled in."""
    from prefcurate.card import build_card

    card = with_configs(build_card(directory), configs).replace(
        'load_dataset("<user>/<repo>")', f'load_dataset("{repo_id}")'
    )
    if recipe_name:
        card = card.rstrip("\n") + (
            "\n\n## Reproduce\n\n"
            f"`{recipe_name}` in this repository is the recipe this dataset was made with. Point its "
            "`input.sources` at your copy of the raw data, then:\n\n"
            f"```bash\npip install prefcurate\nprefcurate pipeline {recipe_name}\n```\n"
        )
    return card


def collect_files(directory: Path, repo_id: str, recipe_path: Path | None = None) -> list[PushFile]:
    files = data_files(directory)
    recipe_name = "recipe.yaml" if recipe_path is not None else None
    card = build_push_card(directory, split_configs(files), repo_id, recipe_name)
    files.append(PushFile("README.md", card.encode("utf-8")))
    if recipe_path is not None:
        if not Path(recipe_path).is_file():
            raise InputError(f"{recipe_path}: no such recipe file")
        files.append(PushFile("recipe.yaml", Path(recipe_path).read_bytes()))
    return files


def _check_no_token(files: list[PushFile], token: str) -> None:
    """Refuse to publish a card or recipe that contains the token (a recipe written with it inline)."""
    needle = token.encode()
    for f in files:
        blob = f.content if isinstance(f.content, bytes) else None
        if blob is not None and needle in blob:
            raise InputError(
                f"{f.path_in_repo} contains your Hub token; refusing to upload it",
                "remove the token from the recipe and use `hf auth login` or HF_TOKEN",
            )


def push_dataset(
    directory: str | Path,
    config: PushConfig,
    *,
    recipe_path: str | Path | None = None,
    token: str | None = None,
) -> str:
    """Upload an export directory as a Hub dataset in one commit; returns the dataset's URL."""
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise MissingDependency("huggingface_hub", purpose="pushing to the Hub") from None
    directory = require_stage_dir(directory)
    manifest = Manifest.load(directory)
    if manifest.stage != "export":
        raise InputError(
            f"{directory}: a {manifest.stage} directory, not an export", "run `prefcurate export` on it first"
        )
    token = token or resolve_token()
    files = collect_files(directory, config.repo_id, Path(recipe_path) if recipe_path else None)
    _check_no_token(files, token)
    message = (
        config.commit_message
        or f"Upload {config.repo_id.split('/')[1]} ({manifest.rows_out} pairs) with prefcurate {__version__}"
    )
    return _upload(files, config, token, message)


def _upload(files: list[PushFile], config: PushConfig, token: str, message: str) -> str:
    import httpx
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint, token=token, library_name="prefcurate", library_version=__version__)
    where = f"{api.endpoint}/datasets/{config.repo_id}"
    try:
        api.create_repo(config.repo_id, repo_type="dataset", private=config.private, exist_ok=True)
        if config.revision and config.revision != "main":
            api.create_branch(config.repo_id, branch=config.revision, repo_type="dataset", exist_ok=True)
        operations: list[Any] = [
            CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=_as_upload(f.content)) for f in files
        ]
        # An earlier push's shards the card's globs would otherwise pick up: deleted in this same commit.
        remote = api.list_repo_files(config.repo_id, repo_type="dataset", revision=config.revision)
        stale = stale_data_files(remote, files)
        operations += [CommitOperationDelete(path_in_repo=p, is_folder=False) for p in stale]
        info = api.create_commit(
            config.repo_id,
            operations,
            commit_message=message,
            repo_type="dataset",
            revision=config.revision,
        )
    except OfflineModeIsEnabled:
        raise InputError("HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE to push to the Hub") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        first = str(exc).splitlines()[0]
        if status in (401, 403):
            raise InputError(
                f"{where}: the Hub refused the token ({first})", "check the token can write to this namespace"
            ) from None
        raise StageFailed(
            f"{where}: push failed ({first})", "nothing was committed; rerun `prefcurate push` to retry"
        ) from None
    except httpx.HTTPError as exc:
        raise StageFailed(
            f"cannot reach {api.endpoint} ({type(exc).__name__})", "check the network or HF_ENDPOINT, then rerun"
        ) from None
    url = where if not config.revision else f"{where}/tree/{config.revision}"
    removed = f"; {len(stale)} data file(s) of an earlier push removed" if stale else ""
    return f"{url} (commit {info.oid[:8]}{removed})"


def _as_upload(content: Path | bytes) -> str | bytes:
    return str(content) if isinstance(content, Path) else content


def push_from_recipe(output_dir: str | Path, push_cfg: dict[str, Any], recipe: Any) -> str:
    """Called by the runner when a recipe has ``output.push``; errors name ``output.push.<key>``."""
    config = push_config(push_cfg)
    return push_dataset(output_dir, config, recipe_path=getattr(recipe, "path", None))


def push_config(push_cfg: dict[str, Any] | str) -> PushConfig:
    """Validate a recipe's ``output.push`` (a mapping, or just ``ORG/NAME``)."""
    from prefcurate.recipe import validate_config

    if isinstance(push_cfg, str):
        push_cfg = {"repo_id": push_cfg}
    return validate_config(PushConfig, push_cfg, "output.push")
