#!/usr/bin/env bash
# Launch one training task per GPU on every node of the allocation, inside the container (pyxis/enroot).
# slurm/sbatch.sh submits this as the batch script; inside `salloc` it can be run by hand too.
# Each task runs slurm/run_and_time.sh, and the trainer reads SLURM_PROCID / SLURM_NTASKS /
# SLURM_LOCALID and SLURM_JOB_NODELIST for its rank, world size and rendezvous.
set -euo pipefail
PROG=srun.sh
# sbatch runs a copy of this file from its spool folder, so sbatch.sh tells us where the checkout is.
REPO=${SD_MLPERF_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# shellcheck source=slurm/lib.sh
. "$REPO/slurm/lib.sh"

WORKDIR=/workspace/sd_mlperf   # where the Dockerfile installs the package (and where we mount the checkout)
RESULTS_MNT=/results

usage() {
    cat <<EOF
Usage: slurm/srun.sh --num-nodes N --gpus-per-node G --config FILE [options] [-- KEY=VALUE ...]

  -n, --num-nodes N       nodes to run on (default: \$SLURM_JOB_NUM_NODES)
  -g, --gpus-per-node G   GPUs per node; one task is started per GPU
  -c, --config FILE       config overlay inside the checkout (repeatable), merged over --base-config
  -k, --checkpoint PATH   frozen 512-base-ema.ckpt, an absolute path as the nodes see it
                          (sets model.frozen_checkpoint; default: the config's value)
  -d, --container IMAGE   pyxis image: a .sqsh file or a registry image such as nvcr.io#org/sd_mlperf:tag
                          (default: \$SD_MLPERF_CONTAINER or sd_mlperf:latest)
  -r, --results-dir DIR   host folder mounted at $RESULTS_MNT; runs go to $RESULTS_MNT/RUN_NAME (default: ./results)
  -D, --dataset-dir DIR   host folder with datasets and checkpoints, mounted at the same path (default: /data/mlcommons)
      --run-name NAME     run.name; %j becomes the job id (default: CONFIG_%j; give the same name to resume)
      --base-config FILE  base config (default: conf/sd2_mlperf.yaml; 'none' for no base)
      --code-in-image     run the code installed in the image instead of mounting this checkout at $WORKDIR
      --dry-run           print the srun and training commands instead of running them
      --check-only        validate the flags and paths, print nothing, run nothing
  -h, --help
Everything after -- is passed to the trainer as dotted overrides (e.g. training.max_steps=100).
EOF
}

NUM_NODES=${SLURM_JOB_NUM_NODES:-}
GPUS_PER_NODE=""
CONFIGS=()
BASE_CONFIG=conf/sd2_mlperf.yaml
CHECKPOINT=""
CONTAINER=${SD_MLPERF_CONTAINER:-sd_mlperf:latest}
RESULTS_DIR=./results
DATASET_DIR=/data/mlcommons
RUN_NAME=""
MOUNT_CODE=1
MODE=run
OVERRIDES=()

while [ $# -gt 0 ]; do
    case "$1" in
        -n|--num-nodes) need_value "$1" $# "${2-}"; NUM_NODES=$2; shift ;;
        -g|--gpus-per-node) need_value "$1" $# "${2-}"; GPUS_PER_NODE=$2; shift ;;
        -c|--config) need_value "$1" $# "${2-}"; CONFIGS+=("$2"); shift ;;
        -k|--checkpoint) need_value "$1" $# "${2-}"; CHECKPOINT=$2; shift ;;
        -d|--container) need_value "$1" $# "${2-}"; CONTAINER=$2; shift ;;
        -r|--results-dir) need_value "$1" $# "${2-}"; RESULTS_DIR=$2; shift ;;
        -D|--dataset-dir) need_value "$1" $# "${2-}"; DATASET_DIR=$2; shift ;;
        --run-name) need_value "$1" $# "${2-}"; RUN_NAME=$2; shift ;;
        --base-config) need_value "$1" $# "${2-}"; BASE_CONFIG=$2; shift ;;
        --code-in-image) MOUNT_CODE=0 ;;
        --dry-run) MODE=dry-run ;;
        --check-only) MODE=check ;;
        -h|--help) usage; exit 0 ;;
        --) shift; OVERRIDES=("$@"); break ;;
        *) die "unknown argument '$1' (see --help; trainer overrides go after --)" ;;
    esac
    shift
done

# --- validate ------------------------------------------------------------------------------------
[ -n "$NUM_NODES" ] || die "--num-nodes is required outside a Slurm allocation"
check_positive_int --num-nodes "$NUM_NODES"
[ -n "$GPUS_PER_NODE" ] || die "--gpus-per-node is required"
check_positive_int --gpus-per-node "$GPUS_PER_NODE" 16
[ ${#CONFIGS[@]} -gt 0 ] || die "--config is required (e.g. --config conf/system/01x08x08.yaml)"
for o in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
    [[ "$o" == *=* ]] || die "override '$o' after -- is not of the form dotted.key=value"
done

# A config must be inside the checkout: the checkout (or the image's copy of it) is the job's workdir.
repo_relative() {
    local path=$1 abs
    if [ -f "$path" ]; then abs=$(realpath "$path")
    elif [ -f "$REPO/$path" ]; then abs=$(realpath "$REPO/$path")
    else die "--config file '$path' does not exist (paths are relative to the current folder or to $REPO)"
    fi
    case "$abs" in
        "$REPO"/*) printf '%s\n' "${abs#"$REPO"/}" ;;
        *) die "--config file '$path' is outside the checkout $REPO, which is what the job sees at $WORKDIR; copy it into conf/system/" ;;
    esac
}
CONFIG_ARGS=()
ALL_CONFIGS=()
[ "$BASE_CONFIG" = none ] || ALL_CONFIGS+=("$BASE_CONFIG")
ALL_CONFIGS+=("${CONFIGS[@]}")
for c in "${ALL_CONFIGS[@]}"; do
    rel=$(repo_relative "$c")
    CONFIG_ARGS+=(--config "$rel")
    check_config_agrees "$REPO/$rel" "$NUM_NODES" "$GPUS_PER_NODE"
done
CONFIG_NAME=$(basename "${CONFIGS[-1]}" .yaml)

if [ -n "$CHECKPOINT" ]; then
    [[ "$CHECKPOINT" == /* ]] || die "--checkpoint must be an absolute path (as the nodes see it), got '$CHECKPOINT'"
    [[ "$CHECKPOINT" =~ \.(ckpt|safetensors)$ ]] || die "--checkpoint must be a .ckpt or .safetensors file, got '$CHECKPOINT'"
fi
[[ "$DATASET_DIR" == /* ]] || die "--dataset-dir must be an absolute path (it is mounted at the same path), got '$DATASET_DIR'"
[[ "$RUN_NAME" =~ ^[A-Za-z0-9_.%-]*$ ]] || die "--run-name may hold only letters, digits, '_', '.', '-' and %j, got '$RUN_NAME'"
RESULTS_DIR=$(realpath -m "$RESULTS_DIR")
if [ "$MODE" = dry-run ]; then
    note "dry run: paths are not checked on this host"
else
    check_dir --dataset-dir "$DATASET_DIR"
    [ -z "$CHECKPOINT" ] || check_file --checkpoint "$CHECKPOINT"
    if [[ "$CONTAINER" == *.sqsh ]]; then check_file --container "$CONTAINER"; fi
fi
[ "$MODE" != check ] || exit 0
[ "$MODE" != run ] || mkdir -p "$RESULTS_DIR"

# --- build the command ---------------------------------------------------------------------------
RUN_NAME=${RUN_NAME:-${CONFIG_NAME}_%j}
[ -z "${SLURM_JOB_ID:-}" ] || RUN_NAME=${RUN_NAME//%j/$SLURM_JOB_ID}
MOUNTS="$RESULTS_DIR:$RESULTS_MNT,$DATASET_DIR:$DATASET_DIR"
if [ -n "$CHECKPOINT" ] && [[ "$CHECKPOINT" != "$DATASET_DIR"/* ]]; then
    MOUNTS+=",$(dirname "$CHECKPOINT"):$(dirname "$CHECKPOINT")"
fi
[ "$MOUNT_CODE" = 0 ] || MOUNTS+=",$REPO:$WORKDIR"

TASK_ARGS=(--num-nodes "$NUM_NODES" --gpus-per-node "$GPUS_PER_NODE" --results-dir "$RESULTS_MNT"
           --run-name "$RUN_NAME" "${CONFIG_ARGS[@]}")
[ -z "$CHECKPOINT" ] || TASK_ARGS+=(--checkpoint "$CHECKPOINT")
TASK_ARGS+=(--launcher none)
[ ${#OVERRIDES[@]} -eq 0 ] || TASK_ARGS+=(-- "${OVERRIDES[@]}")

SRUN=(srun --nodes="$NUM_NODES" --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1
      --container-image="$CONTAINER" --container-mounts="$MOUNTS" --container-workdir="$WORKDIR"
      --no-container-mount-home
      bash slurm/run_and_time.sh "${TASK_ARGS[@]}")

if [ "$MODE" = dry-run ]; then
    shell_join "${SRUN[@]}"
    # What each task then runs inside the container (SLURM_PROCID etc. are set there by srun).
    SLURM_PROCID=0 bash "$REPO/slurm/run_and_time.sh" --dry-run "${TASK_ARGS[@]}"
else
    "${SRUN[@]}"
fi
