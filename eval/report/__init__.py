"""The reproduction report: REPORT.md, report.json, CSV and PNG from a run folder.

Reads only files (``OUT/runs*/<condition>/<task>/``, ``OUT/discovery``, ``OUT/lm_tasks``,
``OUT/layers``), so it can be rebuilt at any time, mid-run included:
``python -m eval.report docs/results/smollm2-135m``. One module per concern:
:mod:`~eval.report.collect` (the numbers), :mod:`~eval.report.figures` (PNG),
:mod:`~eval.report.tables` (CSV), :mod:`~eval.report.markdown` (REPORT.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eval.report import figures
from eval.report.collect import collect, head_to_head, matched_controls, pooled_draws, premise_statistics
from eval.report.markdown import header, render
from eval.report.tables import (
    DRAW_COLUMNS,
    HEAD_TO_HEAD_COLUMNS,
    HEAD_TO_HEAD_GROUP_COLUMNS,
    PREMISE_COLUMNS,
    TSE_FIELD_COLUMNS,
    group_rows,
    read_premise_csv,
    write_csv,
)
from eval.reproduce_config import BASELINE, ConditionSpec

__all__ = ["ReportWouldLoseResults", "finished_results", "rebuild", "write_report"]


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _analysis_sections(out: Path, result: dict[str, Any]) -> list[str]:
    """The lm_eval tasks (the non-grammatical side), their oracle checks and the layer
    analysis, when run."""
    sections = []
    if (out / "lm_tasks" / "lm_tasks.json").exists():
        from eval.analysis.lm_tasks import load_result, markdown_section

        lm_tasks = load_result(out / "lm_tasks" / "lm_tasks.json")
        result["lm_tasks"] = json.loads(lm_tasks.model_dump_json())
        sections.append(markdown_section(lm_tasks, image="lm_tasks/lm_tasks.png"))
    for check_file in sorted((out / "lm_tasks").glob("oracle_check*.json")):
        from eval.analysis import oracle_check

        check = oracle_check.load_check(check_file)
        name = check_file.relative_to(out).as_posix()
        result.setdefault("oracle_checks", {})[name] = json.loads(check.model_dump_json())
        sections.append(oracle_check.markdown_section(check, name))
    if (out / "layers" / "layers.json").is_file():
        from eval.analysis import layers

        sections.append(layers.markdown_section(layers.load_result(out / "layers" / "layers.json"),
                                                image="layers/layers.png"))
    return sections


def _kept(figure: Path) -> Path | None:
    """A figure drawn from ``discovery/stats.npz`` by an earlier build, kept (and embedded)
    where a clone has no stats.npz to redraw it from: discovery is done once per folder."""
    return figure if figure.is_file() else None


class ReportWouldLoseResults(RuntimeError):
    """The folder's report.json holds results that its run folders no longer do."""


def finished_results(data: dict[str, Any]) -> set[tuple[str, str]]:
    """``(condition, blimp_acc | tse_acc | ppl)`` for every number a report holds."""
    return {(row["condition"], key) for row in [*data.get("rows", []), *data.get("sweep", [])]
            for key in ("blimp_acc", "tse_acc", "ppl") if row.get(key) is not None}


def _refuse_losing_results(out: Path, data: dict[str, Any]) -> None:
    """A report is rebuilt from the run folders; where they hold less than the report
    already shows (a clone of a folder whose runs were never committed, a deleted run),
    writing would silently replace published numbers with "pending". Refuse instead."""
    old = _json(out / "report.json")
    lost = finished_results(old) - finished_results(data)
    if lost:
        conditions = sorted({c for c, _ in lost})
        raise ReportWouldLoseResults(
            f"{out}: report.json has {len(lost)} result{'s' * (len(lost) != 1)} (of {len(conditions)} "
            f"condition{'s' * (len(conditions) != 1)}: "
            f"{', '.join(conditions[:4])}{', ...' if len(conditions) > 4 else ''}) that the run folders "
            f"(runs*/<condition>/<task>/) no longer hold, so rebuilding would drop them. Nothing was "
            f"written. Restore the runs, or remove report.json to rebuild from what is there.")


def write_report(cfg: Any, disc: Path, specs: list[ConditionSpec], model_dir: Path,
                 elapsed_s: float | None = None, keep_published: bool = False) -> Path:
    """Collect every number of the run folder ``cfg.out_dir()`` and write its report files.

    ``keep_published``: raise :class:`ReportWouldLoseResults`, writing nothing, when the
    folder's report.json shows results its run folders do not hold (a rebuild; a running
    ``negablate reproduce`` re-scores a changed set, and its report drops the old numbers)."""
    from eval.tasks import pack_runs, unpack_runs

    out = cfg.out_dir()
    unpack_runs(out, cfg.data_dir)  # a clone: records from the committed packs and the data
    pack_runs(out)  # runs written before packs existed get their committed form
    data = collect(out, disc, specs, cfg.n_boot, cfg.seed)
    if keep_published:
        _refuse_losing_results(out, data)
    data["matched"] = matched_controls(disc, specs, out / "runs")
    data["head_to_head"] = head_to_head(out, specs, cfg.n_boot, cfg.seed)
    data["draws_pooled"] = pooled_draws(out, specs, cfg.n_boot, cfg.seed)
    # discovery/stats.npz is not committed: a clone keeps the premise its report published
    data["premise"] = premise_statistics(disc, cfg.main_top) or read_premise_csv(out / "premise.csv")
    discovery = _json(disc / "stats.json")
    model_meta = _json(model_dir / "negablate_model.json")
    corpus = _json(out / "corpus" / f"wikitext-2-valid.{cfg.discovery_text}.json")
    drawn = {
        "phenomena": figures.plot_phenomena(data["phenomena"], out / "blimp_phenomena_deltas.png"),
        "sweep": figures.plot_sweep(data["sweep"], out / "sweep.png"),
        "cost": figures.plot_cost_against_perplexity(data["sweep"], data["draws"], out / "cost_vs_perplexity.png"),
        "scores": figures.plot_scores(disc, out / "wasserstein_scores.png") or _kept(out / "wasserstein_scores.png"),
        "counts": figures.plot_counts(data["rows"], out / "neuron_counts.png"),
        "premise": figures.plot_premise(data["premise"], out / "premise.png"),
        "draws_groups": figures.plot_draws_groups(data["draws_pooled"], out / "draws_by_group.png"),
    }
    result = {
        "config": json.loads(cfg.model_dump_json()), "model_dir": str(model_dir), "model": model_meta,
        "discovery": discovery, "discovery_corpus": corpus, "elapsed_s": elapsed_s, **data,
        # relative to the report's folder: the same on every clone, however the command was called
        "figures": {k: Path(v).relative_to(out).as_posix() for k, v in drawn.items() if v},
    }
    extra = _analysis_sections(out, result)
    (out / "report.json").write_text(json.dumps(result, indent=2, default=str))
    write_csv(data["rows"], out / "main_table.csv")
    write_csv(data["sweep"], out / "sweep_table.csv")
    write_csv(data["tse_by_field"], out / "tse_by_field.csv", TSE_FIELD_COLUMNS)
    write_csv(data["head_to_head"], out / "head_to_head.csv", HEAD_TO_HEAD_COLUMNS)
    write_csv(group_rows(data["head_to_head"]), out / "head_to_head_groups.csv", HEAD_TO_HEAD_GROUP_COLUMNS)
    if data["draws"]:
        write_csv(data["draws"], out / "draws.csv", DRAW_COLUMNS)
    if data["premise"]:
        write_csv(data["premise"], out / "premise.csv", PREMISE_COLUMNS)
    full_n = next((r.get("blimp_n") for r in data["rows"] if r["condition"] == BASELINE), None)
    head = header(cfg, model_dir, model_meta, discovery, corpus, full_n)
    path = out / "REPORT.md"
    path.write_text(render(cfg, data, head, drawn, extra, elapsed_s))
    return path


def rebuild(folder: Path) -> Path:
    """Write the report of a reproduce folder from its files, finished or not (``python -m
    eval.report docs/results/smollm2-135m``): what is scored so far, the rest listed as pending.
    Refuses (:class:`ReportWouldLoseResults`) to drop results the old report.json shows."""
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
    elapsed = _json(folder / "timing.json").get("total_s")  # the run's wall time so far
    return write_report(config, folder / "discovery", condition_sets(config), model_dir, elapsed_s=elapsed,
                        keep_published=True)
