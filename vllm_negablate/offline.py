"""Offline (``vllm.LLM``) helpers: load sets, pick them per request, score prompts.

The plugin works with a plain ``LLM(...)``: it registers itself through the
``vllm.general_plugins`` entry point and defaults ``worker_extension_cls``. These
helpers wrap the RPCs and turn a worker's error reply into an exception::

    llm = LLM(model=path, enforce_eager=True)
    load_neuron_set(llm, NeuronSet.load("wasserstein-top1.json"))
    logprobs = score_prompts(llm, [token_ids], neuron_set="wasserstein-top1")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from vllm_negablate.executors import ENV_CPU_BIND
from vllm_negablate.neuron_set import NeuronSet, NeuronSetError
from vllm_negablate.runtime import NEURON_SET_KEY



def bind_worker_to_all_cores() -> None:
    """Let vLLM's CPU worker use every core this process may run on.

    By default vLLM keeps one core back for its scheduler, which on a 2-core
    machine halves the worker. Scoring and discovery are long forward passes with
    the scheduler idle, so all cores go to the worker (measured on Gemma 3 270M,
    2 cores: 120 vs 70 prompt tokens/s). Set in this process's environment, so
    servers started from here and in-process engines (discovery) both get it. A
    value the user set is kept; the variable is ignored on GPUs.
    """
    if ENV_CPU_BIND in os.environ:
        return
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cores:
        os.environ[ENV_CPU_BIND] = ",".join(map(str, cores))


def _check(replies: list[dict[str, Any]]) -> dict[str, Any]:
    errors = {r.get("error") for r in replies if not r.get("ok")}
    if errors:
        raise NeuronSetError("; ".join(sorted(str(e) for e in errors)))
    return replies[0]["state"]


def load_neuron_set(llm: Any, neuron_set: NeuronSet) -> dict[str, Any]:
    """Make a set resident on every worker; returns the worker state."""
    return _check(llm.collective_rpc("negablate_load_set", args=(neuron_set.model_dump_json(),)))


def unload_neuron_set(llm: Any, name: str) -> dict[str, Any]:
    return _check(llm.collective_rpc("negablate_unload_set", args=(name,)))


def set_default_neuron_set(llm: Any, name: str | None) -> dict[str, Any]:
    """Set used by requests that name none; in-flight requests keep theirs."""
    return _check(llm.collective_rpc("negablate_set_default", args=(name,)))


def ablation_state(llm: Any) -> dict[str, Any]:
    return _check(llm.collective_rpc("negablate_state"))


def sampling_params(neuron_set: str | None = None, **kwargs: Any):
    """``SamplingParams`` that select ``neuron_set``.

    ``None``: the default set, if one is active; ``"none"``
    (:data:`~vllm_negablate.neuron_set.NO_ABLATION`): no ablation, whatever the default.
    """
    from vllm import SamplingParams

    extra = dict(kwargs.pop("extra_args", None) or {})
    if neuron_set is not None:
        extra[NEURON_SET_KEY] = neuron_set
    return SamplingParams(extra_args=extra or None, **kwargs)


def score_prompts(
    llm: Any,
    prompts: Sequence[Sequence[int]],
    neuron_set: str | None | Sequence[str | None] = None,
    *,
    use_tqdm: bool = False,
) -> list[list[float | None]]:
    """Per-token prompt log-probabilities (first token: None), one list per prompt.

    ``neuron_set`` is one name for all prompts or one per prompt (mixed batch);
    ``None`` takes the default set, ``"none"`` is the unablated model.
    """
    if isinstance(neuron_set, str) or neuron_set is None:
        names: Sequence[str | None] = [neuron_set] * len(prompts)
    else:
        names = neuron_set
    if len(names) != len(prompts):
        raise ValueError(f"{len(names)} neuron_set names for {len(prompts)} prompts")
    params = [
        sampling_params(n, max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=0.0)
        for n in names
    ]
    outputs = llm.generate(
        [{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=use_tqdm
    )
    result = []
    for prompt, out in zip(prompts, outputs, strict=True):
        row: list[float | None] = []
        for tok, entry in zip(prompt, out.prompt_logprobs, strict=True):
            row.append(None if entry is None else entry[tok].logprob)
        result.append(row)
    return result
