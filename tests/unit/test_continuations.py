"""eval.continuations: which rows a sequence copies from the one before it, and the
assembled rows, checked position by position against a direct computation."""

from __future__ import annotations

import pytest

from eval.continuations import assemble, plan


def rows_of(seq: list[int]) -> list[float | None]:
    """A prefix-determined 'model': row j depends on seq[:j+1] only (as a causal LM's)."""
    return [None] + [-(sum(seq[: j + 1]) % 13) - 0.5 * j for j in range(1, len(seq))]


def test_plan_and_assemble_equal_the_direct_rows():
    prompts = [[2, 5, 6, 7], [2, 5, 6, 8, 9], [2, 5, 6], [2, 9], [2, 9], [2, 9, 9, 9], [3, 4]]
    starts = plan(prompts)
    assert starts == [1, 3, None, 1, None, 2, 1]
    computed = [rows_of(p)[st:] for p, st in zip(prompts, starts) if st is not None]
    assert [len(c) for c in computed] == [3, 2, 1, 2, 1]
    assert assemble(prompts, starts, computed) == [rows_of(p) for p in prompts]
    # rows computed: 9 of the 15 a plain echo computes
    assert sum(map(len, computed)) == 9 and sum(len(p) - 1 for p in prompts) == 15


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="prompt 1 has 1 token"):
        plan([[2, 5], [2]])
    prompts = [[2, 5, 6], [2, 5, 7]]
    starts = plan(prompts)
    with pytest.raises(ValueError, match="prompt 1: 2 continuation log-probs for 1 tokens"):
        assemble(prompts, starts, [[-1.0, -2.0], [-3.0, -4.0]])
    with pytest.raises(ValueError, match="more continuation results"):
        assemble(prompts, starts, [[-1.0, -2.0], [-3.0], [-5.0]])
