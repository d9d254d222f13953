#!/usr/bin/env bash
# Start the sd_mlperf container on this machine: all GPUs, the host IPC namespace (data-loader
# workers share memory through /dev/shm), and the dataset, checkpoint and results folders.
#   docker/launch.sh                                  # interactive shell
#   docker/launch.sh -- sd-mlperf backends --fast     # verify the fast paths
set -euo pipefail
PROG=launch.sh
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=slurm/lib.sh
. "$REPO/slurm/lib.sh"

usage() {
    cat <<'EOF2'
Usage: docker/launch.sh [options] [-- COMMAND ...]

  -i, --image TAG          image (default sd_mlperf:latest, as docker/build.sh tags it)
  -D, --dataset-dir DIR    datasets and checkpoints, mounted at the same path (default /data/mlcommons)
  -k, --checkpoint-dir DIR another folder with checkpoints, mounted at the same path (optional)
  -r, --results-dir DIR    mounted at /results (default ./results)
      --code-in-image      run the image's code instead of mounting this checkout at /workspace/sd_mlperf
      --dry-run            print the docker command; run nothing
  -h, --help
Without a COMMAND an interactive bash starts.
EOF2
}

IMAGE=sd_mlperf:latest
DATASET_DIR=/data/mlcommons
CKPT_DIR=""
RESULTS_DIR=./results
MOUNT_CODE=1
DRY_RUN=0
COMMAND=()
while [ $# -gt 0 ]; do
    case "$1" in
        -i|--image) need_value "$1" $# "${2-}"; IMAGE=$2; shift ;;
        -D|--dataset-dir) need_value "$1" $# "${2-}"; DATASET_DIR=$2; shift ;;
        -k|--checkpoint-dir) need_value "$1" $# "${2-}"; CKPT_DIR=$2; shift ;;
        -r|--results-dir) need_value "$1" $# "${2-}"; RESULTS_DIR=$2; shift ;;
        --code-in-image) MOUNT_CODE=0 ;;
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; COMMAND=("$@"); break ;;
        *) die "unknown argument '$1' (see --help; the container command goes after --)" ;;
    esac
    shift
done

[[ "$DATASET_DIR" == /* ]] || die "--dataset-dir must be an absolute path (it is mounted at the same path), got '$DATASET_DIR'"
[ -z "$CKPT_DIR" ] || [[ "$CKPT_DIR" == /* ]] || die "--checkpoint-dir must be an absolute path, got '$CKPT_DIR'"
RESULTS_DIR=$(realpath -m "$RESULTS_DIR")
if [ "$DRY_RUN" = 0 ]; then
    check_dir --dataset-dir "$DATASET_DIR"
    [ -z "$CKPT_DIR" ] || check_dir --checkpoint-dir "$CKPT_DIR"
    command -v docker >/dev/null || die "docker is not on PATH (install Docker and the NVIDIA Container Toolkit)"
    mkdir -p "$RESULTS_DIR"
fi

# memlock and stack limits as NGC recommends for NCCL and the CUDA libraries.
DOCKER=(docker run --rm --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864
        -v "$DATASET_DIR:$DATASET_DIR" -v "$RESULTS_DIR:/results")
[ -z "$CKPT_DIR" ] || DOCKER+=(-v "$CKPT_DIR:$CKPT_DIR")
[ "$MOUNT_CODE" = 0 ] || DOCKER+=(-v "$REPO:/workspace/sd_mlperf")
DOCKER+=(-w /workspace/sd_mlperf)
if [ ${#COMMAND[@]} -eq 0 ]; then
    DOCKER+=(-it "$IMAGE" bash)
else
    DOCKER+=("$IMAGE" "${COMMAND[@]}")
fi
run_cmd "${DOCKER[@]}"
