#!/usr/bin/env bash
# Submit the benchmark to a Slurm cluster with pyxis/enroot: the seed's example, 2 nodes x 8 GPUs
# (conf/system/02x08x08.yaml, global batch 128). Any slurm/sbatch.sh flag may be added, e.g.
#   examples/05_multi_node_slurm.sh --dry-run
#   examples/05_multi_node_slurm.sh --account myacct --partition batch --container /shared/sd_mlperf.sqsh
# The image as a .sqsh file: docker/build.sh --sqsh /shared/sd_mlperf.sqsh (or push it to a registry).
# Datasets and checkpoints must be on a filesystem every node sees (--dataset-dir, default /data/mlcommons).
set -euo pipefail
PROG=05_multi_node_slurm.sh
# shellcheck source=examples/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
case "${1-}" in -h|--help) sed -n '2,8p' "${BASH_SOURCE[0]}"; exit 0 ;; esac

# The job's output (with the RESULT line) lands in ./results/logs/JOBID_sd_mlperf_02x08x08.out and the run
# folder in ./results/02x08x08_JOBID/ (mlperf.log, checkpoints, metrics).
exec bash slurm/sbatch.sh --num-nodes 2 --gpus-per-node 8 --config conf/system/02x08x08.yaml \
    --checkpoint /data/mlcommons/sd-checkpoint-3.0/512-base-ema.ckpt "$@"
