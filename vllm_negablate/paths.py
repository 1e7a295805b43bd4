"""Where local data lives: ``$NEGABLATE_DATA_DIR``, else ``../shared/data`` beside the repo."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    env = os.environ.get("NEGABLATE_DATA_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def wikitext(split: str) -> Path:
    """WikiText-2 tokenized split file (``valid`` or ``test``)."""
    return data_dir() / "wikitext-2" / f"{split}.txt"
