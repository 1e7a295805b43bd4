"""The lm_eval model ``negablate`` without a server: what it sends and how it reads answers.

lm_eval truncates context + continuation from the left to ``max_length`` and tracks
where the continuation starts; the class must split each request exactly there, send
the items in order, read answers back by ``index`` and keep generation on
``/v1/completions``. (Against a live server: ``tests/e2e/test_lm_tasks.py``.)
"""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")


@pytest.fixture
def lm(tiny_models):
    from lm_eval.api.registry import get_model

    import eval.lm_eval_tasks.negablate_lm  # noqa: F401  (registers the model)

    return get_model("negablate")(model="m@s", base_url="http://h:1/v1/completions", tokenizer_backend="huggingface",
                                  tokenizer=str(tiny_models["llama"]), max_length=9, batch_size=4)


def test_requests_split_at_lm_evals_context_length_after_truncation(lm):
    # max_length 9 -> lm_eval keeps the last 8 tokens of context + continuation
    chunk = [(("a", "b"), [1, 2, 3], [4, 5]), (("c", "d"), list(range(10, 20)), [7, 8, 9])]
    items, ctxlens, keys = lm.batch_loglikelihood_requests([chunk])
    assert items == [{"context": [1, 2, 3], "continuation": [4, 5]},
                     {"context": [15, 16, 17, 18, 19], "continuation": [7, 8, 9]}]
    assert ctxlens == [3, 5] and keys == [("a", "b"), ("c", "d")]
    assert lm._create_payload(lm.create_message(items), generate=False) == {"model": "m@s", "items": items}


def test_answers_are_read_by_index_across_batches(lm):
    outputs = [{"data": [{"index": 1, "logprob": -2.5, "is_greedy": False},
                         {"index": 0, "logprob": -1.0, "is_greedy": True}]},
               {"data": [{"index": 0, "logprob": -3.0, "is_greedy": False}]}]
    assert lm.parse_logprobs(outputs) == [(-1.0, True), (-2.5, False), (-3.0, False)]


def test_loglikelihood_and_generation_go_to_their_routes(lm, monkeypatch):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    seen = []
    monkeypatch.setattr(LocalCompletionsAPI, "_loglikelihood_tokens", lambda self, r, **k: seen.append(self.base_url))
    monkeypatch.setattr(LocalCompletionsAPI, "generate_until", lambda self, r, disable_tqdm=False: seen.append(self.base_url))
    lm._loglikelihood_tokens([])
    lm.generate_until([])
    assert seen == ["http://h:1/v1/negablate/loglikelihood", "http://h:1/v1/completions"]
    payload = lm._create_payload(["hi"], generate=True, gen_kwargs={"until": ["\n"]})
    assert payload["prompt"] == ["hi"] and "items" not in payload  # generation: lm_eval's own body


def test_string_requests_are_refused_at_construction(tiny_models):
    from lm_eval.api.registry import get_model

    import eval.lm_eval_tasks.negablate_lm  # noqa: F401  (registers the model)

    with pytest.raises(ValueError, match="token ids"):
        get_model("negablate")(model="m", base_url="http://h:1/v1/completions", tokenizer_backend="huggingface",
                               tokenizer=str(tiny_models["llama"]), tokenized_requests=False)
