#!/usr/bin/env bash
# Encode a folder of raw image shards (KEY.jpg + KEY.txt, webdataset tars) into training shards of
# VAE moments (+ text embeddings with data.train_format=moments_embeddings), the way the benchmark's
# LAION moments were made: images in [0,1], resize 512 bicubic, centre crop (see README).
#   examples/02_precompute_latents.sh [--dry-run] [--workdir DIR]            # synthetic shards, tiny VAE (CPU)
#   examples/02_precompute_latents.sh --input DIR --output DIR --gpus 8      # real shards, real VAE
set -euo pipefail
PROG=02_precompute_latents.sh
# shellcheck source=examples/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

WORKDIR=results/examples/precompute
INPUT=""
OUTPUT=""
GPUS=1
CONFIG=""
OVERRIDES=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --workdir) need_value "$1" $# "${2-}"; WORKDIR=$2; shift ;;
        --input) need_value "$1" $# "${2-}"; INPUT=$2; shift ;;
        --output) need_value "$1" $# "${2-}"; OUTPUT=$2; shift ;;
        --gpus) need_value "$1" $# "${2-}"; check_positive_int "$1" "$2" 16; GPUS=$2; shift ;;
        --config) need_value "$1" $# "${2-}"; CONFIG=$2; shift ;;
        -h|--help) sed -n '2,6p' "${BASH_SOURCE[0]}"; exit 0 ;;
        --) shift; OVERRIDES=("$@"); break ;;
        *) die "unknown argument '$1' (overrides go after --)" ;;
    esac
    shift
done

if [ -z "$INPUT" ]; then
    # No input given: make the synthetic raw shards first (tiny sizes from conf/smoke.yaml).
    CONFIG=${CONFIG:-conf/smoke.yaml}
    INPUT=$WORKDIR/raw
    OUTPUT=${OUTPUT:-$WORKDIR/latents}
    run_cmd "${SD_MLPERF[@]}" make-synthetic-data --out "$WORKDIR" --config "$CONFIG" "${OVERRIDES[@]+"${OVERRIDES[@]}"}"
else
    # Real shards: the benchmark config brings the real VAE (model.frozen_checkpoint).
    CONFIG=${CONFIG:-conf/sd2_mlperf.yaml}
    [ -n "$OUTPUT" ] || die "--output is required with --input"
    # A glob or brace pattern is expanded by the loader, so only a plain path is checked here.
    [ "$DRY_RUN" = 1 ] || [ -e "$INPUT" ] || [[ "$INPUT" == *'{'* || "$INPUT" == *'*'* ]] || die "--input '$INPUT' does not exist"
fi

PRECOMPUTE=(precompute-latents --input "$INPUT" --output "$OUTPUT" --config "$CONFIG"
            "${OVERRIDES[@]+"${OVERRIDES[@]}"}")
if [ "$GPUS" -gt 1 ]; then
    # One process per GPU; the shards are split across ranks, and a rerun skips finished shards.
    run_cmd torchrun --standalone --nproc-per-node="$GPUS" -m sd_mlperf "${PRECOMPUTE[@]}"
else
    run_cmd "${SD_MLPERF[@]}" "${PRECOMPUTE[@]}"
fi
