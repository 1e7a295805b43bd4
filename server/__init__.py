"""`negablate serve`: vLLM's OpenAI-compatible server plus the neuron-set control API.

One process, one port: the control routes and the ``BASE@SET`` rewrite are
added to vLLM's own FastAPI app. This package holds no tensor math: every
change to the model goes through the worker RPCs of :mod:`vllm_negablate`.
:mod:`server.client` (httpx only) is what scripts and the eval harness import.
"""
