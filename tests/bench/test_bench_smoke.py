"""Every benchmark script under ``bench/`` runs end to end at a tiny size and reports sane numbers.

Each script runs once as a subprocess (as a user would run it) on one tiny Llama built
here, with minimal flags (one repetition, a few prompts or pairs). The checks are on the
numbers, not just on "it ran": printed ratios and JSON agree with each other and with the
medians they come from, are finite and positive; ``server_vs_hf`` must find the same
ablated sums of log-probs on both sides (< 2e-4) and a set that moves them by far more;
``harness_vs_lm_eval`` must get lm_eval's exact per-paradigm accuracies; ``scoring_speed``
(its own tiny Llama, ``--tiny``) must report every speed of both dtypes, with served,
offline and transformers scoring the same tokens; token and pair counts are recomputed
independently here.

Every script starts its own vLLM engine (15-60 s each on 2 idle cores), so the selected
scripts run two at a time in the background from the first test on; each test waits for
its own. Timings under this parallel load mean nothing; only their form is checked.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PARADIGM = "anaphor_gender_agreement"
PAIRS = 8
NUM = r"([0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?)"


@dataclass
class Run:
    cmd: list[str]
    returncode: int
    stdout: str
    stderr: str
    result: dict

    def check(self) -> None:
        assert self.returncode == 0, (f"{' '.join(self.cmd)} exited {self.returncode}\n"
                                      f"stdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-6000:]}")


def _flags(model: Path) -> dict[str, list[str]]:
    m = ["--model", str(model)]
    pairs = ["--pairs", str(PAIRS), "--paradigms", PARADIGM, "--reps", "1", "--kv-cache-mb", "64"]
    return {
        "harness_vs_lm_eval": [*m, *pairs, "--no-warmup"],
        "server_vs_hf": [*m, *pairs],
        "op_overhead": [*m, "--prompts", "4", "--length", "32", "--reps", "1"],
        "scoring_speed": ["--tiny", "--reps", "1", "--pairs", str(PAIRS)],
        "levers": [*m, "--dtype", "float32", "--reps", "1", "--pairs", str(PAIRS), "--batch-sizes", "4,16",
                   "--kv-cache-mb", "64", "--settle", "0.2"],
        "lm_eval_backend": [*m, "--limit", "2", "--reps", "1", "--no-warmup", "--kv-cache-mb", "64"],
        "pair_endpoints": [*m, "--blimp-per-paradigm", "1", "--tse-per-test", "1", "--reps", "1", "--no-warmup",
                           "--kv-cache-mb", "64"],
        "discovery_speed": [*m, "--window", "64", "--tokens", "1024", "--tokens-small", "512",
                            "--tokens-large", "1024", "--reps", "1", "--nbins", "64",
                            "--kv-cache-mb", "64"],
    }


# test name -> bench script; the heavy ones first so that the two lanes finish together
TESTS = {
    "test_scoring_speed": "scoring_speed",
    "test_harness_vs_lm_eval": "harness_vs_lm_eval",
    "test_server_vs_hf": "server_vs_hf",
    "test_op_overhead": "op_overhead",
    "test_discovery_speed": "discovery_speed",
    "test_levers": "levers",
    "test_lm_eval_backend": "lm_eval_backend",
    "test_pair_endpoints": "pair_endpoints",
}


def _run(script: str, flags: list[str], out_json: Path) -> Run:
    cmd = [sys.executable, str(REPO / "bench" / f"{script}.py"), *flags, "--json", str(out_json)]
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=800)
    result = json.loads(out_json.read_text()) if r.returncode == 0 and out_json.exists() else {}
    return Run(cmd, r.returncode, r.stdout, r.stderr, result)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from vllm_negablate.testing.tiny_models import build_tiny_model

    return build_tiny_model("llama", tmp_path_factory.mktemp("bench-smoke") / "llama")


@pytest.fixture(scope="module")
def runs(request, model_dir, tmp_path_factory) -> dict[str, Future]:
    """Start the selected benches, two at a time, as soon as the first test asks."""
    selected = {item.originalname for item in request.session.items if item.module is request.module}
    out = tmp_path_factory.mktemp("bench-smoke-out")
    flags = _flags(model_dir)
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {script: pool.submit(_run, script, flags[script], out / f"{script}.json")
               for test, script in TESTS.items() if test in selected}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_harness_vs_lm_eval(runs):
    run = runs["harness_vs_lm_eval"].result()
    run.check()
    res = run.result
    assert res["n_pairs"] == PAIRS and res["paradigms"] == [PARADIGM]
    pps, med = res["pairs_per_s"], res["median_s"]
    for k in ("ours", "lm_eval", "lm_eval_evaluation", "lm_eval_wall"):
        assert finite_positive(pps[k]) and pps[k] == pytest.approx(PAIRS / med[k])
    assert res["ratio"] == pytest.approx(pps["ours"] / pps["lm_eval"])
    assert res["ratio_wall"] == pytest.approx(pps["ours"] / pps["lm_eval_wall"])
    # nested: lm_eval's scoring phase is inside its evaluation time, which is inside its wall time
    assert med["lm_eval"] < med["lm_eval_evaluation"] < med["lm_eval_wall"]
    # independent check: lm_eval's accuracy equals ours (ties counted as right) on every run
    assert res["parity_max_mismatch"] == 0
    m = re.search(rf"ratio ours / lm_eval: {NUM}x \(scoring phase\)", run.stdout)
    assert m and float(m.group(1)) == pytest.approx(res["ratio"], abs=0.006), run.stdout
    assert re.search(rf"ours .* {NUM} pairs/s", run.stdout) and re.search(rf"lm_eval .* {NUM} pairs/s", run.stdout)


def test_server_vs_hf(runs, model_dir):
    from eval.data import load_blimp
    from eval.tokenizers import LocalTokenizer

    run = runs["server_vs_hf"].result()
    run.check()
    res = run.result
    # the sentences scored: recount the tokens with the local tokenizer
    tok = LocalTokenizer(model_dir)
    pairs = load_blimp(paradigms=[PARADIGM], allow_hub=False)[:PAIRS]
    texts = [t for p in pairs for t in (p.good, p.bad)]
    assert res["n_pairs"] == PAIRS and res["n_sentences"] == 2 * PAIRS
    assert res["tokens"] == sum(1 + len(ids) for ids in tok.encode_batch(texts))
    for side in ("server", "hf"):
        assert finite_positive(res["tokens_per_s"][side])
        assert res["tokens_per_s"][side] == pytest.approx(res["tokens"] / res["median_s"][side])
        assert res["pairs_per_s"][side] == pytest.approx(PAIRS / res["median_s"][side])
    assert finite_positive(res["ratio"])
    assert res["ratio"] == pytest.approx(res["median_s"]["hf"] / res["median_s"]["server"])
    assert finite_positive(res["cpu_ratio"])
    # the server's worker did the forward passes while it was scoring
    assert all(d["VLLM::Worker"] > 0 for d in res["cpu_during_server_pass_s"])
    # same ablated log-probs on both sides, and the set really changes them
    assert res["logprob_max_abs_diff"] < 2e-4
    assert res["ablation_mean_abs_effect"] > 50 * max(res["logprob_max_abs_diff"], 1e-6)
    assert res["hf_threads"] == res["cores"] == len(os.sched_getaffinity(0))
    m = re.search(rf"max \|server - hf\| sentence sum = {NUM}", run.stdout)
    assert m and float(m.group(1)) < 2e-4, run.stdout
    m = re.search(rf"ratio server / hf: {NUM}x", run.stdout)
    assert m and float(m.group(1)) == pytest.approx(res["ratio"], abs=0.006), run.stdout


def test_op_overhead(runs):
    run = runs["op_overhead"].result()
    run.check()
    res = run.result
    assert res["tokens"] == 4 * 32
    med = res["median_s"]
    lines = {m.group(1): (float(m.group(2)), float(m.group(3)), float(m.group(4))) for m in re.finditer(
        rf"^\s+(off|on|mixed)\s+{NUM} ms\s+{NUM} tok/s\s+ratio to off {NUM}$", run.stdout, re.M)}
    assert set(lines) == {"off", "on", "mixed"}, run.stdout
    for cond, (ms, tok_s, ratio) in lines.items():
        assert finite_positive(med[cond]) and finite_positive(tok_s) and finite_positive(ratio)
        assert ms == pytest.approx(med[cond] * 1000, abs=0.06)
        assert ratio == pytest.approx(med["off"] / med[cond], abs=0.0006)
    assert lines["off"][2] == 1.0
    assert all(finite_positive(v) for v in res["op_us"].values())


def test_discovery_speed(runs):
    run = runs["discovery_speed"].result()
    run.check()
    res = run.result
    assert 0 < res["tokens_per_pass"] <= 1024
    for k in ("plain_tok_per_s", "observed_tok_per_s", "observed_incl_collect_tok_per_s",
              "throughput_ratio", "throughput_ratio_incl_collect"):
        assert finite_positive(res[k]), (k, res[k])
    assert res["throughput_ratio"] == pytest.approx(res["observed_tok_per_s"] / res["plain_tok_per_s"])
    assert res["kernel"] == "auto" and set(res["kernels"]) == {"torch", "auto"}
    for kernel, r in res["kernels"].items():
        assert r["observed_tok_per_s"] == pytest.approx(
            res["tokens_per_pass"] / statistics.median(r["observed_s"]))
        m = re.search(rf"observed, {kernel}\s+{NUM} tok/s .* ratio {NUM}  ", run.stdout)
        assert m and float(m.group(2)) == pytest.approx(r["throughput_ratio"], abs=0.0006), run.stdout
    assert res["throughput_ratio"] == res["kernels"]["auto"]["throughput_ratio"]
    for label in ("small", "large", "plain_large"):
        assert finite_positive(res["memory"][label]["peak_rss_mb"])


SPEED_KEYS = ("served_tok_s", "offline_tok_s", "hf_tok_s", "roofline_tok_s", "full_blimp_minutes")


def test_scoring_speed(runs, model_dir):
    """Every dtype this machine runs (bfloat16 too where the CPU has bf16 units), every
    side, numbers that agree."""
    from eval.data import load_blimp
    from eval.tokenizers import LocalTokenizer

    run = runs["scoring_speed"].result()
    run.check()
    res = run.result
    assert res["settings"]["reps"] == 1 and res["settings"]["pairs"] == PAIRS
    assert res["settings"]["sides"] == ["roofline", "hf", "offline", "served"]
    cpu_flags = set(" ".join(line.partition(":")[2] for line in Path("/proc/cpuinfo").read_text().splitlines()
                             if line.startswith("flags")).split())
    assert res["machine"]["cpu"] and res["machine"]["flags"] == {
        f: f in cpu_flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")}
    assert res["machine"]["affinity"] == len(os.sched_getaffinity(0))
    assert all(res["machine"]["versions"][k] for k in ("torch", "vllm", "transformers"))
    # the sentences scored: recount the tokens with the local tokenizer (same tiny model)
    paradigms = res["settings"]["paradigms"]
    per = PAIRS // len(paradigms)
    pairs = [p for par in paradigms for p in load_blimp(paradigms=[par], allow_hub=False)[:per]]
    texts = [t for p in pairs for t in (p.good, p.bad)]
    tokens = sum(1 + len(ids) for ids in LocalTokenizer(model_dir).encode_batch(texts))
    info = res["models"]["tiny-llama"]
    assert info["tokens"] == tokens and finite_positive(info["flops_per_token"])
    assert info["flops_per_token"] == pytest.approx(sum(info["terms"].values()))
    assert set(res["results"]) == {"tiny-llama"}
    bf16_units = "avx512_bf16" in cpu_flags or "amx_bf16" in cpu_flags
    assert set(res["results"]["tiny-llama"]) == ({"float32", "bfloat16"} if bf16_units else {"float32"})
    for dtype, r in res["results"]["tiny-llama"].items():
        for k in SPEED_KEYS:
            assert finite_positive(r[k]), (dtype, k, r[k])
        assert r["tokens"] == tokens
        # served, offline and transformers returned the same number of log-probs
        assert r["scored_tokens"] == {"hf": tokens - len(texts), "offline": tokens - len(texts),
                                      "served": tokens - len(texts)}, (dtype, r["scored_tokens"])
        med = r["median_s"]
        for side in ("served", "offline", "hf"):
            assert r[f"{side}_tok_s"] == pytest.approx(tokens / med[side])
            assert r["reps"]["times_s"][side] == [med[side]]
        assert r["roofline_tok_s"] == pytest.approx(r["roofline_gflops"] * 1e9 / info["flops_per_token"])
        assert r["full_blimp_minutes"] == pytest.approx(67_000 * tokens / PAIRS / r["served_tok_s"] / 60)
        q = r["ratios"]
        assert q["served_over_offline"] == pytest.approx(r["served_tok_s"] / r["offline_tok_s"])
        assert q["served_over_hf"] == pytest.approx(r["served_tok_s"] / r["hf_tok_s"])
        assert q["offline_over_roofline"] == pytest.approx(r["offline_tok_s"] / r["roofline_tok_s"])
        [roof] = r["reps"]["roofline"]
        assert roof["best_gflops"] == pytest.approx(max(v for d in roof["gflops"].values() for v in d.values()))
        assert {"torch.matmul", "F.linear"} <= set(roof["gflops"])
        if dtype == "float32":  # same model, same log-probs on every side
            assert max(r["logprob_max_abs_diff_vs_offline"].values()) < 2e-4, r["logprob_max_abs_diff_vs_offline"]
        m = re.search(rf"^tiny-llama\s+{dtype}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}", run.stdout, re.M)
        assert m, run.stdout
        assert float(m.group(5)) == pytest.approx(r["served_tok_s"], abs=0.6)
        assert float(m.group(6)) == pytest.approx(q["served_over_offline"], abs=0.006)


def test_levers(runs):
    """Every engine configuration scores the same sums (float32: the levers change no
    value), and logprobs 0 answers with less JSON than logprobs 1."""
    run = runs["levers"].result()
    run.check()
    res = run.result
    assert res["sentences"] == 2 * PAIRS and res["tokens"] > res["sentences"]
    assert [r["config"] for r in res["engine"]] == ["vllm", "+cpu_rms_norm", "+batched_logprobs", "vllm"]
    for r in res["engine"]:
        assert finite_positive(r["tok_s"]) and len(r["times_s"]) == 1
        assert r["max_sum_diff_vs_first"] < 1e-3
        assert r["tok_s"] == pytest.approx(res["tokens"] / r["times_s"][0])
    assert res["engine"][0]["ratio"] == 1.0
    by = {(r["logprobs"], r["batch_size"]): r for r in res["request"]}
    assert set(by) == {(1, 4), (1, 16), (0, 4), (0, 16)}
    for bs in (4, 16):
        assert by[0, bs]["response_bytes"] < by[1, bs]["response_bytes"]
    assert re.search(rf"\+batched_logprobs +{NUM} tok/s", run.stdout), run.stdout


def test_lm_eval_backend(runs):
    """lm_eval's own requests (8 offline tasks, 2 documents each) through both lm_eval
    classes against one server: the same answers, and ratio and rates that agree with the
    medians they come from."""
    run = runs["lm_eval_backend"].result()
    run.check()
    res = run.result
    med = res["median_s"]
    assert set(med) == {"local-completions", "negablate"} and all(finite_positive(v) for v in med.values())
    assert res["ratio"] == pytest.approx(med["local-completions"] / med["negablate"])
    # 8 tasks x 2 documents: 2-4 choices each, LAMBADA 1 (at least 8 x 2, at most 8 x 2 x 4)
    assert 16 < res["n_requests"] < 64
    assert res["max_abs_diff"] < 1e-4 and res["is_greedy_disagreements"] == 0
    m = re.search(rf"ratio local-completions / negablate: {NUM}x", run.stdout)
    assert m and float(m.group(1)) == pytest.approx(res["ratio"], abs=0.006), run.stdout


def test_pair_endpoints(runs):
    """BLiMP and TSE pairs (one per paradigm and test) through the echo and the route: the
    same sums and decisions, fewer positions computed by the route, recomputed here from
    the data with the model's tokenizer; ratio and rates agree with their medians."""
    from eval.continuations import plan
    from eval.data import load_blimp, load_tse, stratified_subsample
    from eval.tokenizers import LocalTokenizer

    run = runs["pair_endpoints"].result()
    run.check()
    res = run.result
    med = res["median_s"]
    assert set(med) == {"completions", "route"} and all(finite_positive(v) for v in med.values())
    assert res["ratio"] == pytest.approx(med["completions"] / med["route"])
    chosen = stratified_subsample(load_blimp(allow_hub=False), 1, 0) + stratified_subsample(load_tse(), 1, 0)
    assert res["n_pairs"] == len(chosen) == 67 + 22 and res["n_sentences"] == 2 * len(chosen)
    tok = LocalTokenizer(res["model"])
    seqs = [[tok.start_token_id, *ids] for ids in tok.encode_batch([t for p in chosen for t in (p.good, p.bad)])]
    assert res["positions"] == sum(len(s) - 1 for s in seqs)
    computed = sum(len(s) - st for k in range(0, len(seqs), 64)
                   for s, st in zip(seqs[k:k + 64], plan(seqs[k:k + 64])) if st is not None)
    assert res["positions_computed_by_route"] == computed < 0.95 * res["positions"]
    assert res["max_abs_diff"] < 1e-4 and res["decisions_differing"] == 0
    m = re.search(rf"ratio completions / route: {NUM}x", run.stdout)
    assert m and float(m.group(1)) == pytest.approx(res["ratio"], abs=0.006), run.stdout
