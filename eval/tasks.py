"""Evaluations on top of :class:`eval.scoring.CompletionsScorer`: BLiMP, TSE, perplexity.

Minimal pairs (BLiMP, TSE)
--------------------------
Each sentence is scored as ``[start token] + tokens(sentence)`` (no leading space;
the start token is BOS, or EOS for models without BOS), so every word, the first
included, is predicted. For each sentence we keep

- ``logprob_*``: the **summed** log-probability over its tokens (the start token
  itself is not a prediction and is not counted), and ``n_tokens_*``;
- ``mean_logprob_*``: the sum divided by the token count.

A pair is right when the good sentence scores **strictly** higher. Ties count as
**wrong** (``tie: true`` in the record, and the summary counts them): BLiMP has 7
pairs whose two sentences are identical, which always tie. ``lm_eval``'s
``acc`` takes the argmax with the good sentence listed first, i.e. counts ties as
*right*; so on pairs with ties the two differ by exactly the number of ties.

- BLiMP's metric (``correct``) compares **sums** (Warstadt et al.; the reference code).
- TSE's metric (``correct``) compares **average per-token** log-probabilities (the
  reference code's TSE metric); ``correct_sum`` is the summed variant.
  Every record carries ``correct_sum`` and ``correct_mean``; ``correct`` is the
  task's reference metric.

Accuracies are pooled over pairs per paradigm (BLiMP UID / TSE test), per
phenomenon (BLiMP ``linguistics_term``; TSE: the test's group, ``field``) and
overall, via :func:`eval.stats.accuracy_table`.

Perplexity
----------
The text is tokenized once and cut into consecutive, non-overlapping windows of
``window - 1`` text tokens; each is sent as ``[start] + tokens`` (``window``
tokens in all, which must be below the server's ``max_model_len``: vLLM needs
room for one hidden generated token). Every text token is predicted, the first of
a window from the start token alone. Reported: token-level NLL (nats, mean over
all scored tokens), ``ppl = exp(NLL)``, and the token count. The final, shorter
window is kept unless ``drop_last``. (The reference code uses windows of 2,048
tokens without a start token, so it never scores the first token of a window.)

Output files of a run directory (see :func:`write_pair_run` / :func:`write_ppl_run`):
``records.jsonl`` (one :class:`PairResult` or :class:`WindowResult` per line),
``summary.json`` (a :class:`PairRunSummary` / :class:`PerplexitySummary`),
``summary.csv`` (the accuracy rows, or the one perplexity row) and ``records.npz``
(the records without the sentences: what a result folder commits, :mod:`eval.run_pack`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from eval.data import MinimalPair
from eval.scoring import CompletionsScorer
from vllm_negablate.neuron_set import NO_ABLATION
from eval.stats import OVERALL, AccuracyRow, accuracy_table

__all__ = [
    "PairResult",
    "PairRunSummary",
    "PerplexitySummary",
    "RunInfo",
    "TaskName",
    "WindowResult",
    "accuracy_rows",
    "evaluate_pairs",
    "evaluate_perplexity",
    "group_keys_for",
    "load_records",
    "load_summary",
    "pack_runs",
    "pair_result",
    "records_from_pack",
    "unpack_runs",
    "print_pair_summary",
    "print_ppl_summary",
    "score_pairs",
    "write_pair_run",
    "write_ppl_run",
]

HARNESS_VERSION = "1"
TaskName = Literal["blimp", "tse", "perplexity"]
RECORDS_FILE = "records.jsonl"
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"


# --------------------------------------------------------------------------- models


class PairResult(BaseModel):
    """One scored minimal pair (a line of ``records.jsonl``)."""

    model_config = ConfigDict(extra="forbid")

    source: str
    paradigm: str
    pair_id: int
    phenomenon: str
    field: str
    condition: str | None = None
    sentence_good: str
    sentence_bad: str
    logprob_good: float  # summed over the sentence's tokens
    logprob_bad: float
    n_tokens_good: int  # tokens scored (the start token excluded)
    n_tokens_bad: int
    mean_logprob_good: float
    mean_logprob_bad: float
    correct_sum: bool  # logprob_good > logprob_bad (ties: False)
    correct_mean: bool  # mean_logprob_good > mean_logprob_bad (ties: False)
    correct: bool  # the task's reference metric: sum for BLiMP, mean for TSE
    tie: bool  # the reference metric tied (counted wrong)


class RunInfo(BaseModel):
    """How a run was made: enough to redo it."""

    model_config = ConfigDict(extra="allow")

    task: TaskName
    created: str
    harness_version: str = HARNESS_VERSION
    server: str
    model: str
    base_model: str
    neuron_set: str | None
    set_via: str | None
    server_default: str | None = None  # the server's default set, when the run named none
    # the content hash of the set scored (negablate serve's BASE@SET card; None: no set, or
    # a server that does not say): which neurons and bounds these numbers are under
    neuron_set_hash: str | None = None
    dtype: str | None = None  # what the scores were computed in (the server's word; None: unknown)
    tokenizer: dict[str, Any]
    echo_mode: str
    endpoint: str | None = None  # where the log-probs came from: /v1/completions or the continuation route
    options: dict[str, Any] = {}
    scoring: dict[str, int] = {}
    elapsed_s: float = 0.0


class PairRunSummary(BaseModel):
    run: RunInfo
    metric: Literal["sum", "mean"]  # what ``correct`` compares
    n_pairs: int
    n_ties: int
    group_keys: list[str]
    accuracy: list[AccuracyRow]  # ``correct`` (the reference metric)
    accuracy_sum: list[AccuracyRow]
    accuracy_mean: list[AccuracyRow]

    @property
    def overall(self) -> AccuracyRow:
        return next(r for r in self.accuracy if r.level == OVERALL)


class WindowResult(BaseModel):
    """One perplexity window (a line of ``records.jsonl``)."""

    window_id: int
    start: int  # offset of its first text token in the tokenized text
    n_tokens: int  # text tokens scored
    nll_sum: float  # -sum of their logprobs (nats)


class PerplexitySummary(BaseModel):
    run: RunInfo
    text_path: str
    text_sha256: str
    text_tokens: int  # tokens in the whole text
    window: int  # tokens per request, start token included
    n_windows: int
    n_tokens: int  # tokens scored
    nll: float  # mean NLL per token, nats
    ppl: float
    bits_per_token: float


# --------------------------------------------------------------------------- pairs


def group_keys_for(task: str) -> tuple[str, ...]:
    """Grouping levels of a task's accuracy tables."""
    return ("paradigm", "phenomenon") if task == "blimp" else ("paradigm", "field")


def _sent_stats(lps: list[float | None]) -> tuple[float, int]:
    """(summed log-probability, tokens scored): the start token's ``None`` left out."""
    vals = [v for v in lps[1:] if v is not None]
    return math.fsum(vals), len(vals)


def pair_result(p: MinimalPair, sum_good: float, n_good: int, sum_bad: float, n_bad: int,
                metric: str) -> PairResult:
    """The record of pair ``p`` from its sentences' summed log-probabilities and token
    counts: the one place a pair's means and decisions are made (scoring, and rebuilding
    from a records pack: :mod:`eval.run_pack`)."""
    mg = sum_good / n_good if n_good else 0.0
    mb = sum_bad / n_bad if n_bad else 0.0
    c_sum, c_mean = sum_good > sum_bad, mg > mb
    tie = (sum_good == sum_bad) if metric == "sum" else (mg == mb)
    return PairResult(
        source=p.source, paradigm=p.paradigm, pair_id=p.pair_id, phenomenon=p.phenomenon,
        field=p.field, condition=p.condition, sentence_good=p.good, sentence_bad=p.bad,
        logprob_good=sum_good, logprob_bad=sum_bad, n_tokens_good=n_good, n_tokens_bad=n_bad,
        mean_logprob_good=mg, mean_logprob_bad=mb, correct_sum=c_sum, correct_mean=c_mean,
        correct=c_sum if metric == "sum" else c_mean, tie=tie,
    )


async def _ascore_pairs(scorer: CompletionsScorer, pairs: Sequence[MinimalPair], metric: str,
                        desc: str) -> list[PairResult]:
    texts: list[str] = []
    for p in pairs:
        texts += [p.good, p.bad]
    seqs = scorer.encode_batch(texts)
    lps = await scorer.ascore_ids(seqs, desc=desc)
    out: list[PairResult] = []
    for i, p in enumerate(pairs):
        sg, ng = _sent_stats(lps[2 * i])
        sb, nb = _sent_stats(lps[2 * i + 1])
        out.append(pair_result(p, sg, ng, sb, nb, metric))
    return out


def score_pairs(scorer: CompletionsScorer, pairs: Sequence[MinimalPair], *,
                metric: Literal["sum", "mean"] = "sum", desc: str = "pairs") -> list[PairResult]:
    """Score minimal pairs; ``metric`` decides what ``correct`` compares."""
    import asyncio

    return asyncio.run(_ascore_pairs(scorer, pairs, metric, desc))


def accuracy_rows(records: Sequence[Any], group_keys: Sequence[str], field: str) -> list[AccuracyRow]:
    return accuracy_table(records, group_keys=group_keys, correct_field=field).rows


def evaluate_pairs(
    scorer: CompletionsScorer, pairs: Sequence[MinimalPair], task: Literal["blimp", "tse"], *,
    options: dict[str, Any] | None = None,
) -> tuple[list[PairResult], PairRunSummary]:
    """Score ``pairs`` and summarize. BLiMP: metric ``sum``; TSE: ``mean``."""
    if not pairs:
        raise ValueError("no pairs to evaluate")
    metric: Literal["sum", "mean"] = "sum" if task == "blimp" else "mean"
    t0 = time.perf_counter()
    records = score_pairs(scorer, pairs, metric=metric, desc=task)
    elapsed = time.perf_counter() - t0
    gk = list(group_keys_for(task))
    summary = PairRunSummary(
        run=_run_info(scorer, task, options or {}, elapsed),
        metric=metric,
        n_pairs=len(records),
        n_ties=sum(r.tie for r in records),
        group_keys=gk,
        accuracy=accuracy_rows(records, gk, "correct"),
        accuracy_sum=accuracy_rows(records, gk, "correct_sum"),
        accuracy_mean=accuracy_rows(records, gk, "correct_mean"),
    )
    return records, summary


def _run_info(scorer: CompletionsScorer, task: TaskName, options: dict[str, Any],
              elapsed: float) -> RunInfo:
    d = scorer.describe()
    return RunInfo(
        task=task, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        server=d["server"], model=d["model"], base_model=d["base_model"],
        neuron_set=d["neuron_set"], neuron_set_hash=d["neuron_set_hash"], set_via=d["set_via"],
        server_default=d["server_default"],
        dtype=d["dtype"], tokenizer=d["tokenizer"],
        echo_mode=d["echo_mode"], endpoint=d.get("endpoint"), options=options, scoring=scorer.stats(),
        elapsed_s=round(elapsed, 3),
    )


# --------------------------------------------------------------------------- perplexity


def make_windows(tokens: Sequence[int], window: int, start_token_id: int,
                 drop_last: bool = False) -> list[tuple[int, list[int]]]:
    """``(offset, [start] + tokens[offset : offset + window - 1])`` for consecutive windows."""
    if window < 2:
        raise ValueError(f"window must be >= 2 (start token + at least one text token), got {window}")
    step = window - 1
    out: list[tuple[int, list[int]]] = []
    for off in range(0, len(tokens), step):
        chunk = list(tokens[off : off + step])
        if drop_last and len(chunk) < step:
            break
        out.append((off, [start_token_id, *chunk]))
    return out


def server_max_model_len(scorer: CompletionsScorer) -> int | None:
    """``max_model_len`` of the served base model from ``GET /v1/models``, if reported
    (``None`` too when the list cannot be had: the caller then checks nothing)."""
    from server.http import ModelListError, list_models

    try:
        for card in list_models(scorer.base_url, scorer.api_key, timeout=30.0, policy=scorer.retry_policy):
            if card.get("id") in (scorer.base_model, scorer.model) and card.get("max_model_len"):
                return int(card["max_model_len"])
    except (ModelListError, ValueError, TypeError):
        return None
    return None


def evaluate_perplexity(
    scorer: CompletionsScorer, text: str, *, window: int = 2048, max_windows: int | None = None,
    drop_last: bool = False, text_path: str = "", options: dict[str, Any] | None = None,
) -> tuple[list[WindowResult], PerplexitySummary]:
    """Perplexity of ``text`` in windows of ``window`` tokens (start token included)."""
    t0 = time.perf_counter()
    tokens = scorer.tokenizer.encode_batch([text])[0]
    wins = make_windows(tokens, window, scorer.tokenizer.start_token_id, drop_last)
    if max_windows is not None:
        wins = wins[:max_windows]
    if not wins:
        raise ValueError("the text yields no window (empty text, or drop_last with a short text)")
    lps = scorer.score_ids([w for _, w in wins], desc="perplexity")
    records: list[WindowResult] = []
    for i, ((off, ids), lp) in enumerate(zip(wins, lps, strict=True)):
        vals = [v for v in lp[1:] if v is not None]
        records.append(WindowResult(window_id=i, start=off, n_tokens=len(vals),
                                    nll_sum=-math.fsum(vals)))
    n = sum(r.n_tokens for r in records)
    nll = math.fsum(r.nll_sum for r in records) / n
    summary = PerplexitySummary(
        run=_run_info(scorer, "perplexity", options or {}, time.perf_counter() - t0),
        text_path=text_path, text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        text_tokens=len(tokens), window=window, n_windows=len(records), n_tokens=n, nll=nll,
        ppl=math.exp(nll), bits_per_token=nll / math.log(2),
    )
    return records, summary


# --------------------------------------------------------------------------- files


def _write_jsonl(path: Path, rows: Sequence[BaseModel]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(r.model_dump_json() + "\n")
    os.replace(tmp, path)


def write_pair_run(out: str | os.PathLike[str], records: Sequence[PairResult],
                   summary: PairRunSummary) -> Path:
    """Write ``records.jsonl``, its pack ``records.npz`` (:mod:`eval.run_pack`),
    ``summary.json`` and ``summary.csv`` into ``out``."""
    from eval.run_pack import PACK_FILE, pack_pairs

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    _write_jsonl(d / RECORDS_FILE, records)
    pack_pairs(d / PACK_FILE, records, summary.metric)
    (d / SUMMARY_JSON).write_text(summary.model_dump_json(indent=2) + "\n", encoding="utf-8")
    gk = summary.group_keys
    ties = {(r.level, r.group): r.n_correct for r in accuracy_rows(records, gk, "tie")}
    with (d / SUMMARY_CSV).open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["metric", "level", "group", "n", "n_correct", "accuracy", "n_ties"])
        for name, rows in (("correct", summary.accuracy), ("correct_sum", summary.accuracy_sum),
                           ("correct_mean", summary.accuracy_mean)):
            for r in rows:
                w.writerow([name, r.level, r.group, r.n, r.n_correct, f"{r.accuracy:.6f}",
                            ties.get((r.level, r.group), 0) if name == "correct" else ""])
    return d


def write_ppl_run(out: str | os.PathLike[str], records: Sequence[WindowResult],
                  summary: PerplexitySummary) -> Path:
    """As :func:`write_pair_run`, for perplexity windows."""
    from eval.run_pack import PACK_FILE, pack_windows

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    _write_jsonl(d / RECORDS_FILE, records)
    pack_windows(d / PACK_FILE, records)
    (d / SUMMARY_JSON).write_text(summary.model_dump_json(indent=2) + "\n", encoding="utf-8")
    with (d / SUMMARY_CSV).open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "neuron_set", "window", "n_windows", "n_tokens", "nll", "ppl"])
        w.writerow([summary.run.base_model, summary.run.neuron_set or "", summary.window,
                    summary.n_windows, summary.n_tokens, f"{summary.nll:.6f}", f"{summary.ppl:.6f}"])
    return d


def load_summary(run_dir: str | os.PathLike[str]) -> PairRunSummary | PerplexitySummary:
    """Read a run directory's ``summary.json``."""
    p = Path(run_dir) / SUMMARY_JSON
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: not a run directory (made by `eval blimp/tse/perplexity`)")
    data = json.loads(p.read_text(encoding="utf-8"))
    if data.get("run", {}).get("task") == "perplexity":
        return PerplexitySummary.model_validate(data)
    return PairRunSummary.model_validate(data)


def load_records(run_dir: str | os.PathLike[str],
                 data_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Read a run directory's ``records.jsonl`` as dicts (errors name file and line).

    A run folder from a clone has only the committed pack ``records.npz``
    (:mod:`eval.run_pack`): then ``records.jsonl`` is rebuilt from it and the data
    folder (``data_dir``, default :func:`eval.data.default_data_dir`) and written
    beside it, so the next read is a plain one.
    """
    from eval.data import DataFormatError
    from eval.run_pack import PACK_FILE

    p = Path(run_dir) / RECORDS_FILE
    if not p.is_file():
        if not (Path(run_dir) / PACK_FILE).is_file():
            raise FileNotFoundError(f"{p} not found: not a run directory")
        _write_jsonl(p, records_from_pack(Path(run_dir) / PACK_FILE, data_dir))
    out: list[dict[str, Any]] = []
    with p.open(encoding="utf-8") as fh:
        for ln, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataFormatError(p, ln, f"invalid JSON: {e.msg}") from None
    return out


def records_from_pack(path: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None
                      ) -> list[PairResult] | list[WindowResult]:
    """The records a ``records.npz`` stands for: pairs made by :func:`pair_result` from
    their numbers and the data folder's pair (sentences, labels); windows as stored.
    :class:`~eval.run_pack.PackError` if a pair is not in the data."""
    from eval.run_pack import PackedWindows, PackError, pairs_by_key, read_pack

    pack = read_pack(path)
    if isinstance(pack, PackedWindows):
        return [WindowResult(window_id=w, start=s, n_tokens=n, nll_sum=x)
                for w, s, n, x in zip(pack.window_id, pack.start, pack.n_tokens, pack.nll_sum, strict=True)]
    root = None if data_dir is None else str(data_dir)
    out = []
    for i, (source, paradigm, pair_id) in enumerate(zip(pack.sources, pack.paradigms, pack.pair_ids, strict=True)):
        pair = pairs_by_key(source, root).get((paradigm, pair_id))
        if pair is None:
            raise PackError(f"{path}: pair {source}/{paradigm}/{pair_id} is not in the data folder "
                            f"({root or 'the default'}): rebuilt from other data than it was scored on?")
        (lg, lb), (ng, nb) = pack.logprob[i], pack.n_tokens[i]
        out.append(pair_result(pair, float(lg), int(ng), float(lb), int(nb), pack.metric))
    return out


def pack_runs(folder: str | os.PathLike[str]) -> list[Path]:
    """Pack every finished run under ``folder`` (``summary.json`` beside ``records.jsonl``)
    that has no ``records.npz`` yet, or an older one than its records; the runs packed.

    Why: runs written before packs existed, or by an older checkout still running, get
    their committed form when the report is rebuilt (:func:`eval.report.write_report`)."""
    from eval.run_pack import PACK_FILE, pack_pairs, pack_windows

    done = []
    for records in sorted(Path(folder).rglob(RECORDS_FILE)):
        run, pack = records.parent, records.parent / PACK_FILE
        summary = run / SUMMARY_JSON
        if not summary.is_file() or (pack.is_file() and pack.stat().st_mtime >= records.stat().st_mtime):
            continue
        meta = json.loads(summary.read_text(encoding="utf-8"))
        lines = [line for line in records.read_text(encoding="utf-8").splitlines() if line.strip()]
        if meta.get("run", {}).get("task") == "perplexity":
            pack_windows(pack, [WindowResult.model_validate_json(line) for line in lines])
        else:
            pack_pairs(pack, [PairResult.model_validate_json(line) for line in lines], meta["metric"])
        done.append(run)
    return done


def unpack_runs(folder: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Rebuild ``records.jsonl`` of every run under ``folder`` that has only its pack (a
    fresh clone), from the data folder; the runs rebuilt."""
    from eval.run_pack import PACK_FILE

    done = []
    for pack in sorted(Path(folder).rglob(PACK_FILE)):
        if not (pack.parent / RECORDS_FILE).is_file():
            load_records(pack.parent, data_dir)
            done.append(pack.parent)
    return done


# --------------------------------------------------------------------------- terminal


def _title(run: RunInfo) -> str:
    s = f"{run.task} — {run.base_model}"
    if run.neuron_set == NO_ABLATION:
        return s + " (no ablation)"
    if run.neuron_set:
        return s + f" @ {run.neuron_set}"
    if run.server_default:
        return s + f" (no set named: the server's default {run.server_default!r})"
    return s + " (no neuron set)"


def print_pair_summary(summary: PairRunSummary, *, show_paradigms: bool = False, console: Any = None) -> None:
    """A rich table: per phenomenon (BLiMP) or per test (TSE), then overall."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if summary.run.task == "blimp":
        levels = ["paradigm", "phenomenon"] if show_paradigms else ["phenomenon"]
    else:
        levels = [k for k in summary.group_keys]
    main = {(r.level, r.group): r for r in summary.accuracy}
    other = summary.accuracy_mean if summary.metric == "sum" else summary.accuracy_sum
    alt = {(r.level, r.group): r for r in other}
    alt_name = "acc (mean)" if summary.metric == "sum" else "acc (sum)"
    t = Table(title=_title(summary.run), show_footer=False)
    t.add_column(" / ".join(levels))
    t.add_column("n", justify="right")
    t.add_column(f"acc ({summary.metric})", justify="right")
    t.add_column(alt_name, justify="right")
    for level in levels:
        rows = [(g, r) for (lv, g), r in main.items() if lv == level]
        for i, (g, r) in enumerate(rows):
            t.add_row(g, str(r.n), f"{r.accuracy:.3f}", f"{alt[(level, g)].accuracy:.3f}",
                      end_section=i == len(rows) - 1)
    o = summary.overall
    t.add_row("[bold]overall[/bold]", str(o.n), f"[bold]{o.accuracy:.3f}[/bold]",
              f"{alt[(OVERALL, OVERALL)].accuracy:.3f}", end_section=True)
    console.print(t)
    if summary.n_ties:
        console.print(f"[yellow]{summary.n_ties} tied pair(s) counted as wrong[/yellow] "
                      "(lm_eval would count them right).")


def print_ppl_summary(summary: PerplexitySummary, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=_title(summary.run))
    for c in ("windows", "window", "tokens", "NLL (nats/token)", "perplexity"):
        t.add_column(c, justify="right")
    t.add_row(str(summary.n_windows), str(summary.window), str(summary.n_tokens),
              f"{summary.nll:.4f}", f"{summary.ppl:.3f}")
    console.print(t)
