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
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from vllm_negablate import set_names
from vllm_negablate.models import recorded_start_token
from vllm_negablate.models.registry import UnknownModelError, get_spec
from vllm_negablate.neuron_set import NeuronSet

from eval.analysis.sweep import Condition, EvalSettings, condition_done, condition_for, evaluate_conditions
from eval.data import default_data_dir, missing_data
from eval.commands import negablate_command as _negablate
from eval.commands import run_logged as _run
from eval.reproduce_config import CONDITIONS, ReproduceConfig, condition_sets

__all__ = ["CONDITIONS", "PreflightError", "ReproduceConfig", "condition_sets", "preflight", "reproduce",
           "reproduce_command"]

console = Console(stderr=True)
_R = ReproduceConfig()  # the defaults the command line shows


class PreflightError(ValueError):
    """The run cannot be done as asked; found before any engine starts."""


# Settings that do not change what a run computes: where it writes, how it runs, how many
# bootstrap draws its report takes (recomputed from the records on every run).
_NOT_RESULT_SETTINGS = frozenset({"out", "kv_cache_mb", "cpu_bind_all_cores", "n_boot", "data_dir"})


def preflight(cfg: ReproduceConfig) -> Path:
    """Everything that can be checked without an engine, before one starts (a wrong model
    name or a missing test set found after discovery and a server start costs minutes);
    returns the data folder. Raises :class:`PreflightError`."""
    if not Path(cfg.model).expanduser().is_dir():
        try:
            get_spec(cfg.model)
        except UnknownModelError as e:
            raise PreflightError(f"--model {cfg.model!r} is not a model folder, and {e}") from None
    data_dir = cfg.data_dir or default_data_dir()
    if cfg.tse_source not in ("tse", "tse-ml"):
        raise PreflightError(f"tse_source {cfg.tse_source!r}: use tse (22 tests) or tse-ml")
    missing = missing_data(data_dir, tse=cfg.tse_source == "tse", tse_ml=cfg.tse_source == "tse-ml")
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise PreflightError(
            f"the data folder {data_dir} lacks {len(missing)} file(s) the run reads: {shown} "
            f"(point NEGABLATE_DATA_DIR at a complete copy; see ../shared/data/README.md)")
    check_settings(cfg)
    return data_dir


def check_settings(cfg: ReproduceConfig) -> None:
    """Refuse to resume into an output folder made with other result-determining settings:
    its discovery, sets and runs would mix with this run's (only the runs are keyed by
    their options; discovery and the matched control are reused as found)."""
    path = cfg.out / "config.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PreflightError(f"{path} cannot be read ({e}); use a new --out") from None
    new = json.loads(cfg.model_dump_json())
    changed = [f"{k} {old[k]!r} -> {new[k]!r}" for k in sorted(new)
               if k not in _NOT_RESULT_SETTINGS and k in old and old[k] != new[k]]
    if changed:
        raise PreflightError(
            f"{cfg.out} holds a run made with other settings ({'; '.join(changed)}); resuming "
            f"would mix its discovery, sets and results with this run's. Use a new --out, or "
            f"the folder's own settings (its config.json) to resume it.")


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
    """Both perplexity-matched controls (random and lowest-W1 neurons), one engine."""
    pools = [pool for pool in ("random", "bottom") if not (
        disc / "sets" / f"{set_names.perplexity_matched(cfg.top_percent, cfg.seed, pool=pool)}.json").exists()]
    if not pools:
        console.print("[green]perplexity-matched controls: done earlier[/green]")
        return
    tol = (["--tol-effect", str(cfg.match_tol_effect)] if cfg.match_tol_effect is not None
           else ["--tol", str(cfg.match_tol)])
    _run(_negablate(
        "neurons", "control", str(disc), "--kind", "perplexity-matched", "--model", str(model_dir),
        "--top", f"{cfg.top_percent:g}", "--seed", str(cfg.seed),
        "--eval-corpus", str(data_dir / "wikitext-2" / "test.txt"),
        "--eval-tokens", str(cfg.match_tokens), "--window", str(cfg.window),
        *tol, "--max-iter", str(cfg.match_max_iter), "--pool", ",".join(pools),
        "--dtype", cfg.dtype, "--kv-cache-mb", str(cfg.kv_cache_mb), "--out", str(disc / "sets"),
        # an unmatched control is still a control: the report states how close it got
        "--save-unconverged",
    ), logs / "perplexity-matched.log")


def eval_conditions(cfg: ReproduceConfig, disc: Path) -> list[Condition]:
    """The run's conditions, each with its set's content hash (a changed set is re-scored)."""
    out = []
    for label, set_name, _ in condition_sets(cfg):
        ns = None if set_name is None else NeuronSet.load(disc / "sets" / f"{set_name}.json")
        out.append(condition_for(label, label, ns))
    return out


def eval_settings(cfg: ReproduceConfig, data_dir: Path) -> EvalSettings:
    return EvalSettings(blimp_per_paradigm=cfg.blimp_per_paradigm, tse_per_test=cfg.tse_per_test,
                        tse_source=cfg.tse_source,
                        ppl_windows=cfg.ppl_windows, window=cfg.window, seed=cfg.seed,
                        n_boot=cfg.n_boot, data_dir=data_dir)


def _add_elapsed(out: Path, seconds: float) -> float:
    """Total wall time over every invocation (a resumed run adds to it), from ``timing.json``."""
    path = out / "timing.json"
    runs = json.loads(path.read_text())["invocations_s"] if path.exists() else []
    runs.append(round(seconds, 1))
    path.write_text(json.dumps({"invocations_s": runs, "total_s": round(sum(runs), 1)}, indent=2))
    return sum(runs)


def reproduce(cfg: ReproduceConfig) -> Path:
    from server.launcher import serve
    from vllm_negablate.offline import bind_worker_to_all_cores

    t0 = time.monotonic()
    data_dir = preflight(cfg)
    if cfg.cpu_bind_all_cores:
        bind_worker_to_all_cores()
    cfg.out.mkdir(parents=True, exist_ok=True)
    logs = cfg.out / "logs"
    logs.mkdir(exist_ok=True)
    (cfg.out / "config.json").write_text(cfg.model_dump_json(indent=2))
    model_dir = resolve_model(cfg, logs)
    console.print(f"model: {model_dir}")
    disc = discover(cfg, model_dir, data_dir, logs)
    match_perplexity(cfg, model_dir, disc, data_dir, logs)
    conditions = condition_sets(cfg)
    missing = [s for _, s, _ in conditions if s and not (disc / "sets" / f"{s}.json").exists()]
    if missing:
        raise RuntimeError(f"discovery did not produce the sets {missing} in {disc / 'sets'}")
    settings = eval_settings(cfg, data_dir)
    runs = cfg.out / "runs"
    pending = [c for c in eval_conditions(cfg, disc) if not condition_done(runs, c, settings)]
    if pending:
        with serve(model_dir, "--neuron-sets", str(disc / "sets"), log_path=logs / "server.log",
                   max_sets=8, served_name="model", dtype=cfg.dtype,
                   kv_cache_bytes=cfg.kv_cache_mb * 2**20, announce=console.print) as server:
            evaluate_conditions(server.url, pending, runs, settings, tokenizer=model_dir,
                                cache=cfg.out / "cache" / "scores.sqlite", served_name="model",
                                start_token=recorded_start_token(model_dir), title="reproduce")
    from eval.report import write_report

    path = write_report(cfg, disc, conditions, model_dir, elapsed_s=_add_elapsed(cfg.out, time.monotonic() - t0))
    console.print(f"[green]report:[/green] {path}")
    return path


def reproduce_command(
    model: str = typer.Option(_R.model, help="Embedded model name (fetched once) or an HF model dir."),
    out: Path = typer.Option(_R.out, help="Output folder: report, runs, logs (rerun to resume)."),
    dtype: str = typer.Option(_R.dtype, help="float32: exact (oracle-equal). bfloat16: about 1.7x faster where the hardware has bf16 units (avx512_bf16, AMX, GPUs); refused on CPUs without them. Its effect on BLiMP decisions: README, 'Precision'."),
    top: float = typer.Option(_R.top_percent, help="Percent of neurons per layer in the Wasserstein set."),
    discovery_tokens: int = typer.Option(_R.discovery_tokens, help="WikiText-2 valid tokens observed to score neurons."),
    blimp_per_paradigm: int = typer.Option(_R.blimp_per_paradigm, help="BLiMP pairs per paradigm (67 paradigms; 1000 = all)."),
    tse_per_test: int = typer.Option(_R.tse_per_test, help="TSE pairs per test (22 Marvin & Linzen tests: agreement, reflexives, NPI; 120-2,000 pairs each)."),
    ppl_windows: int = typer.Option(_R.ppl_windows, help="WikiText-2 test windows (of --window tokens) for perplexity."),
    window: int = typer.Option(_R.window, help="Tokens per window (discovery and perplexity)."),
    match_tokens: int = typer.Option(_R.match_tokens, help="Held-out tokens per perplexity-matching step."),
    match_max_iter: int = typer.Option(_R.match_max_iter, help="Most bisection steps of the perplexity-matched search."),
    cpu_bind_all_cores: bool = typer.Option(
        _R.cpu_bind_all_cores, help="On CPU, give vLLM's worker every core (vLLM keeps one back by default)."),
    seed: int = typer.Option(_R.seed, help="Seed of subsampling and random controls."),
) -> None:
    """Reproduce the paper's main comparison on a real model, offline, in one command.

    Finds Wasserstein neurons inside vLLM (WikiText-2 valid), builds the random and
    perplexity-matched controls, serves every condition with `negablate serve`, and
    evaluates baseline / Wasserstein-negative / Wasserstein-positive / random-negative /
    perplexity-matched-negative (random neurons) / perplexity-matched-bottom-negative
    (lowest-W1 neurons) on BLiMP, TSE and WikiText-2 test perplexity. Writes
    OUT/REPORT.md, report.json and PNG charts. Interrupted? Run the same command again.

    Example: negablate reproduce --blimp-per-paradigm 100 --out report-100
    """
    from vllm_negablate.precision import DtypeError, check_dtype_runnable

    try:
        dtype = check_dtype_runnable(dtype)  # before any engine starts
    except DtypeError as e:
        console.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    try:
        reproduce(ReproduceConfig(
            model=model, out=out, dtype=dtype, top_percent=top, discovery_tokens=discovery_tokens,
            blimp_per_paradigm=blimp_per_paradigm, tse_per_test=tse_per_test,
            ppl_windows=ppl_windows, window=window, seed=seed, match_tokens=match_tokens,
            match_max_iter=match_max_iter, cpu_bind_all_cores=cpu_bind_all_cores,
        ))
    except PreflightError as e:
        console.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


if __name__ == "__main__":
    reproduce(ReproduceConfig(**json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}))
