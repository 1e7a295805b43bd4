"""The report's charts (matplotlib, Agg backend; PNG beside REPORT.md).

Each function takes numbers already collected (:mod:`eval.report.collect`) and returns the
file it wrote, or None when there is nothing to draw (one p: no sweep chart).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    """pyplot on the file-only backend (no display on servers and in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    _pyplot().close(fig)
    return path


def plot_premise(rows: list[dict[str, Any]], path: Path) -> Path | None:
    per_layer = [r for r in rows if r["layer"] != "all"]
    if not per_layer:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, (key, label) in zip(axes, (("w1", "mean W1 to N(0,1)"),
                                       ("share_h_negative", "share of W1 at h < 0"),
                                       ("frac_h_negative", "share of tokens with h < 0")), strict=True):
        for group, colour in (("wasserstein", "tab:red"), ("other", "tab:gray")):
            pts = [(int(r["layer"]), r[key]) for r in per_layer if r["group"] == group]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, color=colour, label=group)
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def plot_phenomena(phenomena: dict[str, dict[str, list[float]]], path: Path) -> Path:
    plt = _pyplot()
    labels = sorted({p for v in phenomena.values() for p in v})
    conds = list(phenomena)
    fig, ax = plt.subplots(figsize=(max(8, len(labels) * 0.9), 4.5))
    width = 0.8 / max(1, len(conds))
    x = np.arange(len(labels))
    for i, cond in enumerate(conds):
        vals = np.array([phenomena[cond].get(p, [np.nan] * 3) for p in labels]) * 100
        err = np.abs(vals[:, 1:] - vals[:, :1]).T
        ax.bar(x + (i - (len(conds) - 1) / 2) * width, vals[:, 0], width, yerr=err, capsize=2, label=cond)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, [p.replace("_", " ") for p in labels], rotation=35, ha="right")
    ax.set_ylabel("BLiMP accuracy change vs baseline (points, 95% CI)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_scores(disc: Path, path: Path) -> Path | None:
    stats_path = disc / "stats.npz"
    if not stats_path.exists():
        return None
    plt = _pyplot()
    stats = np.load(stats_path)
    w1 = stats["w1"]
    neg = stats["w1_negative"] if "w1_negative" in stats else None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].hist(w1.ravel(), bins=100, color="tab:blue")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("Wasserstein-1 distance to N(0,1) (standardized pre-activation)")
    axes[0].set_ylabel("neurons")
    axes[0].set_title("all layers")
    if neg is not None:
        share = np.divide(neg, w1, out=np.zeros_like(neg), where=w1 > 0)
        top = w1 > np.percentile(w1, 99, axis=1, keepdims=True)
        axes[1].hist([share[~top].ravel(), share[top].ravel()], bins=40, density=True,
                     label=["other neurons", "top 1% per layer"], color=["tab:gray", "tab:red"])
        axes[1].set_xlabel("share of W1 from z < 0")
        axes[1].legend()
        axes[1].set_title("where the non-Gaussian mass sits")
    return _save(fig, path)


def plot_counts(rows: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([r["condition"] for r in rows], [r["neurons"] for r in rows], color="tab:purple")
    ax.set_xlabel("ablated neurons (all layers)")
    return _save(fig, path)


def plot_sweep(sweep: list[dict[str, Any]], path: Path) -> Path | None:
    """BLiMP delta, TSE delta (points, 95% CI) and perplexity ratio against p, one line per kind."""
    tops = sorted({r["top"] for r in sweep if r.get("top") is not None})
    if len(tops) < 2:
        return None
    plt = _pyplot()
    kinds = list(dict.fromkeys(r["kind"] for r in sweep if r["kind"] != "wasserstein-positive"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [("blimp_delta", "BLiMP accuracy change (points)"), ("tse_delta", "TSE accuracy change (points)"),
              ("ppl_ratio", "perplexity / baseline")]
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        for kind in kinds:
            pts = sorted((r["top"], r.get(key)) for r in sweep if r["kind"] == kind and r.get(key) is not None)
            if not pts:
                continue
            x = np.array([t for t, _ in pts])
            if key == "ppl_ratio":
                ax.plot(x, [v for _, v in pts], marker="o", label=kind)
                continue
            v = np.array([d for _, d in pts]) * 100
            err = np.abs(v[:, 1:] - v[:, :1]).T
            ax.errorbar(x, v[:, 0], yerr=err, marker="o", capsize=3, label=kind)
        ax.axhline(1.0 if key == "ppl_ratio" else 0.0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks(tops, [f"{t:g}%" for t in tops])
        ax.set_xlabel("top p of neurons per layer")
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_cost_against_perplexity(sweep: list[dict[str, Any]], draws: list[dict[str, Any]],
                                 path: Path) -> Path | None:
    """BLiMP and TSE deltas (points, 95% CI) against the perplexity ratio, one point per
    condition and p (further draws of the matched control included; the positive-side
    mirror left out, off any common scale).

    Why: the paper's claim is that the Wasserstein set costs more grammar than its
    perplexity cost predicts. If every ablation falls on one curve, grammar follows
    perplexity; a Wasserstein point below the others' curve is the claim holding.
    """
    rows = [r for r in sweep if r["kind"] != "wasserstein-positive"] + [d for d in draws if d.get("draw")]
    rows = [r for r in rows if r.get("ppl_ratio") and ("blimp_delta" in r or "tse_delta" in r)]
    if len(rows) < 2:
        return None
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    colors = {kind: f"C{i}" for i, kind in enumerate(kinds)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, (task, label) in zip(axes, (("blimp", "BLiMP accuracy change (points)"),
                                        ("tse", "TSE accuracy change (points)")), strict=True):
        seen: set[str] = set()
        for r in rows:
            delta = r.get(f"{task}_delta")
            if not delta:
                continue
            d, lo, hi = (100 * v for v in delta)
            ax.errorbar([r["ppl_ratio"]], [d], yerr=[[d - lo], [hi - d]], marker="o", capsize=3,
                        color=colors[r["kind"]], label=None if r["kind"] in seen else r["kind"])
            seen.add(r["kind"])
            ax.annotate(f"{r['top']:g}%" + (f" s{r['seed']}" if r.get("draw") else ""), (r["ppl_ratio"], d),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 1.05, not 1.05 x 10^0
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.set_xlabel("perplexity / baseline (raw WikiText-2 test)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_draws_groups(pooled: list[dict[str, Any]], path: Path) -> Path | None:
    """The Wasserstein set minus the random perplexity-matched draws' mean, per BLiMP
    phenomenon and TSE field (a forest plot: 95% CI bars, each draw's own difference as a
    small x just above, red where the Benjamini-Hochberg q < 0.05). None without pooled groups."""
    panels = [r for r in pooled if r.get("groups")]
    if not panels:
        return None
    plt = _pyplot()
    heights = [len(r["groups"]) for r in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 0.35 * max(heights) + 1.6), squeeze=False,
                             gridspec_kw={"width_ratios": [1.0] * len(panels)})
    for ax, r in zip(axes[0], panels, strict=True):
        groups = r["groups"]
        y = np.arange(len(groups))[::-1]
        for yi, g in zip(y, groups, strict=True):
            colour = "tab:red" if g.get("q", 1.0) < 0.05 else "tab:gray"
            ax.errorbar(100 * g["diff"], yi, xerr=[[100 * (g["diff"] - g["ci_lo"])], [100 * (g["ci_hi"] - g["diff"])]],
                        fmt="o", color=colour, capsize=3)
            ax.plot([100 * d for d in g["draw_diffs"]], [yi + 0.25] * len(g["draw_diffs"]), "x", color=colour, ms=4,
                    alpha=0.7, label="each draw alone" if yi == y[0] else None)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(y, [g["group"] for g in groups], fontsize=8)
        ax.set_xlabel("Wasserstein minus the draws' mean (points; < 0: it hurts more)")
        ax.set_title(f"{'BLiMP' if r['task'] == 'blimp' else 'TSE'}: {r['draws']} draws, top {r['top']:g}%", fontsize=10)
        ax.set_ylim(-0.7, len(groups) - 0.3)
    axes[0][0].legend(fontsize=8, loc="lower left")
    return _save(fig, path)
