"""Fetching: install an embedded model's registry package, convert it once, cache it.

:func:`fetch_model` pip-installs the package(s) holding a model's GGUF, locates the
file, has :mod:`vllm_negablate.models.convert` dequantize it into a temporary
directory, writes the licence notice and the marker (:mod:`vllm_negablate.models.registry`)
and renames the result into the cache, under a lock. This module also owns the cache
layout (:func:`cache_root`, :func:`fetched_path`, :func:`list_models`) and
:func:`resolve_model`, which turns a name or path into what vLLM should load.

The converter that :func:`fetch_model` runs is looked up at call time on the package,
``vllm_negablate.models._CONVERTER``, so tests replace it there.
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
from pathlib import Path
from typing import Any

from vllm_negablate.models.convert import DTYPES, convert_gguf
from vllm_negablate.models.registry import (
    EMBEDDED_MODELS,
    MARKER_FILE,
    MARKER_VERSION,
    QUANTIZATION_NOTE,
    EmbeddedModel,
    ModelFetchError,
    UnknownModelError,
    get_spec,
    is_embedded,
    marker_matches,
    read_marker,
)
from vllm_negablate.settings import get_settings
from vllm_negablate.paths import sha256_file

CACHE_ENV = "NEGABLATE_CACHE"

# The project's `models` extra (pyproject.toml): what the conversion needs besides
# transformers and torch. import name -> pip requirement.
CONVERSION_REQUIREMENTS = {"gguf": "gguf>=0.10", "accelerate": "accelerate>=0.30"}


# --------------------------------------------------------------------------- cache


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Directory holding converted models: ``cache_dir``, ``$NEGABLATE_CACHE/models``
    or ``~/.cache/negablate/models``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return get_settings().cache.expanduser() / "models"


def model_cache_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where ``name`` is (or would be) cached; does not fetch."""
    return cache_root(cache_dir) / get_spec(name).name


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


# --------------------------------------------------------------------------- converter


def _token_id(model_dir: Path, token: str) -> int | None:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).token_to_id(token)


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


def _converter() -> Converter:
    """The converter :func:`fetch_model` runs: ``vllm_negablate.models._CONVERTER``.

    Read from the package at call time (not imported), so that replacing the package
    attribute (``monkeypatch.setattr(models, "_CONVERTER", fake)``) takes effect here.
    """
    return sys.modules[__package__]._CONVERTER


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
            source = _converter()(spec, tmp, target_dtype, say)
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
