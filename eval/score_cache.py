"""The SQLite score cache of the HTTP scorer (:class:`eval.scoring.CompletionsScorer`).

Results go to an SQLite file (:class:`ScoreCache`), one row per sequence, keyed
by SHA-256 of ``(served model id BASE, neuron set name, the set's content hash, dtype
the server computes in, exact token ids)`` (:func:`cache_key`): the server URL is not
part of the key, so the same model served elsewhere reuses the rows, but the same model
served in bfloat16 never answers for float32, and a set replaced under the same name
(other neurons, other bounds) never gets the old content's scores: ``negablate serve``
lists each set's content hash on its ``BASE@SET`` card, and the scorer reads it there. Each finished batch is committed at once, so an
interrupted run, rerun, resumes where it stopped, and a finished one is answered
without any HTTP call. The scorer takes ``cache=False`` to switch it off, or
``cache_namespace=`` to keep results of different weights served under the same
name apart. The file is :func:`default_cache_path` unless one is given.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from vllm_negablate.settings import get_settings

__all__ = [
    "CACHE_ENV",
    "ScoreCache",
    "cache_key",
    "default_cache_path",
]

CACHE_ENV = "NEGABLATE_EVAL_CACHE"
_CACHE_SCHEMA = 3  # 2: the server's dtype joined the key; 3: the set's content hash


def default_cache_path() -> Path:
    """``$NEGABLATE_EVAL_CACHE`` if set, else ``~/.cache/negablate/eval-scores.sqlite``."""
    configured = get_settings().eval_cache
    if configured is not None:
        return configured.expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base) / "negablate" / "eval-scores.sqlite"


def cache_key(model_id: str, neuron_set: str | None, ids: Sequence[int], namespace: str = "",
              dtype: str | None = None, set_hash: str | None = None) -> str:
    """SHA-256 of the canonical JSON of (schema, namespace, model, set, set hash, dtype, ids).

    ``dtype``: what the server computes in (``negablate serve`` lists it on the model's
    card); None for servers that do not say. ``set_hash``: the content hash of the set
    (:meth:`vllm_negablate.neuron_set.NeuronSet.content_hash`, on the ``BASE@SET``
    card); None for servers that do not say, where the name alone keys the rows."""
    payload = json.dumps(
        [_CACHE_SCHEMA, namespace, model_id, neuron_set or "", set_hash or "", dtype or "",
         [int(t) for t in ids]],
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ScoreCache:
    """Prompt log-probabilities in an SQLite file, one row per scored sequence.

    Table ``scores(key TEXT PRIMARY KEY, model TEXT, neuron_set TEXT, n_tokens INT,
    logprobs TEXT, created REAL)``; ``logprobs`` is the JSON list as returned
    (first entry ``null``). JSON keeps Python floats exactly. WAL mode, so a reader
    may look while a run writes; each :meth:`put_many` is one committed transaction.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), timeout=60.0, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
            "neuron_set TEXT NOT NULL, n_tokens INTEGER NOT NULL, logprobs TEXT NOT NULL, "
            "created REAL NOT NULL)"
        )
        self._conn.commit()

    def get_many(self, keys: Iterable[str]) -> dict[str, list[float | None]]:
        keys = list(dict.fromkeys(keys))
        out: dict[str, list[float | None]] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            q = f"SELECT key, logprobs FROM scores WHERE key IN ({','.join('?' * len(chunk))})"
            for k, v in self._conn.execute(q, chunk):
                out[k] = json.loads(v)
        return out

    def put_many(self, rows: Iterable[tuple[str, str, str | None, list[float | None]]]) -> None:
        """``rows``: ``(key, model, neuron_set, logprobs)``."""
        now = time.time()
        self._conn.executemany(
            "INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?)",
            [(k, m, s or "", len(lp), json.dumps(lp), now) for k, m, s, lp in rows],
        )
        self._conn.commit()

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0])

    def close(self) -> None:
        self._conn.close()
