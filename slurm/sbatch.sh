#!/usr/bin/env bash
# Submit a multi-node training job: sbatch runs slurm/srun.sh on the first node, which starts one task per GPU
# on every node, each running slurm/run_and_time.sh: in a container (pyxis/enroot) or, with --container none,
# in a Python environment the nodes share. --num-runs 10 makes a submission's ten timed runs in one allocation.
#
#   slurm/sbatch.sh --num-nodes 2 --gpus-per-node 8 --config conf/system/02x08x08.yaml \
#       --checkpoint /data/mlcommons/sd-checkpoint-3.0/512-base-ema.ckpt
#   slurm/sbatch.sh ... --container none --venv /shared/venvs/sd_mlperf      # no container
#
# --dry-run prints the sbatch command and the commands of the job's first run (page-cache drop, srun, each
# task's training command, offline evaluation, compliance checker), and submits nothing.
set -euo pipefail
PROG=sbatch.sh
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=slurm/lib.sh
. "$REPO/slurm/lib.sh"

usage() {
    cat <<'EOF'
Usage: slurm/sbatch.sh --num-nodes N --gpus-per-node G --config FILE [options] [-- KEY=VALUE ...]

Job (sbatch) options:
  -a, --account NAME      Slurm account (default: your default account)
  -p, --partition NAME    Slurm partition (default: the cluster's default)
  -t, --walltime TIME     time limit of the whole job (all --num-runs runs), e.g. 04:00:00 or 1-00:00:00
                          (default 04:00:00)
  -l, --log-dir DIR       where the job's output goes, as DIR/JOBID_JOBNAME.out, and each run's as
                          DIR/<datestamp>_<i>.log (default ./results/logs)
  -J, --job-name NAME     job name (default sd_mlperf_CONFIG)
      --sbatch-arg ARG    extra sbatch argument, repeatable (e.g. --sbatch-arg --qos=high)
      --dry-run           print the commands; submit nothing
  -h, --help
Run options (passed to slurm/srun.sh, which checks them; see slurm/srun.sh --help):
  -n, --num-nodes N  -g, --gpus-per-node G  -c, --config FILE  -k, --checkpoint PATH
  -d, --container IMAGE|none  --venv DIR  -r, --results-dir DIR  -D, --dataset-dir DIR
  --run-name NAME  --num-runs N  --env-file FILE  --master-addr ADDR  --srun-arg ARG (repeatable)
  --no-eval  --base-config FILE  --code-in-image
Everything after -- is passed to the trainer as dotted overrides (e.g. training.max_steps=100).
EOF
}

ACCOUNT=""
PARTITION=""
WALLTIME=04:00:00
LOG_DIR=./results/logs
RESULTS_DIR=./results
JOB_NAME=""
SBATCH_EXTRA=()
DRY_RUN=0
NUM_NODES=""
GPUS_PER_NODE=""
LAST_CONFIG=""
SRUN_ARGS=()

while [ $# -gt 0 ]; do
    case "$1" in
        -a|--account) need_value "$1" $# "${2-}"; ACCOUNT=$2; shift ;;
        -p|--partition) need_value "$1" $# "${2-}"; PARTITION=$2; shift ;;
        -t|--walltime) need_value "$1" $# "${2-}"; WALLTIME=$2; shift ;;
        -l|--log-dir) need_value "$1" $# "${2-}"; LOG_DIR=$2; shift ;;
        -J|--job-name) need_value "$1" $# "${2-}"; JOB_NAME=$2; shift ;;
        --sbatch-arg)
            [ $# -ge 2 ] && [[ "${2-}" == -* ]] || die "--sbatch-arg needs an sbatch option such as --qos=high"
            SBATCH_EXTRA+=("$2"); shift ;;
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        -n|--num-nodes) need_value "$1" $# "${2-}"; NUM_NODES=$2; SRUN_ARGS+=("$1" "$2"); shift ;;
        -g|--gpus-per-node) need_value "$1" $# "${2-}"; GPUS_PER_NODE=$2; SRUN_ARGS+=("$1" "$2"); shift ;;
        -c|--config) need_value "$1" $# "${2-}"; LAST_CONFIG=$2; SRUN_ARGS+=("$1" "$2"); shift ;;
        -r|--results-dir) need_value "$1" $# "${2-}"; RESULTS_DIR=$2; shift ;;
        -d|--container|--venv|--env-file)
            # A relative path must not change meaning when the job starts in the checkout.
            need_value "$1" $# "${2-}"
            if [[ "$1" == --venv || "$1" == --env-file || "$2" == *.sqsh ]]; then
                SRUN_ARGS+=("$1" "$(realpath -m "$2")")
            else
                SRUN_ARGS+=("$1" "$2")
            fi
            shift ;;
        -k|--checkpoint|-D|--dataset-dir|--run-name|--num-runs|--master-addr|--base-config)
            need_value "$1" $# "${2-}"; SRUN_ARGS+=("$1" "$2"); shift ;;
        --srun-arg)
            [ $# -ge 2 ] && [[ "${2-}" == -* ]] || die "--srun-arg needs an srun option such as --cpu-bind=none"
            SRUN_ARGS+=("$1" "$2"); shift ;;
        --code-in-image|--no-eval) SRUN_ARGS+=("$1") ;;
        --) SRUN_ARGS+=("$@"); break ;;
        *) die "unknown argument '$1' (see --help; trainer overrides go after --)" ;;
    esac
    shift
done

# The run flags are srun.sh's to check; sbatch needs these three itself.
[ -n "$NUM_NODES" ] || die "--num-nodes is required"
check_positive_int --num-nodes "$NUM_NODES"
[ -n "$GPUS_PER_NODE" ] || die "--gpus-per-node is required"
check_positive_int --gpus-per-node "$GPUS_PER_NODE" 16
[ -n "$LAST_CONFIG" ] || die "--config is required (e.g. --config conf/system/02x08x08.yaml)"
check_walltime --walltime "$WALLTIME"
for name in "$ACCOUNT" "$PARTITION" "$JOB_NAME"; do
    [[ "$name" =~ ^[A-Za-z0-9_.,:-]*$ ]] || die "account, partition and job name may not hold spaces or quotes, got '$name'"
done
JOB_NAME=${JOB_NAME:-sd_mlperf_$(basename "$LAST_CONFIG" .yaml)}
LOG_DIR=$(realpath -m "$LOG_DIR")
# Relative to where you submit; the job itself starts in the checkout, so pass them absolute.
SRUN_ARGS=(--results-dir "$(realpath -m "$RESULTS_DIR")" --log-dir "$LOG_DIR" "${SRUN_ARGS[@]}")

SBATCH=(sbatch)
[ -z "$ACCOUNT" ] || SBATCH+=(--account="$ACCOUNT")
[ -z "$PARTITION" ] || SBATCH+=(--partition="$PARTITION")
# --exclusive: a timed run must not share its nodes. SD_MLPERF_REPO tells the batch script (which
# sbatch runs from a spool copy) where the checkout is.
# shellcheck disable=SC2054  # the commas belong to --export's value
SBATCH+=(--job-name="$JOB_NAME" --nodes="$NUM_NODES" --ntasks-per-node="$GPUS_PER_NODE"
         --time="$WALLTIME" --exclusive --output="$LOG_DIR/%j_$JOB_NAME.out"
         --chdir="$REPO" --export=ALL,SD_MLPERF_REPO="$REPO"
         "${SBATCH_EXTRA[@]+"${SBATCH_EXTRA[@]}"}"
         "$REPO/slurm/srun.sh" "${SRUN_ARGS[@]}")

if [ "$DRY_RUN" = 1 ]; then
    # srun.sh checks the run flags first, so a bad flag prints an error and no command.
    srun_commands=$(SD_MLPERF_REPO=$REPO bash "$REPO/slurm/srun.sh" --dry-run "${SRUN_ARGS[@]}")
    shell_join "${SBATCH[@]}"
    printf '%s\n' "$srun_commands"
    exit 0
fi

# Check every run flag and path now, not after the job waited in the queue.
SD_MLPERF_REPO=$REPO bash "$REPO/slurm/srun.sh" --check-only "${SRUN_ARGS[@]}"
command -v sbatch >/dev/null || die "sbatch is not on PATH: run this on a Slurm login node (or use --dry-run)"
mkdir -p "$LOG_DIR"
job_id=$("${SBATCH[0]}" --parsable "${SBATCH[@]:1}")
job_id=${job_id%%;*}  # --parsable prints JOBID[;CLUSTER]
echo "Submitted batch job $job_id"
note "output: $LOG_DIR/${job_id}_$JOB_NAME.out (each run's also in $LOG_DIR/<datestamp>_<i>.log); state:" \
     "squeue -j $job_id (sacct -j $job_id once it ended); cancel: scancel $job_id"
