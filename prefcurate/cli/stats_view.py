"""Render ``prefcurate.stats.compute_stats`` figures with rich: tables and horizontal bars.

The report goes to **stdout** (it is the command's result: ``prefcurate stats DIR | less -R``
or ``> report.txt`` work); errors still go to stderr. ``--json`` prints the same figures as
JSON instead. Bars use eighth-block characters so small differences stay visible.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

_EIGHTHS = " ▏▎▍▌▋▊▉"
BAR_WIDTH = 30


def bar(value: float, top: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar of ``value / top`` of ``width`` cells, to an eighth of a cell."""
    if top <= 0 or value <= 0:
        return ""
    eighths = round(8 * width * min(value / top, 1.0))
    full, part = divmod(eighths, 8)
    return "█" * full + (_EIGHTHS[part] if part else "")


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _table(title: str, *columns: str, right: tuple[int, ...] = ()) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold")
    for i, col in enumerate(columns):
        table.add_column(col, justify="right" if i in right else "left", overflow="fold")
    return table


def _overview(f: dict[str, Any]) -> Table:
    table = _table(f"prefcurate stats: {f.get('directory')}", "figure", "value")
    table.add_row("stage", str(f.get("stage") or "(no manifest)"))
    if f.get("format"):
        table.add_row("export format", f["format"])
    table.add_row("rows", _num(f.get("rows", 0)))
    bias = f.get("length_bias")
    if bias and bias.get("pairs"):
        share = bias["share_chosen_longer"]
        table.add_row("chosen longer (length bias)", f"{_pct(share)}  {bar(share, 1.0, 20)}")
        table.add_row("rejected longer / same length", f"{bias['rejected_longer']:,} / {bias['equal']:,}")
        table.add_row(f"mean length difference ({f.get('unit')})", _num(bias["mean_difference"]))
    if f.get("ties"):
        table.add_row("ties", f"{f['ties']['count']:,} ({_pct(f['ties']['share'])})")
    if f.get("labels"):
        table.add_row("labels (desirable / undesirable)", f"{f['labels']['true']:,} / {f['labels']['false']:,}")
    if f.get("rejects"):
        table.add_row("rejected upstream (all stages)", _num(f["rejects"]["total"]))
    return table


def _sources(f: dict[str, Any], limit: int = 15) -> Table | None:
    sources = f.get("sources") or {}
    if not sources:
        return None
    total = sum(sources.values()) or 1
    top = max(sources.values())
    table = _table("sources", "source", "rows", "share", "", right=(1, 2))
    for name, n in list(sources.items())[:limit]:
        table.add_row(name, f"{n:,}", _pct(n / total), bar(n, top))
    if len(sources) > limit:
        table.add_row(f"... {len(sources) - limit} more", "", "", "")
    return table


def _lengths(f: dict[str, Any]) -> list[Table]:
    lengths = {c: d for c, d in (f.get("lengths") or {}).items() if d.get("count")}
    if not lengths:
        return []
    unit = f.get("unit", "words")
    summary = _table(f"lengths ({unit})", "column", "mean", "p5", "p50", "p95", "max", right=(1, 2, 3, 4, 5))
    for col, d in lengths.items():
        summary.add_row(col, _num(d["mean"]), *(_num(d[k]) for k in ("p5", "p50", "p95", "max")))
    out = [summary]
    for col, d in lengths.items():
        hist = [h for h in d["histogram"] if h["count"]]
        top = max((h["count"] for h in hist), default=0)
        table = _table(f"{col} length histogram ({unit}, log2 bins)", unit, "rows", "", right=(1,))
        for h in hist:
            label = str(h["lo"]) if h["lo"] == h["hi"] else f"{h['lo']:,}-{h['hi']:,}"
            table.add_row(label, f"{h['count']:,}", bar(h["count"], top))
        out.append(table)
    return out


def _scores(f: dict[str, Any], bins: int = 10) -> list[Table]:
    scores = f.get("scores") or {}
    if not scores:
        return []
    summary = _table(
        "scores", "column", "n", "nulls", "mean", "std", "p5", "p50", "p95", "min", "max", right=tuple(range(1, 10))
    )
    for col, d in scores.items():
        summary.add_row(
            col,
            _num(d["count"]),
            _num(d["nulls"]),
            *(_num(d.get(k)) for k in ("mean", "std", "p5", "p50", "p95", "min", "max")),
        )
    out = [summary]
    for col, d in scores.items():
        hist = d.get("histogram")
        if not hist:
            continue
        # Merge the fixed bins pairwise into ``bins`` rows: enough to see the shape.
        step = max(1, len(hist) // bins)
        merged = [
            {
                "lo": hist[i]["lo"],
                "hi": hist[min(i + step, len(hist)) - 1]["hi"],
                "count": sum(h["count"] for h in hist[i : i + step]),
            }
            for i in range(0, len(hist), step)
        ]
        top = max(h["count"] for h in merged)
        table = _table(f"{col} histogram", "from", "to", "rows", "", right=(0, 1, 2))
        for h in merged:
            table.add_row(_num(h["lo"], 3), _num(h["hi"], 3), f"{h['count']:,}", bar(h["count"], top))
        out.append(table)
    return out


def _agreement(f: dict[str, Any]) -> list[Table]:
    agreement = f.get("agreement")
    if not agreement:
        return []
    pairs = _table(
        "ensemble member agreement", "member a", "member b", "pairs", "pearson", "same sign", right=(2, 3, 4)
    )
    for p in agreement["pairs"]:
        pairs.add_row(p["a"], p["b"], _num(p["n"]), _num(p["pearson"], 3), _pct(p["sign_agreement"]))
    label = _table("agreement with the given label (margin > 0)", "member", "share", "", right=(1,))
    for member, share in agreement["label_agreement"].items():
        label.add_row(member, _pct(share), bar(share or 0.0, 1.0, 20))
    return [pairs, label]


def _rejects(f: dict[str, Any]) -> Table | None:
    rejects = f.get("rejects")
    if not rejects or not rejects["by_stage"]:
        return None
    table = _table("rejects by stage", "stage", "rows", "reasons", "read from", right=(1,))
    for s in rejects["by_stage"]:
        reasons = ", ".join(f"{k} {v:,}" for k, v in s["reasons"].items()) or "-"
        table.add_row(s["stage"], f"{s['total']:,}", reasons, s["from"])
    return table


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _extras(f: dict[str, Any], limit: int = 40) -> list[Table]:
    out = []
    for entry in f.get("lineage") or []:
        # The export's "figures" are what this report shows from the data itself.
        extra = {k: v for k, v in (entry.get("extra") or {}).items() if k != "figures"}
        if not extra:
            continue
        table = _table(f"{entry['stage']}: stage figures", "key", "value")
        items = _flatten(extra)
        for key, value in items[:limit]:
            text = json.dumps(value, default=str) if isinstance(value, list | dict) else _num(value)
            table.add_row(key, text if len(text) <= 120 else text[:119] + "…")
        if len(items) > limit:
            table.add_row(f"... {len(items) - limit} more", "(see --json)")
        out.append(table)
    return out


def render_stats(figures: dict[str, Any], console: Console | None = None) -> None:
    """Print every figure present; sections without data are left out."""
    console = console or Console()
    sections: list[Any] = [_overview(figures), _sources(figures), *_lengths(figures), *_scores(figures)]
    sections += [*_agreement(figures), _rejects(figures), *_extras(figures)]
    for section in sections:
        if section is not None:
            console.print(section)
            console.print()
