"""Discovery cost inside vLLM: throughput with vs without the observer, and worker memory.

Same engine, same windows, each pass with a fresh cache salt (no prefix-cache hits):

* ``plain``: ``generate(max_tokens=1)`` with no observer (the model's own forward);
* ``observed``: the same with the discovery observer on every worker, once per estimator
  kernel in ``--kernels`` (``torch``: the reference formulation; ``auto``: the numba CPU
  kernels, the default); the time of the collect RPC (finalizing W1 on the workers) is
  reported separately.

Repetitions alternate plain / observed (each kernel); the medians of ``--reps`` runs are
reported.

Memory: the worker process's peak RSS (VmHWM, reset at the start of each pass) for an
observed pass over ``--tokens-small`` and over ``--tokens-large`` tokens, plus a plain pass
over ``--tokens-large`` for reference. Streaming statistics keep it flat: the estimator
holds ``(nbins + 2) * 4`` bytes per neuron whatever the number of tokens.

Defaults run on the tiny test Llama (2 layers x 128 neurons) in a few minutes on 2 cores::

    python bench/discovery_speed.py
    python bench/discovery_speed.py --width 2048 --layers 4   # wider tiny Llama
    python bench/discovery_speed.py --model /path/to/hf_model --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MB = 2**20


def build_model(width: int | None, layers: int) -> Path:
    from vllm_negablate.testing import tiny_models

    if width is None and layers == 2:
        return tiny_models.build_tiny_model("llama", Path("/tmp/negablate-bench/llama"))
    width = width or tiny_models.GATED_INTERMEDIATE
    tiny_models.GATED_INTERMEDIATE = width  # the builder reads it when it makes the config
    return tiny_models.build_tiny_model(
        "llama", Path(f"/tmp/negablate-bench/llama-w{width}-l{layers}"), num_layers=layers)


def rpc(llm, method, *args, **kwargs):
    from vllm_negablate.discovery.collector import from_wire

    replies = [from_wire(r) for r in llm.collective_rpc(method, args=args, kwargs=kwargs or None)]
    bad = [r["error"] for r in replies if not r.get("ok")]
    if bad:
        raise RuntimeError(f"{method}: {bad}")
    return replies


def generate(llm, windows):
    from vllm import SamplingParams

    salt = uuid.uuid4().hex  # no prefix-cache hits across passes
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": w, "cache_salt": salt} for w in windows], params,
                 use_tqdm=False)
    return time.perf_counter() - t0


def observed_pass(llm, windows, config: dict, finalize: bool = True):
    rpc(llm, "negablate_observe_start", json.dumps({**config, "reset_peak_memory": True}))
    t = generate(llm, windows)
    rpc(llm, "negablate_observe_stop")
    t0 = time.perf_counter()
    replies = rpc(llm, "negablate_observe_collect", finalize=finalize, clear=True)
    t_collect = time.perf_counter() - t0
    return t, t_collect, replies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF model directory (default: tiny test Llama)")
    p.add_argument("--width", type=int, help="tiny Llama MLP width (default 128)")
    p.add_argument("--layers", type=int, default=2, help="tiny Llama layers")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--corpus", default=None, help="default: WikiText-2 valid")
    p.add_argument("--window", type=int, help="tokens per window (default 256 tiny, 512 --model)")
    p.add_argument("--tokens", type=int, default=20_000, help="tokens per throughput pass")
    p.add_argument("--tokens-small", type=int, default=20_000)
    p.add_argument("--tokens-large", type=int, default=80_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--nbins", type=int, default=2048)
    p.add_argument("--device", default="auto", choices=["auto", "cpu"])
    p.add_argument("--kv-cache-mb", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--kernels", default="torch,auto",
                   help="estimator kernels to time, comma-separated (torch, auto, numba)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--vllm-core-split", action="store_true",
                   help="keep vLLM's default CPU binding (one core held back for the scheduler) "
                        "instead of giving the worker every core, as `negablate reproduce` does")
    args = p.parse_args()
    if not args.vllm_core_split:
        from vllm_negablate.offline import bind_worker_to_all_cores

        bind_worker_to_all_cores()

    from vllm import LLM

    from vllm_negablate.discovery.corpus import make_windows, tokenize_corpus
    from vllm_negablate.start_token import start_token_id

    model = args.model or str(build_model(args.width, args.layers))
    if args.window is None:
        args.window = 512 if args.model else 256
    t0 = time.perf_counter()
    llm = LLM(model=model, dtype=args.dtype, enforce_eager=True, seed=0,
              max_model_len=args.window + 1, kv_cache_memory_bytes=args.kv_cache_mb * MB,
              enable_prefix_caching=True, max_num_seqs=args.max_num_seqs)
    print(f"engine start {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    tok = llm.get_tokenizer()
    from vllm_negablate.paths import wikitext
    ids = tokenize_corpus(tok, args.corpus or wikitext("valid"))
    need = max(args.tokens, args.tokens_large)
    while len(ids) < need:  # a short corpus is repeated (fine for timing and memory)
        ids = ids + ids
    start = start_token_id(model)  # the project's one rule: marker, else BOS, else EOS
    win = lambda n: make_windows(ids, args.window, start, max_tokens=n)  # noqa: E731
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    config = {"nbins": args.nbins, "device": args.device}
    state = llm.collective_rpc("negablate_state")[0]["state"]
    fp = state["fingerprint"]

    # warm-up (first-call overheads, numba compilation) for every path
    generate(llm, win(2 * args.window))
    for kernel in kernels:
        observed_pass(llm, win(2 * args.window), {**config, "kernel": kernel})

    windows = win(args.tokens)
    n = sum(map(len, windows))
    plain = []
    observed = {k: [] for k in kernels}
    collect = {k: [] for k in kernels}
    for _ in range(args.reps):
        plain.append(generate(llm, windows))
        for kernel in kernels:
            t, tc, replies = observed_pass(llm, windows, {**config, "kernel": kernel})
            seen = {v for r in replies for v in r["tokens"].values()}
            assert seen == {n}, f"observer saw {seen} tokens per layer, sent {n}"
            observed[kernel].append(t)
            collect[kernel].append(tc)
    t_plain = statistics.median(plain)
    per_kernel = {}
    for kernel in kernels:
        t_obs, t_col = statistics.median(observed[kernel]), statistics.median(collect[kernel])
        per_kernel[kernel] = {
            "observed_s": observed[kernel], "collect_s": collect[kernel],
            "observed_tok_per_s": n / t_obs,
            "observed_incl_collect_tok_per_s": n / (t_obs + t_col),
            "throughput_ratio": t_plain / t_obs,
            "throughput_ratio_incl_collect": t_plain / (t_obs + t_col),
        }
    main = per_kernel[kernels[-1]]  # the memory passes and the headline use the last kernel
    config = {**config, "kernel": kernels[-1]}

    memory = {}
    for label, count in (("small", args.tokens_small), ("large", args.tokens_large)):
        w = win(count)
        _, _, replies = observed_pass(llm, w, config)
        memory[label] = {"tokens": sum(map(len, w)),
                         "peak_rss_mb": max(r["memory"]["peak_rss"] for r in replies) / MB,
                         "observer_mb": sum(r["memory"]["observer_bytes"] for r in replies) / MB}
    # plain pass over the large token count: same reset, an observer that watches no layer
    rpc(llm, "negablate_observe_start", json.dumps({"layers": [], "reset_peak_memory": True}))
    generate(llm, win(args.tokens_large))
    replies = rpc(llm, "negablate_observe_collect", clear=True)
    memory["plain_large"] = {"tokens": args.tokens_large,
                             "peak_rss_mb": max(r["memory"]["peak_rss"] for r in replies) / MB}
    from vllm_negablate.vllm_adapter import shutdown_llm

    shutdown_llm(llm)

    width, layers = fp["intermediate_size"], fp["num_layers"]
    store_all_mb = (memory["large"]["tokens"] - memory["small"]["tokens"]) * width * layers * 4 / MB
    result = {
        "model": model, "layers": layers, "width": width, "dtype": args.dtype,
        "tokens_per_pass": n, "reps": args.reps, "kernel": kernels[-1],
        "plain_s": plain, "plain_tok_per_s": n / t_plain,
        **{k: v for k, v in main.items()},
        "kernels": per_kernel,
        "memory": memory,
        "store_everything_growth_mb": store_all_mb,
    }
    print(f"model {model}: {layers} layers x {width} neurons, {n} tokens per pass, "
          f"median of {args.reps}")
    print(f"  plain                {n / t_plain:10.0f} tok/s   ({t_plain:.2f} s)")
    for kernel, r in per_kernel.items():
        print(f"  observed, {kernel:<10} {r['observed_tok_per_s']:10.0f} tok/s   "
              f"({statistics.median(r['observed_s']):.2f} s)  ratio {r['throughput_ratio']:.3f}"
              f"   + collect/finalize {statistics.median(r['collect_s']):.2f} s -> "
              f"ratio {r['throughput_ratio_incl_collect']:.3f}")
    for label in ("small", "large"):
        m = memory[label]
        print(f"  peak worker RSS, observed {m['tokens']:>7} tokens: {m['peak_rss_mb']:8.1f} MiB "
              f"(statistics {m['observer_mb']:.1f} MiB)")
    print(f"  peak worker RSS, plain    {memory['plain_large']['tokens']:>7} tokens: "
          f"{memory['plain_large']['peak_rss_mb']:8.1f} MiB")
    print(f"  (keeping all values would add {store_all_mb:.0f} MiB between the two counts)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
