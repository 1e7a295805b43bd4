"""Training dynamics: how the Wasserstein ablation's harm changes over training.

The paper's claim: Wasserstein neurons *emerge* during training, and the harm of
ablating their negative side grows with them. Given checkpoints of one model
(Pythia publishes ``step1000`` ... ``step143000``; or local checkpoint folders),
this runs, for each checkpoint,

1. ``negablate neurons find`` on WikiText-2 *valid* (its own Wasserstein set, top
   p% per layer, and the seeded random control with the same per-layer counts);
2. ``negablate serve`` with those sets;
3. baseline / Wasserstein-negative / random-negative on a stratified BLiMP
   subsample (and WikiText-2 *test* perplexity unless ``--ppl-windows 0``), over
   HTTP (:mod:`eval.analysis.sweep`: cached, resumable);

then plots the BLiMP accuracy drop (baseline minus ablated, paired bootstrap 95%
CI) against the training step, one line per condition.

Checkpoints are given as ``LABEL=SOURCE`` where SOURCE is a local model directory
or a hub id with an optional ``@REVISION`` (``step1000=EleutherAI/pythia-70m@step1000``);
hub ids are downloaded once with ``huggingface_hub`` into its cache (network
needed) and then used as local directories. The training step is the last number
in LABEL, or given explicitly as ``LABEL:STEP=SOURCE``.

Outputs in ``--out``: ``dynamics.json``, ``dynamics.csv`` (one row per checkpoint),
``dynamics.png``, and per checkpoint ``checkpoints/<LABEL>/`` with ``discovery/``,
``runs/<condition>/{blimp,perplexity}``, ``cache/``, ``logs/`` and ``result.json``.
Each finished piece is skipped on a rerun.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel, ConfigDict
from rich.table import Table

from vllm_negablate import defaults, set_names
from vllm_negablate.models import recorded_start_token
from vllm_negablate.neuron_set import NeuronSet, percent_label

from eval.analysis.sweep import (
    BASELINE,
    Condition,
    ConditionResult,
    EvalSettings,
    condition_done,
    condition_for,
    console,
    evaluate_conditions,
    fmt_drop,
    fmt_ratio,
    serve,
    summarize,
)
from eval.data import default_data_dir

ABLATIONS = ("wasserstein-negative", "random-negative")
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
HUB_IGNORE = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "*.tflite", "*.gguf", "flax_*", "tf_*"]


class Checkpoint(BaseModel):
    """One point of the training curve."""

    model_config = ConfigDict(extra="forbid")

    label: str  # directory name under checkpoints/
    step: int
    source: str  # local model directory or hub id
    revision: str | None = None  # hub revision (branch, tag or commit)


def parse_checkpoint(spec: str) -> Checkpoint:
    """``LABEL[:STEP]=DIR`` or ``LABEL[:STEP]=HUB_ID[@REVISION]`` -> :class:`Checkpoint`.

    Without ``:STEP`` the step is the last integer in LABEL (``step1000`` -> 1000).
    A SOURCE that exists as a path is a local directory even if it contains ``@``.
    """
    if "=" not in spec:
        raise ValueError(f"checkpoint {spec!r}: expected LABEL=PATH or LABEL=HUB_ID[@REVISION]")
    head, source = spec.split("=", 1)
    head, source = head.strip(), source.strip()
    if ":" in head:
        label, step_text = head.rsplit(":", 1)
        if not step_text.strip().lstrip("-").isdigit():
            raise ValueError(f"checkpoint {spec!r}: step {step_text!r} is not an integer")
        step = int(step_text)
    else:
        label = head
        nums = re.findall(r"\d+", label)
        if not nums:
            raise ValueError(f"checkpoint {spec!r}: no training step in the label {label!r}; "
                             "give it as LABEL:STEP=SOURCE")
        step = int(nums[-1])
    if not LABEL_RE.match(label):
        raise ValueError(f"checkpoint {spec!r}: label {label!r} must be letters, digits, '.', '_' or '-'")
    if not source:
        raise ValueError(f"checkpoint {spec!r}: empty source")
    revision = None
    if not Path(source).expanduser().exists() and "@" in source:
        source, revision = source.rsplit("@", 1)
        if not revision:
            raise ValueError(f"checkpoint {spec!r}: empty revision after '@'")
    return Checkpoint(label=label, step=step, source=source, revision=revision)


def resolve_source(ck: Checkpoint) -> Path:
    """A local model directory for ``ck``: the path itself, or a hub snapshot (downloaded once)."""
    p = Path(ck.source).expanduser()
    if p.is_dir():
        if ck.revision:
            raise ValueError(f"{ck.label}: a revision (@{ck.revision}) makes no sense for the local "
                             f"directory {p}")
        return p.resolve()
    if p.exists() or ck.source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{ck.label}: {ck.source} is not a model directory")
    from huggingface_hub import snapshot_download

    console.print(f"{ck.label}: fetching {ck.source}" + (f"@{ck.revision}" if ck.revision else "")
                  + " from the hub (cached after the first time)")
    return Path(snapshot_download(repo_id=ck.source, revision=ck.revision, ignore_patterns=HUB_IGNORE))


class DynamicsConfig(BaseModel):
    """Every knob of a training-dynamics run (``negablate analyze dynamics``)."""

    model_config = ConfigDict(extra="forbid")

    checkpoints: list[Checkpoint]
    out: Path = Path("report/dynamics")
    top_percent: float = 1.0
    discovery_tokens: int = 32_768
    discovery_window: int = defaults.WINDOW_TOKENS
    corpus: Path | None = None  # default: WikiText-2 valid in the data dir
    settings: EvalSettings = EvalSettings()
    dtype: str = "float32"
    kv_cache_mb: int = defaults.KV_CACHE_MB
    max_model_len: int | None = None
    cpu_bind_all_cores: bool = True


class CheckpointResult(BaseModel):
    label: str
    step: int
    source: str
    revision: str | None = None
    model_dir: str
    num_layers: int
    discovery_tokens: int
    baseline: ConditionResult
    conditions: dict[str, ConditionResult]  # ABLATIONS -> result


class DynamicsResult(BaseModel):
    top_percent: float
    settings: EvalSettings
    checkpoints: list[CheckpointResult]  # sorted by step
    elapsed_s: float | None = None


# --------------------------------------------------------------------------- one checkpoint


def condition_set_names(top_percent: float, seed: int) -> dict[str, str]:
    """The set each checkpoint's ablated conditions serve."""
    return {"wasserstein-negative": set_names.wasserstein_top(top_percent),
            "random-negative": set_names.random_control(top_percent, seed)}


def discover(cfg: DynamicsConfig, model_dir: Path, ck_dir: Path) -> Path:
    """``negablate neurons find`` into ``ck_dir/discovery`` (skipped when it exists)."""
    from eval.commands import negablate_command as _negablate
    from eval.commands import run_logged as _run

    disc = ck_dir / "discovery"
    if (disc / "stats.json").exists():
        meta = json.loads((disc / "stats.json").read_text())
        if float(meta.get("top_percent", -1)) != cfg.top_percent or int(meta.get("seed", -1)) != cfg.settings.seed:
            raise RuntimeError(
                f"{disc} was made with top {meta.get('top_percent')}% and seed {meta.get('seed')}, this run "
                f"asks top {cfg.top_percent:g}% and seed {cfg.settings.seed}: remove {disc} (or use another --out)")
        return disc
    corpus = cfg.corpus or (cfg.settings.data_dir or default_data_dir()) / "wikitext-2" / "valid.txt"
    tmp = ck_dir / "discovery.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    _run(_negablate(
        "neurons", "find", str(model_dir), "--corpus", str(corpus), "--top", f"{cfg.top_percent:g}",
        "--max-tokens", str(cfg.discovery_tokens), "--window", str(cfg.discovery_window),
        "--seed", str(cfg.settings.seed), "--dtype", cfg.dtype, "--kv-cache-mb", str(cfg.kv_cache_mb),
        "--out", str(tmp),
    ), ck_dir / "logs" / "discovery.log")
    tmp.rename(disc)
    return disc


def conditions_of(disc: Path, cfg: DynamicsConfig) -> list[Condition]:
    conds = [condition_for(BASELINE, "baseline", None)]
    for label, name in condition_set_names(cfg.top_percent, cfg.settings.seed).items():
        path = disc / "sets" / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: `neurons find` did not write {name}")
        conds.append(condition_for(label, label, NeuronSet.load(path)))
    return conds


def run_checkpoint(cfg: DynamicsConfig, ck: Checkpoint) -> CheckpointResult:
    """Find, serve and evaluate one checkpoint; every finished piece is skipped."""
    ck_dir = cfg.out / "checkpoints" / ck.label
    (ck_dir / "logs").mkdir(parents=True, exist_ok=True)
    info_path = ck_dir / "checkpoint.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if info and (info.get("source"), info.get("revision")) != (ck.source, ck.revision):
        raise RuntimeError(f"{ck_dir} holds results for {info.get('source')}@{info.get('revision')}, "
                           f"not {ck.source}@{ck.revision}: use another label or --out")
    disc = ck_dir / "discovery"
    runs = ck_dir / "runs"
    done = (disc / "stats.json").exists() and all(
        condition_done(runs, c, cfg.settings) for c in conditions_of(disc, cfg))
    if done and info.get("model_dir"):
        model_dir = Path(info["model_dir"])
        console.print(f"[green]{ck.label}: done earlier[/green]")
    else:
        model_dir = resolve_source(ck)
        info_path.write_text(json.dumps({**ck.model_dump(), "model_dir": str(model_dir)}, indent=2) + "\n")
        console.print(f"[bold]{ck.label}[/bold] (step {ck.step}): {model_dir}")
        disc = discover(cfg, model_dir, ck_dir)
        conds = conditions_of(disc, cfg)
        pending = [c for c in conds if not condition_done(runs, c, cfg.settings)]
        if pending:
            with serve(model_dir, disc / "sets", ck_dir / "logs" / "server.log", dtype=cfg.dtype,
                       kv_cache_mb=cfg.kv_cache_mb, max_model_len=cfg.max_model_len) as url:
                evaluate_conditions(url, pending, runs, cfg.settings, tokenizer=model_dir,
                                    cache=ck_dir / "cache" / "scores.sqlite",
                                    start_token=recorded_start_token(model_dir), cache_namespace=ck.label,
                                    title=f"{ck.label} (step {ck.step})")
    conds = conditions_of(disc, cfg)
    res = {c.label: summarize(runs, c, cfg.settings) for c in conds}
    meta = json.loads((disc / "stats.json").read_text())
    result = CheckpointResult(
        label=ck.label, step=ck.step, source=ck.source, revision=ck.revision, model_dir=str(model_dir),
        num_layers=int(meta["model"]["num_layers"]), discovery_tokens=int(meta["num_tokens"]),
        baseline=res[BASELINE], conditions={a: res[a] for a in ABLATIONS},
    )
    (ck_dir / "result.json").write_text(result.model_dump_json(indent=2) + "\n")
    return result


# --------------------------------------------------------------------------- outputs


def csv_rows(result: DynamicsResult) -> list[dict[str, Any]]:
    rows = []
    for c in result.checkpoints:
        row: dict[str, Any] = {"label": c.label, "step": c.step, "source": c.source,
                               "revision": c.revision or "", "num_layers": c.num_layers,
                               "baseline_acc": c.baseline.blimp_acc, "blimp_n": c.baseline.blimp_n,
                               "baseline_ppl": c.baseline.ppl}
        for name, r in c.conditions.items():
            row.update({f"{name}_neurons": r.neurons, f"{name}_acc": r.blimp_acc,
                        f"{name}_drop": r.blimp_drop, f"{name}_drop_ci_lo": r.blimp_drop_ci_lo,
                        f"{name}_drop_ci_hi": r.blimp_drop_ci_hi, f"{name}_p": r.blimp_p,
                        f"{name}_ppl_ratio": r.ppl_ratio})
        rows.append(row)
    return rows


def write_csv(result: DynamicsResult, path: Path) -> Path:
    rows = csv_rows(result)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


COLOURS = {"wasserstein-negative": "#cc3311", "random-negative": "#4477aa"}


def plot(result: DynamicsResult, path: Path) -> Path:
    """BLiMP accuracy drop vs step (95% CIs), BLiMP accuracy vs step, and perplexity ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cks = result.checkpoints
    steps = [c.step for c in cks]
    has_ppl = cks[0].baseline.ppl is not None
    fig, axes = plt.subplots(1, 3 if has_ppl else 2, figsize=(5.0 * (3 if has_ppl else 2), 3.6), squeeze=False)
    axes = axes[0]
    logx = min(steps) > 0 and max(steps) / min(steps) >= 10
    for name in ABLATIONS:
        rs = [c.conditions[name] for c in cks]
        y = [100 * r.blimp_drop for r in rs]
        err = [[100 * (r.blimp_drop - r.blimp_drop_ci_lo) for r in rs],
               [100 * (r.blimp_drop_ci_hi - r.blimp_drop) for r in rs]]
        axes[0].errorbar(steps, y, yerr=err, fmt="o-", capsize=3, color=COLOURS.get(name), label=name)
        axes[1].plot(steps, [100 * r.blimp_acc for r in rs], "o-", color=COLOURS.get(name), label=name)
        if has_ppl:
            axes[2].plot(steps, [r.ppl_ratio for r in rs], "o-", color=COLOURS.get(name), label=name)
    axes[0].axhline(0.0, color="#444444", lw=1, label="baseline")
    axes[0].set_ylabel("BLiMP accuracy drop (points)")
    axes[0].set_title("accuracy drop vs baseline (95% CI)", fontsize=10)
    axes[1].plot(steps, [100 * c.baseline.blimp_acc for c in cks], "o-", color="#444444", label="baseline")
    axes[1].set_ylabel("BLiMP accuracy (%)")
    axes[1].set_title("BLiMP accuracy", fontsize=10)
    if has_ppl:
        axes[2].axhline(1.0, color="#444444", lw=1, label="baseline")
        axes[2].set_ylabel("perplexity / baseline")
        axes[2].set_title("WikiText-2 test perplexity ratio", fontsize=10)
    for ax in axes:
        ax.set_xlabel("training step")
        if logx:
            ax.set_xscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(f"Wasserstein top {percent_label(result.top_percent)}% per checkpoint, "
                 f"{cks[0].baseline.blimp_n} BLiMP pairs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(result: DynamicsResult) -> None:
    t = Table(title="training dynamics (BLiMP accuracy drop, points)")
    for c in ("checkpoint", "step", "baseline acc", *ABLATIONS, "W. ppl ratio"):
        t.add_column(c, justify="left" if c == "checkpoint" else "right")
    for c in result.checkpoints:
        t.add_row(c.label, str(c.step), f"{100 * c.baseline.blimp_acc:.1f}",
                  *(fmt_drop(c.conditions[a]) for a in ABLATIONS),
                  fmt_ratio(c.conditions["wasserstein-negative"].ppl_ratio))
    console.print(t)


# --------------------------------------------------------------------------- run


def run_dynamics(cfg: DynamicsConfig) -> DynamicsResult:
    """Every checkpoint in turn (one discovery engine and one server each), then the outputs."""
    t0 = time.monotonic()
    if not cfg.checkpoints:
        raise ValueError("no checkpoints given")
    labels = [c.label for c in cfg.checkpoints]
    if len(set(labels)) != len(labels):
        raise ValueError(f"checkpoint labels must be unique: {labels}")
    if cfg.cpu_bind_all_cores:
        from vllm_negablate.offline import bind_worker_to_all_cores

        bind_worker_to_all_cores()
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "config.json").write_text(cfg.model_dump_json(indent=2))
    results = []
    for i, ck in enumerate(sorted(cfg.checkpoints, key=lambda c: c.step), start=1):
        console.rule(f"checkpoint {i}/{len(cfg.checkpoints)}: {ck.label} (step {ck.step})")
        results.append(run_checkpoint(cfg, ck))
    result = DynamicsResult(top_percent=cfg.top_percent, settings=cfg.settings, checkpoints=results,
                            elapsed_s=round(time.monotonic() - t0, 1))
    (cfg.out / "dynamics.json").write_text(result.model_dump_json(indent=2) + "\n")
    write_csv(result, cfg.out / "dynamics.csv")
    plot(result, cfg.out / "dynamics.png")
    print_table(result)
    console.print(f"[green]wrote[/green] {cfg.out / 'dynamics.json'}, {cfg.out / 'dynamics.csv'}, "
                  f"{cfg.out / 'dynamics.png'}")
    return result


# --------------------------------------------------------------------------- CLI


def register(app: typer.Typer) -> None:
    """Add ``dynamics`` to ``app`` (mounted as ``negablate analyze``)."""

    @app.command("dynamics")
    def dynamics_cmd(
        checkpoint: list[str] = typer.Option(
            ..., "--checkpoint", "-c",
            help="LABEL=DIR, LABEL=HUB_ID[@REVISION] or LABEL:STEP=...; repeat for each checkpoint. "
                 "The step is the last number in LABEL unless given (step1000=... -> 1000)."),
        out: Path = typer.Option(Path("report/dynamics"), "--out", help="Output folder (rerun to resume)."),
        top: float = typer.Option(1.0, help="Percent of neurons per layer in each checkpoint's Wasserstein set."),
        discovery_tokens: int = typer.Option(32768, help="WikiText-2 valid tokens observed per checkpoint."),
        discovery_window: int = typer.Option(defaults.WINDOW_TOKENS, help="Tokens per discovery window."),
        corpus: Path | None = typer.Option(None, help="Discovery corpus (default: WikiText-2 valid)."),
        blimp_per_paradigm: int = typer.Option(10, help="BLiMP pairs per paradigm (67 paradigms)."),
        ppl_windows: int = typer.Option(4, help="WikiText-2 test windows for perplexity (0: skip)."),
        window: int = typer.Option(defaults.WINDOW_TOKENS, help="Tokens per perplexity window (start token included)."),
        seed: int = typer.Option(0, help="Seed of the random control, the BLiMP subsample and the bootstrap."),
        n_boot: int = typer.Option(2000, help="Bootstrap replicates for the CIs."),
        concurrency: int = typer.Option(2, help="Requests in flight."),
        dtype: str = typer.Option("float32", help="Model dtype (discovery and serving)."),
        kv_cache_mb: int = typer.Option(defaults.KV_CACHE_MB, help="KV cache per engine (MiB)."),
        max_model_len: int | None = typer.Option(None, help="Server max_model_len (default: the model's)."),
        cpu_bind_all_cores: bool = typer.Option(True, help="On CPU, give vLLM's worker every core."),
    ) -> None:
        """Find, ablate and evaluate each training checkpoint; plot the harm against the step.

        For every checkpoint: neurons find (its own Wasserstein set and
        random control), then negablate serve, then baseline,
        wasserstein-negative and random-negative on BLiMP (and perplexity).
        Writes dynamics.json, dynamics.csv and dynamics.png in --out;
        finished checkpoints are skipped on a rerun.

        Pythia checkpoints (network needed once, then cached):

            negablate analyze dynamics --out report/dynamics
            -c step1000=EleutherAI/pythia-70m@step1000
            -c step8000=EleutherAI/pythia-70m@step8000
            -c step143000=EleutherAI/pythia-70m

        Local folders: -c step1=ckpts/a -c step2=ckpts/b, or -c early:500=ckpts/a.
        """
        try:
            cks = [parse_checkpoint(s) for s in checkpoint]
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--checkpoint") from None
        cfg = DynamicsConfig(
            checkpoints=cks, out=out, top_percent=top, discovery_tokens=discovery_tokens,
            discovery_window=discovery_window, corpus=corpus, dtype=dtype, kv_cache_mb=kv_cache_mb,
            max_model_len=max_model_len, cpu_bind_all_cores=cpu_bind_all_cores,
            settings=EvalSettings(blimp_per_paradigm=blimp_per_paradigm, ppl_windows=ppl_windows,
                                  window=window, seed=seed, n_boot=n_boot, concurrency=concurrency),
        )
        try:
            run_dynamics(cfg)
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
