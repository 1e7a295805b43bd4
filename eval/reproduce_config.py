"""What a `negablate reproduce` run is: its settings and its conditions.

Apart from the orchestration in :mod:`eval.reproduce` so that the report
(:mod:`eval.report`) and the console script can read them without importing
the run itself. Light: pydantic only.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from vllm_negablate.neuron_set import percent_label


class ReproduceConfig(BaseModel):
    """Every knob of a run; the defaults are what ``negablate reproduce`` uses.

    They are sized so that Gemma 3 270M finishes well under an hour on a 2-core
    CPU, with about 30k scored tokens per condition. float32 is the exact mode:
    every served ablation equals the transformers oracle to float tolerance.
    (bfloat16 is faster where the CPU has bf16 units, ``avx512_bf16`` or AMX:
    about 1.4-1.8x in vLLM on this project's 2-core EPYC with ``avx512_bf16``.)
    """

    model: str = "gemma-3-270m"
    out: Path = Path("report")
    dtype: str = "float32"
    top_percent: float = 1.0
    discovery_tokens: int = 32_768
    window: int = 512
    blimp_per_paradigm: int = 15
    tse_per_test: int = 20
    ppl_windows: int = 8
    match_tokens: int = 4_096
    match_tol: float = 0.02
    match_max_iter: int = 8
    cpu_bind_all_cores: bool = True
    seed: int = 0
    n_boot: int = 2_000
    kv_cache_mb: int = 1024
    data_dir: Path | None = None


CONDITIONS = [
    # (label, set-name pattern, description)
    ("baseline", None, "no ablation"),
    ("wasserstein-negative", "wasserstein-top{p}", "Wasserstein neurons, negative side zeroed"),
    ("wasserstein-positive", "wasserstein-top{p}-positive", "same neurons, positive side zeroed"),
    ("random-negative", "random-top{p}-s{seed}", "random neurons, same count per layer"),
    ("perplexity-matched-negative", "perplexity-matched-top{p}-s{seed}", "random neurons, count matched to the Wasserstein perplexity"),
]


def condition_sets(cfg: ReproduceConfig) -> list[tuple[str, str | None, str]]:
    p = percent_label(cfg.top_percent)
    return [(label, None if pat is None else pat.format(p=p, seed=cfg.seed), desc)
            for label, pat, desc in CONDITIONS]
