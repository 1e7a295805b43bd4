"""`negablate reproduce` end to end on a tiny random Llama, then resumed.

The numbers inside are checked against the files the run wrote (each condition's
per-pair records and the neuron-set files), and a second run must recompute
nothing: no engine starts, the same table.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from eval.data import default_data_dir
from eval.reproduce import ReproduceConfig, condition_sets, reproduce
from eval.stats import minimal_detectable_effect
from eval.tasks import load_records, load_summary
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
        model=str(model), out=root / "report", top_percent=10, discovery_tokens=2048, window=128,
        blimp_per_paradigm=1, tse_per_test=2, ppl_windows=2, match_tokens=512, match_max_iter=3,
        kv_cache_mb=64, n_boot=200,
    )
    t0 = time.monotonic()
    path = reproduce(cfg)
    return cfg, path, time.monotonic() - t0


def test_every_condition_scored_every_pair(run):
    cfg, path, _ = run
    report = json.loads((cfg.out / "report.json").read_text())
    labels = [r["condition"] for r in report["rows"]]
    assert labels == [c[0] for c in condition_sets(cfg)]
    for label in labels:
        assert load_summary(cfg.out / "runs" / label / "blimp").n_pairs == 67  # 1 per paradigm
        assert load_summary(cfg.out / "runs" / label / "tse").n_pairs == 44  # 2 per test x 22


def test_table_numbers_come_from_the_records(run):
    cfg, _, _ = run
    report = json.loads((cfg.out / "report.json").read_text())
    runs = cfg.out / "runs"
    base = {t: load_records(runs / "baseline" / t) for t in ("blimp", "tse")}
    base_ppl = load_summary(runs / "baseline" / "perplexity").ppl
    for row in report["rows"]:
        for task in ("blimp", "tse"):
            recs = load_records(runs / row["condition"] / task)
            acc = sum(r["correct"] for r in recs) / len(recs)
            assert row[f"{task}_acc"] == pytest.approx(acc, abs=1e-12)
            if row["condition"] != "baseline":
                base_acc = sum(r["correct"] for r in base[task]) / len(base[task])
                assert row[f"{task}_delta"][0] == pytest.approx(acc - base_acc, abs=1e-12)
                assert row[f"{task}_delta"][1] <= row[f"{task}_delta"][0] <= row[f"{task}_delta"][2]
                before = {(r["paradigm"], r["pair_id"]): r["correct"] for r in base[task]}
                flips = sum(r["correct"] != before[(r["paradigm"], r["pair_id"])] for r in recs)
                assert row[f"{task}_mde"] == pytest.approx(
                    minimal_detectable_effect(len(recs), flips / len(recs)), rel=1e-12)
        ppl = load_summary(runs / row["condition"] / "perplexity").ppl
        assert row["ppl_ratio"] == pytest.approx(ppl / base_ppl, rel=1e-12)
    # the CSV other tools read has the same numbers
    with open(cfg.out / "main_table.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [t["condition"] for t in table] == [r["condition"] for r in report["rows"]]
    assert [float(t["blimp_acc"]) for t in table] == pytest.approx([r["blimp_acc"] for r in report["rows"]])
    assert "| MDE |" in (cfg.out / "REPORT.md").read_text()


def test_ablations_change_scores_and_counts_match_the_sets(run):
    cfg, _, _ = run
    report = json.loads((cfg.out / "report.json").read_text())
    rows = {r["condition"]: r for r in report["rows"]}
    assert rows["baseline"]["neurons"] == 0
    w = rows["wasserstein-negative"]["neurons"]
    assert w > 0 and rows["wasserstein-positive"]["neurons"] == w and rows["random-negative"]["neurons"] == w
    assert rows["perplexity-matched-negative"]["neurons"] >= 1
    assert rows["perplexity-matched-bottom-negative"]["neurons"] >= 1
    # every ablation moves the sentence scores (the tiny model's neurons all matter)
    base = {r["pair_id"]: r for r in load_records(cfg.out / "runs" / "baseline" / "blimp")
            if r["paradigm"] == "adjunct_island"}
    for label in ("wasserstein-negative", "wasserstein-positive", "random-negative"):
        recs = [r for r in load_records(cfg.out / "runs" / label / "blimp") if r["paradigm"] == "adjunct_island"]
        assert any(abs(r["logprob_good"] - base[r["pair_id"]]["logprob_good"]) > 1e-4 for r in recs), label
    for png in ("blimp_phenomena_deltas.png", "neuron_counts.png", "wasserstein_scores.png"):
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
    assert after["rows"] == before["rows"]
