"""The dataset card (``README.md``) of an export directory, from its manifest alone.

A library function with no CLI dependency: ``export`` writes the card before publishing its
directory, and ``push`` may rebuild it. Everything in it comes from ``manifest.json``: the
lineage (one entry per stage: options, counts, reject reasons, wall time, stage figures) and
the figures the export stage accumulated while writing (length bias in characters, ties,
margin histogram, sources), so building a card never reads the data again.

Hub metadata (YAML front matter): ``license`` (the export's ``license`` option, ``other`` by
default), ``task_categories``, ``tags``, ``size_categories`` (from the rows written) and
``configs`` pointing each split at its files, so ``load_dataset`` on the Hub repo or the
directory finds the splits without guessing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PureWindowsPath
from typing import Any

import yaml

from prefcurate.shards import Manifest

README = "README.md"
BAR = "█"
_SIZE_BUCKETS = [
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
]
_FORMATS = {
    "trl": "TRL standard preference format: `prompt`, `chosen`, `rejected` as plain strings.",
    "trl-chat": (
        "TRL conversational preference format: `prompt`, `chosen`, `rejected` as lists of `{role, content}` messages."
    ),
    "openrlhf": (
        "OpenRLHF reward/DPO layout: `chosen` and `rejected` are whole conversations (prompt messages + response); "
        "`prompt` holds the prompt messages."
    ),
    "kto": (
        "TRL unpaired (KTO) conversational format: `prompt`, `completion`, `label` (true = desirable); "
        "each pair gives two adjacent rows sharing its `id`."
    ),
}
_TRAIN_HINTS = {
    "trl": "`trl.DPOTrainer` / `trl.RewardTrainer` take it as is.",
    "trl-chat": "`trl.DPOTrainer` / `trl.RewardTrainer` apply the model's chat template to it.",
    "openrlhf": (
        "OpenRLHF: `--dataset <repo or dir> --apply_chat_template --chosen_key chosen --rejected_key rejected` "
        "(no `--prompt_key`: the prompt is already in both conversations); `margin` feeds the margin loss."
    ),
    "kto": "`trl.KTOTrainer` takes it as is.",
}


def size_category(rows: int) -> str:
    for limit, name in _SIZE_BUCKETS:
        if rows < limit:
            return name
    return "n>1B"


def front_matter(manifest: Manifest, title: str) -> dict[str, Any]:
    params, extra = manifest.params, manifest.extra
    files = extra.get("files") or {"train": []}
    ext = params.get("to", "parquet")
    tags = ["dpo", "rlhf", "preference"] + (["kto"] if params.get("format") == "kto" else [])
    return {
        "license": params.get("license") or "other",
        "pretty_name": title,
        "task_categories": ["text-generation"],
        "tags": tags,
        "size_categories": [size_category(int(extra.get("rows_written_total", manifest.rows_out)))],
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": split, "path": f"data/{split}-*.{ext}"} for split in files],
            }
        ],
    }


def _fmt_value(value: Any, limit: int = 60) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, dict | list):
        text = json.dumps(value, default=str, separators=(",", ":"))
    else:
        text = str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and len(value) <= 12:
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


_LOCAL = ("/", "~", "./", "../")
# ``hf:/models/rm``, ``embedding-bt:./minilm``: a member spec (``prefix:``) naming a local path.
# ``//`` after the colon is a URL (``http://host/...``), left as it is; ``hf:org/name`` is a Hub id.
_SPEC_PATH = re.compile(r"^(?P<prefix>[A-Za-z][\w.+-]*):(?P<path>(?:/(?!/)|~|\.\.?/).*)$", re.S)
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def _public(value: Any) -> Any:
    """Local paths become file names: a card is published, the machine's layout is not.

    A path is a string starting with ``/``, ``~``, ``./``, ``../``, a drive (``C:\\``) or
    ``file://``, or such a path after a member prefix (``hf:/tmp/x/tiny-rm`` ->
    ``hf:tiny-rm``). Hub ids (``hf:org/name``), URLs and other strings are kept.
    """
    if isinstance(value, list | tuple):
        return [_public(v) for v in value]
    if isinstance(value, dict):
        return {_public(k): _public(v) for k, v in value.items()}
    if not isinstance(value, str):
        return value
    if value.startswith(_LOCAL):
        return Path(value).name
    if _DRIVE.match(value):
        return PureWindowsPath(value).name
    if value.startswith("file://"):
        return Path(value.removeprefix("file://")).name
    if m := _SPEC_PATH.match(value):
        return f"{m['prefix']}:{Path(m['path']).name}"
    return value


def _options(params: dict[str, Any]) -> str:
    shown = {k: _public(v) for k, v in params.items() if v not in (None, False, [], {}, "")}
    return ", ".join(f"{k}={_fmt_value(v, 40)}" for k, v in shown.items()) or "-"


def _extras(entry: dict[str, Any]) -> str:
    extra = {k: v for k, v in (entry.get("extra") or {}).items() if k not in ("figures", "files")}
    flat = {k: v for k, v in _flatten(_public(extra)).items() if v is not None}  # paths as keys too
    return "; ".join(f"{k}={_fmt_value(v, 40)}" for k, v in flat.items()) or "-"


def lineage_table(manifest: Manifest) -> str:
    rows = [
        "| stage | options | rows in | rows out | rejected | reject reasons | seconds | figures |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    for e in manifest.lineage or [manifest.summary()]:
        reasons = ", ".join(
            f"{k}: {v:,}" for k, v in sorted((e.get("reject_reasons") or {}).items(), key=lambda kv: -kv[1])
        )
        rows.append(
            f"| {e['stage']} | {_options(e.get('params') or {})} | {e.get('rows_in', 0):,} | {e.get('rows_out', 0):,} "
            f"| {e.get('rows_rejected', 0):,} | {reasons or '-'} | {e.get('wall_seconds', 0):.1f} | {_extras(e)} |"
        )
    return "\n".join(rows)


def histogram_table(hist: list[dict[str, Any]], width: int = 30) -> str:
    top = max((h["count"] for h in hist), default=0) or 1
    rows = ["| from | to | pairs | |", "|---:|---:|---:|---|"]
    for h in hist:
        bar = BAR * round(width * h["count"] / top)
        rows.append(f"| {h['lo']:.3g} | {h['hi']:.3g} | {h['count']:,} | {bar} |")
    return "\n".join(rows)


def _bias_section(extra: dict[str, Any]) -> list[str]:
    figures = extra.get("figures") or {}
    bias = figures.get("length_bias") or {}
    ties = extra.get("ties") or {}
    out = ["## Length bias and ties", ""]
    if bias.get("pairs"):
        out.append(
            f"- Chosen is longer than rejected in **{bias['share_chosen_longer']:.1%}** of {bias['pairs']:,} pairs "
            f"(rejected longer: {bias['rejected_longer']:,}, same length: {bias['equal']:,}; lengths in characters, "
            f"mean difference {bias['mean_difference']:+.1f}). "
            "A share far from 50% lets a model learn length instead of quality."
        )
    count = ties.get("count", 0)
    policy = "dropped (see `rejects/`)" if ties.get("policy") == "drop" else "kept, marked in the `tie` column"
    out.append(f"- Ties (both responses rated equal) in the input: **{count:,}**" + (f", {policy}." if count else "."))
    return out


def _margin_section(extra: dict[str, Any]) -> list[str]:
    margin = ((extra.get("figures") or {}).get("scores") or {}).get("margin")
    if not margin or not margin.get("count"):
        return []
    source = extra.get("margin_from")
    how = (
        "the score stage's ensemble margin (`margin_mean`)"
        if source == "margin_mean"
        else "the judge's preference, as logit(`judge_pref`)"
    )
    out = ["## Preference strength", "", f"`margin` is {how}; positive means the chosen response is preferred.", ""]
    out.append(
        f"Mean {margin['mean']:.3f}, median {margin.get('p50', float('nan')):.3f}, {margin['count']:,} pairs scored."
    )
    if margin.get("histogram"):
        out += ["", histogram_table(margin["histogram"])]
    return out


def _load_section(manifest: Manifest, front: dict[str, Any]) -> list[str]:
    fmt = manifest.params.get("format", "trl-chat")
    ext = manifest.params.get("to", "parquet")
    builder = "json" if ext == "jsonl" else "parquet"
    files = ", ".join(f'"{f["split"]}": "data/{f["split"]}-*.{ext}"' for f in front["configs"][0]["data_files"])
    return [
        "## Format and loading",
        "",
        _FORMATS.get(fmt, fmt)
        + " Every row keeps `id` (the pair's id) and `source`"
        + ("; `margin` the preference strength" if manifest.extra.get("margin_from") else "")
        + ".",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        'ds = load_dataset("<user>/<repo>")  # once pushed to the Hub',
        f'ds = load_dataset("{builder}", data_files={{{files}}})  # from this directory',
        "```",
        "",
        _TRAIN_HINTS.get(fmt, ""),
    ]


def build_card(out_dir: str | Path, title: str | None = None) -> str:
    """The README.md text of an export directory (its manifest must be written)."""
    out_dir = Path(out_dir)
    manifest = Manifest.load(out_dir)
    title = title or manifest.params.get("name") or out_dir.name
    front = front_matter(manifest, title)
    extra = manifest.extra
    written = extra.get("rows_written") or {}
    sources = (extra.get("figures") or {}).get("sources") or {}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {title}",
        "",
        f"Preference pairs (prompt, chosen, rejected) for reward-model, DPO and RLHF training, curated with "
        f"prefcurate and exported as `{manifest.params.get('format')}` ({manifest.params.get('to')}). "
        f"{manifest.rows_out:,} pairs, {extra.get('rows_written_total', manifest.rows_out):,} rows "
        f"({', '.join(f'{s}: {n:,}' for s, n in written.items()) or 'no files'}).",
        "",
        "## Sources",
        "",
        "| source | pairs |",
        "|---|---:|",
        *[f"| {_fmt_value(_public(s), 80)} | {n:,} |" for s, n in sources.items()],
        "",
        "## How it was made",
        "",
        "Each stage read the previous stage's output; removed rows were kept with their reason "
        "in each stage's `rejects/`.",
        "",
        lineage_table(manifest),
        "",
        *_bias_section(extra),
        "",
        *_margin_section(extra),
        "",
        *_load_section(manifest, front),
        "",
    ]
    return "\n".join(lines)


def write_card(out_dir: str | Path, title: str | None = None) -> Path:
    path = Path(out_dir) / README
    path.write_text(build_card(out_dir, title), encoding="utf-8")
    return path
