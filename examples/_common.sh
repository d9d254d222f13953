# shellcheck shell=bash
# Shared by the examples: the repo root, the flag helpers of slurm/lib.sh and how to call the CLI.
# Every example takes --dry-run (print the commands, run nothing) and runs from any folder.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=slurm/lib.sh
. "$REPO/slurm/lib.sh"
cd "$REPO" || exit 1
# `python -m sd_mlperf` is `sd-mlperf` without relying on PATH; PYTHON picks another interpreter.
# shellcheck disable=SC2034  # used by the scripts that source this file
SD_MLPERF=("${PYTHON:-python}" -m sd_mlperf)
# shellcheck disable=SC2034
DRY_RUN=0
