"""What the side-by-side benchmarks share: an offline environment, the repository on
``sys.path`` (they run as ``python bench/<name>.py`` from a checkout), the BLiMP
paradigms they time by default, and a timestamped log line on stderr (stdout carries
the results)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Four paradigms of different sentence lengths and phenomena: enough to time batching,
# few enough that a run stays short.
DEFAULT_PARADIGMS = ("adjunct_island", "anaphor_gender_agreement", "determiner_noun_agreement_1",
                     "wh_questions_object_gap")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
