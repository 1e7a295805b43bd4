"""Recipes that turn W1 scores or another set into a :class:`NeuronSet`, with provenance.

Pure functions of scores, sets and seeds (no engine), kept apart from the engine run so
that the CLI and the analyses can rebuild sets from saved statistics. Set names come from
:mod:`vllm_negablate.set_names`. All sets are mode ``negative`` unless said otherwise:

* ``wasserstein-top{p}``: per layer, neurons above the layer's ``(100 - p)``-th percentile
  of W1 (:func:`top_percent_mask`), and ``wasserstein-top{p}-positive`` (mirror control,
  :func:`mode_variant`);
* ``random-top{p}-s{seed}``: per layer, as many random neurons as the Wasserstein set,
  excluding it unless ``include_wasserstein``;
* :func:`restrict_layers`: ``...-layer{L}`` / ``...-first{k}`` variants of any set;
* :func:`candidate_order` and :func:`fraction_set`: nested sets of random (or lowest-W1)
  non-Wasserstein neurons, the building blocks of the perplexity-matched controls
  (:mod:`vllm_negablate.discovery.matching`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vllm_negablate import set_names
from vllm_negablate.discovery.wasserstein import top_percent_mask
from vllm_negablate.neuron_set import (
    AblationMode,
    LayerAblation,
    ModelFingerprint,
    NeuronSet,
    Provenance,
    percent_label,
)

__all__ = [
    "standard_sets",
    "wasserstein_set",
    "random_control",
    "restrict_layers",
    "mode_variant",
    "candidate_order",
    "fraction_set",
]


def wasserstein_set(
    scores: np.ndarray,
    fingerprint: ModelFingerprint,
    top_percent: float = 1.0,
    *,
    mode: AblationMode | str = AblationMode.NEGATIVE,
    name: str | None = None,
    source: Mapping[str, Any] | None = None,
) -> NeuronSet:
    """Per layer, the neurons with W1 above the layer's ``(100 - p)``-th percentile."""
    scores = np.asarray(scores)
    if scores.shape != (fingerprint.num_layers, fingerprint.intermediate_size):
        raise ValueError(
            f"scores have shape {scores.shape}, the model needs "
            f"({fingerprint.num_layers}, {fingerprint.intermediate_size})"
        )
    mode = AblationMode(mode)
    entries = [
        LayerAblation(layer=layer, neurons=np.flatnonzero(top_percent_mask(row, top_percent)).tolist(),
                      mode=mode)
        for layer, row in enumerate(scores)
    ]
    label = percent_label(top_percent)
    if name is None:
        name = set_names.wasserstein_top(top_percent, mode)
    src = {**dict(source or {}), "top_percent": float(top_percent),
           "percentile": 100.0 - float(top_percent), "score": "w1"}
    return NeuronSet(
        name=name, model=fingerprint, entries=[e for e in entries if e.neurons],
        provenance=Provenance(method="wasserstein-top", source=src),
        description=f"Top {label}% W1-to-N(0,1) neurons per layer, {mode.value} ablation.",
    )


def standard_sets(
    scores: np.ndarray,
    fingerprint: ModelFingerprint,
    percents: Sequence[float],
    *,
    seed: int = 0,
    include_wasserstein: bool = False,
    source: Mapping[str, Any] | None = None,
) -> dict[str, NeuronSet]:
    """What discovery writes for each top ``p``: the Wasserstein set, its positive mirror
    and a seeded random control of the same per-layer counts, keyed by name.

    One discovery serves a whole top-p sweep: the scores do not depend on ``p``, so the
    sets of every ``p`` come from the same statistics (``--top 1,2,5``).
    """
    sets: dict[str, NeuronSet] = {}
    for percent in dict.fromkeys(float(p) for p in percents):  # in order, once each
        wset = wasserstein_set(scores, fingerprint, percent, source=source)
        for ns in (wset, mode_variant(wset, AblationMode.POSITIVE),
                   random_control(wset, seed=seed, include_wasserstein=include_wasserstein)):
            sets[ns.name] = ns
    return sets


def _neurons_of(ns: NeuronSet) -> dict[int, np.ndarray]:
    out: dict[int, list[int]] = {}
    for e in ns.entries:
        out.setdefault(e.layer, []).extend(e.neurons)
    return {layer: np.array(sorted(v), dtype=np.int64) for layer, v in out.items()}


def _derived(base: NeuronSet, name: str, entries: list[LayerAblation], method: str,
             seed: int | None, extra: Mapping[str, Any], description: str) -> NeuronSet:
    src = {**base.provenance.source, "base_set": base.name,
           "base_content_hash": base.content_hash(), **dict(extra)}
    return NeuronSet(name=name, model=base.model, entries=[e for e in entries if e.neurons],
                     provenance=Provenance(method=method, seed=seed, source=src),
                     description=description)


def _pool(base: NeuronSet, layer: int, include_base: bool) -> np.ndarray:
    all_neurons = np.arange(base.model.intermediate_size, dtype=np.int64)
    if include_base:
        return all_neurons
    return np.setdiff1d(all_neurons, _neurons_of(base).get(layer, np.empty(0, np.int64)))


def random_control(
    base: NeuronSet,
    *,
    seed: int = 0,
    include_wasserstein: bool = False,
    mode: AblationMode | str = AblationMode.NEGATIVE,
    name: str | None = None,
) -> NeuronSet:
    """Per layer, as many uniformly random neurons as ``base`` has there (seeded).

    Neurons of ``base`` are excluded unless ``include_wasserstein`` (the reference code
    draws from all neurons). Each layer has its own generator (``seed``, layer), so a
    layer's draw does not depend on the other layers.
    """
    entries = []
    for layer, count in base.counts_per_layer().items():
        pool = _pool(base, layer, include_wasserstein)
        rng = np.random.default_rng([int(seed), int(layer)])
        pick = rng.choice(pool, size=min(count, pool.size), replace=False)
        entries.append(LayerAblation(layer=layer, neurons=sorted(int(n) for n in pick), mode=mode))
    label = base.provenance.source.get("top_percent")
    if name is None:
        name = set_names.random_control(label, seed, base=base.name, include_base=include_wasserstein)
    return _derived(base, name, entries, "random", seed,
                    {"exclude_base": not include_wasserstein, "matched_counts": True},
                    f"Random neurons, same per-layer counts as {base.name}"
                    + ("" if include_wasserstein else f", excluding {base.name}") + ".")


def restrict_layers(base: NeuronSet, layers: Sequence[int], name: str | None = None,
                    suffix: str | None = None) -> NeuronSet:
    """``base`` with only the entries of ``layers`` (``...-layer{L}``, ``...-first{k}``)."""
    keep = {int(x) for x in layers}
    bad = sorted(x for x in keep if not 0 <= x < base.model.num_layers)
    if bad:
        raise ValueError(f"layers {bad} out of range (model has {base.model.num_layers})")
    if name is None:
        name = f"{base.name}-{suffix}" if suffix is not None else \
            set_names.layer_restricted(base.name, sorted(keep))
    entries = [e.model_copy() for e in base.entries if e.layer in keep]
    prov = base.provenance.model_copy(deep=True)
    prov.source = {**prov.source, "base_set": base.name, "layers": sorted(keep)}
    return NeuronSet(name=name, model=base.model, entries=entries, provenance=prov,
                     description=f"{base.name} restricted to layers {sorted(keep)}.")


def mode_variant(base: NeuronSet, mode: AblationMode | str, name: str | None = None) -> NeuronSet:
    """The same neurons with another ablation mode (e.g. the ``positive`` mirror control)."""
    mode = AblationMode(mode)
    entries = [LayerAblation(layer=e.layer, neurons=list(e.neurons), mode=mode) for e in base.entries]
    prov = base.provenance.model_copy(deep=True)
    prov.source = {**prov.source, "mode": mode.value}
    return NeuronSet(name=name or set_names.mode_variant(base.name, mode), model=base.model, entries=entries,
                     provenance=prov, description=f"{base.name} with {mode.value} ablation.")


def candidate_order(base: NeuronSet, *, seed: int = 0, include_wasserstein: bool = False,
                    scores: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """Per layer of ``base``, the order in which candidate (non-base) neurons join a control.

    Without ``scores``: a seeded random order (ours: random non-Wasserstein neurons). With
    ``scores`` (W1, ``[layers, neurons]``): ascending score, ties by neuron index, so the
    first candidates are the most Gaussian neurons (the reference code's ``bottom``
    selection). :func:`fraction_set` takes them in this order, so the sets are nested as
    ``f`` grows and the ablated perplexity is (close to) monotone in ``f``.
    """
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64)
        shape = (base.model.num_layers, base.model.intermediate_size)
        if scores.shape != shape:
            raise ValueError(f"scores have shape {scores.shape}, the model needs {shape}")
    order = {}
    for layer in base.counts_per_layer():
        pool = _pool(base, layer, include_wasserstein)
        if scores is None:
            order[layer] = np.random.default_rng([int(seed), int(layer), 1]).permutation(pool)
        else:
            # NaN (a constant neuron) sorts last: it says nothing about Gaussianity
            order[layer] = pool[np.argsort(scores[layer, pool], kind="stable")]
    return order


def fraction_set(base: NeuronSet, order: Mapping[int, np.ndarray], fraction: float,
                 name: str, mode: AblationMode | str = AblationMode.NEGATIVE,
                 extra: Mapping[str, Any] | None = None, seed: int | None = None) -> NeuronSet:
    """``round(fraction * total)`` candidates, spread over layers in proportion to their
    candidate counts.

    Candidate ``i`` of layer ``l`` enters at fraction ``(i + 1) / len(order[l])``; all
    candidates are taken in that order (ties: lower layer first). Every layer then holds
    ``fraction * len(order[l])`` neurons up to one, the sets are nested in ``fraction``,
    and the resolution is one neuron in the whole model (not one per layer).
    """
    layers = sorted(order)
    keys, lays, pos = [], [], []
    for layer in layers:
        n = len(order[layer])
        keys.append((np.arange(n) + 1.0) / max(n, 1))
        lays.append(np.full(n, layer))
        pos.append(np.arange(n))
    key, lay, idx = (np.concatenate(x) if x else np.empty(0) for x in (keys, lays, pos))
    take = int(round(float(fraction) * key.size))
    chosen = np.lexsort((lay, key))[:take]
    per_layer: dict[int, list[int]] = {layer: [] for layer in layers}
    for j in chosen:
        per_layer[int(lay[j])].append(int(order[int(lay[j])][int(idx[j])]))
    entries = [LayerAblation(layer=layer, neurons=sorted(per_layer[layer]), mode=mode)
               for layer in layers]
    extra = dict(extra or {})
    kind = "Lowest-W1" if extra.get("pool") == "bottom" else "Random"
    return _derived(base, name, entries, "perplexity-matched", seed,
                    {"fraction": float(fraction), "candidates": int(key.size), **extra},
                    f"{kind} non-{base.name} neurons ({fraction:.4g} of the candidates).")

