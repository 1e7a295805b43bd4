"""Ablated scoring throughput: our server vs reference-style batched ``transformers``, same cores.

    .venv/bin/python bench/server_vs_hf.py                       # tiny random Llama
    .venv/bin/python bench/server_vs_hf.py --pairs 400 --reps 5 --json /tmp/svh.json
    .venv/bin/python bench/server_vs_hf.py --model ~/.cache/negablate/models/smollm2-135m

Both sides score the same BLiMP sentences (the first ``--pairs / len(--paradigms)``
pairs of each paradigm, good and bad sentence) as the same token ids (start token +
``tokens(sentence)``, tokenized once, outside the timings) with the same neuron set
applied: a seeded random set of ``--percent`` % of each layer's neurons, mode
``--mode`` (default ``negative``, the paper's intervention).

* ``server``: ``negablate serve`` (``ServerProcess``) with the set loaded, asked for
  ``BASE@SET`` through ``eval.scoring.CompletionsScorer`` (cache off; ``--batch-size``
  sentences per request, ``--concurrency`` requests in flight; float32, eager). Timed:
  the ``score_ids`` call (HTTP, JSON, parsing included).
* ``hf``: what the paper's reference code does: right-padded batches of ``--hf-batch-size``
  sentences through ``AutoModelForCausalLM`` (float32, ``torch.inference_mode``,
  attention mask), ``log_softmax`` over the vocabulary, ``gather`` of the next tokens,
  masked sum per sentence. The ablation is ``vllm_negablate.oracle``'s forward-pre-hooks
  on each MLP's activation module (the clamp written the obvious way).

Cores: the HF side runs in this process with ``torch.set_num_threads(cores)``; the
server's CPU worker gets the same cores through ``VLLM_CPU_OMP_THREADS_BIND`` (vLLM
keeps one core for its scheduler by default; ``--no-bind-all-cores`` keeps that). The
sides alternate, one untimed warm-up each, so only one computes at a time; the server's
CPU time during the HF passes is measured and printed to show it really stays idle.

Check: the per-sentence sums of log-probs of the two sides must agree (max abs diff
printed; fp32, expected ~1e-5 on the tiny model), and the ablation must move them by
far more than that (mean |ablated - plain| from an untimed plain HF pass).

Besides wall time, the CPU seconds of every process are measured (the server's API
process, engine core and worker, and this process as its client, during a server pass;
this process during an HF pass): per-token CPU cost, and a CPU-time ratio that is less
sensitive to other jobs on a shared machine than the wall-time ratio.

What it shows (measured, AMD EPYC with avx512_bf16 (no AMX), 2 cores, float32, quiet machine):

* SmolLM2-135M (30 layers x 1,536), 200 pairs = 400 sentences, 4,010 tokens, 1 % set:
  server 243 tok/s, HF 194 tok/s (batch 128, 29 % of its positions are padding):
  **1.25x** wall, 1.18x CPU time; max |sum difference| 1.8e-4.
* tiny Llama (2 layers x 128): server 4,500 tok/s, HF 21,600 tok/s: 0.21x.

Why the server is not 2x faster here: fp32 scoring of a 135M model on a CPU is bound by
its matrix multiplies, and both sides do the same multiplies per real token (worker
7.8 CPU-ms/token, HF 9.6 CPU-ms per real token = 6.8 per computed position). The
server's gain is the padding it never computes (vLLM packs variable-length sequences)
and a bit of fusion; its cost is per-token work that HF does not do: the prompt-logprob
path (log-softmax, top-1 and the rank of each prompt token over the vocabulary, then
detokenizing it) and the API server's JSON echo of every token, ~0.4 CPU-ms/token in all
(measured on the tiny model, whose forward pass costs almost nothing, which is why the
server loses there). The idle vLLM worker also polls (~0.2 of a core while HF runs),
which slows the HF side slightly: the HF numbers are, if anything, pessimistic. The
server's strengths (continuous batching across many clients, different neuron sets
within one batch, GPU kernels) do not show in a single-client fp32 CPU comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import add_common_args, bench_model, blimp_pairs, log  # noqa: E402  (also: offline env, repo on sys.path)

SERVED = "bench"
SET_NAME = "benchset"


def hf_sums(model, seqs: list[list[int]], batch_size: int, pad_id: int) -> list[float]:
    """Summed log-probs of each sequence (its first token not predicted), reference style."""
    import torch

    out: list[float] = []
    with torch.inference_mode():
        for i in range(0, len(seqs), batch_size):
            batch = seqs[i:i + batch_size]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, s in enumerate(batch):
                ids[j, :len(s)] = torch.tensor(s)
                mask[j, :len(s)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            picked = logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)
            out += (picked.double() * mask[:, 1:]).sum(-1).tolist()
    return out


def server_sums(scorer, seqs: list[list[int]]) -> list[float]:
    return [math.fsum(v for v in lp[1:] if v is not None) for lp in scorer.score_ids(seqs)]


def tree_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of a process and its children, by process name
    (``VLLM::Worker``, ``VLLM::EngineCore``, the API server ``python``)."""
    import psutil

    out: dict[str, float] = {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        try:
            name = "api_server" if p.pid == pid else p.name()
            t = p.cpu_times()
            out[name] = out.get(name, 0.0) + t.user + t.system
        except psutil.Error:
            pass
    return out


def cpu_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--percent", type=float, default=1.0, help="%% of each layer's neurons in the set")
    parser.add_argument("--mode", default="negative", choices=["negative", "positive", "both"])
    parser.add_argument("--batch-size", type=int, default=32, help="server: sentences per request")
    parser.add_argument("--concurrency", type=int, default=4, help="server: requests in flight")
    parser.add_argument("--hf-batch-size", type=int, default=128,
                        help="HF: sentences per padded batch (the reference's eval_blimp default: 128)")
    args = parser.parse_args()

    from server.launcher import ServerProcess, exit_on_sigterm
    from vllm_negablate.offline import bind_worker_to_all_cores

    cores = sorted(os.sched_getaffinity(0))
    if not args.no_bind_all_cores:
        bind_worker_to_all_cores()
    binding = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "vLLM default (one core kept back)")

    import torch

    from eval.scoring import CompletionsScorer
    from vllm_negablate.oracle import HFAblationOracle
    from vllm_negablate.testing.sets import random_set

    exit_on_sigterm()  # a kill of this script still stops its server (finally below)

    torch.set_num_threads(len(cores))
    work = Path(tempfile.mkdtemp(prefix="negablate-bench-svh-"))
    model, start = bench_model(args.model, work)
    paradigms, pairs = blimp_pairs(args.paradigms, args.pairs)
    ns = random_set(model, SET_NAME, args.mode, fraction=args.percent / 100, seed=0)
    (work / "sets").mkdir()
    ns.save(work / "sets" / f"{SET_NAME}.json")

    server = ServerProcess(model, "--neuron-sets", str(work / "sets"), log_path=work / "server.log",
                           served_name=SERVED, kv_cache_bytes=args.kv_cache_mb * 2**20, max_model_len=512)
    log("starting the server ...")
    t0 = time.perf_counter()
    server.start(timeout=900)
    start_s = time.perf_counter() - t0
    log(f"server up after {start_s:.0f} s; loading the HF model ...")
    times: dict[str, list[float]] = {"server": [], "hf": []}
    idle_cpu: list[float] = []  # the server's CPU seconds while HF computes (should be ~0)
    busy_cpu: list[dict[str, float]] = []  # CPU seconds per process during a server pass
    hf_cpu: list[float] = []  # this process's CPU seconds during an HF pass
    try:
        with CompletionsScorer(server.url, f"{SERVED}@{SET_NAME}", tokenizer=model, cache=False,
                               progress=False, start_token=start, batch_size=args.batch_size,
                               concurrency=args.concurrency) as scorer:
            # the reference's order: per paradigm, all good sentences, then all bad ones
            texts = [t for par in paradigms for side in ("good", "bad")
                     for t in (getattr(p, side) for p in pairs if p.paradigm == par)]
            seqs = scorer.encode_batch(texts)
            oracle = HFAblationOracle(model)
            pad_id = oracle.model.config.pad_token_id
            pad_id = 0 if pad_id is None else int(pad_id)
            # untimed warm-ups; the plain HF pass measures how much the set moves the sums
            got_server = server_sums(scorer, seqs)
            plain = hf_sums(oracle.model, seqs, args.hf_batch_size, pad_id)
            with oracle.ablated(ns):
                got_hf = hf_sums(oracle.model, seqs, args.hf_batch_size, pad_id)
            log("warm-ups done")
            diffs = [abs(a - b) for a, b in zip(got_server, got_hf, strict=True)]
            for rep in range(args.reps):  # alternating, so drift hits both alike
                cpu0, own0 = tree_cpu(server.proc.pid), time.process_time()
                t = time.perf_counter()
                got_server = server_sums(scorer, seqs)
                times["server"].append(time.perf_counter() - t)
                busy_cpu.append({**cpu_delta(tree_cpu(server.proc.pid), cpu0),
                                 "client": time.process_time() - own0})
                cpu0, own0 = tree_cpu(server.proc.pid), time.process_time()
                t = time.perf_counter()
                with oracle.ablated(ns):
                    got_hf = hf_sums(oracle.model, seqs, args.hf_batch_size, pad_id)
                times["hf"].append(time.perf_counter() - t)
                hf_cpu.append(time.process_time() - own0)
                idle_cpu.append(sum(cpu_delta(tree_cpu(server.proc.pid), cpu0).values()))
                diffs += [abs(a - b) for a, b in zip(got_server, got_hf, strict=True)]
                log(f"rep {rep + 1}/{args.reps}: server {times['server'][-1]:.2f} s, "
                    f"hf {times['hf'][-1]:.2f} s")
    finally:
        server.stop()

    fp = ns.model
    n_pairs, n_seqs = len(pairs), len(seqs)
    tokens = sum(map(len, seqs))
    med = {k: statistics.median(v) for k, v in times.items()}
    tok_s = {k: tokens / v for k, v in med.items()}
    pairs_s = {k: n_pairs / v for k, v in med.items()}
    ratio = med["hf"] / med["server"]
    max_diff = max(diffs)
    effect = statistics.fmean(abs(a - b) for a, b in zip(got_hf, plain, strict=True))
    pad_frac = 1 - tokens / sum(
        max(map(len, seqs[i:i + args.hf_batch_size])) * len(seqs[i:i + args.hf_batch_size])
        for i in range(0, n_seqs, args.hf_batch_size))

    print(f"model: {model} ({fp.architecture}, {fp.num_layers} layers x {fp.intermediate_size}), float32")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
          f"(affinity {len(cores)}); HF torch threads {torch.get_num_threads()}; "
          f"server worker VLLM_CPU_OMP_THREADS_BIND={binding}")
    print(f"server start: {start_s:.1f} s")
    print(f"set: {ns.num_neurons() // fp.num_layers} neurons/layer ({args.percent}%), mode {args.mode}; "
          f"{n_pairs} pairs = {n_seqs} sentences, {tokens} tokens; median of {args.reps}, alternating")
    print(f"  server  batch {args.batch_size}, concurrency {args.concurrency}: {med['server']:7.2f} s "
          f"{tok_s['server']:9.0f} tok/s {pairs_s['server']:8.1f} pairs/s")
    print(f"  hf      batch {args.hf_batch_size} (padding {pad_frac:.0%} of positions):  "
          f"{med['hf']:7.2f} s {tok_s['hf']:9.0f} tok/s {pairs_s['hf']:8.1f} pairs/s")
    print(f"  ratio server / hf: {ratio:.2f}x")
    busy = {k: statistics.median(d.get(k, 0.0) for d in busy_cpu) for k in busy_cpu[0]}
    busy_total = statistics.median(sum(d.values()) for d in busy_cpu)
    print("  CPU seconds per server pass (median): "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(busy.items(), key=lambda kv: -kv[1]) if v >= 0.005)
          + f"; per HF pass: {statistics.median(hf_cpu):.2f}")
    cpu_ratio = statistics.median(hf_cpu) / busy_total
    print(f"  CPU ms per token: server {1000 * busy_total / tokens:.2f} "
          f"(worker {1000 * busy.get('VLLM::Worker', 0.0) / tokens:.2f}), "
          f"hf {1000 * statistics.median(hf_cpu) / tokens:.2f}; CPU-time ratio hf / server "
          f"{cpu_ratio:.2f}x (less sensitive to other load on the machine)")
    print(f"  server CPU while HF ran: {statistics.median(idle_cpu):.2f} s per pass "
          f"(HF pass {med['hf']:.2f} s wall)")
    print(f"  log-prob check: max |server - hf| sentence sum = {max_diff:.3e} over "
          f"{len(diffs)} sums; ablation moves sums by mean {effect:.3e}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": str(model), "architecture": fp.architecture, "num_layers": fp.num_layers,
            "intermediate_size": fp.intermediate_size, "cores": len(cores),
            "hf_threads": torch.get_num_threads(), "cpu_bind": binding, "server_start_s": start_s,
            "set": {"percent": args.percent, "mode": args.mode, "neurons": ns.num_neurons()},
            "n_pairs": n_pairs, "n_sentences": n_seqs, "tokens": tokens, "reps": args.reps,
            "settings": {"server": {"batch_size": args.batch_size, "concurrency": args.concurrency},
                         "hf": {"batch_size": args.hf_batch_size, "padding_fraction": pad_frac}},
            "times_s": times, "median_s": med, "tokens_per_s": tok_s, "pairs_per_s": pairs_s,
            "ratio": ratio, "server_cpu_during_hf_s": idle_cpu, "cpu_during_server_pass_s": busy_cpu, "hf_cpu_s": hf_cpu,
            "cpu_ratio": cpu_ratio,
            "logprob_max_abs_diff": max_diff, "ablation_mean_abs_effect": effect,
        }, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
