"""Layer analysis: where do the Wasserstein neurons that carry syntax sit?

The paper reports that local degradations *accumulate across depth*: ablating the
negative side of one layer's Wasserstein neurons costs little, ablating those of
the first k layers costs more and more as k grows. This module measures both
curves on a discovery run:

- **per layer**: the Wasserstein set restricted to layer ``i``, for each ``i``;
- **first k**: the set restricted to layers ``0 .. k-1``, for ``k = 1 .. L``
  (``k = L`` is the full set, measured again as a check);
- plus the **baseline** (no ablation) and the **full** set itself.

Sets are built by ``negablate neurons control --kind layer / first-k --base SET``
(subprocesses, so ``eval`` stays free of torch), all are served by one
``negablate serve`` (or an already running server, ``--server``), and every
condition is scored over HTTP on a stratified BLiMP subsample and WikiText-2
*test* windows (:mod:`eval.analysis.sweep`: cached and resumable).

Outputs in ``--out``: ``layers.json`` (settings, baseline, full set, one row per
layer, one per k), ``layers.csv`` (the same rows, flat), ``layers.png`` (BLiMP
accuracy drop with 95% CIs and perplexity ratio, against layer and against k),
``sets/`` (the sets), ``runs/<condition>/{blimp,perplexity}`` (run directories
``negablate eval compare`` reads), ``cache/`` and ``logs/``.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel, ConfigDict
from rich.table import Table

from vllm_negablate import defaults, set_names
from vllm_negablate.models import recorded_start_token
from vllm_negablate.neuron_set import NeuronSet

from eval.analysis.sweep import (
    BASELINE,
    CSV_FIELDS,
    Condition,
    ConditionResult,
    EvalSettings,
    check_server_sets,
    condition_done,
    condition_for,
    console,
    evaluate_conditions,
    fmt_drop,
    fmt_ratio,
    serve,
    served_base_name,
    summarize,
)


class LayersConfig(BaseModel):
    """Every knob of a layer analysis (``negablate analyze layers``)."""

    model_config = ConfigDict(extra="forbid")

    model: Path  # HF model directory (tokenizer, and what the server serves)
    discovery: Path  # a `neurons find` output (stats.json, sets/)
    out: Path = Path("report/layers")
    base_set: str | None = None  # default: wasserstein-top{p} of the discovery
    layers: list[int] | None = None  # default: every layer
    ks: list[int] | None = None  # default: 1 .. L
    settings: EvalSettings = EvalSettings()
    server: str | None = None  # use this running server instead of starting one
    served_name: str | None = None  # its base model name (default: from /v1/models)
    admin_key: str | None = None  # upload missing sets to --server
    dtype: str = "float32"
    kv_cache_mb: int = defaults.KV_CACHE_MB
    max_model_len: int | None = None
    max_sets: int | None = None  # resident sets (default: all of them)
    cpu_bind_all_cores: bool = True


class LayersResult(BaseModel):
    model: str
    discovery: str
    base_set: str
    num_layers: int
    settings: EvalSettings
    baseline: ConditionResult
    full: ConditionResult
    layers: list[ConditionResult]
    first_k: list[ConditionResult]
    elapsed_s: float | None = None


# --------------------------------------------------------------------------- sets


def discovery_meta(disc: Path) -> dict[str, Any]:
    path = disc / "stats.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --discovery must be a `negablate neurons find` output "
                                "(or a reproduce run's OUT/discovery)")
    return json.loads(path.read_text())


def default_base_set(meta: dict[str, Any]) -> str:
    return set_names.wasserstein_top(float(meta.get("top_percent", 1.0)))


def build_sets(disc: Path, base: NeuronSet, base_path: Path, sets_dir: Path, layers: list[int],
               ks: list[int], logs: Path) -> dict[str, NeuronSet]:
    """Per-layer and first-k restrictions of ``base`` in ``sets_dir`` (skipped when present).

    Built by ``negablate neurons control --kind layer|first-k --base BASE`` so that the
    analysis and the CLI can never disagree on what a layer set is.
    """
    from eval.commands import negablate_command as _negablate
    from eval.commands import run_logged as _run

    sets_dir.mkdir(parents=True, exist_ok=True)
    names = {"layer": [set_names.layer_restricted(base.name, [i]) for i in layers],
             "first-k": [set_names.layer_restricted(base.name, list(range(k))) for k in ks]}
    args = {"layer": [a for i in layers for a in ("--layer", str(i))],
            "first-k": [a for k in ks for a in ("--k", str(k))]}
    for kind in ("layer", "first-k"):
        if names[kind] and not all((sets_dir / f"{n}.json").is_file() for n in names[kind]):
            _run(_negablate("neurons", "control", str(disc), "--kind", kind, "--base", str(base_path),
                            *args[kind], "--out", str(sets_dir)), logs / "sets.log")
    target = sets_dir / f"{base.name}.json"
    if not target.is_file() or NeuronSet.load(target).content_hash() != base.content_hash():
        shutil.copyfile(base_path, target)
    out = {base.name: NeuronSet.load(target)}
    for n in names["layer"] + names["first-k"]:
        out[n] = NeuronSet.load(sets_dir / f"{n}.json")
    return out


def plan(base: NeuronSet, sets: dict[str, NeuronSet], layers: list[int], ks: list[int]) -> list[Condition]:
    """Baseline, the full set, one condition per layer, one per k (labels: run directories)."""
    conds = [condition_for(BASELINE, "baseline", None), condition_for("full", "full", base)]
    conds += [condition_for(f"layer{i}", "layer", sets[set_names.layer_restricted(base.name, [i])], i)
              for i in layers]
    conds += [condition_for(f"first{k}", "first-k", sets[set_names.layer_restricted(base.name, list(range(k)))], k)
              for k in ks]
    return conds


# --------------------------------------------------------------------------- outputs


def write_csv(result: LayersResult, path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in [result.baseline, result.full, *result.layers, *result.first_k]:
            w.writerow(r.model_dump())
    return path


def plot(result: LayersResult, path: Path) -> Path:
    """Two rows (BLiMP accuracy drop, perplexity ratio) x two columns (per layer, first k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_ppl = result.baseline.ppl is not None
    nrows = 2 if has_ppl else 1
    fig, axes = plt.subplots(nrows, 2, figsize=(10, 3.4 * nrows), squeeze=False)
    base, full = result.baseline, result.full
    for col, (rows, xlabel, title) in enumerate((
        (result.layers, "layer (ablated alone)", "one layer at a time"),
        (result.first_k, "k (layers 0..k-1 ablated)", "first k layers"),
    )):
        x = [r.index for r in rows]
        ax = axes[0][col]
        y = [100 * r.blimp_drop for r in rows]
        err = [[100 * (r.blimp_drop - r.blimp_drop_ci_lo) for r in rows],
               [100 * (r.blimp_drop_ci_hi - r.blimp_drop) for r in rows]]
        ax.errorbar(x, y, yerr=err, fmt="o-", color="#cc3311", capsize=3, label="Wasserstein, negative")
        ax.axhline(0.0, color="#444444", lw=1, label=f"baseline (acc {100 * base.blimp_acc:.1f}%)")
        ax.axhline(100 * full.blimp_drop, color="#4477aa", lw=1, ls="--",
                   label=f"full set ({full.neurons} neurons)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("BLiMP accuracy drop (points)")
        ax.set_title(f"BLiMP, {title} (95% CI)", fontsize=10)
        ax.set_xticks(x)
        ax.legend(fontsize=7)
        if has_ppl:
            ax = axes[1][col]
            ax.plot(x, [r.ppl_ratio for r in rows], "o-", color="#cc3311")
            ax.axhline(1.0, color="#444444", lw=1, label=f"baseline (ppl {base.ppl:.2f})")
            ax.axhline(full.ppl_ratio or 1.0, color="#4477aa", lw=1, ls="--", label="full set")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("perplexity / baseline")
            ax.set_title(f"WikiText-2 test perplexity, {title}", fontsize=10)
            ax.set_xticks(x)
            ax.legend(fontsize=7)
    fig.suptitle(f"{result.base_set}: {Path(result.model).name}, {result.num_layers} layers, "
                 f"{base.blimp_n} BLiMP pairs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_section(result: LayersResult, image: str | None = None) -> str:
    """The depth section of a report: BLiMP drop and perplexity ratio of the full set,
    each layer alone and the first k layers."""
    from eval.stats import format_p

    s = result.settings
    lines = [f"## Depth: {result.base_set} one layer at a time and over the first k layers", "",
             f"{result.baseline.blimp_n:,} BLiMP pairs ({s.blimp_per_paradigm} per paradigm) and "
             f"{s.ppl_windows} WikiText-2 test windows of {s.window} tokens per condition; drop = "
             "baseline accuracy minus the condition's, points [95% paired bootstrap CI] (`layers/layers.csv`).",
             "", "| ablated | neurons | BLiMP drop [95% CI] | p | PPL ratio |", "|---|---:|---:|---:|---:|"]
    for r in [result.full, *result.first_k, *result.layers]:
        lines.append(f"| {r.label} | {r.neurons} | {fmt_drop(r)} | {format_p(r.blimp_p)} | {fmt_ratio(r.ppl_ratio)} |")
    if image:
        lines += ["", f"![Depth]({image})"]
    return "\n".join(lines) + "\n"


def load_result(path: Path) -> LayersResult:
    return LayersResult.model_validate_json(Path(path).read_text())


def print_table(result: LayersResult) -> None:
    t = Table(title=f"layer analysis: {result.base_set}")
    for c in ("condition", "neurons", "BLiMP acc", "drop [95% CI]", "p", "ppl ratio"):
        t.add_column(c, justify="right" if c != "condition" else "left")
    for r in [result.baseline, result.full, *result.layers, *result.first_k]:
        t.add_row(r.label, str(r.neurons), f"{100 * r.blimp_acc:.1f}", fmt_drop(r),
                  f"{r.blimp_p:.3g}", fmt_ratio(r.ppl_ratio))
    console.print(t)


# --------------------------------------------------------------------------- run


def run_layers(cfg: LayersConfig) -> LayersResult:
    """Build the sets, evaluate every condition (resuming), write JSON, CSV and PNG."""
    t0 = time.monotonic()
    if cfg.cpu_bind_all_cores and cfg.server is None:
        from vllm_negablate.offline import bind_worker_to_all_cores

        bind_worker_to_all_cores()
    out = cfg.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2, exclude={"admin_key"}))
    meta = discovery_meta(cfg.discovery)
    n_layers = int(meta["model"]["num_layers"])
    base_name = cfg.base_set or default_base_set(meta)
    base_path = cfg.discovery / "sets" / f"{base_name}.json"
    if not base_path.is_file():
        raise FileNotFoundError(f"{base_path} not found (sets there: "
                                f"{sorted(p.stem for p in (cfg.discovery / 'sets').glob('*.json'))})")
    base = NeuronSet.load(base_path)
    layers = sorted(set(cfg.layers)) if cfg.layers else list(range(n_layers))
    ks = sorted(set(cfg.ks)) if cfg.ks else list(range(1, n_layers + 1))
    bad = [i for i in layers if not 0 <= i < n_layers] + [k for k in ks if not 1 <= k <= n_layers]
    if bad:
        raise ValueError(f"layers must be in 0..{n_layers - 1} and k in 1..{n_layers}; got {bad}")
    sets = build_sets(cfg.discovery, base, base_path, out / "sets", layers, ks, logs)
    conds = plan(base, sets, layers, ks)
    runs = out / "runs"
    cache = out / "cache" / "scores.sqlite"
    start = recorded_start_token(cfg.model)
    console.print(f"[bold]layer analysis[/bold] of {base.name} ({base.num_neurons()} neurons, "
                  f"{n_layers} layers): {len(conds)} conditions")
    pending = [c for c in conds if not condition_done(runs, c, cfg.settings)]
    if pending:
        kw = dict(tokenizer=cfg.model, cache=cache, start_token=start, title="layer analysis")
        if cfg.server:
            served = cfg.served_name or served_base_name(cfg.server)
            check_server_sets(cfg.server, list(sets.values()), served, admin_key=cfg.admin_key)
            evaluate_conditions(cfg.server, pending, runs, cfg.settings, served_name=served, **kw)
        else:
            with serve(cfg.model, out / "sets", logs / "server.log", dtype=cfg.dtype,
                       kv_cache_mb=cfg.kv_cache_mb, max_model_len=cfg.max_model_len,
                       max_sets=cfg.max_sets or len(sets)) as url:
                evaluate_conditions(url, pending, runs, cfg.settings, served_name="model", **kw)
    else:
        console.print("[green]all conditions evaluated earlier[/green]")
    res = {c.label: summarize(runs, c, cfg.settings) for c in conds}
    result = LayersResult(
        model=str(cfg.model), discovery=str(cfg.discovery), base_set=base.name, num_layers=n_layers,
        settings=cfg.settings, baseline=res[BASELINE], full=res["full"],
        layers=[res[f"layer{i}"] for i in layers], first_k=[res[f"first{k}"] for k in ks],
        elapsed_s=round(time.monotonic() - t0, 1),
    )
    (out / "layers.json").write_text(result.model_dump_json(indent=2) + "\n")
    write_csv(result, out / "layers.csv")
    plot(result, out / "layers.png")
    print_table(result)
    console.print(f"[green]wrote[/green] {out / 'layers.json'}, {out / 'layers.csv'}, {out / 'layers.png'}")
    return result


# --------------------------------------------------------------------------- CLI


def _int_list(text: str | None) -> list[int] | None:
    """'0,2,5' or '1-4' or '1-3,8' -> [..]."""
    if not text:
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            out += list(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def register(app: typer.Typer) -> None:
    """Add ``layers`` to ``app`` (mounted as ``negablate analyze``)."""

    @app.command("layers")
    def layers_cmd(
        model: Path = typer.Option(..., "--model", help="HF model directory (the one discovery ran on)."),
        discovery: Path = typer.Option(..., "--discovery",
                                       help="`negablate neurons find` output, e.g. report/discovery."),
        out: Path = typer.Option(Path("report/layers"), "--out", help="Output folder (rerun to resume)."),
        base_set: str | None = typer.Option(None, help="Set to restrict (default: wasserstein-top<p> "
                                                       "of the discovery)."),
        layers: str | None = typer.Option(None, help="Layers to ablate one at a time, e.g. '0-5,9' "
                                                     "(default: all)."),
        ks: str | None = typer.Option(None, "--ks", help="Depths k for first-k, e.g. '1,2,4,8' "
                                                         "(default: 1..L)."),
        blimp_per_paradigm: int = typer.Option(10, help="BLiMP pairs per paradigm (67 paradigms)."),
        ppl_windows: int = typer.Option(4, help="WikiText-2 test windows for perplexity (0: skip)."),
        window: int = typer.Option(defaults.WINDOW_TOKENS, help="Tokens per perplexity window (start token included)."),
        seed: int = typer.Option(0, help="Seed of the BLiMP subsample and the bootstrap."),
        n_boot: int = typer.Option(2000, help="Bootstrap replicates for the CIs."),
        concurrency: int = typer.Option(2, help="Requests in flight."),
        server: str | None = typer.Option(None, help="Use this running `negablate serve` (URL) instead "
                                                     "of starting one; it must hold the sets, or get "
                                                     "--admin-key to upload them."),
        served_name: str | None = typer.Option(None, help="--server: its base model name "
                                                          "(default: the first in /v1/models)."),
        admin_key: str | None = typer.Option(None, envvar="NEGABLATE_ADMIN_KEY",
                                             help="--server: admin key to upload missing sets."),
        dtype: str = typer.Option("float32", help="Model dtype of the started server."),
        kv_cache_mb: int = typer.Option(defaults.KV_CACHE_MB, help="KV cache of the started server (MiB)."),
        max_model_len: int | None = typer.Option(None, help="Started server's max_model_len "
                                                            "(default: the model's)."),
        max_sets: int | None = typer.Option(None, help="Resident sets on the workers (default: all; "
                                                       "fewer are swapped in on use)."),
        cpu_bind_all_cores: bool = typer.Option(True, help="On CPU, give vLLM's worker every core."),
    ) -> None:
        """Ablate the Wasserstein set one layer at a time, and the first k layers.

        Plots BLiMP accuracy drop (paired bootstrap 95% CIs) and perplexity
        ratio against the layer index and against the depth k; writes
        layers.json, layers.csv and layers.png in --out. Every (condition,
        task) is a run directory under --out/runs, cached and resumable:
        rerun the same command after an interruption.

        Example, after `negablate reproduce --out report`:

            negablate analyze layers --model ~/.cache/negablate/models/gemma-3-270m
            --discovery report/discovery --out report/layers --ks 1,2,4,8,12,18
        """
        cfg = LayersConfig(
            model=model, discovery=discovery, out=out, base_set=base_set, layers=_int_list(layers),
            ks=_int_list(ks), server=server, served_name=served_name, admin_key=admin_key,
            dtype=dtype, kv_cache_mb=kv_cache_mb, max_model_len=max_model_len, max_sets=max_sets,
            cpu_bind_all_cores=cpu_bind_all_cores,
            settings=EvalSettings(blimp_per_paradigm=blimp_per_paradigm, ppl_windows=ppl_windows,
                              window=window, seed=seed, n_boot=n_boot, concurrency=concurrency),
        )
        try:
            run_layers(cfg)
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
