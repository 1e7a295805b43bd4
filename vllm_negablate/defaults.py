"""Defaults that several commands share, in one place.

Discovery, perplexity matching, the analyses and reproduce all cut text into
windows, start engines with a KV cache and keep sets resident; a default changed
here changes for all of them, so their outputs stay comparable.
"""

from __future__ import annotations

WINDOW_TOKENS = 512  # tokens per discovery / perplexity window, start token included
WARMUP_TOKENS = 512  # tokens the streaming estimator sees before fixing each neuron's grid
KV_CACHE_MB = 512  # KV cache of an engine started by a command (CPU: --kv-cache-memory-bytes)
MAX_RESIDENT_SETS = 8  # `negablate serve --max-sets`: sets resident on the workers at once
# Sentences the eval harness packs into one completions request (`negablate eval -b`): 64
# scored x1.03-1.05 the rate of 32 (bench/levers.py, SmolLM2 bf16), no gain beyond 128.
SENTENCES_PER_REQUEST = 64
