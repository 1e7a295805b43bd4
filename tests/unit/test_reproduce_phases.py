"""What reproduce asks of its later phases (lm_eval tasks, the layer analysis), without engines:
the phases' own end-to-end tests are tests/e2e/test_lm_tasks.py and test_layer_analysis.py."""

from __future__ import annotations

import json

import eval.analysis.layers as layers
import eval.analysis.lm_tasks as lm_tasks
import eval.reproduce as rep
from eval.reproduce import ReproduceConfig, match_perplexity, run_layers_phase, run_lm_tasks_phase
from eval.reproduce_config import default_ks, lm_task_sets


def test_lm_tasks_run_for_the_baseline_the_wasserstein_set_and_both_matched_controls(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(lm_tasks, "run_lm_tasks", lambda cfg, server_factory=None: seen.append(cfg))
    cfg = ReproduceConfig(out=tmp_path, top=[2, 1], lm_tasks=["piqa_local", "arc_easy_local"], lm_tasks_limit=50)
    run_lm_tasks_phase(cfg, tmp_path / "model", tmp_path / "disc", tmp_path / "logs")
    (got,) = seen
    assert got.sets == lm_task_sets(cfg) == ["wasserstein-top2", "perplexity-matched-top2-s0",
                                             "perplexity-matched-bottom-top2"]
    assert [c.label for c in got.conditions()] == ["baseline", *got.sets]
    assert got.tasks == ["piqa_local", "arc_easy_local"] and got.limit == 50
    assert got.out == tmp_path / "lm_tasks" and got.tokenizer == str(tmp_path / "model")
    seen.clear()
    run_lm_tasks_phase(cfg.model_copy(update={"lm_tasks": []}), tmp_path, tmp_path, tmp_path)
    assert not seen


def test_layer_analysis_of_the_main_set(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(layers, "run_layers", lambda cfg: seen.append(cfg))
    disc = tmp_path / "disc"
    disc.mkdir()
    (disc / "stats.json").write_text(json.dumps({"model": {"num_layers": 30}}))
    cfg = ReproduceConfig(out=tmp_path, top=[2, 1], layers_blimp_per_paradigm=40, ppl_window=1024)
    run_layers_phase(cfg, tmp_path / "model", disc, tmp_path / "data")
    (got,) = seen
    assert got.base_set == "wasserstein-top2" and got.out == tmp_path / "layers"
    assert got.ks == [1, 2, 4, 8, 16, 30] and got.layers is None  # every layer alone
    assert got.settings.blimp_per_paradigm == 40 and got.settings.window == 1024
    assert got.settings.ppl_text == "raw" and got.max_model_len == 1025
    seen.clear()
    run_layers_phase(cfg.model_copy(update={"layers_blimp_per_paradigm": 0}), tmp_path, disc, tmp_path)
    assert not seen


def test_default_depths():
    assert default_ks(1) == [1]
    assert default_ks(2) == [1, 2]
    assert default_ks(18) == [1, 2, 4, 8, 16, 18]
    assert default_ks(16) == [1, 2, 4, 8, 16]


def test_the_lm_tasks_server_serves_the_sets_with_enough_worker_slots(tmp_path, monkeypatch):
    import server.launcher as launcher

    made = []

    class FakeServer:
        def __init__(self, model_dir, *extra, **kw):
            made.append((model_dir, extra, kw))

        def start(self, timeout):
            return ("started", timeout)

    monkeypatch.setattr(launcher, "ServerProcess", FakeServer)
    monkeypatch.setattr("vllm_negablate.offline.bind_worker_to_all_cores", lambda: made.append("bound"))
    start = lm_tasks.server_factory(tmp_path / "m", tmp_path / "sets", tmp_path / "s.log", served_name="model",
                                    dtype="float32", kv_cache_mb=256, max_model_len=2049, max_sets=8)
    assert not made  # nothing starts until a condition is pending
    assert start() == ("started", 900)
    assert made[0] == "bound"
    model_dir, extra, kw = made[1]
    assert model_dir == tmp_path / "m" and extra == ("--max-sets", "8", "--neuron-sets", str(tmp_path / "sets"))
    assert kw["kv_cache_bytes"] == 256 * 2**20 and kw["max_model_len"] == 2049 and kw["dtype"] == "float32"
    assert int(kw["env"][launcher.ENV_WORKER_SLOTS]) == launcher.worker_slots(8) > 8


def test_the_matched_search_makes_each_missing_set_once_and_each_further_draw_with_its_seed(tmp_path, monkeypatch):
    """One search for every p and both pools (the first seed), then one per further draw of
    the random pool at the main p; sets already on disk are not searched again."""
    calls = []
    monkeypatch.setattr(rep, "_run", lambda cmd, log: calls.append((cmd, log.name)))
    sets = tmp_path / "disc" / "sets"
    sets.mkdir(parents=True)
    cfg = ReproduceConfig(out=tmp_path, top=[2, 1], seed=4, matched_draws=3)

    def arg(cmd, flag):
        return cmd[cmd.index(flag) + 1]

    match_perplexity(cfg, tmp_path / "model", tmp_path / "disc", tmp_path / "data", tmp_path)
    assert [(arg(c, "--top"), arg(c, "--seed"), arg(c, "--pool"), log) for c, log in calls] == [
        ("2,1", "4", "random,bottom", "perplexity-matched.log"),
        ("2", "5", "random", "perplexity-matched-s5.log"), ("2", "6", "random", "perplexity-matched-s6.log")]
    for name in ("perplexity-matched-top2-s4", "perplexity-matched-bottom-top2", "perplexity-matched-top1-s4",
                 "perplexity-matched-bottom-top1", "perplexity-matched-top2-s6"):
        (sets / f"{name}.json").write_text("{}")
    calls.clear()
    match_perplexity(cfg, tmp_path / "model", tmp_path / "disc", tmp_path / "data", tmp_path)
    assert [(arg(c, "--top"), arg(c, "--seed"), arg(c, "--pool")) for c, _ in calls] == [("2", "5", "random")]
    (sets / "perplexity-matched-top2-s5.json").write_text("{}")
    calls.clear()
    match_perplexity(cfg, tmp_path / "model", tmp_path / "disc", tmp_path / "data", tmp_path)
    assert calls == []


def test_the_run_clock_counts_stopped_invocations_and_adds_to_earlier_ones(tmp_path, monkeypatch):
    """timing.json after each phase: an invocation killed after its first phase keeps that
    phase's time (not finished), the next adds to it; the first format (seconds of
    finished invocations) is read as such."""
    from eval import reproduce

    (tmp_path / "timing.json").write_text(json.dumps({"invocations_s": [100.0], "total_s": 100.0}))
    now = iter([0.0, 0.0, 30.0, 1000.0, 1000.0, 1040.0, 1100.0])
    monkeypatch.setattr(reproduce.time, "monotonic", lambda: next(now))
    first = reproduce.RunClock(tmp_path)  # started at 0
    assert first.lap() == 130.0  # a phase done at 30 s; then the invocation is killed
    second = reproduce.RunClock(tmp_path)  # started at 1000
    assert second.lap() == 170.0
    assert second.lap(finished=True) == 230.0
    data = json.loads((tmp_path / "timing.json").read_text())
    assert [(i["seconds"], i["finished"]) for i in data["invocations"]] == [(100.0, True), (30.0, False), (100.0, True)]
    assert data["total_s"] == 230.0
