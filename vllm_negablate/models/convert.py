"""GGUF -> Hugging Face conversion: dequantize a GGUF file into a normal HF directory.

Given a GGUF file on disk, :func:`convert_gguf` dequantizes it with ``transformers``
(and the ``gguf`` package underneath) into ``config.json``, ``model.safetensors`` and
the tokenizer files, patched so that vLLM and older readers load them like any local
model; :func:`gguf_metadata` reads header fields without parsing the whole file. It
knows nothing of where the GGUF came from or where the result is cached: that is
:mod:`vllm_negablate.models.fetch`, which calls this module.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vllm_negablate.models.registry import ModelFetchError

# What a conversion can write (the marker's ``dtype``).
DTYPES = ("float32", "bfloat16")


def _rope_top_level(config: dict[str, Any]) -> None:
    """Add top-level ``rope_theta`` (and Gemma's ``rope_local_base_freq``) for older readers."""
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:  # one set of parameters
        config.setdefault("rope_theta", rope["rope_theta"])
        return
    full = rope.get("full_attention") or {}
    local = rope.get("sliding_attention") or {}
    if "rope_theta" in full:
        config.setdefault("rope_theta", full["rope_theta"])
    if "rope_theta" in local:
        config.setdefault("rope_local_base_freq", local["rope_theta"])


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str,
                 step: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Dequantize ``gguf_path`` into an HF directory ``out_dir`` (weights, config, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    step = step or (lambda msg: contextlib.nullcontext())
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    src_dir, name = str(gguf_path.parent), gguf_path.name
    with step("tokenizer from GGUF"):
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        flags = gguf_tokenizer_flags(gguf_path)
        # transformers drops the GGUF's add_bos_token (Gemma: True, like the original
        # tokenizer); without it vLLM would feed text prompts to Gemma without <bos>.
        if flags.get("add_bos_token") and tokenizer.bos_token_id is not None:
            tokenizer.add_bos_token = True
    with step("dequantizing weights"):
        loaded = AutoModelForCausalLM.from_pretrained(
            src_dir, gguf_file=name, dtype=torch.float32
        )
        # transformers 5.x refuses save_pretrained on a GGUF-loaded model: rebuild a
        # plain model from the config (without the quantization config) and copy weights.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(loaded).__name__]
        state = loaded.state_dict()
        with _no_init():  # every weight is overwritten below
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k not in _tied_keys(model)]
        if missing or result.unexpected_keys:
            raise ModelFetchError(
                f"weights do not fit the rebuilt model: missing {missing[:5]}, "
                f"unexpected {list(result.unexpected_keys)[:5]}"
            )
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        del loaded, state
    with step(f"saving {dtype} safetensors"):
        model.config.dtype = dtype
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    _rope_top_level(cfg)
    cfg.pop("_model_name_or_path", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok_cfg_path = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.exists() else {}
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg["add_bos_token"] = bool(flags.get("add_bos_token", False))
    for load_time_flag in ("is_local", "local_files_only"):
        tok_cfg.pop(load_time_flag, None)
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    return {
        "architecture": cfg["architectures"][0],
        "num_layers": cfg.get("num_hidden_layers"),
        "intermediate_size": cfg.get("intermediate_size"),
        "bos": [tokenizer.bos_token, tokenizer.bos_token_id],
        "add_bos_token": bool(flags.get("add_bos_token", False)),
        "eos": [tokenizer.eos_token, tokenizer.eos_token_id],
    }


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_metadata(gguf_path: str | Path, keys: set[str]) -> dict[str, Any]:
    """Scalar and string metadata ``keys`` of a GGUF file (those present).

    A small header reader: ``gguf.GGUFReader`` parses every element of every array
    (Gemma's 262k-token vocabulary) and takes over a minute on a slow CPU; this skips them.
    """
    import struct

    def read(fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = fh.read(size)
        if len(data) != size:
            raise ModelFetchError(f"{gguf_path}: truncated GGUF header")
        return struct.unpack(fmt, data)[0]

    def read_str() -> bytes:
        return fh.read(read("<Q"))

    def skip_value(vtype: int) -> None:
        if vtype in _GGUF_SCALARS:
            fh.seek(struct.calcsize(_GGUF_SCALARS[vtype]), 1)
        elif vtype == _GGUF_STRING:
            fh.seek(read("<Q"), 1)
        elif vtype == _GGUF_ARRAY:
            etype, count = read("<I"), read("<Q")
            if etype in _GGUF_SCALARS:
                fh.seek(count * struct.calcsize(_GGUF_SCALARS[etype]), 1)
            else:
                for _ in range(count):
                    skip_value(etype)
        else:
            raise ModelFetchError(f"{gguf_path}: unknown GGUF value type {vtype}")

    found: dict[str, Any] = {}
    with open(gguf_path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ModelFetchError(f"{gguf_path}: not a GGUF file")
        version = read("<I")
        if version < 2:
            raise ModelFetchError(f"{gguf_path}: GGUF version {version} is not supported")
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key = read_str().decode("utf-8", "replace")
            vtype = read("<I")
            if key in keys and vtype in _GGUF_SCALARS:
                found[key] = read(_GGUF_SCALARS[vtype])
            elif key in keys and vtype == _GGUF_STRING:
                found[key] = read_str().decode("utf-8", "replace")
            else:
                skip_value(vtype)
            if len(found) == len(keys):
                break
    return found


def gguf_tokenizer_flags(gguf_path: str | Path) -> dict[str, bool]:
    """The GGUF's ``tokenizer.ggml.add_{bos,eos}_token`` flags (those present)."""
    keys = {f"tokenizer.ggml.{k}": k for k in ("add_bos_token", "add_eos_token")}
    meta = gguf_metadata(gguf_path, set(keys))
    return {short: bool(meta[key]) for key, short in keys.items() if key in meta}


def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        return contextlib.nullcontext()
    return no_init_weights()


def _tied_keys(model: Any) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or ()
    if isinstance(keys, dict):
        return set(keys)
    return set(keys)
