"""`negablate analyze oracle-check`: logged lm_eval answers re-scored by the transformers oracle.

The fake run's "served" answers come from the oracle's ``prompt_logprobs`` (a different
code path from the check's own scorer) on lm_eval's own encoding, so a correct folder
must agree to float rounding, a tampered answer must be caught, and answers logged under
one neuron set must disagree when checked as another (the set is really applied).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")

from eval.analysis.oracle_check import encode_request, encoder_for, oracle_check  # noqa: E402
from vllm_negablate.oracle import HFAblationOracle  # noqa: E402
from vllm_negablate.testing.sets import random_set  # noqa: E402

DOCS = [  # (context, choices): two-choice documents and one-request (greedy) documents
    ("The cat sat on the", [" mat", " moon"]),
    ("Colorless green ideas sleep", [" furiously", " quietly"]),
    ("In the beginning was the", [" word"]),
    ("She went to the store and bought some", [" milk"]),
]


def _write_run(root, label, set_name, model_dir, oracle, neuron_set, tamper=0.0):
    run = root / "runs" / label / "abc"
    (run / f"model@{label}").mkdir(parents=True, exist_ok=True)
    model_args = f"model=model@{label},base_url=http://127.0.0.1:1/v1/completions,tokenizer_backend=huggingface," \
                 f"tokenizer={model_dir},add_bos_token=True,max_length=2048"
    (run / "request.json").write_text(json.dumps({
        "condition": {"label": label, "set": set_name, "model": f"model@{label}"},
        "command": ["python", "-m", "eval.lm_eval_tasks.negablate_lm", "--model_args", model_args]}))
    encoder = encoder_for(model_args)
    lines = []
    for i, (context, choices) in enumerate(DOCS):
        resps, arguments = [], {}
        for j, choice in enumerate(choices):
            ctx_ids, cont_ids = encode_request(encoder, context, choice)
            logprobs = oracle.prompt_logprobs(ctx_ids + cont_ids, neuron_set)[len(ctx_ids):]
            loglik = sum(logprobs) + (tamper if i == 0 and j == 0 else 0.0)
            resps.append([[str(loglik), "False"]])
            arguments[f"gen_args_{j}"] = {"arg_0": context, "arg_1": choice}
        lines.append(json.dumps({"doc_id": i, "arguments": arguments, "resps": resps}))
    (run / f"model@{label}" / "samples_toy_local_2026-01-01T00-00-00.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def toy(tiny_models, tmp_path_factory):
    model_dir = tiny_models["llama"]
    root = tmp_path_factory.mktemp("lm_tasks")
    sets_dir = root / "sets"
    sets_dir.mkdir()
    neuron_set = random_set(model_dir, "neg", "negative", fraction=0.5, seed=3)
    (sets_dir / "neg.json").write_text(neuron_set.model_dump_json())
    oracle = HFAblationOracle(model_dir)
    return root, sets_dir, model_dir, oracle, neuron_set


def test_a_faithful_run_agrees_and_a_tampered_answer_is_caught(toy):
    root, sets_dir, model_dir, oracle, neuron_set = toy
    _write_run(root, "baseline", None, model_dir, oracle, None)
    _write_run(root, "neg", "neg", model_dir, oracle, neuron_set)
    check = oracle_check(root, sets_dir=sets_dir, documents=10, oracle_factory=lambda _: oracle)
    assert check.passed
    assert [(t.condition, t.documents, t.requests, t.decisions_agree) for t in check.tasks] == [
        ("baseline", 4, 6, 4), ("neg", 4, 6, 4)]
    assert max(t.max_abs_diff for t in check.tasks) < 1e-4

    _write_run(root, "neg", "neg", model_dir, oracle, neuron_set, tamper=0.05)
    tampered = oracle_check(root, sets_dir=sets_dir, documents=10, conditions=["neg"],
                            oracle_factory=lambda _: oracle)
    assert not tampered.passed
    assert tampered.tasks[0].max_abs_diff == pytest.approx(0.05, abs=1e-4)


def test_answers_logged_without_the_set_disagree_when_checked_under_it(toy):
    """The baseline's answers, logged as if the set had been applied: the check must see it."""
    root, sets_dir, model_dir, oracle, _ = toy
    _write_run(root, "mislabelled", "neg", model_dir, oracle, None)
    check = oracle_check(root, sets_dir=sets_dir, documents=10, conditions=["mislabelled"],
                         oracle_factory=lambda _: oracle)
    assert not check.passed
    assert check.tasks[0].max_abs_diff > 1e-2
    with pytest.raises(ValueError, match="not in"):
        oracle_check(root, sets_dir=root / "nowhere", documents=1, conditions=["mislabelled"],
                     oracle_factory=lambda _: oracle)


def test_a_saved_check_becomes_a_report_section(toy, tmp_path):
    from eval.analysis.oracle_check import OracleCheck, TaskCheck, load_check, markdown_section

    task = TaskCheck(condition="neg", set="neg", task="toy_local", documents=4, requests=6,
                     max_abs_diff=3e-5, max_abs_diff_per_token=2e-5, decisions_agree=4)
    check = OracleCheck(folder="f", model_dir="m", tolerance=1e-3, tasks=[task])
    (tmp_path / "oc.json").write_text(check.model_dump_json())
    text = markdown_section(load_check(tmp_path / "oc.json"), "lm_tasks/oc.json")
    assert "they agree (tolerance 0.001" in text
    assert "| neg | toy_local | 4 | 6 | 3.0e-05 | 2.0e-05 | 4/4 |" in text.splitlines()
    bad = check.model_copy(update={"tasks": [task.model_copy(update={"decisions_agree": 3})]})
    assert not bad.passed and "they **disagree**" in markdown_section(bad, "x")
