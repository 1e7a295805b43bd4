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
pack and the data folder when only the pack is there.

Float64 sums are kept as they are (no rounding: a tie stays a tie), about 24 bytes a pair.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PACK_FILE", "PACK_FORMAT", "PackError", "pack_missing", "pack_pairs", "unpack_missing", "pack_windows", "read_pack"]

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


@functools.lru_cache(maxsize=8)
def _pairs_by_key(source: str, data_dir: str | None) -> dict[tuple[str, int], Any]:
    """Every pair of ``source`` in the data folder, by (paradigm, pair id); cached per
    process (a report rebuilds dozens of runs from the same benchmark)."""
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


def read_pack(path: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None) -> list[Any]:
    """The records a pack stands for: :class:`~eval.tasks.PairResult` (pairs, their
    sentences and labels looked up in ``data_dir``, default :func:`eval.data.default_data_dir`)
    or :class:`~eval.tasks.WindowResult`. :class:`PackError` if a pair is not in the data."""
    from eval.tasks import WindowResult, pair_result

    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise PackError(f"{p}: not a records pack ({exc})") from None
    if int(arrays.get("format", -1)) != PACK_FORMAT:
        raise PackError(f"{p}: pack format {arrays.get('format')}, this version reads {PACK_FORMAT}")
    kind = str(arrays["kind"])
    if kind == "windows":
        return [WindowResult(window_id=int(w), start=int(s), n_tokens=int(n), nll_sum=float(x))
                for w, s, n, x in zip(arrays["window_id"], arrays["start"], arrays["n_tokens"],
                                      arrays["nll_sum"], strict=True)]
    if kind != "pairs":
        raise PackError(f"{p}: unknown pack kind {kind!r}")
    root = None if data_dir is None else str(data_dir)
    sources, paradigms = [str(s) for s in arrays["sources"]], [str(s) for s in arrays["paradigms"]]
    metric = str(arrays["metric"])
    out = []
    for si, pi, pid, (lg, lb), (ng, nb) in zip(arrays["source_index"], arrays["paradigm_index"], arrays["pair_id"],
                                               arrays["logprob"], arrays["n_tokens"], strict=True):
        source, paradigm = sources[int(si)], paradigms[int(pi)]
        pair = _pairs_by_key(source, root).get((paradigm, int(pid)))
        if pair is None:
            raise PackError(f"{p}: pair {source}/{paradigm}/{int(pid)} is not in the data folder "
                            f"({root or 'the default'}): rebuilt from other data than it was scored on?")
        out.append(pair_result(pair, float(lg), int(ng), float(lb), int(nb), metric))
    return out


def pack_missing(folder: str | os.PathLike[str]) -> list[Path]:
    """Pack every finished run under ``folder`` (``summary.json`` beside ``records.jsonl``)
    that has no ``records.npz`` yet, or an older one than its records; the runs packed.

    Why: runs written before packs existed, or by an older checkout still running, get
    their committed form when the report is rebuilt (:func:`eval.report.rebuild`)."""
    from eval.tasks import RECORDS_FILE, SUMMARY_JSON, PairResult, WindowResult

    done = []
    for records in sorted(Path(folder).rglob(RECORDS_FILE)):
        run, pack = records.parent, records.parent / PACK_FILE
        summary = run / SUMMARY_JSON
        if not summary.is_file() or (pack.is_file() and pack.stat().st_mtime >= records.stat().st_mtime):
            continue
        meta = json.loads(summary.read_text(encoding="utf-8"))
        lines = [line for line in records.read_text(encoding="utf-8").splitlines() if line.strip()]
        if meta.get("run", {}).get("task") == "perplexity":
            pack_windows(pack, [WindowResult.model_validate_json(line) for line in lines])
        else:
            pack_pairs(pack, [PairResult.model_validate_json(line) for line in lines], meta["metric"])
        done.append(run)
    return done


def unpack_missing(folder: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Rebuild ``records.jsonl`` of every run under ``folder`` that has only its pack (a
    fresh clone), from the data folder ``data_dir`` (default :func:`eval.data.default_data_dir`);
    the runs rebuilt."""
    from eval.tasks import RECORDS_FILE, load_records

    done = []
    for pack in sorted(Path(folder).rglob(PACK_FILE)):
        if not (pack.parent / RECORDS_FILE).is_file():
            load_records(pack.parent, data_dir)
            done.append(pack.parent)
    return done
