"""`negablate serve` over HTTP: every control route, auth, per-request sets, persistence.

One server (tiny Llama, fp32) for the module; the last test restarts it with a
truncated set file on disk.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from server.client import SERVER_DEFAULT, NegablateAPIError, NegablateClient
from vllm_negablate.oracle import HFAblationOracle
from vllm_negablate.testing.engines import TINY_SERVER, TOL, max_diff, random_prompts
from server.launcher import ServerProcess
from vllm_negablate.testing.sets import random_set

pytestmark = pytest.mark.slow
ADMIN = "admin-secret"


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    sets_dir = root / "sets"
    model_dir = tiny_models["llama"]
    server = ServerProcess(model_dir, "--admin-key", ADMIN, "--neuron-sets", str(sets_dir),
                           log_path=root / "server.log", **TINY_SERVER).start()
    yield server, model_dir, sets_dir
    server.stop()


@pytest.fixture(scope="module")
def oracle(tiny_models):
    return HFAblationOracle(tiny_models["llama"])


@pytest.fixture
def client(served):
    with NegablateClient(served[0].url, admin_key=ADMIN) as c:
        yield c


def test_upload_list_get_models_and_delete(served, client):
    server, model_dir, sets_dir = served
    a = random_set(model_dir, "A", "negative", seed=1)
    summary = client.upload_set(a)
    assert summary.content_hash == a.content_hash() and summary.num_neurons == a.num_neurons()
    assert not summary.resident and (sets_dir / "A.json").exists()  # saved; resident on first use
    client.score(random_prompts(1, length=8, seed=0), "A")
    assert [(s.name, s.resident, s.in_flight) for s in client.list_sets().data] == [("A", True, 0)]
    assert [s.name for s in client.list_sets().data] == ["A"]
    assert client.get_set("A") == a
    cards = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert [m["id"] for m in cards] == ["tiny", "tiny@none", "tiny@A"]
    assert cards[0]["negablate_default"] is None
    assert cards[0]["negablate_dtype"] == "float32"  # what the harness keys its cache by
    assert [m["neuron_set"] for m in cards[1:]] == ["none", "A"]
    tmp = random_set(model_dir, "tmp", "both", seed=2)
    client.upload_set(tmp)
    client.delete_set("tmp")
    assert not (sets_dir / "tmp.json").exists()
    assert [s.name for s in client.list_sets().data] == ["A"]
    state = client.state()
    assert state.consistent and state.workers[0].sets["A"]["content_hash"] == a.content_hash()


@pytest.mark.parametrize("key", [None, "wrong"])
def test_control_calls_need_the_admin_key(served, key):
    server, model_dir, _ = served
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    before = httpx.get(f"{server.url}/v1/neuron-sets", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    ns = random_set(model_dir, "intruder", "negative")
    calls = [
        ("GET", "/v1/neuron-sets", None), ("GET", "/v1/ablation", None),
        ("PUT", "/v1/neuron-sets/intruder", ns.model_dump(mode="json")),
        ("DELETE", "/v1/neuron-sets/A", None), ("PUT", "/v1/ablation/default", {"name": "A"}),
    ]
    for method, path, body in calls:
        r = httpx.request(method, f"{server.url}{path}", json=body, headers=headers)
        assert r.status_code == 401, (method, path, r.text)
        assert r.json()["error"]["type"] == "AuthenticationError"
    after = httpx.get(f"{server.url}/v1/neuron-sets", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert after == before


def test_invalid_uploads_are_rejected_with_clear_errors(served, client):
    server, model_dir, sets_dir = served
    before = client.list_sets()
    ns = random_set(model_dir, "bad", "negative", seed=3)
    raw = ns.model_dump(mode="json")
    raw["entries"][1]["neurons"].append(999)
    r = httpx.put(f"{server.url}/v1/neuron-sets/bad", json=raw, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 422 and "entries[1] (layer 1): neuron index 999 is out of range" in r.text
    wrong = ns.model_copy(update={"model": ns.model.model_copy(update={"intermediate_size": 256})})
    with pytest.raises(NegablateAPIError) as info:
        client.upload_set(wrong)
    assert info.value.status == 422 and "intermediate_size: set has 256, model has 128" in info.value.message
    r = httpx.put(f"{server.url}/v1/neuron-sets/bad", content=b'{"name": "bad", "model": ',
                  headers={"Authorization": f"Bearer {ADMIN}", "content-type": "application/json"})
    assert r.status_code == 400
    r = httpx.put(f"{server.url}/v1/neuron-sets/other", json=ns.model_dump(mode="json"),
                  headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 422 and "differs from the URL" in r.text
    with pytest.raises(NegablateAPIError) as info:
        client.set_default("missing")
    assert info.value.status == 404
    assert client.list_sets() == before and not (sets_dir / "bad.json").exists()


def test_per_request_selection_equals_the_oracle(served, client, oracle):
    server, model_dir, _ = served
    b = random_set(model_dir, "B", "positive", seed=4)
    client.upload_set(b)
    a = client.get_set("A")
    texts = random_prompts(2, length=30, seed=7)
    for name, ns in [(None, None), ("A", a), ("B", b)]:
        for use_xargs in (False, True):
            got = client.score(texts, name, use_xargs=use_xargs)
            for t, row in zip(texts, got):
                assert max_diff(row.logprobs, oracle.prompt_logprobs(t, ns)) < TOL
    ab = client.ab(texts, None, "A")
    assert all(abs(d) > 1e-3 for d in ab.deltas())
    for body in ({"model": "tiny@nope"}, {"model": "tiny", "vllm_xargs": {"neuron_set": "nope"}}):
        r = httpx.post(f"{server.url}/v1/completions",
                       json={**body, "prompt": texts[0], "max_tokens": 1, "echo": True, "logprobs": 0})
        assert r.status_code == 404
        assert r.json()["error"]["type"] == "NotFoundError" and "nope" in r.json()["error"]["message"]


def test_none_selects_the_unablated_model_while_a_default_is_active(served, client, oracle):
    """BASE@none, vllm_xargs none, the typed client's None and the harness's
    --neuron-set none all equal the unablated oracle with default A active; a run
    naming no set gets A and records it; a set named like the selector is refused."""
    from eval.scoring import CompletionsScorer

    server, model_dir, sets_dir = served
    a = client.get_set("A")
    texts = random_prompts(2, length=30, seed=21)
    plain = [oracle.prompt_logprobs(t) for t in texts]
    under_a = [oracle.prompt_logprobs(t, a) for t in texts]
    client.set_default("A")
    try:
        for body in ({"model": "tiny@none"}, {"model": "tiny", "vllm_xargs": {"neuron_set": "none"}},
                     {"model": "tiny@none", "vllm_xargs": {"neuron_set": "none"}}):
            r = httpx.post(f"{server.url}/v1/completions", json={
                **body, "prompt": texts, "echo": True, "logprobs": 0, "max_tokens": 0})
            assert r.status_code == 200, r.text
            rows = [c["logprobs"]["token_logprobs"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
            for row, ref in zip(rows, plain):
                assert max_diff(row, ref) < TOL, body
        ab = client.ab(texts, None, "A")
        for x, y, p_ref, a_ref in zip(ab.a, ab.b, plain, under_a):
            assert max_diff(x.logprobs, p_ref) < TOL and max_diff(y.logprobs, a_ref) < TOL
        assert all(abs(d) > 1e-3 for d in ab.deltas())
        default_rows = client.score(texts, SERVER_DEFAULT)
        assert all(max_diff(x.logprobs, ref) < TOL for x, ref in zip(default_rows, under_a))
        # the harness: explicit none (two spellings) vs a run naming no set
        for kw in ({"model": "tiny@none"}, {"model": "tiny", "neuron_set": "none"}):
            with CompletionsScorer(server.url, tokenizer=model_dir, cache=False, progress=False, **kw) as sc:
                got = sc.score_ids(texts)
                assert sc.server_default is None and sc.describe()["neuron_set"] == "none"
            assert all(max_diff(row, ref) < TOL for row, ref in zip(got, plain)), kw
        with CompletionsScorer(server.url, "tiny", tokenizer=model_dir, cache=False, progress=False) as sc:
            got = sc.score_ids(texts)
            assert sc.server_default == "A" and sc.describe()["server_default"] == "A"
        assert all(max_diff(row, ref) < TOL for row, ref in zip(got, under_a))
        cards = httpx.get(f"{server.url}/v1/models").json()["data"]
        assert cards[0]["id"] == "tiny" and cards[0]["negablate_default"] == "A"
        # the selector's name is reserved: 422, nothing changes
        before, files = client.list_sets(), sorted(p.name for p in sets_dir.iterdir())
        for name in ("none", "None"):
            raw = random_set(model_dir, "x", "negative").model_dump(mode="json") | {"name": name}
            r = httpx.put(f"{server.url}/v1/neuron-sets/{name}", json=raw,
                          headers={"Authorization": f"Bearer {ADMIN}"})
            assert r.status_code == 422 and "is reserved" in r.text, r.text
        assert client.list_sets() == before and sorted(p.name for p in sets_dir.iterdir()) == files
    finally:
        client.set_default(None)


def test_a_set_replaced_under_its_name_is_scored_afresh_and_never_mixed(served, client, oracle, tmp_path):
    """The harness caches by the set's content hash (from its BASE@SET card): a set
    replaced under the same name is scored again and equals the oracle under the new
    content; a request still naming the old content is refused (409), not answered."""
    from eval.errors import ServerError
    from eval.scoring import CompletionsScorer

    server, model_dir, _ = served
    old = random_set(model_dir, "R", "negative", seed=5)
    new = random_set(model_dir, "R", "negative", seed=6)
    assert old.content_hash() != new.content_hash()
    texts = random_prompts(2, length=12, seed=31)
    cache = tmp_path / "scores.sqlite"

    def harness():
        return CompletionsScorer(server.url, "tiny@R", tokenizer=model_dir, cache=cache, progress=False)

    client.upload_set(old)
    try:
        card = {c["id"]: c for c in httpx.get(f"{server.url}/v1/models").json()["data"]}["tiny@R"]
        assert card["negablate_content_hash"] == old.content_hash()
        with harness() as sc:
            first = sc.score_ids(texts)
            assert sc.set_hash == old.content_hash() and sc.n_scored == 2
        client.upload_set(new)
        with harness() as sc:
            second = sc.score_ids(texts)
            assert sc.set_hash == new.content_hash() and sc.n_scored == 2 and sc.n_cache_hits == 0
        for got, ref in ((first, old), (second, new)):
            assert all(max_diff(row, oracle.prompt_logprobs(t, ref)) < TOL for row, t in zip(got, texts))
        assert max(abs(x - y) for a, b in zip(first, second) for x, y in zip(a[1:], b[1:])) > 1e-3
        # a run that began under the old content: its next request is refused
        with harness() as sc:
            sc.set_hash, sc._server_probed = old.content_hash(), True
            with pytest.raises(ServerError, match="replaced under the same name") as err:
                sc.score_ids(random_prompts(1, length=12, seed=32))
            assert err.value.status == 409
    finally:
        client.delete_set("R")


def test_soak_default_flips_and_mixed_sets_never_mix(served, client):
    """Soak: 8 clients score while the default flips every 50 ms and set C's content is
    replaced under its name in a loop.

    Each request carries 3 prompts (vLLM admits them one by one, so a control call can
    land between them) and names no set, ``none`` (no ablation), A, B or C (as BASE@SET
    or in vllm_xargs). Every prompt of a request must give one and the same reference:
    exactly the named set's (C: either of its two contents), ``none`` whatever the
    default, and for a request naming no set one of the three defaults; and no request
    may fail (a replaced content unloaded under an admitted request answered NaN: 400).
    """
    server, model_dir, _ = served
    text = random_prompts(1, length=60, seed=8)[0]
    c_versions = [random_set(model_dir, "C", "negative", seed=s) for s in (41, 42)]
    refs = {name: client.score([text], name)[0].logprobs for name in (None, "A", "B")}  # None: none
    for k, version in enumerate(c_versions):
        client.upload_set(version)
        refs[f"C{k}"] = client.score([text], "C")[0].logprobs
    keys = list(refs)
    assert min(max_diff(refs[a], refs[b]) for a in keys for b in keys if a != b) > 1e-3
    counts = {"default->none": 0, "default->A": 0, "default->B": 0, "explicit none": 0,
              "explicit A": 0, "explicit B": 0, "explicit C0": 0, "explicit C1": 0}
    wrong: list = []
    errors: list = []
    # at least 8 s and 20 replacements of C (each waits for the requests holding C, so a
    # loaded machine needs longer), at most 90 s
    started = time.monotonic()
    stop = threading.Event()
    lock = threading.Lock()

    def worker(k: int):
        choices = [SERVER_DEFAULT, "A", None, "C", SERVER_DEFAULT, "B", "C"]
        i = k
        with NegablateClient(server_url(client), model="tiny") as c:
            while not stop.is_set():
                wanted = choices[i % len(choices)]
                try:
                    rows = [r.logprobs for r in c.score([text] * 3, wanted, use_xargs=bool(i % 3 == 0))]
                except NegablateAPIError as exc:  # e.g. NaN rows from a set unloaded under a request
                    with lock:
                        errors.append((wanted, exc.status, exc.message))
                    continue
                finally:
                    i += 1
                per_prompt = [[n for n, ref in refs.items() if max_diff(row, ref) < 1e-5] for row in rows]
                match = per_prompt[0] if all(m == per_prompt[0] for m in per_prompt) else None
                with lock:
                    if match is None or len(match) != 1:
                        wrong.append((wanted, per_prompt))
                    elif wanted == "C" and match[0] in ("C0", "C1"):
                        counts[f"explicit {match[0]}"] += 1
                    elif wanted is not SERVER_DEFAULT and match == [wanted]:
                        counts[f"explicit {wanted or 'none'}"] += 1
                    elif wanted is SERVER_DEFAULT and match[0] in (None, "A", "B"):
                        counts[f"default->{match[0] or 'none'}"] += 1
                    else:
                        wrong.append((wanted, per_prompt))

    replaced = 0

    def replacer():
        nonlocal replaced
        with NegablateClient(server_url(client), admin_key=ADMIN) as c:
            while not stop.is_set():
                try:
                    c.upload_set(c_versions[replaced % 2])
                except NegablateAPIError as exc:
                    with lock:
                        errors.append(("upload C", exc.status, exc.message))
                    return
                replaced += 1
                time.sleep(0.02)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    threads.append(threading.Thread(target=replacer))
    for t in threads:
        t.start()
    cycle = [None, "A", "B"]
    flips = 0
    try:
        while (elapsed := time.monotonic() - started) < 90 and (elapsed < 8 or replaced < 20):
            client.set_default(cycle[flips % 3])
            flips += 1
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join()
    finally:
        stop.set()
        client.set_default(None)
        client.delete_set("C")
    print(f"soak: {time.monotonic() - started:.0f} s, {flips} default flips, {replaced} replacements of C, answers: {counts}, "
          f"wrong: {len(wrong)}, errors: {len(errors)}")
    assert not errors, errors[:5]  # no refusal, no NaN answer under the churn
    assert not wrong, wrong[:5]
    assert replaced >= 20
    assert all(counts[f"explicit {n}"] for n in ("A", "B", "none", "C0", "C1")), counts
    assert sum(1 for k in ("default->none", "default->A", "default->B") if counts[k]) >= 2


def server_url(client) -> str:
    return str(client._http.base_url)


def test_restart_reloads_sets_and_reports_a_corrupt_file(served, client):
    server, model_dir, sets_dir = served
    client.set_default("B")
    good_b = client.get_set("B")
    (sets_dir / "A.json").write_text((sets_dir / "A.json").read_text()[:50])  # truncated
    server.stop()
    server.start()
    with NegablateClient(server.url, admin_key=ADMIN) as c:
        listing = c.list_sets()
        assert [s.name for s in listing.data] == ["B"] and listing.default == "B"
        assert c.get_set("B") == good_b
        assert c.state().workers[0].default == "B"
    log = server.log_path.read_text(errors="replace")
    assert "neuron set file" in log and "A.json not loaded" in log
