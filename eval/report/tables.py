"""The report's CSV files: flat rows for spreadsheets, pandas and R."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

TABLE_COLUMNS = ("condition", "kind", "top", "set", "neurons", "mode", "blimp_acc", "blimp_n", "blimp_delta",
                 "blimp_ci_lo", "blimp_ci_hi", "blimp_p", "blimp_mde", "tse_acc", "tse_n", "tse_delta",
                 "tse_ci_lo", "tse_ci_hi", "tse_p", "tse_mde", "ppl", "ppl_ratio", "ppl_tokens")


def write_csv(rows: list[dict[str, Any]], path: Path, columns: tuple[str, ...] = TABLE_COLUMNS) -> Path:
    """Rows as flat CSV (a delta ``[d, lo, hi]`` as three columns) for spreadsheets and pandas."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            flat = {k: r.get(k) for k in columns}
            for task in ("blimp", "tse"):
                delta = r.get(f"{task}_delta")
                if delta:
                    flat[f"{task}_delta"], flat[f"{task}_ci_lo"], flat[f"{task}_ci_hi"] = delta
            writer.writerow(flat)
    return path


TSE_FIELD_COLUMNS = ("condition", "metric", "field", "n", "acc_baseline", "acc", "delta", "ci_lo", "ci_hi", "p")
PREMISE_COLUMNS = ("layer", "group", "neurons", "w1", "share_h_negative", "share_z_negative", "frac_h_negative")
HEAD_TO_HEAD_COLUMNS = ("top", "control", "control_kind", "draw", "task", "source", "n", "acc_wasserstein", "acc_control",
                        "diff", "ci_lo", "ci_hi", "p", "mde", "verdict")
DRAW_COLUMNS = ("condition", "draw", "seed", "set", "neurons", "blimp_acc", "blimp_n", "blimp_delta", "blimp_ci_lo",
                "blimp_ci_hi", "blimp_p", "blimp_mde", "tse_acc", "tse_n", "tse_delta", "tse_ci_lo", "tse_ci_hi",
                "tse_p", "tse_mde", "ppl", "ppl_ratio", "ppl_tokens")
HEAD_TO_HEAD_GROUP_COLUMNS = ("top", "control", "control_kind", "draw", "task", "group", "n", "acc_wasserstein",
                              "acc_control", "diff", "ci_lo", "ci_hi", "p", "mde", "verdict")


def group_rows(head_to_head: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each head-to-head comparison's per-group rows, flat, with the comparison's keys."""
    return [{**{k: r[k] for k in ("top", "control", "control_kind", "draw", "task")}, **g}
            for r in head_to_head for g in r.get("groups", [])]


def read_premise_csv(path: Path) -> list[dict[str, Any]]:
    """The premise rows a report wrote to ``premise.csv`` (empty when there is none).

    The premise is computed from ``discovery/stats.npz``, which is too large to commit; a
    clone rebuilds its report from the committed ``premise.csv`` instead of dropping the
    section. ``csv`` writes floats with ``repr``, so the numbers come back exactly."""
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [{"layer": r["layer"], "group": r["group"], "neurons": int(r["neurons"]),
                 **{k: float(r[k]) for k in PREMISE_COLUMNS[3:]}} for r in csv.DictReader(fh)]
