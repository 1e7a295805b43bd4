"""How many perplexity evaluations the matched-control search needs: interpolation vs halving.

    .venv/bin/python bench/matching_search.py                      # every committed search
    .venv/bin/python bench/matching_search.py SET.json ... --json out.json

Each perplexity-matched set records the search that made it (``provenance.source``:
target, tolerance, and every (fraction, perplexity) it measured). The curve through
those points (piecewise linear in log fraction, flat beyond them) stands in for the
model, and both ways of narrowing the bracket (:func:`perplexity_matched` with
``interpolate`` on and off) run on it from the same start, with the same tolerance and
resolution, up to ``--max-iter`` evaluations. An evaluation costs a pass over the
held-out tokens with a new set (about 15 s for SmolLM2-135M on 16,384 tokens here), so
fewer evaluations is the whole speed of the search; the curve is what the real searches
saw, not a model of it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from vllm_negablate.discovery.matching import perplexity_matched

REPO = Path(__file__).resolve().parents[1]


def recorded_curve(history: list[list[float]]):
    """Perplexity as a function of the fraction through the recorded points."""
    pts = sorted({f: p for f, p in history if f > 0}.items())
    xs, ys = np.log([f for f, _ in pts]), [p for _, p in pts]
    return lambda f: float(np.interp(np.log(max(f, 1e-12)), xs, ys))


def replay(path: Path, max_iter: int) -> dict | None:
    """Both searches on one recorded curve; None for a set without a recorded search."""
    data = json.loads(path.read_text())
    src = data.get("provenance", {}).get("source", {})
    history, target, tol = src.get("history"), src.get("target_perplexity"), src.get("tolerance")
    if not history or target is None or tol is None:
        return None
    start = history[0][0]  # the Wasserstein set's own count, as a fraction of the candidates
    curve = recorded_curve(history)
    out = {"set": str(path.relative_to(REPO) if path.is_relative_to(REPO) else path), "target": target,
           "tolerance": tol, "recorded_evaluations": len(history)}
    for name, interpolate in (("interpolate", True), ("halve", False)):
        res = perplexity_matched(curve, target, src.get("candidates"), tol=tol, max_iter=max_iter, start_frac=start,
                                 interpolate=interpolate)
        out[name] = {"evaluations": res.iterations, "converged": res.converged,
                     "gap": res.perplexity / target - 1, "fraction": res.fraction}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sets", nargs="*", type=Path,
                    help="perplexity-matched set files (default: every one under docs/results)")
    ap.add_argument("--max-iter", type=int, default=20, help="evaluations each search may spend")
    ap.add_argument("--json", type=Path, help="write every number here")
    args = ap.parse_args(argv)
    paths = args.sets or sorted((REPO / "docs" / "results").glob("**/sets/perplexity-matched*.json"))
    rows = [r for r in (replay(p, args.max_iter) for p in paths) if r is not None]
    if not rows:
        raise SystemExit("no set with a recorded search found")
    print(f"{'set':<72} {'interp':>7} {'halve':>7}  (evaluations to converge; * = not within tolerance)")
    for r in rows:
        cells = [f"{r[m]['evaluations']}{'' if r[m]['converged'] else '*'}" for m in ("interpolate", "halve")]
        print(f"{r['set']:<72} {cells[0]:>7} {cells[1]:>7}")
    mean = {m: statistics.fmean(r[m]["evaluations"] for r in rows) for m in ("interpolate", "halve")}
    within8 = {m: sum(r[m]["converged"] and r[m]["evaluations"] <= 8 for r in rows) for m in mean}
    ratio = mean["halve"] / mean["interpolate"]
    print(f"mean evaluations: interpolate {mean['interpolate']:.2f}, halve {mean['halve']:.2f} "
          f"(ratio halve / interpolate: {ratio:.2f}x); converged within 8: "
          f"interpolate {within8['interpolate']}/{len(rows)}, halve {within8['halve']}/{len(rows)}")
    result = {"rows": rows, "mean_evaluations": mean, "ratio": ratio, "converged_within_8": within8,
              "max_iter": args.max_iter}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
