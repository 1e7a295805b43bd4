"""The reproduction report: Markdown + JSON + PNG from the run directories.

Reads only files (``report/runs/<condition>/<task>/``, ``report/discovery``),
so it can be rebuilt at any time: ``python -m eval.report report/``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from eval.stats import compare_runs
from eval.tasks import load_records, load_summary


def _fmt_ci(delta: float, lo: float, hi: float, scale: float = 100.0) -> str:
    return f"{delta * scale:+.1f} [{lo * scale:+.1f}, {hi * scale:+.1f}]"


def _neuron_count(disc: Path, set_name: str | None) -> tuple[int, str]:
    if set_name is None:
        return 0, "-"
    data = json.loads((disc / "sets" / f"{set_name}.json").read_text())
    modes = sorted({e.get("mode", "negative") for e in data["entries"]})
    return sum(len(e["neurons"]) for e in data["entries"]), ",".join(modes)


def collect(out: Path, disc: Path, conditions: list[tuple[str, str | None, str]], n_boot: int,
            seed: int) -> dict[str, Any]:
    runs = out / "runs"
    base = "baseline"
    base_records = {t: load_records(runs / base / t) for t in ("blimp", "tse")}
    base_ppl = load_summary(runs / base / "perplexity")
    rows, phenomena = [], {}
    for label, set_name, desc in conditions:
        count, modes = _neuron_count(disc, set_name)
        row: dict[str, Any] = {"condition": label, "set": set_name, "description": desc,
                               "neurons": count, "mode": modes}
        for task in ("blimp", "tse"):
            summary = load_summary(runs / label / task)
            row[f"{task}_acc"] = summary.overall.accuracy
            row[f"{task}_n"] = summary.n_pairs
            if label != base:
                cmp = compare_runs(base_records[task], load_records(runs / label / task),
                                   group_keys=("phenomenon",), n_boot=n_boot, seed=seed)
                overall = cmp[-1]
                row[f"{task}_delta"] = [overall.delta, overall.ci_lo, overall.ci_hi]
                row[f"{task}_p"] = overall.p_value
                row[f"{task}_mde"] = overall.mde
                if task == "blimp":
                    phenomena[label] = {r.group: [r.delta, r.ci_lo, r.ci_hi] for r in cmp
                                        if r.level == "phenomenon"}
        ppl = load_summary(runs / label / "perplexity")
        row["ppl"] = ppl.ppl
        row["ppl_ratio"] = ppl.ppl / base_ppl.ppl
        row["ppl_tokens"] = ppl.n_tokens
        rows.append(row)
    return {"rows": rows, "phenomena": phenomena}


def plot_phenomena(phenomena: dict[str, dict[str, list[float]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_scores(disc: Path, path: Path) -> Path | None:
    stats_path = disc / "stats.npz"
    if not stats_path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_counts(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([r["condition"] for r in rows], [r["neurons"] for r in rows], color="tab:purple")
    ax.set_xlabel("ablated neurons (all layers)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _matched_note(disc: Path, conditions) -> list[str]:
    """How close each perplexity-matched control came to its target (from its provenance)."""
    lines = []
    for label, set_name, _ in conditions:
        path = disc / "sets" / f"{set_name}.json"
        if not set_name or not set_name.startswith("perplexity-matched") or not path.exists():
            continue
        src = json.loads(path.read_text()).get("provenance", {}).get("source", {})
        if "target_perplexity" not in src:
            continue
        state = ("matched within the tolerance" if src.get("converged")
                 else "**not matched** (closest count kept; read its row with care)")
        tol = src.get("tolerance")
        base = src.get("baseline_perplexity")
        lines.append(
            f"{label}: perplexity {src['perplexity']:.2f} against the Wasserstein set's "
            f"{src['target_perplexity']:.2f}" + (f" (unablated {base:.2f})" if base else "")
            + f" on {src.get('eval_tokens', '?')} held-out tokens"
            + (f", tolerance {tol:.2%}" if tol is not None else "")
            + (f" ({src['tolerance_effect']:g} of the set's effect)" if src.get("tolerance_effect") else "")
            + f", {state}, after {src.get('iterations', '?')} evaluations.")
    return ["", *lines] if lines else []


TABLE_COLUMNS = ("condition", "set", "neurons", "mode", "blimp_acc", "blimp_n", "blimp_delta",
                 "blimp_ci_lo", "blimp_ci_hi", "blimp_p", "blimp_mde", "tse_acc", "tse_n", "tse_delta",
                 "tse_ci_lo", "tse_ci_hi", "tse_p", "tse_mde", "ppl", "ppl_ratio", "ppl_tokens")


def write_table_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """The main table as flat CSV (one row per condition) for spreadsheets and pandas."""
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        for r in rows:
            flat = {k: r.get(k) for k in TABLE_COLUMNS}
            for task in ("blimp", "tse"):
                delta = r.get(f"{task}_delta")
                if delta:
                    flat[f"{task}_delta"], flat[f"{task}_ci_lo"], flat[f"{task}_ci_hi"] = delta
            writer.writerow(flat)
    return path


def write_report(cfg: Any, disc: Path, conditions, model_dir: Path, elapsed_s: float | None = None) -> Path:
    out = Path(cfg.out)
    data = collect(out, disc, conditions, cfg.n_boot, cfg.seed)
    meta = json.loads((disc / "stats.json").read_text()) if (disc / "stats.json").exists() else {}
    marker = model_dir / "negablate_model.json"
    model_meta = json.loads(marker.read_text()) if marker.exists() else {}
    figures = {
        "phenomena": plot_phenomena(data["phenomena"], out / "blimp_phenomena_deltas.png"),
        "scores": plot_scores(disc, out / "wasserstein_scores.png"),
        "counts": plot_counts(data["rows"], out / "neuron_counts.png"),
    }
    result = {
        "config": json.loads(cfg.model_dump_json()), "model_dir": str(model_dir),
        "model": model_meta, "discovery": meta, "elapsed_s": elapsed_s, **data,
        "figures": {k: str(v) for k, v in figures.items() if v},
    }
    lm_tasks = None  # `negablate analyze tasks --out <out>/lm_tasks`: the non-grammatical side
    if (out / "lm_tasks" / "lm_tasks.json").exists():
        from eval.analysis.lm_tasks import load_result

        lm_tasks = load_result(out / "lm_tasks" / "lm_tasks.json")
        result["lm_tasks"] = json.loads(lm_tasks.model_dump_json())
    (out / "report.json").write_text(json.dumps(result, indent=2, default=str))
    write_table_csv(data["rows"], out / "main_table.csv")
    lines = [
        f"# Negative pre-activation ablation: {cfg.model}",
        "",
        f"Model directory: `{model_dir}`." + (
            " Weights are dequantized from a quantized GGUF file "
            f"({model_meta.get('source', {}).get('package', model_meta.get('package', 'registry package'))}): "
            "every neuron statistic describes the quantized model." if model_meta else ""),
        f"Neurons chosen on WikiText-2 *valid* ({meta.get('num_tokens', cfg.discovery_tokens)} tokens, "
        f"top {cfg.top_percent:g}% Wasserstein-1 per layer); perplexity on WikiText-2 *test*.",
        f"BLiMP: {cfg.blimp_per_paradigm} pairs per paradigm (seed {cfg.seed}); TSE: "
        f"{cfg.tse_per_test} pairs per test ("
        + ("all 22 Marvin & Linzen tests" if getattr(cfg, "tse_source", "tse-ml") == "tse"
           else "Newman et al. agreement set") + ", per-token mean metric).",
        "Deltas are in accuracy points against the baseline, paired bootstrap 95% CI "
        f"({cfg.n_boot} resamples); p: McNemar; MDE: the smallest delta these pairs detect "
        "(alpha 0.05, power 0.8) at the comparison's rate of pairs that change decision. "
        "A delta smaller than its MDE is not evidence of no effect.",
        "",
        "| condition | neurons | BLiMP acc | BLiMP delta [95% CI] | p | MDE | TSE acc | TSE delta [95% CI] | p | MDE | PPL | PPL ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cells(r: dict[str, Any], task: str) -> str:
        if f"{task}_delta" not in r:
            return "- | - | -"
        return (f"{_fmt_ci(*r[f'{task}_delta'])} | {r[f'{task}_p']:.2g} | "
                f"{r.get(f'{task}_mde', float('nan')) * 100:.1f}")

    for r in data["rows"]:
        lines.append(
            f"| {r['condition']} | {r['neurons']} | {r['blimp_acc'] * 100:.1f} | {cells(r, 'blimp')} | "
            f"{r['tse_acc'] * 100:.1f} | {cells(r, 'tse')} | {r['ppl']:.2f} | {r['ppl_ratio']:.3f} |")
    lines += _matched_note(disc, conditions)
    lines += ["", "![BLiMP per-phenomenon deltas](blimp_phenomena_deltas.png)", ""]
    if figures["scores"]:
        lines += ["![Wasserstein scores](wasserstein_scores.png)", ""]
    lines += ["![Neuron counts](neuron_counts.png)", ""]
    if lm_tasks is not None:
        from eval.analysis.lm_tasks import markdown_section

        lines += [markdown_section(lm_tasks, image="lm_tasks/lm_tasks.png")]
    if elapsed_s is not None:
        lines.append(f"Total time: {elapsed_s / 60:.1f} min over all invocations (`timing.json`). Files: `report.json`, `main_table.csv`, `runs/*/*/records.jsonl`.")
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    from eval.reproduce_config import ReproduceConfig, condition_sets

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "report")
    cfg = ReproduceConfig.model_validate_json((out / "config.json").read_text())
    print(write_report(cfg, out / "discovery", condition_sets(cfg), Path(json.loads(
        (out / "config.json").read_text()).get("model", ""))))
