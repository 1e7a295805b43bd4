"""Discovery cost inside vLLM: throughput with vs without the observer, and worker memory.

Same engine, same windows, each pass with a fresh cache salt (no prefix-cache hits):

* ``plain``: ``generate(max_tokens=1)`` with no observer (the model's own forward);
* ``observed``: the same with the discovery observer on every worker; the time of the
  collect RPC (finalizing W1 on the workers) is reported separately.

Repetitions alternate plain / observed; the medians of ``--reps`` runs are reported.

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
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

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
    config = {"nbins": args.nbins, "device": args.device}
    state = llm.collective_rpc("negablate_state")[0]["state"]
    fp = state["fingerprint"]

    # warm-up (first-call overheads) for both paths
    generate(llm, win(2 * args.window))
    observed_pass(llm, win(2 * args.window), config)

    windows = win(args.tokens)
    n = sum(map(len, windows))
    plain, observed, collect = [], [], []
    for _ in range(args.reps):
        plain.append(generate(llm, windows))
        t, tc, replies = observed_pass(llm, windows, config)
        seen = {v for r in replies for v in r["tokens"].values()}
        assert seen == {n}, f"observer saw {seen} tokens per layer, sent {n}"
        observed.append(t)
        collect.append(tc)
    tp_plain = n / statistics.median(plain)
    tp_obs = n / statistics.median(observed)
    tp_obs_total = n / (statistics.median(observed) + statistics.median(collect))

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
        "tokens_per_pass": n, "reps": args.reps,
        "plain_s": plain, "observed_s": observed, "collect_s": collect,
        "plain_tok_per_s": tp_plain, "observed_tok_per_s": tp_obs,
        "observed_incl_collect_tok_per_s": tp_obs_total,
        "throughput_ratio": tp_obs / tp_plain,
        "throughput_ratio_incl_collect": tp_obs_total / tp_plain,
        "memory": memory,
        "store_everything_growth_mb": store_all_mb,
    }
    print(f"model {model}: {layers} layers x {width} neurons, {n} tokens per pass, "
          f"median of {args.reps}")
    print(f"  plain    {tp_plain:10.0f} tok/s   ({statistics.median(plain):.2f} s)")
    print(f"  observed {tp_obs:10.0f} tok/s   ({statistics.median(observed):.2f} s)  "
          f"ratio {tp_obs / tp_plain:.3f}")
    print(f"  + collect/finalize {statistics.median(collect):.2f} s -> "
          f"{tp_obs_total:.0f} tok/s, ratio {tp_obs_total / tp_plain:.3f}")
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
