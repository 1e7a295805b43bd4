"""What each scoring-speed lever gives, measured side by side on one model and dtype.

    .venv/bin/python bench/levers.py --model smollm2-135m --dtype bfloat16 --json /tmp/levers.json
    .venv/bin/python bench/levers.py --tiny --reps 1 --pairs 8        # smoke

The same BLiMP sentences as ``bench/scoring_speed.py`` (start token + tokens, scored
whole, unablated), two parts:

* **engine** (``vllm.LLM`` + ``score_prompts``, one engine per configuration, each
  warmed up, then ``--reps`` timed passes; the first configuration runs again at the
  end so drift shows):

  - ``vllm``: stock vLLM behaviour: vLLM's per-request prompt log-probs
    (``NEGABLATE_BATCHED_PROMPT_LOGPROBS=0``) and PyTorch RMSNorm (``ir_op_priority``
    native first);
  - ``+cpu_rms_norm``: RMSNorm through vLLM's C++ CPU kernels (our IR-op provider);
  - ``+batched_logprobs``: and the prompt log-probs of a step computed together
    (the plugin's default);
  - ``+compiled`` (``--compiled``): and ``enforce_eager=False`` (torch.compile; a
    minute or more to start);
  - ``rows=N`` (``--chunk-rows N,...``): the batched prompt log-probs with N rows per
    chunk (``NEGABLATE_SCORE_CHUNK_ROWS``) instead of the default policy.

  ``--configs A,B`` times only those (A is the baseline of the ratios).

* **request** (``negablate serve`` with the defaults, the harness's scorer path over
  HTTP): ``logprobs`` 1 vs 0 in the request and sentences per request
  (``--batch-sizes``), alternating in rounds, each after an untimed settle.

Prints tokens/s per configuration and the ratio to the first; ``--json`` writes all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

from _common import DEFAULT_PARADIGMS, bench_model, blimp_pairs, log, machine_facts  # noqa: E402

NATIVE_NORM = {"rms_norm": ["native"], "fused_add_rms_norm": ["native"]}
ENGINE_CONFIGS = {  # name: (env NEGABLATE_BATCHED_PROMPT_LOGPROBS, ir_op_priority, enforce_eager)
    "vllm": ("0", NATIVE_NORM, True),
    "+cpu_rms_norm": ("0", None, True),
    "+batched_logprobs": ("1", None, True),
    "+compiled": ("1", None, False),
}


@contextlib.contextmanager
def env(name: str, value: str):
    """``name=value`` inside the block (``""``: unset)."""
    old = os.environ.get(name)
    if value:
        os.environ[name] = value
    else:
        os.environ.pop(name, None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def engine_pass(model: Path, dtype: str, seqs: list[list[int]], config: str, args) -> dict:
    from vllm import LLM

    from vllm_negablate.offline import score_prompts
    from vllm_negablate.vllm_adapter import shutdown_llm

    batched, priority, eager = ENGINE_CONFIGS.get(config, ENGINE_CONFIGS["+batched_logprobs"])
    rows = config.split("=", 1)[1] if config.startswith("rows=") else ""
    kwargs = dict(model=str(model), dtype=dtype, seed=0, enforce_eager=eager,
                  max_num_batched_tokens=args.batched_tokens, max_num_seqs=args.max_num_seqs,
                  max_model_len=args.max_model_len, kv_cache_memory_bytes=args.kv_cache_mb << 20)
    if priority:
        kwargs["ir_op_priority"] = priority
    with env("NEGABLATE_BATCHED_PROMPT_LOGPROBS", batched), env("NEGABLATE_SCORE_CHUNK_ROWS", rows):
        t0 = time.perf_counter()
        llm = LLM(**kwargs)
        setup = time.perf_counter() - t0
    try:
        first = score_prompts(llm, seqs)  # warm-up
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            score_prompts(llm, seqs)
            times.append(time.perf_counter() - t0)
    finally:
        shutdown_llm(llm)
        del llm
        gc.collect()
    sums = [sum(x for x in row if x is not None) for row in first]
    return {"config": config, "setup_s": setup, "times_s": times, "sums": sums}


def request_part(model: Path, dtype: str, seqs: list[list[int]], args, work: Path) -> list[dict]:
    import httpx

    from server.launcher import serve

    variants = [(lp, bs) for lp in (1, 0) for bs in args.batch_sizes]
    out = {v: [] for v in variants}
    with serve(model, "--max-num-batched-tokens", str(args.batched_tokens), "--max-num-seqs",
               str(args.max_num_seqs), log_path=work / "server.log", served_name="bench", dtype=dtype,
               kv_cache_bytes=args.kv_cache_mb << 20, max_model_len=args.max_model_len,
               bind_all_cores=True) as server:

        async def run(logprobs: int, batch: int) -> int:
            limit = asyncio.Semaphore(args.concurrency)
            async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:
                async def one(prompts):
                    body = {"model": "bench", "prompt": prompts, "echo": True, "logprobs": logprobs,
                            "max_tokens": 0, "temperature": 0}
                    async with limit:
                        r = await client.post("/v1/completions", json=body)
                    r.raise_for_status()
                    return len(r.content)
                sizes = await asyncio.gather(*[one(seqs[i:i + batch]) for i in range(0, len(seqs), batch)])
            return sum(sizes)

        nbytes = {v: asyncio.run(run(*v)) for v in variants}  # warm-up
        for _ in range(args.reps):
            for v in variants:
                time.sleep(args.settle)
                t0 = time.perf_counter()
                asyncio.run(run(*v))
                out[v].append(time.perf_counter() - t0)
    return [{"logprobs": lp, "batch_size": bs, "times_s": out[lp, bs], "response_bytes": nbytes[lp, bs]}
            for lp, bs in variants]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="embedded name or HF model dir (default: --tiny)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (smoke runs)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--pairs", type=int, default=400)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--parts", default="engine,request", help="engine, request or both")
    p.add_argument("--compiled", action="store_true", help="also time torch.compile (slow start)")
    p.add_argument("--chunk-rows", default="", help="also time the batched prompt log-probs with these "
                   "rows per chunk (NEGABLATE_SCORE_CHUNK_ROWS), e.g. 128,512: configs rows=N")
    p.add_argument("--configs", default="", help="time only these engine configs (comma-separated names; "
                   "the first is the baseline of the ratios)")
    p.add_argument("--batch-sizes", default="32,64,128", help="sentences per request to try")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--settle", type=float, default=1.5)
    p.add_argument("--max-num-batched-tokens", dest="batched_tokens", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--kv-cache-mb", type=int, default=512)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    parts = set(args.parts.split(","))

    from server.launcher import exit_on_sigterm
    from vllm_negablate.offline import bind_worker_to_all_cores
    from vllm_negablate.models import resolve_model

    exit_on_sigterm()
    bind_worker_to_all_cores()
    with tempfile.TemporaryDirectory(prefix="negablate-levers-") as tmp:
        work = Path(tmp)
        model, start = bench_model(None if args.tiny else resolve_model(args.model or "smollm2-135m"), work)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model))
        sid = start if start is not None else (tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)
        _, pairs = blimp_pairs(",".join(DEFAULT_PARADIGMS), args.pairs)
        seqs = [[sid, *tok(s, add_special_tokens=False)["input_ids"]] for pr in pairs for s in (pr.good, pr.bad)]
        tokens = sum(map(len, seqs))
        log(f"{model.name} {args.dtype}: {len(seqs)} sentences, {tokens} tokens")
        result: dict = {"machine": machine_facts(), "model": model.name, "dtype": args.dtype,
                        "tokens": tokens, "sentences": len(seqs), "engine": [], "request": []}
        if "engine" in parts:
            configs = [c for c in ENGINE_CONFIGS if c != "+compiled" or args.compiled]
            configs += [f"rows={n}" for n in args.chunk_rows.split(",") if n]
            if args.configs:
                configs = [c for c in args.configs.split(",") if c]
                unknown = [c for c in configs if c not in ENGINE_CONFIGS and not c.startswith("rows=")]
                if unknown:
                    p.error(f"--configs: unknown {unknown}; use {', '.join(ENGINE_CONFIGS)} or rows=N")
            configs.append(configs[0])  # the first again at the end: drift shows
            for config in configs:
                log(f"engine: {config} ...")
                result["engine"].append(engine_pass(model, args.dtype, seqs, config, args))
            base = statistics.median(result["engine"][0]["times_s"])
            first_sums = result["engine"][0]["sums"]
            print(f"\nengine ({model.name}, {args.dtype}, {tokens} tokens, median of {args.reps}):")
            for r in result["engine"]:
                med = statistics.median(r["times_s"])
                r["tok_s"], r["ratio"] = tokens / med, base / med
                diff = max(abs(a - b) for a, b in zip(r.pop("sums"), first_sums, strict=True))
                r["max_sum_diff_vs_first"] = diff
                print(f"  {r['config']:<20} {r['tok_s']:8.0f} tok/s  x{r['ratio']:.2f}  "
                      f"(start {r['setup_s']:.0f} s; max |sum diff| vs {configs[0]} {diff:.2g})")
        if "request" in parts:
            log("request: logprobs and batch sizes ...")
            result["request"] = request_part(model, args.dtype, seqs, args, work)
            base = statistics.median(result["request"][0]["times_s"])
            print(f"\nrequests to negablate serve ({args.concurrency} in flight, median of {args.reps}):")
            for r in result["request"]:
                med = statistics.median(r["times_s"])
                r["tok_s"], r["ratio"] = tokens / med, base / med
                print(f"  logprobs {r['logprobs']} x {r['batch_size']:>3} sentences  {r['tok_s']:8.0f} tok/s  "
                      f"x{r['ratio']:.2f}  ({r['response_bytes'] / 1e6:.2f} MB of JSON)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
