"""``negablate neurons control`` / ``show`` on a synthetic statistics directory (no engine)."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from vllm_negablate.cli import app
from vllm_negablate.discovery.pipeline import STAT_KEYS, save_statistics
from vllm_negablate.neuron_set import NeuronSet

runner = CliRunner()
LAYERS, WIDTH = 3, 300


@pytest.fixture
def stats_dir(tmp_path):
    rng = np.random.default_rng(0)
    stats = {k: rng.gamma(2.0, size=(LAYERS, WIDTH)) for k in STAT_KEYS}
    stats["count"] = np.full(LAYERS, 1000)
    meta = {"model": {"architecture": "LlamaForCausalLM", "num_layers": LAYERS,
                      "intermediate_size": WIDTH},
            "num_tokens": 1000, "corpus": "/x/valid.txt", "top_percent": 1.0,
            "vllm_version": "0.32.0"}
    save_statistics(tmp_path, stats, meta)
    return tmp_path


def _run(*args):
    result = runner.invoke(app, ["neurons", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def test_control_random_layer_first_k(stats_dir):
    _run("control", stats_dir, "--kind", "random", "--seed", "2")
    r = NeuronSet.load(stats_dir / "sets" / "random-top1-s2.json")
    # top 1% of 300 distinct scores: 299 - floor(0.99 * 299) = 3 per layer
    assert r.counts_per_layer() == {0: 3, 1: 3, 2: 3} and r.provenance.seed == 2
    _run("control", stats_dir, "--kind", "layer", "--layer", "1", "--top", "2%")
    one = NeuronSet.load(stats_dir / "sets" / "wasserstein-top2-layer1.json")
    assert one.layers() == [1] and one.num_neurons() == 299 - int(0.98 * 299)
    _run("control", stats_dir, "--kind", "first-k", "--k", "2")
    first = NeuronSet.load(stats_dir / "sets" / "wasserstein-top1-first2.json")
    assert first.layers() == [0, 1]
    bad = runner.invoke(app, ["neurons", "control", str(stats_dir), "--kind", "nope"])
    assert bad.exit_code == 2 and "unknown --kind" in bad.output


def test_show_dir_and_set(stats_dir):
    _run("control", stats_dir, "--kind", "random")
    out = _run("show", stats_dir)
    assert "random-top1-s0" in out and (stats_dir / "w1_hist.png").stat().st_size > 1000
    out = _run("show", stats_dir / "sets" / "random-top1-s0.json")
    assert "random" in out and (stats_dir / "sets" / "random-top1-s0.png").exists()
