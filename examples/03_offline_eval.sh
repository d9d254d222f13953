#!/usr/bin/env bash
# Evaluate a run's saved checkpoints afterwards (the MLPerf rules allow offline evaluation): FID and
# CLIP score on the validation prompts, with the run's own resolved config (RUN_DIR/config.yaml).
#   examples/03_offline_eval.sh [--dry-run] [--run-dir results/smoke] [--config FILE] [-- KEY=VALUE ...]
# Run examples/01_smoke_run.sh first for a run to evaluate on a CPU.
set -euo pipefail
PROG=03_offline_eval.sh
# shellcheck source=examples/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

RUN_DIR=results/smoke
CONFIG=""
OVERRIDES=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --run-dir) need_value "$1" $# "${2-}"; RUN_DIR=$2; shift ;;
        --config) need_value "$1" $# "${2-}"; CONFIG=$2; shift ;;
        -h|--help) sed -n '2,5p' "${BASH_SOURCE[0]}"; exit 0 ;;
        --) shift; OVERRIDES=("$@"); break ;;
        *) die "unknown argument '$1' (overrides go after --)" ;;
    esac
    shift
done

CONFIG=${CONFIG:-$RUN_DIR/config.yaml}
# Every published checkpoint, oldest first (sd_mlperf/checkpoint.py: checkpoints/step_NNNNNNN/model.pt).
shopt -s nullglob
CHECKPOINTS=("$RUN_DIR"/checkpoints/step_*/model.pt)
shopt -u nullglob
if [ ${#CHECKPOINTS[@]} -eq 0 ]; then
    [ "$DRY_RUN" = 1 ] || die "no checkpoints under $RUN_DIR/checkpoints/step_*/ (train first, or pass --run-dir)"
    CHECKPOINTS=("$RUN_DIR/checkpoints/step_*/model.pt")  # shown as the pattern in a dry run
else
    check_file --config "$CONFIG"
fi

# Overrides go before --checkpoint, which takes every path after it.
run_cmd "${SD_MLPERF[@]}" evaluate --config "$CONFIG" "${OVERRIDES[@]+"${OVERRIDES[@]}"}" \
    --checkpoint "${CHECKPOINTS[@]}"
