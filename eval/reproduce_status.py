"""`negablate reproduce --plan`: what a run folder holds, what is left, and about how long.

A powered run takes hours and resumes across interruptions, so the question before
each restart is where it stands. This answers it from the files alone (no engine,
no server): each phase's state, the sequences still to score per runs folder, and
the time they need at the rate *this folder's* finished runs were scored at (their
``summary.json`` records the sequences the server computed, cache hits excluded, and
the seconds it took), so the estimate is this machine's, on this model, in this dtype.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from eval.analysis.sweep import Condition, EvalSettings, pending_tasks
from eval.data import load_blimp, load_tse, load_tse_ml, stratified_subsample
from eval.progress_log import format_duration
from eval.reproduce_config import MATCHED_KINDS, ConditionSpec, ReproduceConfig, condition_sets, default_ks

__all__ = ["ScoringFolder", "Step", "measured_rate", "plan_lines", "run_status"]

#: A runs folder as reproduce scores it (:func:`eval.reproduce.scoring_folders`): the
#: folder, the conditions it holds, their settings
ScoringFolder = tuple[Path, Sequence[ConditionSpec], EvalSettings]
#: How reproduce turns specs into conditions (each with its set's content hash)
MakeConditions = Callable[[list[ConditionSpec], Path], list[Condition]]

State = Literal["done", "pending", "partly done"]


class Step(BaseModel):
    """One phase (or one runs folder) of a run and what is left of it."""

    name: str
    state: State
    detail: str
    sequences_left: int = 0  # BLiMP/TSE sentences to score
    windows_left: int = 0  # perplexity windows to score (a minute or so per condition; not estimated)


def measured_rate(out: Path) -> float | None:
    """Sentences per second the server computed for this folder's finished BLiMP/TSE
    runs (cache hits excluded); None before the first run that computed at least 1,000."""
    scored = seconds = 0.0
    for summary in [*out.glob("runs*/*/blimp/summary.json"), *out.glob("runs*/*/tse/summary.json")]:
        run = json.loads(summary.read_text()).get("run", {})
        n, s = (run.get("scoring") or {}).get("sequences_scored", 0), run.get("elapsed_s") or 0.0
        if n >= 1000 and s > 0:
            scored, seconds = scored + n, seconds + s
    return scored / seconds if seconds else None


def _task_sizes(settings: EvalSettings, data_dir: Path) -> dict[str, int]:
    """Sequences one condition scores per task under ``settings``."""
    sizes = {"blimp": 2 * len(stratified_subsample(load_blimp(data_dir), settings.blimp_per_paradigm, settings.seed))}
    if settings.tse_per_test > 0:
        tse = load_tse(data_dir) if settings.tse_source == "tse" else load_tse_ml(data_dir)
        sizes["tse"] = 2 * len(stratified_subsample(tse, settings.tse_per_test, settings.seed))
    if settings.ppl_windows > 0:
        sizes["perplexity"] = settings.ppl_windows
    return sizes


def _scoring_steps(cfg: ReproduceConfig, disc: Path, data_dir: Path, folders: Sequence[ScoringFolder],
                   make_conditions: MakeConditions) -> list[Step]:
    out = cfg.out_dir()
    steps = []
    for runs, folder_specs, settings in folders:
        name = runs.name
        sizes = _task_sizes(settings, data_dir)
        made = [s for s in folder_specs if not s.set_name or (disc / "sets" / f"{s.set_name}.json").is_file()]
        # exact for a condition whose set exists: its unfinished tasks, its set's hash
        # included; nothing is scored for a set not made yet (a later draw, a first run)
        todo = [(c.label, t) for c in make_conditions(made, disc) for t in pending_tasks(runs, c, settings)]
        todo += [(s.label, t) for s in folder_specs if s not in made for t in sizes]
        total = len(folder_specs) * len(sizes)
        # a main condition's BLiMP subsample in runs/ comes from the score cache once its
        # runs-full/ BLiMP is finished (the subsample is part of the larger one)
        cached = {s.label for s in folder_specs if name == "runs" and s.full_blimp
                  and (out / "runs-full" / s.label / "blimp" / "summary.json").is_file()}
        left = sum(sizes[t] for label, t in todo if t != "perplexity" and not (t == "blimp" and label in cached))
        windows = sum(sizes[t] for _, t in todo if t == "perplexity")
        state: State = "done" if not todo else "pending" if len(todo) == total else "partly done"
        tasks = ", ".join(f"{t} {n:,}" + (" windows" if t == "perplexity" else "") for t, n in sizes.items())
        steps.append(Step(name=f"score {name}/", state=state, sequences_left=left, windows_left=windows,
                          detail=f"{total - len(todo)}/{total} condition x task runs finished "
                                 f"({len(folder_specs)} conditions; sequences per condition: {tasks})"))
    return steps


LM_TASK_CONDITIONS = 4
"""The lm_eval conditions of a run: baseline, Wasserstein-negative, both matched controls."""


def _lm_tasks_step(cfg: ReproduceConfig, root: Path) -> Step:
    """The lm_eval phase from its folder: conditions with a results file, how long the
    finished ones took (lm_eval's own ``total_evaluation_time_seconds`` in that file: file
    times are the checkout's on a clone), and the answers already in the request cache of
    one in progress (lm_eval's sqlite file, read only)."""
    detail = f"{len(cfg.lm_tasks)} tasks x {LM_TASK_CONDITIONS} conditions, first {cfg.lm_tasks_limit} documents"
    if (root / "lm_tasks.json").is_file():
        return Step(name="lm_eval tasks", state="done", detail=detail)
    finished, seconds, answered = set(), [], 0
    for request in sorted(root.glob("runs/*/*/request.json")):
        folder = request.parent
        results = sorted(folder.rglob("results_*.json"))  # lm_eval stamps the name with its time
        if results:
            finished.add(folder.parent.name)
            took = json.loads(results[-1].read_text()).get("total_evaluation_time_seconds")
            if took is not None:
                seconds.append(float(took))
        else:
            answered += sum(_cached_answers(db) for db in folder.glob("request-cache/*.db"))
    if not finished and not answered:
        return Step(name="lm_eval tasks", state="pending", detail=detail)
    detail += f"; {len(finished)}/{LM_TASK_CONDITIONS} conditions finished"
    if seconds:
        detail += f" (about {format_duration(sum(seconds) / len(seconds))} each)"
    if answered:
        detail += f"; {answered:,} answers cached for the one in progress"
    return Step(name="lm_eval tasks", state="partly done", detail=detail)


def _cached_answers(db: Path) -> int:
    """Rows in an lm_eval request cache (``SqliteDict``'s default table), 0 if unreadable."""
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM unnamed").fetchone()[0])
    except sqlite3.Error:
        return 0


def run_status(cfg: ReproduceConfig, data_dir: Path, folders: Sequence[ScoringFolder],
               make_conditions: MakeConditions) -> list[Step]:
    """Every phase of ``cfg``'s run with its state, read from ``cfg.out_dir()``;
    ``folders`` and ``make_conditions`` are reproduce's own (:func:`eval.reproduce.scoring_folders`,
    ``eval_conditions``), passed in so that this module does not import the run."""
    out = cfg.out_dir()
    disc = out / "discovery"
    corpus = out / "corpus" / f"wikitext-2-valid.{cfg.discovery_text}.txt"
    steps = [
        # the text is not committed (WikiText-2, rebuilt in seconds when a phase needs it);
        # its record is: a clone of a finished discovery has nothing left to do here
        Step(name="discovery corpus",
             state="done" if corpus.is_file() or corpus.with_suffix(".json").is_file() else "pending",
             detail=str(corpus) if corpus.is_file() else f"{corpus.with_suffix('.json')} (the text is rebuilt "
             "when a phase needs it)"),
        Step(name="discovery", state="done" if (disc / "stats.json").is_file() else "pending",
             detail=f"{cfg.discovery_tokens:,} tokens, top {', '.join(f'{p:g}' for p in cfg.top)}%"),
    ]
    # every perplexity-matched set the run's conditions serve (each p, both pools, every draw)
    matched = [s.set_name for s in condition_sets(cfg) if s.kind in MATCHED_KINDS]
    made = sum((disc / "sets" / f"{name}.json").is_file() for name in matched)
    steps.append(Step(name="perplexity-matched controls",
                      state="done" if made == len(matched) else "pending" if not made else "partly done",
                      detail=f"{made}/{len(matched)} sets"))
    steps += _scoring_steps(cfg, disc, data_dir, folders, make_conditions)
    if cfg.lm_tasks:
        steps.append(_lm_tasks_step(cfg, out / "lm_tasks"))
    if cfg.layers_blimp_per_paradigm > 0:
        done = (out / "layers" / "layers.json").is_file()
        stats = disc / "stats.json"
        layers = json.loads(stats.read_text())["model"]["num_layers"] if stats.is_file() else None
        n_conds = layers + len(cfg.layers_ks or default_ks(layers)) if layers else None
        per_cond = 2 * 67 * cfg.layers_blimp_per_paradigm
        # a condition's BLiMP run writes its summary when it finishes (eval.analysis.layers
        # names them layer<i> and first<k>); the baseline and the full set beside them are
        # the main runs' subsample, read from the score cache
        finished = 0 if done else sum(
            1 for f in (out / "layers" / "runs").glob("*/blimp/summary.json")
            if f.parent.parent.name.startswith(("layer", "first")))
        state = "done" if done else "partly done" if finished else "pending"
        detail = f"{n_conds} conditions x {per_cond:,} BLiMP sentences" if n_conds else "its size is known after discovery"
        if finished and n_conds:
            detail += f"; {finished}/{n_conds} conditions finished"
        steps.append(Step(
            name="layer analysis", state=state,
            sequences_left=0 if done or n_conds is None else max(n_conds - finished, 0) * per_cond,
            detail=detail))
    return steps


def plan_lines(cfg: ReproduceConfig, steps: list[Step], rate: float | None) -> list[str]:
    """The ``--plan`` printout: one line per step, then the time the scoring left needs."""
    lines = [f"{cfg.out_dir()} (preset {cfg.preset}, {cfg.model}, {cfg.dtype}):"]
    width = max(len(s.name) for s in steps)
    for s in steps:
        left = f"; {s.sequences_left:,} sentences left" if s.sequences_left else ""
        left += f"; {s.windows_left:,} perplexity windows left" if s.windows_left else ""
        lines.append(f"  {s.name:<{width}}  {s.state:<11}  {s.detail}{left}")
    left = sum(s.sequences_left for s in steps)
    if not left:
        lines.append("No BLiMP or TSE sentence left to score" + ("." if all(s.state == "done" for s in steps)
                                                                 else " that can be counted yet."))
    elif rate:
        lines.append(f"Scoring left: {left:,} sentences, about {format_duration(left / rate)} at the "
                     f"{rate:,.1f} sentences/s this folder's runs were scored at (not counted: perplexity "
                     f"windows, lm_eval tasks, discovery and the matched search).")
    else:
        lines.append(f"Scoring left: {left:,} sentences (no rate measured in this folder yet).")
    return lines
