"""``prefsynth report``: the numbers on hand-built rows, the page on real (fake-backend) runs."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefsynth.config import parse_config
from prefsynth.core.pipeline import run
from prefsynth.errors import InputError
from prefsynth.output.facts import JudgeFacts, ModelFacts, Pairing, PromptCounts, RunFacts
from prefsynth.output.writer import PAIR_SCHEMA
from prefsynth.tools.report import write_report
from prefsynth.tools.report_stats import (
    bootstrap_ci,
    judge_stats,
    leaderboard,
    length_stats,
    position_stats,
    rating_distribution,
    sample_pairs,
)
from tests.conftest import fake_config

pytest.importorskip("matplotlib")

HEADINGS = ["Overview", "Rating distribution", "Model leaderboard", "Length bias",
            "Position bias", "Judge reliability", "Sample pairs"]
IMG = re.compile(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _fake_out(tmp_path: Path, **judge_opts: Any) -> Path:
    cfg = fake_config(tmp_path)
    if judge_opts:
        cfg["judge"] = {**cfg["judge"], "options": judge_opts}
    run(parse_config(cfg))
    return Path(cfg["output"])


def _check_pngs(page: str) -> int:
    from PIL import Image

    imgs = IMG.findall(page)
    for b64 in imgs:
        data = base64.b64decode(b64, validate=True)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        w, h = Image.open(io.BytesIO(data)).size
        assert w > 100 and h > 100
    return len(imgs)


def _self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<script" not in page.lower()
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "<link" not in page


def test_report_on_fake_run(tmp_path: Path) -> None:
    out = _fake_out(tmp_path)
    path, summary = write_report(out, sample=3)
    assert path == out / "report.html"
    page = path.read_text(encoding="utf-8")
    for h in HEADINGS:
        assert f"<h2>{h}</h2>" in page
    _self_contained(page)
    assert _check_pngs(page) == 4  # ratings, leaderboard, length, position
    assert page.count('<div class="pair">') == 3
    lines = summary.splitlines()
    assert 5 <= len(lines) <= 20 and lines[0] == f"report: {path}"
    facts = json.loads((out / "run.json").read_text())
    assert f"{facts['pairs']} pairs out" in summary
    # seeded: the same folder renders the same page
    assert write_report(out, sample=3)[0].read_text(encoding="utf-8") == page


def test_judge_failures_and_reasks_are_reported(tmp_path: Path) -> None:
    out = _fake_out(tmp_path, garble_first=True, fail_rate=0.2)
    rows = pq.read_table(out / "judgments" / "train.parquet").to_pylist()
    s = judge_stats(rows)["overall"]
    assert s["failed"] > 0 and s["reasked"] > 0
    assert s["failure_rate"] == s["failed"] / len(rows)
    path, summary = write_report(out)
    page = path.read_text(encoding="utf-8")
    assert "request failed" in page  # error kind row
    assert f"{100 * s['failure_rate']:.1f}% failed" in summary


def test_zero_pairs_all_ties(tmp_path: Path) -> None:
    out = _fake_out(tmp_path, rating="tie")
    assert json.loads((out / "run.json").read_text())["pairs"] == 0
    path, summary = write_report(out)
    page = path.read_text(encoding="utf-8")
    for h in HEADINGS:
        assert f"<h2>{h}</h2>" in page
    assert "No pairs to show." in page and "No pairs: no length comparison." in page
    assert _check_pngs(page) >= 2
    assert "0 pairs out" in summary


def _tiny_outdir(tmp_path: Path, response: str, models: tuple[str, ...] = ("a", "b"),
                 ratings: tuple[str | None, ...] = ("5", "2"), pair: bool = True) -> Path:
    """A hand-written output folder: one prompt, one judgment, maybe one pair."""
    out = tmp_path / "tiny"
    for d in ("pairs", "annotations", "judgments"):
        (out / d).mkdir(parents=True)
    prompt = "Say <b>hi</b> & bye"
    pairs = [{"id": "p1", "prompt": prompt,
              "chosen": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": response}],
              "rejected": [{"role": "user", "content": prompt},
                           {"role": "assistant", "content": "plain"}],
              "chosen_rating": 5.0, "rejected_rating": 2.0, "chosen_model": models[0],
              "rejected_model": models[-1], "source": "t"}] if pair else []
    pq.write_table(pa.Table.from_pylist(pairs, schema=PAIR_SCHEMA), out / "pairs/train.parquet")
    num = [float(r) if r and r.isdigit() else None for r in ratings]
    ann = [{"prompt_id": "p1", "prompt": prompt, "model": m, "response": response, "score": s,
            "role": "", "helpfulness_rating": s} for m, s in zip(models, num, strict=True)]
    pq.write_table(pa.Table.from_pylist(ann), out / "annotations/train.parquet")
    judg = [{"prompt_id": "p1", "aspect": "helpfulness", "permutation": 0,
             "models": list(models), "order": list(range(len(models))[::-1]),
             "ratings": list(ratings), "raw": "x", "error": None, "attempts": 1, "judge": "j"}]
    pq.write_table(pa.Table.from_pylist(judg), out / "judgments/train.parquet")
    _tiny_facts(models, len(pairs)).save(out / "run.json")
    return out


def _tiny_facts(models: tuple[str, ...], pairs: int) -> RunFacts:
    """A complete run.json for the hand-written folder."""
    return RunFacts(
        name="tiny", prompts=PromptCounts(read=1, kept=1), pairs=pairs,
        dropped={} if pairs else {"no_numeric_rating": 1},
        models=[ModelFacts(name=m, backend="fake", model=m, license="mit", responses=1,
                           failed=0, chosen=int(pairs > 0 and i == 0),
                           rejected=int(pairs > 0 and i == len(models) - 1))
                for i, m in enumerate(models)],
        judge=JudgeFacts(name="j", backend="fake", model="fj", license="mit",
                         aspects=["helpfulness"], mode="text", permutations=1, temperature=0.1,
                         judgments=1, failed={}, reasks=0),
        pairing=Pairing(rejected="random_lower", aggregate="mean", min_margin=0.0, weights={},
                        constraints="off"),
        responses_per_prompt=len(models), seed=0, config={})


def test_untrusted_text_is_escaped(tmp_path: Path) -> None:
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    out = _tiny_outdir(tmp_path, evil, models=("<i>a</i>", "b"))
    page = write_report(out)[0].read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "Say &lt;b&gt;hi&lt;/b&gt; &amp; bye" in page
    assert "&lt;i&gt;a&lt;/i&gt;" in page and "<i>a</i>" not in page
    _self_contained(page)
    _check_pngs(page)


def test_model_names_are_not_mathtext(tmp_path: Path) -> None:
    """``prefsynth report`` on a model named ``a $x^$`` crashed in matplotlib's mathtext."""
    out = _tiny_outdir(tmp_path, "r", models=("a $x^$", "b $\\frac{"))
    path, summary = write_report(out)
    page = path.read_text(encoding="utf-8")
    assert _check_pngs(page) >= 3 and "a $x^$" in page and "a $x^$" in summary
    import matplotlib

    assert matplotlib.rcParams["text.parse_math"]  # only the report's figures are changed


def test_one_model_no_numeric_ratings(tmp_path: Path) -> None:
    out = _tiny_outdir(tmp_path, "r", models=("solo",), ratings=("N/A",), pair=False)
    path, summary = write_report(out)
    page = path.read_text(encoding="utf-8")
    assert "No numeric ratings: nothing to plot." in page
    assert _check_pngs(page) == 1  # only the rating distribution has data
    assert "solo" in summary


def test_missing_or_incomplete_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such output folder"):
        write_report(tmp_path / "nope")
    out = _tiny_outdir(tmp_path, "r")
    (out / "judgments" / "train.parquet").unlink()
    with pytest.raises(InputError) as e:
        write_report(out)
    assert "judgments/train.parquet" in str(e.value) and "\n" not in str(e.value)
    (out / "judgments" / "train.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="unreadable parquet"):
        write_report(out)


# --- the numbers, on hand-built rows ---------------------------------------------------------

def _ann(prompt: str, model: str, score: float | None) -> dict[str, Any]:
    return {"prompt_id": prompt, "model": model, "score": score}


def _pair(prompt: str, chosen: str, rejected: str, c: str = "long answer", r: str = "short"
          ) -> dict[str, Any]:
    return {"id": prompt, "chosen_model": chosen, "rejected_model": rejected,
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": c}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": r}]}


def test_leaderboard_hand_built() -> None:
    ann = [_ann(p, m, s) for p in ("p1", "p2", "p3") for m, s in (("a", 4.5), ("b", 2.0))]
    ann += [_ann("p1", "c", 3.0), _ann("p4", "a", None), _ann("p4", "b", 3.0)]  # p4: no pair
    pairs = [_pair(p, "a", "b") for p in ("p1", "p2", "p3")]
    board = {r["model"]: r for r in leaderboard(ann, pairs, n_boot=200, seed=1)}
    assert [r["model"] for r in leaderboard(ann, pairs, 200, 1)] == ["a", "c", "b"]
    a, b, c = board["a"], board["b"], board["c"]
    assert (a["responses"], a["scored"], a["competed"], a["chosen"]) == (4, 3, 3, 3)
    assert a["win_rate"] == 1.0 and a["win_rate_lo"] == a["win_rate_hi"] == 1.0
    assert a["pair_win_rate"] == 1.0 and a["score"] == 4.5
    assert b["win_rate"] == 0.0 and b["pair_win_rate"] == 0.0 and b["in_pairs"] == 3
    assert b["score"] == pytest.approx(2.25)  # p4's 3.0 counts for the score, not the win rate
    assert 0.0 <= b["score_lo"] <= b["score"] <= b["score_hi"] <= 5.0
    assert c["competed"] == 1 and c["win_rate"] == 0.0
    assert c["in_pairs"] == 0 and c["pair_win_rate"] is None and c["pair_win_rate_lo"] is None


def test_leaderboard_mixed_wins_ci_in_unit_interval() -> None:
    ann = [_ann(f"p{i}", m, 3.0) for i in range(20) for m in ("a", "b")]
    pairs = [_pair(f"p{i}", *(("a", "b") if i % 4 else ("b", "a"))) for i in range(20)]
    a = {r["model"]: r for r in leaderboard(ann, pairs, 1000, 0)}["a"]
    assert a["win_rate"] == 0.75
    assert 0.0 <= a["win_rate_lo"] < 0.75 < a["win_rate_hi"] <= 1.0


def test_bootstrap_ci() -> None:
    vals = [1.0, 2.0, 2.0, 3.0, 5.0, 4.0, 1.0, 3.0, 2.0, 5.0]
    lo, hi = bootstrap_ci(vals, 1000, seed=3)
    assert lo is not None and hi is not None
    assert lo < sum(vals) / len(vals) < hi
    assert bootstrap_ci(vals, 1000, seed=3) == (lo, hi)
    assert bootstrap_ci(vals, 1000, seed=4) != (lo, hi)
    assert bootstrap_ci([], 1000, 0) == (None, None)
    assert bootstrap_ci([2.5], 1000, 0) == (2.5, 2.5)
    assert bootstrap_ci([1.0] * 5, 100, 0) == (1.0, 1.0)
    lo2, hi2 = bootstrap_ci([0.0, 1.0] * 50, 1000, 0)
    assert lo2 is not None and hi2 is not None and 0.35 < lo2 < 0.5 < hi2 < 0.65


def test_position_stats_hand_built() -> None:
    js = [
        # position 1 shows models[1] = b (rated 2), position 2 shows a (rated 5)
        {"aspect": "h", "models": ["a", "b"], "order": [1, 0], "ratings": ["5", "2"],
         "error": None},
        {"aspect": "h", "models": ["a", "b"], "order": [0, 1], "ratings": ["4", "N/A"],
         "error": None},
        {"aspect": "h", "models": ["a", "b"], "order": [0, 1], "ratings": ["1", None],
         "error": "unparseable: found 1 of 2 ratings"},  # skipped
        {"aspect": "x", "models": ["a", "b"], "order": [0, 1], "ratings": [None, "3"],
         "error": None},
    ]
    st = position_stats(js)
    p1, p2 = st["h"]
    assert (p1["position"], p1["mean"], p1["n"], p1["na"]) == (1, 3.0, 2, 0)
    assert (p2["position"], p2["mean"], p2["n"], p2["na"]) == (2, 5.0, 1, 1)
    assert p1["se"] == pytest.approx(1.0) and p2["se"] == 0.0
    assert st["x"][0] == {"position": 1, "mean": None, "se": 0.0, "n": 0, "na": 0, "missing": 1}


def test_rating_distribution_and_judge_stats() -> None:
    js = [{"aspect": "h", "ratings": ["5", "N/A"], "error": None, "attempts": 1},
          {"aspect": "h", "ratings": ["5", None], "error": "unparseable: found 1 of 2",
           "attempts": 3},
          {"aspect": "t", "ratings": [None, None], "error": "request failed: timeout",
           "attempts": 1},
          {"aspect": "t", "ratings": ["1", "2"], "error": None, "attempts": 2}]
    d = rating_distribution(js)
    assert d["h"] == {"1": 0, "2": 0, "3": 0, "4": 0, "5": 2, "N/A": 1, "missing": 1}
    assert d["t"]["missing"] == 2 and d["t"]["1"] == 1
    s = judge_stats(js)
    assert s["overall"] == {"n": 4, "failed": 2, "reasked": 2, "failure_rate": 0.5,
                            "reask_rate": 0.5}
    assert s["aspects"]["h"]["failure_rate"] == 0.5 and s["aspects"]["t"]["reask_rate"] == 0.5
    assert {e["kind"]: e["count"] for e in s["errors"]} == {"unparseable": 1,
                                                            "request failed": 1}
    assert judge_stats([])["overall"]["failure_rate"] is None


def test_length_stats_and_sample() -> None:
    pairs = [_pair("p1", "a", "b", "one two three", "one"), _pair("p2", "a", "b", "x", "yyy"),
             _pair("p3", "a", "b", "same", "same")]
    ls = length_stats(pairs)
    assert ls["n"] == 3 and ls["chosen_longer"] == pytest.approx(1 / 3)
    assert ls["equal_length"] == pytest.approx(1 / 3)
    assert ls["chosen_words"] == [3, 1, 1] and ls["rejected_chars"] == [3, 3, 4]
    assert length_stats([])["chosen_longer"] is None
    s = sample_pairs(pairs, 2, seed=5)
    assert len(s) == 2 and s == sample_pairs(pairs, 2, seed=5)
    assert [p["id"] for p in s] == sorted(p["id"] for p in s)
    assert sample_pairs(pairs, 10) == pairs


def test_missing_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    from prefsynth.errors import MissingExtraError

    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import -> ImportError
    with pytest.raises(MissingExtraError, match=r"prefsynth\[report\]"):
        write_report(tmp_path)
