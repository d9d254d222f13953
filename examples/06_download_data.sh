#!/usr/bin/env bash
# Download the real checkpoints and datasets, on a machine with internet access, into the layout
# conf/sd2_mlperf.yaml expects (default /data/mlcommons). Checkpoints come from their public URLs and
# are verified against the hashes the MLCommons reference pins; the datasets come from MLCommons
# storage through the MLCommons R2 downloader, which verifies its own checksums.
#   examples/06_download_data.sh --dry-run                      # print every command
#   examples/06_download_data.sh --data-dir /data/mlcommons --what checkpoints,coco
# About 5.2 GB (SD checkpoint) + 3.9 GB (OpenCLIP) + 0.1 GB (Inception) + the LAION moments shards.
set -euo pipefail
PROG=06_download_data.sh
# shellcheck source=examples/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

DATA_DIR=/data/mlcommons
WHAT=checkpoints,coco,laion-moments
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --data-dir) need_value "$1" $# "${2-}"; DATA_DIR=$2; shift ;;
        --what) need_value "$1" $# "${2-}"; WHAT=$2; shift ;;
        -h|--help) sed -n '2,9p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done
[[ "$DATA_DIR" == /* ]] || die "--data-dir must be an absolute path, got '$DATA_DIR'"
IFS=, read -r -a PARTS <<<"$WHAT"
for part in "${PARTS[@]}"; do
    case "$part" in checkpoints|coco|laion-moments|laion-images) ;;
        *) die "--what takes a comma-separated list of checkpoints, coco, laion-moments, laion-images; got '$part'" ;;
    esac
done
[ "$DRY_RUN" = 1 ] || command -v curl >/dev/null || die "curl is not installed"

CKPT_DIR=$DATA_DIR/sd-checkpoint-3.0
R2_SCRIPT=$DATA_DIR/.mlc-r2-downloader.sh
R2_METADATA=https://training.mlcommons-storage.org/metadata

# fetch URL FILE ALGO HASH: resumable download, then the checksum must match (or the script stops).
fetch() {
    if [ "$DRY_RUN" = 0 ] && [ -f "$2" ] && echo "$4  $2" | "${3}sum" --check --status -; then
        note "$2 is already here, checksum ok"
        return
    fi
    run_cmd curl -fL --retry 3 -C - -o "$2" "$1"
    if [ "$DRY_RUN" = 1 ]; then
        printf '%s\n' "echo '$4  $2' | ${3}sum --check --strict -"
    else
        echo "$4  $2" | "${3}sum" --check --strict - || die "checksum mismatch for $2: delete it and download again"
    fi
}

# r2 DEST URI: the MLCommons R2 downloader (the reference's way to get its datasets).
R2_FETCHED=0
r2() {
    if [ "$R2_FETCHED" = 0 ]; then
        run_cmd mkdir -p "$DATA_DIR"
        run_cmd curl -fsSL -o "$R2_SCRIPT" https://raw.githubusercontent.com/mlcommons/r2-downloader/refs/heads/main/mlc-r2-downloader.sh
        R2_FETCHED=1
    fi
    run_cmd bash "$R2_SCRIPT" -d "$1" "$2"
}

for part in "${PARTS[@]}"; do
    case "$part" in
        checkpoints)
            run_cmd mkdir -p "$CKPT_DIR"
            # VAE + OpenCLIP text tower (the UNet weights in it are dropped): model.frozen_checkpoint.
            fetch https://huggingface.co/stabilityai/stable-diffusion-2-base/resolve/main/512-base-ema.ckpt \
                "$CKPT_DIR/512-base-ema.ckpt" sha256 d635794c1fedfdfa261e065370bea59c651fc9bfa65dc6d67ad29e11869a1824
            # FID Inception (pytorch-fid's pt_inception-2015-12-05): eval.inception_weights.
            fetch https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth \
                "$CKPT_DIR/pt_inception-2015-12-05-6726825d.pth" sha1 bd836944fd6db519dfd8d924aa457f5b3c8357ff
            # OpenCLIP ViT-H-14 laion2b_s32b_b79k for the CLIP score: eval.clip_weights.
            fetch https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K/resolve/main/open_clip_pytorch_model.bin \
                "$CKPT_DIR/open_clip_pytorch_model.bin" sha256 9a78ef8e8c73fd0df621682e7a8e8eb36c6916cb3c16b291a082ecd52ab79cc4
            ;;
        coco)
            # val2014_30k.tsv (30,000 prompts) and val2014_30k_stats.npz (FID mu/sigma): eval.prompts_file, eval.fid_stats.
            r2 "$DATA_DIR/coco2014" "$R2_METADATA/stable-diffusion-coco2014-validation-prompts-dataset.uri"
            r2 "$DATA_DIR/coco2014" "$R2_METADATA/stable-diffusion-coco2014-validation-stats-dataset.uri"
            ;;
        laion-moments)
            # 832 shards 00000..00831.tar of VAE moments + captions (6,513,144 samples): data.train_shards.
            r2 "$DATA_DIR/laion-400m/moments" "$R2_METADATA/stable-diffusion-laion-400m-filtered-moments-dataset.uri"
            ;;
        laion-images)
            # The raw images of the same subset, for data.train_format=images or your own precompute.
            # ("table-diffusion" is how the MLCommons reference README spells this file name.)
            r2 "$DATA_DIR/laion-400m/images" "$R2_METADATA/table-diffusion-laion-400m-filtered-images-dataset.uri"
            ;;
    esac
done
[ "$DRY_RUN" = 1 ] || note "done; if the downloader nested the shards in a subfolder, point data.train_shards at it"
