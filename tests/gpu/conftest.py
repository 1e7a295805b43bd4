"""tests/gpu: the checks that need a CUDA GPU (``scripts/gpu_check.sh`` runs them).

Registers the ``gpu`` marker. Without CUDA the tests are collected and skipped, and
nothing here changes the environment of the rest of the suite. With CUDA, before any
engine starts:

* ``PYTORCH_NVML_BASED_CUDA_CHECK=1``: ``torch.cuda.is_available()`` / ``device_count()``
  (the skip conditions) ask NVML instead of initialising the CUDA driver in the pytest
  process, which every engine is started from;
* ``VLLM_WORKER_MULTIPROC_METHOD=spawn``: engine processes never inherit a CUDA state;
* ``TRITON_F32_DEFAULT=ieee``: vLLM's float32 attention runs in Triton, whose ``tl.dot``
  defaults to TF32 on NVIDIA GPUs; float32 is the exact mode (oracle within 2e-4), so its
  matmuls must be real float32 (vLLM's own GEMMs already are:
  ``VLLM_FLOAT32_MATMUL_PRECISION=highest``).

Each is a default: a variable already set wins.
"""

from __future__ import annotations

import os

GPU_MARKER = "gpu: needs a CUDA GPU (vLLM on CUDA); skipped without one; run by scripts/gpu_check.sh"


def cuda_available() -> bool:
    import torch

    if not torch.backends.cuda.is_built():  # a CPU build of torch (this project's CPU venv)
        return False
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # read at each call by torch.cuda
    return torch.cuda.is_available()


if cuda_available():
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", GPU_MARKER)
