"""Cost of the ablation op inside vLLM: ablation off vs on vs mixed, in one engine and one run.

    .venv/bin/python bench/op_overhead.py                          # tiny random Llama
    .venv/bin/python bench/op_overhead.py --model ~/.cache/negablate/models/gemma-3-270m

Prints the engine start time, then for each condition the median wall time of
scoring the same prompts (prompt log-probs, one request per prompt, all in one
``generate`` call) over ``--reps`` repetitions, and the ratio to "off".
Conditions: ``off`` (plugin loaded, no set), ``on`` (every request uses a set
of ``--percent`` of each layer's neurons, mode negative), ``mixed`` (alternating
requests with and without the set: the multi-run kernel path).
A micro-benchmark of the op alone on a [tokens, width] tensor follows.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF model dir (default: a tiny random Llama)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--percent", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compiled", action="store_true", help="vLLM default compilation instead of eager")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--stock", action="store_true",
                        help="also run stock vLLM (NEGABLATE_DISABLE=1) in a child process, same settings")
    parser.add_argument("--child-stock", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_stock:
        return stock_child(args)

    import random

    import torch

    from vllm_negablate.neuron_set import LayerAblation, NeuronSet
    from vllm_negablate.offline import ablation_state, load_neuron_set, score_prompts
    from vllm_negablate.testing.engines import make_llm, shutdown
    from vllm_negablate.testing.tiny_models import build_tiny_model

    model = Path(args.model) if args.model else build_tiny_model("llama", Path(tempfile.mkdtemp()) / "llama")
    t0 = time.perf_counter()
    llm = make_llm(model, dtype=args.dtype, enforce_eager=not args.compiled,
                   kv_cache_memory_bytes=1024 * 2**20, max_num_seqs=args.prompts,
                   max_model_len=max(512, args.length + 8), enable_prefix_caching=False)
    start_s = time.perf_counter() - t0
    state = ablation_state(llm)
    fp = state["fingerprint"]
    rng = random.Random(0)
    k = max(1, round(fp["intermediate_size"] * args.percent / 100))
    ns = NeuronSet(name="bench", model=fp, entries=[
        LayerAblation(layer=layer, neurons=rng.sample(range(fp["intermediate_size"]), k))
        for layer in range(fp["num_layers"])
    ])
    load_neuron_set(llm, ns)
    # real models: ids below 1000 (common tokens); never above the vocabulary (a tiny model via --model)
    vocab = min(llm.get_tokenizer().vocab_size, 1000 if args.model else 30000)
    prompts = [[rng.randrange(5, vocab) for _ in range(args.length)] for _ in range(args.prompts)]
    conditions = {
        "off": None,
        "on": "bench",
        "mixed": ["bench" if i % 2 else None for i in range(args.prompts)],
    }
    if args.stock:
        shutdown(llm)  # one engine at a time on a small machine
        stock = run_stock_child(args, model, prompts)
        llm = make_llm(model, dtype=args.dtype, enforce_eager=not args.compiled,
                       kv_cache_memory_bytes=1024 * 2**20, max_num_seqs=args.prompts,
                       max_model_len=max(512, args.length + 8), enable_prefix_caching=False)
        load_neuron_set(llm, ns)
    score_prompts(llm, prompts[:4])  # warm-up
    times: dict[str, list[float]] = {c: [] for c in conditions}
    for _ in range(args.reps):
        for cond, sets in conditions.items():  # interleaved, so drift hits all equally
            t = time.perf_counter()
            score_prompts(llm, prompts, neuron_set=sets)
            times[cond].append(time.perf_counter() - t)
    shutdown(llm)

    med = {c: statistics.median(v) for c, v in times.items()}
    tokens = args.prompts * args.length
    print(f"model: {model} ({fp['architecture']}, {fp['num_layers']} layers x {fp['intermediate_size']})")
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"dtype {args.dtype}, {'compiled' if args.compiled else 'eager'}")
    print(f"engine start: {start_s:.1f} s")
    print(f"{args.prompts} prompts x {args.length} tokens, set = {k} neurons/layer ({args.percent}%), "
          f"median of {args.reps}")
    for cond in conditions:
        print(f"  {cond:6s} {med[cond]*1000:8.1f} ms  {tokens/med[cond]:9.0f} tok/s  "
              f"ratio to off {med['off']/med[cond]:.3f}")
    if args.stock:
        med["stock"] = stock
        print(f"  stock  {stock*1000:8.1f} ms  {tokens/stock:9.0f} tok/s  (vLLM without the plugin)")
        print(f"  throughput ratio plugin+set / stock: {stock/med['on']:.3f}; "
              f"mixed sets / stock: {stock/med['mixed']:.3f}; plugin, no set / stock: {stock/med['off']:.3f}")

    # the op alone: one layer's clamp, tokens x width
    from vllm_negablate.ops import ablate_dense_, ablate_sparse_
    from vllm_negablate.sharding import ShardSpec
    from vllm_negablate.tables import LayerTable

    width = fp["intermediate_size"]
    table = LayerTable(3, ShardSpec(0, 1, width), torch.float32, torch.device("cpu"))
    table.write(1, sorted(rng.sample(range(width), k)), [0.0] * k, [float("inf")] * k)
    h = torch.randn(tokens, width)
    slot_ids = torch.ones(tokens, dtype=torch.long)

    def timeit(fn, n=20):
        fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n

    act = timeit(lambda: torch.nn.functional.silu(h))
    sparse = timeit(lambda: ablate_sparse_(h, table, ((1, 0, tokens),)))
    dense = timeit(lambda: ablate_dense_(h, table, slot_ids))
    print(f"op alone on [{tokens}, {width}] fp32: sparse {sparse*1e6:.0f} us, dense {dense*1e6:.0f} us, "
          f"SiLU itself {act*1e6:.0f} us")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": str(model), "engine_start_s": start_s, "median_s": med, "tokens": tokens,
            "neurons_per_layer": k, "op_us": {"sparse": sparse * 1e6, "dense": dense * 1e6, "silu": act * 1e6},
        }, indent=2))


def run_stock_child(args, model, prompts) -> float:
    """Median time of the same workload in stock vLLM (plugin disabled), in a child process."""
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        prompts_path = Path(tmp) / "prompts.json"
        prompts_path.write_text(json.dumps(prompts))
        out = Path(tmp) / "stock.json"
        cmd = [sys.executable, __file__, "--child-stock", "--model", str(model), "--dtype", args.dtype,
               "--reps", str(args.reps), "--prompts", str(args.prompts), "--length", str(args.length),
               "--json", str(out)] + (["--compiled"] if args.compiled else [])
        env = {**os.environ, "NEGABLATE_DISABLE": "1", "NEGABLATE_PROMPTS": str(prompts_path)}
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["median_s"]


def stock_child(args) -> None:
    import os

    from vllm_negablate.offline import score_prompts
    from vllm_negablate.testing.engines import make_llm, shutdown

    prompts = json.loads(Path(os.environ["NEGABLATE_PROMPTS"]).read_text())
    llm = make_llm(args.model, dtype=args.dtype, enforce_eager=not args.compiled,
                   kv_cache_memory_bytes=1024 * 2**20, max_num_seqs=args.prompts,
                   max_model_len=max(512, args.length + 8), enable_prefix_caching=False)
    # the same call as the plugin runs (no set named: plain SamplingParams), so the
    # Python work of building requests and reading log-probs is identical on both sides
    score_prompts(llm, prompts[:4])
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        score_prompts(llm, prompts)
        times.append(time.perf_counter() - t)
    shutdown(llm)
    Path(args.json).write_text(json.dumps({"median_s": statistics.median(times)}))


if __name__ == "__main__":
    main()
