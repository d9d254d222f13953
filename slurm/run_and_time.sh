#!/usr/bin/env bash
# One timed benchmark run, as the MLPerf rules time it: drop the page cache where permitted, train,
# then print the RESULT line with the elapsed seconds. The trainer logs cache_clear: true only when
# SD_MLPERF_CACHE_CLEARED=1 says the cache was dropped (here, or by the caller on every node beforehand:
# slurm/srun.sh does that outside the container, and then this script does not drop it again).
# Under slurm/srun.sh every GPU's task runs this script (one task per GPU). Standalone on one node it
# starts one process per GPU itself with torchrun (--launcher auto).
set -euo pipefail
PROG=run_and_time.sh
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=slurm/lib.sh
. "$REPO/slurm/lib.sh"

usage() {
    cat <<'EOF'
Usage: slurm/run_and_time.sh --config FILE [--config FILE ...] [options] [-- KEY=VALUE ...]

  -c, --config FILE       config, merged in order (e.g. conf/sd2_mlperf.yaml then conf/system/01x08x08.yaml)
  -n, --num-nodes N       nodes of the run (default 1)
  -g, --gpus-per-node G   GPUs per node (default 1)
  -k, --checkpoint PATH   frozen 512-base-ema.ckpt (sets model.frozen_checkpoint; default: the config's)
  -r, --results-dir DIR   parent of the run folder (sets run.output_dir; default: the config's)
      --run-name NAME     run folder name (sets run.name; default: the config's)
      --venv DIR          Python environment to run in (DIR/bin first on PATH; default: the python on PATH)
      --launcher L        auto | none | torchrun: how training processes start (default auto: none under
                          Slurm, where srun starts one task per GPU; torchrun on one node with several GPUs)
      --dry-run           print the commands instead of running them
  -h, --help
Everything after -- is passed to the trainer as dotted overrides (e.g. training.max_steps=100).
EOF
}

NUM_NODES=1
GPUS_PER_NODE=1
CONFIGS=()
CHECKPOINT=""
RESULTS_DIR=""
RUN_NAME=""
LAUNCHER=auto
VENV=""
DRY_RUN=0
OVERRIDES=()

while [ $# -gt 0 ]; do
    case "$1" in
        -n|--num-nodes) need_value "$1" $# "${2-}"; NUM_NODES=$2; shift ;;
        -g|--gpus-per-node) need_value "$1" $# "${2-}"; GPUS_PER_NODE=$2; shift ;;
        -c|--config) need_value "$1" $# "${2-}"; CONFIGS+=("$2"); shift ;;
        -k|--checkpoint) need_value "$1" $# "${2-}"; CHECKPOINT=$2; shift ;;
        -r|--results-dir) need_value "$1" $# "${2-}"; RESULTS_DIR=$2; shift ;;
        --run-name) need_value "$1" $# "${2-}"; RUN_NAME=$2; shift ;;
        --launcher) need_value "$1" $# "${2-}"; LAUNCHER=$2; shift ;;
        --venv) need_value "$1" $# "${2-}"; VENV=$2; shift ;;
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; OVERRIDES=("$@"); break ;;
        *) die "unknown argument '$1' (see --help; trainer overrides go after --)" ;;
    esac
    shift
done

cd "$REPO"  # config paths are relative to the checkout (the container's workdir)
check_positive_int --num-nodes "$NUM_NODES"
check_positive_int --gpus-per-node "$GPUS_PER_NODE" 16
[ ${#CONFIGS[@]} -gt 0 ] || die "--config is required (e.g. --config conf/sd2_mlperf.yaml --config conf/system/01x08x08.yaml)"
CONFIG_ARGS=()
for c in "${CONFIGS[@]}"; do
    check_file --config "$c"
    check_config_agrees "$c" "$NUM_NODES" "$GPUS_PER_NODE"
    CONFIG_ARGS+=(--config "$c")
done
for o in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
    [[ "$o" == *=* ]] || die "override '$o' after -- is not of the form dotted.key=value"
done
BIN=""  # where python and torchrun come from: PATH, or the --venv
if [ -n "$VENV" ]; then
    [[ "$VENV" == /* ]] || die "--venv must be an absolute path (as every node sees it), got '$VENV'"
    # Checked on the node that runs the task: the environment must be on a filesystem every node sees.
    [ "$DRY_RUN" = 1 ] || [ -x "$VENV/bin/python" ] || die "--venv $VENV has no bin/python on $(hostname);" \
        "create it on a filesystem every node sees (python3 -m venv DIR && DIR/bin/pip install -e .)"
    BIN=$VENV/bin/
    export VIRTUAL_ENV=$VENV PATH="$VENV/bin:$PATH"
fi

RANK_ID=${SLURM_PROCID:-${RANK:-0}}
LOCAL_RANK_ID=${SLURM_LOCALID:-${LOCAL_RANK:-0}}
case "$LAUNCHER" in
    auto)
        if [ -n "${SLURM_PROCID:-}" ] || [ "$((NUM_NODES * GPUS_PER_NODE))" -eq 1 ]; then LAUNCHER=none
        elif [ "$NUM_NODES" -eq 1 ]; then LAUNCHER=torchrun
        else die "--num-nodes $NUM_NODES needs one task per GPU on every node: submit with slurm/sbatch.sh (or start it with srun)"
        fi ;;
    none|torchrun) ;;
    *) die "--launcher must be auto, none or torchrun, got '$LAUNCHER'" ;;
esac
[ "$LAUNCHER" != torchrun ] || [ "$NUM_NODES" -eq 1 ] \
    || die "--launcher torchrun starts processes on this node only; use slurm/sbatch.sh for --num-nodes $NUM_NODES"

TRAIN_ARGS=(train "${CONFIG_ARGS[@]}" "parallel.num_nodes=$NUM_NODES" "parallel.gpus_per_node=$GPUS_PER_NODE")
[ -z "$CHECKPOINT" ] || TRAIN_ARGS+=("model.frozen_checkpoint=$CHECKPOINT")
[ -z "$RESULTS_DIR" ] || TRAIN_ARGS+=("run.output_dir=$RESULTS_DIR")
[ -z "$RUN_NAME" ] || TRAIN_ARGS+=("run.name=$RUN_NAME")
TRAIN_ARGS+=("${OVERRIDES[@]+"${OVERRIDES[@]}"}")
if [ "$LAUNCHER" = torchrun ]; then
    TRAIN=("${BIN}torchrun" --standalone --nnodes=1 --nproc-per-node="$GPUS_PER_NODE" -m sd_mlperf "${TRAIN_ARGS[@]}")
else
    TRAIN=("${BIN}python" -m sd_mlperf "${TRAIN_ARGS[@]}")
fi

# Nothing may download during a timed run.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# torch.compile's kernels (inductor + Triton) on node-local disk, one folder per job: runs 2..N of a --num-runs job
# load them instead of compiling again (the trainer logs the folder). SD_MLPERF_COMPILE_CACHE picks another one.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${SD_MLPERF_COMPILE_CACHE:-/tmp/sd_mlperf_inductor_${SLURM_JOB_ID:-$(id -u)}}}

if [ "$DRY_RUN" = 1 ]; then
    shell_join "${TRAIN[@]}"
    exit 0
fi

start=$(date +%s)
start_fmt=$(date +'%Y-%m-%d %r')
if [ "$LOCAL_RANK_ID" = 0 ] && [ "${SD_MLPERF_CACHE_CLEARED:-}" != 1 ]; then
    # Nobody dropped it before this run: try here (needs root on the host; in a container usually not allowed).
    if bash "$REPO/slurm/drop_caches.sh" --quiet; then
        export SD_MLPERF_CACHE_CLEARED=1
    else
        note "cannot drop the page cache here (needs root on the host): the log says cache_clear false. Drop it on" \
             "each node before the run and set SD_MLPERF_CACHE_CLEARED=1"
    fi
fi
if [ "$RANK_ID" = 0 ]; then
    echo "STARTING TIMING RUN AT $start_fmt"
fi

status=0
"${TRAIN[@]}" || status=$?

end=$(date +%s)
if [ "$RANK_ID" = 0 ]; then
    echo "ENDING TIMING RUN AT $(date +'%Y-%m-%d %r')"
    if [ "$status" -ne 0 ]; then
        note "training exited with status $status: no RESULT line"
        exit "$status"
    fi
    echo "RESULT,stable_diffusion,$((end - start)),${USER:-$(id -un)},$start_fmt"
fi
exit "$status"
