"""Prompt log-probabilities of many requests in a few large products.

Scoring a BLiMP step means ~256 prompts of ~10 tokens each. Computing their LM
head, log-softmax and rank count one request at a time (vLLM's loop) makes 256
thin matrix products and 256 small reductions; gathering the rows of all
requests and computing them in chunks of a few hundred rows is about 2x faster
for that part on CPU (SmolLM2-135M's shapes in bf16, LM head + log-softmax + rank
alone: 0.50 -> 0.22 ms per token; end to end: ``bench/levers.py``). Nothing here knows vLLM: the adapter
(:mod:`vllm_negablate.vllm_adapter`) passes vLLM's own functions in, and this
module only decides which rows go together and where each result lands.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: Bytes of float32 scores one chunk may hold (rows x vocabulary x 4), and the most rows.
#: 128 MiB and 256 rows give 256 rows for a 49k vocabulary and 128 for Gemma's 262k: the
#: fastest sizes measured on this project's CPU (LM head + log-softmax + rank; 512 rows
#: were 35% slower for SmolLM2-135M, 64 rows 7% slower for Gemma 3 270M). The memory
#: stays flat in the step size (a few hundred MiB at most, beside GiBs of weights).
SCORE_CHUNK_BYTES = 128 << 20
MAX_CHUNK_ROWS = 256


@dataclass
class PromptRows:
    """The rows one request contributes in this step.

    ``offset``/``count``: where its positions sit in the step's hidden states;
    ``token_ids``: the token each position must predict (the next prompt token);
    ``target``: a ``LogprobsTensors``-like object (``logprob_token_ids``,
    ``logprobs``, ``selected_token_ranks``) whose rows ``start .. start+count``
    receive the results.
    """

    offset: int
    count: int
    start: int
    target: Any
    token_ids: Sequence[int]


def rows_from(rows: PromptRows, first_row: int) -> tuple[PromptRows | None, int]:
    """``rows`` without the target rows before ``first_row``, and how many were dropped.

    A request that wants only its continuation's log-probabilities (prompt tokens
    ``first .. n-1``, i.e. target rows ``first - 1 ..``; see
    :data:`vllm_negablate.runtime.PROMPT_LOGPROBS_FROM_KEY`) needs neither the LM head
    nor the log-softmax at the rows before: on Gemma 3 (a 262k vocabulary) the LM head
    is most of a token's FLOPs. Returns ``(None, count)`` when the whole chunk is
    before ``first_row``. The dropped rows are filled by :func:`mark_skipped`.
    """
    skip = min(max(0, first_row - rows.start), rows.count)
    if skip == rows.count:
        return None, skip
    if not skip:
        return rows, 0
    return PromptRows(offset=rows.offset + skip, count=rows.count - skip, start=rows.start + skip,
                      target=rows.target, token_ids=rows.token_ids[skip:]), skip


def mark_skipped(target: Any, start: int, token_ids: Sequence[int]) -> None:
    """Fill target rows ``start .. start+len(token_ids)`` that were not computed: the
    prompt token itself as the only id, a NaN log-probability and rank -1, so that a
    skipped row can never pass for a computed one (vLLM turns the rows into ``Logprob``
    objects whatever they hold; the token ids must be valid for its detokenizer)."""
    if not token_ids:
        return
    dest = slice(start, start + len(token_ids))
    ids = torch.tensor(list(token_ids), dtype=target.logprob_token_ids.dtype)
    target.logprob_token_ids[dest] = ids.unsqueeze(1)
    target.logprobs[dest] = float("nan")
    target.selected_token_ranks[dest] = -1


def rows_per_chunk(vocab_size: int, budget_bytes: int = SCORE_CHUNK_BYTES) -> int:
    """How many rows fit a chunk of float32 scores of ``vocab_size`` columns (at most
    :data:`MAX_CHUNK_ROWS`)."""
    return max(1, min(MAX_CHUNK_ROWS, budget_bytes // (4 * max(1, vocab_size))))


def score_rows(
    hidden_states: torch.Tensor,
    group: Sequence[PromptRows],
    num_logprobs: int,
    *,
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    compute_scores: Callable[[torch.Tensor], torch.Tensor],
    gather: Callable[[torch.Tensor, int, torch.Tensor], tuple],
    vocab_size: int,
    chunk_rows: int | None = None,
) -> None:
    """Score every row of ``group`` (requests asking for ``num_logprobs`` top
    log-probs) and copy each request's results into its ``target`` rows.

    ``compute_logits`` maps hidden states to logits, ``compute_scores`` logits to
    the scores that are reported (log-softmax, or raw logits), and ``gather``
    returns ``(top token ids, their scores, rank of the target)`` as vLLM's
    ``Sampler.gather_logprobs`` does. Row order inside a chunk does not change any
    row's value (each row's softmax and rank are its own). ``chunk_rows`` overrides
    :func:`rows_per_chunk` (``NEGABLATE_SCORE_CHUNK_ROWS``; tests).
    """
    if not group:
        return
    device = hidden_states.device
    index = torch.cat([torch.arange(r.offset, r.offset + r.count) for r in group]).to(device)
    rows = hidden_states.index_select(0, index)
    targets = torch.tensor([t for r in group for t in r.token_ids], dtype=torch.int64, device=device)
    chunk = chunk_rows or rows_per_chunk(vocab_size)
    ids, scores, ranks = [], [], []
    for start in range(0, rows.shape[0], chunk):
        logits = compute_logits(rows[start:start + chunk])
        got = gather(compute_scores(logits), num_logprobs, targets[start:start + chunk])
        ids.append(got[0])
        scores.append(got[1])
        ranks.append(got[2])
    all_ids, all_scores, all_ranks = torch.cat(ids), torch.cat(scores), torch.cat(ranks)
    at = 0
    for r in group:
        part = slice(at, at + r.count)
        dest = slice(r.start, r.start + r.count)
        r.target.logprob_token_ids[dest].copy_(all_ids[part], non_blocking=True)
        r.target.logprobs[dest].copy_(all_scores[part], non_blocking=True)
        r.target.selected_token_ranks[dest].copy_(all_ranks[part], non_blocking=True)
        at += r.count
