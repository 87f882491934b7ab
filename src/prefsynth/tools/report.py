"""``prefsynth report OUTDIR``: one self-contained HTML page about a finished run.

The page answers the questions to ask before training on the pairs: did the judge work (rating
spread, failures, re-asks), which models win and how sure we are (bootstrap CIs over prompts),
does the judge prefer longer answers or certain positions, and what do pairs look like. It is
read from the output folder alone (no store, no config), so it works on any copied folder.

Figures are matplotlib PNGs embedded as base64 and CSS is inline: the file can be mailed or
attached to a dataset repo without anything else. Every piece of text from the data (prompts,
responses, model names, judge errors) is untrusted and goes through ``html.escape``, and
figures draw it with mathtext off (a model named ``a $x^$`` is a name, not a formula).
The numbers come from ``report_stats`` (pure, unit-tested); this module only loads and draws.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from prefsynth.errors import InputError, MissingExtraError
from prefsynth.output.facts import MixtureFacts, RunFacts
from prefsynth.output.files import write_text
from prefsynth.stages.pairs import position_spreads
from prefsynth.tools.report_stats import (
    judge_stats,
    leaderboard,
    length_stats,
    position_stats,
    rating_distribution,
    sample_pairs,
)

FILES = ("run.json", "pairs/train.parquet", "annotations/train.parquet",
         "judgments/train.parquet")
MAX_CHARS = 3000  # per response in the sample; the dataset holds the full text

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;display:block;margin:.6em 0}.note{color:#666;font-style:italic}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:1em;margin-bottom:2em}
.pair>div{border:1px solid #ccc;border-radius:4px;padding:.5em}
.chosen{background:#f3fbf3}.rejected{background:#fdf4f4}
pre{white-space:pre-wrap;word-wrap:break-word;max-height:24em;overflow:auto;background:#fafafa;
padding:.5em;margin:.3em 0;font-size:.88em}
"""


def _esc(x: object) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _ci(row: dict[str, Any], key: str) -> str:
    if row[key] is None:
        return "–"
    return f"{_fmt(row[key])} [{_fmt(row[key + '_lo'])}, {_fmt(row[key + '_hi'])}]"


def _table(header: list[str] | None, rows: list[list[object]], numeric_from: int = 1) -> str:
    """An HTML table; every cell escaped, columns from ``numeric_from`` right-aligned."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header or [])
    body = "".join(
        "<tr>" + "".join(f"<td{' class=n' if i >= numeric_from else ''}>{_esc(c)}</td>"
                         for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{f'<tr>{head}</tr>' if head else ''}{body}</table>"


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def load_outdir(outdir: Path) -> tuple[RunFacts, list[dict[str, Any]],
                                       list[dict[str, Any]], list[dict[str, Any]]]:
    """(run.json, pairs rows, annotation rows, judgment rows); InputError names what's missing."""
    import pyarrow.parquet as pq

    if not outdir.is_dir():
        raise InputError(f"{outdir}: no such output folder (run `prefsynth run` first)")
    facts = RunFacts.load(outdir / "run.json")
    # a `prefsynth mix` output carries no judgments: its judge sections say so
    optional = {"judgments/train.parquet"} if isinstance(facts, MixtureFacts) else set()
    for rel in FILES:
        if not (outdir / rel).is_file() and rel not in optional:
            raise InputError(f"{outdir / rel}: missing; not a complete prefsynth output folder")
    tables: list[list[dict[str, Any]]] = []
    for rel in FILES[1:]:
        if not (outdir / rel).is_file():
            tables.append([])
            continue
        try:
            tables.append(pq.read_table(outdir / rel).to_pylist())
        except Exception as e:  # pyarrow raises several types for a truncated/corrupt file
            raise InputError(f"{outdir / rel}: unreadable parquet ({e})") from None
    return facts, tables[0], tables[1], tables[2]


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{_esc(fig.get_label())}" src="data:image/png;base64,{data}">'


def _fig_ratings(dist: dict[str, dict[str, int]]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), label="rating distribution")
    ax = fig.add_subplot()
    labels: list[str] = []
    for counts in dist.values():  # every aspect has 1..5, N/A, missing; keep first-seen order
        labels += [x for x in counts if x not in labels]
    width = 0.8 / len(dist)
    for i, (aspect, counts) in enumerate(dist.items()):
        xs = [x + (i - (len(dist) - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, [counts.get(k, 0) for k in labels], width, label=aspect)
    ax.set_xticks(range(len(labels)), labels)
    ax.set(title="Judge ratings per aspect", xlabel="rating", ylabel="responses rated")
    ax.legend(fontsize=8)
    return fig


def _fig_leaderboard(board: list[dict[str, Any]], k: int | None) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 0.8 + 0.45 * max(len(board), 2)), label="leaderboard")
    axes = fig.subplots(1, 2, sharey=True)
    names = [r["model"] for r in board][::-1]
    for ax, key, title in ((axes[0], "score", "Mean score (95% CI)"),
                           (axes[1], "win_rate", "Win rate as chosen (95% CI)")):
        rows = board[::-1]
        ys = [i for i, r in enumerate(rows) if r[key] is not None]
        vals = [rows[i][key] for i in ys]
        err = [[rows[i][key] - rows[i][key + "_lo"] for i in ys],
               [rows[i][key + "_hi"] - rows[i][key] for i in ys]]
        ax.errorbar(vals, ys, xerr=err, fmt="o", capsize=4)
        ax.set(title=title, xlabel="score (1–5)" if key == "score" else "fraction of prompts")
        ax.grid(axis="x", alpha=0.3)
        if key == "win_rate":
            ax.set_xlim(-0.02, 1.02)
            if k:
                ax.axvline(1 / k, ls="--", color="grey", label=f"chance (1/{k})")
                ax.legend(fontsize=8)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].set_ylim(-0.6, len(names) - 0.4)
    return fig


def _fig_length(ls: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5), label="length bias")
    ax = fig.add_subplot()
    ax.scatter(ls["rejected_chars"], ls["chosen_chars"], s=14, alpha=0.6)
    top = max([*ls["rejected_chars"], *ls["chosen_chars"], 1])
    ax.plot([0, top], [0, top], ls="--", color="grey", label="equal length")
    ax.set(title=f"Chosen vs rejected length (chosen longer in {_pct(ls['chosen_longer'])})",
           xlabel="rejected response (characters)", ylabel="chosen response (characters)")
    ax.legend(fontsize=8)
    return fig


def _fig_positions(pos: dict[str, list[dict[str, Any]]]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), label="position bias")
    ax = fig.add_subplot()
    lo, hi = 1.0, 5.0
    for i, (aspect, rows) in enumerate(pos.items()):
        pts = [r for r in rows if r["mean"] is not None]
        shift = (i - (len(pos) - 1) / 2) * 0.06  # keep overlapping aspects apart
        ax.errorbar([r["position"] + shift for r in pts], [r["mean"] for r in pts],
                    yerr=[1.96 * r["se"] for r in pts], marker="o", capsize=3, label=aspect)
        lo = min([lo, *(r["mean"] for r in pts)])
        hi = max([hi, *(r["mean"] for r in pts)])
    width = max(len(rows) for rows in pos.values())
    ax.set_xticks(range(1, width + 1))
    ax.set_ylim(lo - 0.2, hi + 0.2)  # the whole scale: a zoomed axis would exaggerate a bias
    ax.set(title="Mean rating by position shown to the judge (±1.96 SE)",
           xlabel="shown as text N", ylabel="mean rating")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _overview(facts: RunFacts) -> str:
    p, judge = facts.prompts, facts.judge
    drop = ", ".join(f"{k}: {v}" for k, v in sorted(facts.dropped.items())) or "none"
    rows: list[list[object]] = [
        ["prompts read / kept", f"{p.read} / {p.kept}"],
        ["pairs out", facts.pairs], ["dropped", drop],
        ["judge", f"{judge.name} ({judge.backend}: {judge.model}, licence {judge.license})"],
        ["aspects", ", ".join(judge.aspects)],
        ["judge mode / permutations / temperature",
         f"{judge.mode} / {judge.permutations} / {judge.temperature}"],
        ["pairing", json.dumps(facts.pairing.model_dump())],
        ["responses per prompt", facts.responses_per_prompt], ["seed", facts.seed]]
    out = "<h2>Overview</h2>" + _table(None, rows, numeric_from=2)
    if not facts.complete:
        failed = f" ({facts.failed_requests} failed)" if facts.failed_requests else ""
        out += _note(f"The run is incomplete: some requests are still pending or failed{failed}.")
    models = [[m.name, m.backend, m.model, m.license, m.responses, m.failed, m.chosen,
               m.rejected] for m in facts.models]
    return out + _table(["model", "backend", "id", "licence", "responses", "failed", "chosen",
                         "rejected"], models, numeric_from=4)


def _sample_html(pairs: list[dict[str, Any]], ann: list[dict[str, Any]], aspects: list[str],
                 k: int, seed: int) -> str:
    by_key = {(r["prompt_id"], r["model"]): r for r in ann}
    out = []
    for p in sample_pairs(pairs, k, seed):
        cols = []
        for role in ("chosen", "rejected"):
            model = p[f"{role}_model"]
            text = (p[role] or [{}])[-1].get("content") or ""
            more = len(text) - MAX_CHARS
            a = by_key.get((p["id"], model), {})
            per = ", ".join(f"{x} {_fmt(a.get(f'{x}_rating'), 1)}" for x in aspects)
            cols.append(f'<div class="{role}"><b>{role}</b>: {_esc(model)} — score '
                        f"{_fmt(p[f'{role}_rating'])}<br><small>{_esc(per)}</small>"
                        f"<pre>{_esc(text[:MAX_CHARS])}</pre>"
                        + (_note(f"… {more} more characters") if more > 0 else "") + "</div>")
        out.append(f"<h3>{_esc(p['id'])}</h3><pre>{_esc(p['prompt'])}</pre>"
                   f'<div class="pair">{"".join(cols)}</div>')
    return "".join(out) or _note("No pairs to show.")


def _plt_available() -> None:
    try:
        import matplotlib  # noqa: F401
        import numpy  # noqa: F401
    except ImportError:
        raise MissingExtraError("prefsynth report", "report") from None


def write_report(outdir: str | Path, *, sample: int = 8, seed: int = 0,
                 n_boot: int = 1000) -> tuple[Path, str]:
    """Write ``OUTDIR/report.html``; return its path and a short plain-text summary."""
    _plt_available()
    import matplotlib

    outdir = Path(outdir)
    facts, pairs, ann, judg = load_outdir(outdir)
    board, ls = leaderboard(ann, pairs, n_boot, seed), length_stats(pairs)
    pos, js = position_stats(judg), judge_stats(judg)
    # labels are data (model and aspect names), never TeX: mathtext off for every text
    with matplotlib.rc_context({"text.parse_math": False}):
        parts = [f"<h1>prefsynth report: {_esc(facts.name)}</h1>", _overview(facts),
                 *_judge_and_models(facts, judg, board, n_boot, seed),
                 *_biases(ls, pos)]
    ov = js["overall"]
    parts.append("<h2>Judge reliability</h2>" + _note(
        "failed: the judgment was recorded with an error (after any re-asks) and its prompt "
        "dropped. re-asked: attempts > 1, the first answer was unusable.") + _table(
        ["aspect", "judgments", "failed", "failure rate", "re-asked", "re-ask rate"],
        [[a, s["n"], s["failed"], _pct(s["failure_rate"]), s["reasked"], _pct(s["reask_rate"])]
         for a, s in [("all", ov), *js["aspects"].items()]]))
    parts.append(_table(["error kind", "count", "example"],
                        [[e["kind"], e["count"], e["example"][:300]] for e in js["errors"]],
                        numeric_from=1) if js["errors"] else _note("No judge errors."))
    aspects = facts.judge.aspects or sorted({str(j["aspect"]) for j in judg})
    parts.append("<h2>Sample pairs</h2>" + _sample_html(pairs, ann, aspects, sample, seed))
    page = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>prefsynth report: {_esc(facts.name)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    path = outdir / "report.html"
    write_text(path, page)
    return path, _summary(path, facts, board, ls, pos, ov)


def _judge_and_models(facts: RunFacts, judg: list[dict[str, Any]], board: list[dict[str, Any]],
                      n_boot: int, seed: int) -> list[str]:
    """The rating distribution and the model leaderboard."""
    dist = rating_distribution(judg)
    parts = ["<h2>Rating distribution</h2>",
             _png(_fig_ratings(dist)) if dist else _note("No judgments.")]
    parts.append("<h2>Model leaderboard</h2>" + _note(
        "score: mean of each response's aggregated judge score (aspects averaged per the pairing "
        "policy). win rate: times chosen ÷ times the model's response competed for a prompt that "
        "produced a pair (chance is 1/k with k responses per prompt). pair win rate: times "
        "chosen ÷ times in a pair. Brackets: 95% percentile bootstrap CI, "
        f"{n_boot} resamples of prompts, seed {seed}."))
    if board:
        parts.append(_table(
            ["model", "responses", "mean score [95% CI]", "win rate [95% CI]", "competed",
             "chosen", "pair win rate [95% CI]", "in pairs"],
            [[r["model"], r["responses"], _ci(r, "score"), _ci(r, "win_rate"), r["competed"],
              r["chosen"], _ci(r, "pair_win_rate"), r["in_pairs"]] for r in board]))
        if any(r["score"] is not None for r in board):
            parts.append(_png(_fig_leaderboard(board, facts.responses_per_prompt)))
    else:
        parts.append(_note("No annotated responses."))
    return parts


def _biases(ls: dict[str, Any], pos: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Length bias and position bias."""
    parts = ["<h2>Length bias</h2>"]
    if ls["n"]:
        parts.append(_table(["", "chosen", "rejected"], [
            [f"mean {u}", _fmt(ls[f"mean_chosen_{u}"], 0), _fmt(ls[f"mean_rejected_{u}"], 0)]
            for u in ("chars", "words")]))
        parts.append(_note(f"Chosen is longer (in characters) in {_pct(ls['chosen_longer'])} of "
                           f"{ls['n']} pairs, equal in {_pct(ls['equal_length'])}. Far above "
                           "50% suggests the judge rewards length."))
        parts.append(_png(_fig_length(ls)))
    else:
        parts.append(_note("No pairs: no length comparison."))
    parts.append("<h2>Position bias</h2>" + _note(
        "Mean numeric rating by the position a response was shown at (text 1 … text k); "
        "responses are shuffled, so without bias every position has the same mean. Failed "
        "judgments are left out."))
    if pos:
        width = max(len(v) for v in pos.values())
        parts.append(_table(["aspect", *[f"text {i + 1}: mean (n, N/A)" for i in range(width)]],
                            [[a, *[f"{_fmt(r['mean'])} ({r['n']}, {r['na']})" for r in rows]]
                             for a, rows in pos.items()]))
        if any(r["mean"] is not None for rows in pos.values() for r in rows):
            parts.append(_png(_fig_positions(pos)))
        else:
            parts.append(_note("No numeric ratings: nothing to plot."))
    else:
        parts.append(_note("No successful judgments."))
    return parts


def _summary(path: Path, facts: RunFacts, board: list[dict[str, Any]],
             ls: dict[str, Any], pos: dict[str, list[dict[str, Any]]], ov: dict[str, Any]) -> str:
    """The lines the CLI prints: enough to decide whether to open the page."""
    drop = ", ".join(f"{k}={v}" for k, v in sorted(facts.dropped.items())) or "none"
    judge = facts.judge
    lines = [f"report: {path}",
             f"prompts: {facts.prompts.kept} in, {facts.pairs} pairs out; dropped: {drop}",
             f"judge {judge.name} ({judge.model}): {ov['n']} judgments, "
             f"{_pct(ov['failure_rate'])} failed, {_pct(ov['reask_rate'])} re-asked",
             "models (mean score [95% CI], win rate as chosen [95% CI]):"]
    for r in board[:8]:
        lines.append(f"  {r['model']:<20} {_ci(r, 'score'):<22} win {_ci(r, 'win_rate')}")
    if len(board) > 8:
        lines.append(f"  … {len(board) - 8} more in the report")
    if ls["n"]:
        lines.append(f"length: chosen longer in {_pct(ls['chosen_longer'])} of {ls['n']} pairs "
                     f"(mean {_fmt(ls['mean_chosen_chars'], 0)} vs "
                     f"{_fmt(ls['mean_rejected_chars'], 0)} chars)")
    spreads = position_spreads({a: [r["mean"] for r in rows] for a, rows in pos.items()})
    if spreads:
        a = max(spreads, key=lambda x: spreads[x])
        lines.append(f"position: largest spread of mean rating across positions "
                     f"{spreads[a]:.2f} ({a})")
    return "\n".join(lines)
