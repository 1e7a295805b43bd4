"""lm_eval's log-likelihood requests: ``local-completions`` vs ``negablate``, same server.

    .venv/bin/python bench/lm_eval_backend.py                       # tiny random Llama
    .venv/bin/python bench/lm_eval_backend.py --model ~/.cache/negablate/models/gemma-3-270m \\
        --limit 20 --reps 3 --json /tmp/lmb.json

The requests are lm_eval's own: the eight offline tasks of the double dissociation
(``nongrammatical_local``: PIQA, ARC-Easy/Challenge, WinoGrande, SciQ, LAMBADA,
OpenBookQA, BoolQ), their first ``--limit`` documents each, built by lm_eval's
``TaskManager`` from the YAMLs ``negablate analyze tasks`` generates. Both sides are
lm_eval model objects timed in ``TemplateLM.loglikelihood`` (tokenizing, every request,
parsing), with what ``negablate analyze tasks`` passes (batch 16, one call in flight,
BOS first, the model's start token for empty contexts):

* ``local-completions``: lm_eval's own class, ``/v1/completions`` with ``echo``: the
  engine computes the LM head and log-softmax at every prompt position;
* ``negablate`` (:mod:`eval.lm_eval_tasks.negablate_lm`, the default of ``analyze
  tasks``): ``/v1/negablate/loglikelihood``, only the continuation's rows.

One ``negablate serve`` answers both, alternating, after one untimed warm-up of each;
medians of ``--reps``. Every answer is compared: the largest log-likelihood difference
and the number of ``is_greedy`` disagreements are printed beside the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import REPO, bench_model, log, machine_facts  # noqa: F401  (REPO: sys.path)

SERVED = "bench"
BACKENDS = ("local-completions", "negablate")


def lm_eval_requests(tasks: str, limit: int, work: Path) -> list:
    """lm_eval ``Instance`` objects of every loglikelihood request of ``tasks``' first
    ``limit`` documents (the tasks' YAMLs generated offline, as ``analyze tasks`` does)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from eval.lm_eval_tasks.local import build_include_path

    include, _ = build_include_path([t for t in tasks.split(",") if t], [], work / "tasks")
    manager = TaskManager(include_path=str(include), include_defaults=False)
    instances = []
    for task in _leaves(get_task_dict(tasks.split(","), manager)):
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        instances += [i for i in task.instances if i.request_type == "loglikelihood"]
    return instances


def _leaves(task_dict: dict) -> list:
    out = []
    for value in task_dict.values():
        out += _leaves(value) if isinstance(value, dict) else [value]
    return out


def context_length(model: Path) -> int:
    """2,048 tokens (lm_eval's default ``max_length``), or less if the model has less."""
    config = json.loads((model / "config.json").read_text())
    config = config.get("text_config", config)
    return min(2048, int(config.get("max_position_embeddings", 2048)))


def make_lm(backend: str, url: str, model: Path, start: int | None, max_len: int):
    import eval.lm_eval_tasks.negablate_lm  # noqa: F401  (registers "negablate")
    from lm_eval.api.registry import get_model

    args = dict(model=SERVED, base_url=f"{url}/v1/completions", tokenizer_backend="huggingface",
                tokenizer=str(model), num_concurrent=1, max_retries=3, add_bos_token=True,
                batch_size=16, max_length=max_len, timeout=600)
    if start is not None:
        args["custom_prefix_token_id"] = start
    return get_model(backend)(**args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF model dir (default: a tiny random Llama)")
    parser.add_argument("--tasks", default="nongrammatical_local", help="lm_eval tasks or groups, comma-separated")
    parser.add_argument("--limit", type=int, default=10, help="first N documents of each task")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-mb", type=int, default=1024)
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-ups (smoke tests)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    from server.launcher import ServerProcess, exit_on_sigterm
    from vllm_negablate.offline import bind_worker_to_all_cores

    exit_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="negablate-bench-lmb-"))
    model, start = bench_model(args.model, work)
    bind_worker_to_all_cores()
    requests = lm_eval_requests(args.tasks, args.limit, work)
    log(f"{len(requests)} loglikelihood requests from {args.tasks}, first {args.limit} documents each")
    max_len = context_length(model)
    server = ServerProcess(model, log_path=work / "server.log", served_name=SERVED, dtype=args.dtype,
                           kv_cache_bytes=args.kv_cache_mb * 2**20, max_model_len=max_len)
    log("starting the server ...")
    server.start(timeout=900)
    times: dict[str, list[float]] = {b: [] for b in BACKENDS}
    answers: dict[str, list] = {}
    try:
        lms = {b: make_lm(b, server.url, model, start, max_len) for b in BACKENDS}
        for rep in range(-1 if not args.no_warmup else 0, args.reps):  # -1: the warm-up
            for backend, lm in lms.items():
                t0 = time.perf_counter()
                got = lm.loglikelihood(requests, disable_tqdm=True)
                if rep >= 0:
                    times[backend].append(time.perf_counter() - t0)
                answers[backend] = got
            if rep >= 0:
                log(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{b} {times[b][-1]:.1f} s" for b in BACKENDS))
    finally:
        server.stop()

    med = {b: statistics.median(v) for b, v in times.items()}
    ratio = med["local-completions"] / med["negablate"]
    pairs = list(zip(answers["local-completions"], answers["negablate"], strict=True))
    max_diff = max(abs(a[0] - b[0]) for a, b in pairs)
    greedy_disagree = sum(a[1] != b[1] for a, b in pairs)
    tokens = sum(len(r.args[0]) + len(r.args[1]) for r in requests)  # characters, for scale
    print(f"model: {model} (served as {SERVED!r}, {args.dtype})")
    print(f"{len(requests)} lm_eval loglikelihood requests ({args.tasks}, first {args.limit} documents each, "
          f"{tokens:,} characters), median of {args.reps}, alternating")
    for b in BACKENDS:
        print(f"  {b:<18} {med[b]:8.2f} s  {len(requests) / med[b]:7.1f} requests/s")
    print(f"  ratio local-completions / negablate: {ratio:.2f}x")
    print(f"  answers: max |log-likelihood difference| {max_diff:.2e}, is_greedy disagreements {greedy_disagree}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": str(model), "dtype": args.dtype, "tasks": args.tasks, "limit": args.limit,
            "n_requests": len(requests), "reps": args.reps, "times_s": times, "median_s": med,
            "ratio": ratio, "max_abs_diff": max_diff, "is_greedy_disagreements": greedy_disagree,
            "machine": machine_facts(),
        }, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
