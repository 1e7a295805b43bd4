"""`negablate reproduce`: the paper's main comparison, offline, in one command.

Phases (each writes its outputs under ``--out`` and is skipped on a rerun when
they exist, so an interrupted run resumes where it stopped):

1. **model**: an embedded model name is fetched and dequantized once
   (``negablate models fetch``); a directory is used as it is.
2. **discovery**: ``negablate neurons find`` runs the model inside vLLM over
   WikiText-2 *valid* and writes Wasserstein scores and sets (top p% per layer,
   the positive-mode variant, a seeded random control of the same size).
3. **perplexity-matched control**: ``negablate neurons control --kind
   perplexity-matched`` searches the number of random non-Wasserstein neurons
   whose ablation matches the Wasserstein set's perplexity on held-out text.
4. **serve**: ``negablate serve`` with all sets, on a free loopback port.
5. **evaluate**: each condition on BLiMP, TSE (Newman et al. agreement set) and
   WikiText-2 *test* perplexity, over HTTP with the eval harness (cached, so a
   rerun recomputes nothing).
6. **report**: Markdown + JSON + PNG (main table with bootstrap CIs,
   per-phenomenon deltas, score histograms, neuron counts).

Discovery and evaluation use different WikiText splits (valid vs test).
Steps 2-3 start their own offline engines (vLLM cannot share one with the
server here), so ``eval`` itself stays free of torch and vLLM.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.console import Console

from vllm_negablate.models import recorded_start_token
from vllm_negablate.neuron_set import NO_ABLATION, percent_label

from eval.data import default_data_dir, load_blimp, load_tse_ml, load_wikitext_text, stratified_subsample

console = Console(stderr=True)


class ReproduceConfig(BaseModel):
    """Every knob of a run; the defaults are what ``negablate reproduce`` uses.

    They are sized so that Gemma 3 270M finishes well under an hour on a 2-core
    CPU: float32 (on CPUs without bf16 units vLLM runs bf16 about 5x slower;
    measured here on Gemma 3 270M: 14 vs 70 prompt tokens/s on one core) and
    about 30k scored tokens per condition.
    """

    model: str = "gemma-3-270m"
    out: Path = Path("report")
    dtype: str = "float32"
    top_percent: float = 1.0
    discovery_tokens: int = 32_768
    window: int = 512
    blimp_per_paradigm: int = 15
    tse_per_test: int = 20
    ppl_windows: int = 8
    match_tokens: int = 4_096
    match_tol: float = 0.02
    match_max_iter: int = 8
    cpu_bind_all_cores: bool = True
    seed: int = 0
    n_boot: int = 2_000
    kv_cache_mb: int = 1024
    data_dir: Path | None = None


CONDITIONS = [
    # (label, set-name pattern, description)
    ("baseline", None, "no ablation"),
    ("wasserstein-negative", "wasserstein-top{p}", "Wasserstein neurons, negative side zeroed"),
    ("wasserstein-positive", "wasserstein-top{p}-positive", "same neurons, positive side zeroed"),
    ("random-negative", "random-top{p}-s{seed}", "random neurons, same count per layer"),
    ("perplexity-matched-negative", "perplexity-matched-top{p}-s{seed}", "random neurons, count matched to the Wasserstein perplexity"),
]


def _negablate(*args: str) -> list[str]:
    return [sys.executable, "-m", "vllm_negablate.cli", *args]


def _run(cmd: list[str], log: Path) -> None:
    console.print(f"[dim]$ {' '.join(cmd[2:] if cmd[1] == '-m' else cmd)}  (log: {log})[/dim]")
    with open(log, "ab") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_bytes()[-3000:].decode(errors="replace")
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def resolve_model(cfg: ReproduceConfig, logs: Path) -> Path:
    path = Path(cfg.model).expanduser()
    if path.is_dir():
        return path
    _run(_negablate("models", "fetch", cfg.model), logs / "models.log")
    out = subprocess.run(_negablate("models", "path", cfg.model), capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def discover(cfg: ReproduceConfig, model_dir: Path, data_dir: Path, logs: Path) -> Path:
    disc = cfg.out / "discovery"
    if (disc / "stats.json").exists():
        console.print("[green]discovery: done earlier[/green]")
        return disc
    tmp = cfg.out / "discovery.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    _run(_negablate(
        "neurons", "find", str(model_dir), "--corpus", str(data_dir / "wikitext-2" / "valid.txt"),
        "--top", f"{cfg.top_percent:g}", "--max-tokens", str(cfg.discovery_tokens),
        "--window", str(cfg.window), "--seed", str(cfg.seed), "--dtype", cfg.dtype,
        "--kv-cache-mb", str(cfg.kv_cache_mb), "--out", str(tmp),
    ), logs / "discovery.log")
    tmp.rename(disc)
    return disc


def match_perplexity(cfg: ReproduceConfig, model_dir: Path, disc: Path, data_dir: Path, logs: Path) -> None:
    name = f"perplexity-matched-top{percent_label(cfg.top_percent)}-s{cfg.seed}"
    if (disc / "sets" / f"{name}.json").exists():
        console.print("[green]perplexity-matched control: done earlier[/green]")
        return
    _run(_negablate(
        "neurons", "control", str(disc), "--kind", "perplexity-matched", "--model", str(model_dir),
        "--top", f"{cfg.top_percent:g}", "--seed", str(cfg.seed),
        "--eval-corpus", str(data_dir / "wikitext-2" / "test.txt"),
        "--eval-tokens", str(cfg.match_tokens), "--window", str(cfg.window),
        "--tol", str(cfg.match_tol), "--max-iter", str(cfg.match_max_iter),
        "--dtype", cfg.dtype, "--kv-cache-mb", str(cfg.kv_cache_mb), "--out", str(disc / "sets"),
        # an unmatched control is still a control: the report states how close it got
        "--save-unconverged",
    ), logs / "perplexity-matched.log")


def condition_sets(cfg: ReproduceConfig) -> list[tuple[str, str | None, str]]:
    p = percent_label(cfg.top_percent)
    return [(label, None if pat is None else pat.format(p=p, seed=cfg.seed), desc)
            for label, pat, desc in CONDITIONS]


def evaluate(cfg: ReproduceConfig, server_url: str, model_dir: Path, data_dir: Path,
             conditions: list[tuple[str, str | None, str]]) -> None:
    from eval.scoring import CompletionsScorer
    from eval.tasks import evaluate_pairs, evaluate_perplexity, write_pair_run, write_ppl_run

    blimp = stratified_subsample(load_blimp(data_dir), cfg.blimp_per_paradigm, cfg.seed)
    tse = stratified_subsample(load_tse_ml(data_dir), cfg.tse_per_test, cfg.seed)
    text = load_wikitext_text(data_dir / "wikitext-2" / "test.txt")
    cache = cfg.out / "cache" / "scores.sqlite"
    cache.parent.mkdir(parents=True, exist_ok=True)
    start = recorded_start_token(model_dir)  # embedded models record their start token
    for label, set_name, _ in conditions:
        model = f"model@{NO_ABLATION if set_name is None else set_name}"
        runs = cfg.out / "runs" / label
        with CompletionsScorer(server_url, model, tokenizer=str(model_dir), cache=cache,
                               concurrency=2, progress=True, start_token=start) as scorer:
            for task, pairs in (("blimp", blimp), ("tse", tse)):
                if (runs / task / "summary.json").exists():
                    continue
                console.print(f"[bold]{label}[/bold]: {task} ({len(pairs)} pairs)")
                records, summary = evaluate_pairs(scorer, pairs, task, options={"condition": label})
                write_pair_run(runs / task, records, summary)
            if not (runs / "perplexity" / "summary.json").exists():
                console.print(f"[bold]{label}[/bold]: perplexity ({cfg.ppl_windows} x {cfg.window} tokens)")
                records, summary = evaluate_perplexity(
                    scorer, text, window=cfg.window, max_windows=cfg.ppl_windows,
                    text_path=str(data_dir / "wikitext-2" / "test.txt"), options={"condition": label})
                write_ppl_run(runs / "perplexity", records, summary)


def bind_worker_to_all_cores() -> None:
    """Let vLLM's CPU worker use every core this process may run on.

    By default vLLM keeps one core back for its scheduler, which on a 2-core
    machine halves the worker. Scoring is one long forward pass per batch with
    the scheduler idle, so all cores go to the worker (measured on Gemma 3 270M,
    2 cores: 120 vs 70 prompt tokens/s). A value the user set is kept; the
    variable is ignored on GPUs.
    """
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cores:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))


def _add_elapsed(out: Path, seconds: float) -> float:
    """Total wall time over every invocation (a resumed run adds to it), from ``timing.json``."""
    path = out / "timing.json"
    runs = json.loads(path.read_text())["invocations_s"] if path.exists() else []
    runs.append(round(seconds, 1))
    path.write_text(json.dumps({"invocations_s": runs, "total_s": round(sum(runs), 1)}, indent=2))
    return sum(runs)


def reproduce(cfg: ReproduceConfig) -> Path:
    from vllm_negablate.testing.server import ServerProcess

    t0 = time.monotonic()
    if cfg.cpu_bind_all_cores:
        bind_worker_to_all_cores()
    cfg.out.mkdir(parents=True, exist_ok=True)
    logs = cfg.out / "logs"
    logs.mkdir(exist_ok=True)
    data_dir = cfg.data_dir or default_data_dir()
    (cfg.out / "config.json").write_text(cfg.model_dump_json(indent=2))
    model_dir = resolve_model(cfg, logs)
    console.print(f"model: {model_dir}")
    disc = discover(cfg, model_dir, data_dir, logs)
    match_perplexity(cfg, model_dir, disc, data_dir, logs)
    conditions = condition_sets(cfg)
    missing = [s for _, s, _ in conditions if s and not (disc / "sets" / f"{s}.json").exists()]
    if missing:
        raise RuntimeError(f"discovery did not produce the sets {missing} in {disc / 'sets'}")
    pending = [c for c in conditions if not all(
        (cfg.out / "runs" / c[0] / t / "summary.json").exists() for t in ("blimp", "tse", "perplexity"))]
    if pending:
        admin = secrets.token_hex(8)
        server = ServerProcess(
            model_dir, "--neuron-sets", str(disc / "sets"), "--admin-key", admin,
            "--max-sets", "8", log_path=logs / "server.log", served_name="model",
            dtype=cfg.dtype, kv_cache_bytes=cfg.kv_cache_mb * 2**20, max_model_len=None,
        )
        console.print("starting the server ...")
        server.start(timeout=900)
        try:
            evaluate(cfg, server.url, model_dir, data_dir, pending)
        finally:
            server.stop()
    from eval.report import write_report

    path = write_report(cfg, disc, conditions, model_dir, elapsed_s=_add_elapsed(cfg.out, time.monotonic() - t0))
    console.print(f"[green]report:[/green] {path}")
    return path


if __name__ == "__main__":
    reproduce(ReproduceConfig(**json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}))
