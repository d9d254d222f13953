#!/usr/bin/env bash
# One-shot GPU check for sd_mlperf, in under 8 minutes on one NVIDIA GPU with only PyTorch installed:
#   1. install: the wheels in $WHEEL_DIR (what the GPU machine's image lacks: omegaconf, open_clip_torch,
#      megatron-core, ...) into a separate folder ($SITE_DIR) put on PYTHONPATH, so the image's own packages
#      (torch above all) stay as they are; the package itself imports from the checkout (PYTHONPATH);
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
#                                                        # (for the GPU machine's Python, WHEEL_PYTHON, not this one's)
# Environment: WHEEL_DIR (default .whl), SITE_DIR (default /tmp/sd_mlperf_site), OUT, BUDGET_S (default 450),
# PYTHON (default python3), WHEEL_PYTHON (default 3.12: the GPU machine's Python, for --prepare-wheels),
# SKIP_COMPILE=1 (skip the torch.compile stage: minutes of compiling on a small CPU),
# ARCHIVE (optional: also pack everything under $OUT into this one .tar.gz at the end, for hosts that return
# only a few files; e.g. ARCHIVE=$RESULTS/device_checks.tar.gz OUT=/tmp/device_checks, in that order).
set -uo pipefail

cd "$(dirname "$0")/../.." || exit 2
PYTHON=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}
SITE_DIR=${SITE_DIR:-/tmp/sd_mlperf_site}
WHEEL_PYTHON=${WHEEL_PYTHON:-3.12}
BUDGET_S=${BUDGET_S:-450}
OUT=${OUT:-results/device_checks}
DRY=0
# What the GPU machine's image (PyTorch, numpy, scipy, pillow, pyyaml, tqdm, pytest, psutil, safetensors,
# torchmetrics, timm, huggingface_hub, regex, pandas: /work/.library/device/KINDS.md) lacks, with the
# dependencies it also lacks, pinned to the CPU CI versions (tests/constraints-cpu.txt). About 5.5 MB.
# DALI (about 425 MB) does not fit the 64 MiB that travels: its GPU checks skip there.
WHEELS="omegaconf==2.4.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 webdataset==1.0.2 braceexpand==0.1.7
megatron-core==0.16.1 mlperf-logging==4.1.68"

case "${1:-}" in
  --cpu-dry-run) DRY=1 ;;
  --prepare-wheels)
    dest=${2:-$WHEEL_DIR}
    # Binary wheels for the GPU machine's CPython on x86_64 Linux, whatever this machine runs.
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
             manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
    # shellcheck disable=SC2086  # WHEELS is a list of requirement words
    exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$WHEEL_PYTHON" \
      --implementation cp "${platforms[@]}" -d "$dest" $WHEELS ;;
  "") ;;
  *) echo "usage: $0 [--cpu-dry-run | --prepare-wheels DIR]" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
# ARCHIVE is packed on every exit, an early one (import failure, outer timeout) included: then the logs matter most.
# shellcheck disable=SC2329  # invoked by the EXIT trap below
pack_archive() {
  if [[ -n "${ARCHIVE:-}" ]]; then
    mkdir -p "$(dirname "$ARCHIVE")" && tar -czf "$ARCHIVE" -C "$OUT" . && echo "packed $OUT into $ARCHIVE" >&2
  fi
}
trap pack_archive EXIT
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
export HF_HUB_OFFLINE=1
if compgen -G "$WHEEL_DIR/*.whl" > /dev/null; then
  pip_target=("$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade
              --target "$SITE_DIR")
  # One call for all (wheels sharing a top-level folder stay together); if a wheel does not fit this Python
  # that call installs nothing, so then one call per wheel, and only the misfits are left out.
  if ! "${pip_target[@]}" "$WHEEL_DIR"/*.whl > "$OUT/install.log" 2>&1; then
    failed_wheels=()
    for whl in "$WHEEL_DIR"/*.whl; do
      "${pip_target[@]}" "$whl" >> "$OUT/install.log" 2>&1 || failed_wheels+=("$(basename "$whl")")
    done
    echo "warning: these wheels did not install (see $OUT/install.log): ${failed_wheels[*]}" >&2
  fi
  export PYTHONPATH="$SITE_DIR${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package imports from the checkout, uninstalled
if ! "$PYTHON" -c "import sd_mlperf.bench.train, sd_mlperf.parallel.data_parallel" > "$OUT/import.log" 2>&1; then
  tail -n 5 "$OUT/import.log" >&2
  echo "error: sd_mlperf does not import; put the missing wheels in $WHEEL_DIR" \
       "(on a networked machine: $0 --prepare-wheels $WHEEL_DIR)" >&2
  exit 2
fi
"$PYTHON" - <<'EOF' | tee "$OUT/environment.txt" >&2
import platform, torch
from sd_mlperf.backends import package_available
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
names = ("transformer_engine", "apex.contrib.group_norm", "megatron.core", "nvidia.dali", "open_clip", "triton")
libs = {n: package_available(n) for n in names}
print(f"Python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {gpu}, "
      + ", ".join(f"{k}={v}" for k, v in libs.items()))
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
if [[ "${SKIP_COMPILE:-0}" == 1 ]]; then
  printf 'bench_compile\tskipped (SKIP_COMPILE=1)\t0\n' >> "$SUMMARY"
else
  run_stage bench_compile 180 90 "$PYTHON" -m sd_mlperf bench train --no-base --output "$OUT/bench_compile.json" \
    --variant "compile nhwc graph=$COMPILE_GRAPH: model.unet.channels_last=true model.unet.compile=true \
training.cuda_graph=$COMPILE_GRAPH" \
    "${BENCH[@]}"
fi

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
