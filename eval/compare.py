"""Compare two run directories (A = baseline, B = e.g. ablated) pair by pair.

Minimal-pair runs (BLiMP, TSE): :func:`eval.stats.compare_runs` on the pairs both
runs hold (they must hold the same ones), per group level of the task (BLiMP:
paradigm, phenomenon; TSE: test, group) and overall. ``delta = acc_B - acc_A``
with a paired bootstrap CI and McNemar's p-value (uncorrected).

Perplexity runs: windows are matched by ``window_id`` (same text, tokenizer and
window size are checked); reported are both perplexities, ``delta_nll`` (B - A,
nats/token) and a paired bootstrap CI over windows of the NLL difference.

Files written to ``out``: ``comparison.csv``, ``comparison.json`` and, for pair
runs, ``comparison.png`` (per-phenomenon deltas with CI error bars).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from eval.stats import OVERALL, ComparisonRow, RunMismatchError, compare_runs
from eval.tasks import PairRunSummary, PerplexitySummary, load_records, load_summary

__all__ = ["ComparisonResult", "PerplexityComparison", "compare_dirs", "plot_deltas", "print_comparison"]


class ComparisonResult(BaseModel):
    task: str
    metric: str  # the record field compared: correct, correct_sum, correct_mean
    run_a: dict[str, Any]
    run_b: dict[str, Any]
    n_pairs: int
    n_boot: int
    alpha: float
    seed: int
    group_keys: list[str]
    rows: list[ComparisonRow]


class PerplexityComparison(BaseModel):
    task: str = "perplexity"
    run_a: dict[str, Any]
    run_b: dict[str, Any]
    n_windows: int
    n_tokens: int
    nll_a: float
    nll_b: float
    ppl_a: float
    ppl_b: float
    delta_nll: float
    ci_lo: float
    ci_hi: float
    ppl_ratio: float


def _ident(s: PairRunSummary | PerplexitySummary, d: Path) -> dict[str, Any]:
    return {"dir": str(d), "model": s.run.model, "base_model": s.run.base_model,
            "neuron_set": s.run.neuron_set, "server": s.run.server}


def _label(r: dict[str, Any]) -> str:
    return f"{r['base_model']}@{r['neuron_set']}" if r["neuron_set"] else r["base_model"]


def plot_deltas(result: ComparisonResult, path: str | os.PathLike[str], level: str | None = None) -> Path:
    """Horizontal bars of ``delta`` per group of ``level`` (default: phenomenon for
    BLiMP, field for TSE; paradigm if the level is absent) with CI error bars, plus overall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = {r.level for r in result.rows}
    if level is None:
        level = next((lv for lv in ("phenomenon", "field", "paradigm") if lv in levels), OVERALL)
    rows = [r for r in result.rows if r.level == level] + [r for r in result.rows if r.level == OVERALL]
    labels = [f"{r.group} (n={r.n})" for r in rows]
    deltas = np.array([r.delta for r in rows]) * 100
    lo = deltas - np.array([r.ci_lo for r in rows]) * 100
    hi = np.array([r.ci_hi for r in rows]) * 100 - deltas
    colors = ["#b2182b" if r.ci_hi < 0 else ("#2166ac" if r.ci_lo > 0 else "#999999") for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.38 * len(rows) + 1.6))
    y = np.arange(len(rows))[::-1]
    ax.barh(y, deltas, xerr=np.vstack([lo, hi]), color=colors, capsize=3, ecolor="black")
    ax.set_yticks(y, labels, fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"accuracy B − A (percentage points), {100 * (1 - result.alpha):.0f}% paired bootstrap CI")
    ax.set_title(f"{result.task} ({result.metric}): {_label(result.run_b)} vs {_label(result.run_a)}",
                 fontsize=9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _compare_ppl(a: PerplexitySummary, b: PerplexitySummary, da: Path, db: Path, *,
                 n_boot: int, alpha: float, seed: int) -> PerplexityComparison:
    for f in ("text_sha256", "window", "text_tokens"):
        if getattr(a, f) != getattr(b, f):
            raise RunMismatchError(f"perplexity runs differ in {f}: {getattr(a, f)!r} vs {getattr(b, f)!r}")
    ra = {r["window_id"]: r for r in load_records(da)}
    rb = {r["window_id"]: r for r in load_records(db)}
    if ra.keys() != rb.keys():
        raise RunMismatchError(f"the runs cover different windows: A has {len(ra)}, B has {len(rb)}")
    ids = sorted(ra)
    na = np.array([ra[i]["n_tokens"] for i in ids], dtype=np.float64)
    if any(ra[i]["n_tokens"] != rb[i]["n_tokens"] for i in ids):
        raise RunMismatchError("windows differ in token counts (different tokenizers?)")
    sa = np.array([ra[i]["nll_sum"] for i in ids])
    sb = np.array([rb[i]["nll_sum"] for i in ids])
    ntok = float(na.sum())
    nll_a, nll_b = float(sa.sum() / ntok), float(sb.sum() / ntok)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ids), size=(n_boot, len(ids)))
    reps = (sb[idx].sum(1) - sa[idx].sum(1)) / na[idx].sum(1)
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return PerplexityComparison(
        run_a=_ident(a, da), run_b=_ident(b, db), n_windows=len(ids), n_tokens=int(ntok),
        nll_a=nll_a, nll_b=nll_b, ppl_a=math.exp(nll_a), ppl_b=math.exp(nll_b),
        delta_nll=nll_b - nll_a, ci_lo=float(lo), ci_hi=float(hi),
        ppl_ratio=math.exp(nll_b - nll_a),
    )


def compare_dirs(
    run_a: str | os.PathLike[str], run_b: str | os.PathLike[str], out: str | os.PathLike[str], *,
    metric: str = "correct", n_boot: int = 10000, alpha: float = 0.05, seed: int = 0,
    plot: bool = True,
) -> ComparisonResult | PerplexityComparison:
    """Compare run B against run A and write ``comparison.{csv,json,png}`` into ``out``."""
    da, db = Path(run_a), Path(run_b)
    sa, sb = load_summary(da), load_summary(db)
    if sa.run.task != sb.run.task:
        raise RunMismatchError(f"cannot compare a {sa.run.task} run with a {sb.run.task} run")
    od = Path(out)
    od.mkdir(parents=True, exist_ok=True)
    if isinstance(sa, PerplexitySummary):
        assert isinstance(sb, PerplexitySummary)
        res = _compare_ppl(sa, sb, da, db, n_boot=n_boot, alpha=alpha, seed=seed)
        (od / "comparison.json").write_text(res.model_dump_json(indent=2) + "\n", encoding="utf-8")
        with (od / "comparison.csv").open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            keys = ["n_windows", "n_tokens", "nll_a", "nll_b", "ppl_a", "ppl_b", "delta_nll",
                    "ci_lo", "ci_hi", "ppl_ratio"]
            w.writerow(keys)
            w.writerow([getattr(res, k) for k in keys])
        return res
    assert isinstance(sb, PairRunSummary)
    if metric not in ("correct", "correct_sum", "correct_mean"):
        raise ValueError(f"unknown metric {metric!r}: use correct, correct_sum or correct_mean")
    gk = list(sa.group_keys)
    rows = compare_runs(load_records(da), load_records(db), group_keys=gk, correct_field=metric,
                        n_boot=n_boot, alpha=alpha, seed=seed)
    n_pairs = next((r.n for r in rows if r.level == OVERALL), 0)
    res = ComparisonResult(task=sa.run.task, metric=metric, run_a=_ident(sa, da), run_b=_ident(sb, db),
                           n_pairs=n_pairs, n_boot=n_boot, alpha=alpha, seed=seed, group_keys=gk,
                           rows=rows)
    (od / "comparison.json").write_text(res.model_dump_json(indent=2) + "\n", encoding="utf-8")
    with (od / "comparison.csv").open("w", newline="", encoding="utf-8") as fh:
        fields = list(ComparisonRow.model_fields)
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(r.model_dump())
    if plot:
        plot_deltas(res, od / "comparison.png")
    return res


def print_comparison(res: ComparisonResult | PerplexityComparison, *, level: str | None = None,
                     console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if isinstance(res, PerplexityComparison):
        t = Table(title=f"perplexity: B = {_label(res.run_b)} vs A = {_label(res.run_a)}")
        for c in ("tokens", "ppl A", "ppl B", "ΔNLL (B−A)", "95% CI"):
            t.add_column(c, justify="right")
        t.add_row(str(res.n_tokens), f"{res.ppl_a:.3f}", f"{res.ppl_b:.3f}", f"{res.delta_nll:+.4f}",
                  f"[{res.ci_lo:+.4f}, {res.ci_hi:+.4f}]")
        console.print(t)
        return
    levels = [r.level for r in res.rows]
    if level is None:
        level = next((lv for lv in ("phenomenon", "field", "paradigm") if lv in levels), OVERALL)
    t = Table(title=f"{res.task} ({res.metric}): B = {_label(res.run_b)} vs A = {_label(res.run_a)}")
    t.add_column(level, overflow="fold")
    for c in ("n", "acc A", "acc B", "Δ", f"{100 * (1 - res.alpha):.0f}% CI", "b01/b10", "p"):
        t.add_column(c, justify="right", no_wrap=True)
    for r in res.rows:
        if r.level in (level, OVERALL):
            t.add_row("[bold]overall[/bold]" if r.level == OVERALL else r.group, str(r.n),
                      f"{r.acc_a:.3f}", f"{r.acc_b:.3f}", f"{r.delta:+.3f}",
                      f"{r.ci_lo:+.3f}..{r.ci_hi:+.3f}", f"{r.b01}/{r.b10}", f"{r.p_value:.2g}")
    console.print(t)

