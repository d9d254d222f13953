"""`sd-mlperf bench train` as a stage of tests/gpu/run_device_checks.sh: a failed row fails the stage.

    python tests/gpu/bench_stage.py --output FILE [other `sd-mlperf bench train` arguments]

The bench command exits 1 when a row failed; this stage also names the failed rows (CUDA error, out of memory,
capture failure, non-finite loss) and tells an all-skipped run from a measured one. Exit status:
0 when every row is ok (rows skipped for an absent backend are listed), 1 when the command failed or any
row failed, 77 (the stage runner's skip code) with a `SKIP: reason` line when every row was skipped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SKIP_EXIT = 77
"""The exit status run_device_checks.sh reads as `skipped`, with the last `SKIP: reason` line as the reason."""


def verdict(rows: list[dict]) -> tuple[int, str]:
    """(exit status, one line) for the bench rows: failed if any row failed, skipped if all skipped."""
    failed = [f"{r['variant']} ({r['status']})" for r in rows if str(r.get("status", "")).startswith("failed")]
    skipped = [f"{r['variant']} ({r['status']})" for r in rows if str(r.get("status", "")).startswith("skipped")]
    if failed:
        return 1, f"bench stage: {len(failed)} of {len(rows)} rows failed: " + "; ".join(failed)
    if not rows:
        return 1, "bench stage: no rows were measured"
    if len(skipped) == len(rows):
        return SKIP_EXIT, "SKIP: every variant was skipped: " + "; ".join(skipped)
    return 0, f"bench stage: {len(rows) - len(skipped)} rows ok" + (f", skipped: {'; '.join(skipped)}"
                                                                       if skipped else "")


def main(argv: list[str] | None = None) -> int:
    """Run the bench (in this process), then judge its rows from the --output file."""
    from sd_mlperf.cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--output" not in argv[:-1]:
        sys.stderr.write("bench_stage: --output FILE is required (the rows are judged from it)\n")
        return 2
    output = Path(argv[argv.index("--output") + 1])
    output.unlink(missing_ok=True)  # a file left by an earlier run must not be judged as this one's
    rc = cli_main(["bench", "train", *argv])
    if not output.is_file():  # the command failed before it measured anything
        return rc or 1
    status, line = verdict(json.loads(output.read_text()))
    sys.stdout.write(line + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
