#!/usr/bin/env bash
# One-shot GPU check for sd_mlperf, in about 8 minutes on one NVIDIA GPU with only PyTorch installed (stages measured
# on an H200, 2026-11-29: docs/gpu_runs/2026-11-29_h200.md).
# First the install: the wheels in $WHEEL_DIR (what the GPU machine's image lacks: omegaconf, open_clip_torch,
# megatron-core, ...) go into a separate folder ($SITE_DIR) put on PYTHONPATH, so the image's own packages
# (torch above all) stay as they are; the package itself imports from the checkout (PYTHONPATH).
# Then the stages, most valuable first: each is time-boxed against what is left of a total budget, so when
# time runs short it is the least valuable checks that go.
#   1. device_checks   tests/gpu/device_checks.py: each GPU fast path loads the CPU twin's weights with
#                      strict=True and matches its outputs and gradients; a training step without host sync;
#                      the CUDA-graph step against the eager one;
#   2. gpu_tests_core  pytest -m gpu on the model, training and data-parallel tests (TE and apex kernels
#                      against their twins, the full-size step, CUDA graph, kill and resume, megatron-core);
#   3. bench_train     the bench table at the full SD2 shape (batch 32 per GPU, 64x64 latents, fp16): eager
#                      NCHW, eager NHWC, CUDA graph, bf16 (tests/gpu/bench_stage.py: a failed row fails it);
#   4. gpu_tests_slow  pytest -m gpu on image decoding (nvjpeg, DALI) and evaluation (Inception, DDIM, FID);
#   5. bench_compile   the bench with torch.compile, in a run of its own: minutes of compiling.
# Then a summary table and, last, one line: "device checks: N passed, N failed, N skipped, N timed out".
#
# Outcomes: a stage passes on exit 0 and fails on any other exit status (its log keeps the traceback). It is
# skipped, with its reason, only when it exits 77 after printing a "SKIP: <reason>" line (a backend this
# machine lacks), when too little budget is left to start it, or on request (SKIP_COMPILE=1). A stage cut off
# at its time limit is "timed out", which counts as a failure. Exit status: 1 if any stage failed or timed
# out, 2 if sd_mlperf does not import (or on a usage error), else 0. Logs and JSON go to $OUT.
#
# Usage:
#   tests/gpu/run_device_checks.sh                       # on the GPU machine, from the repository root
#   tests/gpu/run_device_checks.sh --cpu-dry-run         # the same stages on the CPU at tiny size (no GPU)
#   tests/gpu/run_device_checks.sh --prepare-wheels DIR  # on a networked machine: download the wheels to DIR
#                                                        # (for the GPU machine's Python, WHEEL_PYTHON, not this one's)
# Environment: WHEEL_DIR (default .whl), SITE_DIR (default sd_mlperf_site in $TMPDIR), OUT (default
# results/device_checks), BUDGET_S (default 540), PYTHON (default python3), WHEEL_PYTHON (default 3.12: the
# GPU machine's Python, for --prepare-wheels), SKIP_COMPILE=1 (skip the torch.compile stage: minutes of
# compiling on a small CPU), STAGE_LIMIT_S (give every stage exactly this time limit, whatever the budget:
# for quick reruns, and for the tests of the stage runner, which stand a fake PYTHON in for the stages),
# ARCHIVE (optional: also pack everything under $OUT into this one .tar.gz on every exit, for hosts that
# return only a few files; it must lie outside $OUT).
set -uo pipefail

cd "$(dirname "$0")/../.." || exit 2
PYTHON=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}
SITE_DIR=${SITE_DIR:-${TMPDIR:-/tmp}/sd_mlperf_site}
WHEEL_PYTHON=${WHEEL_PYTHON:-3.12}
BUDGET_S=${BUDGET_S:-540}
OUT=${OUT:-results/device_checks}
DRY=0
SKIP_EXIT=77  # a stage that exits with this status after a "SKIP: <reason>" line is skipped, for that reason
# What the GPU machine's image (PyTorch, numpy, scipy, pillow, pyyaml, tqdm, pytest, psutil, safetensors,
# torchmetrics, timm, huggingface_hub, regex, pandas) lacks, with the dependencies it also lacks, pinned to
# the CPU CI versions (tests/constraints-cpu.txt). About 5.5 MB.
# DALI (about 425 MB) does not fit the 64 MiB that travels: its GPU checks skip there.
WHEELS="omegaconf==2.4.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
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

# shellcheck source=tests/gpu/stage_runner.sh
. tests/gpu/stage_runner.sh
stages_start

# -- install ---------------------------------------------------------------------------------------
install_wheels
print_environment

if (( DRY )); then
  BENCH=(--config conf/smoke.yaml --steps 2 --warmup 1 run.device=cpu training.precision=fp32
         training.micro_batch_size=2 data.image_size=32)
  PREC=fp32
  COMPILE_GRAPH=false  # the dry run still compiles (inductor's CPU backend); graphs need CUDA
else
  # The full SD2 UNet at the per-GPU batch of the best published result. One process, so parallel.backend=torch
  # (world size 1: a plain fused AdamW; no gradient reduce to measure on one GPU).
  # The eager/graph rows run uncompiled (the config compiles: that is bench_compile's row, minutes of compiling).
  BENCH=(--config conf/sd2_mlperf.yaml --steps 15 --warmup 3 run.device=cuda training.precision=fp16
         training.micro_batch_size=32 data.image_size=512 parallel.backend=torch model.unet.compile=false)
  PREC=fp16
  COMPILE_GRAPH=true
fi
PYTEST=("$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider --continue-on-collection-errors)
HAVE_PYTEST=0
"$PYTHON" -c "import pytest" 2> /dev/null && HAVE_PYTEST=1

# -- 1. the fast paths against their CPU twins (strict load, outputs, gradients); step; CUDA graph ---------
if (( DRY )); then
  run_stage device_checks 120 20 "$PYTHON" tests/gpu/device_checks.py --cpu-dry-run --out "$OUT"
else
  run_stage device_checks 120 30 "$PYTHON" tests/gpu/device_checks.py --out "$OUT"
fi

# -- 2. GPU tests of the models, the training step and data parallelism ----------------------------------
if (( HAVE_PYTEST )); then
  run_stage gpu_tests_core 150 30 "${PYTEST[@]}" tests/gpu/test_models_gpu.py tests/gpu/test_train_gpu.py \
    tests/gpu/test_parallel_gpu.py
else
  record gpu_tests_core "skipped (pytest is not installed)" 0
fi

# -- 3. bench table -------------------------------------------------------------------------------------
run_stage bench_train 240 60 "$PYTHON" tests/gpu/bench_stage.py --no-base --output "$OUT/bench_train.json" \
  --variant "eager nchw: model.unet.channels_last=false training.cuda_graph=false" \
  --variant "eager nhwc: model.unet.channels_last=true training.cuda_graph=false" \
  --variant "graph nhwc: model.unet.channels_last=true training.cuda_graph=true" \
  --variant "graph nhwc bf16: model.unet.channels_last=true training.cuda_graph=true training.precision=bf16" \
  "${BENCH[@]}"

# -- 4. slow or optional: decoders and evaluation, then torch.compile ------------------------------------
if (( HAVE_PYTEST )); then
  run_stage gpu_tests_slow 90 20 "${PYTEST[@]}" tests/gpu/test_data_gpu.py tests/gpu/test_eval_gpu.py
else
  record gpu_tests_slow "skipped (pytest is not installed)" 0
fi
if [[ "${SKIP_COMPILE:-0}" == 1 ]]; then
  record bench_compile "skipped (SKIP_COMPILE=1)" 0
else
  # Compiling the full UNet took 175 s on an H200 machine's 16 cores: not started with less than 200 s left.
  compile_min=$(( DRY ? 90 : 200 ))
  run_stage bench_compile 260 "$compile_min" "$PYTHON" tests/gpu/bench_stage.py --no-base --output "$OUT/bench_compile.json" \
    --variant "compile nhwc graph=$COMPILE_GRAPH: model.unet.channels_last=true model.unet.compile=true \
training.cuda_graph=$COMPILE_GRAPH" \
    "${BENCH[@]}"
fi

# -- summary: the tables, then (from the EXIT trap) the one-line count, last ------------------------------
"$PYTHON" tests/gpu/summarize.py "$OUT" --title $'\n==== sd_mlperf device check summary ====' --checks counts \
  --bench bench_train.json --bench bench_compile.json --best-for "$PREC"
bad=$(awk -F'\t' 'NR > 1 && $2 != "passed" && $2 !~ /^skipped/' "$SUMMARY" | wc -l)
exit $(( bad > 0 ))
