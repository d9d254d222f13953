#!/usr/bin/env bash
# Evaluate a run's checkpoints afterwards (the MLPerf rules score them offline): FID and CLIP score on the
# validation prompts, with the run's own resolved config (RUN_DIR/config.yaml).
#   examples/03_offline_eval.sh [--dry-run] [--run-dir results/smoke] [--last-two] [--config FILE] [-- KEY=VALUE ...]
# A run trained with eval.inline=false (the submission path) is scored as the rules require and gets its final
# mlperf.log (evaluate --run-dir); any other run's checkpoints are scored one by one (evaluate --checkpoint).
# Run examples/01_smoke_run.sh first for a run to evaluate on a CPU.
set -euo pipefail
PROG=03_offline_eval.sh
# shellcheck source=examples/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

RUN_DIR=results/smoke
CONFIG=""
STRATEGY=--all
OVERRIDES=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --run-dir) need_value "$1" $# "${2-}"; RUN_DIR=$2; shift ;;
        --config) need_value "$1" $# "${2-}"; CONFIG=$2; shift ;;
        --last-two) STRATEGY=--last-two ;;
        -h|--help) sed -n '2,7p' "${BASH_SOURCE[0]}"; exit 0 ;;
        --) shift; OVERRIDES=("$@"); break ;;
        *) die "unknown argument '$1' (overrides go after --)" ;;
    esac
    shift
done

if [ -f "$RUN_DIR/eval_checkpoints/index.jsonl" ]; then
    # Collected for offline evaluation: score as the rules require, then write RUN_DIR/mlperf.log.
    run_cmd "${SD_MLPERF[@]}" evaluate --run-dir "$RUN_DIR" "$STRATEGY" \
        ${CONFIG:+--config "$CONFIG"} "${OVERRIDES[@]+"${OVERRIDES[@]}"}"
    exit 0
fi
CONFIG=${CONFIG:-$RUN_DIR/config.yaml}
# Every published checkpoint, oldest first (sd_mlperf/training/checkpoints.py: checkpoints/step_NNNNNNN/model.pt).
shopt -s nullglob
CHECKPOINTS=("$RUN_DIR"/checkpoints/step_*/model.pt)
shopt -u nullglob
if [ ${#CHECKPOINTS[@]} -eq 0 ]; then
    [ "$DRY_RUN" = 1 ] || die "no checkpoints under $RUN_DIR/checkpoints/step_*/ (train first, or pass --run-dir)"
    CHECKPOINTS=("$RUN_DIR/checkpoints/step_*/model.pt")  # shown as the pattern in a dry run
else
    check_file --config "$CONFIG"
fi

CHECKPOINT_ARGS=()
for c in "${CHECKPOINTS[@]}"; do CHECKPOINT_ARGS+=(--checkpoint "$c"); done
run_cmd "${SD_MLPERF[@]}" evaluate --config "$CONFIG" "${CHECKPOINT_ARGS[@]}" "${OVERRIDES[@]+"${OVERRIDES[@]}"}"
