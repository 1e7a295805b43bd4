"""Tests for eval.data: loaders of the shared offline data, errors, subsampling."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from eval import data as D
from eval.data import (
    DataFormatError,
    DataUnavailableError,
    MinimalPair,
    UnknownNameError,
    load_blimp,
    load_tse,
    load_tse_ml,
    stratified_subsample,
)

REPO = Path(__file__).resolve().parents[2]
DATA = D.default_data_dir()


def _need(sub: str) -> Path:
    path = DATA / sub
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent (set NEGABLATE_DATA_DIR to the data root)")
    return path


def _first_obj(path: Path) -> dict:
    with path.open(encoding="utf-8") as fh:
        return json.loads(fh.readline())


# --------------------------------------------------------------------------- defaults


def test_default_data_dir_env_and_fallback(monkeypatch, tmp_path):
    monkeypatch.setenv("NEGABLATE_DATA_DIR", str(tmp_path))
    assert D.default_data_dir() == tmp_path
    monkeypatch.delenv("NEGABLATE_DATA_DIR")
    assert D.default_data_dir() == (REPO.parent / "shared" / "data").resolve()
    assert D.repo_root() == REPO


def test_eval_package_does_not_import_torch_or_vllm():
    code = (
        "import sys, eval.data, eval.stats; "
        "bad = [m for m in ('torch', 'vllm') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --------------------------------------------------------------------------- BLiMP


def test_blimp_one_paradigm_real():
    _need("blimp")
    pairs = load_blimp(DATA, ["adjunct_island"])
    assert len(pairs) == 1000
    assert [p.pair_id for p in pairs] == list(range(1000))
    p = pairs[0]
    assert p == MinimalPair(
        source="blimp",
        paradigm="adjunct_island",
        pair_id=0,
        good="Who should Derek hug after shocking Richard?",
        bad="Who should Derek hug Richard after shocking?",
        field="syntax",
        phenomenon="island_effects",
    )
    assert p.uid == "adjunct_island"
    assert p.key == ("blimp", "adjunct_island", 0)
    # the blimp folder itself is accepted as data_dir, and env var default works
    assert load_blimp(DATA / "blimp", ["adjunct_island"])[999] == pairs[999]


def test_blimp_all_real():
    _need("blimp")
    pairs = load_blimp()
    assert len(pairs) == 67_000
    paradigms = {p.paradigm for p in pairs}
    assert paradigms == set(D.BLIMP_PARADIGMS)
    per_term = Counter()
    for name in paradigms:
        terms = {p.phenomenon for p in pairs if p.paradigm == name}
        assert len(terms) == 1
        per_term[terms.pop()] += 1
    # README: 13 linguistics_term values with these paradigm counts
    assert per_term == {
        "anaphor_agreement": 2, "argument_structure": 7, "binding": 7, "control_raising": 5,
        "determiner_noun_agreement": 8, "ellipsis": 2, "filler_gap_dependency": 7,
        "irregular_forms": 2, "island_effects": 8, "npi_licensing": 7, "quantifiers": 4,
        "s-selection": 2, "subject_verb_agreement": 6,
    }
    fields = Counter(p.field for p in pairs)
    assert fields["syntax/semantics"] == 1000  # principle_A_case_2, kept as in the data
    # known data oddity: 7 pairs whose two sentences are identical
    same = sorted((p.paradigm, p.pair_id) for p in pairs if p.good == p.bad)
    assert same == [("passive_1", 324), ("passive_1", 810)] + [
        ("principle_A_case_2", i) for i in (105, 287, 372, 816, 967)
    ]


def test_blimp_order_and_unknown_name():
    _need("blimp")
    pairs = load_blimp(DATA, ["wh_island", "adjunct_island", "wh_island"])
    assert len(pairs) == 2000  # duplicate request dropped
    assert pairs[0].paradigm == "wh_island" and pairs[1000].paradigm == "adjunct_island"
    with pytest.raises(UnknownNameError, match="adjunct_islnd.*did you mean: adjunct_island"):
        load_blimp(DATA, ["adjunct_islnd"])


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _blimp_line(i: int, **drop) -> str:
    obj = {
        "sentence_good": f"good {i}.", "sentence_bad": f"bad {i}.", "field": "syntax",
        "linguistics_term": "toy", "UID": "toy", "pairID": str(i),
    }
    for k in drop:
        obj.pop(k)
    return json.dumps(obj)


def test_malformed_json_names_file_and_line(tmp_path):
    path = _write(tmp_path / "blimp" / "toy.jsonl", [_blimp_line(0), '{"sentence_good": "x",'])
    with pytest.raises(DataFormatError) as ei:
        load_blimp(tmp_path, ["toy"])
    msg = str(ei.value)
    assert msg.startswith(f"{path}:2: invalid JSON")
    assert ei.value.path == str(path) and ei.value.line == 2


def test_missing_field_names_file_line_and_field(tmp_path):
    # a blank line is skipped but still counted in the line numbers
    path = _write(
        tmp_path / "blimp" / "toy.jsonl",
        [_blimp_line(0), "", _blimp_line(1, sentence_bad=None)],
    )
    with pytest.raises(DataFormatError, match=rf"^{path}:3: missing field\(s\) 'sentence_bad'$"):
        load_blimp(tmp_path, ["toy"])


def test_wrong_type_uid_mismatch_duplicate(tmp_path):
    bdir = tmp_path / "blimp"
    _write(bdir / "toy.jsonl", [_blimp_line(0).replace('"good 0."', "3")])
    with pytest.raises(DataFormatError, match=r"toy.jsonl:1: field 'sentence_good' has type int"):
        load_blimp(tmp_path, ["toy"])
    _write(bdir / "toy.jsonl", [_blimp_line(0).replace('"UID": "toy"', '"UID": "other"')])
    with pytest.raises(DataFormatError, match=r"toy.jsonl:1: UID 'other' does not match"):
        load_blimp(tmp_path, ["toy"])
    _write(bdir / "toy.jsonl", [_blimp_line(0), _blimp_line(0)])
    with pytest.raises(DataFormatError, match="duplicate pair id 0"):
        load_blimp(tmp_path, ["toy"])
    _write(bdir / "toy.jsonl", ["[1, 2]"])
    with pytest.raises(DataFormatError, match=r"toy.jsonl:1: expected a JSON object, got list"):
        load_blimp(tmp_path, ["toy"])


def test_malformed_tse_and_tse_ml(tmp_path):
    p = _write(tmp_path / "tse" / "simple_agrmt.jsonl",
               ['{"phenomenon": "simple_agrmt", "condition": "c", "pair_id": 0, "sentence_good": "a"}'])
    with pytest.raises(DataFormatError, match=rf"^{p}:1: missing field\(s\) 'sentence_bad'"):
        load_tse(tmp_path)
    p = _write(tmp_path / "tse-ml" / "vp_coord_all.jsonl",
               ['{"sentence_good": "a", "sentence_bad": "b", "label": -2}', "not json"])
    with pytest.raises(DataFormatError, match=rf"^{p}:2: invalid JSON"):
        load_tse_ml(tmp_path)


def test_hub_fallback_without_datasets(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataUnavailableError, match=r"BLiMP folder not found.*'datasets' package"):
        load_blimp(tmp_path, ["adjunct_island"])
    with pytest.raises(DataUnavailableError, match="BLiMP folder not found"):
        load_blimp(tmp_path, allow_hub=False)
    with pytest.raises(UnknownNameError, match="did you mean: wh_island"):
        D.load_blimp_from_hub(["wh_islands"])


def test_hub_fallback_with_fake_datasets(monkeypatch, tmp_path):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        if config == "wh_island":
            raise ConnectionError("no network")
        return [json.loads(_blimp_line(i).replace("toy", config)) for i in range(3)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    pairs = load_blimp(tmp_path, ["adjunct_island"])
    assert calls == [("nyu-mll/blimp", "adjunct_island", "train")]
    assert [(p.paradigm, p.pair_id, p.good) for p in pairs] == [
        ("adjunct_island", i, f"good {i}.") for i in range(3)
    ]
    with pytest.raises(DataUnavailableError, match="ConnectionError: no network.*offline"):
        load_blimp(tmp_path, ["wh_island"])


# --------------------------------------------------------------------------- TSE

TSE_COUNTS = {
    "simple_agrmt": 140, "sent_comp": 1680, "vp_coord": 840, "long_vp_coord": 400,
    "prep_anim": 16800, "prep_inanim": 5040, "subj_rel": 11200, "obj_rel_across_anim": 11200,
    "obj_rel_across_inanim": 10080, "obj_rel_within_anim": 11200,
    "obj_rel_within_inanim": 10080, "obj_rel_no_comp_across_anim": 11200,
    "obj_rel_no_comp_across_inanim": 10080, "obj_rel_no_comp_within_anim": 11200,
    "obj_rel_no_comp_within_inanim": 10080, "simple_reflexives": 280,
    "reflexive_sent_comp": 3360, "reflexives_across": 22400, "simple_npi_anim": 120,
    "simple_npi_inanim": 144, "npi_across_anim": 4800, "npi_across_inanim": 5760,
}


def test_tse_all_real_first_pair_per_file():
    tdir = _need("tse")
    pairs = load_tse()
    assert len(pairs) == 158_084
    assert Counter(p.paradigm for p in pairs) == TSE_COUNTS
    # sorted file order, as the reference code globs its pickles
    order = list(dict.fromkeys(p.paradigm for p in pairs))
    assert order == sorted(TSE_COUNTS) == list(D.TSE_TESTS)
    firsts = {}
    for p in pairs:
        firsts.setdefault(p.paradigm, p)
    for name, p in firsts.items():
        raw = _first_obj(tdir / f"{name}.jsonl")
        assert (p.good, p.bad, p.pair_id, p.condition, p.bad_intrusive) == (
            raw["sentence_good"], raw["sentence_bad"], raw["pair_id"], raw["condition"],
            raw.get("sentence_bad_intrusive"),
        )
        assert p.phenomenon == p.paradigm == name and p.source == "tse"
    assert Counter(p.field for p in pairs) == {
        "subject_verb_agreement": 121_220, "reflexive_anaphora": 26_040, "npi_licensing": 10_824,
    }


def test_tse_npi_uses_most_sentence_as_bad():
    _need("tse")
    p = load_tse(DATA, ["simple_npi_anim"])[0]
    assert (p.good, p.bad, p.bad_intrusive, p.condition) == (
        "no authors have ever been popular",
        "most authors have ever been popular",
        "the authors have ever been popular",
        "past",
    )
    q = load_tse(DATA, ["simple_agrmt"])[0]
    assert (q.good, q.bad, q.condition, q.bad_intrusive) == (
        "the author laughs", "the author laugh", "sing_MS_MV", None,
    )
    with pytest.raises(UnknownNameError, match="did you mean: simple_agrmt"):
        load_tse(DATA, ["simple_agrmnt"])


def test_tse_ml_real_first_pair_per_file():
    mdir = _need("tse-ml")
    pairs = load_tse_ml()
    assert len(pairs) == 121_220
    counts = Counter(p.paradigm for p in pairs)
    assert set(counts) == set(D.TSE_ML_TESTS)
    assert counts == {k: v for k, v in TSE_COUNTS.items() if k in D.TSE_ML_TESTS}
    firsts = {}
    for p in pairs:
        firsts.setdefault(p.paradigm, p)
    for name, p in firsts.items():
        raw = _first_obj(mdir / f"{name}_all.jsonl")
        assert (p.good, p.bad, p.label, p.pair_id) == (
            raw["sentence_good"], raw["sentence_bad"], raw["label"], 0,
        )
        assert p.source == "tse-ml" and p.field == "subject_verb_agreement"
    cap = firsts["obj_rel_across_anim"]
    assert (cap.good, cap.bad) == (
        "The authors that the guards like laugh.", "The authors that the guards like laughs.",
    )
    # both spellings of a test name work
    assert load_tse_ml(DATA, ["vp_coord_all"]) == load_tse_ml(DATA, ["vp_coord"])


def test_tse_ml_same_pairs_as_tse_in_other_order():
    _need("tse")
    _need("tse-ml")
    a = [(p.good, p.bad) for p in load_tse(DATA, ["vp_coord"])]
    b = [(p.good, p.bad) for p in load_tse_ml(DATA, ["vp_coord"])]
    assert Counter(a) == Counter(b) and a != b


# --------------------------------------------------------------------------- subsampling


def _toy(groups: dict[str, int]) -> list[MinimalPair]:
    return [
        MinimalPair(source="blimp", paradigm=g, pair_id=i, good=f"{g} {i}", bad="x",
                    field="f", phenomenon="ph")
        for g, n in groups.items() for i in range(n)
    ]


def test_stratified_subsample_counts_order_determinism():
    pairs = _toy({"a": 50, "b": 7, "c": 30})
    sub = stratified_subsample(pairs, 10, seed=1)
    assert Counter(p.paradigm for p in sub) == {"a": 10, "b": 7, "c": 10}
    pos = [pairs.index(p) for p in sub]
    assert pos == sorted(pos)  # original order kept
    assert sub == stratified_subsample(pairs, 10, seed=1)
    assert sub != stratified_subsample(pairs, 10, seed=2)
    # a group's choice does not depend on the other groups or their order
    alone = stratified_subsample([p for p in pairs if p.paradigm == "c"], 10, seed=1)
    assert [p for p in sub if p.paradigm == "c"] == alone
    reordered = [p for p in pairs if p.paradigm != "a"] + [p for p in pairs if p.paradigm == "a"]
    sub2 = stratified_subsample(reordered, 10, seed=1)
    assert sorted(sub2, key=lambda p: p.key) == sorted(sub, key=lambda p: p.key)
    # other keys, limits 0 and larger than every group
    by_ph = stratified_subsample(pairs, 5, seed=0, key=lambda p: p.phenomenon)
    assert len(by_ph) == 5
    assert stratified_subsample(pairs, 0, seed=0) == []
    assert stratified_subsample(pairs, 1000, seed=0) == pairs
    with pytest.raises(ValueError):
        stratified_subsample(pairs, -1, seed=0)


def test_stratified_subsample_independent_of_hash_seed():
    code = (
        "from eval.data import MinimalPair, stratified_subsample as s;"
        "ps=[MinimalPair(source='tse',paradigm=g,pair_id=i,good='g',bad='b',field='f',"
        "phenomenon='p') for g in ('x','y','z') for i in range(40)];"
        "print([p.key for p in s(ps, 4, seed=7)])"
    )
    outs = set()
    for hs in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hs}
        r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                           capture_output=True, text=True, check=True)
        outs.add(r.stdout)
    assert len(outs) == 1


def test_stratified_subsample_real_blimp():
    _need("blimp")
    pairs = load_blimp(DATA, ["adjunct_island", "wh_island", "passive_1"])
    sub = stratified_subsample(pairs, 100, seed=0)
    assert Counter(p.paradigm for p in sub) == {"adjunct_island": 100, "wh_island": 100,
                                               "passive_1": 100}
    ids = [p.pair_id for p in sub if p.paradigm == "wh_island"]
    assert ids == sorted(ids) and len(set(ids)) == 100


# --------------------------------------------------------------------------- WikiText


def test_wikitext_raw_test_matches_reference_string():
    wdir = _need("wikitext-2")
    rows = D.load_wikitext_rows()
    assert len(rows) == 4358 and rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    text = D.load_wikitext_text()
    assert len(text) == 1_294_336
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == (
        "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"
    )
    assert text == D.load_wikitext_text(wdir / "raw" / "wiki.test.raw")


def test_wikitext_tokenized_files():
    wdir = _need("wikitext-2")
    rows = D.load_wikitext_rows(wdir / "test.txt")
    assert len(rows) == 4358 and rows[1] == " = Robert <unk> = \n"
    assert len(D.load_wikitext_rows(wdir / "valid.txt")) == 3760
    assert D.load_wikitext_text(wdir / "test.txt", joiner=" ").startswith("  = Robert <unk> = \n ")
    with pytest.raises(DataUnavailableError):
        D.load_wikitext_rows(wdir / "nope.txt")
