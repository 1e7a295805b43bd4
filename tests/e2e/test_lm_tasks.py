"""``negablate analyze tasks`` end to end: lm_eval (local-completions) against a live
``negablate serve`` with a tiny Llama, baseline + one random neuron set.

Checked against an independent computation: transformers (``HFAblationOracle``, the
same ablation applied by forward hooks, no vLLM) scores every (context, choice) pair;
lm_eval's per-choice log-likelihoods match it, and so do its ``acc``/``acc_norm`` for
both conditions, on a handmade 6-item task (its own YAML, via --include-path) and on
the generated offline PIQA task (first 6 questions). Then the tidy table, deltas, files,
Markdown section, and a rerun that starts nothing.

One server for the module; two lm_eval runs (each indexes lm_eval's ~15k task YAMLs,
20-70 s on 2 cores), so the module takes a few minutes.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

TOL = 2e-3  # float32 sums of up to ~100 logprobs, vLLM vs transformers
LIMIT = 6
SET = "rand"
ITEMS = [  # choices of similar length, so the decision is not just "the shortest choice"
    {"q": "What do cats like to drink?", "choices": ["milk", "salt", "rain", "sand"], "gold": 0},
    {"q": "Where is the river in winter?", "choices": ["ice", "sun", "dog", "car"], "gold": 0},
    {"q": "Who wrote the books?", "choices": ["the critics", "the authors", "the doctors"], "gold": 1},
    {"q": "When will he come back?", "choices": ["today", "never", "later"], "gold": 2},
    {"q": "What does a language model assign?", "choices": ["a number", "a colour", "a window"], "gold": 0},
    {"q": "How were the students who passed the exam?", "choices": ["sad", "happy", "tired", "lucky"], "gold": 1},
]
TINY_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Q: {{{{q}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _app():
    import typer

    from eval.analysis.lm_tasks import register

    app = typer.Typer()
    register(app)

    @app.callback()
    def _cb() -> None:
        """analyze"""

    return app


@pytest.fixture(scope="module")
def piqa_dir() -> Path:
    from eval.data import default_data_dir

    d = default_data_dir() / "piqa"
    if not (d / "valid.jsonl").exists():
        pytest.skip(f"PIQA data absent ({d})")
    return d


@pytest.fixture(scope="module")
def served(tmp_path_factory, piqa_dir):
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval is not installed in this environment")
    from server.launcher import ServerProcess
    from vllm_negablate.testing.engines import TINY_SERVER
    from vllm_negablate.testing.sets import random_set
    from vllm_negablate.testing.tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("lm-tasks")
    model_dir = build_tiny_model("llama", root / "llama")
    ns = random_set(model_dir, SET, "negative", fraction=0.25, seed=0)
    ns.save(root / "sets" / f"{SET}.json")
    server = ServerProcess(model_dir, "--neuron-sets", str(root / "sets"), "--admin-key", "k",
                           log_path=root / "server.log", **TINY_SERVER).start()
    yield server, model_dir, ns, root
    server.stop()


@pytest.fixture(scope="module")
def run(served):
    """The CLI once: tiny_mc (own YAML) + piqa_local (generated), baseline + SET."""
    from typer.testing import CliRunner

    server, model_dir, _, root = served
    task_dir = root / "tiny_task"
    task_dir.mkdir()
    items = task_dir / "items.jsonl"
    items.write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    (task_dir / "tiny_mc.yaml").write_text(TINY_YAML.format(path=json.dumps(str(items))))
    out = root / "out"
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_CACHE", str(root / "hf_datasets"))
    try:
        r = CliRunner().invoke(_app(), [
            "tasks", "--server", server.url, "--model", "tiny", "--tokenizer", str(model_dir), "--set", SET,
            "--task", "tiny_mc,piqa_local", "--include-path", str(task_dir), "--limit", str(LIMIT),
            "--max-length", "512", "--out", str(out)])
    finally:
        mp.undo()
    assert r.exit_code == 0, f"{r.output}\n{r.exception!r}"
    from eval.analysis.lm_tasks import load_result

    return load_result(out), out, r.output


@pytest.fixture(scope="module")
def oracle_scores(served, piqa_dir):
    """(task, condition) -> per doc: (gold, choices, [summed logprob per choice]),
    from transformers with the set applied by hooks; lm_eval's prompt format written out
    by hand: context, then " " + choice, tokens(context + continuation) split after
    tokens(context)."""
    from transformers import AutoTokenizer

    from vllm_negablate.oracle import HFAblationOracle

    _, model_dir, ns, _ = served
    tok = AutoTokenizer.from_pretrained(model_dir)
    oracle = HFAblationOracle(model_dir)
    labels = (piqa_dir / "valid-labels.lst").read_text().split()[:LIMIT]
    piqa = [json.loads(x) for x in (piqa_dir / "valid.jsonl").read_text().splitlines()[:LIMIT]]
    docs = {
        "tiny_mc": [(f"Q: {d['q']}\nA:", d["choices"], d["gold"]) for d in ITEMS],
        "piqa_local": [(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(lab))
                       for d, lab in zip(piqa, labels)],
    }
    out = {}
    for cond, neuron_set in (("baseline", None), (SET, ns)):
        with oracle.ablated(neuron_set):
            for task, ds in docs.items():
                rows = []
                for ctx, choices, gold in ds:
                    ctx_ids = tok(ctx, add_special_tokens=True)["input_ids"]
                    lls = []
                    for c in choices:
                        ids = tok(ctx + " " + c, add_special_tokens=True)["input_ids"]
                        assert ids[:len(ctx_ids)] == ctx_ids
                        lls.append(math.fsum(oracle.prompt_logprobs(ids)[len(ctx_ids):]))
                    rows.append((gold, choices, lls))
                out[(task, cond)] = rows
    return out


def _decisions(rows):
    acc = [float(int(np.argmax(lls)) == gold) for gold, _, lls in rows]
    norm = [float(int(np.argmax(np.array(lls) / np.array([len(c) for c in ch]))) == gold) for gold, ch, lls in rows]
    return {"acc": acc, "acc_norm": norm}


def _results_file(result, out: Path, cond: str) -> Path:
    path = Path(result.results_files[cond])
    assert not path.is_absolute()  # relative to the table's folder
    return out / path


def _samples(result, cond: str, task: str, out: Path) -> list[dict]:
    res_file = _results_file(result, out, cond)
    date = res_file.name[len("results_"):-len(".json")]
    f = res_file.parent / f"samples_{task}_{date}.jsonl"
    return sorted((json.loads(x) for x in f.read_text().splitlines()), key=lambda s: s["doc_id"])


def test_lm_eval_acc_equals_oracle_decisions(run, oracle_scores):
    result, out, _ = run
    value = {(r.task, r.metric, r.condition): r for r in result.rows}
    for (task, cond), rows in oracle_scores.items():
        samples = _samples(result, cond, task, out)
        assert len(samples) == LIMIT
        for s, (gold, choices, lls) in zip(samples, rows):
            lm = [float(x[0]) for x in s["filtered_resps"]]
            assert lm == pytest.approx(lls, abs=TOL), (task, cond, s["doc_id"])
            assert int(s["target"]) == gold
            top = sorted(lls, reverse=True)
            assert top[0] - top[1] > 2 * TOL, f"near-tie in {task} doc {s['doc_id']}: make the items differ more"
        for metric, dec in _decisions(rows).items():
            assert value[(task, metric, cond)].value == pytest.approx(sum(dec) / LIMIT, abs=1e-12), (task, metric, cond)
            assert [s[metric] for s in samples] == dec
            assert value[(task, metric, cond)].n == LIMIT
    # the set really ablates something: log-likelihoods move far beyond float noise
    base, abl = oracle_scores[("tiny_mc", "baseline")], oracle_scores[("tiny_mc", SET)]
    assert max(abs(a - b) for (_, _, la), (_, _, lb) in zip(base, abl) for a, b in zip(la, lb)) > 250 * TOL


def test_piqa_prompts_are_lm_eval_piqa(run, piqa_dir):
    result, out, _ = run
    labels = (piqa_dir / "valid-labels.lst").read_text().split()[:LIMIT]
    raw = [json.loads(x) for x in (piqa_dir / "valid.jsonl").read_text().splitlines()[:LIMIT]]
    for s, d, lab in zip(_samples(result, "baseline", "piqa_local", out), raw, labels):
        args = s["arguments"]
        assert args["gen_args_0"] == {"arg_0": f"Question: {d['goal']}\nAnswer:", "arg_1": " " + d["sol1"]}
        assert args["gen_args_1"]["arg_1"] == " " + d["sol2"] and s["doc"]["label"] == int(lab)


def test_table_deltas_files_and_markdown(run, oracle_scores):
    from eval.analysis.lm_tasks import markdown_section

    result, out, _ = run
    keys = {(r.task, r.metric, r.condition) for r in result.rows}
    assert keys == {(t, m, c) for t in ("tiny_mc", "piqa_local") for m in ("acc", "acc_norm")
                    for c in ("baseline", SET)}
    assert [c.model for c in result.conditions] == ["tiny@none", f"tiny@{SET}"]
    by = {(r.task, r.metric, r.condition): r for r in result.rows}
    for t in ("tiny_mc", "piqa_local"):
        for m in ("acc", "acc_norm"):
            b, a = by[(t, m, "baseline")], by[(t, m, SET)]
            assert b.delta is None and a.delta == a.value - b.value
            # paired SE from the per-item decisions (independently computed)
            d = np.array(_decisions(oracle_scores[(t, SET)])[m]) - np.array(_decisions(oracle_scores[(t, "baseline")])[m])
            assert a.delta == pytest.approx(d.mean(), abs=1e-12)
            assert a.delta_stderr_kind == "paired" and a.n_paired == LIMIT
            assert a.delta_stderr == pytest.approx(d.std(ddof=1) / math.sqrt(LIMIT), abs=1e-12)
    assert any(r.delta != 0 for r in result.rows if r.delta is not None)  # the set changes some decision
    with (out / "lm_tasks.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and {(x["task"], x["metric"], x["condition"]) for x in rows} == keys
    for x in rows:
        assert float(x["value"]) == by[(x["task"], x["metric"], x["condition"])].value
    assert (out / "lm_tasks.png").read_bytes()[:4] == b"\x89PNG"
    md = markdown_section(json.loads((out / "lm_tasks.json").read_text()))
    r = by[("tiny_mc", "acc", SET)]
    line = next(x for x in md.splitlines() if x.startswith("| tiny_mc | acc |"))
    assert f"{r.value * 100:.1f} ({r.delta * 100:+.1f} ± {r.delta_stderr * 100:.1f})" in line
    assert "| task | metric | n | baseline | rand |" in md


def test_rerun_starts_nothing(run, served, monkeypatch):
    """Finished conditions are skipped: with --model-dir no engine starts, no lm_eval runs."""
    from typer.testing import CliRunner

    import server.launcher as srv
    from eval.analysis import lm_tasks as lt

    result, out, _ = run
    _, model_dir, _, root = served

    def boom(*a, **k):
        raise AssertionError("must not start anything")

    monkeypatch.setattr(srv, "ServerProcess", boom)
    monkeypatch.setattr(lt.subprocess, "run", boom)
    r = CliRunner().invoke(_app(), [
        "tasks", "--model-dir", str(model_dir), "--sets-dir", str(root / "sets"), "--model", "tiny",
        "--task", "tiny_mc,piqa_local", "--include-path", str(root / "tiny_task"), "--limit", str(LIMIT),
        "--max-length", "512", "--out", str(out)])
    assert r.exit_code == 0, f"{r.output}\n{r.exception!r}"
    again = lt.load_result(out)
    assert again.rows == result.rows and again.results_files == result.results_files


def test_an_interrupted_condition_resumes_from_its_answered_requests(run, served, oracle_scores, tmp_path):
    """Every answer lm_eval got is in the condition's request cache (named by the set's
    content hash and the server's dtype), equal to the oracle's log-likelihoods; a rerun of
    that condition with its results gone asks the server nothing (it points at a closed
    port here) and reproduces the results."""
    import shutil

    from sqlitedict import SqliteDict

    from eval.analysis import lm_tasks as lt

    result, out, _ = run
    _, _, ns, _ = served
    cfg = lt.LmTasksConfig(server="http://127.0.0.1:9", model="tiny", tokenizer=str(served[1]), sets=[SET],
                           tasks=["tiny_mc", "piqa_local"], limit=LIMIT, max_length=512, out=tmp_path / "out")
    shutil.copytree(out, cfg.out)
    cond = next(c for c in cfg.conditions() if c.label == SET)
    key = f"{ns.content_hash()}-float32"
    db = lt.request_cache_path(cfg, cond, key).with_name(f"{key}_rank0.db")
    assert sorted(p.name for p in db.parent.iterdir()) == [db.name]
    with SqliteDict(str(db)) as cache:
        answers = sorted(float(v[0]) for v in cache.values())
    expected = sorted(ll for task in ("tiny_mc", "piqa_local") for _, _, lls in oracle_scores[(task, SET)]
                      for ll in lls)
    assert len(answers) == len(expected) == sum(len(c) for c in (i["choices"] for i in ITEMS)) + 2 * LIMIT
    np.testing.assert_allclose(answers, expected, atol=TOL)
    for f in lt.condition_dir(cfg, cond).rglob("results_*.json"):
        f.unlink()
    include, _ = lt.prepare_include_path(cfg.model_copy(update={"include_paths": [out.parent / "tiny_task"]}))
    res = lt.run_condition(cfg, cond, include, offline=True, cache_key=key)
    again = json.loads(res.read_text())["results"]
    before = json.loads(_results_file(result, out, SET).read_text())["results"]
    for task in ("tiny_mc", "piqa_local"):
        assert again[task]["acc,none"] == before[task]["acc,none"]
        assert again[task]["acc_norm,none"] == before[task]["acc_norm,none"]


def test_the_local_completions_backend_gives_the_same_answers(run, served, tmp_path):
    """The default backend (``--model negablate``: /v1/negablate/loglikelihood, the
    context's rows not computed) against lm_eval's own ``local-completions`` (echo through
    /v1/completions): the same log-likelihood and is_greedy for every request."""
    from eval.analysis import lm_tasks as lt

    result, out, _ = run
    server, model_dir, _, root = served
    request = json.loads((_results_file(result, out, SET).parent.parent / "request.json").read_text())
    assert request["backend"] == "negablate" and request["command"][2:5] == [lt.LM_EVAL_MODULE, "--model", "negablate"]
    cfg = lt.LmTasksConfig(server=server.url, model="tiny", tokenizer=str(model_dir), sets=[SET],
                           tasks=["tiny_mc"], limit=LIMIT, max_length=512, out=tmp_path / "out",
                           backend="local-completions")
    cond = next(c for c in cfg.conditions() if c.label == SET)
    include, _ = lt.prepare_include_path(cfg.model_copy(update={"include_paths": [root / "tiny_task"]}))
    res = lt.run_condition(cfg, cond, include, offline=True)
    assert json.loads((lt.condition_dir(cfg, cond) / "request.json").read_text())["command"][4] == "local-completions"
    date = res.name[len("results_"):-len(".json")]
    theirs = sorted((json.loads(x) for x in (res.parent / f"samples_tiny_mc_{date}.jsonl").read_text().splitlines()),
                    key=lambda s: s["doc_id"])
    ours = _samples(result, SET, "tiny_mc", out)
    assert len(theirs) == len(ours) == LIMIT
    for a, b in zip(ours, theirs):
        for [(ll_a, greedy_a)], [(ll_b, greedy_b)] in zip(a["resps"], b["resps"], strict=True):  # one answer a choice
            assert float(ll_a) == pytest.approx(float(ll_b), abs=1e-5) and greedy_a == greedy_b
