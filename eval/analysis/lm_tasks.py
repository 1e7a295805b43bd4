"""Non-grammatical ``lm_eval`` tasks per condition: the other half of the double dissociation.

The paper's claim has two sides: ablating the negative pre-activations of
Wasserstein neurons hurts *syntax* (BLiMP, TSE) much more than a matched random
set does, while it leaves tasks that need knowledge or common sense rather than
grammar (PIQA, ARC, ...) roughly alone. The main report measures the first side;
this module measures the second with EleutherAI's ``lm_eval``, unchanged, so the
numbers mean what they mean everywhere else:

- every condition is the server's model name ``BASE`` (baseline) or ``BASE@SET``,
  evaluated by lm_eval's command line in a subprocess (so ``eval`` stays free of
  torch; the server is the only model) with ``--model negablate``
  (:mod:`eval.lm_eval_tasks.negablate_lm`: lm_eval's ``local-completions`` whose
  log-likelihoods come from the server's ``/v1/negablate/loglikelihood``, which does
  not compute the context's LM-head rows; ``--backend local-completions`` for lm_eval's
  own echo through ``/v1/completions``, same numbers);
- lm_eval's own task definitions are used by name (``arc_easy``, ``piqa``, ... when
  the hub is reachable); offline, :data:`eval.lm_eval_tasks.local.LOCAL_TASKS`
  generates task YAMLs that read local copies, e.g. ``piqa_local`` from ``../shared/data/piqa``: the same prompt,
  choices and metrics as lm_eval's ``piqa`` task, on the same validation split (also ARC-Easy/Challenge,
  WinoGrande, SciQ, LAMBADA, OpenBookQA, BoolQ, and the group ``nongrammatical_local`` of all eight);
- the results JSONs are folded into one tidy table (task, metric, condition,
  value, stderr, delta vs baseline and the delta's standard error: *paired* over
  items when per-item samples were logged, which is much tighter than the
  unpaired one because the conditions score the same items) written as
  ``lm_tasks.json`` / ``lm_tasks.csv`` / ``lm_tasks.png``;
- :func:`markdown_section` turns ``lm_tasks.json`` into a section of ``REPORT.md``.

Resumable: each condition's lm_eval output lives in ``runs/<condition>/<signature>/``
where the signature hashes everything that changes the numbers (tasks, limit,
model name, tokenizer, BOS handling, ...); a condition with a results file there is
not run again. A different task list therefore runs the condition again (into a
new folder); the old results stay on disk. Within a condition, lm_eval keeps every
answer in ``request-cache/<set content>-<dtype>_rank0.db`` (its ``--use_cache``) as it
comes, so a condition interrupted after an hour resumes where it stopped.

Layout of ``--out``::

    lm_tasks.json, lm_tasks.csv, lm_tasks.png   the table and plot
    local_tasks/                                generated task YAMLs (+ data), given to --include_path
    runs/<condition>/<signature>/request.json   what was asked of lm_eval
    runs/<condition>/<signature>/<model>/results_*.json, samples_*.jsonl   lm_eval's own files
    runs/<condition>/<signature>/request-cache/<content>-<dtype>_rank0.db   answers so far (resume)
    logs/<condition>.log, logs/server.log
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import typer
from pydantic import BaseModel, Field
from rich.console import Console

from eval.lm_eval_tasks import LM_EVAL_MODULE, LOCAL_INDEX_FLAG
from eval.lm_eval_tasks.local import (  # write_piqa_task, declared_task_names: re-exported
    LOCAL_TASKS,
    PIQA_TASK,
    build_include_path,
    declared_task_names,
    write_piqa_task,
)
from eval.stats import paired_diff_stderr, unpaired_diff_stderr
from vllm_negablate.neuron_set import NO_ABLATION

console = Console(stderr=True)

BASELINE = "baseline"
# Metrics that are fractions in [0, 1]: shown as percent, deltas in points.
PERCENT_METRICS = frozenset({
    "acc", "acc_norm", "acc_bytes", "acc_mutual_info", "exact_match", "mc1", "mc2", "f1", "em",
    "brier_score_acc", "contains",
})


# =========================================================================== configuration


class Condition(BaseModel):
    """One arm of the comparison: ``BASE`` (baseline) or ``BASE@SET``."""

    label: str
    set: str | None
    model: str


def conditions_for(base: str, sets: Sequence[str]) -> list[Condition]:
    """The baseline (``BASE@none``: unablated even under a server default) first, then
    one condition per set (duplicates dropped)."""
    out = [Condition(label=BASELINE, set=None, model=f"{base}@{NO_ABLATION}")]
    for s in dict.fromkeys(sets):
        if s == BASELINE:
            raise ValueError(f"a neuron set may not be called {BASELINE!r} (it names the unablated model)")
        out.append(Condition(label=s, set=s, model=f"{base}@{s}"))
    return out


class LmTasksConfig(BaseModel):
    """Everything one ``negablate analyze tasks`` run needs (server already running)."""

    server: str | None = None  # None: a server_factory starts one (run_all)
    model: str
    tokenizer: str
    sets: list[str] = Field(default_factory=list)
    tasks: list[str] = Field(default_factory=lambda: [PIQA_TASK])
    limit: int | None = None
    out: Path = Path("report/lm_tasks")
    include_paths: list[Path] = Field(default_factory=list)
    data_dir: Path | None = None
    log_samples: bool = True
    batch_size: int = 16
    num_concurrent: int = 1
    max_retries: int = 3
    max_length: int | None = None
    add_bos_token: bool = True
    prefix_token_id: int | None = None
    num_fewshot: int | None = None
    offline: bool | None = None
    request_timeout: int = 600
    rerun: bool = False
    #: lm_eval model class: ``negablate`` (:mod:`eval.lm_eval_tasks.negablate_lm`: log-likelihoods
    #: from ``/v1/negablate/loglikelihood``, the context's rows not computed) or lm_eval's own
    #: ``local-completions`` (``/v1/completions`` with echo: any OpenAI-compatible server).
    #: Not in :meth:`signature`: both give the same numbers (the e2e tests hold them to
    #: the same oracle), so results and cached answers of one stand for the other.
    backend: Literal["negablate", "local-completions"] = "negablate"

    def conditions(self) -> list[Condition]:
        return conditions_for(self.model, self.sets)

    def signature(self) -> str:
        """Hash of what changes lm_eval's numbers (not the server URL: a restarted
        server on another port serves the same model)."""
        key = {"tasks": sorted(self.tasks), "limit": self.limit, "model": self.model,
               "tokenizer": str(Path(self.tokenizer).expanduser().resolve()) if Path(self.tokenizer).expanduser().exists()
               else self.tokenizer, "add_bos_token": self.add_bos_token,
               "prefix_token_id": self.prefix_token_id, "max_length": self.max_length,
               "num_fewshot": self.num_fewshot}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _completions_url(server: str) -> str:
    from server.http import normalize_base_url

    return normalize_base_url(server) + "/v1/completions"


def lm_eval_command(cfg: LmTasksConfig, cond: Condition, include_path: Path | None, output_path: Path,
                    request_cache: Path | None = None) -> list[str]:
    """The ``python -m lm_eval`` command line for one condition; ``request_cache``: lm_eval's
    ``--use_cache`` (its sqlite file of answered requests, see :func:`request_cache_path`)."""
    margs = [f"model={cond.model}", f"base_url={_completions_url(cfg.server)}",
             "tokenizer_backend=huggingface", f"tokenizer={cfg.tokenizer}",
             f"num_concurrent={cfg.num_concurrent}", f"max_retries={cfg.max_retries}",
             f"add_bos_token={cfg.add_bos_token}", f"timeout={cfg.request_timeout}"]
    if cfg.max_length is not None:
        margs.append(f"max_length={cfg.max_length}")
    if cfg.prefix_token_id is not None:
        margs.append(f"custom_prefix_token_id={cfg.prefix_token_id}")
    # lm_eval's own command line, with the ``negablate`` model registered first
    cmd = [sys.executable, "-m", LM_EVAL_MODULE, "--model", cfg.backend, "--model_args", ",".join(margs),
           "--tasks", ",".join(cfg.tasks), "--batch_size", str(cfg.batch_size),
           "--output_path", str(output_path)]
    if include_path is not None:
        cmd += ["--include_path", str(include_path)]
    if cfg.limit is not None:
        cmd += ["--limit", str(cfg.limit)]
    if cfg.num_fewshot is not None:
        cmd += ["--num_fewshot", str(cfg.num_fewshot)]
    if cfg.log_samples:
        cmd.append("--log_samples")
    if request_cache is not None:
        cmd += ["--use_cache", str(request_cache)]
    return cmd


def request_cache_key(card: Mapping[str, Any]) -> str:
    """What a cached lm_eval answer depends on besides the request, from the condition's
    model card in ``/v1/models``: the set's content (``negablate_content_hash``; ``none``
    for the unablated model) and the dtype the engine computes in (``negablate_dtype``,
    listed on the base model's card). lm_eval's cache keys an answer by the request alone
    (not the model, not the server),
    so the file must differ whenever these do: a set replaced under its name, or a server
    restarted in another dtype, starts a new file instead of reusing the old answers."""
    content = str(card.get("negablate_content_hash") or "none")
    dtype = str(card.get("negablate_dtype") or "unknown-dtype")
    return f"{content}-{dtype}"


def request_cache_path(cfg: LmTasksConfig, cond: Condition, key: str) -> Path:
    """The prefix lm_eval's ``--use_cache`` takes (it appends ``_rank0.db``): a condition
    interrupted mid-run (a session ending, a crash) resumes from the requests answered so
    far instead of from its first request."""
    return condition_dir(cfg, cond) / "request-cache" / key


def prepare_include_path(cfg: LmTasksConfig) -> tuple[Path | None, bool]:
    """Generate the local tasks asked for and merge the user's include paths into
    ``<out>/local_tasks/`` (see :func:`eval.lm_eval_tasks.local.build_include_path`).
    Returns the folder to pass as ``--include_path`` (or None) and whether every task
    is defined locally (then the hub is switched off for lm_eval).
    """
    return build_include_path(cfg.tasks, cfg.include_paths, cfg.out / "local_tasks", cfg.data_dir)


class ServerCheck(BaseModel):
    """What :func:`check_server_models` read from the server's model list."""

    cache_keys: dict[str, str]  # condition label -> request_cache_key
    negablate: bool  # a `negablate serve` (its base card says its dtype): it has the loglikelihood route


def check_server_models(cfg: LmTasksConfig, conditions: Sequence[Condition],
                        api_key: str | None = None) -> ServerCheck:
    """Fail before lm_eval starts if the server does not serve every condition's
    model name (lm_eval would otherwise retry each request and then crash). Returns each
    condition's :func:`request_cache_key`, read from the same listing, and whether the
    server is ours (plain vLLM has no ``/v1/negablate/loglikelihood``)."""
    from server.http import normalize_base_url
    from server.http import ModelListError, list_models, models_url

    base = normalize_base_url(cfg.server)
    url = models_url(base)
    try:
        cards = {m["id"]: m for m in list_models(base, api_key, timeout=30)}
    except ModelListError as e:
        raise RuntimeError(f"cannot list the server's models at {url}: {e.reason}") from e
    missing = [c.model for c in conditions if c.model not in cards]
    if missing:
        raise RuntimeError(f"the server at {cfg.server} does not serve {', '.join(missing)} "
                           f"(it lists: {', '.join(sorted(cards))}); upload the sets or fix --model/--set")
    base_card = cards.get(cfg.model, {})  # the dtype is on the base model's card only
    return ServerCheck(cache_keys={c.label: request_cache_key({**base_card, **cards[c.model]}) for c in conditions},
                       negablate="negablate_dtype" in base_card)


# =========================================================================== running


def condition_dir(cfg: LmTasksConfig, cond: Condition) -> Path:
    return cfg.out / "runs" / cond.label / cfg.signature()


def find_results_file(folder: Path) -> Path | None:
    """The newest ``results_*.json`` lm_eval wrote under ``folder`` (or None)."""
    files = sorted(folder.rglob("results_*.json"), key=lambda p: (p.stat().st_mtime, p.name)) if folder.exists() else []
    return files[-1] if files else None


def local_index_command(cmd: list[str]) -> list[str]:
    """``cmd`` (an :func:`lm_eval_command` line) run with lm_eval indexing only --include_path
    (:data:`eval.lm_eval_tasks.LOCAL_INDEX_FLAG`)."""
    assert cmd[1:3] == ["-m", LM_EVAL_MODULE], cmd
    return [*cmd[:3], LOCAL_INDEX_FLAG, *cmd[3:]]


def run_condition(cfg: LmTasksConfig, cond: Condition, include: Path | None, offline: bool,
                  api_key: str | None = None, local_index: bool = False,
                  cache_key: str | None = None) -> Path:
    """Run lm_eval for one condition; returns its results JSON. Output goes to
    ``logs/<condition>.log`` (lm_eval's progress bars included).

    ``cache_key`` (:func:`request_cache_key`): keep lm_eval's answers in
    :func:`request_cache_path`, so a rerun asks the server only what it has not answered.

    ``local_index``: every task is defined under ``include``, so lm_eval indexes only
    that folder (much faster start). Should a local task still need a bundled one (a
    group of lm_eval's tasks, say), that run fails and is repeated with the full index.
    """
    folder = condition_dir(cfg, cond)
    folder.mkdir(parents=True, exist_ok=True)
    cache = None
    if cache_key is not None:
        cache = request_cache_path(cfg, cond, cache_key)
        cache.parent.mkdir(parents=True, exist_ok=True)
    cmd = lm_eval_command(cfg, cond, include, folder, cache)
    (folder / "request.json").write_text(json.dumps({
        "condition": cond.model_dump(), "tasks": cfg.tasks, "limit": cfg.limit, "backend": cfg.backend,
        "command": cmd,
        "task_index": "include_path only" if local_index and include is not None else "lm_eval's and include_path",
        "offline": offline, "started_at": datetime.now(timezone.utc).isoformat()}, indent=2))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if offline:
        env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if api_key:
        env["OPENAI_API_KEY"] = api_key
    logs = cfg.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{cond.label}.log"
    attempts = [(cmd, "")]  # (command line run, note logged beside the plain command)
    if local_index and include is not None:
        attempts.insert(0, (local_index_command(cmd), f"   # task index: {include} only"))
    with log.open("ab") as fh:
        for i, (argv, note) in enumerate(attempts):
            if i:
                fh.write(b"\n[negablate] failed with the local task index; again with lm_eval's full index\n")
            fh.write(f"\n$ {' '.join(cmd)}{note}\n".encode())
            fh.flush()
            rc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=folder).returncode
            if rc == 0:
                break
    res = find_results_file(folder)
    if rc != 0 or res is None:
        tail = log.read_bytes()[-3000:].decode(errors="replace")
        raise RuntimeError(f"lm_eval failed for {cond.model} (exit {rc}); see {log}:\n{tail}")
    return res


def run_all(cfg: LmTasksConfig, api_key: str | None = None,
            server_factory: Callable[[], Any] | None = None) -> dict[str, Path]:
    """Run every condition that has no results yet; returns label -> results file.

    ``server_factory`` (optional) starts a server and returns an object with
    ``.url`` and ``.stop()``; it is called only if some condition is pending, so a
    finished run never starts an engine.
    """
    cfg.out.mkdir(parents=True, exist_ok=True)
    conds = cfg.conditions()
    done = {c.label: find_results_file(condition_dir(cfg, c)) for c in conds}
    pending = [c for c in conds if cfg.rerun or done[c.label] is None]
    for c in conds:
        if c not in pending:
            console.print(f"[dim]{c.label}: results exist ({done[c.label]}), skipped[/dim]")
    if not pending:
        return {k: v for k, v in done.items() if v is not None}
    include, all_local = prepare_include_path(cfg)
    offline = all_local if cfg.offline is None else cfg.offline
    server = server_factory() if server_factory is not None else None
    try:
        if server is not None:
            cfg = cfg.model_copy(update={"server": server.url})
        if cfg.server is None:
            raise ValueError("no server: give LmTasksConfig.server or a server_factory")
        checked = check_server_models(cfg, pending, api_key)
        if cfg.backend == "negablate" and not checked.negablate:
            console.print(f"[yellow]{cfg.server} is not `negablate serve` (no /v1/negablate/loglikelihood): "
                          "lm_eval runs with --model local-completions[/yellow]")
            cfg = cfg.model_copy(update={"backend": "local-completions"})
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("[bold]lm_eval[/bold] {task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                      console=console, transient=False) as prog:
            bar = prog.add_task("", total=len(pending))
            for c in pending:
                prog.update(bar, description=f"{c.label} ({', '.join(cfg.tasks)}; log: {cfg.out / 'logs'})")
                t0 = time.monotonic()
                done[c.label] = run_condition(cfg, c, include, offline, api_key, local_index=all_local,
                                              cache_key=checked.cache_keys[c.label])
                prog.console.print(f"{c.label}: {time.monotonic() - t0:.0f} s -> {done[c.label]}")
                prog.advance(bar)
    finally:
        if server is not None:
            server.stop()
    return {k: v for k, v in done.items() if v is not None}


# =========================================================================== parsing


class MetricRow(BaseModel):
    """One number of the tidy table: (task, metric, filter) under one condition."""

    task: str
    metric: str
    filter: str = "none"
    condition: str
    set: str | None = None
    value: float
    stderr: float | None = None
    n: int | None = None
    higher_is_better: bool | None = None
    aggregation: str | None = None      # lm_eval's, from the task config ("mean", "perplexity", ...)
    delta: float | None = None          # value - baseline value (None for the baseline)
    delta_stderr: float | None = None
    delta_stderr_kind: Literal["paired", "unpaired"] | None = None
    n_paired: int | None = None


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def parse_results(results: Mapping[str, Any], condition: str, set_name: str | None = None) -> list[MetricRow]:
    """lm_eval's results JSON (the dict in ``results_*.json``) -> rows without deltas.

    Every ``"<metric>,<filter>"`` number in ``results[task]`` becomes a row, its
    ``"<metric>_stderr,<filter>"`` the stderr (``"N/A"`` -> None); groups are rows
    too (their name as task). ``n`` is ``n-samples[task].effective`` when present.
    """
    rows: list[MetricRow] = []
    n_samples = results.get("n-samples", {}) or {}
    hib = results.get("higher_is_better", {}) or {}
    aggregations = {(task, m.get("metric")): m.get("aggregation")
                    for task, config in (results.get("configs") or {}).items() if isinstance(config, Mapping)
                    for m in config.get("metric_list") or [] if isinstance(m, Mapping)}
    for task, metrics in (results.get("results") or {}).items():
        if not isinstance(metrics, Mapping):
            continue
        ns = n_samples.get(task) or {}
        n = ns.get("effective", ns.get("original")) if isinstance(ns, Mapping) else None
        if n is None and isinstance(metrics.get("sample_len"), int):
            n = metrics["sample_len"]
        for key, raw in metrics.items():
            if "," not in key:
                continue
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            value = _num(raw)
            if value is None:
                continue
            higher = (hib.get(task) or {}).get(metric) if isinstance(hib.get(task), Mapping) else None
            rows.append(MetricRow(task=task, metric=metric, filter=filt, condition=condition, set=set_name,
                                  value=value, stderr=_num(metrics.get(f"{metric}_stderr,{filt}")),
                                  n=int(n) if isinstance(n, (int, float)) else None,
                                  higher_is_better=higher if isinstance(higher, bool) else None,
                                  aggregation=agg if isinstance(agg := aggregations.get((task, metric)), str) else None))
    return rows


def load_samples(results_file: Path) -> dict[str, dict[tuple[str, str], dict[int, float]]]:
    """Per-item metric values lm_eval logged next to ``results_file``
    (``samples_<task>_<date>.jsonl`` with the same date): task -> (metric, filter) ->
    doc_id -> value. Empty when the run had no ``--log_samples``."""
    m = re.match(r"results_(.+)\.json$", results_file.name)
    if not m:
        return {}
    date = m.group(1)
    out: dict[str, dict[tuple[str, str], dict[int, float]]] = {}
    for f in results_file.parent.glob(f"samples_*_{date}.jsonl"):
        task = f.name[len("samples_"):-len(f"_{date}.jsonl")]
        per: dict[tuple[str, str], dict[int, float]] = {}
        for line in f.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            s = json.loads(line)
            filt = s.get("filter", "none")
            for metric in s.get("metrics", []):
                v = _num(s.get(metric))
                if v is not None:
                    per.setdefault((metric, filt), {})[int(s["doc_id"])] = v
        out[task] = per
    return out


def add_deltas(rows: Sequence[MetricRow],
               samples: Mapping[str, Mapping[str, Mapping[tuple[str, str], Mapping[int, float]]]] | None = None,
               baseline: str = BASELINE) -> list[MetricRow]:
    """Fill ``delta`` (condition - baseline) and its standard error.

    Paired SE (:func:`eval.stats.paired_diff_stderr`: ``std(d_i, ddof=1) / sqrt(n)``
    over the items both conditions scored) when per-item samples exist for both, else
    the unpaired :func:`eval.stats.unpaired_diff_stderr` (``sqrt(se_a^2 + se_b^2)``),
    which ignores the (strong, positive) correlation between conditions and so
    overstates the uncertainty.

    The per-item samples are on the metric's scale only for a mean (``acc``, ...). For
    lm_eval's ``perplexity`` aggregation (``exp(-mean(ll_i))`` over per-item
    log-likelihoods, LAMBADA's) the paired SE is the delta method's:
    ``P = exp(-mean ll)`` moves by ``-P`` per unit of ``mean ll``, so the difference
    ``P_b - P_a`` has the paired SE of the items ``-P_b ll_b,i`` against ``-P_a ll_a,i``.
    Any other aggregation gets the unpaired SE.
    """
    samples = samples or {}
    base = {(r.task, r.metric, r.filter): r for r in rows if r.condition == baseline}
    out = []
    for r in rows:
        r = r.model_copy()
        b = base.get((r.task, r.metric, r.filter))
        if r.condition != baseline and b is not None:
            r.delta = r.value - b.value
            sa = samples.get(r.condition, {}).get(r.task, {}).get((r.metric, r.filter))
            sb = samples.get(baseline, {}).get(r.task, {}).get((r.metric, r.filter))
            common = sorted(set(sa) & set(sb)) if sa and sb else []
            aggregation = r.aggregation or ("perplexity" if r.metric == "perplexity" else "mean")
            if len(common) >= 2 and aggregation in ("mean", "perplexity"):
                xa, xb = [sa[i] for i in common], [sb[i] for i in common]
                if aggregation == "perplexity":
                    pa, pb = (math.exp(-math.fsum(x) / len(x)) for x in (xa, xb))
                    xa, xb = [-pa * v for v in xa], [-pb * v for v in xb]
                se = paired_diff_stderr(xa, xb)
                r.delta_stderr, r.delta_stderr_kind, r.n_paired = se, "paired", len(common)
            elif r.stderr is not None and b.stderr is not None:
                r.delta_stderr, r.delta_stderr_kind = unpaired_diff_stderr(r.stderr, b.stderr), "unpaired"
        out.append(r)
    return out


class LmTasksResult(BaseModel):
    """What ``lm_tasks.json`` holds."""

    model: str
    model_dir_name: str | None = Field(
        None, description="The tokenizer folder's name (e.g. gemma-3-270m): the served name is often "
                          "just 'model', and a full path would name one machine.")
    server: str | None = None
    tasks: list[str]
    limit: int | None = None
    conditions: list[Condition]
    rows: list[MetricRow]
    results_files: dict[str, str] = Field(
        default_factory=dict, description="Each condition's lm_eval results file, relative to the "
                                          "folder of lm_tasks.json (so a committed table names no machine's paths).")
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())


def collect(cfg: LmTasksConfig, files: Mapping[str, Path]) -> LmTasksResult:
    """Parse each condition's results (and samples) into one table with deltas."""
    conds = cfg.conditions()
    rows: list[MetricRow] = []
    samples: dict[str, Any] = {}
    for c in conds:
        f = files.get(c.label)
        if f is None:
            continue
        rows += parse_results(json.loads(Path(f).read_text(encoding="utf-8")), c.label, c.set)
        samples[c.label] = load_samples(Path(f))
    return LmTasksResult(model=cfg.model, model_dir_name=Path(cfg.tokenizer).name or None,
                         server=cfg.server, tasks=cfg.tasks, limit=cfg.limit,
                         conditions=conds, rows=add_deltas(rows, samples),
                         results_files={k: os.path.relpath(Path(v).resolve(), cfg.out.resolve())
                                        for k, v in files.items()})


# =========================================================================== outputs


def _is_percent(metric: str) -> bool:
    return metric in PERCENT_METRICS


def write_outputs(result: LmTasksResult, out: Path) -> dict[str, Path]:
    """``lm_tasks.json``, ``lm_tasks.csv`` and ``lm_tasks.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "lm_tasks.json", "csv": out / "lm_tasks.csv", "png": out / "lm_tasks.png"}
    paths["json"].write_text(result.model_dump_json(indent=2))
    fields = list(MetricRow.model_fields)
    with paths["csv"].open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in result.rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.model_dump().items()})
    plot_deltas(result, paths["png"])
    return paths


def plot_title(result: LmTasksResult) -> str:
    """The model by its folder's name (the served name is often just 'model') and the limit."""
    name = result.model if result.model_dir_name in (None, result.model) else \
        f"{result.model_dir_name} (served as {result.model})"
    limit = f", first {result.limit} documents per task" if result.limit else ""
    return f"lm_eval tasks under ablation: {name}{limit}"


def plot_deltas(result: LmTasksResult, path: Path) -> Path:
    """Delta vs baseline per task, one bar per ablated condition, one panel per
    metric; error bars are 95% intervals (1.96 x the delta's standard error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in result.rows if r.delta is not None]
    metrics = list(dict.fromkeys((r.metric, r.filter) for r in rows)) or [("acc", "none")]
    conds = [c.label for c in result.conditions if c.label != BASELINE]
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(5.5, 1.6 + 0.9 * len(conds)) * len(metrics), 4.2),
                             squeeze=False)
    for ax, (metric, filt) in zip(axes[0], metrics):
        mrows = [r for r in rows if (r.metric, r.filter) == (metric, filt)]
        tasks = list(dict.fromkeys(r.task for r in mrows))
        scale = 100.0 if _is_percent(metric) else 1.0
        x = np.arange(len(tasks))
        width = 0.8 / max(1, len(conds))
        for i, c in enumerate(conds):
            by = {r.task: r for r in mrows if r.condition == c}
            vals = np.array([by[t].delta * scale if t in by else np.nan for t in tasks])
            err = np.array([1.96 * by[t].delta_stderr * scale if t in by and by[t].delta_stderr is not None
                            else 0.0 for t in tasks])
            ax.bar(x + (i - (len(conds) - 1) / 2) * width, vals, width, yerr=err, capsize=3, label=c)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, tasks, rotation=20, ha="right")
        ax.set_title(metric if filt == "none" else f"{metric} ({filt})")
        ax.set_ylabel("change vs baseline" + (" (points)" if scale == 100 else "") + ", 95% CI")
        if not tasks:
            ax.text(0.5, 0.5, "no ablated condition", ha="center", va="center", transform=ax.transAxes)
    if conds and rows:
        axes[0][0].legend(fontsize=8)
    fig.suptitle(plot_title(result), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def load_result(path: str | Path) -> LmTasksResult:
    """Read ``lm_tasks.json`` (a file, or the folder holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "lm_tasks.json"
    return LmTasksResult.model_validate_json(p.read_text(encoding="utf-8"))


def _fmt(v: float | None, metric: str, signed: bool = False) -> str:
    if v is None:
        return "-"
    if _is_percent(metric):
        return f"{v * 100:+.1f}" if signed else f"{v * 100:.1f}"
    return f"{v:+.4g}" if signed else f"{v:.4g}"


def markdown_section(results: LmTasksResult | Mapping[str, Any], image: str | None = None,
                     heading: str = "## Non-grammatical tasks (lm_eval)") -> str:
    """A Markdown section for ``REPORT.md`` from :class:`LmTasksResult` (or its JSON dict).

    One row per (task, metric); the baseline column shows value ± stderr, each
    ablated condition its value and the delta ± the delta's standard error
    (percent metrics in %, deltas in points). ``image`` is a relative path to
    ``lm_tasks.png`` to embed, if given.
    """
    res = results if isinstance(results, LmTasksResult) else LmTasksResult.model_validate(results)
    conds = [c.label for c in res.conditions]
    keys = list(dict.fromkeys((r.task, r.metric, r.filter) for r in res.rows))
    cell = {(r.task, r.metric, r.filter, r.condition): r for r in res.rows}
    paired = any(r.delta_stderr_kind == "paired" for r in res.rows)
    unpaired = any(r.delta_stderr_kind == "unpaired" for r in res.rows)
    kinds = " and ".join(k for k, on in (("paired over items", paired), ("unpaired", unpaired)) if on) or "-"
    lines = [
        heading, "",
        f"`lm_eval --model local-completions` against the server, one model name per condition "
        f"(`{res.model}` or `{res.model}@SET`); tasks: {', '.join(f'`{t}`' for t in res.tasks)}"
        + (f", first {res.limit} documents each" if res.limit else "") + ". "
        "Accuracies in %, deltas in points against the baseline, ± one standard error "
        f"({kinds}). A syntax-specific ablation should leave these near zero while BLiMP/TSE drop "
        "(the double dissociation).", "",
        "| task | metric | n | " + " | ".join(conds) + " |",
        "|---|---|---:|" + "---:|" * len(conds),
    ]
    for task, metric, filt in keys:
        ns = {cell[(task, metric, filt, c)].n for c in conds if (task, metric, filt, c) in cell}
        n = "/".join(str(x) for x in sorted(x for x in ns if x is not None)) or "-"
        cells = []
        for c in conds:
            r = cell.get((task, metric, filt, c))
            if r is None:
                cells.append("-")
            elif r.delta is None:
                se = f" ± {_fmt(r.stderr, metric)}" if r.stderr is not None else ""
                cells.append(f"{_fmt(r.value, metric)}{se}")
            else:
                se = f" ± {_fmt(r.delta_stderr, metric)}" if r.delta_stderr is not None else ""
                cells.append(f"{_fmt(r.value, metric)} ({_fmt(r.delta, metric, signed=True)}{se})")
        mname = metric if filt == "none" else f"{metric} ({filt})"
        lines.append(f"| {task} | {mname} | {n} | " + " | ".join(cells) + " |")
    if image:
        lines += ["", f"![lm_eval task deltas]({image})"]
    return "\n".join(lines) + "\n"


# =========================================================================== orchestration


def run_lm_tasks(cfg: LmTasksConfig, api_key: str | None = None,
                 server_factory: Callable[[], Any] | None = None) -> LmTasksResult:
    """Run (or resume) every condition, then write the table, CSV, plot."""
    files = run_all(cfg, api_key=api_key, server_factory=server_factory)
    result = collect(cfg, files)
    paths = write_outputs(result, cfg.out)
    console.print(f"[green]lm_tasks:[/green] {paths['json']} ({len(result.rows)} rows), {paths['png']}")
    return result


def server_factory(model_dir: Path, sets_dir: Path | None, log_path: Path, *, served_name: str,
                   dtype: str, kv_cache_mb: int, max_model_len: int | None, max_sets: int,
                   cpu_bind_all_cores: bool = True) -> Callable[[], Any]:
    """A ``server_factory`` for :func:`run_all`: starts ``negablate serve`` on ``model_dir``
    with the sets of ``sets_dir`` only when some condition is still pending."""
    def start() -> Any:
        from server.launcher import ENV_WORKER_SLOTS, ServerProcess, worker_slots
        from vllm_negablate.offline import bind_worker_to_all_cores

        if cpu_bind_all_cores:
            bind_worker_to_all_cores()
        extra = ["--max-sets", str(max_sets)]
        if sets_dir is not None:
            extra += ["--neuron-sets", str(sets_dir)]
        srv = ServerProcess(model_dir, *extra, log_path=log_path, served_name=served_name, dtype=dtype,
                            kv_cache_bytes=kv_cache_mb * 2**20, max_model_len=max_model_len,
                            env={ENV_WORKER_SLOTS: str(worker_slots(max_sets))})
        console.print(f"starting the server on {model_dir} (log: {log_path}) ...")
        return srv.start(timeout=900)

    return start


def _split_list(values: Sequence[str] | None) -> list[str]:
    return [v.strip() for x in values or [] for v in x.split(",") if v.strip()]


def register(app: typer.Typer) -> None:
    """Add ``tasks`` to ``app`` (mounted as ``negablate analyze``)."""

    @app.command("tasks")
    def tasks_cmd(
        server: str | None = typer.Option(
            None, "--server", "-s", envvar="NEGABLATE_SERVER",
            help="Running `negablate serve` root URL (e.g. http://127.0.0.1:8000). Or give --model-dir "
                 "to start one here."),
        model: str | None = typer.Option(
            None, "--model", "-m", help="Served base model name (conditions are BASE and BASE@SET). "
                                        "Default with --model-dir: 'model'."),
        tokenizer: str | None = typer.Option(
            None, "--tokenizer", "-t", help="HF model directory with the tokenizer (lm_eval tokenizes "
                                            "locally). Default: --model-dir, or --model if it is a folder."),
        sets: list[str] | None = typer.Option(
            None, "--set", help="Neuron set to compare with the baseline (repeatable). Default with "
                                "--sets-dir: every set in it."),
        task: list[str] | None = typer.Option(
            None, "--task", help="lm_eval task/group name (repeatable or comma-separated). Offline: "
                                 f"{', '.join(LOCAL_TASKS)} (generated from local data); with network any "
                                 "lm_eval task, e.g. arc_easy, hellaswag. nongrammatical_local: all eight local tasks. "
                                 "Default: piqa_local."),
        limit: int | None = typer.Option(None, "--limit", "-n", help="First N documents of each task "
                                                                    "(lm_eval --limit)."),
        out: Path = typer.Option(Path("report/lm_tasks"), "--out", "-o",
                                 help="Output folder (rerun to resume: finished conditions are skipped, an interrupted one asks the server only what it has not answered)."),
        include_path: list[Path] | None = typer.Option(
            None, "--include-path", help="Folder of your own lm_eval task YAMLs (repeatable)."),
        data_dir: Path | None = typer.Option(None, help="Data root for local tasks (default: ../shared/data "
                                                        "or $NEGABLATE_DATA_DIR)."),
        log_samples: bool = typer.Option(True, help="Keep lm_eval's per-item samples; gives paired "
                                                    "standard errors of the deltas."),
        batch_size: int = typer.Option(16, help="Requests lm_eval packs into one completions call."),
        concurrent: int = typer.Option(1, help="Completions calls in flight (lm_eval num_concurrent)."),
        max_length: int | None = typer.Option(None, help="lm_eval's context limit (left-truncates); "
                                                         "default lm_eval's 2048. Keep <= the server's "
                                                         "max_model_len."),
        add_bos_token: bool = typer.Option(
            True, help="Encode with the tokenizer's special tokens (Gemma/Llama: BOS first), as lm_eval's "
                       "hf model does by default; local-completions' own default is off."),
        prefix_token_id: int | None = typer.Option(None, help="Token that conditions an empty context "
                                                              "(default: the model's recorded start token, else BOS, else EOS)."),
        num_fewshot: int | None = typer.Option(None, help="Few-shot examples (default: the task's)."),
        offline: bool | None = typer.Option(
            None, "--offline/--online", help="--offline sets HF_*_OFFLINE=1 for lm_eval; --online leaves the "
                                             "environment as it is. Default: offline when every task is local "
                                             "(generated, or declared under --include-path)."),
        rerun: bool = typer.Option(False, help="Run every condition again even if results exist."),
        api_key: str | None = typer.Option(None, envvar="OPENAI_API_KEY",
                                           help="Bearer token for the completions API, if the server wants one."),
        model_dir: Path | None = typer.Option(None, help="Start `negablate serve` on this HF model directory "
                                                         "(instead of --server); stopped at the end."),
        sets_dir: Path | None = typer.Option(None, help="With --model-dir: folder of NeuronSet JSONs to "
                                                        "serve (e.g. report/discovery/sets)."),
        dtype: str = typer.Option("float32", help="With --model-dir: model dtype."),
        kv_cache_mb: int = typer.Option(1024, help="With --model-dir: KV cache (MiB)."),
        max_model_len: int | None = typer.Option(None, help="With --model-dir: max_model_len (default: "
                                                            "the model's)."),
        cpu_bind_all_cores: bool = typer.Option(True, help="With --model-dir, on CPU: give vLLM's worker "
                                                           "every core."),
        backend: str = typer.Option(
            "negablate", help="lm_eval model: 'negablate' asks /v1/negablate/loglikelihood for the "
                              "continuation's log-probabilities only (the context's LM-head rows are not "
                              "computed: about half of Gemma 3's time); 'local-completions' is lm_eval's own "
                              "echo through /v1/completions (any OpenAI-compatible server). Same numbers."),
    ) -> None:
        """Run lm_eval tasks for the baseline and each neuron set: the double dissociation.

        Every condition is one lm_eval run against the server (its own command line,
        `--model negablate`: local-completions with log-likelihoods from the server's
        /v1/negablate/loglikelihood), model name BASE or BASE@SET. Writes lm_tasks.json, lm_tasks.csv and
        lm_tasks.png (delta vs baseline per task, 95% CI) in --out, plus lm_eval's own
        files under --out/runs/. Finished conditions are skipped on a rerun.

        Against a running server (offline PIQA, 200 questions):

            negablate analyze tasks --server http://127.0.0.1:8000 --model gemma
            --tokenizer ~/.cache/negablate/models/gemma-3-270m
            --set wasserstein-top1 --set random-top1-s0 --task piqa_local --limit 200
            --out report/lm_tasks

        Or start the server here from a reproduce run's sets:

            negablate analyze tasks --model-dir ~/.cache/negablate/models/gemma-3-270m
            --sets-dir report/discovery/sets --task piqa_local --limit 200 --out report/lm_tasks

        With network, lm_eval's own tasks work too: --task arc_easy,piqa.
        """
        if (server is None) == (model_dir is None):
            raise typer.BadParameter("give exactly one of --server URL or --model-dir DIR")
        if backend not in ("negablate", "local-completions"):
            raise typer.BadParameter(f"--backend must be negablate or local-completions, not {backend!r}")
        set_names = _split_list(sets)
        if model_dir is not None:
            if sets_dir is None and set_names:
                raise typer.BadParameter("--set with --model-dir needs --sets-dir (the sets to serve)")
            if sets_dir is not None and not set_names:
                set_names = sorted(p.stem for p in Path(sets_dir).glob("*.json"))
            if sets_dir is not None:
                missing = [s for s in set_names if not (Path(sets_dir) / f"{s}.json").exists()]
                if missing:
                    raise typer.BadParameter(f"not in {sets_dir}: {', '.join(missing)}")
        base = model or ("model" if model_dir is not None else None)
        if base is None:
            raise typer.BadParameter("--model is required with --server")
        tok = tokenizer or (str(model_dir) if model_dir is not None else
                            (base if Path(base).expanduser().is_dir() else None))
        if tok is None:
            raise typer.BadParameter("--tokenizer DIR is required (lm_eval tokenizes locally)")
        cfg = LmTasksConfig(
            server=server, model=base, tokenizer=tok, sets=set_names,
            tasks=_split_list(task) or [PIQA_TASK], limit=limit, out=out,
            include_paths=list(include_path or []), data_dir=data_dir, log_samples=log_samples,
            batch_size=batch_size, num_concurrent=concurrent,
            max_length=max_length if max_length is not None else max_model_len if model_dir else None,
            add_bos_token=add_bos_token, prefix_token_id=prefix_token_id, num_fewshot=num_fewshot,
            offline=offline, rerun=rerun, backend=backend)
        factory = None
        if model_dir is not None:
            factory = server_factory(model_dir, sets_dir, out / "logs" / "server.log", served_name=base,
                                     dtype=dtype, kv_cache_mb=kv_cache_mb, max_model_len=max_model_len,
                                     max_sets=max(8, len(set_names) + 1),
                                     cpu_bind_all_cores=cpu_bind_all_cores)
        try:
            result = run_lm_tasks(cfg, api_key=api_key, server_factory=factory)
        except (RuntimeError, OSError, ValueError) as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(1) from None
        console.print(markdown_section(result))


if __name__ == "__main__":
    _app = typer.Typer(add_completion=False, no_args_is_help=True)
    register(_app)

    @_app.callback()
    def _main() -> None:
        """lm_eval tasks per condition (standalone: python -m eval.analysis.lm_tasks tasks --help)."""

    _app()
