"""What bfloat16 does to the results: pair decisions and ablation deltas against float32.

bfloat16 scoring is about 1.7x faster than float32 on CPUs with bf16 units, but its
log-probabilities differ from float32's by up to a nat or two per sentence. Whether
that matters is a question about the *results*: this analysis serves the same model
in each dtype, scores the same BLiMP pairs under the baseline (``none``) and under
each given neuron set, and reports

* **decision flips**: pairs whose right/wrong outcome differs between the dtypes,
  per paradigm and overall, for every condition;
* **ablation deltas**: ``acc(set) - acc(baseline)`` in each dtype with its paired
  bootstrap 95% CI, and the *difference of the deltas* (bf16 minus fp32, per pair
  ``(c_bf - b_bf) - (c_fp - b_fp)``), bootstrapped over pairs: the dtypes agree on
  an effect when that CI contains 0.

Everything goes through ``negablate serve`` over HTTP (one server per dtype,
:func:`eval.analysis.sweep.serve`) and the shared evaluation loop
(:func:`eval.analysis.sweep.evaluate_conditions`), so it resumes from its run
folders and score cache (keyed by the server's dtype) after an interruption.
Writes ``precision.json``, ``paradigms.csv``, ``REPORT.md`` and ``flips.png``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import typer
from pydantic import BaseModel

from vllm_negablate import defaults
from vllm_negablate.neuron_set import NeuronSet
from vllm_negablate.precision import DTYPES, DtypeError, check_dtype_runnable

from eval.analysis.sweep import BASELINE, Condition, EvalSettings, condition_for, console
from eval.stats import bootstrap_mean_ci

REFERENCE, FAST = "float32", "bfloat16"


class ParadigmFlips(BaseModel):
    condition: str
    paradigm: str
    n: int
    flips: int  # pairs right in one dtype and wrong in the other
    acc_fp32: float
    acc_bf16: float


class DeltaAgreement(BaseModel):
    """One set's ablation effect in both dtypes, on the same pairs."""

    condition: str
    n: int
    delta_fp32: float
    ci_fp32: tuple[float, float]
    delta_bf16: float
    ci_bf16: tuple[float, float]
    diff: float  # delta_bf16 - delta_fp32
    diff_ci: tuple[float, float]
    agree: bool  # diff_ci contains 0


class PrecisionResult(BaseModel):
    model: str
    blimp_per_paradigm: int
    n_pairs: int
    conditions: list[str]
    flips_overall: dict[str, int]  # condition -> flipped pairs
    flip_rate_overall: dict[str, float]
    max_paradigm_flip_rate: dict[str, float]
    paradigms: list[ParadigmFlips]
    deltas: list[DeltaAgreement]


# --------------------------------------------------------------------------- statistics


def _correct(records: Sequence[dict[str, Any]]) -> dict[tuple[str, int], tuple[bool, str]]:
    return {(r["paradigm"], int(r["pair_id"])): (bool(r["correct"]), r["paradigm"]) for r in records}


def aligned(a: Sequence[Any], b: Sequence[Any]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Paradigm labels and the correct arrays of two runs on the same pairs."""
    ca, cb = _correct(a), _correct(b)
    if ca.keys() != cb.keys():
        raise ValueError(f"the runs cover different pairs ({len(ca)} vs {len(cb)})")
    keys = sorted(ca)
    return ([ca[k][1] for k in keys], np.array([ca[k][0] for k in keys]), np.array([cb[k][0] for k in keys]))


def paradigm_flips(condition: str, fp32: Sequence[Any], bf16: Sequence[Any]) -> list[ParadigmFlips]:
    labels, a, b = aligned(fp32, bf16)
    rows = []
    for p in sorted(set(labels)):
        m = np.array([lab == p for lab in labels])
        rows.append(ParadigmFlips(condition=condition, paradigm=p, n=int(m.sum()),
                                  flips=int((a[m] != b[m]).sum()),
                                  acc_fp32=float(a[m].mean()), acc_bf16=float(b[m].mean())))
    return rows


def delta_agreement(condition: str, base_fp: Sequence[Any], cond_fp: Sequence[Any],
                    base_bf: Sequence[Any], cond_bf: Sequence[Any], *, n_boot: int = 2000,
                    seed: int = 0) -> DeltaAgreement:
    """The set's accuracy delta in each dtype, and whether the dtypes agree on it."""
    _, b_fp, c_fp = aligned(base_fp, cond_fp)
    _, b_bf, c_bf = aligned(base_bf, cond_bf)
    aligned(base_fp, base_bf)  # same pairs across dtypes too
    d_fp = c_fp.astype(np.int8) - b_fp.astype(np.int8)
    d_bf = c_bf.astype(np.int8) - b_bf.astype(np.int8)
    diff = (d_bf - d_fp).astype(np.float64)
    ci = bootstrap_mean_ci(diff, n_boot, 0.05, seed)
    return DeltaAgreement(
        condition=condition, n=int(d_fp.size),
        delta_fp32=float(d_fp.mean()), ci_fp32=bootstrap_mean_ci(d_fp, n_boot, 0.05, seed),
        delta_bf16=float(d_bf.mean()), ci_bf16=bootstrap_mean_ci(d_bf, n_boot, 0.05, seed),
        diff=float(diff.mean()), diff_ci=ci, agree=ci[0] <= 0.0 <= ci[1])


# --------------------------------------------------------------------------- running


def run_precision(model_dir: Path, sets: Sequence[NeuronSet], out: Path, *, model_label: str,
                  blimp_per_paradigm: int, seed: int = 0, n_boot: int = 2000,
                  kv_cache_mb: int = defaults.KV_CACHE_MB, data_dir: Path | None = None,
                  start_token: int | None = None) -> PrecisionResult:
    """Serve ``model_dir`` in float32 then bfloat16, score baseline + ``sets`` on the same
    BLiMP subsample in each, and write the comparison under ``out``."""
    from eval.analysis.sweep import evaluate_conditions, serve
    from eval.tasks import load_records

    settings = EvalSettings(blimp_per_paradigm=blimp_per_paradigm, ppl_windows=0, seed=seed,
                            n_boot=n_boot, data_dir=data_dir, batch_size=defaults.SENTENCES_PER_REQUEST, concurrency=4)
    conditions: list[Condition] = [condition_for(BASELINE, BASELINE, None)]
    conditions += [condition_for(ns.name, ns.name, ns) for ns in sets]
    sets_dir = out / "sets"
    sets_dir.mkdir(parents=True, exist_ok=True)
    for ns in sets:
        ns.save(sets_dir / f"{ns.name}.json")
    for dtype in DTYPES:
        runs = out / dtype / "runs"
        with serve(model_dir, sets_dir, out / dtype / "server.log", dtype=dtype,
                   kv_cache_mb=kv_cache_mb, max_sets=len(sets) + 1) as url:
            evaluate_conditions(url, conditions, runs, settings, tokenizer=model_dir,
                                cache=out / "cache" / "scores.sqlite", start_token=start_token,
                                title=f"precision {dtype}")
    records = {(dtype, c.label): load_records(out / dtype / "runs" / c.label / "blimp")
               for dtype in DTYPES for c in conditions}
    paradigms: list[ParadigmFlips] = []
    for c in conditions:
        paradigms += paradigm_flips(c.label, records[REFERENCE, c.label], records[FAST, c.label])
    deltas = [delta_agreement(c.label, records[REFERENCE, BASELINE], records[REFERENCE, c.label],
                              records[FAST, BASELINE], records[FAST, c.label], n_boot=n_boot, seed=seed)
              for c in conditions[1:]]
    labels = [c.label for c in conditions]
    n_pairs = sum(r.n for r in paradigms if r.condition == BASELINE)
    flips = {lab: sum(r.flips for r in paradigms if r.condition == lab) for lab in labels}
    result = PrecisionResult(
        model=model_label, blimp_per_paradigm=blimp_per_paradigm, n_pairs=n_pairs, conditions=labels,
        flips_overall=flips, flip_rate_overall={k: v / n_pairs for k, v in flips.items()},
        max_paradigm_flip_rate={lab: max(r.flips / r.n for r in paradigms if r.condition == lab)
                                for lab in labels},
        paradigms=paradigms, deltas=deltas)
    write_outputs(result, out)
    return result


def write_outputs(result: PrecisionResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(result.model_dump_json(indent=2))
    with (out / "paradigms.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ParadigmFlips.model_fields))
        w.writeheader()
        for r in result.paradigms:
            w.writerow(r.model_dump())
    (out / "REPORT.md").write_text(report_markdown(result))
    _plot(result, out / "flips.png")


def report_markdown(r: PrecisionResult) -> str:
    lines = [f"# bfloat16 against float32: {r.model}", "",
             f"BLiMP, {r.blimp_per_paradigm} pairs per paradigm ({r.n_pairs} pairs), the same pairs "
             "scored by `negablate serve` in each dtype.", "",
             "| condition | pairs whose decision flips | flip rate | worst paradigm |", "|---|---:|---:|---:|"]
    for c in r.conditions:
        lines.append(f"| {c} | {r.flips_overall[c]} | {100 * r.flip_rate_overall[c]:.2f}% | "
                     f"{100 * r.max_paradigm_flip_rate[c]:.1f}% |")
    lines += ["", "| set | delta fp32 (pts, 95% CI) | delta bf16 | bf16 - fp32 | agree |",
              "|---|---:|---:|---:|---|"]
    for d in r.deltas:
        pts = lambda v, ci: f"{100 * v:+.2f} [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"  # noqa: E731
        lines.append(f"| {d.condition} | {pts(d.delta_fp32, d.ci_fp32)} | {pts(d.delta_bf16, d.ci_bf16)} | "
                     f"{pts(d.diff, d.diff_ci)} | {'yes' if d.agree else 'no'} |")
    lines += ["", "Per paradigm: `paradigms.csv`; all numbers: `precision.json`.", ""]
    return "\n".join(lines)


def _plot(r: PrecisionResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = [p for p in r.paradigms if p.condition == BASELINE]
    fig, ax = plt.subplots(figsize=(max(8, len(base) * 0.18), 3.5))
    ax.bar(range(len(base)), [100 * p.flips / p.n for p in base], color="tab:blue")
    ax.set_xticks(range(len(base)), [p.paradigm for p in base], rotation=90, fontsize=5)
    ax.set_ylabel("decisions flipped (%)")
    ax.set_title(f"{r.model}: BLiMP pair decisions, bfloat16 vs float32 (baseline)")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI


def register(app: typer.Typer) -> None:
    """Add ``precision`` to ``app`` (mounted as ``negablate analyze``)."""

    @app.command("precision")
    def precision_cmd(
        model: str = typer.Option(..., "--model", help="Embedded model name (fetched once) or HF model dir."),
        sets: list[Path] = typer.Option([], "--set", help="Neuron-set JSON to compare (repeatable), e.g. "
                                                          "report/discovery/sets/wasserstein-top1.json."),
        out: Path = typer.Option(Path("report/precision"), "--out", help="Output folder (rerun to resume)."),
        blimp_per_paradigm: int = typer.Option(200, help="BLiMP pairs per paradigm (67 paradigms)."),
        seed: int = typer.Option(0, help="Seed of the subsample and the bootstrap."),
        n_boot: int = typer.Option(2000, help="Bootstrap replicates."),
        kv_cache_mb: int = typer.Option(defaults.KV_CACHE_MB, help="KV cache of each server (MiB)."),
        cpu_bind_all_cores: bool = typer.Option(True, help="On CPU, give vLLM's worker every core."),
    ) -> None:
        """Measure what bfloat16 changes: BLiMP decision flips per paradigm and the
        ablation deltas of each --set, against float32 on the same pairs.

        Serves the model in float32, then bfloat16 (one `negablate serve` each), scores
        the baseline and every set, and writes precision.json, paradigms.csv, REPORT.md
        and flips.png in --out. Interrupted? Run the same command again.

        Example: negablate analyze precision --model smollm2-135m
            --set report/discovery/sets/wasserstein-top1.json
            --set report/discovery/sets/random-top1-s0.json --out docs/results/precision/smollm2-135m
        """
        from vllm_negablate.offline import bind_worker_to_all_cores
        from vllm_negablate.models import recorded_start_token, resolve_model

        try:
            check_dtype_runnable(FAST)
        except DtypeError as e:
            console.print(f"[bold red]error:[/bold red] {e}")
            raise typer.Exit(2) from None
        loaded = []
        for path in sets:
            try:
                loaded.append(NeuronSet.load(path))
            except Exception as e:  # noqa: BLE001 - any unreadable set: say which and stop
                console.print(f"[bold red]error:[/bold red] {path}: {e}")
                raise typer.Exit(2) from None
        if cpu_bind_all_cores:
            bind_worker_to_all_cores()
        model_dir = Path(resolve_model(model))
        result = run_precision(model_dir, loaded, out, model_label=Path(model).name,
                               blimp_per_paradigm=blimp_per_paradigm, seed=seed, n_boot=n_boot,
                               kv_cache_mb=kv_cache_mb, start_token=recorded_start_token(model_dir))
        console.print(report_markdown(result))
        console.print(f"wrote {out}/")
