"""Where local data lives: ``$NEGABLATE_DATA_DIR``, else ``../shared/data`` beside the repo."""

from __future__ import annotations

from pathlib import Path

from vllm_negablate.settings import get_settings

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    return get_settings().data_dir


def wikitext(split: str) -> Path:
    """WikiText-2 tokenized split file (``valid`` or ``test``)."""
    return data_dir() / "wikitext-2" / f"{split}.txt"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (corpora and weights are large)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
