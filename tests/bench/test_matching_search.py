"""bench/matching_search.py: both searches replayed on a recorded curve, numbers checked."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# the standard preset's first random-pool search on SmolLM2-135M (top 1%, 45,600 candidates)
HISTORY = [[0.010526, 31.1749], [0.042105, 31.7844], [0.168421, 36.0975], [0.084211, 32.2188],
           [0.119101, 33.4093], [0.141623, 35.2175], [0.129868, 34.6586], [0.124364, 33.4937]]


def _bench():
    spec = importlib.util.spec_from_file_location("matching_search", REPO / "bench" / "matching_search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _set_file(path: Path, history, target: float, tol: float) -> Path:
    path.write_text(json.dumps({
        "entries": [{"layer": 0, "neurons": list(range(10))}],
        "provenance": {"source": {"history": history, "target_perplexity": target, "tolerance": tol,
                                  "candidates": 45_600}}}))
    return path


def test_replay_on_a_recorded_curve(tmp_path, capsys):
    bench = _bench()
    recorded = _set_file(tmp_path / "recorded.json", HISTORY, 34.2559, 0.01)
    smooth = _set_file(tmp_path / "smooth.json",  # log-linear in log f
                       [[f, 30.0 * (f / 0.01) ** 0.05] for f in (0.01, 0.04, 0.16)], 30.0 * 5 ** 0.05, 1e-4)
    res = bench.main([str(recorded), str(smooth), "--max-iter", "20", "--json", str(tmp_path / "out.json")])
    rec, smo = res["rows"]
    # the recorded curve: halving spends 9 calls, interpolation 8 (the run it came from had 8)
    assert (rec["interpolate"]["evaluations"], rec["halve"]["evaluations"]) == (8, 9)
    assert rec["interpolate"]["converged"] and rec["halve"]["converged"]
    assert abs(rec["interpolate"]["gap"]) <= 0.01 and rec["recorded_evaluations"] == 8
    # the smooth curve (linear between its 3 points, tolerance 1e-4): three bracketing calls,
    # then interpolation needs 3 more, halving 5
    assert (smo["interpolate"]["evaluations"], smo["halve"]["evaluations"]) == (6, 8)
    assert smo["interpolate"]["converged"] and smo["halve"]["converged"]
    for name in ("interpolate", "halve"):
        assert res["mean_evaluations"][name] == pytest.approx(statistics.fmean(
            r[name]["evaluations"] for r in res["rows"]))
    assert res["ratio"] == pytest.approx(res["mean_evaluations"]["halve"] / res["mean_evaluations"]["interpolate"])
    assert json.loads((tmp_path / "out.json").read_text()) == json.loads(json.dumps(res))
    out = capsys.readouterr().out
    assert f"ratio halve / interpolate: {res['ratio']:.2f}x" in out
