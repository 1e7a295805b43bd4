"""Fast tests of the HTTP eval harness (eval.scoring, eval.tasks, eval.compare, eval.cli,
eval.lm_eval_tasks) against a FAKE OpenAI completions server with known logprobs.

The fake server is an ASGI app. Most tests reach it in-process through
``httpx.ASGITransport``; the CLI tests serve it with uvicorn on a free 127.0.0.1 port.
Its log-probabilities follow a rule on token ids, so every expected number is known.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from eval.cli import app
from eval.compare import compare_dirs
from eval.data import MinimalPair
from eval.score_cache import ScoreCache
from eval.scoring import CompletionsScorer, split_model
from eval.stats import compare_runs
from eval.tasks import evaluate_pairs, evaluate_perplexity, make_windows, write_pair_run
from eval.errors import ScoringError, ServerError
from eval.tokenizers import LocalTokenizer, ServerTokenizer, TokenizerError
from server.http import normalize_base_url

REPO = Path(__file__).resolve().parents[2]
BOS, EOS = 2, 1
WORDS = ("the cat cats dog dogs sleep sleeps runs run big small a an who that is are was were "
         "near house houses and or not ever").split()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never touch the user's default cache (~/.cache/negablate/eval-scores.sqlite)."""
    monkeypatch.setenv("NEGABLATE_EVAL_CACHE", str(tmp_path / "default-cache.sqlite"))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A word-level tokenizer (one token per word), no torch needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("tok")
    vocab = {"<pad>": 0, "<eos>": EOS, "<bos>": BOS, "<unk>": 3}
    for w in WORDS:
        vocab[w] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": {"content": "<eos>", "special": True},
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return d


def content_rule(prev: int, tok: int, pos: int, neuron_set: str | None) -> float:
    """Depends on the set's name *and content* ("SET#HASH" from a server that lists hashes)."""
    salt = zlib.crc32((neuron_set or "").encode()) % 89
    return -((tok * 31 + prev * 7 + pos + salt) % 97) / 10.0 - 0.25


def per_token_minus_one(prev: int, tok: int, pos: int, neuron_set: str | None) -> float:
    return -1.0


def id_rule(prev: int, tok: int, pos: int, neuron_set: str | None) -> float:
    """Depends on the token, its predecessor and position, and the set: detects any mix-up."""
    base = -((tok * 31 + prev * 7 + pos) % 97) / 10.0 - 0.25
    return base - (0.5 if neuron_set else 0.0) * (tok % 3)


class FakeCompletions:
    """A minimal OpenAI ``/v1/completions`` (echo + logprobs) with failure injection."""

    def __init__(self, rule: Callable[[int, int, int, str | None], float] = id_rule, *,
                 models: tuple[str, ...] = ("fake",), sets: tuple[str, ...] = ("wd",),
                 max_model_len: int = 64) -> None:
        self.rule = rule
        self.models = models
        self.sets = sets
        self.max_model_len = max_model_len
        self.calls = 0  # POST /v1/completions received
        self.bodies: list[dict[str, Any]] = []
        self.fail_status: list[int] = []  # statuses to answer, one per call, before working
        self.raise_after: int | None = None  # raise inside the server after this many calls
        self.refuse_max_tokens_0 = False
        self.refuse_logprobs_0 = False
        self.dtype: str | None = None  # negablate serve's negablate_dtype (None: not said)
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0
        self.default: str | None = None  # negablate serve's default set (None: no ablation)
        self.retry_after: str | None = None  # Retry-After sent with fail_status answers
        # negablate serve's content hash of each set, on its BASE@SET card (empty: a server
        # that does not say); the rule then sees "SET#HASH", so other content scores otherwise
        self.hashes: dict[str, str] = {}
        # negablate serve's continuation route, listed on the base card when set
        self.route: str | None = None
        self.route_items: list[dict[str, Any]] = []  # items the route received

    def _logprobs(self, ids: list[int], neuron_set: str | None) -> list[float | None]:
        return [None] + [self.rule(ids[i - 1], ids[i], i, neuron_set) for i in range(1, len(ids))]

    async def __call__(self, scope, receive, send) -> None:
        assert scope["type"] == "http"
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/v1/models":
            return await self._send(send, 200, {"object": "list", "data": [
                {"id": m, "object": "model", "max_model_len": self.max_model_len,
                 "negablate_default": self.default, "negablate_dtype": self.dtype,
                 **({"negablate_loglikelihood": self.route} if self.route else {})} for m in self.models]
                + [{"id": f"{m}@{name}", "object": "model", "neuron_set": name,
                    "negablate_content_hash": h} for m in self.models for name, h in self.hashes.items()]})
        if method == "GET" and path == "/health":
            return await self._send(send, 200, {})
        if method == "POST" and self.route and path == self.route:
            return await self._loglikelihood(send, json.loads(body))
        if not (method == "POST" and path == "/v1/completions"):
            return await self._send(send, 404, {"error": {"message": "not found"}})
        self.calls += 1
        data = json.loads(body)
        self.bodies.append(data)
        if self.raise_after is not None and self.calls > self.raise_after:
            return await self._send(send, 500, {"error": {"message": "injected crash"}})
        if self.fail_status:
            return await self._send(send, self.fail_status.pop(0), {"error": {"message": "busy"}},
                                    [(b"retry-after", self.retry_after.encode())] if self.retry_after else [])
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            return await self._complete(send, data)
        finally:
            self.in_flight -= 1

    async def _complete(self, send, data: dict[str, Any]) -> None:
        model, sep, mset = data["model"].partition("@")
        xset = (data.get("vllm_xargs") or {}).get("neuron_set")
        known = (*self.sets, "none")
        if model not in self.models or (sep and mset not in known) or (xset and xset not in known):
            return await self._send(send, 404, {"error": {
                "message": f"The model `{data['model']}` does not exist.", "type": "NotFoundError",
                "code": 404}})
        if not (data.get("echo") and data.get("logprobs") in (0, 1)):
            return await self._send(send, 400, {"error": {"message": "expected echo + logprobs"}})
        if data["logprobs"] == 0 and self.refuse_logprobs_0:
            return await self._send(send, 400, {"error": {"message": "logprobs must be at least 1"}})
        mt = data.get("max_tokens")
        if mt == 0 and self.refuse_max_tokens_0:
            return await self._send(send, 400, {"error": {"message": "max_tokens must be at least 1, got 0."}})
        prompts = data["prompt"]
        assert isinstance(prompts, list) and all(isinstance(p, list) for p in prompts)
        choices = []
        for i, ids in enumerate(prompts):
            if len(ids) + 1 > self.max_model_len:
                return await self._send(send, 400, {"error": {
                    "message": f"This model's maximum context length is {self.max_model_len} tokens."}})
            chosen = mset or xset or self.default
            expected = (data.get("vllm_xargs") or {}).get("neuron_set_hash")
            if expected is not None and expected != self.hashes.get(chosen):
                return await self._send(send, 409, {"error": {
                    "message": f"neuron set `{chosen}` now has content hash {self.hashes.get(chosen)}, "
                               f"the request expected {expected}: the set was replaced", "code": 409}})
            if chosen in self.hashes:
                chosen = f"{chosen}#{self.hashes[chosen]}"
            lps = self._logprobs(ids, None if chosen == "none" else chosen)
            if mt:
                lps = lps + [-0.123] * mt  # generated tokens
            choices.append({"index": i, "text": "", "finish_reason": "length",
                            "logprobs": {"token_logprobs": lps, "tokens": [str(t) for t in ids],
                                         "top_logprobs": [None] + [{} for _ in lps[1:]]}})
        choices.reverse()  # clients must order by index
        await self._send(send, 200, {"id": "cmpl-fake", "object": "text_completion",
                                     "model": model, "choices": choices})

    async def _loglikelihood(self, send, data: dict[str, Any]) -> None:
        """The continuation route: each item's continuation rows under the chosen set."""
        model, _, mset = data["model"].partition("@")
        chosen = mset or (data.get("vllm_xargs") or {}).get("neuron_set") or self.default
        if chosen in self.hashes:
            chosen = f"{chosen}#{self.hashes[chosen]}"
        results = []
        for i, item in enumerate(data["items"]):
            self.route_items.append(item)
            ids = [*item["context"], *item["continuation"]]
            rows = self._logprobs(ids, None if chosen in (None, "none") else chosen)[len(item["context"]):]
            results.append({"index": i, "logprob": sum(rows), "is_greedy": False, "token_logprobs": rows})
        await self._send(send, 200, {"object": "negablate.loglikelihood", "model": model,
                                     "neuron_set": chosen or "none", "data": results[::-1]})

    @staticmethod
    async def _send(send, status: int, obj: Any, headers: list | None = None) -> None:
        raw = json.dumps(obj).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(raw)).encode()), *(headers or [])]})
        await send({"type": "http.response.body", "body": raw})


def make_scorer(fake: FakeCompletions, tok_dir: Path, model: str = "fake", **kw: Any) -> CompletionsScorer:
    kw.setdefault("cache", False)
    kw.setdefault("progress", False)
    kw.setdefault("backoff", 0.001)
    return CompletionsScorer("http://fake.test", model, tokenizer=tok_dir,
                             transport=httpx.ASGITransport(app=fake), **kw)


def pair(paradigm: str, i: int, good: str, bad: str, phen: str = "agr") -> MinimalPair:
    return MinimalPair(source="blimp", paradigm=paradigm, pair_id=i, good=good, bad=bad,
                       field="syntax", phenomenon=phen)


KNOWN_PAIRS = [
    pair("p1", 0, "the cat sleeps", "the cat big sleeps"),       # good shorter: right
    pair("p1", 1, "a dog runs", "a dog that runs"),              # right
    pair("p1", 2, "the big dog runs near the house", "the dog runs"),  # good longer: wrong
    pair("p2", 0, "cats sleep", "cats sleep"),                   # identical: tie, wrong
    pair("p2", 1, "dogs run", "dogs that run", "other"),          # right
    pair("p2", 2, "who is near", "who is not near", "other"),     # right
]


# --------------------------------------------------------------------------- helpers


def test_split_model_and_base_url():
    assert split_model("m") == ("m", None)
    assert split_model("/models/x@wd1") == ("/models/x", "wd1")
    with pytest.raises(ValueError):
        split_model("m@")
    for u in ("127.0.0.1:8000", "http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1",
              "http://127.0.0.1:8000/v1/completions"):
        assert normalize_base_url(u) == "http://127.0.0.1:8000"


def test_local_tokenizer_start_token(tok_dir, tmp_path):
    t = LocalTokenizer(tok_dir)
    assert (t.bos_token_id, t.eos_token_id, t.start_token_id) == (BOS, EOS, BOS)
    assert t.encode("the cat zebra") == [4, 5, 3]
    assert LocalTokenizer(tok_dir, start_token="<eos>").start_token_id == EOS
    assert LocalTokenizer(tok_dir, start_token="0").start_token_id == 0
    # no BOS in the config: EOS is the start token (lm_eval's rule)
    d = tmp_path / "nobos"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<eos>"}))
    assert LocalTokenizer(d).start_token_id == EOS
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        LocalTokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="not in"):
        LocalTokenizer(tok_dir, start_token="<nope>")


def test_eval_package_does_not_import_torch_or_vllm():
    code = ("import sys, eval.scoring, eval.tasks, eval.compare, eval.cli, eval.lm_eval_tasks.generate; "
            "bad = [m for m in ('torch', 'vllm') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- scoring


def test_server_tokenizer(tok_dir):
    local = LocalTokenizer(tok_dir)
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/tokenizer_info":
            return httpx.Response(200, json={"bos_token": "<bos>", "eos_token": "<eos>"})
        body = json.loads(request.content)
        assert body["add_special_tokens"] is False and body["model"] == "fake"
        toks = local.encode(body["prompt"]) if body["prompt"] != "<bos>" else [BOS]
        return httpx.Response(200, json={"tokens": toks, "count": len(toks)})

    st = ServerTokenizer("http://x/v1", "fake", transport=httpx.MockTransport(handler))
    assert st.start_token_id == BOS and seen == ["/tokenizer_info", "/tokenize"]
    fake = FakeCompletions()
    sc = make_scorer(fake, tok_dir, model="fake@wd")
    sc_srv = CompletionsScorer("http://fake.test", "fake@wd", tokenizer=st, cache=False, progress=False,
                               transport=httpx.ASGITransport(app=fake))
    text = "the dog runs near the house"
    assert sc_srv.encode(text) == sc.encode(text)
    assert sc_srv.score_texts([text]) == sc.score_texts([text])

    def no_info(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": "Not Found"})

    with pytest.raises(TokenizerError, match="--start-token"):
        ServerTokenizer("http://x", "fake", transport=httpx.MockTransport(no_info)).start_token_id
    assert ServerTokenizer("http://x", "fake", start_token_id=7,
                           transport=httpx.MockTransport(no_info)).start_token_id == 7




def test_request_shape_and_logprobs(tok_dir):
    fake = FakeCompletions()
    sc = make_scorer(fake, tok_dir)
    ids = sc.encode("the cat sleeps")
    assert ids == [BOS, 4, 5, 10]
    [lp] = sc.score_ids([ids])
    assert lp == fake._logprobs(ids, None)
    body = fake.bodies[0]
    assert body["prompt"] == [ids]
    assert (body["echo"], body["logprobs"], body["max_tokens"], body["temperature"]) == (True, 0, 0, 0)
    assert body["model"] == "fake" and "vllm_xargs" not in body
    assert sc.echo_mode == "max_tokens_0"


def test_known_logprobs_give_known_accuracy(tok_dir):
    fake = FakeCompletions(per_token_minus_one)
    sc = make_scorer(fake, tok_dir)
    records, summary = evaluate_pairs(sc, KNOWN_PAIRS, "blimp")
    for r, p in zip(records, KNOWN_PAIRS):
        assert r.n_tokens_good == len(p.good.split()) and r.logprob_good == -r.n_tokens_good
        assert r.n_tokens_bad == len(p.bad.split()) and r.logprob_bad == -r.n_tokens_bad
    assert [r.correct for r in records] == [True, True, False, False, True, True]
    assert [r.tie for r in records] == [False, False, False, True, False, False]
    assert summary.overall.n == 6 and summary.overall.n_correct == 4
    assert summary.n_ties == 1 and summary.metric == "sum"
    acc = {(r.level, r.group): r.accuracy for r in summary.accuracy}
    assert acc[("paradigm", "p1")] == pytest.approx(2 / 3)
    assert acc[("paradigm", "p2")] == pytest.approx(2 / 3)
    assert acc[("phenomenon", "agr")] == pytest.approx(2 / 4)
    assert acc[("phenomenon", "other")] == 1.0
    # TSE's reference metric is the mean per token: -1 everywhere, so every pair ties (wrong)
    records, summary = evaluate_pairs(sc, KNOWN_PAIRS, "tse")
    assert summary.metric == "mean" and summary.n_ties == 6 and summary.overall.n_correct == 0
    assert [r.correct_sum for r in records] == [True, True, False, False, True, True]
    assert next(r for r in summary.accuracy_sum if r.level == "overall").n_correct == 4


def test_mean_metric_with_id_rule(tok_dir):
    fake = FakeCompletions(id_rule)
    sc = make_scorer(fake, tok_dir)
    records, summary = evaluate_pairs(sc, KNOWN_PAIRS, "tse")
    tk = LocalTokenizer(tok_dir)
    for r, p in zip(records, KNOWN_PAIRS):
        g = fake._logprobs([BOS, *tk.encode(p.good)], None)[1:]
        b = fake._logprobs([BOS, *tk.encode(p.bad)], None)[1:]
        assert r.logprob_good == pytest.approx(sum(g)) and r.mean_logprob_bad == pytest.approx(sum(b) / len(b))
        assert r.correct == (sum(g) / len(g) > sum(b) / len(b))
        assert r.correct_sum == (sum(g) > sum(b))


def test_a_set_replaced_under_the_same_name_is_never_answered_from_the_old_rows(tok_dir, tmp_path):
    """The cache keys a set's rows by its content hash (from its BASE@SET card), and
    every request names the content it expects: replaced between runs, the new content
    is scored afresh; replaced during a run, the server's 409 stops it, nothing mixed."""
    fake = FakeCompletions(content_rule)
    fake.hashes = {"wd": "aaaa"}
    cache = tmp_path / "c.sqlite"
    ids = [BOS, 4, 5, 6]
    old = fake._logprobs(ids, "wd#aaaa")
    new = fake._logprobs(ids, "wd#bbbb")
    assert old != new
    a = make_scorer(fake, tok_dir, model="fake@wd", cache=cache)
    assert a.score_ids([ids]) == [old] and a.set_hash == "aaaa"
    assert fake.bodies[-1]["vllm_xargs"] == {"neuron_set": "wd", "neuron_set_hash": "aaaa"}
    assert a.describe()["neuron_set_hash"] == "aaaa"
    _, summary = evaluate_pairs(make_scorer(fake, tok_dir, model="fake@wd"), KNOWN_PAIRS[:2], "blimp")
    assert summary.run.neuron_set_hash == "aaaa"  # the run records which content it scored
    fake.hashes["wd"] = "bbbb"  # PUT /v1/neuron-sets/wd with other neurons
    b = make_scorer(fake, tok_dir, model="fake@wd", cache=cache)
    n = fake.calls
    assert b.score_ids([ids]) == [new] and fake.calls == n + 1  # not the old row
    # the old content back: its rows answer again, no call
    fake.hashes["wd"] = "aaaa"
    c = make_scorer(fake, tok_dir, model="fake", neuron_set="wd", cache=cache)
    assert c.score_ids([ids]) == [old] and fake.calls == n + 1
    # replaced during a run: refused, and what was refused is not cached
    fake.hashes["wd"] = "cccc"
    other = [BOS, 7, 8]
    with pytest.raises(ServerError, match="replaced") as err:
        c.score_ids([other])
    assert err.value.status == 409
    assert len(ScoreCache(cache)) == 2


def test_a_run_naming_no_set_is_pinned_to_the_default_it_began_with(tok_dir):
    fake = FakeCompletions(content_rule)
    fake.hashes = {"wd": "aaaa", "other": "ffff"}
    fake.default = "wd"
    s = make_scorer(fake, tok_dir, model="fake")
    ids = [BOS, 4, 5]
    assert s.score_ids([ids]) == [fake._logprobs(ids, "wd#aaaa")]
    assert fake.bodies[-1]["vllm_xargs"] == {"neuron_set": "wd", "neuron_set_hash": "aaaa"}
    fake.default = "other"  # PUT /v1/ablation/default mid-run: this run stays on wd
    assert s.score_ids([[BOS, 6, 7]]) == [fake._logprobs([BOS, 6, 7], "wd#aaaa")]


def test_nan_log_probabilities_are_an_error_and_never_cached(tok_dir, tmp_path):
    fake = FakeCompletions(lambda prev, tok, pos, ns: float("nan") if tok == 6 else -1.0)
    cache = tmp_path / "c.sqlite"
    s = make_scorer(fake, tok_dir, cache=cache)
    with pytest.raises(ScoringError, match="NaN"):
        s.score_ids([[BOS, 5, 6]])
    assert len(ScoreCache(cache)) == 0


def test_neuron_set_in_model_name_or_body(tok_dir, tmp_path):
    fake = FakeCompletions()
    cache = tmp_path / "c.sqlite"
    a = make_scorer(fake, tok_dir, model="fake@wd", cache=cache)
    ids = a.encode("the big dog")
    [la] = a.score_ids([ids])
    assert fake.bodies[-1]["model"] == "fake@wd" and "vllm_xargs" not in fake.bodies[-1]
    assert la == fake._logprobs(ids, "wd") != fake._logprobs(ids, None)
    assert (a.base_model, a.neuron_set, a.set_via) == ("fake", "wd", "model")

    b = make_scorer(fake, tok_dir, model="fake", neuron_set="wd", cache=False)
    [lb] = b.score_ids([ids])
    assert fake.bodies[-1]["model"] == "fake"
    assert fake.bodies[-1]["vllm_xargs"] == {"neuron_set": "wd"}
    assert lb == la and b.set_via == "vllm_xargs"
    c = make_scorer(fake, tok_dir, model="fake", extra_body={"vllm_xargs": {"neuron_set": "wd"}})
    assert c.neuron_set == "wd"
    # same (model, set) through the body: answered from the cache the name route filled
    n = fake.calls
    d = make_scorer(fake, tok_dir, model="fake", neuron_set="wd", cache=cache)
    assert d.score_ids([ids]) == [la] and fake.calls == n
    with pytest.raises(ValueError, match="twice"):
        make_scorer(fake, tok_dir, model="fake@wd", neuron_set="other")
    # unknown set: a clear 404, not retried
    e = make_scorer(fake, tok_dir, model="fake@nope")
    n = fake.calls
    with pytest.raises(ServerError, match="neuron set"):
        e.score_ids([ids])
    assert fake.calls == n + 1


def test_retries_on_503_and_connection_errors(tok_dir):
    fake = FakeCompletions()
    fake.fail_status = [503, 502]
    sc = make_scorer(fake, tok_dir)
    ids = sc.encode("the cat runs")
    assert sc.score_ids([ids]) == [fake._logprobs(ids, None)]
    assert fake.calls == 3 and sc.n_retries == 2

    # connection refused twice, then the server answers
    asgi = httpx.ASGITransport(app=FakeCompletions())
    attempts = {"n": 0}

    async def flaky(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":  # (the scorer's one GET /v1/models is not under test)
            attempts["n"] += 1
        if request.method == "POST" and attempts["n"] <= 2:
            raise httpx.ConnectError("connection refused", request=request)
        return await asgi.handle_async_request(request)

    sc2 = CompletionsScorer("http://fake.test", "fake", tokenizer=tok_dir, cache=False, progress=False,
                            backoff=0.001, transport=httpx.MockTransport(flaky))
    assert sc2.score_ids([ids]) == [fake._logprobs(ids, None)] and sc2.n_retries == 2

    # retries are bounded
    fake3 = FakeCompletions()
    fake3.fail_status = [503] * 10
    sc3 = make_scorer(fake3, tok_dir, max_retries=3)
    with pytest.raises(ServerError, match="503"):
        sc3.score_ids([ids])
    assert fake3.calls == 4


def test_client_errors_are_not_retried(tok_dir):
    fake = FakeCompletions(max_model_len=4)
    sc = make_scorer(fake, tok_dir)
    with pytest.raises(ServerError, match="max_model_len"):
        sc.score_ids([sc.encode("the big dog runs near the house")])
    assert fake.calls == 1


def test_max_tokens_1_fallback(tok_dir):
    fake = FakeCompletions()
    fake.refuse_max_tokens_0 = True
    sc = make_scorer(fake, tok_dir, batch_size=1)
    seqs = [sc.encode(t) for t in ("the cat", "a dog runs", "cats sleep")]
    out = sc.score_ids(seqs)
    assert out == [fake._logprobs(s, None) for s in seqs]  # the generated token is dropped
    assert sc.echo_mode == "max_tokens_1"
    assert [b["max_tokens"] for b in fake.bodies] == [0, 1, 1, 1]


def test_logprobs_1_fallback(tok_dir):
    fake = FakeCompletions()
    fake.refuse_logprobs_0 = True
    sc = make_scorer(fake, tok_dir, batch_size=1)
    seqs = [sc.encode(t) for t in ("the cat", "a dog runs")]
    assert sc.score_ids(seqs) == [fake._logprobs(s, None) for s in seqs]
    assert [b["logprobs"] for b in fake.bodies] == [0, 1, 1] and sc.top_logprobs == 1


def test_server_dtype_keys_the_cache_and_a_mismatch_stops_the_run(tok_dir, tmp_path):
    """bfloat16 scores never answer for float32: the server's dtype is in the cache key,
    recorded, and a --dtype that differs from the server's is refused before scoring."""
    fake = FakeCompletions()
    cache = tmp_path / "scores.sqlite"
    fake.dtype = "float32"
    fp32 = make_scorer(fake, tok_dir, cache=cache)
    ids = fp32.encode("the cat runs")
    fp32.score_ids([ids])
    assert fp32.dtype == "float32" and fp32.describe()["dtype"] == "float32" and fake.calls == 1
    again = make_scorer(fake, tok_dir, cache=cache, dtype="fp32")
    again.score_ids([ids])
    assert fake.calls == 1  # same dtype: cached
    fake.dtype = "bfloat16"  # the same name restarted in bf16
    bf16 = make_scorer(fake, tok_dir, cache=cache)
    bf16.score_ids([ids])
    assert bf16.dtype == "bfloat16" and fake.calls == 2  # not the float32 rows
    wrong = make_scorer(fake, tok_dir, cache=cache, dtype="float32")
    with pytest.raises(ScoringError, match="served in bfloat16, not float32"):
        wrong.score_ids([ids])
    assert fake.calls == 2
    fake.dtype = None  # a server that does not say: the caller's word is recorded
    plain = make_scorer(fake, tok_dir, cache=cache, dtype="bf16")
    plain.score_ids([ids])
    assert plain.dtype == "bfloat16" and fake.calls == 2  # keyed as bfloat16: cached
    for sc in (fp32, again, bf16, wrong, plain):
        sc.close()


def test_batching_dedup_and_concurrency(tok_dir):
    fake = FakeCompletions()
    fake.delay = 0.02
    sc = make_scorer(fake, tok_dir, batch_size=5, concurrency=3)
    words = WORDS
    texts = [f"{words[i % len(words)]} {words[(i * 7) % len(words)]} {words[(i * 3) % len(words)]}"
             for i in range(60)]
    seqs = [sc.encode(t) for t in texts] * 2  # every sequence twice
    out = sc.score_ids(seqs)
    assert out == [fake._logprobs(s, None) for s in seqs]
    uniq = len({tuple(s) for s in seqs})
    assert sc.n_scored == uniq
    assert fake.calls == math.ceil(uniq / 5)
    assert all(len(b["prompt"]) <= 5 for b in fake.bodies)
    assert 1 < fake.max_in_flight <= 3
    # token budget per request
    fake2 = FakeCompletions()
    sc2 = make_scorer(fake2, tok_dir, batch_size=100, max_batch_tokens=8)
    sc2.score_ids(seqs[:10])
    assert all(sum(len(p) for p in b["prompt"]) <= 8 for b in fake2.bodies)


def test_cache_rerun_makes_no_http_call(tok_dir, tmp_path):
    cache = tmp_path / "cache.sqlite"
    fake = FakeCompletions()
    sc = make_scorer(fake, tok_dir, cache=cache, batch_size=2)
    records, summary = evaluate_pairs(sc, KNOWN_PAIRS, "blimp")
    first_calls = fake.calls
    assert first_calls > 0
    sc.close()
    # rerun: new scorer, new "server" URL, same served model id: zero HTTP calls
    fake2 = FakeCompletions()
    sc2 = CompletionsScorer("http://elsewhere.test:9999/v1", "fake", tokenizer=tok_dir, cache=cache,
                            progress=False, transport=httpx.ASGITransport(app=fake2))
    records2, _ = evaluate_pairs(sc2, KNOWN_PAIRS, "blimp")
    assert fake2.calls == 0
    assert [r.model_dump() for r in records2] == [r.model_dump() for r in records]
    assert sc2.stats()["cache_hits"] == 2 * len(KNOWN_PAIRS)
    # another neuron set is another key
    sc3 = make_scorer(fake2, tok_dir, model="fake@wd", cache=cache)
    evaluate_pairs(sc3, KNOWN_PAIRS, "blimp")
    assert fake2.calls > 0
    assert len(ScoreCache(cache)) == 2 * (2 * len(KNOWN_PAIRS) - 1)  # one duplicate sentence


def test_interrupted_run_resumes_identically(tok_dir, tmp_path):
    pairs = [pair(f"p{i % 3}", i, f"the {w} runs", f"the {w} run near") for i, w in enumerate(WORDS)]
    ref_fake = FakeCompletions()
    ref, ref_summary = evaluate_pairs(make_scorer(ref_fake, tok_dir, batch_size=4), pairs, "blimp")

    cache = tmp_path / "resume.sqlite"
    crash = FakeCompletions()
    crash.raise_after = 3  # the 4th request and later fail
    sc = make_scorer(crash, tok_dir, cache=cache, batch_size=4, concurrency=1, max_retries=0)
    with pytest.raises(ServerError, match="injected crash"):
        evaluate_pairs(sc, pairs, "blimp")
    sc.close()
    assert len(ScoreCache(cache)) == 3 * 4  # the finished batches were kept

    resume = FakeCompletions()
    sc2 = make_scorer(resume, tok_dir, cache=cache, batch_size=4)
    got, got_summary = evaluate_pairs(sc2, pairs, "blimp")
    assert [r.model_dump() for r in got] == [r.model_dump() for r in ref]
    assert got_summary.accuracy == ref_summary.accuracy
    assert resume.calls == ref_fake.calls - 3
    assert sc2.stats()["cache_hits"] == 12


def test_bad_responses_are_clear_errors(tok_dir):
    async def short(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        return httpx.Response(200, json={"choices": [
            {"index": i, "logprobs": {"token_logprobs": [None] * (len(p) - 1)}}
            for i, p in enumerate(body["prompt"])]})

    sc = CompletionsScorer("http://x", "fake", tokenizer=tok_dir, cache=False, progress=False,
                           transport=httpx.MockTransport(short))
    with pytest.raises(ScoringError, match="token logprobs for a prompt of"):
        sc.score_ids([[BOS, 4, 5]])


def test_perplexity_windows(tok_dir):
    assert make_windows(list(range(10, 17)), 4, BOS) == [
        (0, [BOS, 10, 11, 12]), (3, [BOS, 13, 14, 15]), (6, [BOS, 16])]
    assert len(make_windows(list(range(7)), 4, BOS, drop_last=True)) == 2
    fake = FakeCompletions(per_token_minus_one)
    sc = make_scorer(fake, tok_dir)
    text = " ".join(WORDS * 3)
    n = 3 * len(WORDS)  # 78 tokens
    records, s = evaluate_perplexity(sc, text, window=11)
    assert s.text_tokens == n and s.n_windows == 8 and s.n_tokens == n
    assert [r.n_tokens for r in records] == [10] * 7 + [n - 70]
    assert s.nll == pytest.approx(1.0) and s.ppl == pytest.approx(math.e)
    _, s2 = evaluate_perplexity(sc, text, window=11, max_windows=2)
    assert s2.n_tokens == 20


# --------------------------------------------------------------------------- CLI


class _Server:
    def __init__(self, app: Any) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > 20:
                raise RuntimeError("fake server did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture()
def fake_http() -> Iterator[tuple[str, FakeCompletions]]:
    fake = FakeCompletions(models=("fake",), max_model_len=32)
    with _Server(fake) as url:
        yield url, fake


def _blimp_dir(root: Path) -> Path:
    d = root / "blimp"
    d.mkdir(parents=True)
    for uid, term in (("agr_a", "agreement"), ("isl_b", "islands")):
        with (d / f"{uid}.jsonl").open("w") as fh:
            for i in range(12):
                w = WORDS[(i * 5) % len(WORDS)]
                fh.write(json.dumps({"sentence_good": f"the {w} runs", "sentence_bad": f"the {w} run that",
                                     "field": "syntax", "linguistics_term": term, "UID": uid,
                                     "pairID": str(i)}) + "\n")
    return root


def test_cli_blimp_and_compare_end_to_end(fake_http, tok_dir, tmp_path):
    url, fake = fake_http
    data = _blimp_dir(tmp_path / "data")
    runner = CliRunner()
    common = ["--server", url, "--tokenizer", str(tok_dir), "--data-dir", str(data),
              "--cache", str(tmp_path / "c.sqlite"), "-q", "-n", "10", "--seed", "3"]
    r1 = runner.invoke(app, ["blimp", "-m", "fake", "--out", str(tmp_path / "A"), *common])
    assert r1.exit_code == 0, r1.output
    r2 = runner.invoke(app, ["blimp", "-m", "fake@wd", "--out", str(tmp_path / "B"), *common])
    assert r2.exit_code == 0, r2.output
    calls = fake.calls
    r3 = runner.invoke(app, ["blimp", "-m", "fake@wd", "--out", str(tmp_path / "B2"), *common])
    assert r3.exit_code == 0 and fake.calls == calls  # all from the cache
    for d in ("A", "B"):
        for f in ("records.jsonl", "summary.json", "summary.csv"):
            assert (tmp_path / d / f).is_file()
    recs = [json.loads(x) for x in (tmp_path / "A" / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 20 and {r["paradigm"] for r in recs} == {"agr_a", "isl_b"}
    summ = json.loads((tmp_path / "B" / "summary.json").read_text())
    assert summ["run"]["neuron_set"] == "wd" and summ["run"]["set_via"] == "model"
    assert summ["run"]["tokenizer"]["start_token_id"] == BOS

    rc = runner.invoke(app, ["compare", str(tmp_path / "A"), str(tmp_path / "B"),
                             "--out", str(tmp_path / "cmp"), "--n-boot", "500"])
    assert rc.exit_code == 0, rc.output
    for f in ("comparison.csv", "comparison.json", "comparison.png"):
        assert (tmp_path / "cmp" / f).stat().st_size > 0
    recs_b = [json.loads(x) for x in (tmp_path / "B" / "records.jsonl").read_text().splitlines()]
    want = compare_runs(recs, recs_b, group_keys=("paradigm", "phenomenon"), n_boot=500)
    got = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["rows"]
    assert got == [w.model_dump() for w in want]


def test_cli_perplexity_and_window_check(fake_http, tok_dir, tmp_path):
    url, fake = fake_http
    text = tmp_path / "t.txt"
    text.write_text(" ".join(WORDS) + "\n\n" + " ".join(WORDS) + "\n")
    runner = CliRunner()
    args = ["perplexity", "-s", url, "-m", "fake", "-t", str(tok_dir), "--text", str(text), "--no-cache", "-q"]
    r = runner.invoke(app, [*args, "--window", "64"])
    assert r.exit_code == 2 and "max_model_len is 32" in r.output
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "P")])  # window: auto = 31
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "P" / "summary.json").read_text())
    assert s["window"] == 31 and s["n_tokens"] == s["text_tokens"] == 2 * len(WORDS)


def test_cli_malformed_jsonl_names_file_and_line(tmp_path):
    d = tmp_path / "data" / "blimp"
    d.mkdir(parents=True)
    good = {"sentence_good": "a b", "sentence_bad": "b a", "field": "syntax",
            "linguistics_term": "t", "UID": "broken", "pairID": "0"}
    (d / "broken.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    r = CliRunner().invoke(app, ["blimp", "-s", "http://127.0.0.1:9", "-m", "fake",
                                 "--data-dir", str(tmp_path / "data")])
    assert r.exit_code == 2
    out = " ".join(r.output.split())
    assert "broken.jsonl:2" in out and "invalid JSON" in out
    # a missing field is named too
    (d / "broken.jsonl").write_text(json.dumps({k: v for k, v in good.items() if k != "UID"}) + "\n")
    r = CliRunner().invoke(app, ["blimp", "-m", "fake", "--data-dir", str(tmp_path / "data")])
    assert r.exit_code == 2 and "broken.jsonl:1" in r.output and "'UID'" in r.output
    # an unknown paradigm lists close names
    r = CliRunner().invoke(app, ["blimp", "-m", "fake", "--data-dir", str(tmp_path / "data"), "-p", "brokn"])
    assert r.exit_code == 2 and "broken" in r.output


def test_cli_help_runs_standalone():
    r = subprocess.run([sys.executable, "-m", "eval.cli", "--help"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("blimp", "tse", "perplexity", "compare"):
        assert cmd in r.stdout


# --------------------------------------------------------------------------- compare


def _records(correct: list[bool], phen: list[str]) -> list[dict[str, Any]]:
    return [{"source": "blimp", "paradigm": f"par_{p}", "pair_id": i, "phenomenon": p,
             "correct": c, "correct_sum": c, "correct_mean": not c, "tie": False}
            for i, (c, p) in enumerate(zip(correct, phen))]


def _run_dir(d: Path, recs: list[dict[str, Any]], neuron_set: str | None) -> Path:
    from eval.stats import accuracy_table
    from eval.tasks import PairRunSummary, RunInfo

    d.mkdir(parents=True)
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rows = accuracy_table(recs, group_keys=("paradigm", "phenomenon")).rows
    run = RunInfo(task="blimp", created="now", server="http://x", model="m", base_model="m",
                  neuron_set=neuron_set, set_via=None, tokenizer={}, echo_mode="max_tokens_0")
    s = PairRunSummary(run=run, metric="sum", n_pairs=len(recs), n_ties=0,
                       group_keys=["paradigm", "phenomenon"], accuracy=rows, accuracy_sum=rows,
                       accuracy_mean=rows)
    (d / "summary.json").write_text(s.model_dump_json())
    return d


def test_compare_writes_csv_json_png_with_right_numbers(tmp_path):
    phen = ["x"] * 10 + ["y"] * 10
    a = [True] * 8 + [False] * 2 + [True] * 5 + [False] * 5   # x: 0.8, y: 0.5
    b = [True] * 4 + [False] * 6 + [True] * 5 + [False] * 5   # x: 0.4, y: 0.5
    ra, rb = _records(a, phen), _records(b, phen)
    da, db = _run_dir(tmp_path / "A", ra, None), _run_dir(tmp_path / "B", rb, "wd")
    res = compare_dirs(da, db, tmp_path / "out", n_boot=2000, seed=1)
    by = {(r.level, r.group): r for r in res.rows}
    x = by[("phenomenon", "x")]
    assert (x.n, x.acc_a, x.acc_b, x.delta, x.b01, x.b10) == (10, 0.8, 0.4, pytest.approx(-0.4), 0, 4)
    assert x.ci_hi <= 0 and x.ci_lo < x.delta
    y = by[("phenomenon", "y")]
    assert (y.delta, y.b01, y.b10, y.p_value) == (0.0, 0, 0, 1.0)
    o = by[("overall", "overall")]
    assert (o.n, o.acc_a, o.acc_b) == (20, 0.65, 0.45)
    with (tmp_path / "out" / "comparison.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    row = next(r for r in rows if r["level"] == "phenomenon" and r["group"] == "x")
    assert float(row["delta"]) == pytest.approx(-0.4) and int(row["b10"]) == 4
    j = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert j["n_pairs"] == 20 and j["run_b"]["neuron_set"] == "wd" and j["metric"] == "correct"
    png = (tmp_path / "out" / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    # another metric field
    res2 = compare_dirs(da, db, tmp_path / "out2", metric="correct_mean", n_boot=200, plot=False)
    assert {(r.level, r.group): r for r in res2.rows}[("phenomenon", "x")].delta == pytest.approx(0.4)
    assert not (tmp_path / "out2" / "comparison.png").exists()


def test_compare_rejects_mismatched_runs(tmp_path):
    ra = _records([True, False, True], ["x"] * 3)
    rb = _records([True, False], ["x"] * 2)
    da, db = _run_dir(tmp_path / "A", ra, None), _run_dir(tmp_path / "B", rb, None)
    r = CliRunner().invoke(app, ["compare", str(da), str(db), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "different pairs" in " ".join(r.output.split())
    r = CliRunner().invoke(app, ["compare", str(da), str(tmp_path / "nope")])
    assert r.exit_code == 2 and "summary.json" in r.output


def test_write_pair_run_csv(tok_dir, tmp_path):
    sc = make_scorer(FakeCompletions(per_token_minus_one), tok_dir)
    records, summary = evaluate_pairs(sc, KNOWN_PAIRS, "blimp")
    d = write_pair_run(tmp_path / "run", records, summary)
    with (d / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    ov = next(r for r in rows if r["metric"] == "correct" and r["level"] == "overall")
    assert (ov["n"], ov["n_correct"], ov["n_ties"]) == ("6", "4", "1")
    lines = (d / "records.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[3])["tie"] is True


# --------------------------------------------------------------------------- lm-eval tasks


def test_lm_eval_task_generator(tmp_path):
    import yaml

    from eval.lm_eval_tasks.generate import main

    data = _blimp_dir(tmp_path / "data")
    out = tmp_path / "tasks"
    assert main(["--data-dir", str(data), "--out", str(out)]) == 0
    t = yaml.safe_load((out / "negablate_blimp_agr_a.yaml").read_text())
    assert t["task"] == "negablate_blimp_agr_a" and t["dataset_path"] == "json"
    assert t["dataset_kwargs"]["data_files"]["train"] == str((data / "blimp" / "agr_a.jsonl").resolve())
    assert t["output_type"] == "multiple_choice" and t["doc_to_text"] == "" and t["doc_to_target"] == 0
    assert t["doc_to_choice"] == "{{[sentence_good, sentence_bad]}}" and t["target_delimiter"] == ""
    assert t["tag"] == ["negablate_blimp_phenomenon_agreement"]
    g = yaml.safe_load((out / "_negablate_blimp.yaml").read_text())
    assert g["group"] == "negablate_blimp"
    assert g["task"] == ["negablate_blimp_agr_a", "negablate_blimp_isl_b"]
    assert g["aggregate_metric_list"][0]["weight_by_size"] is True
    with pytest.raises(SystemExit, match="unknown paradigm"):
        main(["--data-dir", str(data), "--out", str(out), "--paradigm", "nope"])


def test_lm_eval_tasks_cover_all_67_paradigms(tmp_path):
    from eval.data import BLIMP_PARADIGMS, default_data_dir
    from eval.lm_eval_tasks.generate import generate

    bdir = default_data_dir() / "blimp"
    if not bdir.is_dir():
        pytest.skip(f"{bdir} absent")
    written = generate(bdir, tmp_path)
    assert len(written) == 68
    group = (tmp_path / "_negablate_blimp.yaml").read_text()
    assert all(f"negablate_blimp_{u}\n" in group for u in BLIMP_PARADIGMS)


def test_retry_after_is_honoured_on_503(tok_dir, monkeypatch):
    fake = FakeCompletions()
    fake.fail_status = [503]
    fake.retry_after = "7"
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def record(delay, *a, **k):
        slept.append(delay)
        await real_sleep(0)

    monkeypatch.setattr("eval.scoring.asyncio.sleep", record)
    sc = make_scorer(fake, tok_dir)
    ids = sc.encode("the cat runs")
    assert sc.score_ids([ids]) == [fake._logprobs(ids, None)] and sc.n_retries == 1
    assert len(slept) == 1 and 3.5 <= slept[0] <= 7.0  # backoff 0.001 raised to Retry-After (jitter 0.5-1)


def test_no_set_named_under_a_server_default_is_recorded_and_cached_apart(tok_dir, tmp_path, caplog):
    """A run naming no set while the server has a default is scored (and cached) as
    that default, warned about and recorded; BASE@none is the unablated model."""
    fake = FakeCompletions()
    fake.default = "wd"
    cache = tmp_path / "scores.sqlite"
    implicit = make_scorer(fake, tok_dir, cache=cache)
    ids = implicit.encode("the cat runs")
    with caplog.at_level("WARNING", logger="negablate.eval"):
        got = implicit.score_ids([ids])
    assert got == [fake._logprobs(ids, "wd")] and got != [fake._logprobs(ids, None)]
    assert implicit.server_default == "wd" and implicit.describe()["server_default"] == "wd"
    assert "the server's default set is 'wd'" in caplog.text and "fake@none" in caplog.text
    none = make_scorer(fake, tok_dir, model="fake@none", cache=cache)
    calls = fake.calls
    assert none.score_ids([ids]) == [fake._logprobs(ids, None)]  # not the cached default scores
    assert fake.calls == calls + 1 and none.server_default is None and none.condition is None
    explicit = make_scorer(fake, tok_dir, model="fake@wd", cache=cache)
    assert explicit.score_ids([ids]) == [fake._logprobs(ids, "wd")] and fake.calls == calls + 1  # cached
    fake.default = None  # default cleared: a plain run is unablated and reuses the none scores
    plain = make_scorer(fake, tok_dir, cache=cache)
    assert plain.score_ids([ids]) == [fake._logprobs(ids, None)] and fake.calls == calls + 1
    assert plain.server_default is None
    for sc in (implicit, none, explicit, plain):
        sc.close()


def test_pairs_through_the_continuation_route_copy_the_shared_prefix_and_equal_the_echo(tok_dir):
    """A server listing the continuation route: each sentence's rows shared with the
    sentence before it are not asked for, and every sequence's log-probs equal what the
    completions echo gives, exactly (the fake's rows depend on the prefix only)."""
    texts = ["the cat sleeps near the house", "the cat sleep near the house",  # shared: "the cat"
             "a dog runs", "a dog runs",  # identical: sent once
             "the dogs are big", "the dogs",  # the second is a prefix of the first: all copied
             "big houses"]
    fake = FakeCompletions(content_rule, sets=("wd",))
    fake.hashes = {"wd": "h1"}
    with make_scorer(fake, tok_dir, "fake@wd") as echo:
        ids = echo.encode_batch(texts)
        want = echo.score_ids(ids)
        assert echo.describe()["endpoint"] == "/v1/completions"
    fake.route = "/v1/negablate/loglikelihood"
    with make_scorer(fake, tok_dir, "fake@wd") as sc:
        got = sc.score_ids(ids)
        assert sc.describe()["endpoint"] == "/v1/negablate/loglikelihood"
    assert got == want
    starts = [len(item["context"]) for item in fake.route_items]
    assert starts == [1, 3, 1, 1, 1]  # "the cat" shared; "the dogs" not asked for at all
    unique = [x for i, x in enumerate(ids) if x not in ids[:i]]
    assert sum(len(i["continuation"]) for i in fake.route_items) == sum(len(x) - 1 for x in unique) - 2 - 2
    with make_scorer(fake, tok_dir, "fake@wd", endpoint="completions") as forced:
        assert forced.score_ids(ids) == want and forced.describe()["endpoint"] == "/v1/completions"
