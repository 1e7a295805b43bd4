"""One start-token rule: discovery, perplexity matching, evaluation and the analyses agree.

Three real model directories, built from a tiny llama (its tokenizer: eos 1, bos 2):

* ``plain``: the HF directory as built, so the tokenizer's BOS (2) starts everything;
* ``embedded``: the same files fetched as the embedded ``smollm2-135m`` (the converter is
  replaced by a copy), so the marker records SmolLM2's ``<|endoftext|>`` id 0 while the
  tokenizer's BOS is still 2: the marker must win everywhere;
* ``eos_only``: the tokenizer files without a BOS, so EOS (1) starts everything.

Every consumer is asked with real files; nothing here starts a vLLM engine.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from eval.scoring import CompletionsScorer
from eval.tokenizers import LocalTokenizer, TokenizerError
from vllm_negablate import cli_neurons, models
from vllm_negablate import start_token as st
from vllm_negablate.discovery import matching, pipeline
from vllm_negablate.discovery.corpus import corpus_windows
from vllm_negablate.discovery.errors import DiscoveryError
from vllm_negablate.testing.tiny_models import BOS_ID, EOS_ID, build_tiny_model

SMOL_START = models.get_spec("smollm2-135m").start_token_id  # <|endoftext|>
EXPECTED = {"plain": BOS_ID, "embedded": SMOL_START, "eos_only": EOS_ID}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WINDOW = 16


class _Stop(Exception):
    """Raised by a stub once it has seen the windows a code path built."""


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("start-token")
    plain = build_tiny_model("llama", root / "plain")

    def copy_converter(spec: Any, out_dir: Path, dtype: str, progress: Any) -> dict[str, Any]:
        for p in plain.iterdir():
            if p.is_file():
                shutil.copy2(p, out_dir / p.name)
        return {"distribution": spec.distribution, "version": "0.0-test",
                "gguf_file": spec.gguf_file, "gguf_sha256": "0" * 64}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "_CONVERTER", copy_converter)
        embedded = models.fetch_model("smollm2-135m", cache_dir=root / "cache", progress=False)

    eos_only = root / "eos_only"
    eos_only.mkdir()
    for name in TOKENIZER_FILES:
        path = plain / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        if name != "tokenizer.json":
            data.pop("bos_token", None)
        (eos_only / name).write_text(json.dumps(data))
    return {"plain": plain, "embedded": embedded, "eos_only": eos_only}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("The keys to the cabinet are on the table.\n\n" * 20)
    return path


def _hf_tokenizer(d: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d))


def _fake_llm(d: Path) -> Any:
    """What discovery and perplexity matching read from an offline ``vllm.LLM``."""
    tok = _hf_tokenizer(d)
    config = SimpleNamespace(model=str(d), max_model_len=WINDOW + 1, dtype="float32")
    engine = SimpleNamespace(model_config=config, engine_core=SimpleNamespace(shutdown=lambda: None))
    return SimpleNamespace(llm_engine=engine, get_tokenizer=lambda: tok)


def test_fixture_dirs_disagree_where_they_should(dirs):
    """The embedded dir's tokenizer still says BOS 2: only the marker makes it 0."""
    assert st.read_special_tokens(dirs["embedded"]).bos_token_id == BOS_ID
    assert _hf_tokenizer(dirs["embedded"]).bos_token_id == BOS_ID
    assert models.read_marker(dirs["embedded"])["start_token"] == "<|endoftext|>"
    assert SMOL_START == 0 != BOS_ID
    assert _hf_tokenizer(dirs["eos_only"]).bos_token_id is None
    assert _hf_tokenizer(dirs["eos_only"]).eos_token_id == EOS_ID


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_rule_and_models_agree(dirs, kind):
    d, want = dirs[kind], EXPECTED[kind]
    source = {"plain": "bos", "embedded": "marker", "eos_only": "eos"}[kind]
    assert st.resolve_start_token(d) == st.StartToken(want, source)
    assert st.start_token_id(d) == want
    assert models.start_token_id(d) == want
    assert models.recorded_start_token(d) == (want if kind == "embedded" else None)


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_eval_and_analyses_agree(dirs, kind):
    d, want = dirs[kind], EXPECTED[kind]
    assert LocalTokenizer(d).start_token_id == want  # pos analysis, no explicit token
    assert LocalTokenizer(d / "tokenizer.json").start_token_id == want
    # reproduce / layers / dynamics pass the recorded token explicitly: same answer
    assert LocalTokenizer(d, start_token=models.recorded_start_token(d)).start_token_id == want
    # sweep / tasks read scorer.tokenizer.start_token_id (the model dir as tokenizer)
    scorer = CompletionsScorer("http://127.0.0.1:9", str(d), cache=False, progress=False)
    assert scorer.tokenizer.start_token_id == want
    assert scorer.tokenizer.describe()["start_token_id"] == want


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_discovery_windows_agree(dirs, corpus, kind):
    d, want = dirs[kind], EXPECTED[kind]
    cut = corpus_windows(_hf_tokenizer(d), d, corpus, WINDOW, max_tokens=200)
    assert cut.start_id == want and len(cut.windows) > 3
    assert [w[0] for w in cut.windows] == [want] * len(cut.windows)
    assert all(want not in w[1:] for w in cut.windows)  # the text itself has no specials


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_find_neurons_sends_windows_with_the_rule_token(dirs, corpus, kind, monkeypatch):
    d, want = dirs[kind], EXPECTED[kind]
    seen: list[list[int]] = []

    def run_observed(llm: Any, windows: Any, *args: Any, **kwargs: Any) -> Any:
        seen.extend(list(w) for w in windows)
        raise _Stop

    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))  # no engine needed
    monkeypatch.setattr(pipeline, "fingerprint_of_llm", lambda llm: None)
    monkeypatch.setattr(pipeline, "run_observed", run_observed)
    with pytest.raises(_Stop):
        pipeline.find_neurons(_fake_llm(d), corpus, window_tokens=WINDOW, max_tokens=200,
                              use_tqdm=False)
    assert len(seen) > 3 and {w[0] for w in seen} == {want}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_perplexity_matching_windows_agree(dirs, corpus, kind, monkeypatch):
    d, want = dirs[kind], EXPECTED[kind]
    seen: list[list[int]] = []

    def offline_perplexity(llm: Any, windows: Any) -> float:
        seen.extend(list(w) for w in windows)
        raise _Stop

    monkeypatch.setattr(cli_neurons, "_make_llm", lambda model, **kw: _fake_llm(Path(model)))
    monkeypatch.setattr(matching, "offline_perplexity", offline_perplexity)
    with pytest.raises(_Stop):
        cli_neurons._perplexity_matched(
            None, {"model_path": str(d)}, None, corpus, 200, WINDOW, 0.01, 4, 0, False, 1,
            "float32", 64)
    assert len(seen) > 3 and {w[0] for w in seen} == {want}


def test_explicit_start_token_still_wins(dirs):
    assert LocalTokenizer(dirs["embedded"], start_token=str(BOS_ID)).start_token_id == BOS_ID
    assert LocalTokenizer(dirs["embedded"], start_token="<eos>").start_token_id == EOS_ID
    assert LocalTokenizer(dirs["embedded"]).bos_token_id == BOS_ID  # described, not used


def test_hub_id_uses_the_tokenizer_object_only_as_fallback(dirs):
    eos_tok = SimpleNamespace(bos_token_id=None, eos_token_id=7)
    assert st.resolve_start_token("org/model", fallback=lambda: eos_tok) == st.StartToken(7, "eos")
    # a local directory's files decide, whatever object the caller holds
    assert st.start_token_id(dirs["embedded"], fallback=lambda: eos_tok) == SMOL_START
    assert st.start_token_id(dirs["plain"], fallback=lambda: eos_tok) == BOS_ID
    with pytest.raises(st.StartTokenError, match="neither a BOS nor an EOS"):
        st.start_token_id("org/model")
    with pytest.raises(st.StartTokenError):
        st.start_token_id("org/model", fallback=lambda: SimpleNamespace())


def test_no_bos_no_eos_is_a_clear_error(dirs, tmp_path):
    d = tmp_path / "bare"
    d.mkdir()
    shutil.copy2(dirs["plain"] / "tokenizer.json", d / "tokenizer.json")
    with pytest.raises(st.StartTokenError, match="neither a BOS nor an EOS"):
        st.start_token_id(d)
    with pytest.raises(TokenizerError, match="--start-token"):
        LocalTokenizer(d)
    with pytest.raises(DiscoveryError, match="neither a BOS nor an EOS"):
        corpus_windows(None, d, tmp_path / "unused.txt", WINDOW)


def test_vocabulary_lookup_forms(tmp_path):
    """Ids come from added tokens, a dict vocabulary, or a Unigram list (id = index)."""
    d = tmp_path / "unigram"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps({
        "added_tokens": [{"id": 9, "content": "<s>"}],
        "model": {"type": "Unigram", "vocab": [["<unk>", 0.0], ["</s>", 0.0], ["a", -1.0]]},
    }))
    (d / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    assert st.read_special_tokens(d) == st.SpecialTokens("<s>", 9, "</s>", 1)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
    assert st.resolve_start_token(d) == st.StartToken(1, "eos")  # BOS not in the vocabulary
    (d / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(st.StartTokenError, match="invalid JSON"):
        st.read_special_tokens(d)


def test_module_is_light():
    """Importable without torch or transformers (the eval package is torch-free)."""
    import subprocess

    code = ("import sys, vllm_negablate.start_token; "
            "bad = [m for m in ('torch', 'transformers', 'vllm') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
