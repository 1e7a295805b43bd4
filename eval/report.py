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

from eval.reproduce_config import BASELINE, ConditionSpec
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


def _pair_cells(runs: Path, label: str, task: str, n_boot: int, seed: int,
                group_keys: tuple[str, ...] = ()) -> tuple[dict[str, Any], list[Any]]:
    """``{task}_acc, _n, _delta, _p, _mde`` of ``runs/label/task`` against ``runs/baseline``
    (same settings, hence the same pairs), and the comparison's rows."""
    summary = load_summary(runs / label / task)
    cells: dict[str, Any] = {f"{task}_acc": summary.overall.accuracy, f"{task}_n": summary.n_pairs}
    if label == BASELINE:
        return cells, []
    cmp = compare_runs(load_records(runs / BASELINE / task), load_records(runs / label / task),
                       group_keys=group_keys, n_boot=n_boot, seed=seed)
    overall = cmp[-1]
    cells |= {f"{task}_delta": [overall.delta, overall.ci_lo, overall.ci_hi], f"{task}_p": overall.p_value,
              f"{task}_mde": overall.mde}
    return cells, cmp


def _ppl_cells(runs: Path, label: str) -> dict[str, Any]:
    path = runs / label / "perplexity"
    ppl, base = load_summary(path), load_summary(runs / BASELINE / "perplexity")
    return {"ppl": ppl.ppl, "ppl_ratio": ppl.ppl / base.ppl, "ppl_tokens": ppl.n_tokens}


def tse_by_field(runs: Path, specs: list[ConditionSpec], n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Main conditions' TSE deltas per field (agreement, reflexives, NPI) under both of the
    paper's metrics: mean per-token log-probability (``correct_mean``) and summed (``correct_sum``)."""
    out = []
    base = load_records(runs / BASELINE / "tse")
    for spec in specs:
        if spec.label == BASELINE or not spec.main or not (runs / spec.label / "tse" / "summary.json").is_file():
            continue
        recs = load_records(runs / spec.label / "tse")
        for metric in ("correct_mean", "correct_sum"):
            for r in compare_runs(base, recs, group_keys=("field",), correct_field=metric, n_boot=n_boot,
                                  seed=seed):
                out.append({"condition": spec.label, "metric": metric, "field": r.group, "n": r.n,
                            "acc_baseline": r.acc_a, "acc": r.acc_b, "delta": r.delta, "ci_lo": r.ci_lo,
                            "ci_hi": r.ci_hi, "p": r.p_value})
    return out


def collect(out: Path, disc: Path, specs: list[ConditionSpec], n_boot: int, seed: int) -> dict[str, Any]:
    """The report's numbers, all read from run folders.

    ``rows``: the main p's conditions (BLiMP from ``runs-full/`` where the condition has a
    full run there, against the baseline's full run; TSE and perplexity from ``runs/``).
    ``sweep``: every non-baseline condition at every p from ``runs/`` (same pairs for all).
    """
    runs, full = out / "runs", out / "runs-full"
    rows, sweep, phenomena, pending = [], [], {}, []
    for spec in specs:
        count, modes = _neuron_count(disc, spec.set_name)
        head = {"condition": spec.label, "kind": spec.kind, "top": spec.top, "set": spec.set_name,
                "description": spec.description, "neurons": count, "mode": modes}
        sub, cmp = dict(head), []
        if _done(runs, spec.label, "blimp"):
            blimp_sub, cmp = _pair_cells(runs, spec.label, "blimp", n_boot, seed, ("phenomenon",))
            sub |= blimp_sub
        if _done(runs, spec.label, "tse"):
            sub |= _pair_cells(runs, spec.label, "tse", n_boot, seed)[0]
        if _done(runs, spec.label, "perplexity"):
            sub |= _ppl_cells(runs, spec.label)
        if spec.label != BASELINE and "blimp_acc" in sub:
            sweep.append(sub)
        if not spec.main:
            if "blimp_acc" not in sub:
                pending.append(spec.label)
            continue
        row = dict(sub)
        if spec.full_blimp and _done(full, spec.label, "blimp"):
            blimp_full, cmp = _pair_cells(full, spec.label, "blimp", n_boot, seed, ("phenomenon",))
            row |= blimp_full
        if "blimp_acc" not in row:
            pending.append(spec.label)
            continue
        if spec.label != BASELINE:
            phenomena[spec.label] = {r.group: [r.delta, r.ci_lo, r.ci_hi] for r in cmp if r.level == "phenomenon"}
        rows.append(row)
    tse_fields = tse_by_field(runs, specs, n_boot, seed) if _done(runs, BASELINE, "tse") else []
    return {"rows": rows, "sweep": sweep, "phenomena": phenomena, "tse_by_field": tse_fields,
            "pending": pending}


def _done(runs: Path, label: str, task: str) -> bool:
    """Whether both the condition and the baseline have a finished ``task`` run in ``runs``
    (a report written mid-run shows what is finished and lists the rest as pending)."""
    return all((runs / name / task / "summary.json").is_file() for name in (label, BASELINE))


PREMISE_COLUMNS = ("layer", "group", "neurons", "w1", "share_h_negative", "share_z_negative", "frac_h_negative")


def premise_statistics(disc: Path, top: float) -> list[dict[str, Any]]:
    """The paper's premise, per layer and overall, for the top ``top``% Wasserstein neurons
    against the rest: mean W1, the mean share of each neuron's W1 that lies at negative raw
    pre-activations (``h < 0``) and at ``z < 0``, and the mean share of tokens with ``h < 0``.
    Empty when the statistics predate ``w1_h_negative`` (rerun discovery)."""
    path = disc / "stats.npz"
    if not path.is_file():
        return []
    from vllm_negablate.discovery.wasserstein import top_percent_mask

    stats = np.load(path)
    if "w1_h_negative" not in stats:
        return []
    w1, wh, wz, frac = (np.asarray(stats[k], dtype=np.float64) for k in
                        ("w1", "w1_h_negative", "w1_negative", "frac_h_negative"))
    with np.errstate(divide="ignore", invalid="ignore"):
        share_h, share_z = wh / w1, wz / w1
    top_mask = np.stack([top_percent_mask(row, top) for row in w1])
    rows = []
    layers = [(str(i), np.s_[i : i + 1]) for i in range(w1.shape[0])] + [("all", np.s_[:])]
    for layer, sl in layers:
        for group, mask in (("wasserstein", top_mask[sl]), ("other", ~top_mask[sl])):
            ok = mask & np.isfinite(w1[sl]) & (w1[sl] > 0)
            rows.append({"layer": layer, "group": group, "neurons": int(ok.sum()),
                         "w1": float(np.mean(w1[sl][ok])) if ok.any() else float("nan"),
                         "share_h_negative": float(np.mean(share_h[sl][ok])) if ok.any() else float("nan"),
                         "share_z_negative": float(np.mean(share_z[sl][ok])) if ok.any() else float("nan"),
                         "frac_h_negative": float(np.mean(frac[sl][ok])) if ok.any() else float("nan")})
    return rows


def plot_premise(rows: list[dict[str, Any]], path: Path) -> Path | None:
    per_layer = [r for r in rows if r["layer"] != "all"]
    if not per_layer:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


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


def plot_sweep(sweep: list[dict[str, Any]], path: Path) -> Path | None:
    """BLiMP delta, TSE delta (points, 95% CI) and perplexity ratio against p, one line per kind."""
    tops = sorted({r["top"] for r in sweep if r.get("top") is not None})
    if len(tops) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _matched_note(disc: Path, specs: list[ConditionSpec]) -> list[str]:
    """How close each perplexity-matched control came to its target (from its provenance)."""
    lines = []
    for spec in specs:
        label, set_name = spec.label, spec.set_name
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


TABLE_COLUMNS = ("condition", "kind", "top", "set", "neurons", "mode", "blimp_acc", "blimp_n", "blimp_delta",
                 "blimp_ci_lo", "blimp_ci_hi", "blimp_p", "blimp_mde", "tse_acc", "tse_n", "tse_delta",
                 "tse_ci_lo", "tse_ci_hi", "tse_p", "tse_mde", "ppl", "ppl_ratio", "ppl_tokens")


def write_csv(rows: list[dict[str, Any]], path: Path, columns: tuple[str, ...] = TABLE_COLUMNS) -> Path:
    """Rows as flat CSV (a delta ``[d, lo, hi]`` as three columns) for spreadsheets and pandas."""
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            flat = {k: r.get(k) for k in columns}
            for task in ("blimp", "tse"):
                delta = r.get(f"{task}_delta")
                if delta:
                    flat[f"{task}_delta"], flat[f"{task}_ci_lo"], flat[f"{task}_ci_hi"] = delta
            writer.writerow(flat)
    return path


def _cells(r: dict[str, Any], task: str) -> str:
    if f"{task}_delta" not in r:
        return "- | - | -"
    return (f"{_fmt_ci(*r[f'{task}_delta'])} | {r[f'{task}_p']:.2g} | "
            f"{r.get(f'{task}_mde', float('nan')) * 100:.1f}")


def _acc(r: dict[str, Any], task: str) -> str:
    return f"{r[f'{task}_acc'] * 100:.1f}" if f"{task}_acc" in r else "-"


def _ppl(r: dict[str, Any]) -> tuple[str, str]:
    return ((f"{r['ppl']:.2f}", f"{r['ppl_ratio']:.3f}") if r.get("ppl") is not None else ("-", "-"))


TSE_FIELD_COLUMNS = ("condition", "metric", "field", "n", "acc_baseline", "acc", "delta", "ci_lo", "ci_hi", "p")


def write_report(cfg: Any, disc: Path, specs: list[ConditionSpec], model_dir: Path,
                 elapsed_s: float | None = None) -> Path:
    out = cfg.out_dir()
    data = collect(out, disc, specs, cfg.n_boot, cfg.seed)
    meta = json.loads((disc / "stats.json").read_text()) if (disc / "stats.json").exists() else {}
    marker = model_dir / "negablate_model.json"
    model_meta = json.loads(marker.read_text()) if marker.exists() else {}
    corpus_record = out / "corpus" / f"wikitext-2-valid.{cfg.discovery_text}.json"
    corpus = json.loads(corpus_record.read_text()) if corpus_record.is_file() else {}
    figures = {
        "phenomena": plot_phenomena(data["phenomena"], out / "blimp_phenomena_deltas.png"),
        "sweep": plot_sweep(data["sweep"], out / "sweep.png"),
        "scores": plot_scores(disc, out / "wasserstein_scores.png"),
        "counts": plot_counts(data["rows"], out / "neuron_counts.png"),
    }
    premise = premise_statistics(disc, cfg.main_top)
    figures["premise"] = plot_premise(premise, out / "premise.png")
    data["premise"] = premise
    result = {
        "config": json.loads(cfg.model_dump_json()), "model_dir": str(model_dir),
        "model": model_meta, "discovery": meta, "discovery_corpus": corpus, "elapsed_s": elapsed_s, **data,
        "figures": {k: str(v) for k, v in figures.items() if v},
    }
    lm_tasks = None  # `negablate analyze tasks --out <out>/lm_tasks`: the non-grammatical side
    if (out / "lm_tasks" / "lm_tasks.json").exists():
        from eval.analysis.lm_tasks import load_result

        lm_tasks = load_result(out / "lm_tasks" / "lm_tasks.json")
        result["lm_tasks"] = json.loads(lm_tasks.model_dump_json())
    (out / "report.json").write_text(json.dumps(result, indent=2, default=str))
    write_csv(data["rows"], out / "main_table.csv")
    write_csv(data["sweep"], out / "sweep_table.csv")
    write_csv(data["tse_by_field"], out / "tse_by_field.csv", TSE_FIELD_COLUMNS)
    if premise:
        write_csv(premise, out / "premise.csv", PREMISE_COLUMNS)
    main_p = cfg.main_top
    full_n = next((r["blimp_n"] for r in data["rows"] if r["condition"] == BASELINE), None)
    unk = (f"; {corpus['unk_removed']:,} `<unk>` tokens removed" if corpus.get("unk_removed") else "")
    lines = [
        f"# Negative pre-activation ablation: {cfg.model}",
        "",
        f"Model directory: `{model_dir}`." + (
            " Weights are dequantized from a quantized GGUF file "
            f"({model_meta.get('source', {}).get('package', model_meta.get('package', 'registry package'))}): "
            "every neuron statistic describes the quantized model." if model_meta else ""),
        f"Neurons chosen on WikiText-2 *valid* ({meta.get('num_tokens', cfg.discovery_tokens):,} tokens, "
        f"text `{cfg.discovery_text}`{unk}; top p% Wasserstein-1 per layer for p in "
        f"{', '.join(f'{p:g}%' for p in cfg.top)}, main p {main_p:g}%), dtype {cfg.dtype}.",
        f"Perplexity on WikiText-2 *test* ({cfg.ppl_text}), {cfg.ppl_windows} windows of {cfg.ppl_window} tokens.",
        f"BLiMP: {cfg.blimp_per_paradigm} pairs per paradigm (seed {cfg.seed})"
        + (f", {cfg.blimp_main_per_paradigm} for the main conditions at the main p "
           f"({full_n:,} pairs)" if cfg.full_blimp and full_n else "")
        + f"; TSE: {cfg.tse_per_test} pairs per test ("
        + ("all 22 Marvin & Linzen tests" if cfg.tse_source == "tse" else "Newman et al. agreement set")
        + ", per-token mean metric).",
        "Deltas are in accuracy points against the baseline on the same pairs, paired bootstrap 95% CI "
        f"({cfg.n_boot} resamples); p: McNemar; MDE: the smallest delta these pairs detect "
        "(alpha 0.05, power 0.8) at the comparison's rate of pairs that change decision. "
        "A delta smaller than its MDE is not evidence of no effect.",
        "",
        f"## Main conditions (top {main_p:g}%)",
        "",
        "| condition | neurons | BLiMP pairs | BLiMP acc | BLiMP delta [95% CI] | p | MDE | TSE acc | TSE delta [95% CI] | p | MDE | PPL | PPL ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        ppl, ratio = _ppl(r)
        lines.append(
            f"| {r['condition']} | {r['neurons']} | {r.get('blimp_n', 0):,} | {_acc(r, 'blimp')} | {_cells(r, 'blimp')} | "
            f"{_acc(r, 'tse')} | {_cells(r, 'tse')} | {ppl} | {ratio} |")
    if data["pending"]:
        lines += ["", f"**Not finished yet** (rerun the command to resume): {', '.join(data['pending'])}."]
    lines += _matched_note(disc, specs)
    if len(cfg.top) > 1:
        lines += ["", "## Top-p sweep", "",
                  f"Every condition on the same {cfg.blimp_per_paradigm} BLiMP pairs per paradigm and "
                  f"{cfg.tse_per_test} TSE pairs per test (`sweep_table.csv`).", "",
                  "| p | condition | neurons | BLiMP delta [95% CI] | p | MDE | TSE delta [95% CI] | p | MDE | PPL ratio |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(data["sweep"], key=lambda r: (r["top"], r["condition"])):
            lines.append(f"| {r['top']:g}% | {r['kind']} | {r['neurons']} | {_cells(r, 'blimp')} | "
                         f"{_cells(r, 'tse')} | {_ppl(r)[1]} |")
        if figures["sweep"]:
            lines += ["", "![Deltas against p](sweep.png)"]
    if data["tse_by_field"]:
        lines += ["", f"## TSE by field (top {main_p:g}%)", "",
                  "Accuracy change in points [95% CI] under the paper's two metrics: mean per-token "
                  "log-probability and summed log-probability (`tse_by_field.csv`).", "",
                  "| condition | field | pairs | mean per token | summed |", "|---|---|---:|---:|---:|"]
        by = {(t["condition"], t["field"], t["metric"]): t for t in data["tse_by_field"]}
        for cond, field in dict.fromkeys((t["condition"], t["field"]) for t in data["tse_by_field"]):
            m, sm = by[(cond, field, "correct_mean")], by[(cond, field, "correct_sum")]
            lines.append(f"| {cond} | {field} | {m['n']:,} | {_fmt_ci(m['delta'], m['ci_lo'], m['ci_hi'])} | "
                         f"{_fmt_ci(sm['delta'], sm['ci_lo'], sm['ci_hi'])} |")
    overall = {r["group"]: r for r in premise if r["layer"] == "all"}
    if overall:
        lines += ["", f"## The premise: where the non-Gaussian mass sits (top {main_p:g}% vs the rest)", "",
                  "Means over neurons of: W1 to N(0,1); the share of each neuron's W1 at negative raw "
                  "pre-activations (h < 0, the side the ablation zeroes) and at z < 0; the share of "
                  "tokens with h < 0. Per layer: `premise.csv`, `premise.png`.", "",
                  "| neurons | count | W1 | W1 share at h < 0 | W1 share at z < 0 | tokens with h < 0 |",
                  "|---|---:|---:|---:|---:|---:|"]
        for group in ("wasserstein", "other"):
            r = overall[group]
            lines.append(f"| {group} | {r['neurons']:,} | {r['w1']:.3f} | {r['share_h_negative']:.2f} | "
                         f"{r['share_z_negative']:.2f} | {r['frac_h_negative']:.2f} |")
        if figures["premise"]:
            lines += ["", "![Premise per layer](premise.png)"]
    lines += ["", "![BLiMP per-phenomenon deltas](blimp_phenomena_deltas.png)", ""]
    if figures["scores"]:
        lines += ["![Wasserstein scores](wasserstein_scores.png)", ""]
    lines += ["![Neuron counts](neuron_counts.png)", ""]
    if lm_tasks is not None:
        from eval.analysis.lm_tasks import markdown_section

        lines += [markdown_section(lm_tasks, image="lm_tasks/lm_tasks.png")]
    if (out / "layers" / "layers.json").is_file():
        from eval.analysis import layers

        lines += [layers.markdown_section(layers.load_result(out / "layers" / "layers.json"),
                                          image="layers/layers.png")]
    if elapsed_s is not None:
        lines.append(f"Total time: {elapsed_s / 60:.1f} min over all invocations (`timing.json`). Files: "
                     "`report.json`, `main_table.csv`, `sweep_table.csv`, `tse_by_field.csv`, "
                     "`runs*/*/*/records.jsonl`.")
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def rebuild(folder: Path) -> Path:
    """Write the report of a reproduce folder from its files, finished or not (``python -m
    eval.report docs/results/smollm2-135m``): what is scored so far, the rest listed as pending."""
    from eval.reproduce_config import ReproduceConfig, condition_sets
    from vllm_negablate.models.fetch import fetched_path

    config = ReproduceConfig.model_validate_json((folder / "config.json").read_text()).model_copy(
        update={"out": folder})
    model_dir = Path(config.model).expanduser()
    if not model_dir.is_dir():
        try:
            model_dir = fetched_path(config.model) or model_dir
        except KeyError:  # neither a folder nor an embedded name (UnknownModelError; a folder since removed)
            pass
    return write_report(config, folder / "discovery", condition_sets(config), model_dir)


if __name__ == "__main__":
    print(rebuild(Path(sys.argv[1] if len(sys.argv) > 1 else "report")))
