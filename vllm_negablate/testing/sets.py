"""Seeded neuron sets for tests and examples."""

from __future__ import annotations

import random
from pathlib import Path

from vllm_negablate.neuron_set import AblationMode, LayerAblation, NeuronSet
from vllm_negablate.testing.tiny_models import fingerprint_of


def random_set(model_dir: Path, name: str, mode: AblationMode | str, fraction: float = 0.25,
               seed: int = 0, layers: list[int] | None = None) -> NeuronSet:
    """A seeded set: ``fraction`` of each layer's neurons, all with one mode."""
    fp = fingerprint_of(model_dir)
    rng = random.Random(f"{name}-{seed}")
    k = max(1, int(fp.intermediate_size * fraction))
    entries = [
        LayerAblation(layer=layer, neurons=rng.sample(range(fp.intermediate_size), k), mode=mode)
        for layer in (range(fp.num_layers) if layers is None else layers)
    ]
    return NeuronSet(name=name, model=fp, entries=entries)
