"""What a prompt position costs after the LM head: vLLM's log-softmax and gather (top-k,
the target's log-prob and rank) over one chunk of float32 logits, per row.

    .venv/bin/python bench/logprob_tail.py --vocab 262144 --rows 128     # Gemma 3's vocabulary
    .venv/bin/python bench/logprob_tail.py --vocab 49152 --rows 256      # SmolLM2's

The functions timed are vLLM's own (``Sampler.compute_logprobs``, ``gather_logprobs``), the
ones the plugin's batched prompt log-probs call per chunk; ``--threads`` 1 and 2 side by side
(the served worker uses every core). Prints ms per row for each ``k`` (``logprobs`` asked
for: 0 for the harness, 1 for lm_eval) and thread count; best of ``--reps`` rounds.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--rows", type=int, default=128, help="rows per chunk (the plugin's chunk for this vocabulary)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from vllm_negablate.vllm_adapter import sampler_logprob_functions

    compute_logprobs, gather_logprobs = sampler_logprob_functions()

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(args.rows, args.vocab, generator=gen) * 3
    targets = torch.randint(0, args.vocab, (args.rows,), generator=gen)
    results = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for k in (0, 1):
            def tail() -> None:
                gather_logprobs(compute_logprobs(logits), k, targets)

            tail()
            best = float("inf")
            for _ in range(args.reps):
                start = time.perf_counter()
                for _ in range(5):
                    tail()
                best = min(best, (time.perf_counter() - start) / 5 / args.rows * 1e3)
            results.append({"vocab": args.vocab, "rows": args.rows, "threads": threads, "k": k, "ms_per_row": best})
            print(f"vocab {args.vocab:,}, {threads} thread(s), logprobs {k}: {best:.3f} ms per row")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
