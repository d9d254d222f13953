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
  -g, --gpus SPEC          docker run --gpus SPEC (default all; 'none' for a machine without GPUs or the NVIDIA
                           Container Toolkit, e.g. to check an image on a build host)
  -u, --user UID[:GID]|me  run as this user instead of root ('me': yours), so results are owned by it; HOME is /tmp
      --memlock LIMIT      locked-memory limit: unlimited (default, as NGC recommends for NCCL over InfiniBand), a
                           number of bytes, or 'default' (the daemon's), for a host where dockerd may not raise it
                           (docker then fails with "error setting rlimit type 8: operation not permitted")
      --dry-run            print the docker command; run nothing
  -h, --help
Without a COMMAND an interactive bash starts. The environment variable DOCKER names the docker client.
EOF2
}

IMAGE=sd_mlperf:latest
DATASET_DIR=/data/mlcommons
CKPT_DIR=""
RESULTS_DIR=./results
MOUNT_CODE=1
GPUS=all
MEMLOCK=unlimited
RUN_AS=""
DRY_RUN=0
COMMAND=()
while [ $# -gt 0 ]; do
    case "$1" in
        -i|--image) need_value "$1" $# "${2-}"; IMAGE=$2; shift ;;
        -D|--dataset-dir) need_value "$1" $# "${2-}"; DATASET_DIR=$2; shift ;;
        -k|--checkpoint-dir) need_value "$1" $# "${2-}"; CKPT_DIR=$2; shift ;;
        -r|--results-dir) need_value "$1" $# "${2-}"; RESULTS_DIR=$2; shift ;;
        --code-in-image) MOUNT_CODE=0 ;;
        -g|--gpus) need_value "$1" $# "${2-}"; GPUS=$2; shift ;;
        -u|--user) need_value "$1" $# "${2-}"; RUN_AS=$2; shift ;;
        --memlock) need_value "$1" $# "${2-}"; MEMLOCK=$2; shift ;;
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; COMMAND=("$@"); break ;;
        *) die "unknown argument '$1' (see --help; the container command goes after --)" ;;
    esac
    shift
done

[[ "$DATASET_DIR" == /* ]] || die "--dataset-dir must be an absolute path (it is mounted at the same path), got '$DATASET_DIR'"
[ -z "$CKPT_DIR" ] || [[ "$CKPT_DIR" == /* ]] || die "--checkpoint-dir must be an absolute path, got '$CKPT_DIR'"
[ "$RUN_AS" != me ] || RUN_AS="$(id -u):$(id -g)"
[ -z "$RUN_AS" ] || [[ "$RUN_AS" =~ ^[0-9]+(:[0-9]+)?$ ]] || die "--user must be UID[:GID] (numbers) or 'me', got '$RUN_AS'"
[[ "$MEMLOCK" =~ ^(unlimited|default|[0-9]+)$ ]] || die "--memlock must be unlimited, default or bytes, got '$MEMLOCK'"
RESULTS_DIR=$(realpath -m "$RESULTS_DIR")
DOCKER_CLI=${DOCKER:-docker}
if [ "$DRY_RUN" = 0 ]; then
    check_dir --dataset-dir "$DATASET_DIR"
    [ -z "$CKPT_DIR" ] || check_dir --checkpoint-dir "$CKPT_DIR"
    command -v "$DOCKER_CLI" >/dev/null || die "docker client '$DOCKER_CLI' is not on PATH" \
        "(install Docker and the NVIDIA Container Toolkit; or set DOCKER)"
    mkdir -p "$RESULTS_DIR"
fi

DOCKER_RUN=("$DOCKER_CLI" run --rm)
[ "$GPUS" = none ] || DOCKER_RUN+=(--gpus "$GPUS")
# memlock and stack limits as NGC recommends for NCCL and the CUDA libraries.
DOCKER_RUN+=(--ipc=host)
[ "$MEMLOCK" = default ] || DOCKER_RUN+=(--ulimit "memlock=${MEMLOCK/unlimited/-1}")
DOCKER_RUN+=(--ulimit stack=67108864 -v "$DATASET_DIR:$DATASET_DIR" -v "$RESULTS_DIR:/results")
# Any numeric user works: the image needs no account for it. HOME=/tmp gives torch and matplotlib a writable cache.
[ -z "$RUN_AS" ] || DOCKER_RUN+=(--user "$RUN_AS" -e HOME=/tmp)
[ -z "$CKPT_DIR" ] || DOCKER_RUN+=(-v "$CKPT_DIR:$CKPT_DIR")
[ "$MOUNT_CODE" = 0 ] || DOCKER_RUN+=(-v "$REPO:/workspace/sd_mlperf")
DOCKER_RUN+=(-w /workspace/sd_mlperf)
if [ ${#COMMAND[@]} -eq 0 ]; then
    DOCKER_RUN+=(-it "$IMAGE" bash)
else
    DOCKER_RUN+=("$IMAGE" "${COMMAND[@]}")
fi
run_cmd "${DOCKER_RUN[@]}"
