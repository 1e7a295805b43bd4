"""records.npz: a run's records without the data, rebuilt exactly from it and the data folder.

The committed form of a result folder's runs (:mod:`eval.run_pack`): a fresh clone reads
the same records as the machine that scored them, every float bit for bit, ties and
decisions included; a pack that does not match the data is refused, naming the pair."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from eval import data as D
from eval.data import load_blimp, load_tse, stratified_subsample
from eval.run_pack import PACK_FILE, PackError, read_pack
from eval.tasks import (
    PairRunSummary,
    PerplexitySummary,
    RunInfo,
    WindowResult,
    accuracy_rows,
    group_keys_for,
    load_records,
    pack_runs,
    pair_result,
    unpack_runs,
    write_pair_run,
    write_ppl_run,
)

DATA = D.default_data_dir()


def _need(sub: str) -> None:
    if not (DATA / sub).is_dir():
        pytest.skip(f"shared data folder {DATA / sub} is absent (set NEGABLATE_DATA_DIR to the data root)")


def _info(task: str) -> RunInfo:
    return RunInfo(task=task, created="2026-12-01T00:00:00+00:00", server="test", model="m", base_model="m",
                   neuron_set=None, set_via=None, tokenizer={}, echo_mode="test")


def _scored(pairs, metric: str, seed: int):
    """Records as scoring makes them, from random sums and counts; pair 0 ties exactly."""
    rng = np.random.default_rng(seed)
    out = []
    for i, p in enumerate(pairs):
        ng, nb = (int(x) for x in rng.integers(3, 20, size=2))
        sg, sb = (float(x) for x in -rng.random(2) * 40)
        if i == 0:
            sb, nb = sg, ng
        out.append(pair_result(p, sg, ng, sb, nb, metric))
    return out


def _write(run: Path, task: str, records) -> None:
    gk = list(group_keys_for(task))
    write_pair_run(run, records, PairRunSummary(
        run=_info(task), metric="sum" if task == "blimp" else "mean", n_pairs=len(records),
        n_ties=sum(r.tie for r in records), group_keys=gk, accuracy=accuracy_rows(records, gk, "correct"),
        accuracy_sum=accuracy_rows(records, gk, "correct_sum"),
        accuracy_mean=accuracy_rows(records, gk, "correct_mean")))


@pytest.mark.parametrize(("task", "loader"), [("blimp", load_blimp), ("tse", load_tse)])
def test_pairs_rebuilt_exactly_from_pack_and_data(tmp_path, task, loader):
    _need(task)
    pairs = stratified_subsample(loader(DATA), 3, seed=1)
    records = _scored(pairs, "sum" if task == "blimp" else "mean", seed=2)
    run = tmp_path / task
    _write(run, task, records)
    original = (run / "records.jsonl").read_text()
    (run / "records.jsonl").unlink()  # what a clone has: the committed pack and summary

    rebuilt = load_records(run, DATA)
    assert rebuilt == [json.loads(line) for line in original.splitlines()]
    assert (run / "records.jsonl").read_text() == original  # written back, byte for byte
    assert rebuilt[0]["tie"] and not rebuilt[0]["correct"]
    assert sum(r["correct"] for r in rebuilt) == sum(r.correct for r in records)
    # the pack is the numbers only: well under the records' size (sentences left out)
    assert (run / PACK_FILE).stat().st_size < 0.25 * len(original.encode())
    assert (run / PACK_FILE).stat().st_size < 40 * len(records) + 2048


def test_windows_rebuilt_exactly(tmp_path):
    recs = [WindowResult(window_id=i, start=2047 * i, n_tokens=2047, nll_sum=math.pi * 1000 + i / 3)
            for i in range(4)]
    run = tmp_path / "ppl"
    write_ppl_run(run, recs, PerplexitySummary(
        run=_info("perplexity"), text_path="t", text_sha256="0", text_tokens=8188, window=2048, n_windows=4,
        n_tokens=8188, nll=1.0, ppl=math.e, bits_per_token=1 / math.log(2)))
    (run / "records.jsonl").unlink()
    assert load_records(run) == [r.model_dump() for r in recs]


def test_pack_not_matching_the_data_is_refused(tmp_path):
    _need("blimp")
    pairs = stratified_subsample(load_blimp(DATA), 1, seed=0)[:5]
    records = _scored(pairs, "sum", seed=3)
    records[3] = records[3].model_copy(update={"pair_id": 10**6})
    run = tmp_path / "blimp"
    _write(run, "blimp", records)
    (run / "records.jsonl").unlink()
    with pytest.raises(PackError, match=rf"blimp/{records[3].paradigm}/1000000 is not in the data folder"):
        load_records(run, DATA)
    assert not (run / "records.jsonl").exists()  # nothing half-written


def test_not_a_pack(tmp_path):
    (tmp_path / PACK_FILE).write_bytes(b"not a zip")
    with pytest.raises(PackError, match="not a records pack"):
        read_pack(tmp_path / PACK_FILE)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_records(tmp_path / "nowhere")


def test_folder_packed_and_unpacked(tmp_path):
    """A run written before packs existed gets one (the report's rebuild does this), and a
    clone's folder with packs only gets its records back, the same bytes."""
    _need("blimp")
    pairs = stratified_subsample(load_blimp(DATA), 2, seed=4)
    run = tmp_path / "runs" / "baseline" / "blimp"
    _write(run, "blimp", _scored(pairs, "sum", seed=5))
    original = (run / "records.jsonl").read_text()
    (run / PACK_FILE).unlink()
    assert pack_runs(tmp_path) == [run]
    assert pack_runs(tmp_path) == []  # up to date: nothing to do
    (run / "records.jsonl").unlink()
    assert unpack_runs(tmp_path, DATA) == [run]
    assert (run / "records.jsonl").read_text() == original
    assert unpack_runs(tmp_path, DATA) == []
