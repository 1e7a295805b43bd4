"""The names of the sets the recipes build, in one place.

Discovery writes ``wasserstein-top1.json``; reproduce, the layer sweep and the
training-dynamics analysis later ask the server for ``BASE@wasserstein-top1``.
Both sides build the name here, so a change of pattern cannot leave one side
asking for a set the other never wrote.
"""

from __future__ import annotations

from vllm_negablate.neuron_set import AblationMode, percent_label


def wasserstein_top(percent: float, mode: AblationMode | str = AblationMode.NEGATIVE) -> str:
    """``wasserstein-top{p}``; another mode adds ``-{mode}`` (``wasserstein-top1-positive``)."""
    return mode_variant(f"wasserstein-top{percent_label(percent)}", mode)


def mode_variant(base: str, mode: AblationMode | str) -> str:
    """``base`` for the paper's negative mode, ``base-{mode}`` for the others."""
    mode = AblationMode(mode)
    return base if mode is AblationMode.NEGATIVE else f"{base}-{mode.value}"


def random_control(percent: float | None, seed: int, *, base: str | None = None,
                   include_base: bool = False) -> str:
    """``random-top{p}-s{seed}`` (``random-{base}-s{seed}`` for a set not made from a top-p
    percentile); ``-incl`` when the draw may include the base set's neurons."""
    stem = f"random-top{percent_label(percent)}" if percent is not None else f"random-{base}"
    return f"{stem}-s{seed}" + ("-incl" if include_base else "")


POOLS = ("random", "bottom")  # where a perplexity-matched control takes its neurons


def perplexity_matched(percent: float | None, seed: int, *, base: str | None = None,
                       pool: str = "random") -> str:
    """``perplexity-matched-top{p}-s{seed}`` (or ``perplexity-matched-{base}-s{seed}``) for
    random non-Wasserstein neurons; ``perplexity-matched-bottom-top{p}`` for the
    lowest-W1 ones (the reference code's ``bottom``; no seed: the order is the scores')."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    target = f"top{percent_label(percent)}" if percent is not None else str(base)
    if pool == "bottom":
        return f"perplexity-matched-bottom-{target}"
    return f"perplexity-matched-{target}-s{seed}"


def layer_restricted(base: str, layers: list[int]) -> str:
    """``base-layer{L}`` for one layer, ``base-first{k}`` for layers 0..k-1, else
    ``base-layers{a_b_c}``."""
    srt = sorted(layers)
    if len(srt) == 1:
        return f"{base}-layer{srt[0]}"
    if srt == list(range(len(srt))):
        return f"{base}-first{len(srt)}"
    return f"{base}-layers" + "_".join(map(str, srt))
