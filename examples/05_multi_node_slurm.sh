#!/usr/bin/env bash
# Submit the benchmark to a Slurm cluster: the seed's example, 2 nodes x 8 GPUs (conf/system/02x08x08.yaml,
# global batch 128), in the container (pyxis/enroot). Any slurm/sbatch.sh flag may be added, e.g.
#   examples/05_multi_node_slurm.sh --dry-run
#   examples/05_multi_node_slurm.sh --account myacct --partition batch --container /shared/sd_mlperf.sqsh
#   examples/05_multi_node_slurm.sh --num-runs 10 --env-file slurm/env/dgx_h100.env   # a submission's 10 runs
#   examples/05_multi_node_slurm.sh --container none --venv /shared/venvs/sd_mlperf   # no container
# The image as a .sqsh file: docker/build.sh --sqsh /shared/sd_mlperf.sqsh (or push it to a registry).
# Datasets and checkpoints must be on a filesystem every node sees (--dataset-dir, default /data/mlcommons).
set -euo pipefail
PROG=05_multi_node_slurm.sh
# shellcheck source=examples/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
case "${1-}" in -h|--help) sed -n '2,9p' "${BASH_SOURCE[0]}"; exit 0 ;; esac

# The job's output (rank-labelled, with the RESULT line) lands in ./results/logs/JOBID_sd_mlperf_02x08x08.out,
# each run's also in ./results/logs/<datestamp>_<i>.log, and the run folder in ./results/02x08x08_JOBID/
# (mlperf.log after its offline scoring, compliance_checker.log, checkpoints, metrics).
exec bash slurm/sbatch.sh --num-nodes 2 --gpus-per-node 8 --config conf/system/02x08x08.yaml \
    --checkpoint /data/mlcommons/sd-checkpoint-3.0/512-base-ema.ckpt "$@"
