"""BLiMP pairs per second: our harness vs ``lm_eval --model local-completions``, same server.

    .venv/bin/python bench/harness_vs_lm_eval.py                       # tiny random Llama
    .venv/bin/python bench/harness_vs_lm_eval.py --pairs 400 --reps 5 --json /tmp/hve.json
    .venv/bin/python bench/harness_vs_lm_eval.py --model ~/.cache/negablate/models/smollm2-135m

One ``negablate serve`` process (``ServerProcess``) answers both sides. The pairs are
the first ``--pairs / len(--paradigms)`` of each paradigm, which is what ``lm_eval
--limit`` selects, so both sides score exactly the same sentences (the same ids: start
token + ``tokens(sentence)``; ``lm_eval`` runs on the task YAMLs that
``eval.lm_eval_tasks.generate`` writes, with ``target_delimiter: ""``).

* ``ours``: a fresh ``eval.scoring.CompletionsScorer`` (cache off, so every pair is
  really scored) + ``eval.tasks.evaluate_pairs`` in this process, timed from scorer
  creation to the finished summary (tokenizing, HTTP, parsing, accuracy tables).
* ``lm_eval``: ``python -m lm_eval --model local-completions`` as a subprocess, invoked
  as ``tests/e2e/test_eval_live.py::test_lm_eval_parity`` does (offline env vars,
  ``tokenizer_backend=huggingface``, ``num_concurrent=1``, lm_eval's default batch size 1
  unless ``--lm-eval-batch-size``/``--lm-eval-concurrency`` say otherwise), through a
  small wrapper that times ``TemplateLM.loglikelihood`` (its scoring phase:
  tokenizing, all requests, parsing). Three times are kept: that scoring phase (the
  headline, the one most favourable to lm_eval), ``total_evaluation_time_seconds`` from
  its results file (adds task loading, model/tokenizer set-up, metrics) and the
  subprocess's wall time (adds interpreter start and imports).

Repetitions alternate ours / lm_eval after one untimed warm-up of each (which also
fills lm_eval's datasets cache); medians of ``--reps`` are reported. Each lm_eval run's
per-paradigm accuracy is checked against ours (lm_eval counts a tie as right; we count
it wrong, so ours is compared with ties added back).

Why ours is faster (measured, tiny Llama, 400 pairs = 800 sentences, 2 CPU cores,
same server): ours 90 pairs/s; lm_eval with its defaults 14 pairs/s in its scoring
phase (6.4x), 7.1 pairs/s by its evaluation time (12.6x), 6.6 pairs/s by wall time
(13.5x). With ``--lm-eval-batch-size 32 --lm-eval-concurrency 4`` (our settings) its
scoring phase reaches 104 pairs/s against our 111 (1.07x): the same server fed the same
way is equally fast, so the difference is *how* it is fed, plus lm_eval's fixed costs:

1. Requests. lm_eval's defaults send one sentence per request and one request at a
   time: 800 round trips of ~35 ms (cProfile: 26 of 34 s spent waiting on the socket),
   each paying the OpenAI server's request handling and an engine step for a single
   ~20-token sequence. Ours sends 25 requests of 32 sentences with 4 in flight, so the
   per-request cost is paid 32x less often and vLLM batches up to 128 sentences per step.
2. Start-up, every run: lm_eval builds its task index by parsing all ~14,000 YAML files
   of its built-in tasks (even with ``--include_path`` and a single group asked for) and
   imports ``transformers`` for the tokenizer: 20-25 s per run on an idle machine (40+ s
   under load), which is why its evaluation time is ~2x its scoring phase on 400 pairs.
   Ours tokenizes with the ``tokenizers`` library and imports no torch. This part is a
   constant, so its weight shrinks as the run grows (full BLiMP: 67,000 pairs).

Tokens, answers and log-probs are the same on both sides (the accuracy check above;
``test_lm_eval_parity`` checks the sums pair by pair).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import add_common_args, bench_model, blimp_pairs, log  # noqa: E402  (also: offline env, repo on sys.path)

SERVED = "bench"


def run_ours(url: str, model: Path, pairs, start: int | None, batch_size: int, concurrency: int):
    from eval.scoring import CompletionsScorer
    from eval.tasks import evaluate_pairs

    t0 = time.perf_counter()
    with CompletionsScorer(url, SERVED, tokenizer=model, cache=False, progress=False,
                           start_token=start, batch_size=batch_size,
                           concurrency=concurrency) as sc:
        records, summary = evaluate_pairs(sc, pairs, "blimp")
        stats = sc.stats()
    return time.perf_counter() - t0, records, summary, stats


# lm_eval's CLI, run with ``TemplateLM.loglikelihood`` timed (the scoring phase: tokenizing the
# sentences, all requests, parsing); the total is written to $NEGABLATE_LME_TIMING at exit.
_LM_EVAL_TIMED = """
import atexit, json, os, runpy, sys, time
import lm_eval.api.model as m
orig, spent = m.TemplateLM.loglikelihood, [0.0]
def timed(self, *a, **k):
    t = time.perf_counter()
    try:
        return orig(self, *a, **k)
    finally:
        spent[0] += time.perf_counter() - t
m.TemplateLM.loglikelihood = timed
atexit.register(lambda: open(os.environ["NEGABLATE_LME_TIMING"], "w").write(json.dumps(spent[0])))
sys.argv = ["lm_eval", *sys.argv[1:]]
runpy.run_module("lm_eval", run_name="__main__")
"""


def run_lm_eval(url: str, model: Path, tasks_dir: Path, work: Path, limit: int, start: int | None,
                batch_size: int, concurrency: int) -> tuple[dict[str, float], dict]:
    """One lm_eval run; returns its times (scoring phase, its own evaluation time, subprocess
    wall time) and its results."""
    out = work / "lm_out"
    shutil.rmtree(out, ignore_errors=True)
    timing = work / "lm_eval_scoring_s.json"
    timing.unlink(missing_ok=True)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(work / "hf_datasets"), "TOKENIZERS_PARALLELISM": "false",
           "NEGABLATE_LME_TIMING": str(timing)}
    model_args = (f"model={SERVED},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                  f"tokenizer={model},num_concurrent={concurrency},max_retries=3")
    if start is not None:
        model_args += f",custom_prefix_token_id={start}"
    cmd = [sys.executable, "-c", _LM_EVAL_TIMED, "--model", "local-completions", "--model_args", model_args,
           "--tasks", "negablate_blimp", "--include_path", str(tasks_dir), "--limit", str(limit),
           "--batch_size", str(batch_size), "--output_path", str(out)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"lm_eval failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    [res_file] = list(out.rglob("results_*.json"))
    res = json.loads(res_file.read_text())
    times = {"scoring": float(json.loads(timing.read_text())),
             "evaluation": float(res["total_evaluation_time_seconds"]), "wall": wall}
    return times, res["results"]


def parity(records, summary, lm_results: dict, paradigms: list[str]) -> int:
    """Largest |lm_eval correct count - (our correct + ties)| over paradigms (0 = same answers)."""
    ours = {row.group: row for row in summary.accuracy if row.level == "paradigm"}
    worst = 0
    for p in paradigms:
        ties = sum(r.tie for r in records if r.paradigm == p)
        lm_correct = round(lm_results[f"negablate_blimp_{p}"]["acc,none"] * ours[p].n)
        worst = max(worst, abs(lm_correct - (ours[p].n_correct + ties)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="ours: sentences per request")
    parser.add_argument("--concurrency", type=int, default=4, help="ours: requests in flight")
    parser.add_argument("--lm-eval-batch-size", type=int, default=1, help="lm_eval: default 1")
    parser.add_argument("--lm-eval-concurrency", type=int, default=1, help="lm_eval num_concurrent")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the untimed warm-up run of each side (smoke tests)")
    args = parser.parse_args()

    from eval.data import default_data_dir
    from eval.lm_eval_tasks.generate import generate
    from server.launcher import ServerProcess, exit_on_sigterm
    from vllm_negablate.offline import bind_worker_to_all_cores

    exit_on_sigterm()  # a kill of this script still stops its server (finally below)

    work = Path(tempfile.mkdtemp(prefix="negablate-bench-lme-"))
    model, start = bench_model(args.model, work)
    if not args.no_bind_all_cores:
        bind_worker_to_all_cores()
    binding = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "vLLM default")
    paradigms, pairs = blimp_pairs(args.paradigms, args.pairs)
    per = max(1, args.pairs // len(paradigms))  # = lm_eval --limit
    tasks_dir = work / "tasks"
    generate(default_data_dir() / "blimp", tasks_dir, paradigms)

    server = ServerProcess(model, log_path=work / "server.log", served_name=SERVED, dtype=args.dtype,
                           kv_cache_bytes=args.kv_cache_mb * 2**20, max_model_len=512)
    t0 = time.perf_counter()
    log("starting the server ...")
    server.start(timeout=900)
    start_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {"ours": [], "lm_eval": [], "lm_eval_evaluation": [], "lm_eval_wall": []}
    mismatch: list[int] = []
    try:
        log(f"server up after {start_s:.0f} s")
        if not args.no_warmup:
            # untimed warm-ups: first-request costs on the server, lm_eval's datasets cache
            _, records, summary, stats = run_ours(server.url, model, pairs, start, args.batch_size,
                                                  args.concurrency)
            _, res = run_lm_eval(server.url, model, tasks_dir, work, per, start,
                                 args.lm_eval_batch_size, args.lm_eval_concurrency)
            mismatch.append(parity(records, summary, res, paradigms))
            log("warm-ups done")
        for rep in range(args.reps):  # alternating, so drift hits both alike
            t, records, summary, stats = run_ours(server.url, model, pairs, start, args.batch_size,
                                                  args.concurrency)
            times["ours"].append(t)
            lm, res = run_lm_eval(server.url, model, tasks_dir, work, per, start,
                                  args.lm_eval_batch_size, args.lm_eval_concurrency)
            times["lm_eval"].append(lm["scoring"])
            times["lm_eval_evaluation"].append(lm["evaluation"])
            times["lm_eval_wall"].append(lm["wall"])
            mismatch.append(parity(records, summary, res, paradigms))
            log(f"rep {rep + 1}/{args.reps}: ours {t:.2f} s, lm_eval scoring {lm['scoring']:.2f} s "
                f"(its evaluation {lm['evaluation']:.2f} s, wall {lm['wall']:.2f} s)")
    finally:
        server.stop()

    n = len(pairs)
    med = {k: statistics.median(v) for k, v in times.items()}
    pps = {k: n / v for k, v in med.items()}
    ratios = {k: pps["ours"] / pps[k] for k in ("lm_eval", "lm_eval_evaluation", "lm_eval_wall")}

    print(f"model: {model} (served as {SERVED!r}, {args.dtype}), start token "
          f"{start if start is not None else 'BOS/EOS of the tokenizer'}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
          f"(affinity {len(os.sched_getaffinity(0))}), server worker VLLM_CPU_OMP_THREADS_BIND={binding}")
    print(f"server start: {start_s:.1f} s")
    print(f"{n} pairs ({per} x {len(paradigms)} paradigms), median of {args.reps}, alternating")
    print(f"  ours     batch {args.batch_size:3d}, concurrency {args.concurrency}: "
          f"{med['ours']:7.2f} s  {pps['ours']:8.1f} pairs/s  ({stats['requests']} requests)")
    print(f"  lm_eval  batch {args.lm_eval_batch_size:3d}, concurrency {args.lm_eval_concurrency}: "
          f"{med['lm_eval']:7.2f} s  {pps['lm_eval']:8.1f} pairs/s  (scoring phase: loglikelihood())")
    print(f"           its evaluation time {med['lm_eval_evaluation']:.2f} s = "
          f"{pps['lm_eval_evaluation']:.1f} pairs/s; subprocess wall {med['lm_eval_wall']:.2f} s = "
          f"{pps['lm_eval_wall']:.1f} pairs/s")
    print(f"  ratio ours / lm_eval: {ratios['lm_eval']:.2f}x (scoring phase); "
          f"{ratios['lm_eval_evaluation']:.2f}x (its evaluation time); "
          f"{ratios['lm_eval_wall']:.2f}x (wall)")
    print(f"  accuracy parity: max |lm_eval correct - (ours correct + ties)| per paradigm = "
          f"{max(mismatch)} pairs over {len(mismatch)} runs")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": str(model), "dtype": args.dtype, "n_pairs": n, "paradigms": paradigms,
            "pairs_per_paradigm": per, "reps": args.reps, "cpu_bind": binding,
            "server_start_s": start_s,
            "settings": {"ours": {"batch_size": args.batch_size, "concurrency": args.concurrency},
                         "lm_eval": {"batch_size": args.lm_eval_batch_size,
                                     "concurrency": args.lm_eval_concurrency}},
            "times_s": times, "median_s": med, "pairs_per_s": pps, "ratio": ratios["lm_eval"],
            "ratio_evaluation": ratios["lm_eval_evaluation"], "ratio_wall": ratios["lm_eval_wall"],
            "parity_max_mismatch": max(mismatch),
        }, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
