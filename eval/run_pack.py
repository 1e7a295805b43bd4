"""A run's records without the data: ``records.npz``, the form a result folder commits.

Why: ``records.jsonl`` repeats both sentences of every pair (the data stays out of git,
and at 13,400 BLiMP pairs a condition it is ~5 MB), so it is not committed; but the
report's paired statistics need every pair's numbers, and a long run (the powered
reproduction: hours of scoring, spanning sessions on machines that do not keep their
files) must be able to commit what it finished and resume on a fresh clone. So every
finished run also writes ``records.npz``: per pair its key (source, paradigm, pair id) and
the four numbers its record is made of (summed log-probability and token count of each
sentence); per perplexity window the whole record. Everything else of a
:class:`~eval.tasks.PairResult` (the sentences, the phenomenon, the means, the decisions)
follows from the data and those numbers, exactly as :func:`eval.tasks.pair_result` makes
them while scoring. :func:`eval.tasks.load_records` rebuilds ``records.jsonl`` from the
pack and the data folder when only the pack is there. This module is the format only (it
imports nothing of the harness); :mod:`eval.tasks` reads and writes it.

Float64 sums are kept as they are (no rounding: a tie stays a tie), about 24 bytes a pair.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PACK_FILE", "PACK_FORMAT", "PackError", "PackedPairs", "PackedWindows", "pack_pairs", "pack_windows",
           "pairs_by_key", "read_pack"]

PACK_FILE = "records.npz"
PACK_FORMAT = 1


class PackError(ValueError):
    """A pack that cannot be read or does not match the data it is rebuilt from."""


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (a reader never sees half a pack)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        np.savez_compressed(fh, format=np.int64(PACK_FORMAT), **arrays)
    os.replace(tmp, path)


def pack_pairs(path: str | os.PathLike[str], records: Sequence[Any], metric: str) -> None:
    """Write the pack of :class:`~eval.tasks.PairResult` ``records`` scored with ``metric``."""
    sources = sorted({r.source for r in records})
    paradigms = sorted({r.paradigm for r in records})
    s_index = {s: i for i, s in enumerate(sources)}
    p_index = {p: i for i, p in enumerate(paradigms)}
    _save(Path(path), {
        "kind": np.array("pairs"),
        "metric": np.array(metric),
        "sources": np.array(sources, dtype=str),
        "paradigms": np.array(paradigms, dtype=str),
        "source_index": np.array([s_index[r.source] for r in records], dtype=np.int16),
        "paradigm_index": np.array([p_index[r.paradigm] for r in records], dtype=np.int32),
        "pair_id": np.array([r.pair_id for r in records], dtype=np.int64),
        "logprob": np.array([(r.logprob_good, r.logprob_bad) for r in records], dtype=np.float64).reshape(-1, 2),
        "n_tokens": np.array([(r.n_tokens_good, r.n_tokens_bad) for r in records], dtype=np.int32).reshape(-1, 2),
    })


def pack_windows(path: str | os.PathLike[str], records: Sequence[Any]) -> None:
    """Write the pack of :class:`~eval.tasks.WindowResult` ``records`` (the whole of each)."""
    _save(Path(path), {
        "kind": np.array("windows"),
        "window_id": np.array([r.window_id for r in records], dtype=np.int64),
        "start": np.array([r.start for r in records], dtype=np.int64),
        "n_tokens": np.array([r.n_tokens for r in records], dtype=np.int64),
        "nll_sum": np.array([r.nll_sum for r in records], dtype=np.float64),
    })


@dataclass(frozen=True)
class PackedPairs:
    """A pairs pack as read: row i is pair (``sources[i]``, ``paradigms[i]``, ``pair_ids[i]``)."""

    metric: str
    sources: list[str]
    paradigms: list[str]
    pair_ids: list[int]
    logprob: np.ndarray  # [n, 2] float64: summed log-prob of the good and the bad sentence
    n_tokens: np.ndarray  # [n, 2] int: their token counts


@dataclass(frozen=True)
class PackedWindows:
    window_id: list[int]
    start: list[int]
    n_tokens: list[int]
    nll_sum: list[float]


def read_pack(path: str | os.PathLike[str]) -> PackedPairs | PackedWindows:
    """The arrays of a pack; :class:`PackError` if it is not one this version reads."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise PackError(f"{p}: not a records pack ({exc})") from None
    if int(arrays.get("format", -1)) != PACK_FORMAT:
        raise PackError(f"{p}: pack format {arrays.get('format')}, this version reads {PACK_FORMAT}")
    kind = str(arrays.get("kind"))
    if kind == "windows":
        return PackedWindows(window_id=[int(x) for x in arrays["window_id"]], start=[int(x) for x in arrays["start"]],
                             n_tokens=[int(x) for x in arrays["n_tokens"]],
                             nll_sum=[float(x) for x in arrays["nll_sum"]])
    if kind != "pairs":
        raise PackError(f"{p}: unknown pack kind {kind!r}")
    sources, paradigms = [str(x) for x in arrays["sources"]], [str(x) for x in arrays["paradigms"]]
    return PackedPairs(metric=str(arrays["metric"]), sources=[sources[int(i)] for i in arrays["source_index"]],
                       paradigms=[paradigms[int(i)] for i in arrays["paradigm_index"]],
                       pair_ids=[int(x) for x in arrays["pair_id"]], logprob=arrays["logprob"],
                       n_tokens=arrays["n_tokens"])


@functools.lru_cache(maxsize=8)
def pairs_by_key(source: str, data_dir: str | None) -> dict[tuple[str, int], Any]:
    """Every :class:`~eval.data.MinimalPair` of ``source`` in the data folder, by (paradigm,
    pair id); cached per process (a report rebuilds dozens of runs from one benchmark)."""
    from eval.data import load_blimp, load_tse, load_tse_ml

    if source == "blimp":
        pairs = load_blimp(data_dir, allow_hub=False)
    elif source == "tse":
        pairs = load_tse(data_dir)
    elif source == "tse-ml":
        pairs = load_tse_ml(data_dir)
    else:
        raise PackError(f"unknown pair source {source!r}")
    return {(p.paradigm, p.pair_id): p for p in pairs}
