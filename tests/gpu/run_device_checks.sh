#!/usr/bin/env bash
# One-shot GPU check for sd_mlperf, in under 8 minutes on one NVIDIA GPU with only PyTorch installed:
#   1. install: the small wheels in $WHEEL_DIR (omegaconf, pyyaml, tqdm, pytest, megatron-core, ...), then
#      this package without dependencies (PYTHONPATH fallback if pip cannot build it offline);
#   2. the GPU tests in tests/gpu (pytest -m gpu; each skips with a reason when its library is absent);
#   3. tests/gpu/device_checks.py: GPU fast paths against their CPU twins, CUDA-graph step against eager;
#   4. the bench table at the full SD2 shape (batch 32 per GPU, 64x64 latents, fp16): eager NCHW, eager
#      NHWC, CUDA graph, bf16; then torch.compile in a separate, time-boxed run;
#   5. a short summary, printed last.
# Every stage is time-boxed against a total budget; logs and JSON go to $OUT (or results/device_checks).
#
# Usage:
#   tests/gpu/run_device_checks.sh                       # on the GPU machine, from the repository root
#   tests/gpu/run_device_checks.sh --cpu-dry-run         # the same stages on the CPU at tiny size (no GPU)
#   tests/gpu/run_device_checks.sh --prepare-wheels DIR  # on a networked machine: download the wheels to DIR
# Environment: WHEEL_DIR (default .whl), OUT, BUDGET_S (default 450), PYTHON (default python).
set -uo pipefail

cd "$(dirname "$0")/../.." || exit 2
PYTHON=${PYTHON:-python}
WHEEL_DIR=${WHEEL_DIR:-.whl}
BUDGET_S=${BUDGET_S:-450}
OUT=${OUT:-results/device_checks}
DRY=0
# The wheels a bare PyTorch machine lacks (pinned to the CPU CI versions); --no-deps keeps torch as it is.
WHEELS="omegaconf==2.4.0 PyYAML==6.0.4 tqdm==4.70.1 numpy==2.4.6 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
packaging==26.3 megatron-core==0.16.1 psutil==7.2.2"

case "${1:-}" in
  --cpu-dry-run) DRY=1 ;;
  --prepare-wheels)
    dest=${2:-$WHEEL_DIR}
    # shellcheck disable=SC2086  # WHEELS is a list of requirement words
    exec "$PYTHON" -m pip download --no-deps --only-binary=:all: -d "$dest" $WHEELS ;;
  "") ;;
  *) echo "usage: $0 [--cpu-dry-run | --prepare-wheels DIR]" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
START=$(date +%s)
SUMMARY="$OUT/stages.tsv"
printf 'stage\tstatus\tseconds\n' > "$SUMMARY"

remaining() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# run_stage NAME MAX_SECONDS MIN_SECONDS CMD...: run CMD with a timeout of min(MAX, budget left - 20 s),
# log to $OUT/NAME.log, record ok / FAIL(rc) / timeout / skipped in stages.tsv.
run_stage() {
  local name=$1 max=$2 min=$3; shift 3
  local left limit t0 rc status
  left=$(( $(remaining) - 20 ))
  limit=$(( max < left ? max : left ))
  if (( limit < min )); then
    printf '%s\tskipped (budget: %ss left)\t0\n' "$name" "$left" >> "$SUMMARY"
    echo "== $name: skipped, ${left}s of budget left" >&2
    return 0
  fi
  echo "== $name (up to ${limit}s)" >&2
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timeout after ${limit}s" ;;
    *) status="FAIL (rc $rc)" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >> "$SUMMARY"
  tail -n 25 "$OUT/$name.log" >&2
}

# -- 1. install -----------------------------------------------------------------------------------
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package imports from the checkout even if pip fails
export HF_HUB_OFFLINE=1
if compgen -G "$WHEEL_DIR/*.whl" > /dev/null; then
  "$PYTHON" -m pip install --no-index --no-deps --quiet "$WHEEL_DIR"/*.whl > "$OUT/install.log" 2>&1 \
    || echo "warning: some wheels in $WHEEL_DIR did not install (see $OUT/install.log)" >&2
fi
"$PYTHON" -m pip install --no-index --no-deps --no-build-isolation --quiet -e . >> "$OUT/install.log" 2>&1 \
  || echo "note: pip could not install the package offline; using PYTHONPATH=$PWD" >&2
if ! "$PYTHON" -c "import sd_mlperf.bench.train, sd_mlperf.parallel.data_parallel" > "$OUT/import.log" 2>&1; then
  tail -n 5 "$OUT/import.log" >&2
  echo "error: sd_mlperf does not import; put the missing wheels in $WHEEL_DIR" \
       "(on a networked machine: $0 --prepare-wheels $WHEEL_DIR)" >&2
  exit 2
fi
"$PYTHON" - <<'EOF' | tee "$OUT/environment.txt" >&2
import importlib.util, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
libs = {n: importlib.util.find_spec(n) is not None for n in ("transformer_engine", "apex", "megatron", "triton")}
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {gpu}, " + ", ".join(f"{k}={v}" for k, v in libs.items()))
EOF

# -- 2. GPU tests ---------------------------------------------------------------------------------
if "$PYTHON" -c "import pytest" 2> /dev/null; then
  run_stage gpu_tests 150 30 "$PYTHON" -m pytest tests/gpu -m gpu -q -rs -p no:cacheprovider \
    --continue-on-collection-errors
else
  printf 'gpu_tests\tskipped (pytest not installed)\t0\n' >> "$SUMMARY"
fi

# -- 3. fast paths against their CPU twins ---------------------------------------------------------
if (( DRY )); then
  run_stage device_checks 120 20 "$PYTHON" tests/gpu/device_checks.py --cpu-dry-run --out "$OUT"
else
  run_stage device_checks 120 30 "$PYTHON" tests/gpu/device_checks.py --out "$OUT"
fi

# -- 4. bench table -------------------------------------------------------------------------------
if (( DRY )); then
  BENCH=(--config conf/smoke.yaml --steps 2 --warmup 1 run.device=cpu training.precision=fp32
         training.micro_batch_size=2 data.image_size=32)
  PREC=fp32
  COMPILE_GRAPH=false  # the dry run still compiles (inductor's CPU backend); graphs need CUDA
else
  # The full SD2 UNet at the per-GPU batch of the best published result. One process, so parallel.backend=torch
  # (world size 1: a plain fused AdamW; no gradient reduce to measure on one GPU).
  BENCH=(--config conf/sd2_mlperf.yaml --steps 15 --warmup 3 run.device=cuda training.precision=fp16
         training.micro_batch_size=32 data.image_size=512 parallel.backend=torch)
  PREC=fp16
  COMPILE_GRAPH=true
fi
run_stage bench_train 240 60 "$PYTHON" -m sd_mlperf bench train --no-base --output "$OUT/bench_train.json" \
  --variant "eager nchw: model.unet.channels_last=false training.cuda_graph=false" \
  --variant "eager nhwc: model.unet.channels_last=true training.cuda_graph=false" \
  --variant "graph nhwc: model.unet.channels_last=true training.cuda_graph=true" \
  --variant "graph nhwc bf16: model.unet.channels_last=true training.cuda_graph=true training.precision=bf16" \
  "${BENCH[@]}"
run_stage bench_compile 180 90 "$PYTHON" -m sd_mlperf bench train --no-base --output "$OUT/bench_compile.json" \
  --variant "compile nhwc graph=$COMPILE_GRAPH: model.unet.channels_last=true model.unet.compile=true \
training.cuda_graph=$COMPILE_GRAPH" \
  "${BENCH[@]}"

# -- 5. summary (last) ----------------------------------------------------------------------------
"$PYTHON" - "$OUT" "$PREC" <<'EOF'
import json, sys
from pathlib import Path
from sd_mlperf.bench.table import format_table
out, prec = Path(sys.argv[1]), sys.argv[2]
print("\n==== sd_mlperf device check summary ====")
print((out / "environment.txt").read_text().strip())
stages = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines()[1:]]
print(format_table([{"stage": s, "status": st, "seconds": int(sec)} for s, st, sec in stages]), end="")
checks = out / "device_checks.json"
if checks.exists():
    rows = json.loads(checks.read_text())
    bad = [r["check"] for r in rows if r["status"] == "FAIL"]
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"device checks: {ok} ok, {len(bad)} FAIL, {len(rows) - ok - len(bad)} skipped" + (f": {bad}" if bad else ""))
rows = []
for name in ("bench_train.json", "bench_compile.json"):
    if (out / name).exists():
        rows += json.loads((out / name).read_text())
if rows:
    cols = ["variant", "precision", "attention", "norm", "batch", "ms_per_step", "images_per_s", "tflop_per_s", "mfu",
            "peak_mem_gib", "status"]
    print(format_table(rows, fmt="markdown", columns=cols), end="")
    best = max((r for r in rows if r.get("images_per_s")), key=lambda r: r["images_per_s"], default=None)
    if best:
        print(f"best: {best['variant']} {best['images_per_s']:.1f} images/s"
              + (f", MFU {best['mfu']:.1%}" if best.get("mfu") else "")
              + (f" (NVIDIA's published H100 rate 137, our goal 185)" if prec == "fp16" else ""))
EOF
failed=$(awk -F'\t' 'NR > 1 && $2 ~ /^FAIL/' "$SUMMARY" | wc -l)
echo "total $(( $(date +%s) - START ))s; logs in $OUT"
exit $(( failed > 0 ))
