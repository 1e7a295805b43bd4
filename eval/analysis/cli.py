"""`negablate analyze ...`: the analyses beyond the main table, one command each."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    help="Analyses beyond the main table: POS surprisal, layer sweeps, training dynamics, "
    "non-grammatical lm_eval tasks, bfloat16 against float32. Each writes JSON + CSV + PNG and resumes from its cache.",
    no_args_is_help=True,
)

for _module in ("pos", "layers", "dynamics", "lm_tasks", "precision", "oracle_check"):
    importlib.import_module(f"eval.analysis.{_module}").register(app)
