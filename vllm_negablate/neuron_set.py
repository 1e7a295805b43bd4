"""Neuron sets: which MLP neurons to ablate, on which side of zero, for which model.

A neuron is one column of a decoder layer's *MLP pre-activation*
(TransformerLens: ``blocks.{l}.mlp.hook_pre``): the gate projection's output
for gated MLPs, the input projection's output for dense ones. Layer indices
are global, neuron indices are columns of the full (unsharded) MLP width.

A :class:`NeuronSet` is the one data format shared by the plugin, the CLI, the
control server and files on disk. It is plain JSON so that sets can be written
by hand, diffed and versioned; the schema is strict so that a set made for one
model can never be applied, silently, to another.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1

# Names travel inside model ids ("BASE@SET"), URLs and file names: keep them plain.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

# The reserved selector for "no ablation": ``BASE@none`` in a model name,
# ``vllm_xargs: {"neuron_set": "none"}`` in a request body. It wins over the
# server's default set, so the unablated model is always reachable; no set may
# be called that (in any letter case).
NO_ABLATION = "none"


def is_no_ablation(name: object) -> bool:
    """Whether a request's set selector means "no ablation"."""
    return isinstance(name, str) and name == NO_ABLATION


class AblationMode(str, Enum):
    """Which side of an MLP pre-activation (``blocks.{l}.mlp.hook_pre``) is removed.

    The clamp happens *before* the nonlinearity, so with GELU(0) = SiLU(0) = 0
    ``negative`` zeroes the neuron's output exactly where its pre-activation is
    negative and leaves it untouched elsewhere.
    """

    NEGATIVE = "negative"  # h <- max(h, 0): the paper's intervention
    POSITIVE = "positive"  # h <- min(h, 0): the mirror control
    BOTH = "both"  # h <- 0: classic zero-ablation

    @property
    def bounds(self) -> tuple[float, float]:
        """The (lo, hi) clamp bounds that implement this mode."""
        inf = float("inf")
        return {
            AblationMode.NEGATIVE: (0.0, inf),
            AblationMode.POSITIVE: (-inf, 0.0),
            AblationMode.BOTH: (0.0, 0.0),
        }[self]


class ModelFingerprint(BaseModel):
    """The shape facts a neuron set depends on; checked before a set is applied."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: str = Field(description="HF architecture, e.g. 'LlamaForCausalLM'.")
    num_layers: int = Field(gt=0, description="Number of decoder layers.")
    intermediate_size: int = Field(gt=0, description="MLP width (neurons per layer).")

    def mismatch(self, other: ModelFingerprint) -> str | None:
        """Why a set made for ``self`` cannot run on ``other`` (None if it can)."""
        problems = [
            f"{field}: set has {getattr(self, field)!r}, model has {getattr(other, field)!r}"
            for field in ("architecture", "num_layers", "intermediate_size")
            if getattr(self, field) != getattr(other, field)
        ]
        return "; ".join(problems) or None


    @classmethod
    def from_hf_config(cls, config: Any) -> ModelFingerprint:
        """From a ``config.json`` dict or a ``PretrainedConfig``.

        Multimodal wrappers keep the language model under ``text_config``; GPT-2
        style configs say ``n_layer``/``n_inner`` and leave ``n_inner`` None for
        ``4 * n_embd``.
        """
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        text = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg
        archs = cfg.get("architectures") or []
        if not archs:
            raise ValueError("config has no 'architectures'")
        num_layers = text.get("num_hidden_layers", text.get("n_layer"))
        width = text.get("intermediate_size") or text.get("n_inner")
        if not width and text.get("n_embd"):
            width = 4 * text["n_embd"]
        if num_layers is None or not width:
            raise ValueError("config lacks num_hidden_layers/n_layer or intermediate_size/n_inner/n_embd")
        return cls(architecture=archs[0], num_layers=int(num_layers), intermediate_size=int(width))


def percent_label(percent: float) -> str:
    """How a percentage appears in set names: 1.0 -> '1', 0.5 -> '0.5'."""
    return f"{float(percent):g}"


class LayerAblation(BaseModel):
    """Neurons of one layer that share one mode."""

    model_config = ConfigDict(extra="forbid")

    layer: int = Field(ge=0, description="Global decoder-layer index (0-based).")
    neurons: list[int] = Field(description="Neuron (intermediate) indices, 0-based.")
    mode: AblationMode = AblationMode.NEGATIVE

    @field_validator("neurons")
    @classmethod
    def _sorted_unique_nonnegative(cls, neurons: list[int]) -> list[int]:
        negatives = [n for n in neurons if n < 0]
        if negatives:
            raise ValueError(f"neuron indices must be >= 0, got {negatives[:5]}")
        if len(set(neurons)) != len(neurons):
            dupes = sorted({n for n in neurons if neurons.count(n) > 1})
            raise ValueError(f"duplicate neuron indices {dupes[:5]}")
        return sorted(neurons)


class Provenance(BaseModel):
    """How a set was chosen, so that a result can be traced back to its recipe."""

    model_config = ConfigDict(extra="allow")

    method: str = Field(
        default="manual",
        description="'manual', 'wasserstein-top', 'random', 'perplexity-matched', ...",
    )
    seed: int | None = None
    source: dict[str, Any] = Field(
        default_factory=dict, description="Source statistics: corpus, token count, percentile."
    )
    created_at: str = Field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )


class NeuronSet(BaseModel):
    """A named, model-specific set of sign-specific neuron ablations."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=NAME_PATTERN)
    model: ModelFingerprint
    entries: list[LayerAblation] = Field(default_factory=list)
    provenance: Provenance = Field(default_factory=Provenance)
    description: str = ""

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name.lower() == NO_ABLATION:
            raise ValueError(
                f"the name {name!r} is reserved: '{NO_ABLATION}' selects no ablation "
                f"(BASE@{NO_ABLATION}, vllm_xargs.neuron_set='{NO_ABLATION}'); choose another name"
            )
        return name

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, version: int) -> int:
        if version != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema_version {version} (this build reads {SCHEMA_VERSION})")
        return version

    @model_validator(mode="after")
    def _in_range_and_disjoint(self) -> NeuronSet:
        seen: dict[int, set[int]] = {}
        for i, entry in enumerate(self.entries):
            if entry.layer >= self.model.num_layers:
                raise ValueError(
                    f"entries[{i}]: layer {entry.layer} is out of range "
                    f"(model has {self.model.num_layers} layers: 0..{self.model.num_layers - 1})"
                )
            too_big = [n for n in entry.neurons if n >= self.model.intermediate_size]
            if too_big:
                raise ValueError(
                    f"entries[{i}] (layer {entry.layer}): neuron index {too_big[0]} is out of "
                    f"range (intermediate_size {self.model.intermediate_size}: "
                    f"0..{self.model.intermediate_size - 1})"
                )
            layer_seen = seen.setdefault(entry.layer, set())
            overlap = layer_seen.intersection(entry.neurons)
            if overlap:
                raise ValueError(
                    f"entries[{i}] (layer {entry.layer}): neurons {sorted(overlap)[:5]} "
                    "already appear in another entry of the same layer"
                )
            layer_seen.update(entry.neurons)
        return self

    # ------------------------------------------------------------------ views
    def layers(self) -> list[int]:
        """Layers with at least one ablated neuron, ascending."""
        return sorted({e.layer for e in self.entries if e.neurons})

    def num_neurons(self) -> int:
        return sum(len(e.neurons) for e in self.entries)

    def counts_per_layer(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for e in self.entries:
            counts[e.layer] = counts.get(e.layer, 0) + len(e.neurons)
        return dict(sorted(counts.items()))

    def layer_bounds(self, layer: int) -> tuple[list[int], list[float], list[float]]:
        """(neuron indices, lo, hi) of one layer, sorted by index."""
        rows: list[tuple[int, float, float]] = []
        for e in self.entries:
            if e.layer == layer:
                lo, hi = e.mode.bounds
                rows.extend((n, lo, hi) for n in e.neurons)
        rows.sort()
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]

    def content_hash(self) -> str:
        """Hash of what the set *computes*: the model shape and the clamps.

        Name, description and provenance are excluded on purpose: two sets that
        ablate the same neurons the same way produce the same KV cache, and a
        set re-uploaded under the same name with other neurons gets a new hash
        (so prefix-cache keys built from it change too).
        """
        canonical: dict[str, Any] = {"model": self.model.model_dump(mode="json"), "layers": {}}
        for layer in self.layers():
            idx, lo, hi = self.layer_bounds(layer)
            canonical["layers"][str(layer)] = [idx, lo, hi]
        blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), allow_nan=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def check_compatible(self, fingerprint: ModelFingerprint) -> None:
        """Raise :class:`IncompatibleNeuronSet` if the set was made for another model."""
        why = self.model.mismatch(fingerprint)
        if why:
            raise IncompatibleNeuronSet(
                f"neuron set {self.name!r} was made for another model shape: {why}"
            )

    # --------------------------------------------------------------- file I/O
    @classmethod
    def load(cls, path: str | Path) -> NeuronSet:
        """Read a set from JSON; errors name the file."""
        path = Path(path)
        try:
            return cls.model_validate_json(path.read_bytes())
        except Exception as exc:  # pydantic.ValidationError, OSError, UnicodeError
            raise InvalidNeuronSetFile(f"{path}: {exc}") from exc

    def save(self, path: str | Path) -> Path:
        """Write atomically (tmp file + rename) so a crash never leaves half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(path)
        return path


class NeuronSetError(ValueError):
    """Base class for neuron-set problems that a user can fix."""


class IncompatibleNeuronSet(NeuronSetError):
    """The set's model fingerprint does not match the served model."""


class InvalidNeuronSetFile(NeuronSetError):
    """A file could not be read as a NeuronSet."""
