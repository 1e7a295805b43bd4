"""Prompt log-probabilities as continuations: the rows a sequence shares with the one
before it are copied, not computed again.

Why: the harness scores minimal pairs, and the two sentences of a pair usually begin
alike ("The cats that the dog sees *sleep* / *sleeps*"): over BLiMP 19% of all rows are
the second sentence's shared prefix, over TSE 29% (Gemma 3's tokenizer), and each row
costs a vocabulary-wide LM head and log-softmax (on Gemma 3 270M over half the scoring
time). Row ``j`` of a sequence (``log p(s[j] | s[:j])``) depends only on ``s[:j+1]``, so
where ``s[:L]`` equals the previous sequence's first ``L`` tokens, rows ``1 .. L-1`` are
that sequence's rows; only rows ``L ..`` are computed, through ``negablate serve``'s
``/v1/negablate/loglikelihood`` (context ``s[:L]``, continuation ``s[L:]``), which skips
the LM head for the context rows. The result is the same list the completions echo gives
(first entry ``None``), equal to it within float noise (the same rows, in other batches).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["assemble", "plan"]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan(prompts: Sequence[Sequence[int]]) -> list[int | None]:
    """Per prompt, where its computed rows begin (the continuation's first index, >= 1),
    or None when every row is copied from the prompt before (it is a prefix of that one).
    The first prompt, and any prompt sharing nothing with the one before, start at 1.
    Prompts must have at least 2 tokens."""
    out: list[int | None] = []
    for i, p in enumerate(prompts):
        if len(p) < 2:
            raise ValueError(f"prompt {i} has {len(p)} token(s): nothing to score")
        shared = _common_prefix(p, prompts[i - 1]) if i else 0
        out.append(None if shared >= len(p) else max(shared, 1))
    return out


def assemble(prompts: Sequence[Sequence[int]], starts: Sequence[int | None],
             computed: Sequence[Sequence[float]]) -> list[list[float | None]]:
    """Each prompt's rows ``[None, lp_1, ...]``: rows before its start copied from the
    prompt before, the rest from ``computed`` (one list per prompt with a start, in order,
    each as long as that prompt's continuation)."""
    parts = iter(computed)
    out: list[list[float | None]] = []
    for i, (p, start) in enumerate(zip(prompts, starts, strict=True)):
        first = len(p) if start is None else start
        rows: list[float | None] = [None, *out[i - 1][1:first]] if first > 1 else [None]
        if start is not None:
            part = list(next(parts))
            if len(part) != len(p) - start:
                raise ValueError(f"prompt {i}: {len(part)} continuation log-probs for {len(p) - start} tokens")
            rows += part
        if len(rows) != len(p):
            raise ValueError(f"prompt {i}: {len(rows)} rows for {len(p)} tokens")
        out.append(rows)
    if next(parts, None) is not None:
        raise ValueError("more continuation results than prompts to score")
    return out
