"""The README's result tables say what the committed reports say.

The README pastes its tables from ``python -m eval.report FOLDER --print VIEW``. A report
rebuilt as a long run goes on (new conditions, more draws) can change rows the README still
shows; this test finds every README table whose header is one of those views and checks
each of its rows against the rows the view prints from the committed report.json files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.report.markdown import SECTIONS

ROOT = Path(__file__).resolve().parents[2]
REPORTS = sorted((ROOT / "docs" / "results").glob("**/report.json"))


def _markdown_tables(text: str) -> list[list[tuple[int, str]]]:
    """Runs of consecutive ``|`` lines, each line with its 1-based number."""
    tables: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("|"):
            current.append((number, line))
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def _printed_rows() -> dict[str, tuple[str, set[str]]]:
    """Header line -> (view, every body row that view prints for any committed report)."""
    rows: dict[str, tuple[str, set[str]]] = {}
    for view, render in SECTIONS.items():
        for report in REPORTS:
            try:
                lines = [line for line in render(json.loads(report.read_text())) if line.startswith("|")]
            except KeyError:  # an archived report from before the view existed
                continue
            if len(lines) >= 2:
                rows.setdefault(lines[0], (view, set()))[1].update(lines[2:])
    return rows


def test_the_markdown_table_reader_splits_tables_on_other_lines():
    text = "intro\n| a | b |\n|---|---|\n| 1 | 2 |\n\n| c |\n|---|\n"
    assert _markdown_tables(text) == [[(2, "| a | b |"), (3, "|---|---|"), (4, "| 1 | 2 |")],
                                      [(6, "| c |"), (7, "|---|")]]


@pytest.mark.skipif(not REPORTS, reason="no committed reports")
def test_every_pasted_result_row_is_what_its_report_prints():
    printed = _printed_rows()
    checked, stale = 0, []
    for table in _markdown_tables((ROOT / "README.md").read_text()):
        header = table[0][1]
        if header not in printed:
            continue  # a hand-made table (settings, routes, measurements)
        view, rows = printed[header]
        for number, line in table[2:]:
            checked += 1
            if line not in rows:
                stale.append(f"README.md:{number} (--print {view}): {line[:120]}")
    assert checked >= 40, f"only {checked} README rows matched a --print view: did the views' headers change?"
    assert not stale, ("README rows that no committed report.json prints (paste them again from "
                       "`python -m eval.report FOLDER --print VIEW`):\n" + "\n".join(stale))
