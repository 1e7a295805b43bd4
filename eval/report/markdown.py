"""REPORT.md: the collected numbers (:mod:`eval.report.collect`) as Markdown sections.

Every section is a function of the numbers alone, so the README's tables are the report's
own lines (``python -m eval.report FOLDER --print main``), never retyped.
"""

from __future__ import annotations

from typing import Any

from eval.stats import format_p as fmt_p


def fmt_ci(delta: float, lo: float, hi: float, scale: float = 100.0) -> str:
    """``+1.2 [+0.4, +2.0]``: a delta and its CI, in points."""
    return f"{delta * scale:+.1f} [{lo * scale:+.1f}, {hi * scale:+.1f}]"


def _cells(r: dict[str, Any], task: str) -> str:
    if f"{task}_delta" not in r:
        return "- | - | -"
    return (f"{fmt_ci(*r[f'{task}_delta'])} | {fmt_p(r[f'{task}_p'])} | "
            f"{r.get(f'{task}_mde', float('nan')) * 100:.1f}")


def _acc(r: dict[str, Any], task: str) -> str:
    return f"{r[f'{task}_acc'] * 100:.1f}" if f"{task}_acc" in r else "-"


def _ppl(r: dict[str, Any]) -> tuple[str, str]:
    return (f"{r['ppl']:.2f}", f"{r['ppl_ratio']:.3f}") if r.get("ppl") is not None else ("-", "-")


def _n(r: dict[str, Any], task: str) -> str:
    return f"{r[f'{task}_n']:,}" if f"{task}_n" in r else "-"


def header(cfg: Any, model_dir: Any, model_meta: dict, discovery: dict, corpus: dict,
           full_n: int | None) -> list[str]:
    """What was run: model, discovery corpus, test sets, statistics."""
    unk = f"; {corpus['unk_removed']:,} `<unk>` tokens removed" if corpus.get("unk_removed") else ""
    package = model_meta.get("source", {}).get("package", model_meta.get("package", "registry package"))
    return [
        f"# Negative pre-activation ablation: {cfg.model}",
        "",
        f"Model directory: `{model_dir}`." + (
            f" Weights are dequantized from a quantized GGUF file ({package}): "
            "every neuron statistic describes the quantized model." if model_meta else ""),
        f"Preset `{cfg.preset}`. Neurons chosen on WikiText-2 *valid* "
        f"({discovery.get('num_tokens', cfg.discovery_tokens):,} tokens, "
        f"text `{cfg.discovery_text}`{unk}; top p% Wasserstein-1 per layer for p in "
        f"{', '.join(f'{p:g}%' for p in cfg.top)}, main p {cfg.main_top:g}%), dtype {cfg.dtype}.",
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
    ]


def main_table(rows: list[dict[str, Any]]) -> list[str]:
    """The main p's conditions, with pair counts, CIs, McNemar p and MDEs."""
    lines = [
        "| condition | neurons | BLiMP pairs | BLiMP acc | BLiMP delta [95% CI] | p | MDE | TSE pairs | TSE acc "
        "| TSE delta [95% CI] | p | MDE | PPL | PPL ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ppl, ratio = _ppl(r)
        lines.append(
            f"| {r['condition']} | {r['neurons']:,} | {_n(r, 'blimp')} | {_acc(r, 'blimp')} | {_cells(r, 'blimp')} | "
            f"{_n(r, 'tse')} | {_acc(r, 'tse')} | {_cells(r, 'tse')} | {ppl} | {ratio} |")
    return lines


def matched_note(matched: list[dict[str, Any]]) -> list[str]:
    """One sentence per perplexity-matched control: how close it came to its target."""
    lines = []
    for m in matched:
        state = ("matched within the tolerance" if m.get("converged")
                 else "**not matched** (closest count kept; read its row with care)")
        base, tol = m.get("baseline_perplexity"), m.get("tolerance")
        lines.append(
            f"{m['condition']}: perplexity {m['perplexity']:.2f} against the Wasserstein set's "
            f"{m['target_perplexity']:.2f} ({m['perplexity'] / m['target_perplexity'] - 1:+.2%})"
            + (f" (unablated {base:.2f})" if base else "")
            + f" on {m.get('eval_tokens') or '?'} held-out tokens"
            + (f" of `{m['search_corpus']}`" if m.get("search_corpus") else "")
            + (f", tolerance {tol:.2%}" if tol is not None else "")
            + (f" ({m['tolerance_effect']:g} of the set's effect)" if m.get("tolerance_effect") else "")
            + f", {state}, after {m.get('iterations') or '?'} evaluations"
            + _eval_text_clause(m) + ".")
    return ["", *lines] if lines else []


def _eval_text_clause(m: dict[str, Any]) -> str:
    """Whether the match carries over to the main table's perplexity text."""
    if m.get("eval_ppl_ratio") is None:
        return ""
    holds = m.get("holds_on_eval_text")
    if holds is None:
        verdict = "no tolerance recorded"
    elif holds:
        verdict = "the match holds there"
    elif m["eval_ppl_ratio"] > m["target_eval_ppl_ratio"]:
        # Which way it misses decides how to read the head to head: a control that costs more
        # perplexity may hurt grammar more for that reason alone; one that costs less cannot.
        verdict = ("**the match does not hold there**: the control costs more perplexity, so part of a "
                   "larger grammatical cost may be perplexity")
    else:
        verdict = ("**the match does not hold there**: the control costs less perplexity, so a larger "
                   "grammatical cost is not a perplexity effect")
    return (f"; on the main table's perplexity text x{m['eval_ppl_ratio']:.3f} against the Wasserstein "
            f"set's x{m['target_eval_ppl_ratio']:.3f}: {verdict}")


def sweep_table(sweep: list[dict[str, Any]]) -> list[str]:
    """Every non-baseline condition at every p, on the sweep's common pairs."""
    lines = ["| p | condition | neurons | BLiMP delta [95% CI] | p | MDE | TSE delta [95% CI] | p | MDE | PPL ratio |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(sweep, key=lambda r: (r["top"], r["condition"])):
        lines.append(f"| {r['top']:g}% | {r['kind']} | {r['neurons']:,} | {_cells(r, 'blimp')} | "
                     f"{_cells(r, 'tse')} | {_ppl(r)[1]} |")
    return lines


def tse_field_table(tse_by_field: list[dict[str, Any]]) -> list[str]:
    """TSE deltas per field under the mean per-token and the summed metric."""
    lines = ["| condition | field | pairs | mean per token | summed |", "|---|---|---:|---:|---:|"]
    by = {(t["condition"], t["field"], t["metric"]): t for t in tse_by_field}
    for cond, field in dict.fromkeys((t["condition"], t["field"]) for t in tse_by_field):
        m, sm = by[(cond, field, "correct_mean")], by[(cond, field, "correct_sum")]
        lines.append(f"| {cond} | {field} | {m['n']:,} | {fmt_ci(m['delta'], m['ci_lo'], m['ci_hi'])} | "
                     f"{fmt_ci(sm['delta'], sm['ci_lo'], sm['ci_hi'])} |")
    return lines


def head_to_head_table(rows: list[dict[str, Any]]) -> list[str]:
    """The Wasserstein-negative set against each control at the same p, pair by pair."""
    if not rows:
        return []
    lines = ["| p | control | test | pairs | acc Wasserstein-negative | acc control | difference [95% CI] | p | MDE "
             "| verdict |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    redrawn = {(r["top"], r["control_kind"]) for r in rows if r.get("draw")}
    for r in sorted(rows, key=lambda r: (r["top"], r["control_kind"], r.get("draw", 0), r["task"])):
        task = {"blimp": "BLiMP", "tse": "TSE"}[r["task"]]
        verdict = f"**{r['verdict']}**" if r["verdict"] != "no difference detected" else r["verdict"]
        control = r["control_kind"] + (f" (draw {r.get('draw', 0) + 1})" if (r["top"], r["control_kind"]) in redrawn
                                       else "")
        lines.append(f"| {r['top']:g}% | {control} | {task} | {r['n']:,} | {100 * r['acc_wasserstein']:.1f} "
                     f"| {100 * r['acc_control']:.1f} | {fmt_ci(r['diff'], r['ci_lo'], r['ci_hi'])} | "
                     f"{fmt_p(r['p'])} | {100 * r['mde']:.1f} | {verdict} |")
    return lines


def draws_table(draws: list[dict[str, Any]], head_to_head: list[dict[str, Any]]) -> list[str]:
    """Each draw of the random perplexity-matched control: its own effect, and the
    Wasserstein set's difference from it (empty with a single draw)."""
    if len(draws) < 2:
        return []
    h2h = {(r["control"], r["task"]): r for r in head_to_head}
    lines = ["| draw | seed | neurons | PPL ratio | BLiMP delta [95% CI] | TSE delta [95% CI] "
             "| Wasserstein minus draw, BLiMP | TSE |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(draws, key=lambda r: r["draw"]):
        vs = [fmt_ci(h["diff"], h["ci_lo"], h["ci_hi"]) if (h := h2h.get((r["condition"], t))) else "-"
              for t in ("blimp", "tse")]
        deltas = [fmt_ci(*r[f"{t}_delta"]) if f"{t}_delta" in r else "-" for t in ("blimp", "tse")]
        lines.append(f"| {r['draw'] + 1} | {r['seed']} | {r['neurons']:,} | {_ppl(r)[1]} | {deltas[0]} | "
                     f"{deltas[1]} | {vs[0]} | {vs[1]} |")
    return lines


def draws_summary(draws: list[dict[str, Any]], head_to_head: list[dict[str, Any]]) -> list[str]:
    """One sentence per test: the range of the draws' effects, and how many draws the
    Wasserstein set hurts more than, hurts less than, or cannot be told from."""
    if len(draws) < 2:
        return []
    labels = {d["condition"] for d in draws}
    lines = []
    for task, name in (("blimp", "BLiMP"), ("tse", "TSE")):
        deltas = [100 * d[f"{task}_delta"][0] for d in draws if f"{task}_delta" in d]
        rows = [r for r in head_to_head if r["task"] == task and r["control"] in labels]
        if not deltas or not rows:
            continue
        diffs = [100 * r["diff"] for r in rows]
        verdicts = [r["verdict"] for r in rows]
        lines.append(
            f"{name}: the {len(deltas)} draws cost {min(deltas):+.1f} to {max(deltas):+.1f} points; the "
            f"Wasserstein set minus a draw is {min(diffs):+.1f} to {max(diffs):+.1f} "
            f"(verdicts: wasserstein hurts more {verdicts.count('wasserstein hurts more')}, control hurts "
            f"more {verdicts.count('control hurts more')}, no difference detected "
            f"{verdicts.count('no difference detected')}).")
    return ["", *lines] if lines else []


def draws_pooled(pooled: list[dict[str, Any]]) -> list[str]:
    """One sentence per test: the Wasserstein set against all draws at once, and what the
    pooled CI bounds (empty with fewer than two draws)."""
    lines = []
    for r in pooled:
        name = {"blimp": "BLiMP", "tse": "TSE"}[r["task"]]
        diff, lo, hi = (100 * r[k] for k in ("diff", "ci_lo", "ci_hi"))
        if r["verdict"] == "no difference detected":
            reading = (f"no difference detected (95%: the Wasserstein set costs at most {-lo:.1f} points more "
                       f"and at most {hi:.1f} less than these draws on average)")
        else:
            reading = f"**{r['verdict']}**"
        spread = [100 * d for d in r["draw_diffs"]]
        lines.append(
            f"{name}, pooled over the {r['draws']} draws: Wasserstein minus the draws' mean "
            f"{fmt_ci(r['diff'], r['ci_lo'], r['ci_hi'])} on {r['n']:,} pairs (MDE {100 * r['mde']:.1f}, "
            f"p {fmt_p(r['p'])}): {reading}; one draw at a time it was {min(spread):+.1f} to {max(spread):+.1f}.")
    if not lines:
        return []
    return ["", "Pooled, the difference is the per-pair mean of the Wasserstein set's correctness minus "
            "the draws' mean correctness, with a bootstrap CI over pairs that holds these draws fixed "
            "(`report.json` `draws_pooled`; the single-draw range shows how far a new draw may land):",
            "", *[f"- {line}" for line in lines]]


def draws_groups_table(pooled: list[dict[str, Any]]) -> list[str]:
    """The pooled difference per BLiMP phenomenon and TSE field, with each draw's own and
    the Benjamini-Hochberg q over all groups (bold: q < 0.05)."""
    groups = [(r["task"], g) for r in pooled for g in r.get("groups", [])]
    if not groups:
        return []
    lines = ["| test | group | pairs | Wasserstein minus the draws' mean [95% CI] | one draw at a time | q |",
             "|---|---|---:|---:|---:|---:|"]
    for task, g in groups:
        diff = fmt_ci(g["diff"], g["ci_lo"], g["ci_hi"])
        if g.get("q", 1.0) < 0.05:
            diff = f"**{diff}**"
        each = ", ".join(f"{100 * d:+.1f}" for d in g["draw_diffs"])
        lines.append(f"| {'BLiMP' if task == 'blimp' else 'TSE'} | {g['group']} | {g['n']:,} | {diff} | {each} | "
                     f"{fmt_p(g['q']) if 'q' in g else '-'} |")
    return lines


def premise_table(premise: list[dict[str, Any]]) -> list[str]:
    """Wasserstein vs other neurons over all layers (empty without the statistic)."""
    overall = {r["group"]: r for r in premise if r["layer"] == "all"}
    if not overall:
        return []
    lines = ["| neurons | count | W1 | W1 share at h < 0 | W1 share at z < 0 | tokens with h < 0 |",
             "|---|---:|---:|---:|---:|---:|"]
    for group in ("wasserstein", "other"):
        r = overall[group]
        lines.append(f"| {group} | {r['neurons']:,} | {r['w1']:.3f} | {r['share_h_negative']:.2f} | "
                     f"{r['share_z_negative']:.2f} | {r['frac_h_negative']:.2f} |")
    return lines


def render(cfg: Any, data: dict[str, Any], head: list[str], figures: dict[str, Any],
           extra_sections: list[str], elapsed_s: float | None) -> str:
    """The whole REPORT.md."""
    main_p = cfg.main_top
    lines = [*head, "", f"## Main conditions (top {main_p:g}%)", "", *main_table(data["rows"])]
    if data["pending"]:
        lines += ["", f"**Not finished yet** (rerun the command to resume): {', '.join(data['pending'])}."]
    lines += matched_note(data.get("matched", []))
    h2h = head_to_head_table(data.get("head_to_head", []))
    if h2h:
        lines += ["", "## Head to head: the Wasserstein set against each control", "",
                  "The paper's claim is comparative: the Wasserstein neurons' negative side matters "
                  "*more* than random neurons of the same count and than the many more neurons it "
                  "takes to cost the same perplexity. Each row compares the two conditions on the "
                  "same pairs (difference = Wasserstein-negative accuracy minus the control's, in "
                  "points; below 0: the Wasserstein ablation hurts more), with a paired bootstrap CI, "
                  "McNemar p between the two, and the MDE of that comparison (`head_to_head.csv`; per BLiMP "
                  "phenomenon and TSE field, uncorrected: `head_to_head_groups.csv`).",
                  "", *h2h]
    draws = draws_table(data.get("draws", []), data.get("head_to_head", []))
    if draws:
        lines += ["", f"## The random perplexity-matched control, draw by draw (top {main_p:g}%)", "",
                  "Which random non-Wasserstein neurons a draw takes decides how much one draw hurts; "
                  f"each of the {len(data['draws'])} draws (own seed, same target perplexity, same held-out "
                  f"text) is searched and scored on the same {cfg.blimp_per_paradigm} BLiMP pairs per "
                  f"paradigm and {cfg.tse_per_test} TSE pairs per test, beside the Wasserstein set's "
                  "difference from it (`draws.csv`). Draws that disagree mean the comparison with *a* "
                  "random perplexity-matched set is decided by the draw, not by the neurons being random.",
                  "", *draws, *draws_summary(data["draws"], data.get("head_to_head", [])),
                  *draws_pooled(data.get("draws_pooled", []))]
        by_group = draws_groups_table(data.get("draws_pooled", []))
        if by_group:
            n_groups = len(by_group) - 2
            lines += ["", "The same pooled difference per BLiMP phenomenon and TSE field (below 0: the "
                      "Wasserstein set hurts that group more than the draws do), each draw's own difference "
                      f"beside it, and q: Benjamini-Hochberg over all {n_groups} groups (a scan this wide finds "
                      "about one p < 0.05 by chance); bold: q < 0.05 (`report.json` `draws_pooled[].groups`).",
                      "", *by_group]
            if figures.get("draws_groups"):
                lines += ["", "![Wasserstein minus the draws, per group](draws_by_group.png)"]
    if len(cfg.top) > 1:
        lines += ["", "## Top-p sweep", "",
                  f"Every condition on the same {cfg.blimp_per_paradigm} BLiMP pairs per paradigm and "
                  f"{cfg.tse_per_test} TSE pairs per test (`sweep_table.csv`).", "", *sweep_table(data["sweep"])]
        if figures.get("sweep"):
            lines += ["", "![Deltas against p](sweep.png)"]
    if figures.get("cost"):
        lines += ["", "## Grammar cost against perplexity cost", "",
                  "Each condition at each p (and each draw of the matched control) as its BLiMP and TSE "
                  "change against its perplexity ratio. Where the points of all kinds fall on one curve, "
                  "an ablation's grammar cost follows from its perplexity cost; the paper's claim is that "
                  "the Wasserstein-negative points lie below the others'.", "",
                  "![Grammar cost against perplexity cost](cost_vs_perplexity.png)"]
    if data["tse_by_field"]:
        lines += ["", f"## TSE by field (top {main_p:g}%)", "",
                  "Accuracy change in points [95% CI] under the paper's two metrics: mean per-token "
                  "log-probability and summed log-probability (`tse_by_field.csv`).", "",
                  *tse_field_table(data["tse_by_field"])]
    premise = premise_table(data.get("premise", []))
    if premise:
        lines += ["", f"## The premise: where the non-Gaussian mass sits (top {main_p:g}% vs the rest)", "",
                  "Means over neurons of: W1 to N(0,1); the share of each neuron's W1 at negative raw "
                  "pre-activations (h < 0, the side the ablation zeroes) and at z < 0; the share of "
                  "tokens with h < 0. Per layer: `premise.csv`, `premise.png`.", "", *premise]
        if figures.get("premise"):
            lines += ["", "![Premise per layer](premise.png)"]
    lines += ["", "![BLiMP per-phenomenon deltas](blimp_phenomena_deltas.png)", ""]
    if figures.get("scores"):
        lines += ["![Wasserstein scores](wasserstein_scores.png)", ""]
    lines += ["![Neuron counts](neuron_counts.png)", ""]
    lines += extra_sections
    if elapsed_s is not None:
        lines.append(f"Total time: {elapsed_s / 60:.1f} min, summed over the invocations `timing.json` records "
                     "(one stopped before the end counts up to its last finished phase). Files: "
                     "`report.json`, `main_table.csv`, `head_to_head.csv`, `head_to_head_groups.csv`, `draws.csv`, `sweep_table.csv`, `tse_by_field.csv`, "
                     "`runs*/*/*/records.jsonl`.")
    return "\n".join(lines) + "\n"


def _lm_column(label: str) -> str:
    """A condition's lm_eval label (``wasserstein-top1``, ``perplexity-matched-bottom-top1``,
    ``perplexity-matched-top1-s0``) as the README's column name."""
    if label == "baseline":
        return "baseline"
    if label.startswith("wasserstein"):
        return "Wasserstein-negative"
    if label.startswith("perplexity-matched-bottom"):
        return "bottom perplexity-matched"
    if label.startswith("perplexity-matched"):
        return "random perplexity-matched"
    return label


def lm_tasks_table(lm_tasks: dict[str, Any] | None) -> list[str]:
    """The double dissociation in one compact table: per task its headline metrics (accuracy;
    LAMBADA's perplexity too), the baseline's value, every other condition's delta ± the
    paired standard error (accuracies in %, deltas in points). REPORT.md's lm_eval section
    has every metric with the conditions' values; this is the view the README pastes."""
    if not lm_tasks or not lm_tasks.get("rows"):
        return []
    labels = [c["label"] for c in lm_tasks["conditions"]]
    cell = {(r["task"], r["metric"], r["condition"]): r for r in lm_tasks["rows"] if r["filter"] == "none"}
    keys = list(dict.fromkeys((r["task"], r["metric"]) for r in lm_tasks["rows"]
                              if r["filter"] == "none" and r["metric"] in ("acc", "perplexity")))
    lines = ["| task | metric | " + " | ".join(_lm_column(label) for label in labels) + " |",
             "|---|---|" + "---:|" * len(labels)]
    for task, metric in keys:
        scale = 100.0 if metric == "acc" else 1.0
        cells = []
        for label in labels:
            r = cell.get((task, metric, label))
            if r is None or r.get("value") is None:
                cells.append("-")
            elif r.get("delta") is None:
                cells.append(f"{r['value'] * scale:.1f}")
            else:
                se = f" ± {r['delta_stderr'] * scale:.1f}" if r.get("delta_stderr") is not None else ""
                cells.append(f"{r['delta'] * scale:+.1f}{se}")
        lines.append(f"| {task.removesuffix('_local')} | {metric} | " + " | ".join(cells) + " |")
    return lines


SECTIONS = {"main": lambda data: main_table(data["rows"]), "sweep": lambda data: sweep_table(data["sweep"]),
            "tse-fields": lambda data: tse_field_table(data["tse_by_field"]),
            "premise": lambda data: premise_table(data.get("premise", [])),
            "head-to-head": lambda data: head_to_head_table(data.get("head_to_head", [])),
            "draws": lambda data: draws_table(data.get("draws", []), data.get("head_to_head", [])),
            "draws-pooled": lambda data: draws_pooled(data.get("draws_pooled", []))[3:],
            "draws-groups": lambda data: draws_groups_table(data.get("draws_pooled", [])),
            "lm-tasks": lambda data: lm_tasks_table(data.get("lm_tasks"))}
"""Tables ``python -m eval.report FOLDER --print NAME`` prints from a report.json (for the README)."""

__all__ = ["SECTIONS", "draws_groups_table", "draws_pooled", "draws_summary", "draws_table", "fmt_ci", "head_to_head_table", "header", "lm_tasks_table", "main_table", "matched_note", "premise_table", "render",
           "sweep_table", "tse_field_table"]
