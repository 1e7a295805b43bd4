"""Evaluation data: minimal pairs (BLiMP, TSE) and held-out text (WikiText-2).

Everything here reads the offline copies under the shared data folder (see its
README files); nothing needs a network. Layout expected below the data root::

    blimp/<UID>.jsonl          67 paradigms x 1,000 pairs (BLiMP)
    tse/<test>.jsonl           22 Marvin & Linzen tests, the reference code's set
    tse-ml/<test>_all.jsonl    15 agreement tests, Newman et al. (2021) packaging
    wikitext-2/raw/wiki.test.raw, wikitext-2/test.txt, wikitext-2/valid.txt

The data root is ``$NEGABLATE_DATA_DIR`` if set, else ``../shared/data``
relative to the repository root (the folder that holds the ``eval`` package),
looked up at call time, so setting the variable after import works.

How the three sources map onto :class:`MinimalPair` (``source``: ``paradigm``,
``pair_id``, ``phenomenon``, ``field``):

- ``blimp``: ``UID``, ``int(pairID)``, ``linguistics_term``, ``field`` as in the data
  (one paradigm, ``principle_A_case_2``, says ``syntax/semantics``).
- ``tse``: the test (file) name, the file's ``pair_id`` (0-based), the test name again,
  and the test's group: ``subject_verb_agreement``, ``reflexive_anaphora`` or
  ``npi_licensing``.
- ``tse-ml``: the file stem without ``_all`` (so names match ``tse``), the 0-based
  index of the pair in its file (the files carry no id), the test name,
  ``subject_verb_agreement``.

``good``/``bad`` are ``sentence_good``/``sentence_bad`` everywhere. For TSE this
is the reference code's ``(tuple[0], tuple[-1])``: for the four NPI tests
``sentence_bad`` is the "most ..." sentence and the distractor-licensor
sentence (``tuple[1]``) is kept apart in :attr:`MinimalPair.bad_intrusive`,
never scored by default. The TSE ``condition`` (e.g. ``sing_MS_MV``) and the
TSE-ML ``label`` (-2: correct verb plural, -1: singular) are carried along.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from vllm_negablate.settings import get_settings
from pydantic import BaseModel, ConfigDict

__all__ = [
    "BLIMP_PARADIGMS",
    "TSE_GROUPS",
    "TSE_ML_TESTS",
    "TSE_TESTS",
    "DataFormatError",
    "DataUnavailableError",
    "MinimalPair",
    "UnknownNameError",
    "default_data_dir",
    "load_blimp",
    "load_blimp_from_hub",
    "load_tse",
    "load_tse_ml",
    "load_wikitext_rows",
    "missing_data",
    "load_wikitext_text",
    "stratified_subsample",
]

Source = Literal["blimp", "tse", "tse-ml"]

DATA_DIR_ENV = "NEGABLATE_DATA_DIR"  # read through vllm_negablate.settings
BLIMP_HUB_DATASET = "nyu-mll/blimp"

# The 67 BLiMP paradigms (= file names, = hub config names), sorted.
BLIMP_PARADIGMS: tuple[str, ...] = (
    "adjunct_island", "anaphor_gender_agreement", "anaphor_number_agreement",
    "animate_subject_passive", "animate_subject_trans", "causative", "complex_NP_island",
    "coordinate_structure_constraint_complex_left_branch",
    "coordinate_structure_constraint_object_extraction", "determiner_noun_agreement_1",
    "determiner_noun_agreement_2", "determiner_noun_agreement_irregular_1",
    "determiner_noun_agreement_irregular_2", "determiner_noun_agreement_with_adj_2",
    "determiner_noun_agreement_with_adj_irregular_1",
    "determiner_noun_agreement_with_adj_irregular_2",
    "determiner_noun_agreement_with_adjective_1", "distractor_agreement_relational_noun",
    "distractor_agreement_relative_clause", "drop_argument", "ellipsis_n_bar_1",
    "ellipsis_n_bar_2", "existential_there_object_raising", "existential_there_quantifiers_1",
    "existential_there_quantifiers_2", "existential_there_subject_raising",
    "expletive_it_object_raising", "inchoative", "intransitive",
    "irregular_past_participle_adjectives", "irregular_past_participle_verbs",
    "irregular_plural_subject_verb_agreement_1", "irregular_plural_subject_verb_agreement_2",
    "left_branch_island_echo_question", "left_branch_island_simple_question",
    "matrix_question_npi_licensor_present", "npi_present_1", "npi_present_2",
    "only_npi_licensor_present", "only_npi_scope", "passive_1", "passive_2",
    "principle_A_c_command", "principle_A_case_1", "principle_A_case_2",
    "principle_A_domain_1", "principle_A_domain_2", "principle_A_domain_3",
    "principle_A_reconstruction", "regular_plural_subject_verb_agreement_1",
    "regular_plural_subject_verb_agreement_2", "sentential_negation_npi_licensor_present",
    "sentential_negation_npi_scope", "sentential_subject_island", "superlative_quantifiers_1",
    "superlative_quantifiers_2", "tough_vs_raising_1", "tough_vs_raising_2", "transitive",
    "wh_island", "wh_questions_object_gap", "wh_questions_subject_gap",
    "wh_questions_subject_gap_long_distance", "wh_vs_that_no_gap",
    "wh_vs_that_no_gap_long_distance", "wh_vs_that_with_gap",
    "wh_vs_that_with_gap_long_distance",
)

# TSE test -> group (stored in MinimalPair.field), after the tse/ README.
TSE_GROUPS: dict[str, str] = {
    **{
        t: "subject_verb_agreement"
        for t in (
            "simple_agrmt", "sent_comp", "vp_coord", "long_vp_coord", "prep_anim",
            "prep_inanim", "subj_rel", "obj_rel_across_anim", "obj_rel_across_inanim",
            "obj_rel_within_anim", "obj_rel_within_inanim", "obj_rel_no_comp_across_anim",
            "obj_rel_no_comp_across_inanim", "obj_rel_no_comp_within_anim",
            "obj_rel_no_comp_within_inanim",
        )
    },
    **{t: "reflexive_anaphora" for t in ("simple_reflexives", "reflexive_sent_comp",
                                          "reflexives_across")},
    **{t: "npi_licensing" for t in ("simple_npi_anim", "simple_npi_inanim",
                                     "npi_across_anim", "npi_across_inanim")},
}
TSE_TESTS: tuple[str, ...] = tuple(sorted(TSE_GROUPS))
TSE_ML_TESTS: tuple[str, ...] = tuple(
    sorted(t for t, g in TSE_GROUPS.items() if g == "subject_verb_agreement")
)
_TSE_ML_SUFFIX = "_all"


# --------------------------------------------------------------------------- errors


class DataFormatError(ValueError):
    """A data file is malformed. The message reads ``<path>:<line>: <problem>``."""

    def __init__(self, path: str | os.PathLike[str], line: int | None, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


class UnknownNameError(ValueError):
    """A requested paradigm or test does not exist; the message lists close matches."""


class DataUnavailableError(RuntimeError):
    """Neither the local copy nor the Hugging Face hub fallback could provide the data."""


# --------------------------------------------------------------------------- model


class MinimalPair(BaseModel):
    """One minimal pair: ``good`` should be more probable than ``bad``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: Source
    paradigm: str  # BLiMP UID, or the TSE test (file) name
    pair_id: int
    good: str
    bad: str
    field: str
    phenomenon: str  # BLiMP linguistics_term, or the TSE test name
    condition: str | None = None  # TSE only, e.g. "sing_MS_MV"
    bad_intrusive: str | None = None  # TSE NPI tests only (tuple[1]); not scored by default
    label: int | None = None  # TSE-ML only: -2 correct verb plural, -1 singular

    @property
    def uid(self) -> str:
        """BLiMP's name for :attr:`paradigm`."""
        return self.paradigm

    @property
    def key(self) -> tuple[str, str, int]:
        """``(source, paradigm, pair_id)``: unique within a benchmark, used to match runs."""
        return (self.source, self.paradigm, self.pair_id)


def _pair(**kw: Any) -> MinimalPair:
    """Build a (validated) MinimalPair. Plain construction is used on purpose:
    pydantic's Rust validator is faster than the pure-Python ``model_construct``."""
    return MinimalPair(**kw)


# --------------------------------------------------------------------------- paths


def repo_root() -> Path:
    """The repository root: the folder that holds the ``eval`` package."""
    return Path(__file__).resolve().parent.parent


def default_data_dir() -> Path:
    """``NEGABLATE_DATA_DIR`` if set, else ``<repo>/../shared/data`` (see vllm_negablate.settings)."""
    return get_settings().data_dir.expanduser()


def _bench_dir(data_dir: str | os.PathLike[str] | None, sub: str) -> Path:
    """``data_dir/sub`` if that exists, else ``data_dir`` itself when it already is the
    benchmark folder (holds ``*.jsonl``); ``data_dir/sub`` (possibly missing) otherwise."""
    root = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    cand = root / sub
    if cand.is_dir():
        return cand
    if root.is_dir() and root.name == sub and any(root.glob("*.jsonl")):
        return root
    return cand


def _resolve_names(
    requested: Sequence[str] | None, available: Sequence[str], what: str, where: str
) -> list[str]:
    """Validate requested names against ``available`` (order kept, duplicates dropped)."""
    if requested is None:
        return sorted(available)
    if isinstance(requested, str):  # a lone string is an easy mistake; treat it as one name
        requested = [requested]
    avail = set(available)
    out: list[str] = []
    for name in requested:
        if name not in avail:
            close = difflib.get_close_matches(name, sorted(avail), n=5, cutoff=0.6)
            hint = f"; did you mean: {', '.join(close)}?" if close else ""
            raise UnknownNameError(
                f"unknown {what} {name!r}{hint} ({len(avail)} available in {where})"
            )
        if name not in out:
            out.append(name)
    return out


# --------------------------------------------------------------------------- JSONL


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(1-based line number, object)``; whitespace-only lines are skipped."""
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(path, lineno, f"invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataFormatError(
                    path, lineno, f"expected a JSON object, got {type(obj).__name__}"
                )
            yield lineno, obj


def _require(
    obj: dict[str, Any], fields: dict[str, tuple[type, ...]], path: Any, lineno: int | None
) -> None:
    """Check that ``obj`` has each field with exactly one of the given types (so a
    JSON ``true`` never passes for an int); raise :class:`DataFormatError` if not."""
    try:  # fast path: one pass, no diagnostics
        if all(type(obj[f]) in typ for f, typ in fields.items()):
            return
    except KeyError:
        pass
    missing = [f for f in fields if f not in obj]
    if missing:
        raise DataFormatError(
            path, lineno, f"missing field(s) {', '.join(repr(m) for m in missing)}"
        )
    for f, typ in fields.items():
        v = obj[f]
        if type(v) not in typ:
            raise DataFormatError(
                path, lineno, f"field {f!r} has type {type(v).__name__}, expected "
                + " or ".join(t.__name__ for t in typ)
            )


def _as_int(v: Any, field: str, path: Any, lineno: int | None) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        raise DataFormatError(path, lineno, f"field {field!r} is not an integer: {v!r}") from None


def _check_unique(pairs: list[MinimalPair], path: Any) -> None:
    seen: set[int] = set()
    for p in pairs:
        if p.pair_id in seen:
            raise DataFormatError(path, None, f"duplicate pair id {p.pair_id}")
        seen.add(p.pair_id)


# --------------------------------------------------------------------------- BLiMP

_BLIMP_FIELDS: dict[str, tuple[type, ...]] = {
    "sentence_good": (str,),
    "sentence_bad": (str,),
    "field": (str,),
    "linguistics_term": (str,),
    "UID": (str,),
    "pairID": (str, int),
}


def _blimp_pair(obj: dict[str, Any], expected_uid: str, path: Any, lineno: int | None) -> MinimalPair:
    _require(obj, _BLIMP_FIELDS, path, lineno)
    if obj["UID"] != expected_uid:
        raise DataFormatError(
            path, lineno, f"UID {obj['UID']!r} does not match paradigm {expected_uid!r}"
        )
    return _pair(
        source="blimp",
        paradigm=obj["UID"],
        pair_id=_as_int(obj["pairID"], "pairID", path, lineno),
        good=obj["sentence_good"],
        bad=obj["sentence_bad"],
        field=obj["field"],
        phenomenon=obj["linguistics_term"],
    )


def load_blimp(
    data_dir: str | os.PathLike[str] | None = None,
    paradigms: Sequence[str] | None = None,
    *,
    allow_hub: bool = True,
) -> list[MinimalPair]:
    """Load BLiMP pairs, paradigm by paradigm, each in file order.

    ``data_dir`` is the data root holding ``blimp/`` (or the ``blimp`` folder
    itself); ``None`` means :func:`default_data_dir`. ``paradigms=None`` loads all
    67 in sorted order, otherwise the given ones in the given order. Only when the
    local folder is missing (and ``allow_hub``) does it fall back to
    :func:`load_blimp_from_hub`.

    Data caveat: 7 pairs have identical good and bad sentences (``passive_1``
    324, 810; ``principle_A_case_2`` 105, 287, 372, 816, 967). Their scores tie,
    so a strict ``good > bad`` rule counts them wrong, while ``lm_eval``'s
    ``argmax`` (good listed first) counts them right; tiny numeric noise between
    two forward passes can flip either way. They are kept, as in the reference.
    """
    bdir = _bench_dir(data_dir, "blimp")
    if not bdir.is_dir():
        if not allow_hub:
            raise DataUnavailableError(f"BLiMP folder not found: {bdir}")
        try:
            return load_blimp_from_hub(paradigms)
        except DataUnavailableError as e:
            raise DataUnavailableError(f"BLiMP folder not found: {bdir}; {e}") from e
    available = sorted(p.stem for p in bdir.glob("*.jsonl"))
    names = _resolve_names(paradigms, available, "BLiMP paradigm", str(bdir))
    out: list[MinimalPair] = []
    for name in names:
        path = bdir / f"{name}.jsonl"
        pairs = [_blimp_pair(obj, name, path, ln) for ln, obj in _iter_jsonl(path)]
        _check_unique(pairs, path)
        out.extend(pairs)
    return out


def load_blimp_from_hub(paradigms: Sequence[str] | None = None) -> list[MinimalPair]:
    """Load BLiMP from the Hugging Face hub (``nyu-mll/blimp``, split ``train``).

    Needs the optional ``datasets`` package and either network access or a warm
    hub cache. Raises :class:`DataUnavailableError` with the reason otherwise.
    """
    names = _resolve_names(paradigms, BLIMP_PARADIGMS, "BLiMP paradigm", BLIMP_HUB_DATASET)
    try:
        import datasets  # noqa: PLC0415  (optional dependency, imported lazily)
    except ImportError:
        raise DataUnavailableError(
            "BLiMP is not available locally and the hub fallback needs the 'datasets' "
            "package (pip install datasets); or point NEGABLATE_DATA_DIR at a folder "
            "holding blimp/<UID>.jsonl"
        ) from None
    out: list[MinimalPair] = []
    for name in names:
        where = f"hub:{BLIMP_HUB_DATASET}/{name}"
        try:
            ds = datasets.load_dataset(BLIMP_HUB_DATASET, name, split="train")
        except Exception as e:  # network, offline mode, missing cache, ...
            raise DataUnavailableError(
                f"could not load {BLIMP_HUB_DATASET!r} config {name!r} from the hub "
                f"({type(e).__name__}: {e}); offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE) "
                "without a cached copy? Use the local files via NEGABLATE_DATA_DIR instead."
            ) from e
        pairs = [_blimp_pair(dict(row), name, where, i + 1) for i, row in enumerate(ds)]
        _check_unique(pairs, where)
        out.extend(pairs)
    return out


# --------------------------------------------------------------------------- TSE

_TSE_FIELDS: dict[str, tuple[type, ...]] = {
    "phenomenon": (str,),
    "condition": (str,),
    "pair_id": (int,),
    "sentence_good": (str,),
    "sentence_bad": (str,),
}
_TSE_ML_FIELDS: dict[str, tuple[type, ...]] = {
    "sentence_good": (str,),
    "sentence_bad": (str,),
    "label": (int,),
}


def load_tse(
    data_dir: str | os.PathLike[str] | None = None, tests: Sequence[str] | None = None
) -> list[MinimalPair]:
    """Load Marvin & Linzen TSE pairs from ``<data_dir>/tse/<test>.jsonl``.

    ``tests=None`` loads all files in sorted file order (the reference code's
    order: it globs the pickles sorted); otherwise the given tests in order.
    """
    tdir = _bench_dir(data_dir, "tse")
    if not tdir.is_dir():
        raise DataUnavailableError(f"TSE folder not found: {tdir}")
    available = sorted(p.stem for p in tdir.glob("*.jsonl"))
    names = _resolve_names(tests, available, "TSE test", str(tdir))
    out: list[MinimalPair] = []
    for name in names:
        path = tdir / f"{name}.jsonl"
        pairs: list[MinimalPair] = []
        for ln, obj in _iter_jsonl(path):
            _require(obj, _TSE_FIELDS, path, ln)
            if obj["phenomenon"] != name:
                raise DataFormatError(
                    path, ln, f"phenomenon {obj['phenomenon']!r} does not match file name {name!r}"
                )
            intr = obj.get("sentence_bad_intrusive")
            if intr is not None and not isinstance(intr, str):
                raise DataFormatError(path, ln, "field 'sentence_bad_intrusive' is not a string")
            pairs.append(
                _pair(
                    source="tse",
                    paradigm=name,
                    pair_id=obj["pair_id"],
                    good=obj["sentence_good"],
                    bad=obj["sentence_bad"],
                    field=TSE_GROUPS.get(name, "other"),
                    phenomenon=name,
                    condition=obj["condition"],
                    bad_intrusive=intr,
                )
            )
        _check_unique(pairs, path)
        out.extend(pairs)
    return out


def load_tse_ml(
    data_dir: str | os.PathLike[str] | None = None, tests: Sequence[str] | None = None
) -> list[MinimalPair]:
    """Load the Newman et al. (2021) agreement pairs from ``<data_dir>/tse-ml/<test>_all.jsonl``.

    Test names are given without the ``_all`` suffix (with it is accepted too),
    so they match :func:`load_tse`'s names. The files carry no ids: ``pair_id``
    is the 0-based index of the pair in its file. Note that the pairs are the same
    as in ``tse/`` but in a different order (and two files are capitalised and
    punctuated), so ``pair_id`` here does not correspond to ``tse``'s.
    """
    tdir = _bench_dir(data_dir, "tse-ml")
    if not tdir.is_dir():
        raise DataUnavailableError(f"TSE-ML folder not found: {tdir}")

    def strip(stem: str) -> str:
        return stem[: -len(_TSE_ML_SUFFIX)] if stem.endswith(_TSE_ML_SUFFIX) else stem

    files = {strip(p.stem): p for p in tdir.glob("*.jsonl")}
    req = None if tests is None else [strip(t) for t in ([tests] if isinstance(tests, str) else tests)]
    names = _resolve_names(req, sorted(files), "TSE-ML test", str(tdir))
    out: list[MinimalPair] = []
    for name in names:
        path = files[name]
        for i, (ln, obj) in enumerate(_iter_jsonl(path)):
            _require(obj, _TSE_ML_FIELDS, path, ln)
            out.append(
                _pair(
                    source="tse-ml",
                    paradigm=name,
                    pair_id=i,
                    good=obj["sentence_good"],
                    bad=obj["sentence_bad"],
                    field=TSE_GROUPS.get(name, "subject_verb_agreement"),
                    phenomenon=name,
                    label=obj["label"],
                )
            )
    return out


# --------------------------------------------------------------------------- subsampling


def _group_seed(seed: int, label: str) -> int:
    """A 64-bit seed from (seed, group label) via SHA-256: no dependence on Python's
    hash seed, on dict order, or on which other groups exist."""
    digest = hashlib.sha256(f"{int(seed)}\x00{label}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def stratified_subsample(
    pairs: Iterable[MinimalPair],
    limit_per_group: int,
    seed: int,
    key: Callable[[MinimalPair], Hashable] = lambda p: p.paradigm,
) -> list[MinimalPair]:
    """At most ``limit_per_group`` pairs from each group, chosen at random (seeded).

    Groups with no more than ``limit_per_group`` pairs are kept whole. The result
    keeps the input order (so the order within each group is the original one).
    The choice within a group depends only on ``seed``, the group's label
    (``str(key(pair))``) and the group's members in order, so it is reproducible
    across processes and unaffected by adding or removing other groups.
    """
    if limit_per_group < 0:
        raise ValueError(f"limit_per_group must be >= 0, got {limit_per_group}")
    items = list(pairs)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(items):
        groups[str(key(p))].append(i)
    keep = np.zeros(len(items), dtype=bool)
    for label, idx in groups.items():
        if len(idx) <= limit_per_group:
            keep[idx] = True
        else:
            rng = np.random.default_rng(_group_seed(seed, label))
            chosen = rng.choice(len(idx), size=limit_per_group, replace=False)
            keep[np.asarray(idx)[chosen]] = True
    return [p for p, k in zip(items, keep, strict=True) if k]


# --------------------------------------------------------------------------- presence


def missing_data(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    blimp: bool = True,
    tse: bool = True,
    tse_ml: bool = False,
    wikitext: Sequence[str] = ("valid.txt", "test.txt"),
) -> list[str]:
    """The files a run needs that ``data_dir`` lacks (relative paths, sorted; empty: all
    there). Cheap (no file is read), so commands call it before any engine starts: a
    missing test set found after discovery and a server start would cost minutes."""
    root = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    need: list[str] = []
    if blimp:
        need += [f"blimp/{p}.jsonl" for p in BLIMP_PARADIGMS]
    if tse:
        need += [f"tse/{t}.jsonl" for t in TSE_TESTS]
    if tse_ml:
        need += [f"tse-ml/{t}{_TSE_ML_SUFFIX}.jsonl" for t in TSE_ML_TESTS]
    need += [f"wikitext-2/{name}" for name in wikitext]
    return sorted(rel for rel in need if not (root / rel).is_file())


# --------------------------------------------------------------------------- WikiText


def _wikitext_default_path(data_dir: str | os.PathLike[str] | None = None) -> Path:
    base = (Path(data_dir).expanduser() if data_dir is not None else default_data_dir()) / "wikitext-2"
    raw = base / "raw" / "wiki.test.raw"
    return raw if raw.is_file() else base / "test.txt"


def load_wikitext_rows(path: str | os.PathLike[str] | None = None, *,
                       data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The file's lines as the hub's ``wikitext`` rows: each line with its newline
    kept, blank lines as ``""`` (4,358 rows for the test split). Without ``path``: the
    test split under ``data_dir`` (default :func:`default_data_dir`)."""
    p = _wikitext_default_path(data_dir) if path is None else Path(path).expanduser()
    if not p.is_file():
        raise DataUnavailableError(f"WikiText file not found: {p}")
    with p.open("r", encoding="utf-8", newline=None) as fh:
        return [line if line.strip() else "" for line in fh]


def load_wikitext_text(
    path: str | os.PathLike[str] | None = None, *, joiner: str = "\n\n",
    data_dir: str | os.PathLike[str] | None = None,
) -> str:
    """The text of a WikiText-2 split as one string, built the reference code's way.

    ``joiner.join(load_wikitext_rows(path))``: ``"\\n\\n"`` is the reference's rule for
    perplexity (and for its "wikitext2-test" collection); its neuron statistics join
    the train rows with ``" "``. Default path: ``wikitext-2/raw/wiki.test.raw`` under
    :func:`default_data_dir` (falling back to the tokenized ``test.txt``); for the raw
    test split the result is 1,294,336 characters, sha256 ``696cca6b...``, identical
    to joining the hub's ``wikitext-2-raw-v1`` test rows.

    No detokenization is done, on purpose: the hub's *raw* WikiText keeps the
    `` @-@ `` / `` @,@ `` / `` @.@ `` spacing and space-separated punctuation too,
    so the reference perplexities are computed on exactly that text. The tokenized
    files (``test.txt``, ``valid.txt``) differ from raw only in that rare words are
    ``<unk>``; read as they are they stand in for the missing raw splits (e.g.
    ``valid.txt`` to select neurons, raw test to measure).
    """
    return joiner.join(load_wikitext_rows(path, data_dir=data_dir))
