"""Evaluate many neuron sets ("conditions") on one server: BLiMP accuracy and perplexity.

The layer sweep (:mod:`eval.analysis.layers`) and the training-dynamics sweep
(:mod:`eval.analysis.dynamics`) both reduce to the same loop: for each condition
(no set = baseline, or ``BASE@SET``), score a stratified BLiMP subsample and a few
WikiText-2 *test* windows over HTTP, then compare each condition with the baseline
pair by pair. This module holds that loop, so both analyses measure exactly alike
and share their resume rules:

- every (condition, task) writes a run directory with :func:`eval.tasks.write_pair_run`
  / :func:`eval.tasks.write_ppl_run` (the files ``negablate eval compare`` reads);
- a run directory is *finished* when its ``summary.json`` records the same options
  (subsample size, seed, window, and the set's content hash); a rerun skips finished
  runs and redoes stale ones, so changing ``--blimp-per-paradigm`` or the neuron set
  never mixes old and new numbers;
- scores go to an SQLite cache (:class:`eval.score_cache.ScoreCache`) keyed by set name
  and content hash, so an interrupted run resumes mid-condition.

Like the rest of ``eval`` it talks to models only over HTTP; the server is
started as a subprocess (:class:`server.launcher.ServerProcess`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from vllm_negablate import defaults
from vllm_negablate.neuron_set import NO_ABLATION, NeuronSet

from eval.data import default_data_dir, load_blimp, load_tse, load_tse_ml, load_wikitext_text, stratified_subsample
from eval.progress_log import ProgressLog

console = Console(stderr=True)

BASELINE = "baseline"
PRESCORE_CHUNK = 256  # sequences per progress step (all cached: evaluate_* then only reads)


class EvalSettings(BaseModel):
    """What is measured for every condition; the defaults suit a small model on a CPU.

    ``ppl_windows=0`` skips perplexity, ``tse_per_test=0`` (the default) skips TSE.
    ``window`` counts the start token and must be below the server's
    ``max_model_len`` (vLLM generates one hidden token).
    """

    model_config = ConfigDict(extra="forbid")

    blimp_per_paradigm: int = 10
    tse_per_test: int = 0
    # "tse": all 22 Marvin & Linzen tests (agreement, reflexives, NPI), the paper's TSE;
    # "tse-ml": the 15 agreement tests of Newman et al. (2021)
    tse_source: Literal["tse", "tse-ml"] = "tse"
    ppl_windows: int = 4
    window: int = defaults.WINDOW_TOKENS
    # WikiText-2 test for perplexity: "raw" (wiki.test.raw, the reference's text) or the
    # tokenized test.txt (rare words as <unk>)
    ppl_text: Literal["raw", "tokenized"] = "raw"
    seed: int = 0
    n_boot: int = 2000
    concurrency: int = 2
    batch_size: int = defaults.SENTENCES_PER_REQUEST
    data_dir: Path | None = None


class Condition(BaseModel):
    """One thing to measure: a neuron set (or none) under a run-directory label."""

    label: str  # run directory name under runs/
    set_name: str | None  # None: no ablation
    kind: str  # baseline | full | layer | first-k | wasserstein-negative | random-negative ...
    index: int | None = None  # the layer, or k
    neurons: int = 0
    set_hash: str | None = None  # NeuronSet.content_hash(): what the set computes


class ConditionResult(BaseModel):
    """A condition's numbers against the baseline on the same pairs and windows.

    ``blimp_drop = acc(baseline) - acc(condition)`` (positive: the ablation hurts),
    with a paired bootstrap 95% CI and McNemar's p-value (:func:`eval.stats.compare_runs`).
    ``ppl_ratio = ppl(condition) / ppl(baseline)``; perplexity fields are None when
    perplexity was not measured.
    """

    label: str
    kind: str
    index: int | None = None
    set_name: str | None = None
    neurons: int = 0
    blimp_n: int
    blimp_n_correct: int
    blimp_acc: float
    blimp_drop: float
    blimp_drop_ci_lo: float
    blimp_drop_ci_hi: float
    blimp_p: float
    ppl: float | None = None
    ppl_ratio: float | None = None
    ppl_tokens: int | None = None


CSV_FIELDS = list(ConditionResult.model_fields)


# --------------------------------------------------------------------------- helpers


def condition_for(label: str, kind: str, ns: NeuronSet | None, index: int | None = None) -> Condition:
    """A condition for ``ns`` (None: the baseline)."""
    if ns is None:
        return Condition(label=label, set_name=None, kind=kind, index=index)
    return Condition(label=label, set_name=ns.name, kind=kind, index=index,
                     neurons=ns.num_neurons(), set_hash=ns.content_hash())


def blimp_options(cond: Condition, s: EvalSettings) -> dict[str, Any]:
    return {"condition": cond.label, "set_hash": cond.set_hash,
            "blimp_per_paradigm": s.blimp_per_paradigm, "seed": s.seed}


def tse_options(cond: Condition, s: EvalSettings) -> dict[str, Any]:
    return {"condition": cond.label, "set_hash": cond.set_hash,
            "tse_per_test": s.tse_per_test, "seed": s.seed, "tse_source": s.tse_source}


def ppl_options(cond: Condition, s: EvalSettings) -> dict[str, Any]:
    return {"condition": cond.label, "set_hash": cond.set_hash, "window": s.window,
            "ppl_windows": s.ppl_windows, "ppl_text": s.ppl_text}


def ppl_text_path(s: EvalSettings) -> Path:
    """The WikiText-2 test file perplexity reads under these settings."""
    base = (s.data_dir or default_data_dir()) / "wikitext-2"
    return base / "raw" / "wiki.test.raw" if s.ppl_text == "raw" else base / "test.txt"


def run_done(run_dir: Path, options: dict[str, Any]) -> bool:
    """Whether ``run_dir`` holds a finished run made with these ``options``."""
    p = run_dir / "summary.json"
    if not p.is_file():
        return False
    try:
        got = json.loads(p.read_text()).get("run", {}).get("options", {})
    except json.JSONDecodeError:
        return False
    return all(got.get(k) == v for k, v in options.items())


TaskName = Literal["blimp", "tse", "perplexity"]


def pending_tasks(runs_dir: Path, cond: Condition, s: EvalSettings) -> list[TaskName]:
    """The tasks of ``cond`` with no finished run made with these settings."""
    base = runs_dir / cond.label
    wanted: list[tuple[TaskName, dict[str, Any]]] = [("blimp", blimp_options(cond, s))]
    if s.tse_per_test > 0:
        wanted.append(("tse", tse_options(cond, s)))
    if s.ppl_windows > 0:
        wanted.append(("perplexity", ppl_options(cond, s)))
    return [task for task, options in wanted if not run_done(base / task, options)]


def condition_done(runs_dir: Path, cond: Condition, s: EvalSettings) -> bool:
    return not pending_tasks(runs_dir, cond, s)


def served_model(served_name: str, set_name: str | None) -> str:
    """``BASE@SET``; the baseline is ``BASE@none``, unablated even if the server has a default."""
    return f"{served_name}@{NO_ABLATION if set_name is None else set_name}"


# --------------------------------------------------------------------------- server


def _api_key() -> str | None:
    """vLLM's ``--api-key`` guards /v1/models too; the scorer reads the same variable."""
    return os.environ.get("OPENAI_API_KEY") or None


@contextlib.contextmanager
def serve(model_dir: Path, sets_dir: Path, log: Path, *, served_name: str = "model",
          dtype: str = "float32", kv_cache_mb: int = defaults.KV_CACHE_MB,
          max_model_len: int | None = None, max_sets: int = defaults.MAX_RESIDENT_SETS,
          timeout: float = 900.0) -> Iterator[str]:
    """``negablate serve MODEL --neuron-sets SETS`` (see :func:`server.launcher.serve`); yields its URL."""
    from server.launcher import serve as launch

    with launch(model_dir, "--neuron-sets", str(sets_dir), log_path=log, max_sets=max_sets,
                timeout=timeout, served_name=served_name, dtype=dtype,
                kv_cache_bytes=kv_cache_mb * 2**20, max_model_len=max_model_len,
                announce=console.print) as server:
        yield server.url


def check_server_sets(url: str, sets: Sequence[NeuronSet], served_name: str, *,
                      admin_key: str | None = None) -> None:
    """Make sure a running server holds ``sets`` with the same neurons.

    With ``admin_key`` the server's content hashes are compared with ``sets`` and
    missing or different sets are uploaded (a different set under the same name
    would silently measure other neurons). Without it the control API is closed, so
    only the names in ``/v1/models`` (``BASE@SET``) can be checked; a missing name
    raises :class:`RuntimeError` (as does a failed listing: :class:`server.http.ModelListError`).
    """
    from server.client import NegablateClient
    from server.http import list_models

    if admin_key is None:
        ids = {c["id"] for c in list_models(url, _api_key(), timeout=30.0)}
        missing = [ns.name for ns in sets if f"{served_name}@{ns.name}" not in ids]
        if missing:
            raise RuntimeError(
                f"the server at {url} lacks {len(missing)} set(s): {', '.join(missing[:8])}"
                f"{' ...' if len(missing) > 8 else ''}; pass --admin-key to upload them, or start it "
                "with --neuron-sets pointing at them")
        console.print("[yellow]no admin key: the server's sets were checked by name only[/yellow]")
        return
    with NegablateClient(url, admin_key=admin_key) as client:
        have = {s.name: s.content_hash for s in client.list_sets().data}
        bad = [ns for ns in sets if have.get(ns.name) != ns.content_hash()]
        for ns in bad:
            client.upload_set(ns)
        if bad:
            console.print(f"uploaded {len(bad)} set(s) to {url}")


def served_base_name(url: str) -> str:
    """The base model name a server lists first in ``/v1/models`` (ids without ``@``);
    :class:`RuntimeError` (:class:`server.http.ModelListError`) if it cannot be listed."""
    from server.http import list_models

    ids = [c["id"] for c in list_models(url, _api_key(), timeout=30.0) if "@" not in c["id"]]
    if not ids:
        raise RuntimeError(f"{url}/v1/models lists no base model")
    return ids[0]


# --------------------------------------------------------------------------- evaluation


def evaluate_conditions(
    url: str,
    conditions: Sequence[Condition],
    runs_dir: Path,
    settings: EvalSettings,
    *,
    tokenizer: Path,
    cache: Path,
    served_name: str = "model",
    start_token: int | None = None,
    cache_namespace: str = "",
    title: str = "",
) -> None:
    """Score every unfinished condition on BLiMP (and TSE, perplexity) and write its run dirs.

    The one evaluation loop of reproduce and the analyses.

    Sequences are first scored in chunks (a rich progress bar per step, or plain lines
    every minute when the output is a log file; results land in the cache), then
    :func:`eval.tasks.evaluate_pairs` / ``evaluate_perplexity`` build the run files from
    the cache, so the files are exactly what ``negablate eval`` would write.
    """
    from eval.scoring import CompletionsScorer
    from eval.tasks import evaluate_pairs, evaluate_perplexity, make_windows, write_pair_run, write_ppl_run

    todo = [(c, task) for c in conditions for task in pending_tasks(runs_dir, c, settings)]
    if not todo:
        return
    data_dir = settings.data_dir or default_data_dir()
    pairs = stratified_subsample(load_blimp(data_dir), settings.blimp_per_paradigm, settings.seed)
    load_tse_source = load_tse if settings.tse_source == "tse" else load_tse_ml
    tse_pairs = (stratified_subsample(load_tse_source(data_dir), settings.tse_per_test, settings.seed)
                 if settings.tse_per_test > 0 else [])
    text_path = ppl_text_path(settings)
    text = load_wikitext_text(text_path) if settings.ppl_windows > 0 else ""
    cache.parent.mkdir(parents=True, exist_ok=True)
    pair_seqs: dict[str, list[list[int]]] = {}
    ppl_seqs: list[list[int]] | None = None
    log = ProgressLog(console)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        overall = progress.add_task(f"[bold]{title or 'conditions'}[/bold]", total=len(todo))
        for cond, task in todo:
            ns_key = f"{cache_namespace}|{cond.set_hash or ''}"
            with CompletionsScorer(url, served_model(served_name, cond.set_name), tokenizer=str(tokenizer),
                                   cache=cache, cache_namespace=ns_key, concurrency=settings.concurrency,
                                   batch_size=settings.batch_size, progress=False,
                                   start_token=start_token) as scorer:
                task_pairs = pairs if task == "blimp" else tse_pairs
                if task != "perplexity":
                    if task not in pair_seqs:
                        pair_seqs[task] = scorer.encode_batch([t for p in task_pairs for t in (p.good, p.bad)])
                    seqs = pair_seqs[task]
                else:
                    if ppl_seqs is None:
                        tokens = scorer.tokenizer.encode_batch([text])[0]
                        wins = make_windows(tokens, settings.window, scorer.tokenizer.start_token_id)
                        ppl_seqs = [w for _, w in wins[: settings.ppl_windows]]
                    seqs = ppl_seqs
                step = progress.add_task(f"  {cond.label}: {task}", total=len(seqs))
                log.start(f"{cond.label}: {task}", len(seqs))
                t0 = time.perf_counter()
                for i in range(0, len(seqs), PRESCORE_CHUNK):
                    chunk = seqs[i : i + PRESCORE_CHUNK]
                    scorer.score_ids(chunk)
                    progress.advance(step, len(chunk))
                    log.advance(len(chunk))
                log.finish()
                out = runs_dir / cond.label / task
                if task != "perplexity":
                    options = (blimp_options if task == "blimp" else tse_options)(cond, settings)
                    records, summary = evaluate_pairs(scorer, task_pairs, task, options=options)
                    summary.run.elapsed_s = round(time.perf_counter() - t0, 3)  # scoring included
                    write_pair_run(out, records, summary)
                else:
                    wrecords, psummary = evaluate_perplexity(
                        scorer, text, window=settings.window, max_windows=settings.ppl_windows,
                        text_path=str(text_path), options=ppl_options(cond, settings))
                    psummary.run.elapsed_s = round(time.perf_counter() - t0, 3)
                    write_ppl_run(out, wrecords, psummary)
                progress.remove_task(step)
            progress.advance(overall)


# --------------------------------------------------------------------------- results


def summarize(runs_dir: Path, cond: Condition, settings: EvalSettings,
              baseline_label: str = BASELINE) -> ConditionResult:
    """``cond`` against the baseline from the run directories (see :class:`ConditionResult`)."""
    from eval.stats import compare_runs
    from eval.tasks import load_records, load_summary

    run = runs_dir / cond.label
    s = load_summary(run / "blimp")
    o = s.overall
    if cond.label == baseline_label:
        drop = lo = hi = 0.0
        p = 1.0
    else:
        cmp = compare_runs(load_records(runs_dir / baseline_label / "blimp"), load_records(run / "blimp"),
                           group_keys=(), n_boot=settings.n_boot, seed=settings.seed)[-1]
        drop, lo, hi, p = 0.0 - cmp.delta, 0.0 - cmp.ci_hi, 0.0 - cmp.ci_lo, cmp.p_value  # no -0.0
    ppl = ratio = tokens = None
    if settings.ppl_windows > 0 and (run / "perplexity" / "summary.json").is_file():
        ps = load_summary(run / "perplexity")
        bs = load_summary(runs_dir / baseline_label / "perplexity")
        ppl, tokens = ps.ppl, ps.n_tokens
        ratio = ps.ppl / bs.ppl
    return ConditionResult(
        label=cond.label, kind=cond.kind, index=cond.index, set_name=cond.set_name,
        neurons=cond.neurons, blimp_n=o.n, blimp_n_correct=o.n_correct, blimp_acc=o.accuracy,
        blimp_drop=drop, blimp_drop_ci_lo=lo, blimp_drop_ci_hi=hi, blimp_p=p, ppl=ppl,
        ppl_ratio=ratio, ppl_tokens=tokens,
    )


def fmt_drop(r: ConditionResult) -> str:
    """``+3.1 [+1.0, +5.2]`` accuracy points."""
    return f"{100 * r.blimp_drop:+.1f} [{100 * r.blimp_drop_ci_lo:+.1f}, {100 * r.blimp_drop_ci_hi:+.1f}]"


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.3f}"
