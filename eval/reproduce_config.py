"""What a `negablate reproduce` run is: its settings and its conditions.

Apart from the orchestration in :mod:`eval.reproduce` so that the report
(:mod:`eval.report`) and the console script can read them without importing
the run itself. Light: pydantic only.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, field_validator

from vllm_negablate import defaults, set_names
from vllm_negablate.precision import DTYPES, normalize_dtype


class ReproduceConfig(BaseModel):
    """Every knob of a run; the defaults are what ``negablate reproduce`` uses.

    They are sized so that Gemma 3 270M finishes well under an hour on a 2-core
    CPU, with about 30k scored tokens per condition. float32 is the exact mode:
    every served ablation equals the transformers oracle to float tolerance.
    bfloat16 is the fast mode where the hardware has bf16 units (``avx512_bf16`` or
    AMX; about 1.7x the float32 scoring rate on this project's 2-core EPYC); its
    effect on BLiMP decisions and ablation deltas is in the README ("Precision").
    """

    model: str = "gemma-3-270m"
    out: Path = Path("report")
    dtype: str = "float32"
    top_percent: float = 1.0
    discovery_tokens: int = 32_768
    window: int = defaults.WINDOW_TOKENS
    blimp_per_paradigm: int = 15
    tse_per_test: int = 20
    tse_source: str = "tse"  # all 22 Marvin & Linzen tests; "tse-ml": the 15 agreement tests
    ppl_windows: int = 8
    match_tokens: int = 16_384
    match_tol: float = 0.02  # relative; used only when match_tol_effect is None
    # tolerance of the perplexity-matched search as a share of the Wasserstein set's own
    # log-perplexity effect (a fixed 2% accepted even the unablated model on Gemma)
    match_tol_effect: float | None = 0.1
    match_max_iter: int = 8
    cpu_bind_all_cores: bool = True
    seed: int = 0

    @field_validator("dtype")
    @classmethod
    def _offered_dtype(cls, value: str) -> str:
        dtype = normalize_dtype(value)
        if dtype not in DTYPES:
            raise ValueError(f"dtype {value!r}: use one of {', '.join(DTYPES)}")
        return dtype
    n_boot: int = 2_000
    kv_cache_mb: int = 1024
    data_dir: Path | None = None


# (label, description); the set each condition serves comes from :func:`condition_sets`
CONDITIONS = [
    ("baseline", "no ablation"),
    ("wasserstein-negative", "Wasserstein neurons, negative side zeroed"),
    ("wasserstein-positive", "same neurons, positive side zeroed"),
    ("random-negative", "random neurons, same count per layer"),
    ("perplexity-matched-negative", "random neurons, count matched to the Wasserstein perplexity"),
    ("perplexity-matched-bottom-negative",
     "lowest-W1 neurons (the reference's `bottom`), count matched to the Wasserstein perplexity"),
]


def condition_sets(cfg: ReproduceConfig) -> list[tuple[str, str | None, str]]:
    """(label, set name or None for the baseline, description) of every condition."""
    p, seed = cfg.top_percent, cfg.seed
    names = {
        "baseline": None,
        "wasserstein-negative": set_names.wasserstein_top(p),
        "wasserstein-positive": set_names.wasserstein_top(p, "positive"),
        "random-negative": set_names.random_control(p, seed),
        "perplexity-matched-negative": set_names.perplexity_matched(p, seed),
        "perplexity-matched-bottom-negative": set_names.perplexity_matched(p, seed, pool="bottom"),
    }
    return [(label, names[label], desc) for label, desc in CONDITIONS]
