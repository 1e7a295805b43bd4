"""eval.reproduce_status (`negablate reproduce --plan`): a run folder's state, the sentences
left and the time they need, all from files; counts checked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import eval.reproduce as reproduce
import eval.reproduce_status as status
from eval.analysis.sweep import blimp_options, condition_for, ppl_options, tse_options
from eval.reproduce_config import ReproduceConfig, condition_sets


def _summary(path: Path, options: dict | None = None, scored: int = 0, elapsed: float = 0.0) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "summary.json").write_text(json.dumps({"run": {
        "options": options or {}, "scoring": {"sequences_scored": scored}, "elapsed_s": elapsed}}))


@pytest.fixture
def sized(monkeypatch):
    """Task sizes without the data: 2 sentences per BLiMP pair per paradigm x 67, TSE 40, 2 windows."""
    def sizes(settings, data_dir):
        out = {"blimp": 2 * 67 * settings.blimp_per_paradigm}
        if settings.tse_per_test:
            out["tse"] = 40
        if settings.ppl_windows:
            out["perplexity"] = settings.ppl_windows
        return out

    monkeypatch.setattr(status, "_task_sizes", sizes)
    monkeypatch.setattr(reproduce, "eval_conditions", _conditions)


def _conditions(specs, disc):
    """The sets' content hashes: none (a condition per spec, as if every set were empty)."""
    return [condition_for(s.label, s.kind, None) for s in specs]


def _status(cfg, data):
    return status.run_status(cfg, data, reproduce.scoring_folders(cfg, data), _conditions)


def _cfg(tmp_path, **kw) -> ReproduceConfig:
    return ReproduceConfig(out=tmp_path, top=[1.0, 2.0], blimp_per_paradigm=2, blimp_main_per_paradigm=10,
                           tse_per_test=2, ppl_windows=2, lm_tasks=["piqa_local"], layers_blimp_per_paradigm=3, **kw)


def test_a_fresh_folder_counts_every_condition(tmp_path, sized):
    cfg = _cfg(tmp_path)
    steps = {s.name: s for s in _status(cfg, tmp_path / "data")}
    assert [s.state for s in steps.values()] == ["pending"] * 7
    specs = condition_sets(cfg)
    n_full = sum(s.full_blimp for s in specs)
    assert n_full == 4 and len(specs) == 1 + 5 + 4  # baseline, 5 kinds at the main p, 4 at 2%
    assert steps["score runs-full/"].sequences_left == 4 * 2 * 67 * 10
    assert steps["score runs/"].sequences_left == len(specs) * (2 * 67 * 2 + 40)
    assert steps["score runs/"].windows_left == len(specs) * 2
    assert steps["perplexity-matched controls"].detail == "0/4 sets"
    assert steps["layer analysis"].sequences_left == 0  # its size needs the model's depth


def test_a_folder_mid_run(tmp_path, sized):
    cfg = _cfg(tmp_path)
    out, disc = tmp_path, tmp_path / "discovery"
    (disc / "sets").mkdir(parents=True)
    (disc / "stats.json").write_text(json.dumps({"model": {"num_layers": 6}}))
    specs = condition_sets(cfg)
    for s in specs:
        if s.set_name:
            (disc / "sets" / f"{s.set_name}.json").write_text("{}")
    full_settings = reproduce.eval_settings(cfg, tmp_path / "data", full=True)
    settings = reproduce.eval_settings(cfg, tmp_path / "data")
    base, wneg = (condition_for(s.label, s.kind, None) for s in specs[:2])
    # runs-full: the baseline and the Wasserstein set finished (the latter fast: all cached)
    _summary(out / "runs-full" / "baseline" / "blimp", blimp_options(base, full_settings), 1340, 20.0)
    _summary(out / "runs-full" / wneg.label / "blimp", blimp_options(wneg, full_settings), 500, 10.0)
    # runs/: the baseline's three tasks; the Wasserstein set's TSE made with other settings (stale)
    _summary(out / "runs" / "baseline" / "blimp", blimp_options(base, settings))
    _summary(out / "runs" / "baseline" / "tse", tse_options(base, settings), 1200, 40.0)
    _summary(out / "runs" / "baseline" / "perplexity", ppl_options(base, settings), 2, 30.0)
    _summary(out / "runs" / wneg.label / "tse", {**tse_options(wneg, settings), "tse_per_test": 9})
    steps = {s.name: s for s in _status(cfg, tmp_path / "data")}
    full, runs = steps["score runs-full/"], steps["score runs/"]
    assert (full.state, full.sequences_left) == ("partly done", 2 * 2 * 67 * 10)
    assert full.detail.startswith("2/4 condition x task runs finished")
    # runs/: 10 conditions x 3 tasks, 3 finished; the Wasserstein set's BLiMP subsample is in the
    # cache (its runs-full BLiMP is finished), so it costs nothing
    assert runs.state == "partly done" and runs.detail.startswith("3/30 ")
    assert runs.sequences_left == 8 * (2 * 67 * 2) + 9 * 40 and runs.windows_left == 9 * 2
    assert steps["layer analysis"].sequences_left == (6 + 4) * 2 * 67 * 3  # 6 layers + k in 1, 2, 4, 6
    # two layers finished (the baseline beside them is not one of the analysis's conditions)
    for name in ("layer0", "layer3", "baseline"):
        (out / "layers" / "runs" / name / "blimp").mkdir(parents=True)
        (out / "layers" / "runs" / name / "blimp" / "summary.json").write_text("{}")
    steps = {s.name: s for s in _status(cfg, tmp_path / "data")}
    layers = steps["layer analysis"]
    assert (layers.state, layers.sequences_left) == ("partly done", (6 + 4 - 2) * 2 * 67 * 3)
    assert layers.detail.endswith("; 2/10 conditions finished")
    assert steps["discovery"].state == "done" and steps["perplexity-matched controls"].state == "done"
    # a clone: the corpus's record is committed, its text (WikiText-2) is not
    assert steps["discovery corpus"].state == "pending"
    corpus = out / "corpus" / f"wikitext-2-valid.{cfg.discovery_text}.txt"
    corpus.parent.mkdir()
    corpus.with_suffix(".json").write_text("{}")
    step = {s.name: s for s in _status(cfg, tmp_path / "data")}["discovery corpus"]
    assert step.state == "done" and "rebuilt when a phase needs it" in step.detail
    # the rate: sentences the server computed over the seconds, BLiMP and TSE runs of >= 1,000
    assert status.measured_rate(out) == pytest.approx((1340 + 1200) / (20.0 + 40.0))
    lines = status.plan_lines(cfg, list(steps.values()), status.measured_rate(out))
    left = full.sequences_left + runs.sequences_left + steps["layer analysis"].sequences_left
    assert lines[-1].startswith(f"Scoring left: {left:,} sentences, about ")
    assert "at the 42.3 sentences/s" in lines[-1]


def test_nothing_to_estimate_without_a_rate(tmp_path, sized):
    cfg = _cfg(tmp_path)
    steps = _status(cfg, tmp_path / "data")
    assert status.measured_rate(tmp_path) is None
    assert status.plan_lines(cfg, steps, None)[-1].endswith("(no rate measured in this folder yet).")


def test_the_plan_flag_prints_and_starts_nothing(tmp_path, sized, monkeypatch):
    import typer
    from typer.testing import CliRunner

    started = []
    monkeypatch.setattr(reproduce, "preflight", lambda cfg: tmp_path / "data")  # checked in its own tests
    monkeypatch.setattr(reproduce, "reproduce", lambda cfg: started.append(cfg))
    app = typer.Typer()
    app.command()(reproduce.reproduce_command)
    res = CliRunner().invoke(app, ["--preset", "powered", "--model", "smollm2-135m", "--out", str(tmp_path / "r"),
                                   "--plan"])
    assert res.exit_code == 0, res.output
    assert not started and not (tmp_path / "r").exists()
    lines = res.output.splitlines()
    assert lines[0] == f"{tmp_path / 'r'} (preset powered, smollm2-135m, float32):"
    assert any(ln.split()[:2] == ["discovery", "pending"] for ln in lines)
    assert lines[-1].endswith("(no rate measured in this folder yet).")


def test_the_lm_eval_phase_counts_finished_conditions_and_cached_answers(tmp_path, sized):
    """One condition finished in 20 minutes by lm_eval's own clock (its file's time is a
    clone's, days later), one in progress with 3 answers in its request cache (lm_eval's
    sqlite file), two not started: partly done, said so."""
    import os
    import sqlite3
    from datetime import datetime, timezone

    cfg = _cfg(tmp_path)
    root = tmp_path / "lm_tasks" / "runs"
    started = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
    for label in ("baseline", "wasserstein-negative-top1"):
        folder = root / label / "sig"
        folder.mkdir(parents=True)
        (folder / "request.json").write_text(json.dumps({"started_at": started.isoformat()}))
    results = root / "baseline" / "sig" / "model" / "results_x.json"
    results.parent.mkdir()
    results.write_text(json.dumps({"total_evaluation_time_seconds": "1200.5"}))
    os.utime(results, (started.timestamp() + 9e5, started.timestamp() + 9e5))  # a clone's checkout time
    cache = root / "wasserstein-negative-top1" / "sig" / "request-cache"
    cache.mkdir()
    with sqlite3.connect(cache / "h-float32_rank0.db") as conn:
        conn.execute("CREATE TABLE unnamed (key TEXT PRIMARY KEY, value BLOB)")
        conn.executemany("INSERT INTO unnamed VALUES (?, ?)", [(str(i), b"x") for i in range(3)])
    (cache / "broken_rank0.db").write_text("not a database")
    step = {s.name: s for s in _status(cfg, tmp_path / "data")}["lm_eval tasks"]
    assert step.state == "partly done"
    assert step.detail.endswith("; 1/4 conditions finished (about 20 min each); 3 answers cached for the one "
                                "in progress")
    (tmp_path / "lm_tasks" / "lm_tasks.json").write_text("{}")
    assert {s.name: s for s in _status(cfg, tmp_path / "data")}["lm_eval tasks"].state == "done"
