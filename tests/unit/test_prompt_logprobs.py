"""Batched prompt log-probs (vllm_negablate.prompt_logprobs) equal the per-request loop."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_negablate.prompt_logprobs import (
    MAX_CHUNK_ROWS,
    SCORE_CHUNK_BYTES,
    PromptRows,
    mark_skipped,
    rows_from,
    rows_per_chunk,
    score_rows,
)

HIDDEN, VOCAB = 16, 50


def gather(logprobs: torch.Tensor, k: int, token_ids: torch.Tensor):
    """vLLM's Sampler.gather_logprobs: top-k then the target, and the target's rank."""
    top_lp, top_ids = torch.topk(logprobs, k, dim=-1)
    target_lp = logprobs.gather(-1, token_ids.unsqueeze(-1))
    ranks = (logprobs >= target_lp).sum(-1)
    return torch.cat([token_ids.unsqueeze(-1), top_ids], 1), torch.cat([target_lp, top_lp], 1), ranks


def target(n: int, k: int):
    return SimpleNamespace(logprob_token_ids=torch.full((n, k + 1), -1, dtype=torch.int64),
                           logprobs=torch.full((n, k + 1), float("nan")),
                           selected_token_ranks=torch.full((n,), -1, dtype=torch.int64))


@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("chunk_rows", [1, 4, 7, None])
def test_batched_rows_equal_the_per_request_loop(k, chunk_rows):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen)
    hidden = torch.randn(40, HIDDEN, generator=gen)
    # (offset in the step, rows this step, first row of the request's output, its tokens)
    layout = [(0, 5, 0), (5, 1, 3), (6, 11, 0), (20, 9, 2)]  # gaps: other requests' rows
    group, expected = [], []
    for i, (offset, count, start) in enumerate(layout):
        tokens = torch.randint(0, VOCAB, (count,), generator=gen)
        out = target(start + count + 2, k)
        group.append(PromptRows(offset=offset, count=count, start=start, target=out, token_ids=tokens.tolist()))
        # vLLM's loop: this request's rows alone
        ref = gather((hidden[offset:offset + count] @ weight.T).log_softmax(-1), k, tokens)
        expected.append((out, start, count, ref, i))

    score_rows(hidden, group, k, compute_logits=lambda h: h @ weight.T,
               compute_scores=lambda logits: logits.log_softmax(-1), gather=gather,
               vocab_size=VOCAB, chunk_rows=chunk_rows)

    for out, start, count, (ids, lps, ranks), _ in expected:
        rows = slice(start, start + count)
        assert torch.equal(out.logprob_token_ids[rows], ids)
        torch.testing.assert_close(out.logprobs[rows], lps, rtol=1e-6, atol=1e-5)  # matmul blocking only
        assert torch.equal(out.selected_token_ranks[rows], ranks)
        assert out.selected_token_ranks[rows].min() >= 1
        # rows outside this step are untouched
        assert torch.isnan(out.logprobs[:start]).all() and torch.isnan(out.logprobs[start + count:]).all()


def test_chunk_rows_bound_the_float32_scores():
    assert rows_per_chunk(49_152) == MAX_CHUNK_ROWS == 256  # the cap (the budget allows 682)
    assert rows_per_chunk(262_144) == SCORE_CHUNK_BYTES // (4 * 262_144) == 128
    assert rows_per_chunk(10**12) == 1  # never zero


def test_empty_group_computes_nothing():
    def boom(_):
        raise AssertionError("no rows, no logits")
    score_rows(torch.zeros(3, HIDDEN), [], 0, compute_logits=boom, compute_scores=boom, gather=boom,
               vocab_size=VOCAB)


@pytest.mark.parametrize("first_row", [0, 2, 5, 7, 9, 30])
def test_a_continuation_request_computes_only_its_rows_and_marks_the_rest(first_row):
    """A request's prompt arrives in chunks (rows 0-4, 5-8, 9-12 of 13); from row
    ``first_row`` on, the rows equal the full computation's, before it they read NaN with
    the prompt token and rank -1, whatever chunk they fall in, and no LM-head row is spent."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen)
    hidden = torch.randn(13, HIDDEN, generator=gen)
    tokens = torch.randint(0, VOCAB, (13,), generator=gen).tolist()
    full, part = target(13, 0), target(13, 0)
    computed = []

    def logits(h):
        computed.append(h.shape[0])
        return h @ weight.T

    kw = dict(compute_scores=lambda x: x.log_softmax(-1), gather=gather, vocab_size=VOCAB)
    for start, count in ((0, 5), (5, 4), (9, 4)):
        rows = PromptRows(offset=start, count=count, start=start, target=full, token_ids=tokens[start:start + count])
        score_rows(hidden, [rows], 0, compute_logits=lambda h: h @ weight.T, **kw)
        kept, skipped = rows_from(PromptRows(offset=start, count=count, start=start, target=part,
                                             token_ids=tokens[start:start + count]), first_row)
        assert skipped == min(max(0, first_row - start), count)
        mark_skipped(part, start, tokens[start:start + skipped])
        if kept is not None:
            assert (kept.offset, kept.start, kept.count) == (start + skipped, start + skipped, count - skipped)
            score_rows(hidden, [kept], 0, compute_logits=logits, **kw)
    first = min(first_row, 13)
    assert sum(computed) == 13 - first
    torch.testing.assert_close(part.logprobs[first:], full.logprobs[first:], rtol=1e-6, atol=1e-5)  # blocking
    assert torch.equal(part.selected_token_ranks[first:], full.selected_token_ranks[first:])
    assert torch.isnan(part.logprobs[:first]).all()
    assert (part.selected_token_ranks[:first] == -1).all()
    assert part.logprob_token_ids[:first, 0].tolist() == tokens[:first]
