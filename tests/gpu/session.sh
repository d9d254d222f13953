#!/usr/bin/env bash
# The prepared GPU session of issue 20: 15 minutes of one H100 (or H200) machine in all, its start included, as
# two device calls of at most 10 minutes, each time-boxed stage the most valuable first (tests/gpu/stage_runner.sh).
#
#   part1  versions; the fast paths (apex included, when carried) against their CPU twins; compile + CUDA graph
#          at 64 images per GPU (conf/system/01x08x64.yaml's shape: images/s and the peak memory it needs);
#          the profile of that step (kernel time by class, top kernels, the SDPA backend that ran); the
#          attention probe and the GroupNorm probe on every UNet shape at batch 64.
#   part2  compile + CUDA graph at batch 32 with torch GroupNorm (comparable with the H200's 157 images/s of
#          2026-11-29), then the same with the configured norm (apex where carried) and with half weights.
#
# On the device machine, from the repository root, carrying .whl (tests/gpu/run_device_checks.sh
# --prepare-wheels) and .apex_build (scripts/build_apex_group_norm.sh), e.g.
#   run(command="tests/gpu/session.sh part1", carry=[".whl", ".apex_build"], timeout_s=500)
#   run(command="tests/gpu/session.sh part2", carry=[".whl", ".apex_build"], timeout_s=300)
# Sizing: the machine's start (2-3 min) + part1 (BUDGET_S 430 s) + part2 (250 s) + transfers is about 15 minutes.
# Compiling one shape of the full UNet took 175 s on an H200 machine, so part2 has room for one compiled batch-32
# row; its second stage runs only if a warm cache or a fast compile leaves the time (else: skipped, budget).
# The inductor cache lives in .cache/inductor (git-ignored; a warm machine keeps it between the calls), so a
# stage that compiles a shape compiled before loads it. Everything a part wrote goes back as partN.tar.gz in
# $OUT, beside partN_summary.txt and the stage JSONs: at most 7 files per part.
#   tests/gpu/session.sh part1 --cpu-dry-run   # the same stages on the CPU at tiny size (CI runs this)
# Environment: OUT (what returns; default results/session), BUDGET_S (default 430 for part1, 250 for part2),
# PYTHON, WHEEL_DIR, SITE_DIR as for run_device_checks.sh, STAGE_LIMIT_S (every stage's limit; tests), APEX_PACK
# (the apex pack, default .apex_build), APEX_EXT_DIR (where its extension is unpacked, outside the pack).
set -uo pipefail

cd "$(dirname "$0")/../.." || exit 2
PART=${1:-}
DRY=0
case "${2:-}" in --cpu-dry-run) DRY=1 ;; "") ;; *) echo "usage: $0 part1|part2 [--cpu-dry-run]" >&2; exit 2 ;; esac
case "$PART" in
  part1) BUDGET_S=${BUDGET_S:-430} ;;
  part2) BUDGET_S=${BUDGET_S:-250} ;;
  *) echo "usage: $0 part1|part2 [--cpu-dry-run]" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}
SITE_DIR=${SITE_DIR:-${TMPDIR:-/tmp}/sd_mlperf_site}
RETURN_DIR=${OUT:-results/session}
OUT=results/session_work/$PART  # every log and JSON; packed into $RETURN_DIR/$PART.tar.gz on exit
ARCHIVE="$RETURN_DIR/$PART.tar.gz"
SKIP_EXIT=77
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}
rm -rf "$OUT"
mkdir -p "$RETURN_DIR"

# shellcheck source=tests/gpu/stage_runner.sh
. tests/gpu/stage_runner.sh
stages_start
# The few files that come back besides the archive (the device returns at most 8), then the summary line.
# shellcheck disable=SC2329  # invoked by the EXIT trap below
session_finish() {
  local rc=$?
  for f in summary.txt bench.json bench_variants.json profile.json attention.json groupnorm.json; do
    [ -f "$OUT/$f" ] && cp "$OUT/$f" "$RETURN_DIR/${PART}_$f"
  done
  finish
  exit "$rc"
}
trap session_finish EXIT

APEX_PACK=${APEX_PACK:-.apex_build}
APEX_EXT_DIR=${APEX_EXT_DIR:-${TMPDIR:-/tmp}/sd_mlperf_apex_ext}  # outside the pack: it must stay small to travel
if [ -d "$APEX_PACK/site" ]; then  # scripts/build_apex_group_norm.sh's pack: apex.contrib.group_norm for sm_90
  # the extension travels xz-compressed (64 MiB per call); a warm machine keeps what it unpacked
  "$PYTHON" scripts/apex_pack.py unpack "$APEX_PACK/site" "$APEX_EXT_DIR" \
    || echo "session: could not unpack $APEX_PACK/site/*.so.xz; apex stages will fail" >&2
  apex_site=$(cd "$APEX_PACK/site" && pwd)
  export PYTHONPATH="$APEX_EXT_DIR:$apex_site${PYTHONPATH:+:$PYTHONPATH}"
fi
install_wheels
print_environment
"$PYTHON" -m sd_mlperf backends --config conf/sd2_mlperf.yaml >> "$OUT/environment.txt" 2>&1

if (( DRY )); then
  SHAPE=(--config conf/smoke.yaml run.device=cpu training.precision=fp32 data.image_size=32
         model.unet.model_channels=16 "model.unet.channel_mult=[1]" "model.unet.attention_levels=[0]"
         model.unet.head_channels=8 model.unet.context_dim=16 model.unet.resblock_norm_groups=4
         model.unet.transformer_norm_groups=4)
  STEPS=(--steps 1 --warmup 0)
  B64=training.micro_batch_size=2 B32=training.micro_batch_size=1
  GRAPH=false COMPILE=false  # a CPU has no CUDA graph, and inductor's C++ build takes minutes on 2 cores
  MIN_COMPILE=10
  ATTENTION_KERNELS=flash,math NORM_KERNELS=torch,apex  # compiled GroupNorm: the same minutes of C++ builds
  HALF=training.precision=bf16  # half weights need a half precision; the dry run computes in fp32
else
  SHAPE=(--config conf/sd2_mlperf.yaml run.device=cuda training.precision=fp16 parallel.backend=torch)
  STEPS=(--steps 12 --warmup 3)
  B64=training.micro_batch_size=64 B32=training.micro_batch_size=32
  GRAPH=true COMPILE=true
  MIN_COMPILE=200  # compiling the full UNet took 175 s on an H200 machine's 16 cores (a cache hit: seconds)
  ATTENTION_KERNELS=cudnn,flash,efficient,math,te NORM_KERNELS=apex,torch,compiled
  HALF=""
fi
STEP_KEYS="model.unet.compile=$COMPILE training.cuda_graph=$GRAPH"

if [ "$PART" = part1 ]; then
  if (( DRY )); then  # tests/integration/test_device_checks_dry_run.py runs them on the CPU already
    record device_checks "skipped (cpu dry run: run_device_checks.sh --cpu-dry-run covers them)" 0
  else
    run_stage device_checks 90 30 "$PYTHON" tests/gpu/device_checks.py --out "$OUT"
  fi
  run_stage bench_b64 260 "$MIN_COMPILE" "$PYTHON" tests/gpu/bench_stage.py --no-base --output "$OUT/bench.json" \
    --variant "compile graph b64: $STEP_KEYS $B64" "${STEPS[@]}" "${SHAPE[@]}"
  # shellcheck disable=SC2086  # STEP_KEYS is two overrides
  run_stage profile_b64 100 30 "$PYTHON" -m sd_mlperf bench train --profile --output "$OUT/profile.json" \
    --steps 3 --warmup 1 "${SHAPE[@]}" $STEP_KEYS "$B64"
  run_stage attention_probe 40 15 "$PYTHON" -m sd_mlperf bench attention --output "$OUT/attention.json" \
    --kernels "$ATTENTION_KERNELS" --steps 5 --warmup 2 "${SHAPE[@]}" "$B64"
  run_stage groupnorm_probe 80 20 "$PYTHON" -m sd_mlperf bench groupnorm --output "$OUT/groupnorm.json" \
    --kernels "$NORM_KERNELS" --steps 5 --warmup 2 "${SHAPE[@]}" "$B64"
else
  run_stage bench_b32_torch_norm 240 $(( MIN_COMPILE - 20 )) "$PYTHON" tests/gpu/bench_stage.py --no-base \
    --output "$OUT/bench.json" --variant "compile graph b32 torch norm: $STEP_KEYS $B32 model.unet.norm_backend=torch" \
    "${STEPS[@]}" "${SHAPE[@]}"
  run_stage bench_b32_variants 240 "$MIN_COMPILE" "$PYTHON" tests/gpu/bench_stage.py --no-base \
    --output "$OUT/bench_variants.json" --variant "compile graph b32 config norm: $STEP_KEYS $B32" \
    --variant "compile graph b32 half weights: $STEP_KEYS $B32 parallel.half_weights=true $HALF" \
    "${STEPS[@]}" "${SHAPE[@]}"
fi

# -- summary: the tables of this part, then (from the EXIT trap) the one-line count -------------------------
"$PYTHON" tests/gpu/summarize.py "$OUT" --bench bench.json --bench bench_variants.json | tee "$OUT/summary.txt"
bad=$(awk -F'\t' 'NR > 1 && $2 != "passed" && $2 !~ /^skipped/' "$SUMMARY" | wc -l)
exit $(( bad > 0 ))
