"""`negablate reproduce` end to end on a tiny random Llama, a two-p sweep, then resumed.

The numbers inside are checked against the files the run wrote (each condition's
per-pair records and the neuron-set files), and a second run must recompute
nothing: no engine starts, the same table.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest

from eval.data import default_data_dir
from eval.reproduce import ReproduceConfig, condition_sets, reproduce
from eval.stats import minimal_detectable_effect
from eval.tasks import load_records, load_summary
from vllm_negablate.discovery.wasserstein import top_percent_mask
from vllm_negablate.testing.tiny_models import build_tiny_model

DATA = default_data_dir()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DATA / "blimp").is_dir() or not (DATA / "wikitext-2").is_dir(),
                       reason=f"BLiMP/WikiText-2 not found under {DATA}"),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[ReproduceConfig, Path, float]:
    root = tmp_path_factory.mktemp("reproduce")
    model = build_tiny_model("llama", root / "model")
    cfg = ReproduceConfig(
        model=str(model), out=root / "report", top=[10, 20], discovery_tokens=2048, window=128,
        blimp_per_paradigm=1, blimp_main_per_paradigm=2, tse_per_test=2, ppl_windows=2, ppl_window=200,
        match_tokens=512, match_max_iter=3, kv_cache_mb=64, n_boot=200,
        lm_tasks=[], layers_blimp_per_paradigm=0,  # their phases: tests/unit/test_reproduce_phases.py
    )
    t0 = time.monotonic()
    path = reproduce(cfg)
    return cfg, path, time.monotonic() - t0


def test_every_condition_scored_every_pair(run):
    cfg, path, _ = run
    report = json.loads((cfg.out / "report.json").read_text())
    specs = condition_sets(cfg)
    assert [r["condition"] for r in report["rows"]] == [s.label for s in specs if s.main]
    assert [r["condition"] for r in report["sweep"]] == [s.label for s in specs if s.label != "baseline"]
    for spec in specs:
        assert load_summary(cfg.out / "runs" / spec.label / "blimp").n_pairs == 67  # 1 per paradigm
        assert load_summary(cfg.out / "runs" / spec.label / "tse").n_pairs == 44  # 2 per test x 22
        ppl = load_summary(cfg.out / "runs" / spec.label / "perplexity")
        assert ppl.window == 200 and ppl.n_tokens == 2 * 199  # raw test, 2 windows of 200 with the start token
        full = cfg.out / "runs-full" / spec.label / "blimp"
        assert full.is_dir() == spec.full_blimp
        if spec.full_blimp:
            assert load_summary(full).n_pairs == 134
    rows = {r["condition"]: r for r in report["rows"]}
    assert rows["baseline"]["blimp_n"] == rows["wasserstein-negative-top10"]["blimp_n"] == 134
    assert rows["wasserstein-positive-top10"]["blimp_n"] == 67  # not a full-BLiMP condition
    corpus = json.loads((cfg.out / "corpus" / "wikitext-2-valid.unk-removed.json").read_text())
    disc = json.loads((cfg.out / "discovery" / "stats.json").read_text())
    assert corpus["unk_removed"] > 0 and disc["corpus_sha256"] == corpus["sha256"]
    assert disc["top_percents"] == [10.0, 20.0]


def test_table_numbers_come_from_the_records(run):
    cfg, _, _ = run
    report = json.loads((cfg.out / "report.json").read_text())
    for table, rows in (("main", report["rows"]), ("sweep", report["sweep"])):
        for row in rows:
            for task in ("blimp", "tse"):
                full = table == "main" and task == "blimp" and (cfg.out / "runs-full" / row["condition"]).is_dir()
                runs = cfg.out / ("runs-full" if full else "runs")
                recs = load_records(runs / row["condition"] / task)
                base = load_records(runs / "baseline" / task)
                acc = sum(r["correct"] for r in recs) / len(recs)
                assert row[f"{task}_acc"] == pytest.approx(acc, abs=1e-12)
                assert row[f"{task}_n"] == len(recs)
                if row["condition"] == "baseline":
                    continue
                base_acc = sum(r["correct"] for r in base) / len(base)
                assert row[f"{task}_delta"][0] == pytest.approx(acc - base_acc, abs=1e-12)
                assert row[f"{task}_delta"][1] <= row[f"{task}_delta"][0] <= row[f"{task}_delta"][2]
                before = {(r["paradigm"], r["pair_id"]): r["correct"] for r in base}
                flips = sum(r["correct"] != before[(r["paradigm"], r["pair_id"])] for r in recs)
                assert row[f"{task}_mde"] == pytest.approx(
                    minimal_detectable_effect(len(recs), flips / len(recs)), rel=1e-12)
            runs = cfg.out / "runs"
            ppl = load_summary(runs / row["condition"] / "perplexity").ppl
            assert row["ppl_ratio"] == pytest.approx(ppl / load_summary(runs / "baseline" / "perplexity").ppl,
                                                     rel=1e-12)
    # TSE per field under both metrics, from the records
    by_field = report["tse_by_field"]
    assert {t["metric"] for t in by_field} == {"correct_mean", "correct_sum"}
    t = next(t for t in by_field if t["condition"] == "wasserstein-negative-top10" and t["metric"] == "correct_sum")
    recs = [r for r in load_records(cfg.out / "runs" / t["condition"] / "tse") if r["field"] == t["field"]]
    assert t["n"] == len(recs) and t["acc"] == pytest.approx(sum(r["correct_sum"] for r in recs) / len(recs))
    # head to head: the Wasserstein set against each control at each p, from both records
    h2h = report["head_to_head"]
    assert len(h2h) == 2 * 3 * 2  # p x controls x tests
    for h in h2h:
        p = f"{h['top']:g}"
        folder = cfg.out / h["source"]
        assert h["source"] == ("runs-full" if (h["task"] == "blimp" and p == "10"
                                              and h["control_kind"] != "perplexity-matched-negative") else "runs")
        w = load_records(folder / f"wasserstein-negative-top{p}" / h["task"])
        c = load_records(folder / h["control"] / h["task"])
        assert h["n"] == len(w) == len(c)
        assert h["diff"] == pytest.approx(sum(r["correct"] for r in w) / len(w) - sum(r["correct"] for r in c) / len(c),
                                          abs=1e-12)
    # the CSVs other tools read have the same numbers
    for name, rows in (("main_table.csv", report["rows"]), ("sweep_table.csv", report["sweep"])):
        with open(cfg.out / name) as fh:
            table = list(csv.DictReader(fh))
        assert [t["condition"] for t in table] == [r["condition"] for r in rows]
        assert [float(t["blimp_acc"]) for t in table] == pytest.approx([r["blimp_acc"] for r in rows])
    text = (cfg.out / "REPORT.md").read_text()
    assert "| MDE |" in text and "## Top-p sweep" in text and "## TSE by field" in text


def test_ablations_change_scores_and_counts_match_the_sets(run):
    cfg, _, _ = run
    report = json.loads((cfg.out / "report.json").read_text())
    rows = {r["condition"]: r for r in report["rows"] + report["sweep"]}
    assert rows["baseline"]["neurons"] == 0
    for p in ("10", "20"):
        w = rows[f"wasserstein-negative-top{p}"]["neurons"]
        assert w > 0 and rows[f"random-negative-top{p}"]["neurons"] == w
        assert rows[f"perplexity-matched-negative-top{p}"]["neurons"] >= 1
        assert rows[f"perplexity-matched-bottom-negative-top{p}"]["neurons"] >= 1
    assert rows["wasserstein-positive-top10"]["neurons"] == rows["wasserstein-negative-top10"]["neurons"]
    assert rows["wasserstein-negative-top20"]["neurons"] == 2 * rows["wasserstein-negative-top10"]["neurons"]
    # every ablation moves the sentence scores (the tiny model's neurons all matter)
    base = {r["pair_id"]: r for r in load_records(cfg.out / "runs" / "baseline" / "blimp")
            if r["paradigm"] == "adjunct_island"}
    for label in ("wasserstein-negative-top10", "wasserstein-positive-top10", "random-negative-top10"):
        recs = [r for r in load_records(cfg.out / "runs" / label / "blimp") if r["paradigm"] == "adjunct_island"]
        assert any(abs(r["logprob_good"] - base[r["pair_id"]]["logprob_good"]) > 1e-4 for r in recs), label
    for png in ("blimp_phenomena_deltas.png", "neuron_counts.png", "wasserstein_scores.png", "sweep.png",
                "cost_vs_perplexity.png"):
        assert (cfg.out / png).stat().st_size > 1000


def test_rerun_resumes_without_recomputing(run):
    cfg, _, first_s = run
    before = json.loads((cfg.out / "report.json").read_text())
    server_log = cfg.out / "logs" / "server.log"
    size = server_log.stat().st_size
    t0 = time.monotonic()
    reproduce(cfg)
    assert time.monotonic() - t0 < min(first_s, 60)
    assert server_log.stat().st_size == size  # no server was started
    after = json.loads((cfg.out / "report.json").read_text())
    assert after["rows"] == before["rows"] and after["sweep"] == before["sweep"]


def test_premise_statistics_come_from_the_discovery_statistics(run):
    cfg, _, _ = run
    report = json.loads((cfg.out / "report.json").read_text())
    stats = np.load(cfg.out / "discovery" / "stats.npz")
    w1, wh, frac = stats["w1"], stats["w1_h_negative"], stats["frac_h_negative"]
    top = np.stack([top_percent_mask(row, cfg.main_top) for row in w1])
    rows = {(r["layer"], r["group"]): r for r in report["premise"]}
    for group, mask in (("wasserstein", top), ("other", ~top)):
        r = rows[("all", group)]
        assert r["neurons"] == int(mask.sum())
        assert r["share_h_negative"] == pytest.approx(float(np.mean((wh / w1)[mask])), rel=1e-12)
        assert r["frac_h_negative"] == pytest.approx(float(np.mean(frac[mask])), rel=1e-12)
        assert 0.0 < r["share_h_negative"] < 1.0 and 0.0 < r["frac_h_negative"] < 1.0
    assert rows[("0", "wasserstein")]["neurons"] == int(top[0].sum())
    assert (cfg.out / "premise.csv").is_file() and "## The premise" in (cfg.out / "REPORT.md").read_text()


def test_a_report_mid_run_shows_what_is_finished(run, tmp_path):
    import shutil

    from eval.report import rebuild

    cfg, _, _ = run
    folder = tmp_path / "partial"
    # a folder mid-run: its report never showed the runs it has not finished (a rebuild
    # refuses to drop results a report.json shows: test_report.py)
    shutil.copytree(cfg.out, folder, ignore=shutil.ignore_patterns("cache", "logs", "report.json"))
    shutil.rmtree(folder / "runs" / "random-negative-top20")  # not scored yet
    shutil.rmtree(folder / "runs-full" / "random-negative-top10")  # its full BLiMP neither
    config = json.loads((folder / "config.json").read_text())
    rebuild(folder)
    report = json.loads((folder / "report.json").read_text())
    assert report["pending"] == ["random-negative-top20"]
    assert "random-negative-top20" not in [r["condition"] for r in report["sweep"]]
    rows = {r["condition"]: r for r in report["rows"]}
    assert rows["random-negative-top10"]["blimp_n"] == 67  # the sweep's pairs until the full run is in
    assert rows["wasserstein-negative-top10"]["blimp_n"] == 134
    assert "Not finished yet" in (folder / "REPORT.md").read_text()
    assert json.loads((folder / "config.json").read_text()) == config


def test_a_finished_folder_takes_a_second_draw_of_the_matched_control(run):
    """--matched-draws 2 on the finished folder: only the new draw is searched (its own
    seed, same target) and scored; the report sets both draws side by side and compares
    the Wasserstein set with each; nothing else is recomputed."""
    cfg, _, _ = run
    before = json.loads((cfg.out / "report.json").read_text())
    more = cfg.model_copy(update={"matched_draws": 2})
    reproduce(more)
    after = json.loads((cfg.out / "report.json").read_text())
    assert after["rows"] == before["rows"] and after["sweep"] == before["sweep"]
    assert json.loads((cfg.out / "config.json").read_text())["matched_draws"] == 2
    sets = cfg.out / "discovery" / "sets"
    first = json.loads((sets / "perplexity-matched-top10-s0.json").read_text())["provenance"]
    second = json.loads((sets / "perplexity-matched-top10-s1.json").read_text())["provenance"]
    assert (first["seed"], second["seed"]) == (0, 1)
    assert second["source"]["target_perplexity"] == pytest.approx(first["source"]["target_perplexity"])
    label = "perplexity-matched-negative-top10-s1"
    assert load_summary(cfg.out / "runs" / label / "blimp").n_pairs == 67
    draws = {d["draw"]: d for d in after["draws"]}
    assert sorted(draws) == [0, 1] and draws[1]["condition"] == label
    for d in draws.values():
        recs = load_records(cfg.out / "runs" / d["condition"] / "blimp")
        base = load_records(cfg.out / "runs" / "baseline" / "blimp")
        assert d["blimp_acc"] == pytest.approx(np.mean([r["correct"] for r in recs]))
        assert d["blimp_delta"][0] == pytest.approx(d["blimp_acc"] - np.mean([r["correct"] for r in base]))
    assert {(r["control"], r["task"]) for r in after["head_to_head"] if r["draw"] == 1} == {
        (label, "blimp"), (label, "tse")}
    assert "draw by draw" in (cfg.out / "REPORT.md").read_text()
