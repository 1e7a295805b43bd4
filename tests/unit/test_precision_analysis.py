"""The bf16-vs-fp32 comparison's numbers (eval.analysis.precision), on records with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from eval.analysis.precision import (
    PrecisionResult,
    delta_agreement,
    paradigm_flips,
    report_markdown,
    write_outputs,
)
from eval.stats import bootstrap_mean_ci


def recs(correct: dict[str, list[int]]) -> list[dict]:
    return [{"paradigm": p, "pair_id": i, "correct": bool(c)} for p, cs in correct.items() for i, c in enumerate(cs)]


def test_flips_per_paradigm():
    fp = recs({"a": [1, 1, 0, 0], "b": [1, 1, 1, 1]})
    bf = recs({"a": [1, 0, 1, 0], "b": [1, 1, 1, 1]})
    rows = paradigm_flips("baseline", fp, list(reversed(bf)))  # order does not matter
    assert [(r.paradigm, r.n, r.flips, r.acc_fp32, r.acc_bf16) for r in rows] == [
        ("a", 4, 2, 0.5, 0.5), ("b", 4, 0, 1.0, 1.0)]
    with pytest.raises(ValueError, match="different pairs"):
        paradigm_flips("baseline", fp, bf[:-1])


def test_delta_agreement_same_effect_agrees_and_a_different_one_does_not():
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.8
    cond = base & (rng.random(400) > 0.2)  # the set breaks ~20% of the right pairs
    b, c = recs({"p": base.astype(int).tolist()}), recs({"p": cond.astype(int).tolist()})
    same = delta_agreement("W", b, c, b, c, n_boot=500)
    assert same.delta_fp32 == same.delta_bf16 == pytest.approx(cond.mean() - base.mean())
    assert same.diff == 0 and same.diff_ci == (0.0, 0.0) and same.agree
    assert same.ci_fp32[0] < same.delta_fp32 < same.ci_fp32[1] < 0
    no_effect = delta_agreement("W", b, c, b, b, n_boot=500)  # in bf16 the set does nothing
    assert no_effect.delta_bf16 == 0 and not no_effect.agree
    assert no_effect.diff == pytest.approx(base.mean() - cond.mean())


def test_the_shared_bootstrap_brackets_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = rng.choice([-1.0, 0.0, 1.0], 100)
    big = rng.choice([-1.0, 0.0, 1.0], 10_000)
    lo_s, hi_s = bootstrap_mean_ci(small, 1000, 0.05, 0)
    lo_b, hi_b = bootstrap_mean_ci(big, 1000, 0.05, 0)
    assert lo_s < small.mean() < hi_s and lo_b < big.mean() < hi_b
    assert (hi_b - lo_b) < (hi_s - lo_s) / 5  # ~1/sqrt(100)


def test_outputs(tmp_path):
    fp = recs({"a": [1, 1, 0, 0], "b": [1, 0, 1, 1]})
    bf = recs({"a": [1, 0, 1, 0], "b": [1, 0, 1, 1]})
    rows = paradigm_flips("baseline", fp, bf) + paradigm_flips("W", fp, fp)
    d = delta_agreement("W", fp, fp, bf, fp, n_boot=200)
    r = PrecisionResult(model="m", blimp_per_paradigm=4, n_pairs=8, conditions=["baseline", "W"],
                        flips_overall={"baseline": 2, "W": 0}, flip_rate_overall={"baseline": 0.25, "W": 0.0},
                        max_paradigm_flip_rate={"baseline": 0.5, "W": 0.0}, paradigms=rows, deltas=[d])
    write_outputs(r, tmp_path)
    assert PrecisionResult.model_validate_json((tmp_path / "precision.json").read_text()) == r
    assert (tmp_path / "paradigms.csv").read_text().splitlines()[1].startswith("baseline,a,4,2,")
    md = report_markdown(r)
    assert "| baseline | 2 | 25.00% | 50.0% |" in md and "| W |" in md
    assert (tmp_path / "flips.png").stat().st_size > 1000
