"""Scoring speed, side by side: GEMM roofline, batched ``transformers``, vLLM offline, ``negablate serve``.

    .venv/bin/python bench/scoring_speed.py --tiny --reps 1 --pairs 8 --json /tmp/ss.json   # smoke
    .venv/bin/python bench/scoring_speed.py --json docs/results/bench/scoring_speed.json      # quiet cores

For each ``--model`` (default: the two embedded models, ``gemma-3-270m`` and
``smollm2-135m``, fetched with :func:`vllm_negablate.models.resolve_model`) and each
``--dtype`` (default float32, and bfloat16 where the machine runs it: not on a CPU
without bf16 units, which the project refuses it on), the same BLiMP sentences (the first
``--pairs / len(--paradigms)`` pairs of each paradigm, good and bad sentence) are scored
as the same token ids (start token + ``tokens(sentence)``, tokenized once, outside the
timings), unablated (plugin loaded, no neuron set), four ways:

* ``roofline``: the cores' GEMM peak. Timed: ``[T x K] @ [K x N]`` products in the dtype on
  all cores (``torch.set_num_threads(cores)``), for the model's own shapes with
  ``T = --gemm-tokens`` rows (attention in-projection ``hidden -> q + 2 kv``, MLP
  up ``hidden -> intermediate`` and down ``intermediate -> hidden``) and a square
  ``--gemm-square``^3, through three kernels: ``torch.matmul`` (MKL for fp32, oneDNN for
  bf16), ``torch.nn.functional.linear`` (what ``nn.Linear`` in transformers calls) and
  ``torch.ops.mkldnn._linear_pointwise`` on a prepacked weight (torch's oneDNN path, as
  inductor uses it; vLLM's own ``onednn_mm`` is a private vLLM op, left out). Each
  (kernel, shape) runs once untimed, then repeatedly for at least ``--gemm-min-time``
  seconds; the best GFLOP/s over kernels and shapes is the roofline of that repetition.
  ``roofline_tok_s = GFLOP/s * 1e9 / flops_per_token``: what scoring would reach if every
  FLOP ran at GEMM peak.
* ``hf``: ``AutoModelForCausalLM`` in the dtype, done well: sentences sorted by length,
  right-padded batches of at most ``--hf-batch-size`` sentences and ``--hf-batch-tokens``
  padded positions (built outside the timing), ``torch.inference_mode``, attention mask;
  per batch the logits of the real (unpadded) positions only are taken, in float32, and
  each next token's log-prob is ``logit - logsumexp`` (no full log-softmax written).
* ``offline``: ``vllm.LLM`` (eager, the dtype, ``--max-num-batched-tokens``, ``--max-num-seqs``,
  ``--kv-cache-mb``; the CPU worker bound to all cores by
  ``vllm_negablate.offline.bind_worker_to_all_cores``) and ``vllm_negablate.offline.score_prompts``
  (``prompt_logprobs=0``, all sentences in one ``generate`` call).
* ``served``: ``negablate serve`` (``server.launcher.serve``: a child process, same engine
  settings and binding) and ``eval.scoring.CompletionsScorer.score_ids`` (cache off,
  ``--batch-size`` sentences per request, ``--concurrency`` requests in flight): what
  the harness does, HTTP, JSON and parsing included. Its peak RSS is the sum of the
  ``VmHWM`` of the server's processes (API server, engine core), read at the end.

Tokens: ``tokens`` counts every position fed to the model (start token included), and
all ``tok/s`` are ``tokens / median seconds``; each side returns ``tokens - sentences``
log-probs (``scored_tokens``, checked equal across sides). Per-sentence sums of log-probs
are compared with the offline side's (max |diff| printed; expected ~1e-5 in fp32).

FLOPs per token (one forward position, from the HF config; a model built on the meta
device gives the exact linear-layer shapes)::

    flops_per_token = 2 * P_linear + 4 * layers * q_dim * ctx_avg + 2 * hidden * vocab

``P_linear``: weights of the decoder layers' linear maps (q, k, v, o projections and the
MLP's gate/up/down), embeddings and LM head excluded; ``q_dim = heads * head_dim``
(= hidden for Llama/SmolLM2, 1,024 vs hidden 640 for Gemma 3 270M); ``ctx_avg`` =
``sum L(L+1)/2 / sum L`` over the timed sentences (position i attends to i keys:
``2 * q_dim * i`` for Q K^T and as much for A V, per layer); ``2 * hidden * vocab``: the LM
head, computed at every position since every position is scored. Ignored: norms,
activations, rotary embeddings, softmaxes and the O(vocab) log-softmax per position.
Gemma's 512-token sliding window is longer than any BLiMP sentence.

Order: per model and dtype, all sides are set up (the server starts as a child process
in the background while the offline engine and the HF model load in this process), each
runs once untimed (warm-up), then the repetitions alternate ``roofline hf offline served
roofline hf ...`` so drift hits all alike; medians of ``--reps`` are reported. Before
each timed pass an untimed ``--settle`` pause (1.5 s) lets the previous side go quiet:
vLLM's shared-memory readers (worker, engine core) busy-loop for 1 s after their last
read before they sleep. The CPU seconds the *idle* sides' engine processes burn during
each timed pass are measured and printed (``idle_cpu_s``): on a small machine they would
slow the side being timed, so they should stay near 0.

``full_blimp_minutes``: 67,000 pairs x (tokens per pair measured here) / served tok/s / 60.
Ratios, per model and dtype: served / offline, served / hf, offline / roofline (also
served / roofline, hf / roofline). Machine facts (``lscpu`` model name, avx512_bf16 and
AMX flags, cores, load average before and after, torch/vllm/transformers versions) and
all settings are printed and written to the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

# vLLM's log lines (this process's offline engine) go to stderr; stdout carries the results
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

from _common import DEFAULT_PARADIGMS, bench_model, blimp_pairs, log, machine_facts  # noqa: E402  (also: offline env, repo on sys.path)

SERVED = "bench"
SIDES = ("roofline", "hf", "offline", "served")
EMBEDDED = ("gemma-3-270m", "smollm2-135m")
DTYPES = ("float32", "bfloat16")
FULL_BLIMP_PAIRS = 67_000
TINY_LABEL = "tiny-llama"
MB = 2**20


def runnable_dtypes() -> list[str]:
    """The default ``--dtype`` list: bfloat16 only where the project serves it (a GPU or a
    CPU with bf16 units); emulated bf16 is slower than float32 and not offered, so timing
    it by default would only slow the run (``--dtype bfloat16`` still times it)."""
    from vllm_negablate.precision import DtypeError, check_dtype_runnable

    out = []
    for dtype in DTYPES:
        try:
            out.append(check_dtype_runnable(dtype))
        except DtypeError as exc:
            log(f"skipping {dtype} by default: {exc}")
    return out


# ---------------------------------------------------------------------------- FLOPs
def model_shape(model_dir: Path) -> dict:
    """The shapes the FLOP count and the roofline GEMMs need, read from the HF config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(model_dir))
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and m is not head)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return {"hidden": text.hidden_size, "intermediate": text.intermediate_size,
            "layers": text.num_hidden_layers, "vocab": text.vocab_size, "heads": heads,
            "kv_heads": kv_heads, "head_dim": head_dim, "q_dim": heads * head_dim,
            "kv_dim": kv_heads * head_dim, "linear_params": linear}


def flops_per_token(shape: dict, seqs: list[list[int]]) -> dict:
    """FLOPs per forward position (the formula in the module docstring), with its terms."""
    ctx_avg = sum(len(s) * (len(s) + 1) / 2 for s in seqs) / sum(map(len, seqs))
    terms = {"linear": 2 * shape["linear_params"],
             "attention": 4 * shape["layers"] * shape["q_dim"] * ctx_avg,
             "lm_head": 2 * shape["hidden"] * shape["vocab"]}
    return {"flops_per_token": sum(terms.values()), "terms": terms, "ctx_avg": ctx_avg}


# ------------------------------------------------------------------------- roofline
def gemm_kernels(dtype):
    """name -> (prepare(x, w) -> run()), for x [M, K] and a Linear-layout weight w [N, K]."""
    import torch

    def matmul(x, w):
        wt = w.t().contiguous()
        return lambda: torch.matmul(x, wt)

    def linear(x, w):
        return lambda: torch.nn.functional.linear(x, w)

    def mkldnn(x, w):
        packed = torch.ops.mkldnn._reorder_linear_weight(w, x.shape[0])
        return lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    kernels = {"torch.matmul": matmul, "F.linear": linear}
    if torch.backends.mkldnn.is_available():
        kernels["mkldnn._linear_pointwise"] = mkldnn
    return kernels


def roofline_pass(dtype_name: str, shapes: list[tuple[str, int, int, int]], min_time: float,
                  threads: int) -> dict:
    """GFLOP/s of every (kernel, shape) and the best of them; a kernel that fails is noted."""
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, float]] = {}
    errors: dict[str, str] = {}
    for label, m, k, n in shapes:
        x = torch.randn(m, k, generator=gen).to(dtype)
        w = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(dtype)
        for name, prepare in gemm_kernels(dtype).items():
            if name in errors:
                continue
            try:
                run = prepare(x, w)
                run()  # untimed: primitive creation, caches
                calls, t0 = 0, time.perf_counter()
                while True:
                    run()
                    calls += 1
                    elapsed = time.perf_counter() - t0
                    if elapsed >= min_time and calls >= 3:
                        break
            except Exception as e:  # noqa: BLE001  (a kernel missing in this build: report, go on)
                errors[name] = f"{type(e).__name__}: {e}"[:300]
                continue
            out.setdefault(name, {})[label] = 2 * m * k * n * calls / elapsed / 1e9
    if not out:
        raise RuntimeError(f"no GEMM kernel ran in {dtype_name}: {errors}")
    best_name, best_label = max(((n, s) for n, d in out.items() for s in d), key=lambda ns: out[ns[0]][ns[1]])
    return {"gflops": out, "best_gflops": out[best_name][best_label], "best_kernel": best_name,
            "best_shape": best_label, "errors": errors}


# -------------------------------------------------------------------------------- HF
def hf_batches(seqs: list[list[int]], batch_size: int, batch_tokens: int, pad_id: int):
    """Length-sorted, right-padded batches (longest first): at most ``batch_size`` sentences
    and ``batch_tokens`` padded positions each; returns them and the padding fraction."""
    import torch

    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    batches, cur = [], []

    def flush():
        width = len(seqs[cur[0]])
        ids = torch.full((len(cur), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(cur), width), dtype=torch.long)
        for j, i in enumerate(cur):
            ids[j, :len(seqs[i])] = torch.tensor(seqs[i])
            mask[j, :len(seqs[i])] = 1
        batches.append((list(cur), ids, mask))

    for i in order:
        width = len(seqs[cur[0]]) if cur else len(seqs[i])
        if cur and (len(cur) >= batch_size or width * (len(cur) + 1) > batch_tokens):
            flush()
            cur = []
        cur.append(i)
    if cur:
        flush()
    padded = sum(ids.numel() for _, ids, _ in batches)
    return batches, 1 - sum(map(len, seqs)) / padded


def hf_pass(model, batches, n_seqs: int, threads: int) -> tuple[list[float], int]:
    """Summed next-token log-probs per sentence (input order) and how many were scored."""
    import torch

    torch.set_num_threads(threads)
    sums = [0.0] * n_seqs
    scored = 0
    with torch.inference_mode():
        for idx, ids, mask in batches:
            logits = model(input_ids=ids, attention_mask=mask).logits
            valid = mask[:, 1:].bool()
            rows = logits[:, :-1][valid].float()  # real positions only, row-major
            target = ids[:, 1:][valid]
            lp = rows.gather(-1, target[:, None]).squeeze(-1) - torch.logsumexp(rows, dim=-1)
            counts = valid.sum(-1).tolist()
            for i, part in zip(idx, torch.split(lp.double(), counts), strict=True):
                sums[i] = float(part.sum())
            scored += lp.numel()
    return sums, scored


def row_sums(rows: list[list[float | None]]) -> tuple[list[float], int]:
    vals = [[v for v in r[1:] if v is not None] for r in rows]
    return [math.fsum(v) for v in vals], sum(map(len, vals))


# ------------------------------------------------------------------------- processes
def proc_tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def cpu_seconds(procs: list) -> float:
    import psutil

    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def peak_rss_mb(procs: list) -> float | None:
    """Sum of the processes' peak resident sets (``VmHWM``), MiB; None if unreadable."""
    total, seen = 0, False
    for p in procs:
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
                    seen = True
        except (OSError, ValueError):
            pass
    return total / MB if seen else None


def offline_engine_procs(server_pid: int | None) -> list:
    """This process's children that are not the server's tree: the offline engine core."""
    import psutil

    server = {p.pid for p in proc_tree(server_pid)} if server_pid else set()
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in server]


def start_in_background(cm) -> Callable[[], tuple]:
    """Enter the context manager ``cm`` (here: ``server.launcher.serve``, which waits until
    the server is healthy) on a thread; the returned function waits for it and gives
    ``(value, cm.__exit__)``, or raises what entering raised (``serve`` then stopped its
    server). The engine cores are spawned, not forked, so the thread is harmless to them."""
    box: dict = {}

    def enter() -> None:
        try:
            box["value"] = cm.__enter__()
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
            box["error"] = e

    thread = threading.Thread(target=enter, name="start-server", daemon=True)
    thread.start()

    def wait() -> tuple:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"], cm.__exit__

    return wait


# --------------------------------------------------------------------- one dtype
def run_dtype(label: str, model: Path, start: int | None, dtype: str, seqs: list[list[int]],
              fl: dict, shape: dict, args, work: Path, threads: int) -> dict:
    """Set up the chosen sides for one model and dtype, warm each up, time them alternately;
    return this dtype's entry of the JSON's ``results``."""
    import torch

    from eval.scoring import CompletionsScorer
    from server.launcher import serve
    from vllm_negablate.offline import score_prompts
    from vllm_negablate.vllm_adapter import shutdown_llm

    sides = args.sides
    tokens, n_seqs = sum(map(len, seqs)), len(seqs)
    t_gemm = args.gemm_tokens
    shapes = [("qkv", t_gemm, shape["hidden"], shape["q_dim"] + 2 * shape["kv_dim"]),
              ("mlp_up", t_gemm, shape["hidden"], shape["intermediate"]),
              ("mlp_down", t_gemm, shape["intermediate"], shape["hidden"]),
              ("square", args.gemm_square, args.gemm_square, args.gemm_square)]
    engine = {"enforce_eager": True, "max_num_batched_tokens": args.batched_tokens,
              "max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
              "kv_cache_memory_bytes": args.kv_cache_mb * MB}
    out: dict = {"setup_s": {}}
    hf_model = llm = server = scorer = None
    pad_frac = None

    def say(msg: str) -> None:
        log(f"{label} {dtype}: {msg}")

    with contextlib.ExitStack() as stack:
        # The server starts in the background while this process builds the offline engine.
        started = time.perf_counter()
        wait_server = start_in_background(serve(
            model, "--max-num-batched-tokens", str(args.batched_tokens),
            "--max-num-seqs", str(args.max_num_seqs), log_path=work / f"server-{label}-{dtype}.log",
            served_name=SERVED, dtype=dtype, kv_cache_bytes=engine["kv_cache_memory_bytes"],
            max_model_len=args.max_model_len, bind_all_cores=True, announce=say)) if "served" in sides else None
        try:
            if "offline" in sides:
                from vllm import LLM

                t0 = time.perf_counter()
                say("starting vllm.LLM ...")
                llm = LLM(model=str(model), dtype=dtype, seed=0, **engine)
                stack.callback(lambda: (shutdown_llm(llm), gc.collect()))
                out["setup_s"]["offline"] = time.perf_counter() - t0
            if "hf" in sides:
                from transformers import AutoModelForCausalLM

                t0 = time.perf_counter()
                hf_model = AutoModelForCausalLM.from_pretrained(str(model), dtype=getattr(torch, dtype)).eval()
                pad_id = hf_model.config.pad_token_id
                batches, pad_frac = hf_batches(seqs, args.hf_batch_size, args.hf_batch_tokens,
                                               0 if pad_id is None else int(pad_id))
                out["setup_s"]["hf"] = time.perf_counter() - t0
        finally:
            if wait_server is not None:
                server, stop_server = wait_server()  # raises if the server did not come up
                stack.push(stop_server)
                out["setup_s"]["served"] = time.perf_counter() - started
        if server is not None:
            scorer = stack.enter_context(CompletionsScorer(
                server.url, SERVED, tokenizer=model, cache=False, progress=False, start_token=start,
                batch_size=args.batch_size, concurrency=args.concurrency))

        def run_side(side: str) -> tuple[list[float] | None, int | None, dict | None]:
            if side == "roofline":
                return None, None, roofline_pass(dtype, shapes, args.gemm_min_time, threads)
            if side == "hf":
                return (*hf_pass(hf_model, batches, n_seqs, threads), None)
            if side == "offline":
                return (*row_sums(score_prompts(llm, seqs)), None)
            return (*row_sums(scorer.score_ids(seqs)), None)

        def bystanders(side: str) -> list:
            server_pid = server.proc.pid if server is not None and server.proc is not None else None
            procs = []
            if side != "offline" and llm is not None:
                procs += offline_engine_procs(server_pid)
            if side != "served" and server_pid:
                procs += proc_tree(server_pid)
            return procs

        order = [s for s in SIDES if s in sides]
        sums: dict[str, list[float]] = {}
        scored: dict[str, int] = {}
        for side in order:  # untimed warm-ups (also the log-prob check's first values)
            t0 = time.perf_counter()
            got, n, _ = run_side(side)
            if got is not None:
                sums[side], scored[side] = got, n
            say(f"warm-up {side} {time.perf_counter() - t0:.2f} s")
        times: dict[str, list[float]] = {s: [] for s in order}
        idle: dict[str, list[float]] = {s: [] for s in order}
        roof: list[dict] = []
        for rep in range(args.reps):
            for side in order:
                time.sleep(args.settle)  # let the previous side's processes go quiet
                others = bystanders(side)
                c0 = cpu_seconds(others)
                t0 = time.perf_counter()
                got, n, info = run_side(side)
                times[side].append(time.perf_counter() - t0)
                idle[side].append(cpu_seconds(others) - c0)
                if info is not None:
                    roof.append(info)
                if got is not None:
                    if n != scored[side]:
                        raise RuntimeError(f"{side}: {n} log-probs now, {scored[side]} in the warm-up")
                    sums[side] = got
            say(f"rep {rep + 1}/{args.reps}: " + ", ".join(
                f"{s} {times[s][-1]:.2f} s" for s in order))
        if server is not None:
            out["served_peak_rss_mb"] = peak_rss_mb(proc_tree(server.proc.pid))

    med = {s: statistics.median(v) for s, v in times.items()}
    tok_s = {s: tokens / med[s] for s in order if s != "roofline"}
    roof_gflops = statistics.median(r["best_gflops"] for r in roof) if roof else None
    roofline_tok_s = roof_gflops * 1e9 / fl["flops_per_token"] if roof else None
    served, offline, hf = tok_s.get("served"), tok_s.get("offline"), tok_s.get("hf")

    def ratio(a, b):
        return a / b if a is not None and b is not None else None

    per_pair = tokens / (n_seqs / 2)
    ref = sums.get("offline")
    out.update({
        "served_tok_s": served, "offline_tok_s": offline, "hf_tok_s": hf, "roofline_tok_s": roofline_tok_s,
        "roofline_gflops": roof_gflops,
        "full_blimp_minutes": FULL_BLIMP_PAIRS * per_pair / served / 60 if served else None,
        "full_blimp_minutes_offline": FULL_BLIMP_PAIRS * per_pair / offline / 60 if offline else None,
        "ratios": {"served_over_offline": ratio(served, offline), "served_over_hf": ratio(served, hf),
                   "offline_over_roofline": ratio(offline, roofline_tok_s),
                   "served_over_roofline": ratio(served, roofline_tok_s),
                   "hf_over_roofline": ratio(hf, roofline_tok_s)},
        "tokens": tokens, "scored_tokens": scored, "median_s": med,
        "reps": {"times_s": times, "idle_cpu_s": idle, "roofline": roof},
        "logprob_max_abs_diff_vs_offline": {
            s: max(abs(a - b) for a, b in zip(v, ref, strict=True)) for s, v in sums.items() if s != "offline"
        } if ref is not None else {},
        "hf_padding_fraction": pad_frac,
    })
    return out


# ------------------------------------------------------------------------------ main
def fmt(x, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=None,
                        help=f"embedded name or HF model dir, repeatable (default: {', '.join(EMBEDDED)})")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny random Llama and small GEMMs instead (smoke runs; not with --model)")
    parser.add_argument("--dtype", action="append", choices=DTYPES, default=None,
                        help="repeatable (default: float32, and bfloat16 where this machine runs it)")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    parser.add_argument("--pairs", type=int, default=400, help="BLiMP pairs in all (2 sentences each)")
    parser.add_argument("--paradigms", default=",".join(DEFAULT_PARADIGMS), help="comma-separated BLiMP UIDs")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--settle", type=float, default=1.5,
                        help="untimed pause before each timed pass, seconds (vLLM's idle readers spin for 1 s)")
    g = parser.add_argument_group("engines (offline and served alike)")
    g.add_argument("--max-num-batched-tokens", dest="batched_tokens", type=int, default=8192)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-model-len", type=int, default=512)
    g.add_argument("--kv-cache-mb", type=int, default=512)
    g = parser.add_argument_group("served (the harness's client)")
    g.add_argument("--batch-size", type=int, default=32, help="sentences per request")
    g.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    g = parser.add_argument_group("hf")
    g.add_argument("--hf-batch-size", type=int, default=64, help="sentences per length-sorted batch at most")
    g.add_argument("--hf-batch-tokens", type=int, default=1024, help="padded positions per batch at most")
    g = parser.add_argument_group("roofline")
    g.add_argument("--gemm-tokens", type=int, default=None, help="rows T of the model-shaped GEMMs (default 2048; tiny 256)")
    g.add_argument("--gemm-square", type=int, default=None, help="side of the square GEMM (default 2048; tiny 512)")
    g.add_argument("--gemm-min-time", type=float, default=None,
                   help="seconds each (kernel, shape) is repeated for (default 0.3; tiny 0.02)")
    args = parser.parse_args()
    if args.tiny and args.model:
        parser.error("--tiny and --model exclude each other")
    args.sides = [s for s in args.sides.split(",") if s]
    if not args.sides or set(args.sides) - set(SIDES):
        parser.error(f"--sides: a non-empty subset of {','.join(SIDES)}")
    if args.reps < 1 or args.pairs < 1:
        parser.error("--reps and --pairs must be >= 1")
    dtypes = list(dict.fromkeys(args.dtype or runnable_dtypes()))
    args.gemm_tokens = args.gemm_tokens or (256 if args.tiny else 2048)
    args.gemm_square = args.gemm_square or (512 if args.tiny else 2048)
    args.gemm_min_time = args.gemm_min_time if args.gemm_min_time is not None else (0.02 if args.tiny else 0.3)

    from server.launcher import exit_on_sigterm
    from vllm_negablate.offline import bind_worker_to_all_cores

    exit_on_sigterm()  # a kill of this script still stops its servers (the with-blocks)
    cores = sorted(os.sched_getaffinity(0))
    bind_worker_to_all_cores()
    machine = machine_facts()

    import torch

    from eval.tokenizers import LocalTokenizer

    torch.set_num_threads(len(cores))
    work = Path(tempfile.mkdtemp(prefix="negablate-bench-speed-"))
    models: list[tuple[str, Path, int | None]] = []
    if args.tiny:
        path, start = bench_model(None, work)
        models.append((TINY_LABEL, path, start))
    else:
        from vllm_negablate.models import is_embedded, recorded_start_token, resolve_model

        for name in args.model or EMBEDDED:
            path = Path(resolve_model(name))
            models.append((name if is_embedded(name) else path.name, path, recorded_start_token(path)))
    paradigms, pairs = blimp_pairs(args.paradigms, args.pairs)
    texts = [t for p in pairs for t in (p.good, p.bad)]
    settings = {
        "sides": args.sides, "dtypes": dtypes, "settle_s": args.settle, "pairs": len(pairs), "sentences": len(texts),
        "paradigms": paradigms, "reps": args.reps, "tiny": args.tiny, "cores": len(cores),
        "torch_threads": len(cores), "cpu_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
        "engine": {"enforce_eager": True, "max_num_batched_tokens": args.batched_tokens,
                   "max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
                   "kv_cache_mb": args.kv_cache_mb},
        "served": {"batch_size": args.batch_size, "concurrency": args.concurrency, "cache": False},
        "hf": {"batch_size": args.hf_batch_size, "batch_tokens": args.hf_batch_tokens, "length_sorted": True},
        "roofline": {"gemm_tokens": args.gemm_tokens, "gemm_square": args.gemm_square,
                     "min_time_s": args.gemm_min_time},
        "full_blimp_pairs": FULL_BLIMP_PAIRS,
    }
    results: dict = {}
    model_info: dict = {}
    try:
        for label, path, start in models:
            tok = LocalTokenizer(path, start_token=start)
            seqs = [[tok.start_token_id, *ids] for ids in tok.encode_batch(texts)]
            shape = model_shape(path)
            fl = flops_per_token(shape, seqs)
            model_info[label] = {"path": str(path), "start_token": tok.start_token_id, **shape, **fl,
                                 "tokens": sum(map(len, seqs)), "tokens_per_pair": sum(map(len, seqs)) / len(pairs)}
            log(f"{label}: {len(pairs)} pairs, {sum(map(len, seqs))} tokens, "
                f"{fl['flops_per_token'] / 1e6:.1f} MFLOP/token")
            for dtype in dtypes:
                results.setdefault(label, {})[dtype] = run_dtype(
                    label, path, start, dtype, seqs, fl, shape, args, work, len(cores))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine["loadavg_end"] = list(os.getloadavg())

    f = machine["flags"]
    print(f"machine: {machine['cpu']}, {machine['cpu_count']} cores (affinity {machine['affinity']}); "
          f"avx512_bf16 {'yes' if f['avx512_bf16'] else 'no'}, AMX {'yes' if f['amx_bf16'] else 'no'}; "
          f"load avg {machine['loadavg'][0]:.2f} at start, {machine['loadavg_end'][0]:.2f} at end")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
          + f"; torch threads {len(cores)}, VLLM_CPU_OMP_THREADS_BIND={settings['cpu_bind']}")
    print(f"settings: {len(pairs)} pairs = {len(texts)} sentences ({', '.join(paradigms)}), median of "
          f"{args.reps}, sides alternating {' '.join(s for s in SIDES if s in args.sides)}; engines eager, "
          f"max_num_batched_tokens {args.batched_tokens}, max_num_seqs {args.max_num_seqs}, "
          f"KV {args.kv_cache_mb} MiB; served batch {args.batch_size} x concurrency {args.concurrency}, "
          f"cache off; hf length-sorted batches <= {args.hf_batch_size} sentences / "
          f"{args.hf_batch_tokens} positions; GEMMs T={args.gemm_tokens}, square {args.gemm_square}")
    for label, info in model_info.items():
        t = info["terms"]
        print(f"{label}: {info['layers']} layers, hidden {info['hidden']}, intermediate {info['intermediate']}, "
              f"vocab {info['vocab']}; {info['tokens']} tokens ({info['tokens_per_pair']:.1f}/pair); "
              f"{info['flops_per_token'] / 1e6:.1f} MFLOP/token = linear {t['linear'] / 1e6:.1f} + attention "
              f"{t['attention'] / 1e6:.2f} (ctx {info['ctx_avg']:.1f}) + LM head {t['lm_head'] / 1e6:.1f}")
    head = (f"{'model':<14} {'dtype':<9} {'GFLOP/s':>8} {'roofline':>9} {'hf':>8} {'offline':>8} {'served':>8}"
            f" {'srv/off':>8} {'srv/hf':>7} {'off/roof':>8} {'BLiMP min':>9}")
    print("tok/s (median):")
    print(head)
    for label, per in results.items():
        for dtype, r in per.items():
            q = r["ratios"]
            print(f"{label:<14} {dtype:<9} {fmt(r['roofline_gflops'], '.1f'):>8} {fmt(r['roofline_tok_s']):>9} "
                  f"{fmt(r['hf_tok_s']):>8} {fmt(r['offline_tok_s']):>8} {fmt(r['served_tok_s']):>8} "
                  f"{fmt(q['served_over_offline'], '.2f'):>8} {fmt(q['served_over_hf'], '.2f'):>7} "
                  f"{fmt(q['offline_over_roofline'], '.3f'):>8} {fmt(r['full_blimp_minutes'], '.1f'):>9}")
    for label, per in results.items():
        for dtype, r in per.items():
            best = statistics.median(x["best_gflops"] for x in r["reps"]["roofline"]) if r["reps"]["roofline"] else None
            if best is not None:
                kernels = {}
                for x in r["reps"]["roofline"]:
                    for name, d in x["gflops"].items():
                        kernels[name] = max(kernels.get(name, 0.0), *d.values())
                print(f"  {label} {dtype} GEMM best GFLOP/s per kernel: "
                      + ", ".join(f"{k} {v:.1f}" for k, v in kernels.items())
                      + (f"; failed: {', '.join(r['reps']['roofline'][0]['errors'])}"
                         if r["reps"]["roofline"][0]["errors"] else ""))
            idle = {s: statistics.median(v) for s, v in r["reps"]["idle_cpu_s"].items()}
            diffs = r["logprob_max_abs_diff_vs_offline"]
            print(f"  {label} {dtype}: scored tokens {r['scored_tokens']}; max |sum - offline| "
                  + (", ".join(f"{s} {d:.2e}" for s, d in diffs.items()) or "n/a")
                  + "; idle engines' CPU s during each pass " + ", ".join(f"{s} {v:.2f}" for s, v in idle.items())
                  + (f"; served peak RSS {r['served_peak_rss_mb']:.0f} MiB" if r.get("served_peak_rss_mb") else "")
                  + (f"; hf padding {r['hf_padding_fraction']:.0%}" if r["hf_padding_fraction"] is not None else ""))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": machine, "settings": settings, "models": model_info,
                                               "results": results}, indent=2) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
