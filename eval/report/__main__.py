"""``python -m eval.report FOLDER``: rebuild a reproduce folder's report from its files;
``--print main|head-to-head|draws|draws-pooled|draws-groups|sweep|tse-fields|premise|lm-tasks``: print that table from its report.json instead
(Markdown, as in REPORT.md: the README's tables are pasted from here)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from eval.report import ReportWouldLoseResults, rebuild
from eval.report.markdown import SECTIONS


def main(
    folder: Path = typer.Argument(..., help="A `negablate reproduce` output folder (holds config.json)."),
    print_table: str | None = typer.Option(
        None, "--print", help=f"Print one table of FOLDER/report.json ({', '.join(SECTIONS)}) instead of rebuilding."),
) -> None:
    if print_table is not None:
        if print_table not in SECTIONS:
            raise typer.BadParameter(f"--print {print_table!r}: use one of {', '.join(SECTIONS)}")
        report = folder / "report.json"
        if not report.is_file():
            raise typer.BadParameter(f"{report} does not exist: rebuild it first (python -m eval.report {folder})")
        print("\n".join(SECTIONS[print_table](json.loads(report.read_text()))))
        return
    if not (folder / "config.json").is_file():
        raise typer.BadParameter(f"{folder} has no config.json: not a `negablate reproduce` folder")
    try:
        print(rebuild(folder))
    except ReportWouldLoseResults as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


if __name__ == "__main__":
    typer.run(main)
