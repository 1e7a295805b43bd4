"""`negablate reproduce`: the paper's main comparison, offline, in one command.

Phases (each writes its outputs under the output folder and is skipped on a rerun
when they exist, so an interrupted run resumes where it stopped):

1. **model**: an embedded model name is fetched and dequantized once
   (``negablate models fetch``); a directory is used as it is.
2. **discovery corpus**: WikiText-2 *valid* with its ``<unk>`` tokens removed (or fully
   detokenized; ``discovery_text``), written to ``corpus/`` with a record of what was
   done (:func:`eval.wikitext.discovery_corpus`).
3. **discovery**: ``negablate neurons find --top 1,2,5`` runs the model inside vLLM
   over that corpus once and writes Wasserstein scores and, per p, the Wasserstein set,
   its positive mirror and a seeded random control of the same size.
4. **perplexity-matched controls**: ``negablate neurons control --kind
   perplexity-matched --pool random,bottom`` searches, per p, the number of random
   non-Wasserstein neurons and of lowest-W1 neurons whose ablation matches the
   Wasserstein set's perplexity on held-out text (one engine for every search).
5. **serve**: ``negablate serve`` with all sets, on a free loopback port.
6. **evaluate** over HTTP with the eval harness (cached, so a rerun recomputes
   nothing): the main p's main conditions on ``blimp_main_per_paradigm`` BLiMP pairs
   (``runs-full/``), then every condition on ``blimp_per_paradigm`` BLiMP pairs, TSE
   and raw WikiText-2 *test* perplexity in 2,048-token windows (``runs/``); the report
   is written as soon as these are in.
7. **lm_eval tasks**: the non-grammatical tasks for the baseline, Wasserstein-negative
   and both matched controls at the main p (``lm_tasks/``).
8. **depth**: the layer analysis of the main set (``layers/``).
9. **report**: Markdown + JSON + CSV + PNG (:mod:`eval.report`), now with phases 7-8.

Discovery and evaluation use different WikiText splits (valid vs test).
Steps 3-4 start their own offline engines (vLLM cannot share one with the
server here), so ``eval`` itself stays free of torch and vLLM.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console

from vllm_negablate import set_names
from vllm_negablate.cli_neurons import parse_percents
from vllm_negablate.models import recorded_start_token
from vllm_negablate.models.registry import UnknownModelError, get_spec
from vllm_negablate.neuron_set import NeuronSet

from eval.analysis.sweep import Condition, EvalSettings, condition_done, condition_for, evaluate_conditions
from eval.data import default_data_dir, missing_data
from eval.commands import negablate_command as _negablate
from eval.commands import run_logged as _run
from eval.reproduce_config import PRESETS, ConditionSpec, ReproduceConfig, condition_sets, default_ks, lm_task_sets
from eval.wikitext import discovery_corpus

__all__ = ["PreflightError", "ReproduceConfig", "condition_sets", "preflight", "print_plan", "reproduce",
           "reproduce_command"]

console = Console(stderr=True)
_S, _P = ReproduceConfig(), ReproduceConfig(preset="powered")  # the presets the help shows


class PreflightError(ValueError):
    """The run cannot be done as asked; found before any engine starts."""


# Settings that do not change what a run computes: where it writes, how it runs, how many
# bootstrap draws its report takes (recomputed from the records on every run).
# The preset is not one either: it only fills the settings, which are compared one by one.
_NOT_RESULT_SETTINGS = frozenset({"out", "kv_cache_mb", "cpu_bind_all_cores", "n_boot", "data_dir", "preset"})
# Settings that only add or drop conditions of their own (each keyed by its own label and
# set), never change what another condition computes: a folder takes a new value (and one
# from before the setting existed had its default). matched_draws: draws s1, s2, ... beside s0.
_ADDITIVE_SETTINGS = {"matched_draws": 1}


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
    wikitext = ["valid.txt", "test.txt"] + (["raw/wiki.test.raw"] if cfg.ppl_text == "raw" else [])
    missing = missing_data(data_dir, tse=cfg.tse_source == "tse", tse_ml=cfg.tse_source == "tse-ml",
                           wikitext=wikitext)
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
    path = cfg.out_dir() / "config.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PreflightError(f"{path} cannot be read ({e}); use a new --out") from None
    new = {k: v for k, v in _result_settings(cfg).items() if k not in _ADDITIVE_SETTINGS}
    changed = [f"{k} {old[k]!r} -> {v!r}" for k, v in sorted(new.items()) if k in old and old[k] != v]
    added = [k for k in sorted(new) if k not in old]
    if added:  # a folder from an older version, which did not record these settings
        changed.append(f"not recorded there: {', '.join(added)}")
    if changed:
        hint = next((f" (they are the {name} preset's: add --preset {name})" for name in PRESETS
                     if all(old.get(k, _ADDITIVE_SETTINGS.get(k)) == v
                            for k, v in _result_settings(cfg.with_preset(name)).items()
                            if k not in _ADDITIVE_SETTINGS)), "")
        raise PreflightError(
            f"{cfg.out_dir()} holds a run made with other settings ({'; '.join(changed)}); resuming "
            f"would mix its discovery, sets and results with this run's. Use a new --out, or "
            f"the folder's own settings (its config.json){hint} to resume it.")


def _result_settings(cfg: ReproduceConfig) -> dict[str, Any]:
    """The settings that decide what a run computes, as config.json records them."""
    return {k: v for k, v in json.loads(cfg.model_dump_json()).items() if k not in _NOT_RESULT_SETTINGS}


def resolve_model(cfg: ReproduceConfig, logs: Path) -> Path:
    path = Path(cfg.model).expanduser()
    if path.is_dir():
        return path
    _run(_negablate("models", "fetch", cfg.model), logs / "models.log")
    out = subprocess.run(_negablate("models", "path", cfg.model), capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def clean_corpus(cfg: ReproduceConfig, data_dir: Path) -> Path:
    """The discovery corpus (phase 2): ``corpus/wikitext-2-valid.<text>.txt`` and its record."""
    out = cfg.out_dir() / "corpus"
    path = out / f"wikitext-2-valid.{cfg.discovery_text}.txt"
    record = out / f"wikitext-2-valid.{cfg.discovery_text}.json"
    if not (path.is_file() and record.is_file()):
        info = discovery_corpus(data_dir / "wikitext-2" / "valid.txt", path, cfg.discovery_text)
        record.write_text(json.dumps(info, indent=2))
    return path


def discover(cfg: ReproduceConfig, model_dir: Path, corpus: Path, logs: Path) -> Path:
    out = cfg.out_dir()
    disc = out / "discovery"
    if (disc / "stats.json").exists():
        console.print("[green]discovery: done earlier[/green]")
        return disc
    tmp = out / "discovery.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    _run(_negablate(
        "neurons", "find", str(model_dir), "--corpus", str(corpus),
        "--top", ",".join(f"{p:g}" for p in cfg.top), "--max-tokens", str(cfg.discovery_tokens),
        "--window", str(cfg.window), "--seed", str(cfg.seed), "--dtype", cfg.dtype,
        "--kv-cache-mb", str(cfg.kv_cache_mb), "--out", str(tmp),
    ), logs / "discovery.log")
    tmp.rename(disc)
    return disc


def match_perplexity(cfg: ReproduceConfig, model_dir: Path, disc: Path, data_dir: Path, logs: Path) -> None:
    """Both perplexity-matched controls (random and lowest-W1 neurons) for every p, one
    engine; then the further draws of the random one at the main p (``matched_draws``),
    one engine each (same held-out text and target, another seed)."""
    def done(p: float, pool: str, seed: int = cfg.seed) -> bool:
        return (disc / "sets" / f"{set_names.perplexity_matched(p, seed, pool=pool)}.json").exists()

    tol = (["--tol-effect", str(cfg.match_tol_effect)] if cfg.match_tol_effect is not None
           else ["--tol", str(cfg.match_tol)])

    def search(percents: list[float], pools: list[str], seed: int, log: str) -> None:
        _run(_negablate(
            "neurons", "control", str(disc), "--kind", "perplexity-matched", "--model", str(model_dir),
            "--top", ",".join(f"{p:g}" for p in percents), "--seed", str(seed),
            "--eval-corpus", str(data_dir / "wikitext-2" / "test.txt"),
            "--eval-tokens", str(cfg.match_tokens), "--window", str(cfg.window),
            *tol, "--max-iter", str(cfg.match_max_iter), "--pool", ",".join(pools),
            "--dtype", cfg.dtype, "--kv-cache-mb", str(cfg.kv_cache_mb), "--out", str(disc / "sets"),
            # an unmatched control is still a control: the report states how close it got
            "--save-unconverged",
        ), logs / log)

    percents = [p for p in cfg.top if not all(done(p, pool) for pool in set_names.POOLS)]
    draws = [cfg.seed + d for d in range(1, cfg.matched_draws) if not done(cfg.main_top, "random", cfg.seed + d)]
    if not percents and not draws:
        console.print("[green]perplexity-matched controls: done earlier[/green]")
        return
    if percents:
        search(percents, [pool for pool in set_names.POOLS if not all(done(p, pool) for p in percents)],
               cfg.seed, "perplexity-matched.log")
    for seed in draws:
        search([cfg.main_top], ["random"], seed, f"perplexity-matched-s{seed}.log")


def eval_conditions(specs: list[ConditionSpec], disc: Path) -> list[Condition]:
    """The conditions to score, each with its set's content hash (a changed set is re-scored)."""
    out = []
    for spec in specs:
        ns = None if spec.set_name is None else NeuronSet.load(disc / "sets" / f"{spec.set_name}.json")
        out.append(condition_for(spec.label, spec.kind, ns))
    return out


def eval_settings(cfg: ReproduceConfig, data_dir: Path, *, full: bool = False) -> EvalSettings:
    """The sweep's settings; ``full``: the main conditions' BLiMP-only run on more pairs."""
    if full:
        return EvalSettings(blimp_per_paradigm=cfg.blimp_main_per_paradigm, tse_per_test=0, ppl_windows=0,
                            seed=cfg.seed, n_boot=cfg.n_boot, data_dir=data_dir)
    return EvalSettings(blimp_per_paradigm=cfg.blimp_per_paradigm, tse_per_test=cfg.tse_per_test,
                        tse_source=cfg.tse_source, ppl_windows=cfg.ppl_windows, window=cfg.ppl_window,
                        ppl_text=cfg.ppl_text, seed=cfg.seed, n_boot=cfg.n_boot, data_dir=data_dir)


def scoring_folders(cfg: ReproduceConfig, data_dir: Path) -> list[tuple[Path, list[ConditionSpec], EvalSettings]]:
    """(runs folder, condition specs, settings) in the order they are scored: the main
    conditions' full BLiMP first (the headline numbers land first, and the sweep's
    subsample of those conditions is then read from the score cache), then the sweep."""
    out = cfg.out_dir()
    specs = condition_sets(cfg)
    full = ([(out / "runs-full", [s for s in specs if s.full_blimp], eval_settings(cfg, data_dir, full=True))]
            if cfg.full_blimp else [])
    return [*full, (out / "runs", specs, eval_settings(cfg, data_dir))]


def evaluation_plan(cfg: ReproduceConfig, disc: Path, data_dir: Path
                    ) -> list[tuple[Path, list[Condition], EvalSettings]]:
    """:func:`scoring_folders` with each spec made a condition (its set's content hash)."""
    return [(runs, eval_conditions(specs, disc), settings) for runs, specs, settings in scoring_folders(cfg, data_dir)]


def run_lm_tasks_phase(cfg: ReproduceConfig, model_dir: Path, disc: Path, logs: Path) -> None:
    """lm_eval's non-grammatical tasks for the baseline and :func:`lm_task_sets` (phase 7;
    ``OUT/lm_tasks``); a server is started only if a condition has no results yet."""
    if not cfg.lm_tasks:
        return
    from eval.analysis.lm_tasks import LmTasksConfig, run_lm_tasks, server_factory

    start_server = server_factory(model_dir, disc / "sets", logs / "server-lm-tasks.log", served_name="model",
                                  dtype=cfg.dtype, kv_cache_mb=cfg.kv_cache_mb, max_model_len=2049, max_sets=8,
                                  cpu_bind_all_cores=cfg.cpu_bind_all_cores)
    run_lm_tasks(LmTasksConfig(model="model", tokenizer=str(model_dir), sets=lm_task_sets(cfg),
                               tasks=cfg.lm_tasks, limit=cfg.lm_tasks_limit, out=cfg.out_dir() / "lm_tasks",
                               data_dir=cfg.data_dir, max_length=2048),
                 server_factory=start_server)


def run_layers_phase(cfg: ReproduceConfig, model_dir: Path, disc: Path, data_dir: Path) -> None:
    """The layer analysis of the main p's Wasserstein-negative set (phase 8; ``OUT/layers``)."""
    if cfg.layers_blimp_per_paradigm <= 0:
        return
    from eval.analysis.layers import LayersConfig, run_layers

    num_layers = int(json.loads((disc / "stats.json").read_text())["model"]["num_layers"])
    settings = EvalSettings(blimp_per_paradigm=cfg.layers_blimp_per_paradigm, ppl_windows=4,
                            window=cfg.ppl_window, ppl_text=cfg.ppl_text, seed=cfg.seed, n_boot=cfg.n_boot,
                            data_dir=data_dir)
    run_layers(LayersConfig(model=model_dir, discovery=disc, out=cfg.out_dir() / "layers",
                            base_set=set_names.wasserstein_top(cfg.main_top),
                            ks=cfg.layers_ks or default_ks(num_layers), settings=settings, dtype=cfg.dtype,
                            kv_cache_mb=cfg.kv_cache_mb, max_model_len=cfg.ppl_window + 1,
                            cpu_bind_all_cores=cfg.cpu_bind_all_cores))


class RunClock:
    """This invocation's wall time in ``OUT/timing.json``, beside the earlier ones', saved
    after every phase: a run stopped mid-way (a session ending, a kill) still counts the
    phases it finished, and a resumed run adds to the total instead of replacing it."""

    def __init__(self, out: Path) -> None:
        self.path = out / "timing.json"
        self.t0 = time.monotonic()
        self.invocations = read_invocations(self.path)
        self.invocations.append({"started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 "seconds": 0.0, "finished": False})
        self.lap()

    def lap(self, finished: bool = False) -> float:
        """Save the time so far (``finished``: the invocation reached the end); the total."""
        self.invocations[-1].update(seconds=round(time.monotonic() - self.t0, 1), finished=finished)
        total = round(sum(i["seconds"] for i in self.invocations), 1)
        self.path.write_text(json.dumps({"invocations": self.invocations, "total_s": total}, indent=2))
        return total


def read_invocations(path: Path) -> list[dict[str, Any]]:
    """The invocations ``timing.json`` records (its first format, ``invocations_s``: the
    seconds of finished invocations only, read as such)."""
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    if "invocations" in data:
        return list(data["invocations"])
    return [{"started_at": None, "seconds": s, "finished": True} for s in data.get("invocations_s", [])]


def reproduce(cfg: ReproduceConfig) -> Path:
    from server.launcher import serve
    from vllm_negablate.offline import bind_worker_to_all_cores

    data_dir = preflight(cfg)
    if cfg.cpu_bind_all_cores:
        bind_worker_to_all_cores()
    out = cfg.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    clock = RunClock(out)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    # where the folder and the data are is this machine's business, not the run's record
    (out / "config.json").write_text(cfg.model_dump_json(indent=2, exclude={"out", "data_dir"}))
    model_dir = resolve_model(cfg, logs)
    console.print(f"model: {model_dir}")
    corpus = clean_corpus(cfg, data_dir)
    disc = discover(cfg, model_dir, corpus, logs)
    clock.lap()
    match_perplexity(cfg, model_dir, disc, data_dir, logs)
    clock.lap()
    specs = condition_sets(cfg)
    missing = [s.set_name for s in specs if s.set_name and not (disc / "sets" / f"{s.set_name}.json").exists()]
    if missing:
        raise RuntimeError(f"discovery did not produce the sets {missing} in {disc / 'sets'}")
    plan = [(runs, [c for c in conds if not condition_done(runs, c, settings)], settings)
            for runs, conds, settings in evaluation_plan(cfg, disc, data_dir)]
    if any(pending for _, pending, _ in plan):
        with serve(model_dir, "--neuron-sets", str(disc / "sets"), log_path=logs / "server.log",
                   max_sets=8, served_name="model", dtype=cfg.dtype,
                   max_model_len=max(cfg.ppl_window, cfg.window) + 1,
                   kv_cache_bytes=cfg.kv_cache_mb * 2**20, announce=console.print) as server:
            for runs, pending, settings in plan:
                evaluate_conditions(server.url, pending, runs, settings, tokenizer=model_dir,
                                    cache=out / "cache" / "scores.sqlite", served_name="model",
                                    start_token=recorded_start_token(model_dir),
                                    title=f"reproduce: {runs.name}")
                clock.lap()
    from eval.report import write_report

    if cfg.lm_tasks or cfg.layers_blimp_per_paradigm > 0:  # the main results first: phases 7-8 take hours
        console.print(f"[green]report so far:[/green] {write_report(cfg, disc, specs, model_dir)}")
    run_lm_tasks_phase(cfg, model_dir, disc, logs)
    clock.lap()
    run_layers_phase(cfg, model_dir, disc, data_dir)
    path = write_report(cfg, disc, specs, model_dir, elapsed_s=clock.lap(finished=True))
    console.print(f"[green]report:[/green] {path}")
    return path


def print_plan(cfg: ReproduceConfig) -> None:
    """``--plan``: the run's state from its folder's files (:mod:`eval.reproduce_status`)."""
    from eval.reproduce_status import measured_rate, plan_lines, run_status

    data_dir = preflight(cfg)
    steps = run_status(cfg, data_dir, scoring_folders(cfg, data_dir), eval_conditions)
    for line in plan_lines(cfg, steps, measured_rate(cfg.out_dir())):
        print(line)


def _both(name: str, show=lambda v: f"{v:,}" if isinstance(v, int) else str(v)) -> str:
    """The standard and powered presets' value of a setting, for --help."""
    std, pow_ = getattr(_S, name), getattr(_P, name)
    if isinstance(std, list):
        std, pow_ = ",".join(f"{v:g}" if isinstance(v, float) else v for v in std) or "none", \
            ",".join(f"{v:g}" if isinstance(v, float) else v for v in pow_) or "none"
        return f" (standard: {std}; powered: {pow_})"
    return f" (standard: {show(std)}; powered: {show(pow_)})" if std != pow_ else f" (default: {show(std)})"


def _opt(name: str, help: str) -> Any:
    """An option whose default comes from the preset (None: not given)."""
    return typer.Option(None, help=help + _both(name), show_default=False)


def reproduce_command(
    preset: str = typer.Option(_S.preset, help="standard: the main p, ~2,000 BLiMP and 1,100 TSE pairs per condition, under 30 min for SmolLM2 on 2 cores. powered: the published run (top 1,2,5 sweep, all 67,000 BLiMP pairs for the main conditions, lm_eval tasks, layer analysis; hours). Options given below override it."),
    model: str = typer.Option(_S.model, help="Embedded model name (smollm2-135m, gemma-3-270m; fetched once) or an HF model dir."),
    out: Path | None = typer.Option(None, help="Output folder: report, runs, logs (rerun to resume). Default: docs/results/<model> (powered), docs/results/standard/<model> (standard).", show_default=False),
    dtype: str | None = _opt("dtype", "float32: exact (oracle-equal). bfloat16: 1.4-1.7x faster where the hardware has bf16 units (avx512_bf16, AMX, GPUs); refused on CPUs without them. Its effect on decisions and deltas: README, 'Precision'."),
    top: str | None = _opt("top", "Percents of neurons per layer, one Wasserstein set each, from one discovery pass; the first is the main p (Wasserstein-positive, full BLiMP)."),
    discovery_tokens: int | None = _opt("discovery_tokens", "WikiText-2 valid tokens observed to score neurons."),
    discovery_text: str | None = _opt("discovery_text", "Discovery corpus: unk-removed (the <unk> tokens dropped, the rest as the reference's raw text), detokenized, or tokenized (as is)."),
    blimp_per_paradigm: int | None = _opt("blimp_per_paradigm", "BLiMP pairs per paradigm for every condition (67 paradigms of 1,000)."),
    blimp_main_per_paradigm: int | None = _opt("blimp_main_per_paradigm", "BLiMP pairs per paradigm for the main p's baseline, Wasserstein-negative, random-negative and bottom-matched conditions (1000: all 67,000)."),
    tse_per_test: int | None = _opt("tse_per_test", "TSE pairs per test (22 Marvin & Linzen tests: agreement, reflexives, NPI; 120-22,400 pairs each)."),
    ppl_windows: int | None = _opt("ppl_windows", "Raw WikiText-2 test windows for perplexity."),
    ppl_window: int | None = _opt("ppl_window", "Tokens per perplexity window (the reference's 2,048)."),
    window: int | None = _opt("window", "Tokens per window in discovery and the perplexity-matched search."),
    match_tokens: int | None = _opt("match_tokens", "Held-out tokens per perplexity-matching step."),
    match_max_iter: int | None = _opt("match_max_iter", "Most bisection steps of the perplexity-matched search."),
    lm_tasks: str | None = _opt("lm_tasks", "lm_eval tasks for the baseline, Wasserstein-negative and both matched controls at the main p (offline copies; '' skips them)."),
    lm_tasks_limit: int | None = typer.Option(None, help=f"First N documents of each lm_eval task (0: all). (default: {_S.lm_tasks_limit})", show_default=False),
    layers_blimp_per_paradigm: int | None = _opt("layers_blimp_per_paradigm", "BLiMP pairs per paradigm for the layer analysis of the main set (0 skips it)."),
    matched_draws: int | None = _opt("matched_draws", "Independent draws (seeds SEED, SEED+1, ...) of the random perplexity-matched control at the main p, each searched and scored; the report sets them side by side. A finished folder takes more draws on rerun."),
    cpu_bind_all_cores: bool = typer.Option(
        _S.cpu_bind_all_cores, help="On CPU, give vLLM's worker every core (vLLM keeps one back by default)."),
    seed: int = typer.Option(_S.seed, help="Seed of subsampling and random controls."),
    plan: bool = typer.Option(False, "--plan", help="Start nothing: check the settings, then print each phase's state in OUT, the sentences left to score and about how long they take at the rate OUT's finished runs were scored at."),
) -> None:
    """Reproduce the paper's main comparison on a real model, offline, in one command.

    Finds Wasserstein neurons inside vLLM (WikiText-2 valid, <unk> removed) once, and for
    each --top p builds the Wasserstein set, a random control of the same per-layer counts
    and two perplexity-matched controls (random and lowest-W1 neurons). Serves every
    condition with `negablate serve` and scores BLiMP, TSE (22 tests) and raw WikiText-2
    test perplexity (2,048-token windows) over HTTP. Writes OUT/REPORT.md (main table with
    CIs, McNemar p and minimal detectable effects; the sweep against p; TSE by field; the
    premise statistic), report.json, CSVs and PNG charts. Interrupted? Run the same command
    again: every phase resumes, and a folder made with other settings is refused.

    Two presets: `standard` (the default; under 30 minutes for SmolLM2-135M on 2 cores) and
    `powered` (the published reports in docs/results/<model>; hours):

    negablate reproduce --preset powered --model smollm2-135m

    Where does a long run stand? The same command with --plan prints each phase's
    state and the time the scoring left needs, and starts nothing.
    """
    from vllm_negablate.precision import DtypeError, check_dtype_runnable

    given: dict[str, Any] = {
        "dtype": dtype, "discovery_tokens": discovery_tokens, "discovery_text": discovery_text,
        "blimp_per_paradigm": blimp_per_paradigm, "blimp_main_per_paradigm": blimp_main_per_paradigm,
        "tse_per_test": tse_per_test, "ppl_windows": ppl_windows, "ppl_window": ppl_window, "window": window,
        "match_tokens": match_tokens, "match_max_iter": match_max_iter,
        "layers_blimp_per_paradigm": layers_blimp_per_paradigm, "matched_draws": matched_draws,
    }
    try:
        if preset not in PRESETS:
            raise typer.BadParameter(f"--preset {preset!r}: use one of {', '.join(PRESETS)}")
        if dtype is not None:
            given["dtype"] = check_dtype_runnable(dtype)  # before any engine starts
        if top is not None:
            given["top"] = parse_percents(top)
        if lm_tasks is not None:
            given["lm_tasks"] = [t.strip() for t in lm_tasks.split(",") if t.strip()]
        if lm_tasks_limit is not None:
            given["lm_tasks_limit"] = lm_tasks_limit or None
        cfg = ReproduceConfig(preset=preset, model=model, out=out, seed=seed, cpu_bind_all_cores=cpu_bind_all_cores,
                              **{k: v for k, v in given.items() if v is not None})
        if plan:
            print_plan(cfg)
            return
        reproduce(cfg)
    except (DtypeError, PreflightError, typer.BadParameter) as e:
        console.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        console.print(f"[bold red]error:[/bold red] {msgs}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


if __name__ == "__main__":
    reproduce(ReproduceConfig(**json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}))
