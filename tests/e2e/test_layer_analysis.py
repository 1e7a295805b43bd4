"""Layer analysis and training dynamics end to end (tiny Llama checkpoints, CPU, float32).

Two local checkpoints of one 3-layer tiny Llama: ``step0`` (random init) and
``step40`` (40 more Adam steps on WikiText-2 valid text). ``analyze dynamics`` runs
``neurons find`` + ``negablate serve`` + BLiMP/perplexity for both (4 engine starts);
``analyze layers`` then reuses ``step0``'s discovery and evaluates per-layer and
first-k sets on a server this module starts bare, uploading the sets through the
control API (``--server`` + ``--admin-key``): 5 engine starts in all.

Checked against independent computations: the per-layer / first-k set files hold
exactly the discovery set's neurons of those layers (and the top-p% of the W1 scores);
first-k with k = L scores exactly like the full set; the baseline perplexity and
pair log-probabilities, and the full set's ablated ones, equal transformers'
(``HFAblationOracle``); the drops in both reports equal baseline minus ablated
accuracy recomputed from the run files.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from eval.analysis.dynamics import Checkpoint, DynamicsConfig, parse_checkpoint, run_dynamics
from eval.analysis.layers import LayersConfig, run_layers
from eval.analysis.sweep import EvalSettings
from eval.data import default_data_dir

TOP = 5.0  # 128 neurons per layer: 7 selected
NUM_LAYERS = 3
SETTINGS = EvalSettings(blimp_per_paradigm=2, ppl_windows=2, window=128, seed=0, n_boot=500)
LOGPROB_TOL = 2e-4  # fp32 vLLM vs transformers: per-token mean / perplexity NLL (observed: ~1e-8)
SUM_TOL = 2e-4  # summed over a sentence's ~10-30 tokens (observed: ~2e-5)
ADMIN_KEY = "test-admin-key"

needs_data = pytest.mark.skipif(
    not (default_data_dir() / "blimp").is_dir() or not (default_data_dir() / "wikitext-2" / "test.txt").is_file(),
    reason=f"BLiMP / WikiText-2 not found under {default_data_dir()} (set NEGABLATE_DATA_DIR)",
)


# --------------------------------------------------------------------------- fast: parsing


def test_parse_checkpoint_specs(tmp_path):
    assert parse_checkpoint("step1000=EleutherAI/pythia-70m@step1000") == Checkpoint(
        label="step1000", step=1000, source="EleutherAI/pythia-70m", revision="step1000")
    assert parse_checkpoint("final:143000=EleutherAI/pythia-70m") == Checkpoint(
        label="final", step=143000, source="EleutherAI/pythia-70m")
    odd = tmp_path / "ckpt@v2"
    odd.mkdir()
    ck = parse_checkpoint(f"run-3_step20={odd}")
    assert (ck.label, ck.step, ck.source, ck.revision) == ("run-3_step20", 20, str(odd), None)
    for bad in ("step1", "early=/x", "a b1=/x", "x:y=/x", "step1=", "step1=org/m@"):
        with pytest.raises(ValueError):
            parse_checkpoint(bad)


# --------------------------------------------------------------------------- fixtures


def _train_further(src: Path, dst: Path, steps: int) -> Path:
    """``src`` after ``steps`` Adam steps on WikiText-2 valid text, saved as a checkpoint.

    Config and tokenizer files are copied unchanged (the tiny builder patches them for
    vLLM); only the weights are replaced.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.train()
    text = (default_data_dir() / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:60_000]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    seq = 64
    batches = torch.tensor([[2, *ids[i:i + seq - 1]] for i in range(0, (len(ids) // seq) * seq, seq)
                            if len(ids[i:i + seq - 1]) == seq - 1])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for s in range(steps):
        batch = batches[(s * 8) % len(batches):][:8]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    shutil.copytree(src, dst)
    (dst / "negablate_tiny_model.json").unlink(missing_ok=True)
    tmp = dst.parent / (dst.name + ".weights")
    model.eval().save_pretrained(tmp, safe_serialization=True)
    shutil.copyfile(tmp / "model.safetensors", dst / "model.safetensors")
    shutil.rmtree(tmp)
    return dst


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from vllm_negablate.testing.tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("ckpts")
    a = build_tiny_model("llama", root / "step0", seed=0, num_layers=NUM_LAYERS)
    b = _train_further(a, root / "step40", steps=40)
    return a, b


@pytest.fixture(scope="module")
def dynamics(checkpoints, tmp_path_factory):
    a, b = checkpoints
    out = tmp_path_factory.mktemp("dynamics")
    cfg = DynamicsConfig(
        checkpoints=[parse_checkpoint(f"step40={b}"), parse_checkpoint(f"step0={a}")],  # sorted by step
        out=out, top_percent=TOP, discovery_tokens=2048, discovery_window=256, settings=SETTINGS,
        kv_cache_mb=64, cpu_bind_all_cores=False,
    )
    t0 = time.monotonic()
    result = run_dynamics(cfg)
    print(f"\ndynamics: {time.monotonic() - t0:.0f} s")
    return cfg, result


@pytest.fixture(scope="module")
def layers(checkpoints, dynamics, tmp_path_factory):
    """Layer analysis of step0 against a bare server started here (sets uploaded by the analysis)."""
    from server.launcher import ServerProcess
    from vllm_negablate.testing.engines import TINY_SERVER

    a, _ = checkpoints
    out = tmp_path_factory.mktemp("layers")
    server = ServerProcess(a, "--admin-key", ADMIN_KEY, "--max-sets", "16", log_path=out / "server.log",
                           **TINY_SERVER)
    server.start(timeout=600)
    try:
        cfg = LayersConfig(model=a, discovery=dynamics[0].out / "checkpoints" / "step0" / "discovery",
                           out=out / "report", settings=SETTINGS, server=server.url, admin_key=ADMIN_KEY,
                           cpu_bind_all_cores=False)
        t0 = time.monotonic()
        result = run_layers(cfg)
        print(f"\nlayers: {time.monotonic() - t0:.0f} s")
        yield cfg, result, server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def oracle(checkpoints):
    from vllm_negablate.oracle import HFAblationOracle

    return HFAblationOracle(checkpoints[0])


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines() if line]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _overall(run_dir: Path) -> dict:
    return next(r for r in _summary(run_dir)["accuracy"] if r["level"] == "overall")


# --------------------------------------------------------------------------- dynamics


@pytest.mark.slow
@pytest.mark.timeout(1800)  # sets up the module's engines: slow on a loaded machine
@needs_data
def test_dynamics_rows_drops_and_outputs(dynamics):
    cfg, result = dynamics
    assert [(c.label, c.step) for c in result.checkpoints] == [("step0", 0), ("step40", 40)]
    data = json.loads((cfg.out / "dynamics.json").read_text())
    assert [c["step"] for c in data["checkpoints"]] == [0, 40]
    with (cfg.out / "dynamics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["label"], int(r["step"])) for r in rows] == [("step0", 0), ("step40", 40)]
    assert (cfg.out / "dynamics.png").stat().st_size > 20_000
    for c, row in zip(result.checkpoints, rows, strict=True):
        runs = cfg.out / "checkpoints" / c.label / "runs"
        base = _overall(runs / "baseline" / "blimp")
        assert c.baseline.blimp_acc == base["accuracy"]
        for name in ("wasserstein-negative", "random-negative"):
            abl = _overall(runs / name / "blimp")
            r = c.conditions[name]
            assert r.blimp_drop == pytest.approx(base["accuracy"] - abl["accuracy"], abs=1e-12)
            assert float(row[f"{name}_drop"]) == pytest.approx(r.blimp_drop, abs=1e-9)
            assert r.blimp_drop_ci_lo <= r.blimp_drop <= r.blimp_drop_ci_hi
            assert r.neurons == 7 * NUM_LAYERS
            assert _summary(runs / name / "blimp")["run"]["neuron_set"] == r.set_name
        print(f"\n{c.label}: baseline acc {c.baseline.blimp_acc:.4f} ppl {c.baseline.ppl:.2f}; " + "; ".join(
            f"{n} drop {r.blimp_drop:+.4f} [{r.blimp_drop_ci_lo:+.4f}, {r.blimp_drop_ci_hi:+.4f}] "
            f"ppl x{r.ppl_ratio:.4f}" for n, r in c.conditions.items()))
    # each checkpoint was found and served on its own weights: training lowered perplexity,
    # and the two discoveries chose different neurons
    p0, p1 = (c.baseline.ppl for c in result.checkpoints)
    assert p1 < 0.8 * p0
    sets = [json.loads((cfg.out / "checkpoints" / lb / "discovery" / "sets" / "wasserstein-top5.json")
                       .read_text())["entries"] for lb in ("step0", "step40")]
    assert sets[0] != sets[1]


# --------------------------------------------------------------------------- layers


@pytest.mark.slow
@pytest.mark.timeout(1800)  # sets up the module's engines: slow on a loaded machine
@needs_data
def test_one_row_per_layer_and_per_k(layers):
    cfg, result, _ = layers
    assert result.num_layers == NUM_LAYERS
    assert [r.index for r in result.layers] == list(range(NUM_LAYERS))
    assert [r.index for r in result.first_k] == list(range(1, NUM_LAYERS + 1))
    data = json.loads((cfg.out / "layers.json").read_text())
    assert len(data["layers"]) == NUM_LAYERS and len(data["first_k"]) == NUM_LAYERS
    with (cfg.out / "layers.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["kind"] for r in rows] == ["baseline", "full"] + ["layer"] * NUM_LAYERS + ["first-k"] * NUM_LAYERS
    assert (cfg.out / "layers.png").stat().st_size > 20_000
    n = result.baseline.blimp_n
    assert n == 67 * 2 and all(r.blimp_n == n for r in [result.full, *result.layers, *result.first_k])
    print("\n" + "\n".join(f"{r.label:>9}: neurons {r.neurons:2d}  acc {r.blimp_acc:.4f}  drop "
                           f"{r.blimp_drop:+.4f} [{r.blimp_drop_ci_lo:+.4f}, {r.blimp_drop_ci_hi:+.4f}]  "
                           f"ppl {r.ppl:.3f} (x{r.ppl_ratio:.4f})"
                           for r in [result.baseline, result.full, *result.layers, *result.first_k]))


@pytest.mark.slow
@needs_data
def test_layer_sets_hold_exactly_that_layers_wasserstein_neurons(layers):
    from vllm_negablate.discovery.pipeline import load_statistics
    from vllm_negablate.discovery.wasserstein import top_percent_mask
    from vllm_negablate.neuron_set import NeuronSet

    cfg, result, url = layers
    full = NeuronSet.load(cfg.discovery / "sets" / "wasserstein-top5.json")
    stats, _ = load_statistics(cfg.discovery)
    per_layer = {}
    for i in range(NUM_LAYERS):
        expected = np.flatnonzero(top_percent_mask(stats["w1"][i], TOP)).tolist()
        assert full.layer_bounds(i)[0] == expected and len(expected) == 7
        ns = NeuronSet.load(cfg.out / "sets" / f"wasserstein-top5-layer{i}.json")
        assert ns.layers() == [i] and ns.layer_bounds(i) == full.layer_bounds(i)
        assert ns.model == full.model
        per_layer[i] = expected
        assert result.layers[i].neurons == 7 and result.layers[i].set_name == ns.name
    for k in range(1, NUM_LAYERS + 1):
        ns = NeuronSet.load(cfg.out / "sets" / f"wasserstein-top5-first{k}.json")
        assert ns.layers() == list(range(k))
        assert all(ns.layer_bounds(i) == full.layer_bounds(i) for i in range(k))
    last = NeuronSet.load(cfg.out / "sets" / f"wasserstein-top5-first{NUM_LAYERS}.json")
    assert last.content_hash() == full.content_hash()
    # the sets were uploaded to the bare server: same neurons there
    import httpx

    listed = {s["name"]: s["content_hash"] for s in httpx.get(
        f"{url}/v1/neuron-sets", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]}
    assert listed[f"wasserstein-top5-layer{NUM_LAYERS - 1}"] == NeuronSet.load(
        cfg.out / "sets" / f"wasserstein-top5-layer{NUM_LAYERS - 1}.json").content_hash()


@pytest.mark.slow
@needs_data
def test_first_k_with_all_layers_scores_like_the_full_set(layers):
    cfg, result, _ = layers
    last, full = result.first_k[-1], result.full
    assert last.neurons == full.neurons == 7 * NUM_LAYERS
    assert (last.blimp_n_correct, last.blimp_acc) == (full.blimp_n_correct, full.blimp_acc)
    assert last.ppl == pytest.approx(full.ppl, rel=1e-6)
    runs = cfg.out / "runs"
    a, b = _records(runs / f"first{NUM_LAYERS}" / "blimp"), _records(runs / "full" / "blimp")
    diffs = [abs(x[f] - y[f]) for x, y in zip(a, b, strict=True) for f in ("logprob_good", "logprob_bad")]
    assert max(diffs) < 1e-4
    assert [x["correct"] for x in a] == [y["correct"] for y in b]
    # and the full set does change the scores (else the comparison above is vacuous)
    base = _records(runs / "baseline" / "blimp")
    assert max(abs(x["logprob_good"] - y["logprob_good"]) for x, y in zip(base, b)) > 0.05


@pytest.mark.slow
@needs_data
def test_drops_equal_baseline_minus_ablated_from_the_run_files(layers):
    cfg, result, _ = layers
    runs = cfg.out / "runs"
    base = _records(runs / "baseline" / "blimp")
    acc0 = sum(r["correct"] for r in base) / len(base)
    assert acc0 == pytest.approx(result.baseline.blimp_acc, abs=1e-12)
    for r in [result.full, *result.layers, *result.first_k]:
        recs = _records(runs / r.label / "blimp")
        assert [(x["paradigm"], x["pair_id"]) for x in recs] == [(x["paradigm"], x["pair_id"]) for x in base]
        acc = sum(x["correct"] for x in recs) / len(recs)
        assert r.blimp_drop == pytest.approx(acc0 - acc, abs=1e-12)
        assert r.blimp_drop_ci_lo <= r.blimp_drop <= r.blimp_drop_ci_hi
        ppl = json.loads((runs / r.label / "perplexity" / "summary.json").read_text())["ppl"]
        assert r.ppl_ratio == pytest.approx(ppl / result.baseline.ppl, rel=1e-12)


@pytest.mark.slow
@needs_data
def test_baseline_and_full_set_match_transformers(layers, oracle):
    """Perplexity NLL and pair log-probabilities recomputed with transformers (and the
    oracle's own clamp hooks for the full set), from the token ids tokenized here."""
    from eval.data import load_wikitext_text
    from eval.tokenizers import LocalTokenizer
    from eval.tasks import make_windows
    from vllm_negablate.neuron_set import NeuronSet

    cfg, result, _ = layers
    tok = LocalTokenizer(cfg.model)
    full = NeuronSet.load(cfg.out / "sets" / "wasserstein-top5.json")
    from eval.analysis.sweep import ppl_text_path

    assert ppl_text_path(SETTINGS).name == "wiki.test.raw"  # the reference's raw test text
    tokens = tok.encode_batch([load_wikitext_text(ppl_text_path(SETTINGS))])[0]
    wins = [w for _, w in make_windows(tokens, SETTINGS.window, tok.start_token_id)[: SETTINGS.ppl_windows]]
    worst = {}
    for label, ns, row in (("baseline", None, result.baseline), ("full", full, result.full)):
        nll = -math.fsum(lp for w in wins for lp in oracle.prompt_logprobs(w, ns)[1:])
        n = sum(len(w) - 1 for w in wins)
        assert row.ppl_tokens == n
        assert math.log(row.ppl) == pytest.approx(nll / n, abs=LOGPROB_TOL)
        worst[label] = [abs(math.log(row.ppl) - nll / n), 0.0]
        recs = _records(cfg.out / "runs" / label / "blimp")
        for r in recs[::20]:  # 7 pairs spread over the paradigms
            for side in ("good", "bad"):
                ids = tok.encode_batch([r[f"sentence_{side}"]])[0]
                ref = oracle.prompt_logprobs([tok.start_token_id, *ids], ns)[1:]
                assert r[f"n_tokens_{side}"] == len(ref)
                err = abs(r[f"logprob_{side}"] - math.fsum(ref))
                assert err < SUM_TOL
                assert r[f"mean_logprob_{side}"] == pytest.approx(math.fsum(ref) / len(ref), abs=LOGPROB_TOL)
                worst[label][1] = max(worst[label][1], err)
    print(f"\n|vLLM - transformers|: ppl NLL / max pair sum: {worst}")
    assert abs(result.full.ppl_ratio - 1.0) > 1e-3  # the ablation moves perplexity (a random model's
    # perplexity may go either way)


@pytest.mark.slow
@needs_data
def test_rerun_resumes_without_any_engine(dynamics, layers):
    """Everything is done: a rerun starts no engine and reproduces the same numbers."""
    cfg, result = dynamics
    t0 = time.monotonic()
    again = run_dynamics(cfg)
    assert time.monotonic() - t0 < 30
    assert again.checkpoints == result.checkpoints
    lcfg, lresult, _ = layers
    t0 = time.monotonic()
    lagain = run_layers(lcfg.model_copy(update={"server": None, "admin_key": None}))  # would start one
    assert time.monotonic() - t0 < 30
    assert lagain.layers == lresult.layers and lagain.first_k == lresult.first_k
