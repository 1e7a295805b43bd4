"""The report's numbers, all read from files: the run folders (``runs/<condition>/<task>/``,
``runs-full/``), the discovery statistics and the sets' provenance.

Reads files only, so a report can be rebuilt at any time, mid-run included: a condition
whose runs are not finished is listed as pending, never guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import false_discovery_control

from eval.reproduce_config import BASELINE, CONTROL_KINDS, REDRAWN_KIND, ConditionSpec
from eval.stats import ComparisonRow, accuracy_table, compare_runs, pooled_paired_difference
from eval.tasks import load_records, load_summary

GROUP_OF = {"blimp": "phenomenon", "tse": "field"}
"""How the per-group comparisons split each test: BLiMP by phenomenon, TSE by field."""


def neuron_count(disc: Path, set_name: str | None) -> tuple[int, str]:
    path = disc / "sets" / f"{set_name}.json"
    if set_name is None or not path.is_file():  # the baseline; a set not made yet (a mid-run report)
        return 0, "-"
    data = json.loads(path.read_text())
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
    ``draws``: every draw of the random perplexity-matched control at the main p (the
    first included) from ``runs/``, when the run has more than one.
    """
    runs, full = out / "runs", out / "runs-full"
    rows, sweep, phenomena, pending, draws = [], [], {}, [], []
    redrawn = any(spec.draw for spec in specs)
    for spec in specs:
        count, modes = neuron_count(disc, spec.set_name)
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
        # the draws: the first is the main p's condition of that kind, the others exist only there
        if redrawn and spec.kind == REDRAWN_KIND and (spec.main or spec.draw) and "blimp_acc" in sub:
            draws.append(sub | {"draw": spec.draw, "seed": seed + spec.draw})
        if spec.draw:  # not a point of the sweep: reported beside the first draw
            if "blimp_acc" not in sub:
                pending.append(spec.label)
            continue
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
            "pending": pending, "draws": draws}


def head_to_head(out: Path, specs: list[ConditionSpec], n_boot: int, seed: int) -> list[dict[str, Any]]:
    """The paper's claim itself: the Wasserstein-negative set against each control at the
    same p, pair by pair (``diff`` = its accuracy minus the control's; below 0: it hurts
    more). Each delta against the baseline says what an ablation does; only this
    difference says whether the Wasserstein set does *more* than a control, and two CIs
    that each exclude 0 do not answer that. ``groups``: the same comparison per BLiMP
    phenomenon or TSE field (uncorrected: where to look, not a verdict;
    ``head_to_head_groups.csv``).

    BLiMP from ``runs-full/`` where both conditions have a full run, else ``runs/``; TSE
    from ``runs/``. ``verdict``: ``wasserstein hurts more`` (CI below 0), ``control hurts
    more`` (CI above 0), else ``no difference detected``; ``mde`` says how large a
    difference these pairs would have detected.
    """
    runs, full = out / "runs", out / "runs-full"
    rows = []
    for spec in specs:
        if spec.kind != "wasserstein-negative":
            continue
        controls = sorted((s for s in specs if s.kind in CONTROL_KINDS and s.top == spec.top),
                          key=lambda s: (CONTROL_KINDS.index(s.kind), s.draw))  # every draw
        for control in controls:
            for task in ("blimp", "tse"):
                folder = _finished_in((full, runs) if task == "blimp" else (runs,), task, spec.label, control.label)
                if folder is None:
                    continue
                *groups, overall = compare_runs(
                    load_records(folder / control.label / task), load_records(folder / spec.label / task),
                    group_keys=(GROUP_OF[task],), n_boot=n_boot, seed=seed)
                rows.append({"top": spec.top, "control": control.label, "control_kind": control.kind,
                             "draw": control.draw, "task": task, "source": folder.name,
                             **_difference(overall), "groups": [{"group": g.group, **_difference(g)} for g in groups]})
    return rows


def _verdict(ci_lo: float, ci_hi: float) -> str:
    """A difference's reading (Wasserstein minus control): its CI below, above or around 0."""
    return ("wasserstein hurts more" if ci_hi < 0 else "control hurts more" if ci_lo > 0 else
            "no difference detected")


def _difference(r: ComparisonRow) -> dict[str, Any]:
    """A head-to-head row's numbers: run B is the Wasserstein set, run A the control."""
    return {"n": r.n, "acc_wasserstein": r.acc_b, "acc_control": r.acc_a, "diff": r.delta, "ci_lo": r.ci_lo,
            "ci_hi": r.ci_hi, "p": r.p_value, "mde": r.mde, "verdict": _verdict(r.ci_lo, r.ci_hi)}


def _pooled(r: ComparisonRow, draw_accuracies: list[float]) -> dict[str, Any]:
    """A pooled row's numbers: run A is the Wasserstein set, B the draws' mean; ``draw_diffs``
    its difference from each draw alone."""
    return {"n": r.n, "acc_wasserstein": r.acc_a, "acc_draws": r.acc_b, "diff": r.delta, "ci_lo": r.ci_lo,
            "ci_hi": r.ci_hi, "p": r.p_value, "mde": r.mde, "verdict": _verdict(r.ci_lo, r.ci_hi),
            "draw_diffs": [r.acc_a - acc for acc in draw_accuracies]}


def pooled_draws(out: Path, specs: list[ConditionSpec], n_boot: int, seed: int) -> list[dict[str, Any]]:
    """The Wasserstein-negative set at the main p against all finished draws of the random
    perplexity-matched control at once (:func:`eval.stats.pooled_paired_difference`, from
    ``runs/``, where every draw has the same pairs), per test; empty with fewer than two
    draws. Each draw alone answers with its own noise; pooled, the difference is pinned
    about as well as the Wasserstein run alone allows, so a "no difference" becomes a
    bound on how much more the Wasserstein set can hurt (``ci_lo``). ``verdict`` as in
    :func:`head_to_head`; ``draw_diffs``: each draw's own difference, the spread a new draw
    would land in (the CI holds the draws fixed). ``groups``: the same per BLiMP phenomenon
    and TSE field, each with its Benjamini-Hochberg ``q`` over all groups of both tests (a
    scan of 16 groups finds about one "difference" at p < 0.05 by chance alone).
    """
    runs = out / "runs"
    wasserstein = next((s for s in specs if s.kind == "wasserstein-negative" and s.main), None)
    draws = [s for s in specs if s.kind == REDRAWN_KIND and (s.main or s.draw)]
    if wasserstein is None or len(draws) < 2:
        return []
    rows = []
    for task in ("blimp", "tse"):
        finished = [s for s in sorted(draws, key=lambda s: s.draw) if _finished_in((runs,), task, s.label)]
        if len(finished) < 2 or not _finished_in((runs,), task, wasserstein.label):
            continue
        own = load_records(runs / wasserstein.label / task)
        each = [load_records(runs / s.label / task) for s in finished]
        *groups, pooled = pooled_paired_difference(own, each, (GROUP_OF[task],), n_boot=n_boot, seed=seed)
        tables = [accuracy_table(r, group_keys=(GROUP_OF[task],)) for r in each]  # each draw's own
        rows.append({"top": wasserstein.top, "task": task, "draws": len(finished),
                     "controls": [s.label for s in finished],
                     **_pooled(pooled, [t.overall.accuracy for t in tables]),
                     "groups": [{"group": g.group, **_pooled(g, [t.level(GROUP_OF[task])[g.group].accuracy
                                                                 for t in tables])}
                                for g in groups]})
    groups = [g for r in rows for g in r["groups"]]
    if groups:  # a scan over every group of both tests: Benjamini-Hochberg q-values across all of them
        for g, q in zip(groups, false_discovery_control([g["p"] for g in groups], method="bh"), strict=True):
            g["q"] = float(q)
    return rows


def _finished_in(folders: tuple[Path, ...], task: str, *labels: str) -> Path | None:
    """The first of ``folders`` where every condition of ``labels`` has a finished ``task``."""
    return next((f for f in folders if all((f / name / task / "summary.json").is_file() for name in labels)), None)


def _done(runs: Path, label: str, task: str) -> bool:
    """Whether both the condition and the baseline have a finished ``task`` run in ``runs``
    (a report written mid-run shows what is finished and lists the rest as pending)."""
    return all((runs / name / task / "summary.json").is_file() for name in (label, BASELINE))


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


def matched_controls(disc: Path, specs: list[ConditionSpec], runs: Path | None = None) -> list[dict[str, Any]]:
    """How close each perplexity-matched control came to its target, from its set's
    provenance (the search records its target, result, tolerance and whether it converged),
    and whether the match still holds on the report's own perplexity text.

    The search matches on its own text (``eval_corpus``); the main table's perplexity is
    measured on other text, in other windows. A control that is matched on the first but
    not on the second is not a perplexity-matched control for the table's purposes, so the
    check is made on the table's numbers, with the search's own tolerance: in log-perplexity
    effect (``tolerance_effect`` of the Wasserstein set's own effect) or, without it, as a
    relative tolerance on the perplexity. Absent while a run's perplexity is not scored.
    """
    wasserstein = {s.top: s.label for s in specs if s.kind == "wasserstein-negative"}
    out = []
    for spec in specs:
        path = disc / "sets" / f"{spec.set_name}.json"
        if not spec.set_name or not spec.set_name.startswith("perplexity-matched") or not path.exists():
            continue
        src = json.loads(path.read_text()).get("provenance", {}).get("source", {})
        if "target_perplexity" not in src:
            continue
        entry = {"condition": spec.label, **{k: src.get(k) for k in (
            "perplexity", "target_perplexity", "baseline_perplexity", "eval_tokens", "tolerance",
            "tolerance_effect", "converged", "iterations")}}
        entry["search_corpus"] = Path(src["eval_corpus"]).name if src.get("eval_corpus") else None
        if runs is not None and spec.top in wasserstein:
            entry |= evaluation_text_match(runs, spec.label, wasserstein[spec.top],
                                           src.get("tolerance_effect"), src.get("tolerance"))
        out.append(entry)
    return out


def evaluation_text_match(runs: Path, control: str, wasserstein: str, tolerance_effect: float | None,
                          tolerance: float | None) -> dict[str, Any]:
    """The control's and the Wasserstein set's perplexity ratios on the main table's text,
    and whether they agree within the search's tolerance (empty until both are scored)."""
    done = [(runs / label / "perplexity" / "summary.json").is_file() for label in (BASELINE, control, wasserstein)]
    if not all(done):
        return {}
    ratio_c, ratio_w = (_ppl_cells(runs, label)["ppl_ratio"] for label in (control, wasserstein))
    if tolerance_effect is not None:
        holds = abs(np.log(ratio_c) - np.log(ratio_w)) <= tolerance_effect * abs(np.log(ratio_w))
    elif tolerance is not None:
        holds = abs(ratio_c / ratio_w - 1) <= tolerance
    else:
        holds = None
    return {"eval_ppl_ratio": ratio_c, "target_eval_ppl_ratio": ratio_w,
            "holds_on_eval_text": None if holds is None else bool(holds)}
