"""`sd-mlperf package RUN...`: N run directories -> the MLPerf Training submission layout, checked, with its score.

Writes OUT/<org>/results/<system>/stable_diffusion/result_<i>.txt (each run's final mlperf.log),
OUT/<org>/systems/<system>.json (from --system-config) and a copy of this implementation under
OUT/<org>/benchmarks/stable_diffusion/implementations/sd_mlperf/, then runs the official package, RCP and seed
checkers and the result summarizer (training 5.0.0) and prints each run's time, the olympic score and every
verdict. Exits 1 if a run disqualifies (nothing is written) or an enforced checker fails.
"""

from __future__ import annotations

import argparse
import sys

NAME = "package"
HELP = "package N run directories as an MLPerf Training submission, run the official checkers, print the score"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", metavar="RUN", help="run directories (config.yaml + final mlperf.log), "
                        "packaged as result_0.txt, result_1.txt, ... in the order given")
    parser.add_argument("--run-dir", action="append", default=[], metavar="RUN",
                        help="a run directory (repeatable; taken after the positional ones)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder: the package goes to DIR/<org>/, "
                        "the checkers' logs and package_summary.json beside it")
    parser.add_argument("--system-config", required=True, metavar="FILE",
                        help="system description (YAML or JSON) with the fields the official system_desc_checker "
                             "requires (a real systems JSON of a results tree works as is); see "
                             "conf/submission/dgx_h100_example.yaml. submitter and division come from the runs' logs, "
                             "system_name defaults to their submission_platform")
    parser.add_argument("--system-id", metavar="ID", default=None,
                        help="the results folder and system json name, e.g. nyx_n1_ngc25.04_nemo (letters, digits, "
                             ". _ + -); default: the runs' submission_platform. It may differ from system_name and "
                             "from submission_platform, as in real results")
    parser.add_argument("--rcp-bypass", action="store_true",
                        help="let a failed RCP check pass where the RCP checker allows a bypass: no reference "
                             "convergence point for this global batch (RCPs exist for 256, 384, 512, 1024 and 2048 "
                             "only; e.g. toy runs) or converging faster than the RCP allows. Given to the package "
                             "checker too; such a submission is reviewed by the submission committee")
    parser.add_argument("--allow-run-count-mismatch", action="store_true",
                        help="package fewer or more runs than the 10 the rules require (at least 3): a rehearsal "
                             "of packaging and checking before all timed runs exist. The package checker then "
                             "reports the wrong count, so the command fails and the package is not submittable")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT/<org>")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sd_mlperf.submission import format_report, package_runs

    report = package_runs([Path(d) for d in [*args.runs, *args.run_dir]], Path(args.out), Path(args.system_config),
                          rcp_bypass=args.rcp_bypass, allow_run_count_mismatch=args.allow_run_count_mismatch,
                          force=args.force, system_id=args.system_id)
    sys.stdout.write(format_report(report))
    return 0 if report.passed else 1
