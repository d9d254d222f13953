#!/usr/bin/env bash
# The embedded default end to end on a CPU in a few minutes: synthetic captioned images are made,
# encoded to latents, a tiny UNet trains 20 steps, FID/CLIP are computed twice, and the run folder
# gets the MLPerf log, checkpoints, metrics and sample grids. Same code as the benchmark; only the
# sizes in conf/smoke.yaml differ.
#   examples/01_smoke_run.sh [--dry-run] [--output-dir DIR] [-- KEY=VALUE ...]
set -euo pipefail
PROG=01_smoke_run.sh
# shellcheck source=examples/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

OUTPUT_DIR=results
OVERRIDES=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --output-dir) need_value "$1" $# "${2-}"; OUTPUT_DIR=$2; shift ;;
        -h|--help) sed -n '2,7p' "${BASH_SOURCE[0]}"; exit 0 ;;
        --) shift; OVERRIDES=("$@"); break ;;
        *) die "unknown argument '$1' (overrides go after --)" ;;
    esac
    shift
done

# The run folder is OUTPUT_DIR/smoke (run.name); the synthetic data goes inside it on first use.
run_cmd "${SD_MLPERF[@]}" train --config conf/smoke.yaml "run.output_dir=$OUTPUT_DIR" \
    "${OVERRIDES[@]+"${OVERRIDES[@]}"}"
[ "$DRY_RUN" = 1 ] || note "done: see $OUTPUT_DIR/smoke/ (mlperf.log, checkpoints/, config.yaml)"
