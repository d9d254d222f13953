"""`sd-mlperf report RUN_DIR`: PNG plots of a run (training, evaluations, sample grids) and its summary.

The plots go to RUN_DIR/report/ (or --out): train.png (loss, lr, images/s, ...), eval.png (FID, CLIP and every
further numeric evaluation metric, e.g. toy metrics), grids.png (the evaluations' sample grids side by side). The
summary is the one `sd-mlperf train` logs at its end; its time-to-train projection takes the run's global batch,
GPU count and measured img/s per GPU unless --global-batch-size / --gpus / --img-per-s-per-gpu give others.
Needs matplotlib: pip install -e '.[report]'.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "report"
HELP = "plot a run's metrics and sample grids (PNG) and print its summary with a time-to-train projection"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of `sd-mlperf train` (output_dir/name)")
    parser.add_argument("--out", metavar="DIR", help="where the PNGs go (default RUN_DIR/report)")
    parser.add_argument("--max-grids", type=int, default=8, metavar="N",
                        help="at most N sample grids, evenly spaced, first and last kept (default 8)")
    proj = parser.add_argument_group("time-to-train projection (defaults: this run's)")
    proj.add_argument("--global-batch-size", type=int, metavar="N", help="global batch of the projected run")
    proj.add_argument("--gpus", type=int, metavar="N", help="GPUs of the projected run")
    proj.add_argument("--img-per-s-per-gpu", type=float, metavar="X",
                      help="images/s per GPU of the projected run (e.g. from `sd-mlperf bench train`)")


def run(args: argparse.Namespace) -> int:
    from sd_mlperf.report.plots import write_plots
    from sd_mlperf.report.run_data import read_run
    from sd_mlperf.report.summary import run_summary

    if args.max_grids < 1:
        raise ValueError(f"--max-grids must be at least 1, got {args.max_grids}")
    data = read_run(args.run_dir)
    written = write_plots(data, Path(args.out) if args.out else data.run_dir / "report", max_grids=args.max_grids)
    sys.stdout.write(run_summary(data, num_gpus=args.gpus, img_per_s_per_gpu=args.img_per_s_per_gpu,
                                 global_batch_size=args.global_batch_size, written=written) + "\n")
    if not written:
        sys.stdout.write(f"nothing to plot: {data.run_dir} has no train or eval records and no sample grids\n")
    return 0
