#!/usr/bin/env bash
# A timed benchmark run on one 8-GPU node, in the container: run_and_time.sh drops the page cache,
# starts 8 training processes with torchrun and prints the MLPerf RESULT line.
#   examples/04_single_node_8gpu.sh [--dry-run] [--config conf/system/01x08x08.yaml] [--in-container]
# First: docker/build.sh, and the data under /data/mlcommons (examples/06_download_data.sh).
set -euo pipefail
PROG=04_single_node_8gpu.sh
# shellcheck source=examples/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

SYSTEM=conf/system/01x08x08.yaml   # GBS 64 (reference); conf/system/01x08x32.yaml for 80 GB GPUs
IMAGE=sd_mlperf:latest
DATASET_DIR=/data/mlcommons
RESULTS_DIR=./results
IN_CONTAINER=0
OVERRIDES=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --config) need_value "$1" $# "${2-}"; SYSTEM=$2; shift ;;
        --image) need_value "$1" $# "${2-}"; IMAGE=$2; shift ;;
        --dataset-dir) need_value "$1" $# "${2-}"; DATASET_DIR=$2; shift ;;
        --results-dir) need_value "$1" $# "${2-}"; RESULTS_DIR=$2; shift ;;
        --in-container) IN_CONTAINER=1 ;;
        -h|--help) sed -n '2,5p' "${BASH_SOURCE[0]}"; exit 0 ;;
        --) shift; OVERRIDES=("$@"); break ;;
        *) die "unknown argument '$1' (overrides go after --)" ;;
    esac
    shift
done

RUN=(bash slurm/run_and_time.sh --num-nodes 1 --gpus-per-node 8
     --config conf/sd2_mlperf.yaml --config "$SYSTEM" --results-dir /results)
[ ${#OVERRIDES[@]} -eq 0 ] || RUN+=(-- "${OVERRIDES[@]}")
DRY=()
[ "$DRY_RUN" = 0 ] || DRY=(--dry-run)

if [ "$IN_CONTAINER" = 1 ]; then
    # Already inside the container (e.g. docker/launch.sh's shell): results go to /results.
    run_cmd "${RUN[@]}"
else
    # Check the fast paths first (TE attention, apex GroupNorm, megatron-core, DALI): fails loudly if not.
    bash docker/launch.sh "${DRY[@]+"${DRY[@]}"}" --image "$IMAGE" --dataset-dir "$DATASET_DIR" \
        --results-dir "$RESULTS_DIR" -- sd-mlperf backends --fast
    bash docker/launch.sh "${DRY[@]+"${DRY[@]}"}" --image "$IMAGE" --dataset-dir "$DATASET_DIR" \
        --results-dir "$RESULTS_DIR" -- "${RUN[@]}"
fi
