"""The discovery corpus: WikiText-2 valid with its `<unk>` tokens removed, or detokenized."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from eval.data import default_data_dir
from eval.wikitext import clean_wikitext_lines, discovery_corpus
from vllm_negablate.discovery.recipes import standard_sets
from vllm_negablate.neuron_set import ModelFingerprint

LINES = [" \n", " = Robert <unk> = \n", " \n",
         " The 1 @,@ 000 guest @-@ stars , and <unk> 's dog ( born 1990 ) . \n", "\n"]


def test_unk_removed_drops_only_the_unk_tokens():
    out = clean_wikitext_lines(LINES, "unk-removed")
    assert out == [" \n", " = Robert = \n", " \n",
                   " The 1 @,@ 000 guest @-@ stars , and 's dog ( born 1990 ) . \n", "\n"]
    assert clean_wikitext_lines(LINES, "tokenized") == LINES


def test_detokenized_is_natural_text():
    out = clean_wikitext_lines(LINES, "detokenized")
    assert out[1] == " = Robert =\n"
    assert out[3] == " The 1,000 guest-stars, and's dog (born 1990).\n"
    assert out[0] == " \n" and out[4] == "\n"  # blank lines kept: the joiner sees the same rows


def test_unknown_text_is_refused():
    with pytest.raises(ValueError, match="unk-removed"):
        clean_wikitext_lines(LINES, "pretty")  # type: ignore[arg-type]


def test_corpus_file_and_its_record(tmp_path):
    src = tmp_path / "valid.txt"
    src.write_text("".join(LINES))
    info = discovery_corpus(src, tmp_path / "out" / "c.txt", "unk-removed")
    text = (tmp_path / "out" / "c.txt").read_text()
    assert "<unk>" not in text and text.count("\n") == len(LINES)
    assert info["unk_removed"] == 2 and info["lines"] == len(LINES)
    assert info["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert info["source_sha256"] == hashlib.sha256("".join(LINES).encode()).hexdigest()


@pytest.mark.skipif(not (default_data_dir() / "wikitext-2" / "valid.txt").is_file(), reason="no WikiText-2")
def test_real_valid_split_loses_exactly_its_unks(tmp_path):
    src = default_data_dir() / "wikitext-2" / "valid.txt"
    info = discovery_corpus(src, tmp_path / "c.txt", "unk-removed")
    words_in = src.read_text().split()
    words_out = (tmp_path / "c.txt").read_text().split()
    assert info["unk_removed"] == words_in.count("<unk>") > 10_000  # ~6% of 214k words
    assert words_out == [w for w in words_in if w != "<unk>"]


def test_one_discovery_gives_every_p_its_sets():
    fp = ModelFingerprint(architecture="LlamaForCausalLM", num_layers=2, intermediate_size=200)
    w1 = np.random.default_rng(1).random((2, 200))
    sets = standard_sets(w1, fp, [5, 1, 5.0], seed=2)
    assert list(sets) == ["wasserstein-top5", "wasserstein-top5-positive", "random-top5-s2",
                          "wasserstein-top1", "wasserstein-top1-positive", "random-top1-s2"]
    for p, per_layer in ((5, 10), (1, 2)):
        top = sets[f"wasserstein-top{p}"]
        assert top.counts_per_layer() == {0: per_layer, 1: per_layer}
        for layer, e in enumerate(top.entries):
            assert set(e.neurons) == set(np.argsort(w1[layer])[-per_layer:].tolist())
        rnd = sets[f"random-top{p}-s2"]
        assert rnd.counts_per_layer() == top.counts_per_layer()
        assert not any(set(a.neurons) & set(b.neurons) for a, b in zip(rnd.entries, top.entries, strict=True))
    assert set(sets["wasserstein-top1"].entries[0].neurons) <= set(sets["wasserstein-top5"].entries[0].neurons)
