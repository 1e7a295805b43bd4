"""eval.analysis.lm_tasks without a server: results-JSON parsing, deltas (paired and
unpaired), the Markdown section, the output files, the PIQA task generator, resume."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from eval.analysis import lm_tasks as lt

# A trimmed lm_eval 0.4.13 results_*.json: one task with acc/acc_norm, one group with
# a subtask, a metric whose stderr is "N/A", and the non-numeric keys lm_eval adds.
RESULTS_BASE = {
    "results": {
        "piqa_local": {"alias": "piqa_local", "acc,none": 0.6, "acc_stderr,none": 0.05,
                       "acc_norm,none": 0.55, "acc_norm_stderr,none": 0.0497},
        "grp": {"alias": "grp", "acc,none": 0.7, "acc_stderr,none": "N/A"},
        "grp_a": {"alias": " - grp_a", "acc,none": 0.7, "acc_stderr,none": 0.1, "word_perplexity,none": 12.5,
                  "word_perplexity_stderr,none": "N/A"},
    },
    "groups": {"grp": {"alias": "grp", "acc,none": 0.7, "acc_stderr,none": "N/A"}},
    "group_subtasks": {"grp": ["grp_a"], "piqa_local": []},
    "n-samples": {"piqa_local": {"original": 1838, "effective": 100}, "grp_a": {"original": 20, "effective": 20}},
    "higher_is_better": {"piqa_local": {"acc": True, "acc_norm": True}, "grp_a": {"acc": True,
                                                                                   "word_perplexity": False}},
    "config": {"model": "local-completions", "limit": 100.0},
}


def _ablated(d_acc: float, d_norm: float) -> dict:
    r = json.loads(json.dumps(RESULTS_BASE))
    r["results"]["piqa_local"]["acc,none"] += d_acc
    r["results"]["piqa_local"]["acc_stderr,none"] = 0.04
    r["results"]["piqa_local"]["acc_norm,none"] += d_norm
    return r


def test_parse_results_rows():
    rows = lt.parse_results(RESULTS_BASE, "baseline")
    got = {(r.task, r.metric, r.filter): r for r in rows}
    assert set(got) == {("piqa_local", "acc", "none"), ("piqa_local", "acc_norm", "none"),
                        ("grp", "acc", "none"), ("grp_a", "acc", "none"), ("grp_a", "word_perplexity", "none")}
    a = got[("piqa_local", "acc", "none")]
    assert (a.value, a.stderr, a.n, a.higher_is_better, a.condition, a.set) == (0.6, 0.05, 100, True, "baseline", None)
    assert got[("grp", "acc", "none")].stderr is None and got[("grp", "acc", "none")].n is None  # "N/A"
    assert got[("grp_a", "word_perplexity", "none")].higher_is_better is False
    assert got[("grp_a", "word_perplexity", "none")].value == 12.5
    assert all(r.delta is None for r in rows)


def test_unpaired_deltas():
    rows = lt.parse_results(RESULTS_BASE, "baseline") + lt.parse_results(_ablated(-0.1, 0.02), "ws", "ws")
    rows = lt.add_deltas(rows)
    by = {(r.task, r.metric, r.condition): r for r in rows}
    assert by[("piqa_local", "acc", "baseline")].delta is None
    ws = by[("piqa_local", "acc", "ws")]
    assert ws.delta == pytest.approx(-0.1, abs=1e-12)
    assert ws.delta == ws.value - by[("piqa_local", "acc", "baseline")].value
    assert ws.delta_stderr == pytest.approx(math.sqrt(0.05**2 + 0.04**2)) and ws.delta_stderr_kind == "unpaired"
    assert by[("piqa_local", "acc_norm", "ws")].delta == pytest.approx(0.02, abs=1e-12)
    g = by[("grp", "acc", "ws")]
    assert g.delta == 0.0 and g.delta_stderr is None and g.delta_stderr_kind is None  # no stderr to combine


def _write_run(folder: Path, results: dict, per_item: dict[str, list[float]], date: str) -> Path:
    folder.mkdir(parents=True)
    f = folder / f"results_{date}.json"
    f.write_text(json.dumps(results))
    lines = [json.dumps({"doc_id": i, "filter": "none", "metrics": list(per_item),
                         **{m: v[i] for m, v in per_item.items()}}) for i in range(len(per_item["acc"]))]
    (folder / f"samples_piqa_local_{date}.jsonl").write_text("\n".join(lines) + "\n")
    # a samples file of another run (other date) must be ignored
    (folder / "samples_piqa_local_1999-01-01T00-00-00.jsonl").write_text(
        json.dumps({"doc_id": 0, "filter": "none", "metrics": ["acc"], "acc": 99.0}) + "\n")
    return f


def test_paired_deltas_from_samples_and_outputs(tmp_path):
    rng = np.random.default_rng(0)
    base_acc = rng.integers(0, 2, 40).astype(float)
    ws_acc = base_acc.copy()
    ws_acc[:6] = 1 - ws_acc[:6]
    norm = rng.integers(0, 2, 40).astype(float)
    res_b = json.loads(json.dumps(RESULTS_BASE))
    res_w = _ablated(0.0, 0.0)
    res_b["results"]["piqa_local"]["acc,none"] = base_acc.mean()
    res_w["results"]["piqa_local"]["acc,none"] = ws_acc.mean()
    fb = _write_run(tmp_path / "b" / "m", res_b, {"acc": base_acc.tolist(), "acc_norm": norm.tolist()},
                    "2026-01-01T00-00-00.1")
    fw = _write_run(tmp_path / "w" / "m", res_w, {"acc": ws_acc.tolist(), "acc_norm": norm.tolist()},
                    "2026-01-02T00-00-00.2")
    samples = lt.load_samples(fb)
    assert set(samples) == {"piqa_local"} and samples["piqa_local"][("acc", "none")][3] == base_acc[3]
    assert lt.load_samples(fw)["piqa_local"][("acc", "none")][0] != 99.0

    cfg = lt.LmTasksConfig(server="http://x", model="tiny", tokenizer="/nonexistent", sets=["ws"],
                           tasks=["piqa_local", "grp"], limit=40, out=tmp_path / "out")
    result = lt.collect(cfg, {"baseline": fb, "ws": fw})
    by = {(r.task, r.metric, r.condition): r for r in result.rows}
    d = ws_acc - base_acc
    r = by[("piqa_local", "acc", "ws")]
    assert r.delta == pytest.approx(d.mean(), abs=1e-12)
    assert r.delta_stderr_kind == "paired" and r.n_paired == 40
    assert r.delta_stderr == pytest.approx(d.std(ddof=1) / math.sqrt(40), rel=1e-12)
    n = by[("piqa_local", "acc_norm", "ws")]  # identical per item: paired SE exactly 0
    assert n.delta == 0 and n.delta_stderr == 0 and n.delta_stderr_kind == "paired"
    assert by[("grp_a", "acc", "ws")].delta_stderr_kind == "unpaired"  # no samples for grp_a

    paths = lt.write_outputs(result, tmp_path / "out")
    back = lt.load_result(tmp_path / "out")
    assert back.rows == result.rows and [c.model for c in back.conditions] == ["tiny@none", "tiny@ws"]
    assert lt.plot_title(back) == "lm_eval tasks under ablation: nonexistent (served as tiny), first 40 documents per task"
    with paths["csv"].open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(result.rows) == 10
    row = next(x for x in rows if (x["task"], x["metric"], x["condition"]) == ("piqa_local", "acc", "ws"))
    assert float(row["delta"]) == pytest.approx(d.mean()) and row["delta_stderr_kind"] == "paired"
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 5000


def test_markdown_section_table():
    rows = lt.parse_results(RESULTS_BASE, "baseline") + lt.parse_results(_ablated(-0.1, 0.02), "ws", "ws")
    res = lt.LmTasksResult(model="gemma", tasks=["piqa_local", "grp"], limit=100,
                           conditions=lt.conditions_for("gemma", ["ws"]), rows=lt.add_deltas(rows))
    md = lt.markdown_section(json.loads(res.model_dump_json()), image="lm_tasks/lm_tasks.png")
    lines = md.splitlines()
    assert lines[0] == "## Non-grammatical tasks (lm_eval)"
    assert "| task | metric | n | baseline | ws |" in lines
    assert "| piqa_local | acc | 100 | 60.0 ± 5.0 | 50.0 (-10.0 ± 6.4) |" in lines
    assert "| piqa_local | acc_norm | 100 | 55.0 ± 5.0 | 57.0 (+2.0 ± 7.0) |" in lines
    assert "| grp | acc | - | 70.0 | 70.0 (+0.0) |" in lines
    assert "| grp_a | word_perplexity | 20 | 12.5 | 12.5 (+0) |" in lines
    assert "first 100 documents each" in md and "unpaired" in md
    assert lines[-1] == "![lm_eval task deltas](lm_tasks/lm_tasks.png)"
    # same text from the pydantic object
    assert lt.markdown_section(res, image="lm_tasks/lm_tasks.png") == md


def test_piqa_generator_matches_lm_eval_piqa(tmp_path):
    from eval.data import default_data_dir

    piqa = default_data_dir() / "piqa"
    if not (piqa / "valid.jsonl").exists():
        pytest.skip(f"PIQA data absent ({piqa})")
    import yaml

    yaml_path, data = lt.write_piqa_task(tmp_path / "tasks")
    ours = yaml.safe_load(yaml_path.read_text())
    assert ours["dataset_kwargs"]["data_files"]["validation"] == str(data) and data.is_absolute()
    items = [json.loads(x) for x in data.read_text().splitlines()]
    labels = (piqa / "valid-labels.lst").read_text().split()
    raw = [json.loads(x) for x in (piqa / "valid.jsonl").read_text().splitlines()]
    assert len(items) == 1838 and sum(i["label"] for i in items) == 928
    assert [i["label"] for i in items] == [int(x) for x in labels]
    assert [(i["goal"], i["sol1"], i["sol2"]) for i in items] == [(r["goal"], r["sol1"], r["sol2"]) for r in raw]
    mtime = data.stat().st_mtime_ns
    lt.write_piqa_task(tmp_path / "tasks")  # unchanged files are not rewritten (datasets cache)
    assert data.stat().st_mtime_ns == mtime
    spec = importlib.util.find_spec("lm_eval")
    if spec is None:
        pytest.skip("lm-eval not installed: cannot compare with its piqa.yaml")
    ref = yaml.safe_load((Path(spec.origin).parent / "tasks" / "piqa" / "piqa.yaml").read_text())
    for key in ("output_type", "validation_split", "doc_to_text", "doc_to_target", "doc_to_choice",
                "metric_list", "should_decontaminate", "doc_to_decontamination_query"):
        assert ours[key] == ref[key], key
    assert lt.declared_task_names([tmp_path / "tasks"]) == {"piqa_local"}


def test_declared_names_conditions_and_command(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "t.yaml").write_text("task: my_task\ntag:\n  - my_tag\n  - other_tag\ndataset_path: json\n")
    (tmp_path / "a" / "g.yaml").write_text("group: my_group\ntask:\n  - my_task\n")
    (tmp_path / "a" / "u.yaml").write_text("task: t2\ntag: inline_tag\n")
    assert lt.declared_task_names([tmp_path / "a"]) == {"my_task", "my_tag", "other_tag", "my_group", "t2",
                                                        "inline_tag"}
    with pytest.raises(ValueError, match="baseline"):
        lt.conditions_for("m", ["baseline"])
    conds = lt.conditions_for("m", ["a", "b", "a"])
    assert [(c.label, c.set, c.model) for c in conds] == [("baseline", None, "m@none"), ("a", "a", "m@a"),
                                                          ("b", "b", "m@b")]
    cfg = lt.LmTasksConfig(server="127.0.0.1:8000/v1", model="m", tokenizer="/tok", sets=["a"],
                           tasks=["piqa_local", "arc_easy"], limit=5, max_length=512, prefix_token_id=0)
    cmd = lt.lm_eval_command(cfg, conds[1], tmp_path / "inc", tmp_path / "o")
    margs = dict(kv.split("=", 1) for kv in cmd[cmd.index("--model_args") + 1].split(","))
    assert margs == {"model": "m@a", "base_url": "http://127.0.0.1:8000/v1/completions",
                     "tokenizer_backend": "huggingface", "tokenizer": "/tok", "num_concurrent": "1",
                     "max_retries": "3", "add_bos_token": "True", "timeout": "600", "max_length": "512",
                     "custom_prefix_token_id": "0"}
    assert cmd[cmd.index("--tasks") + 1] == "piqa_local,arc_easy" and cmd[cmd.index("--limit") + 1] == "5"
    assert "--log_samples" in cmd and cmd[cmd.index("--include_path") + 1] == str(tmp_path / "inc")
    # the signature ignores the server URL and task order, not the limit
    same = cfg.model_copy(update={"server": "http://other:1", "tasks": ["arc_easy", "piqa_local"]})
    assert same.signature() == cfg.signature()
    assert cfg.model_copy(update={"limit": 6}).signature() != cfg.signature()


def test_prepare_include_path_merges_user_dirs(tmp_path):
    from eval.data import default_data_dir

    if not (default_data_dir() / "piqa" / "valid.jsonl").exists():
        pytest.skip("PIQA data absent")
    user = tmp_path / "mine"
    (user / "sub").mkdir(parents=True)
    (user / "sub" / "x.yaml").write_text("task: tiny_x\n")
    cfg = lt.LmTasksConfig(server="http://x", model="m", tokenizer="/t", tasks=["piqa_local", "tiny_x"],
                           include_paths=[user], out=tmp_path / "out")
    inc, local = lt.prepare_include_path(cfg)
    assert local and inc == (tmp_path / "out" / "local_tasks").resolve()
    assert (inc / "include_0_mine" / "sub" / "x.yaml").exists() and (inc / "piqa_local" / "piqa_local.yaml").exists()
    # one user folder alone is passed as it is; an unknown task means "not all local"
    cfg2 = cfg.model_copy(update={"tasks": ["tiny_x", "arc_easy"]})
    assert lt.prepare_include_path(cfg2) == (user.resolve(), False)


def test_finished_conditions_are_not_rerun(tmp_path, monkeypatch):
    cfg = lt.LmTasksConfig(server=None, model="m", tokenizer="/t", sets=["ws"], tasks=["piqa_local"],
                           limit=3, out=tmp_path)
    for c, res in zip(cfg.conditions(), (RESULTS_BASE, _ablated(-0.1, 0.0))):
        d = lt.condition_dir(cfg, c) / "m"
        d.mkdir(parents=True)
        (d / "results_2026-01-01T00-00-00.json").write_text(json.dumps(res))

    def boom(*a, **k):
        raise AssertionError("nothing should run")

    monkeypatch.setattr(lt.subprocess, "run", boom)
    result = lt.run_lm_tasks(cfg, server_factory=boom)  # no server is started either
    acc = {r.condition: r for r in result.rows if (r.task, r.metric) == ("piqa_local", "acc")}
    assert acc["ws"].delta == pytest.approx(-0.1)
    assert (tmp_path / "lm_tasks.json").exists() and (tmp_path / "lm_tasks.png").exists()


def test_cli_help_and_argument_checks(tmp_path):
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    lt.register(app)

    @app.callback()
    def _cb() -> None:
        """analyze"""

    r = CliRunner().invoke(app, ["tasks", "--help"])
    assert r.exit_code == 0 and "--model-dir" in r.output and "piqa_local" in r.output
    r = CliRunner().invoke(app, ["tasks", "--model", "m", "--tokenizer", "/t"])
    assert r.exit_code != 0 and "exactly one of" in r.output
    r = CliRunner().invoke(app, ["tasks", "--model-dir", str(tmp_path), "--set", "x"])
    assert r.exit_code != 0 and "--sets-dir" in r.output


def test_local_task_index_falls_back_to_the_full_index(tmp_path, monkeypatch):
    """All tasks local: lm_eval is run indexing only --include_path; if that run fails
    (a local group of bundled tasks, say) it is repeated as plain ``python -m lm_eval``."""
    cfg = lt.LmTasksConfig(server="http://x", model="m", tokenizer="/t", tasks=["mine"], out=tmp_path)
    cond = cfg.conditions()[0]
    inc = tmp_path / "inc"
    plain = lt.lm_eval_command(cfg, cond, inc, lt.condition_dir(cfg, cond))
    local = lt.local_index_command(plain)
    assert plain[1:5] == ["-m", "eval.lm_eval_tasks.negablate_lm", "--model", "negablate"]
    assert local[:3] == plain[:3] and local[3] == "--negablate-local-task-index"
    assert local[4:] == plain[3:]  # the same lm_eval arguments
    calls = []

    class Done:
        def __init__(self, rc):
            self.returncode = rc

    def fake_run(cmd, **kw):
        calls.append(cmd)
        if "--negablate-local-task-index" in cmd:
            return Done(1)
        out = lt.condition_dir(cfg, cond) / "m"
        out.mkdir(parents=True, exist_ok=True)
        (out / "results_2026-01-01T00-00-00.json").write_text(json.dumps(RESULTS_BASE))
        return Done(0)

    monkeypatch.setattr(lt.subprocess, "run", fake_run)
    res = lt.run_condition(cfg, cond, inc, offline=True, local_index=True)
    assert calls == [local, plain] and res.name.startswith("results_")
    assert "again with lm_eval's full index" in (tmp_path / "logs" / "baseline.log").read_text()
    assert json.loads((lt.condition_dir(cfg, cond) / "request.json").read_text())["task_index"] == \
        "include_path only"
    calls.clear()
    lt.run_condition(cfg, cond, inc, offline=True, local_index=False)
    assert calls == [plain]


def test_answers_are_cached_per_set_content_and_dtype(tmp_path, monkeypatch):
    """lm_eval gets --use_cache under the condition's folder, in a file named by the set's
    content hash and the server's dtype (lm_eval keys answers by the request alone): the
    same content and dtype reuse the file, other content or another dtype get another one."""
    assert lt.request_cache_key({"id": "m@a", "negablate_content_hash": "abc", "negablate_dtype": "float32"}) \
        == "abc-float32"
    assert lt.request_cache_key({"id": "m@none", "negablate_dtype": "bfloat16"}) == "none-bfloat16"
    assert lt.request_cache_key({"id": "m"}) == "none-unknown-dtype"  # a plain vLLM server
    cfg = lt.LmTasksConfig(server="http://x", model="m", tokenizer="/t", sets=["a"], tasks=["mine"], out=tmp_path)
    cond = cfg.conditions()[1]
    calls = []

    class Done:
        returncode = 0

    def fake_run(cmd, **kw):
        calls.append(cmd)
        out = lt.condition_dir(cfg, cond) / "m"
        out.mkdir(parents=True, exist_ok=True)
        (out / "results_2026-01-01T00-00-00.json").write_text(json.dumps(RESULTS_BASE))
        return Done()

    monkeypatch.setattr(lt.subprocess, "run", fake_run)
    lt.run_condition(cfg, cond, None, offline=True, cache_key="abc-float32")
    cache = lt.condition_dir(cfg, cond) / "request-cache" / "abc-float32"
    assert calls[-1][calls[-1].index("--use_cache") + 1] == str(cache) and cache.parent.is_dir()
    assert lt.request_cache_path(cfg, cond, "abc-float32") == cache
    assert lt.request_cache_path(cfg, cond, "def-float32") != cache
    lt.run_condition(cfg, cond, None, offline=True)
    assert "--use_cache" not in calls[-1]


def test_the_server_listing_gives_each_condition_its_cache_key(monkeypatch):
    import server.http as http

    cards = [{"id": "m", "negablate_dtype": "float32", "negablate_default": "a"}, {"id": "m@none"},
             {"id": "m@a", "negablate_content_hash": "h1"}]  # the dtype is on the base card only
    monkeypatch.setattr(http, "list_models", lambda *a, **k: cards)
    cfg = lt.LmTasksConfig(server="http://x", model="m", tokenizer="/t", sets=["a"], tasks=["mine"])
    checked = lt.check_server_models(cfg, cfg.conditions())
    assert checked.cache_keys == {"baseline": "none-float32", "a": "h1-float32"} and checked.negablate
    cards[0] = {"id": "m"}  # plain vLLM: no negablate fields, no loglikelihood route
    assert not lt.check_server_models(cfg, cfg.conditions()).negablate
    with pytest.raises(RuntimeError, match="does not serve m@b"):
        lt.check_server_models(cfg, lt.conditions_for("m", ["b"]))


def _lambada_results(lls: np.ndarray) -> dict:
    ppl = math.exp(-lls.mean())
    return {"results": {"lam": {"perplexity,none": ppl, "perplexity_stderr,none": 5.0, "acc,none": 0.3,
                                "acc_stderr,none": 0.02}},
            "configs": {"lam": {"metric_list": [{"metric": "perplexity", "aggregation": "perplexity"},
                                                {"metric": "acc", "aggregation": "mean"}]}},
            "n-samples": {"lam": {"effective": lls.size}}}


def test_a_perplexity_delta_gets_the_delta_method_se_not_the_log_likelihoods():
    """LAMBADA's perplexity is exp(-mean ll_i) over per-item log-likelihoods (what its
    samples hold): the paired SE of the perplexity difference must be in perplexity units
    (delta method), close to a bootstrap over items of exp(-mean ll_c) - exp(-mean ll_b);
    the paired SE of the raw log-likelihoods (nats) is a different, far smaller number."""
    rng = np.random.default_rng(0)
    n = 300
    ll_b = rng.normal(-4.0, 1.5, n)
    ll_c = ll_b - 0.3 + rng.normal(0, 0.5, n)
    rows = lt.parse_results(_lambada_results(ll_b), "baseline") + lt.parse_results(_lambada_results(ll_c), "ws", "ws")
    assert {r.aggregation for r in rows} == {"perplexity", "mean"}
    samples = {c: {"lam": {("perplexity", "none"): dict(enumerate(v.tolist())),
                           ("acc", "none"): dict(enumerate((v > -4).astype(float).tolist()))}}
               for c, v in (("baseline", ll_b), ("ws", ll_c))}
    by = {(r.metric, r.condition): r for r in lt.add_deltas(rows, samples)}
    ppl = by[("perplexity", "ws")]
    assert ppl.delta == pytest.approx(math.exp(-ll_c.mean()) - math.exp(-ll_b.mean()))
    boot = np.random.default_rng(1)
    reps = []
    for _ in range(4000):
        i = boot.integers(0, n, n)
        reps.append(math.exp(-ll_c[i].mean()) - math.exp(-ll_b[i].mean()))
    assert ppl.delta_stderr_kind == "paired" and ppl.delta_stderr == pytest.approx(np.std(reps), rel=0.1)
    assert ppl.delta_stderr > 10 * np.std(ll_c - ll_b, ddof=1) / math.sqrt(n)  # not the nats' SE
    acc = by[("acc", "ws")]  # a mean: the plain paired SE of the items
    d = (ll_c > -4).astype(float) - (ll_b > -4).astype(float)
    assert acc.delta_stderr == pytest.approx(np.std(d, ddof=1) / math.sqrt(n))
