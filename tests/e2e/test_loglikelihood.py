"""``POST /v1/negablate/loglikelihood`` on a live `negablate serve` (tiny Llama, fp32).

Checked against two independent computations: the same server's ``/v1/completions``
echo (every prompt position computed, the continuation's summed) and the transformers
oracle with the set applied by hooks; ``is_greedy`` against the oracle's argmax. Then
bad input: every refusal changes nothing (the next request gets the same numbers).
"""

from __future__ import annotations

import math
import random

import httpx
import pytest
import torch

from server.client import NegablateAPIError, NegablateClient
from server.launcher import ServerProcess
from server.schemas import LOGLIKELIHOOD_PATH
from vllm_negablate.oracle import HFAblationOracle
from vllm_negablate.runtime import PROMPT_LOGPROBS_FROM_KEY
from vllm_negablate.testing.engines import BOS, TINY_SERVER, TOL
from vllm_negablate.testing.sets import random_set

pytestmark = pytest.mark.slow
SET = "rand"
API = "api-secret"  # vLLM's --api-key guards the route like /v1/completions
AUTH = {"Authorization": f"Bearer {API}"}


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("loglikelihood")
    model_dir = tiny_models["llama"]
    ns = random_set(model_dir, SET, "negative", fraction=0.25, seed=3)
    ns.save(root / "sets" / f"{SET}.json")
    server = ServerProcess(model_dir, "--neuron-sets", str(root / "sets"), "--admin-key", "k", "--api-key", API,
                           log_path=root / "server.log", **TINY_SERVER).start()
    yield server, model_dir, ns
    server.stop()


@pytest.fixture(scope="module")
def oracle(served):
    return HFAblationOracle(served[1])


def _items(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """Contexts of 1-40 tokens (the first BOS), continuations of 1-6: lm_eval's shapes."""
    rng = random.Random(seed)
    return [([BOS] + [rng.randrange(4, 500) for _ in range(rng.randrange(0, 40))],
             [rng.randrange(4, 500) for _ in range(rng.randrange(1, 7))]) for _ in range(n)]


def _greedy(oracle, context: list[int], n: int) -> list[int]:
    ids = list(context)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(oracle.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(context):]


@pytest.mark.parametrize("condition", [None, SET])
def test_equals_the_completions_echo_and_the_oracle(served, oracle, condition):
    server, _, ns = served
    items = _items(24, seed=0)
    with NegablateClient(server.url, api_key=API) as client:
        got = client.loglikelihood(items, condition)
        echoed = client.score([c + x for c, x in items], condition)
    expected = oracle.batch_prompt_logprobs([c + x for c, x in items], ns if condition else None)
    assert [r.index for r in got] == list(range(len(items)))
    for r, (context, continuation), echo, ref in zip(got, items, echoed, expected, strict=True):
        n = len(context)
        assert len(r.token_logprobs) == len(continuation)
        assert r.token_logprobs == pytest.approx(echo.logprobs[n:], abs=1e-5)  # the same engine rows
        assert r.token_logprobs == pytest.approx(ref[n:], abs=TOL)
        assert r.logprob == pytest.approx(math.fsum(ref[n:]), abs=TOL * len(continuation))
        assert r.logprob == math.fsum(r.token_logprobs)
    # the set changes the numbers far beyond the tolerance
    if condition:
        with NegablateClient(server.url, api_key=API) as client:
            base = client.loglikelihood(items, None)
        assert max(abs(a.logprob - b.logprob) for a, b in zip(got, base)) > 100 * TOL


def test_is_greedy_is_the_oracles_argmax(served, oracle):
    server, _, ns = served
    contexts = [c for c, _ in _items(6, seed=1)]
    items = []
    with oracle.ablated(ns):
        for context in contexts:
            greedy = _greedy(oracle, context, 3)
            other = greedy[:2] + [greedy[2] + 1]  # the last token is not the argmax
            items += [(context, greedy), (context, other), (context, greedy[:1])]
    with NegablateClient(server.url, api_key=API) as client:
        got = client.loglikelihood(items, SET)
    assert [r.is_greedy for r in got] == [True, False, True] * len(contexts)


def test_bad_input_is_refused_and_changes_nothing(served):
    server, _, _ = served
    url = server.url + LOGLIKELIHOOD_PATH
    good = {"model": f"tiny@{SET}", "items": [{"context": [BOS, 7, 8], "continuation": [9, 10]}]}
    assert httpx.post(url, json=good).status_code == 401  # no API key
    first = httpx.post(url, json=good, headers=AUTH).json()["data"][0]["logprob"]
    cases = [
        ({**good, "items": [{"context": [BOS] * 500, "continuation": [9] * 20}]}, 400, "context of 512"),
        ({**good, "items": [{"context": [BOS], "continuation": [10**6]}]}, 400, "outside the vocabulary"),
        ({**good, "items": [{"context": [BOS], "continuation": []}]}, 422, "continuation"),
        ({**good, "items": []}, 422, "items"),
        ({**good, "model": "tiny@nope"}, 404, "nope"),
        ({**good, "model": "other"}, 404, "other"),
        ({**good, "vllm_xargs": {"top_k": "1"}}, 400, "top_k"),
        ({**good, "vllm_xargs": {PROMPT_LOGPROBS_FROM_KEY: 1}}, 400, PROMPT_LOGPROBS_FROM_KEY),
        ({**good, "model": "tiny", "vllm_xargs": {"neuron_set": SET, "neuron_set_hash": "0" * 16}}, 409,
         "content hash"),
    ]
    for body, status, words in cases:
        r = httpx.post(url, json=body, headers=AUTH)
        assert r.status_code == status, (body, r.text)
        assert words in r.json()["error"]["message"], r.text
    # a good item beside a bad one: the whole request is refused
    both = {**good, "items": good["items"] + [{"context": [BOS], "continuation": [10**6]}]}
    assert httpx.post(url, json=both, headers=AUTH).status_code == 400
    # completions refuse the internal key too
    r = httpx.post(server.url + "/v1/completions", json={
        "model": "tiny", "prompt": [[BOS, 7, 8]], "max_tokens": 0, "echo": True, "logprobs": 0,
        "vllm_xargs": {PROMPT_LOGPROBS_FROM_KEY: 2}}, headers=AUTH)
    assert r.status_code == 400
    assert httpx.post(url, json=good, headers=AUTH).json()["data"][0]["logprob"] == first
    with NegablateClient(server.url, api_key=API) as client, pytest.raises(NegablateAPIError) as err:
        client.loglikelihood([([BOS], [10**6])], SET)
    assert err.value.status == 400


@pytest.mark.parametrize("condition", [None, SET])
def test_the_harness_scores_pairs_through_the_route_as_the_echo_and_the_oracle(served, oracle, condition,
                                                                             tmp_path, monkeypatch):
    """The eval scorer takes the route the base card lists: minimal pairs sharing a prefix
    (the second sentence's shared rows copied from the first) give the echo's rows and the
    oracle's, every position."""
    from eval.scoring import CompletionsScorer

    monkeypatch.setenv("OPENAI_API_KEY", API)
    server, model_dir, ns = served
    rng = random.Random(7)
    seqs = []
    for _ in range(12):  # pairs: a shared prefix of 0-20 tokens after BOS, then different tails
        prefix = [BOS] + [rng.randrange(4, 500) for _ in range(rng.randrange(0, 20))]
        seqs += [prefix + [rng.randrange(4, 500) for _ in range(rng.randrange(1, 8))] for _ in range(2)]
    seqs += [seqs[0][:3], list(seqs[0])]  # a prefix of the sequence before it is copied whole
    model = f"tiny@{condition or 'none'}"
    with CompletionsScorer(server.url, model, tokenizer=model_dir, cache=False, progress=False) as sc:
        routed = sc.score_ids(seqs)
        assert sc.describe()["endpoint"] == LOGLIKELIHOOD_PATH
    with CompletionsScorer(server.url, model, tokenizer=model_dir, cache=False, progress=False,
                           endpoint="completions") as sc:
        echoed = sc.score_ids(seqs)
    expected = oracle.batch_prompt_logprobs(seqs, ns if condition else None)
    for r, e, ref in zip(routed, echoed, expected, strict=True):
        assert r[0] is None and len(r) == len(ref)
        assert r[1:] == pytest.approx(e[1:], abs=1e-5)
        assert r[1:] == pytest.approx(ref[1:], abs=TOL)
