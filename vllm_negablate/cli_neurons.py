"""``negablate neurons``: find Wasserstein neurons with vLLM, build controls, show results.

::

    negablate neurons find MODEL --corpus valid.txt --top 1% --out runs/m1 [--max-tokens N]
    negablate neurons control runs/m1 --kind random --seed 1
    negablate neurons control runs/m1 --kind layer --layer 3
    negablate neurons control runs/m1 --kind first-k --k 4
    negablate neurons control runs/m1 --kind perplexity-matched --eval-corpus test.txt
    negablate neurons show runs/m1            # per-layer table + runs/m1/w1_hist.png
"""

from __future__ import annotations

from pathlib import Path

from vllm_negablate import defaults, set_names
from vllm_negablate.paths import wikitext

import typer
from rich.console import Console
from rich.table import Table

from vllm_negablate.neuron_set import ModelFingerprint, NeuronSet, NeuronSetError

# Kept equal to vllm_negablate.discovery.corpus's (corpora) and .pipeline's (file names) (the
# discovery modules are loaded lazily so that `negablate --help` stays fast).
DEFAULT_CORPUS = wikitext("valid")
DEFAULT_EVAL_CORPUS = wikitext("test")
STATS_FILE, META_FILE, SETS_DIR = "stats.npz", "stats.json", "sets"

neurons_app = typer.Typer(
    help="Find Wasserstein neurons inside vLLM, build control sets, show statistics.",
    no_args_is_help=True,
)
console = Console()


def parse_percent(text: str | float) -> float:
    """'1%', '1', '0.5%' -> percent of neurons per layer."""
    try:
        value = float(str(text).strip().rstrip("%"))
    except ValueError:
        raise typer.BadParameter(f"--top takes percents separated by commas (1,2,5), got {text!r}") from None
    if not 0.0 < value <= 100.0:
        raise typer.BadParameter(f"--top must be in (0, 100]%, got {text!r}")
    return value


def parse_percents(text: str) -> list[float]:
    """'1,2,5' or '1%,2%' -> [1.0, 2.0, 5.0] (order kept, the first is the main p); each in (0, 100]."""
    items = [x for x in (t.strip() for t in str(text).split(",")) if x]
    if not items:
        raise typer.BadParameter(f"--top needs at least one percent, got {text!r}")
    return list(dict.fromkeys(parse_percent(x) for x in items))


def _make_llm(model: str, *, tp: int, dtype: str, kv_cache_mb: int, max_model_len: int,
              seed: int, max_num_seqs: int = 32):
    from vllm import LLM

    from vllm_negablate.offline import bind_worker_to_all_cores

    bind_worker_to_all_cores()  # CPU: the worker gets every core (a user's binding is kept)
    return LLM(
        model=model, tensor_parallel_size=tp, dtype=dtype, seed=seed,
        enforce_eager=True,  # steps replayed from CUDA graphs would not be observed
        kv_cache_memory_bytes=kv_cache_mb * 2**20, max_model_len=max_model_len,
        enable_prefix_caching=True, max_num_seqs=max_num_seqs,
    )


def _shutdown(llm) -> None:
    from vllm_negablate.vllm_adapter import shutdown_llm

    try:
        shutdown_llm(llm)
    except Exception:  # already gone
        pass


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(code)


# ----------------------------------------------------------------------- find
@neurons_app.command("find")
def find(
    model: str = typer.Argument(..., help="HF model directory or id."),
    corpus: Path = typer.Option(DEFAULT_CORPUS, help="Text corpus (WikiText rows joined by spaces)."),
    top: str = typer.Option("1%", help="Percent of neurons per layer to select, e.g. 1%; a list "
                            "(1,2,5) writes the sets of each p from the one pass (the first is "
                            "the main p, recorded as top_percent)."),
    out: Path = typer.Option(..., help="Output directory (stats.npz, stats.json, sets/)."),
    max_tokens: int = typer.Option(131_072, help="Tokens to observe (0: the whole corpus)."),
    window: int = typer.Option(defaults.WINDOW_TOKENS, help="Tokens per window, BOS included (< the model's "
                               "max length: one token is generated)."),
    tp: int = typer.Option(1, help="Tensor-parallel size."),
    seed: int = typer.Option(0, help="Seed of the random control set."),
    include_wasserstein: bool = typer.Option(
        False, help="Random control may draw Wasserstein neurons too (reference behaviour)."),
    dtype: str = typer.Option("auto", help="Model dtype (auto, bfloat16, float32, ...)."),
    kv_cache_mb: int = typer.Option(defaults.KV_CACHE_MB, help="KV-cache size in MiB."),
    nbins: int = typer.Option(2048, help="Histogram bins per neuron."),
    warmup: int = typer.Option(defaults.WARMUP_TOKENS, help="Warm-up tokens that fit each neuron's grid."),
    collect: str = typer.Option("scores", help="'scores' (finalize on workers) or 'state'."),
    keep_exact: int = typer.Option(0, help="Keep the first N raw values per neuron (error check)."),
) -> None:
    """Run MODEL over a corpus inside vLLM and select its Wasserstein neurons."""
    from vllm_negablate.discovery.pipeline import find_neurons

    try:
        percents = parse_percents(top)
    except typer.BadParameter as e:
        _fail(str(e))
    if not corpus.is_file():
        _fail(f"corpus {corpus} not found")
    llm = _make_llm(model, tp=tp, dtype=dtype, kv_cache_mb=kv_cache_mb,
                    max_model_len=window + 1, seed=seed)
    try:
        result = find_neurons(
            llm, corpus, window_tokens=window, max_tokens=max_tokens or None,
            top_percent=percents, seed=seed, include_wasserstein=include_wasserstein,
            out_dir=out, estimator={"nbins": nbins, "warmup_tokens": warmup},
            keep_exact=keep_exact, collect=collect, use_tqdm=True,
        )
    finally:
        _shutdown(llm)
    meta = result.metadata
    console.print(f"observed {meta['num_tokens']:,} tokens in {meta['num_windows']} windows "
                  f"of {meta['window_tokens']} (tp {meta['tp_size']})")
    if "streaming_w1_max_abs_error" in meta:
        console.print(f"streaming vs exact W1, max abs error: {meta['streaming_w1_max_abs_error']:.2e}")
    for name, path in result.paths.items():
        console.print(f"  {name}: {path}")


# -------------------------------------------------------------------- control
def _wasserstein_from_stats(stats_dir: Path, top: str | None):
    """``([Wasserstein set per p], metadata, w1)``; ``top`` may list several percents."""
    from vllm_negablate.discovery.pipeline import load_statistics
    from vllm_negablate.discovery.recipes import wasserstein_set

    stats, meta = load_statistics(stats_dir)
    if "model" not in meta:
        _fail(f"{stats_dir}: no {META_FILE} with the model fingerprint")
    try:
        percents = parse_percents(top) if top else [float(meta.get("top_percent", 1.0))]
    except typer.BadParameter as e:
        _fail(str(e))
    source = {"corpus": meta.get("corpus"), "corpus_sha256": meta.get("corpus_sha256"),
              "tokens": meta.get("num_tokens"), "window_tokens": meta.get("window_tokens"),
              "model_path": meta.get("model_path"), "statistics": STATS_FILE}
    fp = ModelFingerprint(**meta["model"])
    return [wasserstein_set(stats["w1"], fp, p, source=source) for p in percents], meta, stats["w1"]


@neurons_app.command("control")
def control(
    stats_dir: Path = typer.Argument(..., help="Directory written by 'neurons find'."),
    kind: str = typer.Option(..., help="random | perplexity-matched | layer | first-k"),
    top: str | None = typer.Option(None, help="Percent for the Wasserstein set (default: as found); "
                                   "random and perplexity-matched take a list (1,2,5: one engine "
                                   "for every search)."),
    seed: int = typer.Option(0),
    include_wasserstein: bool = typer.Option(False, help="Random draws may include the W. set."),
    base: Path | None = typer.Option(None, help="layer/first-k: restrict this set file instead."),
    layer: list[int] | None = typer.Option(None, help="layer: which layer(s) (default: each)."),
    k: list[int] | None = typer.Option(None, help="first-k: which k (default: 1..layers-1)."),
    model: str | None = typer.Option(None, help="perplexity-matched: model (default: as found)."),
    eval_corpus: Path = typer.Option(DEFAULT_EVAL_CORPUS, help="Held-out text for perplexity."),
    eval_tokens: int = typer.Option(16_384, help="perplexity-matched: tokens to evaluate on."),
    window: int = typer.Option(defaults.WINDOW_TOKENS, help="perplexity-matched: window length."),
    tol: float = typer.Option(0.01, help="perplexity-matched: relative tolerance."),
    max_iter: int = typer.Option(12, help="perplexity-matched: perplexity evaluations at most."),
    tp: int = typer.Option(1),
    dtype: str = typer.Option("auto"),
    kv_cache_mb: int = typer.Option(defaults.KV_CACHE_MB),
    save_unconverged: bool = typer.Option(
        False, help="perplexity-matched: write the closest set even if not within --tol."),
    pool: str = typer.Option(
        "random", help="perplexity-matched: where its neurons come from: random (random "
                       "non-Wasserstein neurons, seeded) or bottom (the lowest-W1 neurons per "
                       "layer, the reference code's 'bottom' selection); 'random,bottom' "
                       "searches both with one engine."),
    tol_effect: float | None = typer.Option(
        None, help="perplexity-matched: tolerance as a share of the Wasserstein set's own "
                   "effect, |log p - log p_W| <= F * (log p_W - log p_base) (e.g. 0.1); "
                   "replaces --tol, which means little when the effect itself is ~2%."),
    out: Path | None = typer.Option(None, help="Where to write sets (default STATS_DIR/sets)."),
) -> None:
    """Build control sets from a discovery run's statistics."""
    from vllm_negablate.discovery.recipes import random_control, restrict_layers

    pools = [x.strip() for x in pool.split(",") if x.strip()]
    bad = [x for x in pools if x not in set_names.POOLS]
    if bad or not pools:
        _fail(f"unknown --pool {pool!r}: one or more of {', '.join(set_names.POOLS)}")
    if tol_effect is not None and not tol_effect > 0:
        _fail(f"--tol-effect must be > 0, got {tol_effect}")
    wsets, meta, w1 = _wasserstein_from_stats(stats_dir, top)
    wset = wsets[0]
    out_dir = out or stats_dir / SETS_DIR
    made: list[NeuronSet] = []
    if kind in ("layer", "first-k") and len(wsets) > 1:
        _fail(f"--kind {kind} takes one --top, got {top!r}")
    if kind == "random":
        made += [random_control(w, seed=seed, include_wasserstein=include_wasserstein) for w in wsets]
    elif kind in ("layer", "first-k"):
        try:
            src = NeuronSet.load(base) if base else wset
        except NeuronSetError as exc:
            _fail(str(exc))
        n = src.model.num_layers
        if kind == "layer":
            for i in (layer or range(n)):
                made.append(restrict_layers(src, [i], suffix=f"layer{i}"))
        else:
            for kk in (k or range(1, n)):
                if not 1 <= kk <= n:
                    _fail(f"--k {kk} out of range 1..{n}")
                made.append(restrict_layers(src, range(kk), suffix=f"first{kk}"))
    elif kind == "perplexity-matched":
        found = _perplexity_matched(wsets, meta, model, eval_corpus, eval_tokens, window, tol,
                                    max_iter, seed, include_wasserstein, tp, dtype, kv_cache_mb,
                                    pools=pools, scores=w1, tol_effect=tol_effect)
        unmatched = [ns.name for ns, match, _ in found if not match.converged]
        if unmatched and not save_unconverged:
            made += [ns for ns, match, _ in found if match.converged]
            for ns in made:
                console.print(f"{ns.name}: {ns.num_neurons()} neurons -> "
                              f"{ns.save(out_dir / f'{ns.name}.json')}")
            _fail(f"not written: {', '.join(unmatched)} (--save-unconverged writes the closest "
                  f"set)", code=1)
        made += [ns for ns, _, _ in found]
    else:
        _fail(f"unknown --kind {kind!r}: random | perplexity-matched | layer | first-k")
    for ns in made:
        path = ns.save(out_dir / f"{ns.name}.json")
        console.print(f"{ns.name}: {ns.num_neurons()} neurons {ns.counts_per_layer()} -> {path}")


def _perplexity_matched(wsets, meta, model, eval_corpus, eval_tokens, window, tol, max_iter, seed,
                        include_wasserstein, tp, dtype, kv_cache_mb, *, pools=("random",),
                        scores=None, tol_effect=None):
    """One engine, one search per (Wasserstein set, pool); ``[(set, match, wset), ...]`` in
    the order of ``wsets`` then ``pools``."""
    from vllm_negablate.discovery.corpus import corpus_windows
    from vllm_negablate.discovery.matching import offline_perplexity, perplexity_matched_control
    from vllm_negablate.discovery.pipeline import engine_model_path
    from vllm_negablate.paths import sha256_file

    model = model or meta.get("model_path")
    if not model:
        _fail("--model is needed (the statistics do not name their model)")
    if not eval_corpus.is_file():
        _fail(f"eval corpus {eval_corpus} not found")
    if meta.get("corpus") and Path(meta["corpus"]).resolve() == eval_corpus.resolve():
        console.print("[yellow]warning:[/yellow] perplexity is measured on the selection corpus")
    llm = _make_llm(model, tp=tp, dtype=dtype, kv_cache_mb=kv_cache_mb,
                    max_model_len=window + 1, seed=seed)
    try:
        # The model's start token (marker first), the one discovery and evaluation use.
        windows = corpus_windows(llm.get_tokenizer(), engine_model_path(llm), eval_corpus, window,
                                 joiner="\n\n", max_tokens=eval_tokens).windows
        base_ppl = offline_perplexity(llm, windows)
        console.print(f"baseline perplexity {base_ppl:.4f} on {sum(map(len, windows)):,} tokens")

        def progress(i: int, f: float, p: float) -> None:
            console.print(f"  [{i}/{max_iter}] fraction {f:.4f} -> perplexity {p:.4f}")

        found = []
        for wset, pool in ((w, p) for w in wsets for p in pools):
            console.print(f"{wset.name}, pool {pool}:")
            found.append((*perplexity_matched_control(
                llm, wset, windows, seed=seed, include_wasserstein=include_wasserstein, tol=tol,
                max_iter=max_iter, progress=progress, pool=pool, scores=scores,
                tol_effect=tol_effect, base_perplexity=base_ppl,
                eval_source={"eval_corpus": str(eval_corpus.resolve()),
                             "eval_corpus_sha256": sha256_file(eval_corpus),
                             "baseline_perplexity": base_ppl},
            ), wset))
    finally:
        _shutdown(llm)
    for ns, match, wset in found:
        colour = "green" if match.converged else "yellow"
        tol_used = ns.provenance.source["tolerance"]
        console.print(f"[{colour}]{ns.name}: {'converged' if match.converged else 'not converged'}"
                      f"[/{colour}]: target {match.target:.4f} ({wset.name}), got "
                      f"{match.perplexity:.4f} (tolerance {tol_used:.2%}) with {ns.num_neurons()} "
                      f"neurons vs {wset.num_neurons()} ({match.iterations} evaluations)"
                      f"{'' if match.converged else '; ' + match.reason}")
    return found


# ----------------------------------------------------------------------- show
def _plot_w1(stats: dict, meta: dict, png: Path, percent: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from vllm_negablate.discovery.wasserstein import top_percent_mask

    w1 = stats["w1"]
    n = w1.shape[0]
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= n:
            ax.axis("off")
            continue
        s = w1[i][~np.isnan(w1[i])]
        ax.hist(s, bins=60, color="#4477aa")
        sel = top_percent_mask(w1[i], percent)
        if sel.any():
            ax.axvline(float(np.min(w1[i][sel])), color="#cc3311", lw=1, ls="--")
        ax.set_yscale("log")
        ax.set_title(f"layer {i} ({int(sel.sum())} > p{100 - percent:g})", fontsize=8)
        ax.tick_params(labelsize=7)
    model = meta.get("model", {}).get("architecture", "")
    fig.suptitle(f"W1 to N(0,1) per neuron: {model}, {meta.get('num_tokens', '?')} tokens", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _plot_counts(ns: NeuronSet, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = ns.counts_per_layer()
    fig, ax = plt.subplots(figsize=(max(4, 0.25 * ns.model.num_layers + 2), 2.6))
    layers = list(range(ns.model.num_layers))
    ax.bar(layers, [counts.get(i, 0) for i in layers], color="#4477aa")
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons")
    ax.set_title(f"{ns.name} ({ns.num_neurons()} neurons)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


@neurons_app.command("show")
def show(
    path: Path = typer.Argument(..., help="A 'neurons find' directory, its stats.npz, or a set file."),
    top: str | None = typer.Option(None, help="Percent to mark (default: as found)."),
    png: Path | None = typer.Option(None, help="Where to write the PNG (default: next to input)."),
    plot: bool = typer.Option(True, help="Write the PNG histogram."),
) -> None:
    """Per-layer counts and score summaries; a PNG histogram of W1 per layer."""
    import numpy as np

    from vllm_negablate.discovery.pipeline import load_statistics
    from vllm_negablate.neuron_set import percent_label
    from vllm_negablate.discovery.wasserstein import top_percent_mask

    if path.suffix == ".json":
        try:
            ns = NeuronSet.load(path)
        except NeuronSetError as exc:
            _fail(str(exc))
        console.print(f"[bold]{ns.name}[/bold] ({ns.provenance.method}, seed {ns.provenance.seed}): "
                      f"{ns.num_neurons()} neurons, hash {ns.content_hash()}")
        table = Table("layer", "neurons", "modes")
        for layer, count in ns.counts_per_layer().items():
            modes = sorted({e.mode.value for e in ns.entries if e.layer == layer})
            table.add_row(str(layer), str(count), ",".join(modes))
        console.print(table)
        if plot:
            console.print(f"plot: {_plot_counts(ns, png or path.with_suffix('.png'))}")
        return
    directory = path if path.is_dir() else path.parent
    if not (directory / STATS_FILE).exists():
        _fail(f"{path}: no {STATS_FILE} (expected a 'neurons find' output)")
    stats, meta = load_statistics(directory)
    percent = parse_percent(top) if top else float(meta.get("top_percent", 1.0))
    console.print(f"model {meta.get('model')}, {meta.get('num_tokens', '?'):,} tokens from "
                  f"{meta.get('corpus')}, vLLM {meta.get('vllm_version')}")
    sets = sorted((directory / SETS_DIR).glob("*.json")) if (directory / SETS_DIR).is_dir() else []
    loaded = []
    for p in sets:
        try:
            loaded.append(NeuronSet.load(p))
        except NeuronSetError as exc:
            console.print(f"[yellow]skipping[/yellow] {exc}")
    table = Table("layer", "tokens", "W1 median", "W1 p99", "W1 max",
                  f"top {percent_label(percent)}%", title="W1 to N(0,1) per layer")
    for i in range(stats["w1"].shape[0]):
        w = stats["w1"][i]
        table.add_row(
            str(i), f"{int(stats['count'][i]):,}", f"{np.nanmedian(w):.4f}",
            f"{np.nanpercentile(w, 99):.4f}", f"{np.nanmax(w):.4f}",
            str(int(top_percent_mask(w, percent).sum())),
        )
    console.print(table)
    if loaded:
        sets_table = Table("set", "method", "seed", "neurons", "per layer", title="neuron sets")
        for ns in loaded:
            counts = ns.counts_per_layer()
            per_layer = " ".join(str(counts.get(i, 0)) for i in range(ns.model.num_layers))
            sets_table.add_row(ns.name, ns.provenance.method, str(ns.provenance.seed),
                               str(ns.num_neurons()), per_layer)
        console.print(sets_table)
    if plot:
        console.print(f"plot: {_plot_w1(stats, meta, png or directory / 'w1_hist.png', percent)}")

