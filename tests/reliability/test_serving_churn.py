"""Set churn against a live server: more sets in use than resident slots.

`negablate serve --max-sets 2` (the workers' slot table at its production size),
four sets on disk, ten clients each scoring under a random one of the four while
another client uploads, uses and deletes a fifth set in a loop. Requests whose
set is not resident wait for a slot; nothing is refused. Every answer must equal
its set's transformers oracle, no request or upload may get a 409 or a 5xx (the
clients do not retry), and the wait must stay bounded.
"""

from __future__ import annotations

import random
import statistics
import threading
import time

import pytest

from server.client import NegablateAPIError, NegablateClient
from vllm_negablate.oracle import HFAblationOracle
from vllm_negablate.testing.engines import TINY_SERVER, TOL, max_diff, random_prompts
from server.launcher import ServerProcess
from vllm_negablate.testing.sets import random_set

pytestmark = pytest.mark.slow
ADMIN = "churn-admin"
SETS = ["S0", "S1", "S2", "S3"]
CLIENTS = 10
SECONDS = 15.0


@pytest.fixture(scope="module")
def churn_server(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("churn")
    model_dir = tiny_models["llama"]
    sets_dir = root / "sets"
    sets = {name: random_set(model_dir, name, "both", fraction=0.3, seed=i) for i, name in enumerate(SETS)}
    sets["T"] = random_set(model_dir, "T", "negative", fraction=0.5, seed=9)
    for name in SETS:
        sets[name].save(sets_dir / f"{name}.json")
    server = ServerProcess(
        model_dir, "--admin-key", ADMIN, "--neuron-sets", str(sets_dir), "--max-sets", "2",
        "--set-wait-timeout", "60", log_path=root / "server.log",
        env={"NEGABLATE_WORKER_SLOTS": "6"},  # what `negablate serve --max-sets 2` gives the workers
        **TINY_SERVER,
    ).start()
    yield server, model_dir, sets_dir, sets
    server.stop()


def test_churn_waits_instead_of_refusing_and_every_answer_is_its_sets(churn_server):
    server, model_dir, sets_dir, sets = churn_server
    oracle = HFAblationOracle(model_dir)
    text = random_prompts(1, length=24, seed=3)[0]
    refs = {name: oracle.prompt_logprobs(text, ns) for name, ns in sets.items()}
    names = list(refs)
    assert min(max_diff(refs[a], refs[b]) for a in names for b in names if a < b) > 1e-3

    stop = time.monotonic() + SECONDS
    lock = threading.Lock()
    latencies: list[float] = []
    answers = {name: 0 for name in names}
    wrong: list[tuple[str, float]] = []
    errors: list[tuple[str, int, str]] = []
    churn_cycles = 0

    def record(name: str, row, started: float) -> None:
        diff = max_diff(row, refs[name])
        with lock:
            latencies.append(time.monotonic() - started)
            if diff < TOL:
                answers[name] += 1
            else:
                wrong.append((name, diff))

    def scorer(k: int) -> None:
        rng = random.Random(k)
        with NegablateClient(server.url, model="tiny", max_retries=0) as c:
            while time.monotonic() < stop:
                name = rng.choice(SETS)
                started = time.monotonic()
                try:
                    row = c.score([text], name, use_xargs=rng.random() < 0.5)[0].logprobs
                except NegablateAPIError as exc:
                    with lock:
                        errors.append((f"score {name}", exc.status, exc.message))
                    continue
                record(name, row, started)

    def churner() -> None:
        nonlocal churn_cycles
        with NegablateClient(server.url, model="tiny", admin_key=ADMIN, max_retries=0) as c:
            while time.monotonic() < stop:
                for step in ("upload", "score", "delete"):
                    started = time.monotonic()
                    try:
                        if step == "upload":
                            c.upload_set(sets["T"])
                        elif step == "score":
                            record("T", c.score([text], "T")[0].logprobs, started)
                        else:
                            c.delete_set("T")
                    except NegablateAPIError as exc:
                        with lock:
                            errors.append((f"{step} T", exc.status, exc.message))
                        break
                else:
                    churn_cycles += 1

    threads = [threading.Thread(target=scorer, args=(k,)) for k in range(CLIENTS)]
    threads.append(threading.Thread(target=churner))
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    with NegablateClient(server.url, admin_key=ADMIN) as c:
        listing = c.list_sets()
    p50 = statistics.median(latencies)
    p99 = sorted(latencies)[int(0.99 * (len(latencies) - 1))]
    waits = listing.slot_waits
    print(f"churn: {sum(answers.values())} answers {answers}, {churn_cycles} upload/score/delete "
          f"cycles, {len(errors)} errors, {len(wrong)} wrong; request latency p50 {p50 * 1000:.0f} ms, "
          f"p99 {p99 * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms; server slot waits: "
          f"{waits.count} queued, p50 {waits.p50_s * 1000:.0f} ms, p99 {waits.p99_s * 1000:.0f} ms, "
          f"max {waits.max_s * 1000:.0f} ms")
    assert not errors, errors[:5]
    assert not wrong, wrong[:5]
    assert all(answers[name] >= 5 for name in SETS), answers
    assert churn_cycles >= 3 and answers["T"] >= 3
    assert waits.count > 0  # the scenario did make requests wait for slots
    assert max(latencies) < 30.0  # bounded: far under the 60 s wait limit
    assert {s.name for s in listing.data} == set(SETS)  # T deleted at the end of each cycle
    assert all(s.in_flight == 0 and s.waiting == 0 for s in listing.data)
    assert sum(s.resident for s in listing.data) <= 2
    assert not (sets_dir / "T.json").exists()
