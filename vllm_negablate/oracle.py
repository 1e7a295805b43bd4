"""A plain-transformers reference implementation of sign-specific neuron ablation.

The vLLM plugin clamps MLP pre-activations inside fused kernels (``SiluAndMul`` /
``GeluAndMul`` on a fused ``gate_up_proj`` output, batched, with per-request
sets). That is fast but hard to read. This module is the opposite: the same
intervention written the most obvious way, on an unmodified Hugging Face model,
so that tests can say "the plugin gives the same logprobs as the oracle".

How the intervention is applied here (see ``docs/science.md``):

* Every supported decoder layer's MLP calls an activation *module* on the
  MLP pre-activation (TransformerLens: ``blocks.{l}.mlp.hook_pre``):
  ``mlp.act_fn(gate_proj(x))`` for gated MLPs
  (Llama/Qwen/Mistral/OLMo SwiGLU, Gemma GeGLU) and ``mlp.act(dense_h_to_4h(x))``
  / ``mlp.act(c_fc(x))`` for dense MLPs (GPT-NeoX/Pythia, GPT-2).
* A forward-pre-hook on that module therefore sees exactly the pre-activation
  ``h`` (for gated MLPs, the gate ``g``; the up projection ``u`` is untouched)
  and replaces it by ``h[..., i] <- clamp(h[..., i], lo_i, hi_i)`` for each
  neuron ``i`` of the set in that layer, with ``(lo, hi)`` from the mode's
  :attr:`AblationMode.bounds`. The clamp itself is
  :func:`~vllm_negablate.ops.clamp_pre_activation_native`, the same reference
  the plugin's kernels are tested against, so the oracle differs from the
  plugin only in *where* it finds ``h``, never in what it does to it.

Everything runs in float32 on CPU, one sequence at a time, with no padding:
slow, but with no batching or padding effect that could hide a discrepancy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vllm_negablate.neuron_set import ModelFingerprint, NeuronSet
from vllm_negablate.ops import clamp_pre_activation_native, full_width_bounds

# Attribute names of the activation module inside ``layer.mlp``, tried in order.
# Only names whose module is called on the MLP pre-activation alone belong here.
ACTIVATION_ATTRS: tuple[str, ...] = ("act_fn", "act")

# Known-good families (for the error message; others with the same layout work too).
SUPPORTED_FAMILIES = "Llama, Qwen2/3, Mistral, OLMo/OLMo2, Gemma/Gemma2/Gemma3 (act_fn); GPT-NeoX/Pythia, GPT-2 (act)"


class UnsupportedArchitecture(ValueError):
    """The model's MLP layout is not one the oracle knows how to hook."""


def _decoder_layers(model: nn.Module) -> Sequence[nn.Module]:
    """The ordered decoder blocks of a causal LM (``model.layers``, ``gpt_neox.layers``, ``h``)."""
    for base_name in ("model", "gpt_neox", "transformer"):
        base = getattr(model, base_name, None)
        if base is None:
            continue
        # Multimodal wrappers (e.g. Gemma3ForConditionalGeneration) nest a language model.
        base = getattr(base, "language_model", base)
        for layers_name in ("layers", "h"):
            layers = getattr(base, layers_name, None)
            if isinstance(layers, (nn.ModuleList, list, tuple)) and len(layers) > 0:
                return layers
    raise UnsupportedArchitecture(
        f"cannot find the decoder layers of {type(model).__name__} "
        "(looked for model.layers, gpt_neox.layers, transformer.h); "
        f"supported families: {SUPPORTED_FAMILIES}"
    )


def find_activation_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Map each global decoder-layer index to the module that applies the MLP activation.

    The module's (first) input is the MLP pre-activation (``blocks.{l}.mlp.hook_pre``),
    which is why hooking it implements the clamp exactly. Raises
    :class:`UnsupportedArchitecture` if a layer has no dense/gated MLP with a
    separate activation module (e.g. MoE layers, or MLPs that call a functional
    activation inline), and if two layers share one activation module (a hook
    could not tell the layers apart).
    """
    arch = type(model).__name__
    found: dict[int, nn.Module] = {}
    for idx, layer in enumerate(_decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            raise UnsupportedArchitecture(f"{arch}: layer {idx} has no 'mlp' submodule")
        if hasattr(mlp, "experts"):
            raise UnsupportedArchitecture(f"{arch}: layer {idx} has a mixture-of-experts MLP")
        act = next(
            (getattr(mlp, a) for a in ACTIVATION_ATTRS if isinstance(getattr(mlp, a, None), nn.Module)),
            None,
        )
        if act is None:
            raise UnsupportedArchitecture(
                f"{arch}: layer {idx} MLP ({type(mlp).__name__}) has no activation module "
                f"named one of {ACTIVATION_ATTRS}; supported families: {SUPPORTED_FAMILIES}"
            )
        found[idx] = act
    if len({id(m) for m in found.values()}) != len(found):
        raise UnsupportedArchitecture(
            f"{arch}: several layers share one activation module object; per-layer hooks "
            "would apply to all of them"
        )
    return found


def fingerprint_from_config(config: Any) -> ModelFingerprint:
    """Fingerprint from a ``PretrainedConfig`` (or its dict); see ``ModelFingerprint.from_hf_config``."""
    return ModelFingerprint.from_hf_config(config)


def _make_clamp_hook(lo: torch.Tensor, hi: torch.Tensor):
    """A forward-pre-hook that clamps the MLP pre-activation ``args[0]`` into ``[lo, hi]``.

    ``lo``/``hi`` are full-width rows (:func:`~vllm_negablate.ops.full_width_bounds`).
    The clamp is out of place: the projection's output is never modified.
    """

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (clamp_pre_activation_native(args[0], lo, hi), *args[1:])

    return hook


class HFAblationOracle:
    """A Hugging Face causal LM with optional neuron-set ablation, for reference results.

    ``HFAblationOracle(model_dir)`` loads the model in float32 on CPU in eval mode.
    Use :meth:`prompt_logprobs` (optionally with a set), or :meth:`ablated` to run
    any other computation on ``oracle.model`` under a set.
    """

    def __init__(self, model_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        from transformers import AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype)
        self.model.to(self.device).eval()
        self.act_modules = find_activation_modules(self.model)
        self._fingerprint = fingerprint_from_config(self.model.config)
        if self._fingerprint.num_layers != len(self.act_modules):
            raise UnsupportedArchitecture(
                f"config says {self._fingerprint.num_layers} layers but the model has "
                f"{len(self.act_modules)} MLP activation modules"
            )

    # ----------------------------------------------------------------- identity
    def fingerprint(self) -> ModelFingerprint:
        """Architecture, layer count and MLP width, as neuron sets record them."""
        return self._fingerprint

    # ---------------------------------------------------------------- ablation
    @contextlib.contextmanager
    def ablated(self, neuron_set: NeuronSet | None) -> Iterator[HFAblationOracle]:
        """Apply ``neuron_set``'s clamps inside the ``with`` block; hooks are always removed.

        ``None`` or a set with no neurons installs nothing (the model is untouched).
        Raises :class:`~vllm_negablate.neuron_set.IncompatibleNeuronSet` if the set
        was made for another model shape.
        """
        handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            if neuron_set is not None:
                neuron_set.check_compatible(self._fingerprint)
                width = self._fingerprint.intermediate_size
                for layer in neuron_set.layers():
                    lo, hi = full_width_bounds(
                        width, *neuron_set.layer_bounds(layer), device=self.device
                    )
                    hook = _make_clamp_hook(lo, hi)
                    handles.append(self.act_modules[layer].register_forward_pre_hook(hook))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    # ---------------------------------------------------------------- scoring
    @torch.no_grad()
    def _logprobs_unhooked(self, token_ids: Sequence[int]) -> list[float | None]:
        ids = [int(t) for t in token_ids]
        if not ids:
            return []
        if len(ids) == 1:
            return [None]
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits = self.model(input_ids=input_ids).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        picked = logprobs.gather(-1, input_ids[0, 1:, None]).squeeze(-1)
        return [None, *picked.tolist()]

    def prompt_logprobs(
        self, token_ids: Sequence[int], neuron_set: NeuronSet | None = None
    ) -> list[float | None]:
        """``log p(token_t | tokens_<t)`` for every position; ``None`` at t = 0.

        Same layout as vLLM's ``prompt_logprobs`` (first entry ``None``). The caller
        decides whether ``token_ids`` starts with BOS; nothing is added here.
        """
        with self.ablated(neuron_set):
            return self._logprobs_unhooked(token_ids)

    def batch_prompt_logprobs(
        self, batch: Sequence[Sequence[int]], neuron_set: NeuronSet | None = None
    ) -> list[list[float | None]]:
        """:meth:`prompt_logprobs` for several sequences, run one by one (no padding effects)."""
        with self.ablated(neuron_set):
            return [self._logprobs_unhooked(ids) for ids in batch]

    # -------------------------------------------------------------- statistics
    @torch.no_grad()
    def capture_preactivations(
        self, token_ids: Sequence[int], neuron_set: NeuronSet | None = None,
        layers: Sequence[int] | None = None,
    ) -> dict[int, torch.Tensor]:
        """MLP pre-activations ``{layer: [T, intermediate_size]}`` (float32, CPU) for one sequence.

        These are the values the clamp acts on (``blocks.{l}.mlp.hook_pre``: the
        gate projection output for gated MLPs). With ``neuron_set``, earlier
        layers' ablations shape the input, but each layer's values are recorded
        *before* its own clamp.
        """
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ValueError("capture_preactivations needs at least one token")
        wanted = list(self.act_modules) if layers is None else list(layers)
        captured: dict[int, torch.Tensor] = {}
        handles = []

        def make_capture(layer: int):
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                captured[layer] = args[0][0].detach().float().cpu().clone()

            return hook

        try:
            # Registered before the clamp hooks, so they run first and see the raw values.
            for layer in wanted:
                handles.append(self.act_modules[layer].register_forward_pre_hook(make_capture(layer)))
            with self.ablated(neuron_set):
                self.model(input_ids=torch.tensor([ids], dtype=torch.long, device=self.device))
        finally:
            for handle in handles:
                handle.remove()
        return {layer: captured[layer] for layer in wanted}

