"""``negablate eval``: BLiMP, TSE and perplexity through an OpenAI-compatible server, and A/B comparison.

Standalone: ``python -m eval.cli --help``.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from vllm_negablate import defaults

app = typer.Typer(
    name="eval",
    help=(
        "Evaluate a served model (optionally with a neuron set ablated) over HTTP.\n\n"
        "Every command talks to an OpenAI-compatible /v1/completions endpoint (`negablate serve`, "
        "or plain vLLM) and scores each sentence from the model's start token (recorded by embedded models, else BOS, else EOS), from prompt logprobs "
        "(echo: true, logprobs: 0, max_tokens: 0). Select a neuron set with --model BASE@SET "
        "(or --neuron-set SET, sent as vllm_xargs); BASE@none (--neuron-set none) is the unablated "
        "model even while the server has a default set. Scores are cached in SQLite "
        "(~/.cache/negablate/eval-scores.sqlite, or $NEGABLATE_EVAL_CACHE): an interrupted run, "
        "started again, resumes.\n\n"
        "Typical A/B:\n\n"
        "  negablate eval blimp -s http://127.0.0.1:8000 -m pythia-160m --tokenizer /models/pythia-160m "
        "--out runs/base\n\n"
        "  negablate eval blimp -s http://127.0.0.1:8000 -m pythia-160m@wd1pct --tokenizer /models/pythia-160m "
        "--out runs/wd\n\n"
        "  negablate eval compare runs/base runs/wd --out runs/wd-vs-base"
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)

err = Console(stderr=True)


class Subsample(str, Enum):
    random = "random"
    first = "first"


class TseDataset(str, Enum):
    tse = "tse"
    tse_ml = "tse-ml"


class Metric(str, Enum):
    correct = "correct"
    correct_sum = "correct_sum"
    correct_mean = "correct_mean"


# --------------------------------------------------------------------------- shared options

ServerOpt = Annotated[str, typer.Option(
    "--server", "-s", envvar="NEGABLATE_SERVER",
    help="Server root URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine). Env: NEGABLATE_SERVER.")]
ModelOpt = Annotated[str, typer.Option(
    "--model", "-m",
    help="Served model name; BASE@SET selects a neuron set (negablate serve). Plain vLLM: the base name only.")]
NeuronSetOpt = Annotated[Optional[str], typer.Option(
    "--neuron-set", help="Select the set in the body (vllm_xargs.neuron_set) instead of BASE@SET. "
                         "'none' (or --model BASE@none): no ablation, even while the server has a "
                         "default set; naming no set scores under that default (recorded as "
                         "server_default, with a warning).")]
TokenizerOpt = Annotated[Optional[str], typer.Option(
    "--tokenizer", "-t",
    help="Model directory holding tokenizer.json (tokenized here, ids sent), or 'server' to use the "
         "server's /tokenize. Default: the model name, if it is a local directory.")]
StartTokenOpt = Annotated[Optional[str], typer.Option(
    "--start-token",
    help="Token (string or id) put before every sentence/window. Default: the embedded model's recorded "
         "start token, else BOS, else EOS "
         "(as lm_eval). SmolLM2: '<|endoftext|>'.")]
ApiKeyOpt = Annotated[Optional[str], typer.Option(
    "--api-key", envvar="OPENAI_API_KEY", help="Bearer token, if the server wants one. Env: OPENAI_API_KEY.")]
OutOpt = Annotated[Optional[Path], typer.Option(
    "--out", "-o", help="Run directory to write (default: eval-runs/<task>-<model>[-<set>]-<time>).")]
ConcOpt = Annotated[int, typer.Option("--concurrency", "-c", min=1, help="Requests in flight.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Prompts per request.")]
BatchTokOpt = Annotated[int, typer.Option("--max-batch-tokens", min=1, help="Token budget per request.")]
CacheOpt = Annotated[Optional[Path], typer.Option(
    "--cache", help="SQLite cache file (default ~/.cache/negablate/eval-scores.sqlite or $NEGABLATE_EVAL_CACHE).")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Do not read or write the cache.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds per request.")]
RetriesOpt = Annotated[int, typer.Option("--max-retries", min=0,
                                         help="Retries on 5xx/429/timeouts/connection errors.")]
DataDirOpt = Annotated[Optional[Path], typer.Option(
    "--data-dir", help="Data root holding blimp/, tse/, tse-ml/, wikitext-2/ (default ../shared/data or "
                       "$NEGABLATE_DATA_DIR).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the per-group subsample.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
DtypeOpt = Annotated[Optional[str], typer.Option(
    "--dtype", help="The dtype the scores must be computed in (float32: exact; bfloat16: fast). "
                    "negablate serve says what it runs in; a different one stops the run before "
                    "scoring. Default: whatever the server runs (recorded in summary.json; the "
                    "score cache is keyed by it either way).")]


def _fail(msg: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/bold red] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _default_out(task: str, model: str, neuron_set: str | None) -> Path:
    from eval.scoring import split_model

    base, mset = split_model(model)
    name = Path(base.rstrip("/")).name or "model"
    s = mset or neuron_set
    label = f"{task}-{name}" + (f"-{s}" if s else "")
    label = re.sub(r"[^A-Za-z0-9._@-]+", "_", label)
    return Path("eval-runs") / f"{label}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _scorer(server: str, model: str, neuron_set: str | None, tokenizer: str | None,
            start_token: str | None, api_key: str | None, concurrency: int, batch_size: int,
            max_batch_tokens: int, cache: Path | None, no_cache: bool, timeout: float,
            max_retries: int, quiet: bool, dtype: str | None = None):
    from eval.scoring import CompletionsScorer
    from eval.tokenizers import TokenizerError
    from vllm_negablate.precision import DTYPES, normalize_dtype

    if dtype is not None and normalize_dtype(dtype) not in DTYPES:
        _fail(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    try:
        sc = CompletionsScorer(
            server, model, api_key=api_key, tokenizer=tokenizer, neuron_set=neuron_set,
            start_token=start_token, cache=False if no_cache else cache,
            batch_size=batch_size, max_batch_tokens=max_batch_tokens, concurrency=concurrency,
            timeout=timeout, max_retries=max_retries, progress=not quiet, dtype=dtype,
        )
        _ = sc.tokenizer  # load now: fail before any request
    except (TokenizerError, ValueError) as e:
        _fail(str(e))
    return sc


def _run_guarded(fn: Any) -> Any:
    from eval.data import DataFormatError, DataUnavailableError, UnknownNameError
    from eval.errors import ScoringError
    from eval.tokenizers import TokenizerError

    try:
        return fn()
    except (DataFormatError, UnknownNameError, DataUnavailableError, TokenizerError) as e:
        _fail(str(e), 2)
    except ScoringError as e:
        _fail(str(e), 1)
    except KeyboardInterrupt:
        _fail("interrupted; the finished batches are cached: run the same command again to resume", 130)


def _note_server_default(run: Any) -> None:
    if run.server_default:
        err.print(f"[bold yellow]note:[/bold yellow] no neuron set was named, so these scores are "
                  f"under the server's default set {run.server_default!r} (recorded as "
                  f"server_default); use --model {run.base_model}@none for the unablated model",
                  highlight=False, soft_wrap=True)


def _pick(pairs: list, limit: int | None, subsample: Subsample, seed: int) -> list:
    from collections import defaultdict

    from eval.data import stratified_subsample

    if limit is None:
        return pairs
    if subsample is Subsample.random:
        return stratified_subsample(pairs, limit, seed)
    seen: dict[str, int] = defaultdict(int)
    out = []
    for p in pairs:
        if seen[p.paradigm] < limit:
            out.append(p)
            seen[p.paradigm] += 1
    return out


def _pair_command(task: str, pairs_fn: Any, options: dict[str, Any], scorer_args: dict[str, Any],
                  out: Path | None, show_paradigms: bool) -> None:
    from eval.tasks import evaluate_pairs, print_pair_summary, write_pair_run

    pairs = _run_guarded(pairs_fn)
    if not pairs:
        _fail("no pairs selected")
    sc = _scorer(**scorer_args)
    with sc:
        records, summary = _run_guarded(lambda: evaluate_pairs(sc, pairs, task, options=options))
    d = write_pair_run(out or _default_out(task, scorer_args["model"], scorer_args["neuron_set"]),
                       records, summary)
    print_pair_summary(summary, show_paradigms=show_paradigms)
    _note_server_default(summary.run)
    st = summary.run.scoring
    err.print(f"{len(records)} pairs; {st['requests']} request(s), {st['cache_hits']} cached "
              f"sequence(s); wrote {d}/", highlight=False)


# --------------------------------------------------------------------------- commands


@app.command()
def blimp(
    server: ServerOpt = "http://127.0.0.1:8000",
    model: ModelOpt = ...,  # type: ignore[assignment]
    neuron_set: NeuronSetOpt = None,
    tokenizer: TokenizerOpt = None,
    start_token: StartTokenOpt = None,
    paradigm: Annotated[Optional[list[str]], typer.Option(
        "--paradigm", "-p", help="BLiMP UID to run (repeatable). Default: all 67.")] = None,
    limit_per_paradigm: Annotated[Optional[int], typer.Option(
        "--limit-per-paradigm", "-n", min=1, help="At most N pairs per paradigm.")] = None,
    subsample: Annotated[Subsample, typer.Option(
        help="With --limit-per-paradigm: a seeded random sample, or the first N of each file "
             "(what lm_eval --limit takes).")] = Subsample.random,
    seed: SeedOpt = 0,
    data_dir: DataDirOpt = None,
    out: OutOpt = None,
    concurrency: ConcOpt = 4,
    batch_size: BatchOpt = defaults.SENTENCES_PER_REQUEST,
    max_batch_tokens: BatchTokOpt = 32768,
    cache: CacheOpt = None,
    no_cache: NoCacheOpt = False,
    api_key: ApiKeyOpt = None,
    timeout: TimeoutOpt = 600.0,
    max_retries: RetriesOpt = 5,
    dtype: DtypeOpt = None,
    show_paradigms: Annotated[bool, typer.Option(help="Print all paradigms, not only phenomena.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """BLiMP accuracy: a pair is right when sum log p(good) > sum log p(bad) (ties: wrong).

    Each sentence is scored from the start token (the model's recorded one, else BOS, else EOS), so the first
    word counts. Reported per paradigm, per phenomenon (linguistics_term) and overall;
    the table shows phenomena (--show-paradigms for all 67), the files have everything:
    records.jsonl (one line per pair), summary.json, summary.csv.

    Examples:

      negablate eval blimp -s http://127.0.0.1:8000 -m /models/pythia-160m -n 100 --out runs/base

      negablate eval blimp -m pythia-160m@wd1pct --tokenizer /models/pythia-160m -p anaphor_gender_agreement
    """
    from eval.data import load_blimp

    opts = {"data": "blimp", "paradigms": paradigm, "limit_per_paradigm": limit_per_paradigm,
            "subsample": subsample.value, "seed": seed, "data_dir": str(data_dir) if data_dir else None,
            "batch_size": batch_size, "concurrency": concurrency}
    _pair_command(
        "blimp",
        lambda: _pick(load_blimp(data_dir, paradigm, allow_hub=False), limit_per_paradigm, subsample, seed),
        opts, dict(server=server, model=model, neuron_set=neuron_set, tokenizer=tokenizer,
                   start_token=start_token, api_key=api_key, concurrency=concurrency,
                   batch_size=batch_size, max_batch_tokens=max_batch_tokens, cache=cache,
                   no_cache=no_cache, timeout=timeout, max_retries=max_retries, quiet=quiet, dtype=dtype),
        out, show_paradigms)


@app.command()
def tse(
    server: ServerOpt = "http://127.0.0.1:8000",
    model: ModelOpt = ...,  # type: ignore[assignment]
    neuron_set: NeuronSetOpt = None,
    tokenizer: TokenizerOpt = None,
    start_token: StartTokenOpt = None,
    dataset: Annotated[TseDataset, typer.Option(
        help="tse: Marvin & Linzen's 22 tests (the reference code's set); tse-ml: Newman et al.'s "
             "15 agreement tests.")] = TseDataset.tse,
    test: Annotated[Optional[list[str]], typer.Option(
        "--test", help="Test to run (repeatable), e.g. simple_agrmt. Default: all.")] = None,
    limit_per_test: Annotated[Optional[int], typer.Option(
        "--limit-per-test", "-n", min=1, help="At most N pairs per test.")] = None,
    subsample: Annotated[Subsample, typer.Option(help="random (seeded) or first N.")] = Subsample.random,
    seed: SeedOpt = 0,
    data_dir: DataDirOpt = None,
    out: OutOpt = None,
    concurrency: ConcOpt = 4,
    batch_size: BatchOpt = defaults.SENTENCES_PER_REQUEST,
    max_batch_tokens: BatchTokOpt = 32768,
    cache: CacheOpt = None,
    no_cache: NoCacheOpt = False,
    api_key: ApiKeyOpt = None,
    timeout: TimeoutOpt = 600.0,
    max_retries: RetriesOpt = 5,
    dtype: DtypeOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """TSE accuracy: right when the *mean per-token* log p(good) > log p(bad) (reference metric).

    The summed variant is reported too (correct_sum; the table's second column). Reported per
    test and per group (subject_verb_agreement, reflexive_anaphora, npi_licensing) and overall.
    The full set is large (158k pairs): try --limit-per-test first.

    Examples:

      negablate eval tse -m /models/smollm2 --start-token '<|endoftext|>' -n 200 --out runs/tse-base

      negablate eval tse --dataset tse-ml -m smollm2@wd --tokenizer /models/smollm2 --test simple_agrmt
    """
    from eval.data import load_tse, load_tse_ml

    loader = load_tse if dataset is TseDataset.tse else load_tse_ml
    opts = {"data": dataset.value, "tests": test, "limit_per_test": limit_per_test,
            "subsample": subsample.value, "seed": seed, "data_dir": str(data_dir) if data_dir else None,
            "batch_size": batch_size, "concurrency": concurrency}
    _pair_command(
        "tse", lambda: _pick(loader(data_dir, test), limit_per_test, subsample, seed), opts,
        dict(server=server, model=model, neuron_set=neuron_set, tokenizer=tokenizer,
             start_token=start_token, api_key=api_key, concurrency=concurrency,
             batch_size=batch_size, max_batch_tokens=max_batch_tokens, cache=cache,
             no_cache=no_cache, timeout=timeout, max_retries=max_retries, quiet=quiet, dtype=dtype),
        out, show_paradigms=True)


@app.command()
def perplexity(
    server: ServerOpt = "http://127.0.0.1:8000",
    model: ModelOpt = ...,  # type: ignore[assignment]
    neuron_set: NeuronSetOpt = None,
    tokenizer: TokenizerOpt = None,
    start_token: StartTokenOpt = None,
    text: Annotated[Optional[Path], typer.Option(
        "--text", help="Text file (default: WikiText-2 raw test under the data root). Lines are read "
                       "as WikiText rows and joined with a blank line, as the reference does.")] = None,
    window: Annotated[Optional[int], typer.Option(
        "--window", "-w", min=2,
        help="Tokens per request, start token included. Default: min(2048, max_model_len - 1) "
             "from the server's /v1/models.")] = None,
    max_windows: Annotated[Optional[int], typer.Option(
        "--max-windows", min=1, help="Only the first N windows (quick runs).")] = None,
    drop_last: Annotated[bool, typer.Option(help="Drop the final, shorter window.")] = False,
    data_dir: DataDirOpt = None,
    out: OutOpt = None,
    concurrency: ConcOpt = 2,
    batch_size: BatchOpt = 4,
    max_batch_tokens: BatchTokOpt = 32768,
    cache: CacheOpt = None,
    no_cache: NoCacheOpt = False,
    api_key: ApiKeyOpt = None,
    timeout: TimeoutOpt = 600.0,
    max_retries: RetriesOpt = 5,
    dtype: DtypeOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Perplexity of running text in fixed windows of tokens, each starting with the start token.

    Every text token is predicted (NLL = mean -log p over all of them, ppl = exp(NLL)).
    Windows are consecutive and non-overlapping; the window (start token included) must
    be shorter than the server's max_model_len.

    Examples:

      negablate eval perplexity -m /models/pythia-160m --max-windows 20 --out runs/ppl-base

      negablate eval perplexity -m pythia-160m@wd1pct --tokenizer /models/pythia-160m -w 1024
    """
    from eval.data import load_wikitext_text
    from eval.tasks import evaluate_perplexity, print_ppl_summary, server_max_model_len, write_ppl_run

    txt = _run_guarded(lambda: load_wikitext_text(text, data_dir=data_dir))
    sc = _scorer(server, model, neuron_set, tokenizer, start_token, api_key, concurrency, batch_size,
                 max_batch_tokens, cache, no_cache, timeout, max_retries, quiet, dtype)
    with sc:
        mml = server_max_model_len(sc)
        if window is None:
            window = 2048 if mml is None else min(2048, mml - 1)
        elif mml is not None and window > mml - 1:
            _fail(f"--window {window} is too long for the server: max_model_len is {mml}, and vLLM "
                  f"needs one token of room; use --window {mml - 1} or less")
        path = str(text) if text else "wikitext-2 raw test (default)"
        opts = {"text": path, "window": window, "max_windows": max_windows, "drop_last": drop_last,
                "batch_size": batch_size, "concurrency": concurrency, "server_max_model_len": mml}
        records, summary = _run_guarded(lambda: evaluate_perplexity(
            sc, txt, window=window, max_windows=max_windows, drop_last=drop_last,
            text_path=path, options=opts))
    d = write_ppl_run(out or _default_out("ppl", model, neuron_set), records, summary)
    print_ppl_summary(summary)
    _note_server_default(summary.run)
    err.print(f"wrote {d}/", highlight=False)


@app.command()
def compare(
    run_a: Annotated[Path, typer.Argument(help="Baseline run directory (A).")],
    run_b: Annotated[Path, typer.Argument(help="Run to compare (B), e.g. the ablated model.")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Where to write comparison.{csv,json,png} (default: RUN_B/compare-<A>).")] = None,
    metric: Annotated[Metric, typer.Option(
        help="Record field compared: correct (the task's metric), correct_sum, correct_mean.")] = Metric.correct,
    n_boot: Annotated[int, typer.Option("--n-boot", min=1, help="Bootstrap replicates.")] = 10000,
    alpha: Annotated[float, typer.Option(min=0.0001, max=0.5, help="1 - CI level.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    level: Annotated[Optional[str], typer.Option(
        help="Level shown (and plotted): paradigm, phenomenon or field. Default: phenomenon / field.")] = None,
    plot: Annotated[bool, typer.Option(help="Write comparison.png.")] = True,
) -> None:
    """Paired comparison of two runs on the same pairs (or windows): B - A.

    Minimal pairs: accuracy delta per group with a paired bootstrap CI and McNemar's
    p-value (uncorrected), and a bar chart of the deltas. Perplexity: both perplexities
    and the NLL difference with a bootstrap CI over windows.

    Example:

      negablate eval compare runs/base runs/wd --out runs/wd-vs-base
    """
    from eval.compare import compare_dirs, plot_deltas, print_comparison, ComparisonResult
    from eval.stats import RunMismatchError

    od = out or (run_b / f"compare-{run_a.resolve().name}")
    try:
        res = compare_dirs(run_a, run_b, od, metric=metric.value, n_boot=n_boot, alpha=alpha,
                           seed=seed, plot=plot)
        if plot and level and isinstance(res, ComparisonResult):
            plot_deltas(res, od / "comparison.png", level=level)
    except (RunMismatchError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    print_comparison(res, level=level)
    err.print(f"wrote {od}/", highlight=False)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":
    main()
