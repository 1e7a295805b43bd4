"""The scoring speed-ups change nothing that is computed.

* Batched prompt log-probs (``NEGABLATE_BATCHED_PROMPT_LOGPROBS``, on by default) give
  the values, top-k ids and ranks of vLLM's per-request loop, with prompts split over
  steps (chunked prefill), mixed top-k counts and a neuron set active.
* The CPU RMSNorm kernel is in force (the engine logs it first in the IR op priority) and
  the scores under it stay oracle-equal on the model whose q/k norms see strided views.
"""

from __future__ import annotations

import pytest

from vllm_negablate.oracle import HFAblationOracle
from vllm_negablate.testing.engines import TOL, make_llm, max_diff, random_prompts, shutdown
from vllm_negablate.testing.sets import random_set

pytestmark = pytest.mark.slow

# bf16 vLLM vs bf16 transformers, largest per-token difference (tiny Llama, 4 x 40 tokens):
# measured 0.077 nats without a set, 0.075 with one; the tolerance is twice that. Real
# models differ by up to 1.7 nats per *sentence* (SmolLM2-135M, bench/scoring_speed.py),
# which is why bf16's effect on decisions is measured (negablate analyze precision).
BF16_TOL = 0.15


def _prompt_logprobs(model, monkeypatch, batched: bool):
    from vllm import SamplingParams

    from vllm_negablate.offline import load_neuron_set

    monkeypatch.setenv("NEGABLATE_BATCHED_PROMPT_LOGPROBS", "1" if batched else "0")
    # 48 tokens a step: the 150-token prompt is prefilled in four chunks
    llm = make_llm(model, max_num_batched_tokens=48, max_num_seqs=8, enable_chunked_prefill=True,
                   enable_prefix_caching=False)
    try:
        load_neuron_set(llm, random_set(model, "s", "negative"))
        prompts = random_prompts(1, 150, seed=1) + random_prompts(5, 11, seed=2) + random_prompts(2, 30, seed=3)
        params = [SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=0.0,
                                 extra_args={"neuron_set": "s" if i % 2 else "none"})
                  for i, k in enumerate([0, 3, 0, 0, 5, 3, 0, 1])]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [[None if pos is None else {t: (lp.logprob, lp.rank) for t, lp in pos.items()}
                 for pos in o.prompt_logprobs] for o in outs]
    finally:
        shutdown(llm)


def test_batched_prompt_logprobs_equal_the_vllm_loop(tiny_models, monkeypatch):
    looped = _prompt_logprobs(tiny_models["llama"], monkeypatch, batched=False)
    batched = _prompt_logprobs(tiny_models["llama"], monkeypatch, batched=True)
    assert [len(r) for r in batched] == [150, 11, 11, 11, 11, 11, 30, 30]
    worst = 0.0
    for a, b in zip(looped, batched, strict=True):
        assert a[0] is None and b[0] is None
        for pa, pb in zip(a[1:], b[1:], strict=True):
            assert pa.keys() == pb.keys()  # same target and top-k token ids
            for tok in pa:
                assert pa[tok][1] == pb[tok][1]  # same ranks
                worst = max(worst, abs(pa[tok][0] - pb[tok][0]))
    assert worst < 1e-5, worst
    assert sum(len(pos) > 1 for row in batched for pos in row[1:]) > 0  # top-k rows were compared


def test_a_continuation_request_gets_its_rows_and_nan_before(tiny_models, monkeypatch):
    """``PROMPT_LOGPROBS_FROM_KEY`` (what /v1/negablate/loglikelihood sets) in a live
    engine: a 150-token prompt prefilled in 48-token chunks, asked from position 100 (and
    an 11-token one from 5), beside the same prompts asked whole. From the position on,
    the values and ranks equal the whole prompt's; before it, NaN with rank -1 (computed
    rows could never read NaN), so the LM head really was skipped there."""
    import math

    from vllm import SamplingParams

    from vllm_negablate.offline import load_neuron_set
    from vllm_negablate.runtime import PROMPT_LOGPROBS_FROM_KEY

    model = tiny_models["llama"]
    monkeypatch.setenv("NEGABLATE_BATCHED_PROMPT_LOGPROBS", "1")
    llm = make_llm(model, max_num_batched_tokens=48, max_num_seqs=8, enable_chunked_prefill=True,
                   enable_prefix_caching=False)
    try:
        load_neuron_set(llm, random_set(model, "s", "negative"))
        long, short = random_prompts(1, 150, seed=1)[0], random_prompts(1, 11, seed=2)[0]
        asks = [(long, None), (long, 100), (short, None), (short, 5)]
        params = [SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, extra_args={
            "neuron_set": "s", **({PROMPT_LOGPROBS_FROM_KEY: first} if first else {})}) for _, first in asks]
        outs = llm.generate([{"prompt_token_ids": p} for p, _ in asks], params, use_tqdm=False)
    finally:
        shutdown(llm)
    rows = [[None if pos is None else (pos[p[i]].logprob, pos[p[i]].rank) for i, pos in enumerate(o.prompt_logprobs)]
            for o, (p, _) in zip(outs, asks)]
    for whole, part, first in ((rows[0], rows[1], 100), (rows[2], rows[3], 5)):
        assert all(math.isnan(lp) and rank == -1 for lp, rank in part[1:first])
        for (a, ra), (b, rb) in zip(whole[first:], part[first:], strict=True):
            assert ra == rb and abs(a - b) < 1e-5  # same rows; the chunk's matmul blocking may differ
        assert all(not math.isnan(lp) and rank >= 1 for lp, rank in whole[1:])


def test_cpu_norm_kernel_in_force_and_oracle_equal(tiny_models):
    from vllm_negablate.offline import score_prompts

    model = tiny_models["gemma3"]
    llm = make_llm(model)
    try:
        prompts = random_prompts(3, 40, seed=4)
        got = score_prompts(llm, prompts, neuron_set="none")
    finally:
        shutdown(llm)
    want = HFAblationOracle(model).batch_prompt_logprobs(prompts)
    assert max(max_diff(g, w) for g, w in zip(got, want, strict=True)) < TOL


def test_cpu_norm_provider_first_and_equal_to_native():
    import torch
    from vllm import ir
    from vllm.platforms import current_platform

    from vllm_negablate.vllm_adapter import CPU_NORM_PROVIDER, install_cpu_norm_kernel

    if not current_platform.is_cpu():
        pytest.skip("the provider is for vLLM's CPU backend")
    install_cpu_norm_kernel()
    install_cpu_norm_kernel()  # idempotent
    priority = current_platform.get_default_ir_op_priority(None)
    assert priority.rms_norm[0] == priority.fused_add_rms_norm[0] == CPU_NORM_PROVIDER
    assert priority.rms_norm.count(CPU_NORM_PROVIDER) == 1
    gen = torch.Generator().manual_seed(0)
    rounds_bf16 = torch.cpu._is_avx512_bf16_supported()  # else vLLM's kernels truncate to bf16
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.07)):  # bf16: one ulp at |x| < 16
        x = torch.randn(37, 96, generator=gen).to(dtype)
        res = torch.randn(37, 96, generator=gen).to(dtype)
        w = torch.randn(96, generator=gen).to(dtype)
        takes = ir.ops.rms_norm.impls[CPU_NORM_PROVIDER].supports_args(x, w, 1e-6)
        assert takes == (dtype == torch.float32 or rounds_bf16)
        if not takes:  # the kernel would truncate: check it does, so the guard guards something
            fast = ir.ops.fused_add_rms_norm.impls[CPU_NORM_PROVIDER].impl_fn(x.clone(), res.clone(), w, 1e-6)[1]
            exact = x.float() + res.float()
            assert (fast.float().abs() <= exact.abs()).all()  # toward zero, every element
            assert (fast != (x + res)).float().mean() > 0.1  # and often off PyTorch's rounding
            continue
        fast = ir.ops.rms_norm.impls[CPU_NORM_PROVIDER].impl_fn(x, w, 1e-6)
        ref = ir.ops.rms_norm.impls["native"].impl_fn(x, w, 1e-6)
        assert (fast.float() - ref.float()).abs().max() <= tol
        o1, r1 = ir.ops.fused_add_rms_norm.impls[CPU_NORM_PROVIDER].impl_fn(x.clone(), res.clone(), w, 1e-6)
        o2, r2 = ir.ops.fused_add_rms_norm.impls["native"].impl_fn(x.clone(), res.clone(), w, 1e-6)
        assert torch.equal(r1, r2)  # the residual sum is exact
        assert (o1.float() - o2.float()).abs().max() <= tol
        # strided input (Gemma's q/k norms on a view): the provider declines, native runs
        view = torch.randn(37, 192, generator=gen).to(dtype)[:, ::2]
        assert not ir.ops.rms_norm.impls[CPU_NORM_PROVIDER].supports_args(view, w, 1e-6)


def test_bf16_serving_matches_transformers_bf16_within_the_stated_tolerance(tiny_models):
    """bfloat16 is the fast mode, not the exact one: its log-probs are checked against
    transformers in bfloat16, with and without a set, within BF16_TOL per token (the
    README states it); float32 stays oracle-equal (TOL) in the tests above and in
    test_vllm_exact.py."""
    import torch

    from vllm_negablate.offline import load_neuron_set, score_prompts

    model = tiny_models["llama"]
    ns = random_set(model, "s", "negative")
    prompts = random_prompts(4, 40, seed=5)
    llm = make_llm(model, dtype="bfloat16")
    try:
        load_neuron_set(llm, ns)
        got = {None: score_prompts(llm, prompts, neuron_set="none"), "s": score_prompts(llm, prompts, neuron_set="s")}
    finally:
        shutdown(llm)
    oracle = HFAblationOracle(model, dtype=torch.bfloat16)
    want = {None: oracle.batch_prompt_logprobs(prompts), "s": oracle.batch_prompt_logprobs(prompts, ns)}
    worst = {k: max(max_diff(g, w) for g, w in zip(got[k], want[k], strict=True)) for k in got}
    assert max(worst.values()) < BF16_TOL, worst
    # and the set moves the bf16 scores by far more than bf16's own error
    moved = max(max_diff(a, b) for a, b in zip(got[None], got["s"], strict=True))
    assert moved > 3 * max(worst.values()), (moved, worst)
