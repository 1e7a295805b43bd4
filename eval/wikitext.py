"""WikiText-2 as text: undoing its tokenization, and the discovery corpus made from it.

The tokenized WikiText-2 files (``valid.txt``, ``test.txt``) write rare words as
``<unk>`` (about 6% of words) and split numbers and hyphens as `` @,@ `` / `` @.@ `` /
`` @-@ ``. The reference code selects neurons on the *raw* text, which keeps that
spacing but has the real words. Only the tokenized valid split is on this machine, so
the discovery corpus is made from it (:func:`discovery_corpus`), either with the
``<unk>`` tokens removed (closest to the reference's raw text) or fully detokenized
(natural text), and evaluation reads a different split (raw test).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

__all__ = ["DISCOVERY_TEXTS", "UNK", "CorpusText", "clean_wikitext_lines", "detokenize_wikitext_line",
           "discovery_corpus"]

UNK = "<unk>"
CorpusText = Literal["unk-removed", "detokenized", "tokenized"]
DISCOVERY_TEXTS: tuple[str, ...] = ("unk-removed", "detokenized", "tokenized")

_WT_MARKERS = {"@-@": "-", "@,@": ",", "@.@": "."}
_NUMBER_JOINERS = frozenset({"@,@", "@.@"})
_CLOSERS = frozenset({".", ",", ";", ":", "!", "?", ")", "]", "}", "%", "'", "...", "’"})
_CLITICS = frozenset({"'s", "n't", "'re", "'ve", "'m", "'ll", "'d", "’s", "n’t"})
_OPENERS = frozenset({"(", "[", "{", "$", "£", "€", "#"})
def detokenize_wikitext_line(tokens: Sequence[str]) -> tuple[str, list[tuple[int, int]], list[str]]:
    """Join one line's WikiText tokens into normal text.

    Returns ``(text, spans, ptb_forms)`` with one entry per *input token*:
    ``spans[i]`` is where token ``i`` ended up in ``text`` and ``ptb_forms[i]`` is
    its form for a PTB tagger. Rules (WikiText's tokenization undone):

    - ``@-@ @,@ @.@`` -> ``- , .`` glued to both neighbours;
    - closing punctuation (``. , ; : ! ? ) ] } % '``) and clitics (``'s n't 're 've
      'm 'll 'd``) glue to the previous token;
    - opening brackets and currency signs (``( [ { $ £ € #``) glue to the next;
    - double quotes alternate, per line, between opening (glued to the next token,
      PTB form ``````) and closing (glued to the previous, PTB form ``''``).
    """
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    forms: list[str] = []
    pos = 0
    glue_next = True  # no space before the first token
    quote_open = False
    for tok in tokens:
        render = _WT_MARKERS.get(tok, tok)
        attach = glue_next or tok in _WT_MARKERS or tok in _CLOSERS or tok.lower() in _CLITICS
        glue_next = False
        form = render
        if tok == '"':
            if quote_open:  # closing quote
                attach = True
                form = "''"
            else:
                glue_next = True
                form = "``"
            quote_open = not quote_open
        if tok in _OPENERS or tok in _WT_MARKERS:
            glue_next = True
        if not attach:
            parts.append(" ")
            pos += 1
        parts.append(render)
        spans.append((pos, pos + len(render)))
        forms.append(form)
        pos += len(render)
    return "".join(parts), spans, forms


def clean_wikitext_lines(lines: Iterable[str], mode: CorpusText) -> list[str]:
    """The lines of a tokenized WikiText file, cleaned as ``mode`` says (one output line
    per input line, newline kept, blank lines as they are).

    - ``tokenized``: unchanged;
    - ``unk-removed``: every ``<unk>`` token dropped, all else byte for byte (so the
      text is the reference's raw text less the rare words);
    - ``detokenized``: ``<unk>`` dropped, then :func:`detokenize_wikitext_line`
      (``guest-starring``, ``1,000``, ``Teddy's``); a line keeps its leading space.
    """
    if mode not in DISCOVERY_TEXTS:
        raise ValueError(f"unknown corpus text {mode!r}: use one of {', '.join(DISCOVERY_TEXTS)}")
    out = []
    for line in lines:
        if mode == "tokenized" or not line.strip():
            out.append(line)
            continue
        body, newline = (line[:-1], "\n") if line.endswith("\n") else (line, "")
        if mode == "unk-removed":
            out.append(" ".join(t for t in body.split(" ") if t != UNK) + newline)
        else:
            lead = body[: len(body) - len(body.lstrip(" "))]
            text, _, _ = detokenize_wikitext_line([t for t in body.split() if t != UNK])
            out.append(lead + text + newline)
    return out


def discovery_corpus(source: Path, dest: Path, mode: CorpusText) -> dict[str, object]:
    """Write ``source`` cleaned as ``mode`` to ``dest`` (atomically) and return what was
    done: counts of lines, words and ``<unk>`` tokens removed, and both files' sha256,
    for the run's record."""
    raw = source.read_text(encoding="utf-8")
    lines = clean_wikitext_lines(raw.splitlines(keepends=True), mode)
    text = "".join(lines)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(dest)
    words = raw.split()
    return {
        "source": str(source), "source_sha256": hashlib.sha256(raw.encode()).hexdigest(),
        "text": mode, "path": str(dest), "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "lines": len(lines), "words_in": len(words),
        "unk_removed": 0 if mode == "tokenized" else sum(w == UNK for w in words),
    }
