"""The POS surprisal analysis against a real `negablate serve` (tiny Llama, fp32, CPU).

One server for the module, with two sets: a seeded random set (25% of each layer's
neurons, negative mode) and an *empty* set (a condition equal to the baseline, served
through the same per-request ablation path). Checks:

- every per-token baseline and ablated surprisal equals an independent transformers
  computation (``HFAblationOracle``, same token ids re-derived with ``AutoTokenizer``)
  within 2e-4 nats;
- the random set's excess is non-zero, the empty set's is exactly 0;
- tag counts sum to the tokens scored, in the JSON, the CSV and the token rows;
- the PNG/JSON/CSV/JSONL exist and parse; the CLI rerun is answered from the cache.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ADMIN = "pos-admin"
TOL = 2e-4
N_WORDS = 300


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from eval.analysis.tagging import TaggerUnavailableError, load_tagger
    from vllm_negablate.testing.tiny_models import build_tiny_model

    try:  # checked before any engine starts
        load_tagger("auto")
    except TaggerUnavailableError as e:
        pytest.skip(f"no POS tagger here: {e}")

    return build_tiny_model("llama", tmp_path_factory.mktemp("pos") / "llama")


@pytest.fixture(scope="module")
def sets(model_dir):
    from vllm_negablate.neuron_set import NeuronSet
    from vllm_negablate.testing.sets import random_set
    from vllm_negablate.testing.tiny_models import fingerprint_of

    rand = random_set(model_dir, "rand", "negative", fraction=0.25, seed=0)
    empty = NeuronSet(name="empty", model=fingerprint_of(model_dir), entries=[])
    return {"rand": rand, "empty": empty}


@pytest.fixture(scope="module")
def server(model_dir, sets, tmp_path_factory):
    from server.client import NegablateClient
    from server.launcher import ServerProcess
    from vllm_negablate.testing.engines import TINY_SERVER

    root = tmp_path_factory.mktemp("pos-server")
    srv = ServerProcess(model_dir, "--admin-key", ADMIN, "--neuron-sets", str(root / "sets"),
                        log_path=root / "server.log", **TINY_SERVER).start()
    try:
        with NegablateClient(srv.url, admin_key=ADMIN) as c:
            for ns in sets.values():
                c.upload_set(ns)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def run(server, model_dir, tmp_path_factory):
    from eval.analysis.pos import PosConfig, run_pos_analysis

    root = tmp_path_factory.mktemp("pos-run")
    cfg = PosConfig(server=server.url, model="tiny", sets=["rand", "empty"], out=root / "out",
                    tokenizer=str(model_dir), words=N_WORDS, chunk_tokens=96, n_boot=200,
                    cache=root / "cache.sqlite", progress=False, batch_size=8, min_count=5)
    report = run_pos_analysis(cfg)
    return cfg, report


def _token_rows(out: Path) -> list[dict]:
    with (out / "pos_tokens.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_outputs_exist_and_parse(run):
    from eval.analysis.pos import PosReport

    cfg, report = run
    out = Path(cfg.out)
    for name in ("pos.json", "pos.csv", "pos_tokens.jsonl", "pos_chunks.jsonl", "pos_excess.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    again = PosReport.model_validate_json((out / "pos.json").read_text())
    assert [c.condition for c in again.conditions] == ["rand", "empty"]
    assert again.tagger["kind"] in ("spacy", "nltk") and again.tagger == report.tagger
    assert again.settings["chunk_budget_tokens"] == 96 and again.settings["server_max_model_len"] == 512
    with (out / "pos.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == sum(len(c.groups) for c in report.conditions)
    assert {r["condition"] for r in rows} == {"rand", "empty"}
    import matplotlib.image as mpimg

    img = mpimg.imread(out / "pos_excess.png")
    assert img.shape[0] > 300 and img.shape[1] > 500


def test_surprisals_match_transformers(run, model_dir, sets):
    from transformers import AutoTokenizer

    from vllm_negablate.oracle import HFAblationOracle

    cfg, report = run
    out = Path(cfg.out)
    rows = _token_rows(out)
    chunks = [json.loads(line) for line in (out / "pos_chunks.jsonl").read_text().splitlines()]
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    start = report.settings["tokenizer_info"]["start_token_id"]
    assert start == hf_tok.bos_token_id
    by_chunk: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        by_chunk[(r["condition"], r["chunk"])].append(r)
    oracle = HFAblationOracle(model_dir)
    n_checked = 0
    worst = 0.0
    for ch in chunks:
        ids = hf_tok(ch["text"], add_special_tokens=False)["input_ids"]  # independent tokenization
        assert len(ids) == ch["n_tokens"] <= 96
        ref_base = [-v for v in oracle.prompt_logprobs([start, *ids])[1:]]
        ref_rand = [-v for v in oracle.prompt_logprobs([start, *ids], sets["rand"])[1:]]
        for cond, ref_abl in (("rand", ref_rand), ("empty", ref_base)):
            toks = sorted(by_chunk[(cond, ch["chunk"])], key=lambda r: r["i"])
            assert [t["token_id"] for t in toks] == ids
            assert "".join(t["token"] for t in toks) == ch["text"] or all(
                ch["text"][t["start"]:t["end"]] == t["token"] for t in toks)
            for t, rb, ra in zip(toks, ref_base, ref_abl, strict=True):
                worst = max(worst, abs(t["surprisal_baseline"] - rb), abs(t["surprisal_ablated"] - ra))
                assert t["surprisal_baseline"] == pytest.approx(rb, abs=TOL)
                assert t["surprisal_ablated"] == pytest.approx(ra, abs=TOL)
                n_checked += 1
    assert n_checked == 2 * report.data["tokens"]
    print(f"checked {n_checked} token surprisals against transformers; max |diff| = {worst:.2e} nats")


def test_excess_nonzero_for_ablation_and_exactly_zero_for_empty_set(run):
    cfg, report = run
    rows = _token_rows(Path(cfg.out))
    rand = [r["excess"] for r in rows if r["condition"] == "rand"]
    empty = [r["excess"] for r in rows if r["condition"] == "empty"]
    assert len(rand) == len(empty) == report.data["tokens"]
    assert all(e == 0.0 for e in empty)
    assert all(r["surprisal_ablated"] == r["surprisal_baseline"] for r in rows if r["condition"] == "empty")
    assert sum(1 for e in rand if e != 0.0) > 0.95 * len(rand)
    mean_abs = sum(abs(e) for e in rand) / len(rand)
    assert mean_abs > 1e-2
    er = report.condition("empty")
    assert all(g.mean_excess == 0.0 and g.ci_lo == 0.0 and g.ci_hi == 0.0 for g in er.groups)
    rr = report.condition("rand")
    allrow = next(g for g in rr.groups if g.group == "ALL")
    assert allrow.mean_excess == pytest.approx(sum(rand) / len(rand), abs=1e-9)
    assert allrow.ci_lo <= allrow.mean_excess <= allrow.ci_hi
    print(f"rand: mean excess {allrow.mean_excess:+.4f} nats/token over {allrow.n_tokens} tokens "
          f"(95% CI {allrow.ci_lo:+.4f}..{allrow.ci_hi:+.4f}); mean |excess| {mean_abs:.4f}")


def test_tag_counts_sum_to_tokens_scored(run):
    cfg, report = run
    rows = _token_rows(Path(cfg.out))
    n = report.data["tokens"]
    chunks = [json.loads(line) for line in (Path(cfg.out) / "pos_chunks.jsonl").read_text().splitlines()]
    assert n == sum(c["n_tokens"] for c in chunks)
    assert report.data["words"] >= N_WORDS  # whole sentences up to the word budget
    assert sum(report.data["tag_token_counts"].values()) == n
    for c in report.conditions:
        tags = [g for g in c.groups if g.kind == "tag"]
        assert sum(g.n_tokens for g in tags) == n == c.n_tokens
        assert sum(g.share_tokens for g in tags) == pytest.approx(1.0)
        got = Counter(r["tag"] for r in rows if r["condition"] == c.condition)
        assert got == {g.group: g.n_tokens for g in tags}
        if c.condition == "rand":
            assert sum(g.share_excess for g in tags) == pytest.approx(1.0)
    # word-level: every token has a word and the word's text contains the token's visible text
    for r in rows:
        assert r["word"] is not None and r["tag"] != "NONE"
        vis = r["token"].strip()
        if vis and r["tag"] != "PUNCT":
            assert vis in r["word"] or r["word"] in vis, r
    assert {"DET", "ADP", "NOUN", "PUNCT"} <= set(report.data["tag_token_counts"])


def test_cli_rerun_is_served_from_the_cache(run, server, model_dir):
    from typer.testing import CliRunner

    import typer

    from eval.analysis.pos import PosReport, register

    cfg, report = run
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command, so typer keeps "pos" as a subcommand
        pass

    out2 = Path(cfg.out).parent / "out-cli"
    res = CliRunner().invoke(app, [
        "pos", "--server", server.url, "--model", "tiny", "--tokenizer", str(model_dir),
        "--set", "rand", "--set", "empty", "--words", str(N_WORDS), "--chunk-tokens", "96",
        "--n-boot", "200", "--cache", str(cfg.cache), "--batch-size", "8", "--min-count", "5",
        "--out", str(out2), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "mean excess surprisal" in res.output
    again = PosReport.model_validate_json((out2 / "pos.json").read_text())
    for c in [again.baseline["scoring"], *(x.scoring for x in again.conditions)]:
        assert c["requests"] == 0 and c["cache_hits"] == report.data["chunks"]
    assert [g.model_dump() for c in again.conditions for g in c.groups] == [
        g.model_dump() for c in report.conditions for g in c.groups]
    assert (out2 / "pos_tokens.jsonl").read_bytes() == (Path(cfg.out) / "pos_tokens.jsonl").read_bytes()
    assert not math.isnan(again.baseline["mean_surprisal"])
