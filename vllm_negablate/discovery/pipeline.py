"""Find Wasserstein neurons with a running vLLM engine, and write the statistics files.

The main path runs *inside* vLLM: the plugin's activation wrapper hands every layer's
pre-activations to a :class:`~vllm_negablate.discovery.collector.PreactivationObserver`
on each worker, so discovery uses the same weights, kernels, dtype and tensor
parallelism as the served model, with memory independent of the number of tokens.

:func:`find_neurons` (offline ``vllm.LLM`` with the plugin):

1. tokenizes a corpus with the model's own tokenizer (WikiText-2 rows joined the way
   the reference code does: rows joined with a space, blank rows kept empty),
2. cuts it into windows of ``window_tokens`` tokens
   (:func:`~vllm_negablate.discovery.corpus.corpus_windows`), each starting with the
   model's start token (:mod:`vllm_negablate.start_token`: the embedded model's marker,
   else BOS, else EOS; the token evaluation uses too),
3. sends them with ``max_tokens=1`` and no ablation, with a fresh ``cache_salt`` so that
   no window is served from the prefix cache (its tokens would not be observed),
4. collects every TP rank's statistics, puts the shards in global neuron order
   (rank ``r`` holds ``[r*w, (r+1)*w)``), finalizes per layer and checks that every
   layer saw exactly the tokens sent,
5. writes ``stats.npz`` + ``stats.json`` (:func:`save_statistics`) and the neuron sets
   (``sets/*.json``: per top p, the Wasserstein set, its positive mirror and a random control, built
   by :mod:`vllm_negablate.discovery.recipes`).

Corpus windows live in :mod:`vllm_negablate.discovery.corpus`, set recipes in
:mod:`vllm_negablate.discovery.recipes`, the perplexity-matched control in
:mod:`vllm_negablate.discovery.matching`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from vllm_negablate import defaults, vllm_adapter
from vllm_negablate.discovery.collector import (
    ObserverConfig,
    from_wire,
    merge_tp_scores,
    merge_tp_states,
)
from vllm_negablate.discovery.corpus import DEFAULT_CORPUS, corpus_windows
from vllm_negablate.discovery.errors import DiscoveryError
from vllm_negablate.discovery.recipes import standard_sets
from vllm_negablate.discovery.streaming import StreamingW1Estimator
from vllm_negablate.neuron_set import ModelFingerprint, NeuronSet
from vllm_negablate.paths import sha256_file

STAT_KEYS = ("w1", "w1_negative", "w1_positive", "w1_h_negative", "frac_h_negative", "mean", "std", "skew",
             "kurtosis", "out_of_range")
STATS_FILE, META_FILE, SETS_DIR = "stats.npz", "stats.json", "sets"

__all__ = [
    "DiscoveryResult",
    "find_neurons",
    "engine_model_path",
    "save_statistics",
    "load_statistics",
]


def engine_model_path(llm: Any) -> str:
    """The model an offline ``vllm.LLM`` serves (a directory, or a hub id)."""
    return vllm_adapter.engine_model_path(llm)


# ------------------------------------------------------------------ statistics
def _stack_layers(per_layer: Mapping[int, Mapping[str, np.ndarray]], num_layers: int):
    missing = [layer for layer in range(num_layers) if layer not in per_layer]
    if missing:
        raise DiscoveryError(f"no statistics for layers {missing}")
    stats = {k: np.stack([np.asarray(per_layer[i][k], dtype=np.float64) for i in range(num_layers)])
             for k in STAT_KEYS}
    stats["count"] = np.array([int(np.asarray(per_layer[i]["count"]).reshape(-1)[0])
                               for i in range(num_layers)], dtype=np.int64)
    return stats


def save_statistics(out_dir: str | Path, stats: Mapping[str, np.ndarray],
                    metadata: Mapping[str, Any]) -> tuple[Path, Path]:
    """``stats.npz`` (arrays ``[layers, neurons]`` + ``count [layers]``) and ``stats.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npz = out / STATS_FILE
    tmp = out / f".{STATS_FILE}.tmp.npz"
    np.savez_compressed(tmp, **{k: np.asarray(v) for k, v in stats.items()})
    tmp.replace(npz)
    meta = out / META_FILE
    meta.write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")
    return npz, meta


def load_statistics(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read what :func:`save_statistics` wrote (a directory or its ``stats.npz``)."""
    path = Path(path)
    npz = path / STATS_FILE if path.is_dir() else path
    meta_path = npz.with_name(META_FILE)
    with np.load(npz) as data:
        stats = {k: data[k] for k in data.files}
    metadata = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return stats, metadata

# --------------------------------------------------------------------- the run
@dataclass
class DiscoveryResult:
    stats: dict[str, np.ndarray]  # STAT_KEYS: [layers, neurons]; count: [layers]
    metadata: dict[str, Any]
    windows: list[list[int]]
    sets: dict[str, NeuronSet]
    states: dict[int, dict[str, Any]] | None = None  # merged estimator states (collect="state")
    exact: dict[int, np.ndarray] | None = None  # kept raw values [n, neurons] per layer
    paths: dict[str, Path] = field(default_factory=dict)
    worker_memory: list[dict[str, Any]] = field(default_factory=list)


def _rpc(llm: Any, method: str, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    replies = llm.collective_rpc(method, args=args, kwargs=kwargs or None)
    errors = sorted({str(r.get("error")) for r in replies if not r.get("ok")})
    if errors:
        raise DiscoveryError(f"{method}: " + "; ".join(errors))
    return replies


def fingerprint_of_llm(llm: Any) -> ModelFingerprint:
    from vllm_negablate.offline import ablation_state

    return ModelFingerprint(**ablation_state(llm)["fingerprint"])


def run_observed(
    llm: Any,
    windows: Sequence[Sequence[int]],
    config: ObserverConfig | None = None,
    *,
    use_tqdm: bool = True,
    finalize_on_workers: bool = True,
    reset_peak_memory: bool = False,
) -> list[dict[str, Any]]:
    """Send ``windows`` (max_tokens=1, no ablation, fresh cache salt) with an observer
    on every worker; return the decoded collect replies of all workers."""
    from vllm import SamplingParams

    cfg = (config or ObserverConfig()).model_dump()
    cfg["reset_peak_memory"] = reset_peak_memory
    _rpc(llm, "negablate_observe_start", json.dumps(cfg))
    try:
        salt = f"negablate-discovery-{uuid.uuid4().hex}"
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        llm.generate([{"prompt_token_ids": list(w), "cache_salt": salt} for w in windows],
                     params, use_tqdm=use_tqdm)
    finally:
        _rpc(llm, "negablate_observe_stop")
    replies = _rpc(llm, "negablate_observe_collect", finalize=finalize_on_workers, clear=True)
    return [from_wire(r) for r in replies]


def find_neurons(
    llm: Any,
    corpus_path: str | Path = DEFAULT_CORPUS,
    *,
    window_tokens: int = defaults.WINDOW_TOKENS,
    max_tokens: int | None = 131_072,
    top_percent: float | Sequence[float] = 1.0,
    seed: int = 0,
    include_wasserstein: bool = False,
    out_dir: str | Path | None = None,
    joiner: str = " ",
    stride: int | None = None,
    estimator: Mapping[str, Any] | None = None,
    keep_exact: int = 0,
    collect: str = "scores",
    use_tqdm: bool = True,
) -> DiscoveryResult:
    """Wasserstein neurons of the model served by ``llm`` (see the module docstring).

    ``estimator``: :class:`StreamingW1Estimator` settings (``nbins``, ``warmup_tokens``,
    ``core_scale``, ``range_std``, ``lattice``) and ``device`` ('auto' or 'cpu').
    ``collect="scores"`` finalizes on each worker (exact: scores are per neuron) and
    transfers ~10 floats per neuron; ``"state"`` transfers the estimator states and
    finalizes here (also returned in ``result.states``, and saved as ``state.npz``).
    ``keep_exact=N`` keeps the first N raw values per neuron; when they cover all the
    tokens, the metadata reports the streaming estimator's max error against exact W1.
    """
    import vllm

    if collect not in ("scores", "state"):
        raise ValueError("collect must be 'scores' or 'state'")
    percents = [float(top_percent)] if isinstance(top_percent, (int, float)) else [float(p) for p in top_percent]
    if not percents or any(not 0.0 < p <= 100.0 for p in percents):
        raise ValueError(f"top_percent must be in (0, 100], got {top_percent!r}")
    corpus_path = Path(corpus_path)
    max_len = vllm_adapter.engine_max_model_len(llm)
    if window_tokens >= max_len:
        raise DiscoveryError(
            f"window_tokens={window_tokens} must be < max_model_len={max_len} "
            "(one token is generated); start the engine with a larger max_model_len"
        )
    model_path = engine_model_path(llm)
    cut = corpus_windows(llm.get_tokenizer(), model_path, corpus_path, window_tokens,
                         joiner=joiner, max_tokens=max_tokens, stride=stride)
    start_id, windows = cut.start_id, cut.windows
    if not windows:
        raise DiscoveryError(f"{corpus_path}: no tokens")
    num_tokens = sum(len(w) for w in windows)
    fingerprint = fingerprint_of_llm(llm)

    config = ObserverConfig(**{**dict(estimator or {}), "keep_exact": keep_exact})
    replies = run_observed(llm, windows, config, use_tqdm=use_tqdm,
                           finalize_on_workers=(collect == "scores"))

    for r in replies:
        bad = {layer: n for layer, n in r["tokens"].items() if n != num_tokens}
        if bad:
            raise DiscoveryError(
                f"tp rank {r['tp_rank']}: layers saw {bad} tokens, {num_tokens} were sent. "
                "Steps replayed from CUDA graphs or served from the prefix cache are not "
                "observed: run discovery with enforce_eager=True."
            )
    states = None
    if collect == "state":
        states = merge_tp_states(replies)
        per_layer = {layer: StreamingW1Estimator.from_state_dict(st).finalize()
                     for layer, st in states.items()}
    else:
        per_layer = merge_tp_scores(replies)
    stats = _stack_layers(per_layer, fingerprint.num_layers)
    if stats["w1"].shape[1] != fingerprint.intermediate_size:
        raise DiscoveryError(f"merged width {stats['w1'].shape[1]} != intermediate_size "
                             f"{fingerprint.intermediate_size}")

    exact = None
    if keep_exact:
        exact = {}
        for layer in range(fingerprint.num_layers):
            parts = sorted(((r["tp_rank"], r["exact"][layer]) for r in replies
                            if layer in r["exact"]), key=lambda rp: rp[0])
            exact[layer] = np.concatenate([p for _, p in parts], axis=1)

    estimator_settings = config.model_dump(exclude={"max_tokens", "layers"})
    metadata: dict[str, Any] = {
        "model": fingerprint.model_dump(),
        "model_path": model_path,
        "dtype": vllm_adapter.engine_dtype(llm),
        "tp_size": int(replies[0]["tp_size"]),
        "corpus": str(corpus_path.resolve()),
        "corpus_sha256": sha256_file(corpus_path),
        "corpus_joiner": joiner,
        "num_tokens": int(num_tokens),
        "num_windows": len(windows),
        "window_tokens": int(window_tokens),
        "stride": stride,
        "start_token_id": start_id,
        "estimator": estimator_settings,
        "collect": collect,
        "top_percent": percents[0],  # the main p (the first asked for)
        "top_percents": list(percents),
        "seed": int(seed),
        "vllm_version": vllm.__version__,
        "negablate_version": _negablate_version(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if exact is not None and all(exact[i].shape[0] == num_tokens for i in exact):
        from vllm_negablate.discovery.wasserstein import exact_w1_to_std_normal_columns

        errs = []
        for layer in range(fingerprint.num_layers):
            x = exact[layer].astype(np.float64)
            sd = x.std(axis=0)
            ref = exact_w1_to_std_normal_columns((x - x.mean(axis=0)) / np.where(sd > 0, sd, np.nan))
            errs.append(float(np.nanmax(np.abs(ref - stats["w1"][layer]))))
        metadata["streaming_w1_max_abs_error"] = max(errs)
        metadata["streaming_w1_max_abs_error_per_layer"] = errs

    source = {"corpus": metadata["corpus"], "corpus_sha256": metadata["corpus_sha256"],
              "tokens": int(num_tokens), "window_tokens": int(window_tokens),
              "model_path": model_path, "statistics": STATS_FILE}
    sets = standard_sets(stats["w1"], fingerprint, percents, seed=seed,
                         include_wasserstein=include_wasserstein, source=source)

    result = DiscoveryResult(stats=stats, metadata=metadata, windows=[list(w) for w in windows],
                             sets=sets, states=states, exact=exact,
                             worker_memory=[r.get("memory", {}) for r in replies])
    if out_dir is not None:
        out = Path(out_dir)
        npz, meta = save_statistics(out, stats, metadata)
        result.paths = {"stats": npz, "metadata": meta}
        for ns in sets.values():
            result.paths[ns.name] = ns.save(out / SETS_DIR / f"{ns.name}.json")
        if states is not None:
            flat = {f"L{layer}/{k}": np.asarray(v) for layer, st in states.items() for k, v in st.items()
                    if v is not None}
            np.savez_compressed(out / "state.npz", **flat)
            result.paths["state"] = out / "state.npz"
    return result


def _negablate_version() -> str:
    from vllm_negablate import __version__

    return __version__
