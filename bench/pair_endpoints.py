"""Minimal pairs through the harness: ``/v1/completions`` echo vs the continuation route.

    .venv/bin/python bench/pair_endpoints.py                       # tiny random Llama
    .venv/bin/python bench/pair_endpoints.py --model ~/.cache/negablate/models/gemma-3-270m \\
        --blimp-per-paradigm 3 --tse-per-test 6 --reps 3 --json /tmp/pe.json

What ``negablate reproduce`` scores (BLiMP and the 22 TSE tests, a stratified subsample
of each, both sentences of every pair), through :class:`eval.scoring.CompletionsScorer`
as the harness runs it (64 sentences a request, 2 in flight, no cache):

* ``completions``: the echo; the engine computes the LM head and log-softmax at every
  position of every sentence;
* ``route`` (the default against ``negablate serve``): ``/v1/negablate/loglikelihood``,
  the second sentence's rows shared with the first copied (:mod:`eval.continuations`).

One ``negablate serve`` answers both, alternating, after one untimed warm-up of each;
medians of ``--reps``. Every sentence is compared: the largest summed log-prob difference
and the pairs whose decision (BLiMP: sums; TSE: means) differs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import REPO, bench_model, log, machine_facts  # noqa: F401  (REPO: sys.path)

SERVED = "bench"
ENDPOINTS = ("completions", "route")


def pairs(blimp_per_paradigm: int, tse_per_test: int) -> list:
    from eval.data import load_blimp, load_tse, stratified_subsample

    return (stratified_subsample(load_blimp(allow_hub=False), blimp_per_paradigm, 0)
            + stratified_subsample(load_tse(), tse_per_test, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF model dir (default: a tiny random Llama)")
    parser.add_argument("--blimp-per-paradigm", type=int, default=2)
    parser.add_argument("--tse-per-test", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-mb", type=int, default=1024)
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-ups (smoke tests)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    from eval.continuations import plan
    from eval.scoring import CompletionsScorer
    from server.launcher import ServerProcess, exit_on_sigterm
    from vllm_negablate.offline import bind_worker_to_all_cores

    exit_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="negablate-bench-pe-"))
    model, start = bench_model(args.model, work)
    bind_worker_to_all_cores()
    chosen = pairs(args.blimp_per_paradigm, args.tse_per_test)
    server = ServerProcess(model, log_path=work / "server.log", served_name=SERVED, dtype=args.dtype,
                           kv_cache_bytes=args.kv_cache_mb * 2**20, max_model_len=256)  # sentences are short
    log(f"{len(chosen)} pairs; starting the server ...")
    server.start(timeout=900)
    times: dict[str, list[float]] = {e: [] for e in ENDPOINTS}
    scores: dict[str, list] = {}
    try:
        scorers = {e: CompletionsScorer(server.url, f"{SERVED}@none", tokenizer=model, start_token=start,
                                        cache=False, progress=False, concurrency=2,
                                        endpoint="completions" if e == "completions" else "auto")
                   for e in ENDPOINTS}
        seqs = scorers["completions"].encode_batch([t for p in chosen for t in (p.good, p.bad)])
        for rep in range(-1 if not args.no_warmup else 0, args.reps):  # -1: the warm-up
            for endpoint, scorer in scorers.items():
                t0 = time.perf_counter()
                got = scorer.score_ids(seqs)
                if rep >= 0:
                    times[endpoint].append(time.perf_counter() - t0)
                scores[endpoint] = got
            if rep >= 0:
                log(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{e} {times[e][-1]:.1f} s" for e in ENDPOINTS))
        used = scorers["route"].describe()["endpoint"]
    finally:
        server.stop()

    def sums(rows):
        return [math.fsum(x for x in r if x is not None) for r in rows]

    a, b = sums(scores["completions"]), sums(scores["route"])
    max_diff = max(abs(x - y) for x, y in zip(a, b, strict=True))
    lengths = [len(s) - 1 for s in seqs]
    flips = 0
    for i, p in enumerate(chosen):
        if p.source == "blimp":
            da, db = a[2 * i] > a[2 * i + 1], b[2 * i] > b[2 * i + 1]
        else:
            n0, n1 = lengths[2 * i], lengths[2 * i + 1]
            da, db = a[2 * i] / n0 > a[2 * i + 1] / n1, b[2 * i] / n0 > b[2 * i + 1] / n1
        flips += da != db
    rows = sum(lengths)
    # rows the route computes, batch by batch as the scorer sends them (64 a request)
    routed = 0
    for k in range(0, len(seqs), 64):
        batch = seqs[k:k + 64]
        routed += sum(len(s) - st for s, st in zip(batch, plan(batch)) if st is not None)
    med = {e: statistics.median(v) for e, v in times.items()}
    ratio = med["completions"] / med["route"]
    print(f"model: {model} (served as {SERVED!r}, {args.dtype}); route: {used}")
    print(f"{len(chosen)} pairs ({args.blimp_per_paradigm} per BLiMP paradigm, {args.tse_per_test} per TSE test), "
          f"{len(seqs)} sentences, {rows:,} scored positions; the route computes {routed:,} "
          f"({routed / rows:.1%}); median of {args.reps}, alternating")
    for e in ENDPOINTS:
        print(f"  {e:<12} {med[e]:8.2f} s  {len(seqs) / med[e]:7.1f} sentences/s")
    print(f"  ratio completions / route: {ratio:.2f}x")
    print(f"  answers: max |summed log-prob difference| {max_diff:.2e}, decisions differing {flips}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": str(model), "dtype": args.dtype, "blimp_per_paradigm": args.blimp_per_paradigm,
            "tse_per_test": args.tse_per_test, "n_pairs": len(chosen), "n_sentences": len(seqs),
            "positions": rows, "positions_computed_by_route": routed, "reps": args.reps, "times_s": times,
            "median_s": med, "ratio": ratio, "max_abs_diff": max_diff, "decisions_differing": flips,
            "machine": machine_facts(),
        }, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
