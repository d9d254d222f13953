#!/usr/bin/env bash
# The batch script of a training job (slurm/sbatch.sh submits it; inside `salloc` it runs by hand too). On
# every node of the allocation it starts one task per GPU, each running slurm/run_and_time.sh, inside the
# container (pyxis/enroot) or, with --container none, in a Python environment the nodes share (bare metal,
# modules, a venv). The trainer reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID for its rank and MASTER_ADDR,
# which this script sets, for the rendezvous.
# With --num-runs N it makes N independent timed runs in one allocation, as a submission needs (10). Before
# each, the page cache is dropped on every node outside the container; each run gets its own run directory
# (NAME_i), a freshly drawn seed (run.seed stays null) and a log LOG_DIR/<datestamp>_<i>.log; after each, a
# run trained for offline evaluation is scored (sd-mlperf evaluate --run-dir) and the compliance checker
# reads its mlperf.log. The run directories are what `sd-mlperf package` takes.
set -euo pipefail
PROG=srun.sh
# sbatch runs a copy of this file from its spool folder, so sbatch.sh tells us where the checkout is.
REPO=${SD_MLPERF_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# shellcheck source=slurm/lib.sh
. "$REPO/slurm/lib.sh"

WORKDIR=/workspace/sd_mlperf   # where the Dockerfile installs the package (and where we mount the checkout)
RESULTS_MNT=/results
RULESET=5.0.0                  # the compliance checker's ruleset: sd_mlperf/submission/checkers.py RULESET

usage() {
    cat <<EOF
Usage: slurm/srun.sh --num-nodes N --gpus-per-node G --config FILE [options] [-- KEY=VALUE ...]

  -n, --num-nodes N       nodes to run on (default: \$SLURM_JOB_NUM_NODES)
  -g, --gpus-per-node G   GPUs per node; one task is started per GPU
  -c, --config FILE       config overlay inside the checkout (repeatable), merged over --base-config
  -k, --checkpoint PATH   frozen 512-base-ema.ckpt, an absolute path as the nodes see it
                          (sets model.frozen_checkpoint; default: the config's value)
  -d, --container IMAGE   pyxis image: a .sqsh file or a registry image such as nvcr.io#org/sd_mlperf:tag
                          (default: \$SD_MLPERF_CONTAINER or sd_mlperf:latest); 'none': no container, the
                          tasks run the checkout with --venv's Python (or the python on the nodes' PATH)
      --venv DIR          --container none: the Python environment of the tasks (DIR/bin/python), on a
                          filesystem every node sees (default: the python on PATH, e.g. from modules)
  -r, --results-dir DIR   runs go to DIR/RUN_NAME, mounted at $RESULTS_MNT in the container (default: ./results)
  -D, --dataset-dir DIR   host folder with datasets and checkpoints, mounted at the same path (default: /data/mlcommons)
      --run-name NAME     run.name; %j becomes the job id (default: CONFIG_%j; with --num-runs N, run i is
                          NAME_i). The open division resumes a run given its name again; the closed refuses it
      --num-runs N        independent timed runs, one after another, each after a page-cache drop (default 1;
                          a submission is 10)
      --log-dir DIR       each run's output also goes to DIR/<datestamp>_<i>.log (default: RESULTS/logs)
      --env-file FILE     NAME=VALUE lines exported to every task: a system's NCCL settings (slurm/env/*.env)
      --master-addr ADDR  rendezvous address of rank 0 (default: \$MASTER_ADDR, else the first node's name, or its
                          Slurm NodeAddr when the name does not resolve)
      --srun-arg ARG      extra srun argument for the training and evaluation steps, repeatable
                          (e.g. --srun-arg --cpu-bind=none)
      --no-eval           do not score runs trained with eval.inline=false in the job (sd-mlperf evaluate
                          --run-dir later); their compliance check then waits for that too
      --base-config FILE  base config (default: conf/sd2_mlperf.yaml; 'none' for no base)
      --code-in-image     run the code installed in the image instead of mounting this checkout at $WORKDIR
      --dry-run           print the commands of the job's first run instead of running them
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
VENV=""
RESULTS_DIR=./results
DATASET_DIR=""
RUN_NAME=""
NUM_RUNS=1
LOG_DIR=""
ENV_FILE=""
MASTER_ADDR_FLAG=""
SRUN_EXTRA=()
EVALUATE=1
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
        --venv) need_value "$1" $# "${2-}"; VENV=$2; shift ;;
        -r|--results-dir) need_value "$1" $# "${2-}"; RESULTS_DIR=$2; shift ;;
        -D|--dataset-dir) need_value "$1" $# "${2-}"; DATASET_DIR=$2; shift ;;
        --run-name) need_value "$1" $# "${2-}"; RUN_NAME=$2; shift ;;
        --num-runs) need_value "$1" $# "${2-}"; NUM_RUNS=$2; shift ;;
        --log-dir) need_value "$1" $# "${2-}"; LOG_DIR=$2; shift ;;
        --env-file) need_value "$1" $# "${2-}"; ENV_FILE=$2; shift ;;
        --master-addr) need_value "$1" $# "${2-}"; MASTER_ADDR_FLAG=$2; shift ;;
        --srun-arg)
            [ $# -ge 2 ] && [[ "${2-}" == -* ]] || die "--srun-arg needs an srun option such as --cpu-bind=none"
            SRUN_EXTRA+=("$2"); shift ;;
        --no-eval) EVALUATE=0 ;;
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
check_positive_int --num-runs "$NUM_RUNS" 100
[ ${#CONFIGS[@]} -gt 0 ] || die "--config is required (e.g. --config conf/system/01x08x08.yaml)"
for o in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
    [[ "$o" == *=* ]] || die "override '$o' after -- is not of the form dotted.key=value"
    if [ "$NUM_RUNS" -gt 1 ] && [[ "$o" == run.seed=* ]] && [ "$o" != run.seed=null ]; then
        die "--num-runs $NUM_RUNS with $o would give every run the same seed; leave run.seed null (each run draws one)"
    fi
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
        *) die "--config file '$path' is outside the checkout $REPO, which is what the job runs; copy it into conf/system/" ;;
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
if [ "$CONTAINER" = none ]; then
    [ "$MOUNT_CODE" = 1 ] || die "--code-in-image needs a container; with --container none the tasks run this checkout"
    [ -z "$DATASET_DIR" ] || note "--dataset-dir only chooses a container mount; with --container none the" \
                                  "config's paths are used as they are"
    [ -z "$VENV" ] || [[ "$VENV" == /* ]] || die "--venv must be an absolute path (as every node sees it), got '$VENV'"
else
    [ -z "$VENV" ] || die "--venv applies to --container none; the container brings its own Python"
    DATASET_DIR=${DATASET_DIR:-/data/mlcommons}
    [[ "$DATASET_DIR" == /* ]] || die "--dataset-dir must be an absolute path (it is mounted at the same path), got '$DATASET_DIR'"
fi
[[ "$RUN_NAME" =~ ^[A-Za-z0-9_.%-]*$ ]] || die "--run-name may hold only letters, digits, '_', '.', '-' and %j, got '$RUN_NAME'"
[[ "$MASTER_ADDR_FLAG" =~ ^[A-Za-z0-9_.:-]*$ ]] || die "--master-addr must be a host name or an IP address, got '$MASTER_ADDR_FLAG'"
RESULTS_DIR=$(realpath -m "$RESULTS_DIR")
LOG_DIR=$(realpath -m "${LOG_DIR:-$RESULTS_DIR/logs}")
ENV_LINES=()
ENV_NAMES=()
if [ -n "$ENV_FILE" ]; then
    check_file --env-file "$ENV_FILE"
    env_text=$(read_env_file "$ENV_FILE")
    while IFS= read -r line; do
        [ -n "$line" ] || continue
        ENV_LINES+=("$line")
        ENV_NAMES+=("${line%%=*}")
        export "${line?}"
    done <<< "$env_text"
fi
if [ "$MODE" = dry-run ]; then
    note "dry run: paths are not checked on this host"
else
    [ "$CONTAINER" = none ] || check_dir --dataset-dir "$DATASET_DIR"
    [ -z "$CHECKPOINT" ] || check_file --checkpoint "$CHECKPOINT"
    if [[ "$CONTAINER" == *.sqsh ]]; then check_file --container "$CONTAINER"; fi
    [ -z "$VENV" ] || [ -x "$VENV/bin/python" ] \
        || die "--venv $VENV has no bin/python (python3 -m venv $VENV && $VENV/bin/pip install -e $REPO)"
fi
[ "$MODE" != check ] || exit 0

# --- build the commands --------------------------------------------------------------------------
RUN_NAME=${RUN_NAME:-${CONFIG_NAME}_%j}
[ -z "${SLURM_JOB_ID:-}" ] || RUN_NAME=${RUN_NAME//%j/$SLURM_JOB_ID}
[ -z "$MASTER_ADDR_FLAG" ] || export MASTER_ADDR=$MASTER_ADDR_FLAG
if [ "$CONTAINER" = none ]; then
    TASK_RESULTS=$RESULTS_DIR            # the results folder as the tasks see it
    PLACE=(--chdir="$REPO")
    TASK_SCRIPT=$REPO/slurm/run_and_time.sh
    PYTHON=${VENV:+$VENV/bin/}python
else
    TASK_RESULTS=$RESULTS_MNT
    MOUNTS="$RESULTS_DIR:$RESULTS_MNT,$DATASET_DIR:$DATASET_DIR"
    if [ -n "$CHECKPOINT" ] && [[ "$CHECKPOINT" != "$DATASET_DIR"/* ]]; then
        MOUNTS+=",$(dirname "$CHECKPOINT"):$(dirname "$CHECKPOINT")"
    fi
    [ "$MOUNT_CODE" = 0 ] || MOUNTS+=",$REPO:$WORKDIR"
    # The image's own values (and enroot's PyTorch hook, which sets MASTER_ADDR/PORT) would win over these.
    CONTAINER_ENV=$(IFS=,; echo "MASTER_ADDR${ENV_NAMES[*]+,${ENV_NAMES[*]}}")
    # One named container per job: the image is imported once per node, not once per step.
    PLACE=(--container-image="$CONTAINER" --container-name=sd_mlperf --container-mounts="$MOUNTS"
           --container-workdir="$WORKDIR" --no-container-mount-home --container-env="$CONTAINER_ENV")
    TASK_SCRIPT=slurm/run_and_time.sh    # the checkout (or the image's copy) at the workdir
    PYTHON=python
fi
TASKS=(--nodes="$NUM_NODES" --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1)

run_index() {  # N: run N's index as names and logs show it, zero-padded as seq -w does (01 ... 10)
    printf '%0*d\n' "${#NUM_RUNS}" "$1"
}
run_name() {  # N: the name of run N of the job
    if [ "$NUM_RUNS" -eq 1 ]; then printf '%s\n' "$RUN_NAME"; else printf '%s_%s\n' "$RUN_NAME" "$(run_index "$1")"; fi
}
# Each sets one array: the page-cache drop on every node (outside the container), the training tasks
# (--label: every line starts with its task's rank), the offline evaluation, the compliance checker.
build_steps() {  # NAME STRATEGY
    local args=(--num-nodes "$NUM_NODES" --gpus-per-node "$GPUS_PER_NODE" --results-dir "$TASK_RESULTS"
                --run-name "$1" "${CONFIG_ARGS[@]}")
    [ -z "$CHECKPOINT" ] || args+=(--checkpoint "$CHECKPOINT")
    [ -z "$VENV" ] || args+=(--venv "$VENV")
    args+=(--launcher none)
    [ ${#OVERRIDES[@]} -eq 0 ] || args+=(-- "${OVERRIDES[@]}")
    TASK_ARGS=("${args[@]}")
    DROP=(srun --nodes="$NUM_NODES" --ntasks-per-node=1 bash "$REPO/slurm/drop_caches.sh")
    TRAIN=(srun --label "${TASKS[@]}" "${PLACE[@]}" "${SRUN_EXTRA[@]+"${SRUN_EXTRA[@]}"}"
           bash "$TASK_SCRIPT" "${TASK_ARGS[@]}")
    EVAL=(srun --label "${TASKS[@]}" "${PLACE[@]}" "${SRUN_EXTRA[@]+"${SRUN_EXTRA[@]}"}"
          "$PYTHON" -m sd_mlperf evaluate --run-dir "$TASK_RESULTS/$1" "$2")
    CHECK=(srun --nodes=1 --ntasks=1 "${PLACE[@]}" "$PYTHON" -m mlperf_logging.compliance_checker --usage training
           --ruleset "$RULESET" --log_output "$TASK_RESULTS/$1/compliance_checker.log" "$TASK_RESULTS/$1/mlperf.log")
}

if [ "$MODE" = dry-run ]; then
    build_steps "$(run_name 1)" --all
    # The environment every task gets besides the job's own (--master-addr, --env-file).
    [ ${#ENV_LINES[@]} -eq 0 ] && [ -z "$MASTER_ADDR_FLAG" ] \
        || shell_join export ${MASTER_ADDR_FLAG:+"MASTER_ADDR=$MASTER_ADDR_FLAG"} "${ENV_LINES[@]+"${ENV_LINES[@]}"}"
    shell_join "${DROP[@]}"
    shell_join "${TRAIN[@]}"
    # What each task then runs (SLURM_PROCID etc. are set there by srun).
    SLURM_PROCID=0 bash "$REPO/slurm/run_and_time.sh" --dry-run "${TASK_ARGS[@]}"
    shell_join "${EVAL[@]}"
    shell_join "${CHECK[@]}"
    last=$([ "$NUM_RUNS" -eq 1 ] || echo " ... $(run_name "$NUM_RUNS")")
    note "dry run: $NUM_RUNS run(s) named $(run_name 1)$last," \
         "each logged to $LOG_DIR/<datestamp>_<i>.log; evaluate runs only for a run trained with eval.inline=false" \
         "(runs after the first use --last-two)$([ "$EVALUATE" = 1 ] || echo ", and not at all with --no-eval")"
    exit 0
fi

# --- run -----------------------------------------------------------------------------------------
if [ -z "${MASTER_ADDR:-}" ]; then
    MASTER_ADDR=$(rendezvous_addr "${SLURM_JOB_NODELIST:-}") \
        || die "cannot tell the first node's address from SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}' (run this" \
               "inside an allocation, or pass --master-addr ADDR)"
    export MASTER_ADDR
fi
mkdir -p "$RESULTS_DIR" "$LOG_DIR"
DATESTAMP=$(date +%y%m%d%H%M%S)
echo "$PROG: job ${SLURM_JOB_ID:-(no id)} on ${SLURM_JOB_NODELIST:-?}:" \
     "$NUM_RUNS run(s) of $NUM_NODES x $GPUS_PER_NODE" \
     "tasks, container $CONTAINER${VENV:+ (python from $VENV)}, rendezvous $MASTER_ADDR, results in $RESULTS_DIR," \
     "logs $LOG_DIR/${DATESTAMP}_<i>.log"

one_run() {  # I NAME: drop the page cache on every node, then the timed run (its status is ours)
    echo "$PROG: run $1 of $NUM_RUNS: $RESULTS_DIR/$2 ($(date +'%Y-%m-%d %r'))"
    if "${DROP[@]}"; then
        export SD_MLPERF_CACHE_CLEARED=1   # the trainer logs cache_clear true
    else
        unset SD_MLPERF_CACHE_CLEARED
        note "the page cache was not dropped on every node: run $1 logs cache_clear false, which a closed-division" \
             "submission refuses (allow root or passwordless 'sudo /sbin/sysctl vm.drop_caches=3' on the nodes)"
    fi
    "${TRAIN[@]}"
}

score_and_check() {  # I NAME: offline evaluation if the run collected checkpoints for it, then the checker
    local run_dir=$RESULTS_DIR/$2
    if [ -f "$run_dir/eval_checkpoints/index.jsonl" ]; then
        if [ "$EVALUATE" = 0 ]; then
            note "run $1: scored offline later (--no-eval): sd-mlperf evaluate --run-dir $run_dir; then check" \
                 "its mlperf.log"
            return 2
        fi
        "${EVAL[@]}" || note "run $1: evaluate exited with status $? (see above)"
    fi
    if [ ! -f "$run_dir/mlperf.log" ]; then
        note "run $1: no $run_dir/mlperf.log to check"
        return 2
    fi
    # The checker's own console output goes to a file: its verdict is in compliance_checker.log.
    if "${CHECK[@]}" > "$run_dir/compliance_checker.out" 2>&1; then
        echo "$PROG: run $1: compliance checker PASSED ($run_dir/compliance_checker.log)"
        return 0
    fi
    echo "$PROG: run $1: compliance checker FAILED ($run_dir/compliance_checker.log):"
    if [ -f "$run_dir/compliance_checker.log" ]; then
        grep -E '^(ERROR|WARNING)' "$run_dir/compliance_checker.log" | head -n 20 || true
    else  # it did not get as far as its log (not installed, srun refused the step): say why
        tail -n 20 "$run_dir/compliance_checker.out"
    fi
    return 1
}

CURRENT=1
# shellcheck disable=SC2329  # called by the trap below
on_signal() {  # scancel and the time limit send SIGTERM; say what is left and how to go on
    trap - TERM INT
    local name run_dir
    name=$(run_name "$CURRENT")
    run_dir=$RESULTS_DIR/$name
    note "job ${SLURM_JOB_ID:-} was stopped (scancel, or its time limit) during run $CURRENT of $NUM_RUNS: $run_dir"
    note "left behind: checkpoints up to $(cat "$run_dir/checkpoints/latest" 2>/dev/null || echo '(none)'), an" \
         "MLPerf log without run_stop, the log $LOG_DIR/${DATESTAMP}_$(run_index "$CURRENT").log; runs before it" \
         "are complete"
    note "to finish it (open division): submit the same command with --run-name $name --num-runs 1; it resumes from" \
         "the latest checkpoint. A closed-division run is never resumed: submit it again under a new --run-name"
    [ "$NUM_RUNS" -eq 1 ] \
        || note "the runs still missing: submit --num-runs $((NUM_RUNS - CURRENT + 1)) under a new --run-name"
    exit 143
}
trap on_signal TERM INT

SUMMARY=()
DONE=()
status=0
for n in $(seq 1 "$NUM_RUNS"); do
    CURRENT=$n
    i=$(run_index "$n")
    name=$(run_name "$n")
    log=$LOG_DIR/${DATESTAMP}_$i.log
    build_steps "$name" "$([ "$n" -eq 1 ] && echo --all || echo --last-two)"
    set +e
    one_run "$i" "$name" 2>&1 | tee "$log"
    train_status=${PIPESTATUS[0]}
    set -e
    seconds=$(sed -n 's/^\(0: \)\{0,1\}RESULT,stable_diffusion,\([0-9]*\),.*/\2/p' "$log" | tail -n 1)
    if [ "$train_status" -ne 0 ]; then
        SUMMARY+=("run $i: $RESULTS_DIR/$name: training FAILED (exit status $train_status; see $log)")
        status=$train_status
        break
    fi
    set +e
    score_and_check "$i" "$name" 2>&1 | tee -a "$log"
    check_status=${PIPESTATUS[0]}
    set -e
    # A verdict, not the job's status: the job failed only if training did (sd-mlperf package refuses such runs).
    case "$check_status" in
        0) verdict="compliance PASSED" ;;
        1) verdict="compliance FAILED" ;;
        *) verdict="not checked" ;;
    esac
    SUMMARY+=("run $i: $RESULTS_DIR/$name: RESULT ${seconds:-?} s, $verdict")
    DONE+=("$RESULTS_DIR/$name")
done
trap - TERM INT

echo "$PROG: job ${SLURM_JOB_ID:-}: ${#DONE[@]} of $NUM_RUNS run(s) done"
printf '  %s\n' "${SUMMARY[@]}"
if [ ${#DONE[@]} -gt 0 ]; then
    echo "$PROG: package them (it checks them again): sd-mlperf package ${DONE[*]} --out submission" \
         "--system-config my_system.yaml"
fi
exit "$status"
