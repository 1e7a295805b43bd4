"""The reproduce report from a synthetic run folder, its numbers checked against an
independent computation (numpy, scipy): accuracy, paired delta, McNemar p, the main
conditions' full-BLiMP rows, TSE per field under both metrics, pending conditions, and
the tables printed for the README."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from eval.report import write_report
from eval.report.__main__ import main as report_main
from eval.reproduce_config import ReproduceConfig, condition_sets
from eval.tasks import (
    PairResult,
    PairRunSummary,
    PerplexitySummary,
    RunInfo,
    WindowResult,
    accuracy_rows,
    write_pair_run,
    write_ppl_run,
)

FIELDS = ("agreement", "reflexives", "npi")


def _info(task: str) -> RunInfo:
    return RunInfo(task=task, created="2026-11-30T00:00:00+00:00", server="test", model="m", base_model="m",
                   neuron_set=None, set_via=None, tokenizer={}, echo_mode="test")


def _pairs(out: Path, task: str, correct: np.ndarray, correct_sum: np.ndarray | None = None) -> None:
    """A run of len(correct) pairs; BLiMP pairs in 5 paradigms, TSE pairs in the 3 fields."""
    recs = []
    sums = correct if correct_sum is None else correct_sum
    for i, (c, cs) in enumerate(zip(correct.tolist(), sums.tolist(), strict=True)):
        field = FIELDS[i % 3] if task == "tse" else "syntax"
        paradigm = f"{field}_test" if task == "tse" else f"paradigm_{i % 5}"
        recs.append(PairResult(
            source=task, paradigm=paradigm, pair_id=i, phenomenon=f"ph{i % 5}" if task == "blimp" else field,
            field=field, sentence_good="a", sentence_bad="b", logprob_good=-1.0, logprob_bad=-2.0,
            n_tokens_good=1, n_tokens_bad=1, mean_logprob_good=-1.0, mean_logprob_bad=-2.0,
            correct_sum=cs, correct_mean=c, correct=c, tie=False))
    gk = ["phenomenon", "paradigm"] if task == "blimp" else ["field", "paradigm"]
    write_pair_run(out, recs, PairRunSummary(
        run=_info(task), metric="sum" if task == "blimp" else "mean", n_pairs=len(recs), n_ties=0,
        group_keys=gk, accuracy=accuracy_rows(recs, gk, "correct"),
        accuracy_sum=accuracy_rows(recs, gk, "correct_sum"), accuracy_mean=accuracy_rows(recs, gk, "correct_mean")))


def _ppl(out: Path, nll: float) -> None:
    write_ppl_run(out, [WindowResult(window_id=0, start=0, n_tokens=100, nll_sum=100 * nll)], PerplexitySummary(
        run=_info("perplexity"), text_path="t", text_sha256="0", text_tokens=100, window=101, n_windows=1,
        n_tokens=100, nll=nll, ppl=math.exp(nll), bits_per_token=nll / math.log(2)))


def _set(disc: Path, name: str, per_layer: list[int]) -> None:
    entries = [{"layer": i, "neurons": list(range(n)), "mode": "negative"} for i, n in enumerate(per_layer)]
    (disc / "sets").mkdir(parents=True, exist_ok=True)
    (disc / "sets" / f"{name}.json").write_text(json.dumps({"entries": entries}))


@pytest.fixture
def folder(tmp_path):
    """Baseline and Wasserstein-negative done (full BLiMP too), the rest of top 1% pending."""
    cfg = ReproduceConfig(out=tmp_path, top=[1.0], blimp_per_paradigm=2, blimp_main_per_paradigm=4, n_boot=300)
    (tmp_path / "config.json").write_text(cfg.model_dump_json())
    disc = tmp_path / "discovery"
    _set(disc, "wasserstein-top1", [3, 2])
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.8
    ablated = base.copy()
    ablated[rng.choice(400, 40, replace=False)] ^= True  # 40 discordant pairs
    full_base = rng.random(2000) < 0.8
    full_ablated = full_base & (rng.random(2000) < 0.9)  # only losses
    tse_base = rng.random(300) < 0.9
    tse_ablated = tse_base & (rng.random(300) < 0.8)
    for label, blimp, full, tse, nll in (("baseline", base, full_base, tse_base, 3.0),
                                         ("wasserstein-negative-top1", ablated, full_ablated, tse_ablated, 3.1)):
        _pairs(tmp_path / "runs" / label / "blimp", "blimp", blimp)
        _pairs(tmp_path / "runs-full" / label / "blimp", "blimp", full)
        _pairs(tmp_path / "runs" / label / "tse", "tse", tse, correct_sum=~tse)
        _ppl(tmp_path / "runs" / label / "perplexity", nll)
    return cfg, disc, {"base": base, "ablated": ablated, "full_base": full_base, "full_ablated": full_ablated,
                       "tse_base": tse_base, "tse_ablated": tse_ablated}


def _mcnemar_p(a: np.ndarray, b: np.ndarray) -> float:
    """Edwards-corrected chi-square (>= 25 discordant pairs), else exact binomial."""
    b01, b10 = int((~a & b).sum()), int((a & ~b).sum())
    if b01 + b10 < 25:
        return float(sps.binomtest(b01, b01 + b10, 0.5).pvalue)
    return float(sps.chi2.sf(max(abs(b01 - b10) - 1, 0) ** 2 / (b01 + b10), 1))


def test_the_main_table_has_the_numbers_of_its_runs(folder, tmp_path):
    cfg, disc, arr = folder
    path = write_report(cfg, disc, condition_sets(cfg), tmp_path / "no-model")
    report = json.loads((tmp_path / "report.json").read_text())
    base_row, w_row = report["rows"]
    # BLiMP comes from the full runs for the main conditions (2,000 pairs), TSE from runs/
    assert base_row["blimp_n"] == w_row["blimp_n"] == 2000 and w_row["tse_n"] == 300
    assert base_row["blimp_acc"] == pytest.approx(arr["full_base"].mean())
    delta, lo, hi = w_row["blimp_delta"]
    assert delta == pytest.approx(arr["full_ablated"].mean() - arr["full_base"].mean())
    assert lo < delta < hi <= 0.0  # only losses: the whole CI below 0
    assert w_row["blimp_p"] == pytest.approx(_mcnemar_p(arr["full_base"], arr["full_ablated"]), rel=1e-9)
    assert w_row["tse_delta"][0] == pytest.approx(arr["tse_ablated"].mean() - arr["tse_base"].mean())
    assert w_row["tse_p"] == pytest.approx(_mcnemar_p(arr["tse_base"], arr["tse_ablated"]), rel=1e-9)
    assert w_row["ppl_ratio"] == pytest.approx(math.exp(0.1)) and w_row["neurons"] == 5
    # the sweep row of the same condition uses the sweep's own 400 pairs
    (sweep,) = report["sweep"]
    assert sweep["blimp_n"] == 400
    assert sweep["blimp_delta"][0] == pytest.approx(arr["ablated"].mean() - arr["base"].mean())
    assert report["pending"] == [s.label for s in condition_sets(cfg)[2:]]
    # figures named relative to the report's folder: no machine's path in a committed report
    assert report["figures"] and all("/" not in name and (tmp_path / name).is_file()
                                     for name in report["figures"].values())
    text = path.read_text()
    assert "**Not finished yet**" in text and "random-negative-top1" in text
    assert f"| wasserstein-negative-top1 | 5 | 2,000 | {arr['full_ablated'].mean() * 100:.1f} |" in text


def test_tse_by_field_under_both_metrics(folder, tmp_path):
    cfg, disc, arr = folder
    write_report(cfg, disc, condition_sets(cfg), tmp_path / "no-model")
    rows = json.loads((tmp_path / "report.json").read_text())["tse_by_field"]
    fields = np.array([FIELDS[i % 3] for i in range(300)])
    for metric, (a, b) in (("correct_mean", (arr["tse_base"], arr["tse_ablated"])),
                           ("correct_sum", (~arr["tse_base"], ~arr["tse_ablated"]))):
        for field in FIELDS:
            (row,) = [r for r in rows if r["metric"] == metric and r["field"] == field]
            m = fields == field
            assert row["n"] == 100
            assert row["delta"] == pytest.approx(b[m].mean() - a[m].mean())
    csv_lines = (tmp_path / "tse_by_field.csv").read_text().splitlines()
    assert csv_lines[0].startswith("condition,metric,field,n") and len(csv_lines) == 1 + 2 * (3 + 1)


def test_the_readme_tables_are_printed_from_report_json(folder, tmp_path, capsys):
    cfg, disc, _ = folder
    write_report(cfg, disc, condition_sets(cfg), tmp_path / "no-model")
    report_main(tmp_path, "main")
    printed = capsys.readouterr().out.splitlines()
    table = [ln for ln in (tmp_path / "REPORT.md").read_text().splitlines() if ln.startswith("|")]
    assert printed == table[:len(printed)] and len(printed) == 2 + 2  # header, rule, two conditions
    with pytest.raises(Exception, match="use one of main"):
        report_main(tmp_path, "everything")


def test_head_to_head_compares_the_wasserstein_set_with_each_control(folder, tmp_path, capsys):
    cfg, disc, arr = folder
    rng = np.random.default_rng(1)
    # random-negative: full BLiMP too, and it hurts less than the Wasserstein set;
    # perplexity-matched: runs/ only (never full), on TSE it hurts more than the Wasserstein set
    random_full = arr["full_base"] & (rng.random(2000) < 0.99)
    random_sub = arr["base"].copy()
    matched_sub = arr["ablated"].copy()
    matched_sub[rng.choice(400, 10, replace=False)] ^= True
    matched_tse = arr["tse_ablated"] & (rng.random(300) < 0.7)
    for label, blimp, full, tse in (("random-negative-top1", random_sub, random_full, arr["tse_base"]),
                                    ("perplexity-matched-negative-top1", matched_sub, None, matched_tse)):
        _pairs(tmp_path / "runs" / label / "blimp", "blimp", blimp)
        if full is not None:
            _pairs(tmp_path / "runs-full" / label / "blimp", "blimp", full)
        _pairs(tmp_path / "runs" / label / "tse", "tse", tse)
    write_report(cfg, disc, condition_sets(cfg), tmp_path / "no-model")
    rows = {(r["control_kind"], r["task"]): r for r in json.loads((tmp_path / "report.json").read_text())["head_to_head"]}
    assert set(rows) == {("random-negative", "blimp"), ("random-negative", "tse"),
                         ("perplexity-matched-negative", "blimp"), ("perplexity-matched-negative", "tse")}
    expected = {  # (Wasserstein-negative, control, folder) per row
        ("random-negative", "blimp"): (arr["full_ablated"], random_full, "runs-full"),
        ("random-negative", "tse"): (arr["tse_ablated"], arr["tse_base"], "runs"),
        ("perplexity-matched-negative", "blimp"): (arr["ablated"], matched_sub, "runs"),
        ("perplexity-matched-negative", "tse"): (arr["tse_ablated"], matched_tse, "runs"),
    }
    for key, (w, c, source) in expected.items():
        r = rows[key]
        assert r["source"] == source and r["n"] == w.size
        assert r["diff"] == pytest.approx(w.mean() - c.mean())
        assert r["ci_lo"] <= r["diff"] <= r["ci_hi"]
        assert r["p"] == pytest.approx(_mcnemar_p(c, w), rel=1e-9)
        want = ("wasserstein hurts more" if r["ci_hi"] < 0 else "control hurts more" if r["ci_lo"] > 0
                else "no difference detected")
        assert r["verdict"] == want
    # the synthetic effects are large enough to be called both ways
    assert rows[("random-negative", "blimp")]["verdict"] == "wasserstein hurts more"
    assert rows[("perplexity-matched-negative", "tse")]["verdict"] == "control hurts more"
    csv_lines = (tmp_path / "head_to_head.csv").read_text().splitlines()
    assert csv_lines[0].startswith("top,control,control_kind,draw,task,source,n") and len(csv_lines) == 5
    # per group (BLiMP phenomenon ph0..ph4 by pair index mod 5, TSE field by index mod 3), against numpy
    sel = np.arange(300) % 3 == 2
    (npi,) = [g for g in rows[("perplexity-matched-negative", "tse")]["groups"] if g["group"] == FIELDS[2]]
    assert npi["n"] == sel.sum() and npi["diff"] == pytest.approx(
        arr["tse_ablated"][sel].mean() - matched_tse[sel].mean())
    assert npi["p"] == pytest.approx(_mcnemar_p(matched_tse[sel], arr["tse_ablated"][sel]), rel=1e-9)
    assert [len(r["groups"]) for r in rows.values()] == [5, 3, 5, 3]
    groups_csv = (tmp_path / "head_to_head_groups.csv").read_text().splitlines()
    assert groups_csv[0].startswith("top,control,control_kind,draw,task,group,n") and len(groups_csv) == 1 + 16
    report_main(tmp_path, "head-to-head")
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 + 4 and "| 1% | random-negative | BLiMP | 2,000 |" in printed[4]
    assert "## Head to head" in (tmp_path / "REPORT.md").read_text()


def test_a_p_value_below_float_range_is_not_printed_as_zero():
    from eval.stats import format_p

    assert [format_p(p) for p in (0.0, 3.8e-138, 0.31, 1.0)] == ["< 1e-300", "3.8e-138", "0.31", "1"]


def test_each_draw_of_the_matched_control_is_reported_and_compared(folder, tmp_path, capsys):
    """With matched_draws 2: the second draw is not a sweep point, it has its own row in the
    draws table (delta against the baseline) and in the head to head (difference from the
    Wasserstein set), both against numpy; a draw not scored yet is pending."""
    cfg, disc, arr = folder
    cfg = cfg.model_copy(update={"matched_draws": 3})
    (tmp_path / "config.json").write_text(cfg.model_dump_json())
    rng = np.random.default_rng(2)
    first = arr["ablated"].copy()
    first[rng.choice(400, 12, replace=False)] ^= True
    second = arr["base"] & (rng.random(400) < 0.7)  # this draw hurts far more
    _set(disc, "perplexity-matched-top1-s0", [30, 20])
    _set(disc, "perplexity-matched-top1-s1", [25, 31])
    for label, blimp, tse, nll in (("perplexity-matched-negative-top1", first, arr["tse_ablated"], 3.1),
                                   ("perplexity-matched-negative-top1-s1", second, arr["tse_base"], 3.2)):
        _pairs(tmp_path / "runs" / label / "blimp", "blimp", blimp)
        _pairs(tmp_path / "runs" / label / "tse", "tse", tse)
        _ppl(tmp_path / "runs" / label / "perplexity", nll)
    write_report(cfg, disc, condition_sets(cfg), tmp_path / "no-model")
    report = json.loads((tmp_path / "report.json").read_text())
    draws = {d["draw"]: d for d in report["draws"]}
    assert sorted(draws) == [0, 1] and (draws[0]["seed"], draws[1]["seed"]) == (0, 1)
    assert (draws[0]["neurons"], draws[1]["neurons"]) == (50, 56)
    for d, blimp in ((0, first), (1, second)):
        assert draws[d]["blimp_delta"][0] == pytest.approx(blimp.mean() - arr["base"].mean())
        assert draws[d]["blimp_p"] == pytest.approx(_mcnemar_p(arr["base"], blimp), rel=1e-9)
    assert draws[1]["ppl_ratio"] == pytest.approx(math.exp(0.2))
    assert "perplexity-matched-negative-top1-s2" in report["pending"]
    assert not any(r["condition"].endswith("-s1") for r in report["sweep"])
    h2h = {(r["control"], r["task"]): r for r in report["head_to_head"]}
    vs_second = h2h[("perplexity-matched-negative-top1-s1", "blimp")]
    assert vs_second["draw"] == 1 and vs_second["source"] == "runs"
    assert vs_second["diff"] == pytest.approx(arr["ablated"].mean() - second.mean())
    assert vs_second["verdict"] == "control hurts more"
    assert len((tmp_path / "draws.csv").read_text().splitlines()) == 3
    report_main(tmp_path, "draws")
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 + 2 and printed[3].startswith("| 2 | 1 | 56 | 1.221 |")
    assert f"| {100 * vs_second['diff']:+.1f} [" in printed[3]
    text = (tmp_path / "REPORT.md").read_text()
    assert "draw by draw" in text and "perplexity-matched-negative (draw 2) | BLiMP" in text
    assert "## Grammar cost against perplexity cost" in text
    assert (tmp_path / "cost_vs_perplexity.png").stat().st_size > 1000
    lo, hi = sorted(100 * d["blimp_delta"][0] for d in draws.values())  # checked against numpy above
    assert (f"BLiMP: the 2 draws cost {lo:+.1f} to {hi:+.1f} points" in text and "(verdicts: wasserstein hurts "
            "more 0, control hurts more 1, no difference detected 1)" in text)
    # pooled over both finished draws, against numpy (pairs in key order, the plain bootstrap loop)
    pooled = {r["task"]: r for r in report["draws_pooled"]}
    assert sorted(pooled) == ["blimp", "tse"] and pooled["blimp"]["draws"] == 2
    order = sorted(range(400), key=lambda i: (f"paradigm_{i % 5}", i))
    d = arr["ablated"][order].astype(float) - (first[order].astype(float) + second[order]) / 2
    assert pooled["blimp"]["diff"] == pytest.approx(d.mean())
    loop = np.random.default_rng(cfg.seed)
    reps = [d[loop.integers(0, 400, 400)].mean() for _ in range(cfg.n_boot)]
    assert (pooled["blimp"]["ci_lo"], pooled["blimp"]["ci_hi"]) == pytest.approx(
        tuple(np.quantile(reps, [0.025, 0.975])))
    assert pooled["blimp"]["draw_diffs"] == pytest.approx([arr["ablated"].mean() - first.mean(),
                                                           arr["ablated"].mean() - second.mean()])
    assert pooled["blimp"]["verdict"] == ("control hurts more" if pooled["blimp"]["ci_lo"] > 0 else
                                          "no difference detected")
    assert f"BLiMP, pooled over the 2 draws: Wasserstein minus the draws' mean {100 * d.mean():+.1f} [" in text
    report_main(tmp_path, "draws-pooled")
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[0].startswith("- BLiMP, pooled over the 2 draws")
    # per phenomenon / field: each group's pooled difference and each draw's own, BH q by hand
    groups = {(r["task"], g["group"]): g for r in report["draws_pooled"] for g in r["groups"]}
    assert len(groups) == 5 + 3  # BLiMP phenomena ph0..ph4, TSE fields
    sel = np.arange(400) % 5 == 2
    g = groups[("blimp", "ph2")]
    assert g["n"] == sel.sum() and g["diff"] == pytest.approx(
        arr["ablated"][sel].mean() - (first[sel].mean() + second[sel].mean()) / 2)
    assert g["draw_diffs"] == pytest.approx([arr["ablated"][sel].mean() - first[sel].mean(),
                                             arr["ablated"][sel].mean() - second[sel].mean()])
    ps = np.array([x["p"] for x in groups.values()])
    order = np.argsort(ps)
    scaled = ps[order] * len(ps) / np.arange(1, len(ps) + 1)
    bh = np.empty_like(ps)
    bh[order] = np.minimum(1, np.minimum.accumulate(scaled[::-1])[::-1])
    assert [x["q"] for x in groups.values()] == pytest.approx(bh.tolist())
    report_main(tmp_path, "draws-groups")
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 + 8 and printed[2].startswith("| BLiMP | ph0 | 80 |")
    assert "per BLiMP phenomenon and TSE field" in (tmp_path / "REPORT.md").read_text()
    assert (tmp_path / "draws_by_group.png").stat().st_size > 1000 and "(draws_by_group.png)" in text
    from eval.report.figures import plot_draws_groups

    assert plot_draws_groups([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_the_cost_chart_needs_two_conditions_with_perplexity(tmp_path):
    from eval.report.figures import plot_cost_against_perplexity

    row = {"kind": "wasserstein-negative", "top": 1.0, "ppl_ratio": 1.1, "blimp_delta": [-0.02, -0.03, -0.01]}
    mirror = {**row, "kind": "wasserstein-positive", "ppl_ratio": 400.0}
    no_ppl = {**row, "kind": "random-negative", "ppl_ratio": None}
    assert plot_cost_against_perplexity([row, mirror, no_ppl], [], tmp_path / "a.png") is None
    first_draw = {**row, "kind": "perplexity-matched-negative", "draw": 0, "seed": 0}
    assert plot_cost_against_perplexity([row], [first_draw], tmp_path / "b.png") is None  # the sweep has it
    path = plot_cost_against_perplexity([row], [{**first_draw, "draw": 1, "seed": 1}], tmp_path / "c.png")
    assert path == tmp_path / "c.png" and path.stat().st_size > 1000


def _matched_set(disc: Path, name: str, tolerance_effect: float | None, tolerance: float | None) -> None:
    """A perplexity-matched set whose search met its target on its own text."""
    entries = [{"layer": 0, "neurons": [0, 1, 2, 3], "mode": "negative"}]
    source = {"target_perplexity": 22.0, "perplexity": 22.1, "baseline_perplexity": 20.0, "eval_tokens": 512,
              "tolerance": tolerance, "tolerance_effect": tolerance_effect, "converged": True, "iterations": 3,
              "eval_corpus": "/somewhere/wikitext-2/test.txt"}
    (disc / "sets" / f"{name}.json").write_text(json.dumps({"entries": entries, "provenance": {"source": source}}))


@pytest.mark.parametrize(("nll", "tolerance_effect", "tolerance", "holds"), [
    (3.105, 0.1, None, True),    # log effects 0.105 vs 0.1: within 0.1 of the Wasserstein set's 0.1
    (3.2, 0.1, None, False),     # 0.2 vs 0.1
    (3.05, 0.1, None, False),    # 0.05 vs 0.1: misses on the cheap side
    (3.2, None, 0.2, True),      # relative: exp(0.1) - 1 = 0.105 <= 0.2
    (3.2, None, 0.05, False),
])
def test_a_matched_control_is_checked_on_the_main_tables_perplexity_text(folder, tmp_path, nll, tolerance_effect,
                                                                        tolerance, holds):
    cfg, disc, _ = folder
    _matched_set(disc, "perplexity-matched-top1-s0", tolerance_effect, tolerance)
    _ppl(tmp_path / "runs" / "perplexity-matched-negative-top1" / "perplexity", nll)
    write_report(cfg, disc, condition_sets(cfg), tmp_path / "no-model")
    (m,) = json.loads((tmp_path / "report.json").read_text())["matched"]
    # baseline nll 3.0, Wasserstein 3.1 (the fixture): ratios exp(0.1) and exp(nll - 3)
    assert m["target_eval_ppl_ratio"] == pytest.approx(math.exp(0.1))
    assert m["eval_ppl_ratio"] == pytest.approx(math.exp(nll - 3.0))
    assert m["holds_on_eval_text"] is holds and m["search_corpus"] == "test.txt"
    text = (tmp_path / "REPORT.md").read_text()
    assert f"x{math.exp(nll - 3.0):.3f} against the Wasserstein set's x{math.exp(0.1):.3f}" in text
    assert ("**the match does not hold there**" in text) is (not holds)
    assert ("the control costs more perplexity" in text) is (not holds and nll > 3.1)
    assert ("the control costs less perplexity" in text) is (not holds and nll < 3.1)


def test_a_matched_control_without_perplexity_yet_has_no_check(folder, tmp_path):
    cfg, disc, _ = folder
    _matched_set(disc, "perplexity-matched-top1-s0", 0.1, None)
    write_report(cfg, disc, condition_sets(cfg), tmp_path / "no-model")
    (m,) = json.loads((tmp_path / "report.json").read_text())["matched"]
    assert m["perplexity"] == 22.1 and "holds_on_eval_text" not in m


def test_a_rebuild_never_drops_published_results(folder, tmp_path, capsys):
    """A folder whose runs are gone (a clone of a folder whose runs were never committed)
    keeps its report: the rebuild refuses, with the reason, and writes nothing."""
    import shutil

    from eval.report import ReportWouldLoseResults, finished_results, rebuild

    cfg, disc, _ = folder
    write_report(cfg, disc, condition_sets(cfg), tmp_path / "no-model")
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert len(finished_results(json.loads((tmp_path / "report.json").read_text()))) == 2 * 3  # 2 conditions x 3
    shutil.rmtree(tmp_path / "runs" / "wasserstein-negative-top1" / "tse")
    with pytest.raises(ReportWouldLoseResults, match=r"1 result \(of 1 condition: wasserstein-negative-top1\)"):
        rebuild(tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    import typer

    with pytest.raises(typer.Exit) as exit_info:  # the command line: exit 2, the reason on stderr
        report_main(tmp_path, None)
    assert exit_info.value.exit_code == 2 and "no longer hold" in capsys.readouterr().err
    (tmp_path / "report.json").unlink()  # what the message says to do: rebuild from what is there
    rebuild(tmp_path)
    assert ("wasserstein-negative-top1", "tse_acc") not in finished_results(
        json.loads((tmp_path / "report.json").read_text()))


def test_the_lm_tasks_view_shows_baseline_values_and_paired_deltas_in_points():
    from eval.report.markdown import SECTIONS

    def row(task, metric, condition, value, delta=None, se=None, filt="none"):
        return {"task": task, "metric": metric, "filter": filt, "condition": condition, "value": value,
                "delta": delta, "delta_stderr": se}

    lm = {"conditions": [{"label": "baseline"}, {"label": "wasserstein-top1"},
                         {"label": "perplexity-matched-top1-s0"}, {"label": "perplexity-matched-bottom-top1"}],
          "rows": [row("piqa_local", "acc", "baseline", 0.65), row("piqa_local", "acc_norm", "baseline", 0.66),
                   row("piqa_local", "acc", "wasserstein-top1", 0.643, -0.007, 0.0131),
                   row("piqa_local", "acc", "perplexity-matched-bottom-top1", 0.63, -0.02, 0.012),
                   row("lambada_openai_local", "perplexity", "baseline", 43.71),
                   row("lambada_openai_local", "perplexity", "wasserstein-top1", 66.26, 22.547, 4.14),
                   row("lambada_openai_local", "acc", "baseline", 0.3, filt="strict")]}
    assert SECTIONS["lm-tasks"]({"lm_tasks": lm}) == [
        "| task | metric | baseline | Wasserstein-negative | random perplexity-matched | bottom perplexity-matched |",
        "|---|---|---:|---:|---:|---:|",
        "| piqa | acc | 65.0 | -0.7 ± 1.3 | - | -2.0 ± 1.2 |",  # acc_norm left to REPORT.md
        "| lambada_openai | perplexity | 43.7 | +22.5 ± 4.1 | - | - |",  # a filtered metric is not shown
    ]
    assert SECTIONS["lm-tasks"]({}) == []  # a report from before lm_eval ran


def test_a_clone_without_the_discovery_statistics_keeps_the_premise(folder, tmp_path):
    """stats.npz is not committed: the rebuild on a clone reads the premise back from premise.csv."""
    cfg, disc, _ = folder
    rng = np.random.default_rng(3)
    w1 = rng.random((2, 200)) + 0.01
    share_h, share_z, frac = rng.random((2, 200)), rng.random((2, 200)), rng.random((2, 200))
    np.savez(disc / "stats.npz", w1=w1, w1_h_negative=w1 * share_h, w1_negative=w1 * share_z, frac_h_negative=frac)
    write_report(cfg, disc, condition_sets(cfg), tmp_path / "no-model")
    first = json.loads((tmp_path / "report.json").read_text())["premise"]
    top = w1[0] >= np.sort(w1[0])[-2]  # top 1% of 200 neurons: the 2 largest
    (layer0_w,) = [r for r in first if r["layer"] == "0" and r["group"] == "wasserstein"]
    assert layer0_w["neurons"] == 2 and layer0_w["share_h_negative"] == pytest.approx(share_h[0][top].mean())

    (disc / "stats.npz").unlink()
    path = write_report(cfg, disc, condition_sets(cfg), tmp_path / "no-model")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["premise"] == first
    text = path.read_text()
    assert "## The premise" in text and "![Wasserstein scores](wasserstein_scores.png)" in text


def test_an_oracle_check_beside_the_lm_tasks_is_in_the_report(folder, tmp_path):
    from eval.analysis.oracle_check import OracleCheck, TaskCheck

    cfg, disc, _ = folder
    check = OracleCheck(folder="lm_tasks", model_dir="m", tolerance=1e-3, tasks=[TaskCheck(
        condition="wasserstein-top1", set="wasserstein-top1", task="lambada_openai_local", documents=300,
        requests=300, max_abs_diff=6.5e-5, max_abs_diff_per_token=6.5e-5, decisions_agree=300)])
    (tmp_path / "lm_tasks").mkdir()
    (tmp_path / "lm_tasks" / "oracle_check_lambada.json").write_text(check.model_dump_json())
    path = write_report(cfg, disc, condition_sets(cfg), tmp_path / "no-model")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["oracle_checks"]["lm_tasks/oracle_check_lambada.json"]["tasks"][0]["decisions_agree"] == 300
    assert "| wasserstein-top1 | lambada_openai_local | 300 | 300 | 6.5e-05 | 6.5e-05 | 300/300 |" in \
        path.read_text().splitlines()
