"""The summary tables of a GPU check's $OUT, for run_device_checks.sh and session.sh (one printer for both).

    python tests/gpu/summarize.py OUT --bench bench.json [--bench ...] [--checks table|counts] [--title T]
                                  [--best-for PREC]

Prints, from what is there: environment.txt, stages.tsv, device_checks.json (as a table, or as one count line
with the skipped checks), the bench rows of each --bench file, the profile (profile.json) and the probes
(attention.json, groupnorm.json). --best-for names the fastest bench row (and NVIDIA's rate for fp16).
"""

import argparse
import json
from pathlib import Path

from sd_mlperf.bench.table import format_table

BENCH_COLUMNS = ["variant", "precision", "attention", "norm", "batch", "ms_per_step", "images_per_s", "tflop_per_s",
                 "mfu", "peak_mem_gib", "status"]


def _print_checks(rows: list[dict], style: str) -> None:
    if style == "table":
        columns = ("check", "status", "rel_err", "tolerance", "detail")
        print(format_table([{k: r.get(k) for k in columns} for r in rows]))
        return
    bad = [r["check"] for r in rows if r["status"] == "FAIL"]
    ok = sum(r["status"] == "ok" for r in rows)
    skipped = [f"{r['check']} ({r['detail']})" for r in rows if r["status"] == "skipped"]
    print(f"fast-path checks: {ok} ok, {len(bad)} FAIL, {len(skipped)} skipped" + (f": FAIL {bad}" if bad else ""))
    for line in skipped:
        print(f"  skipped: {line}")


def _print_best(rows: list[dict], prec: str) -> None:
    best = max((r for r in rows if r.get("images_per_s")), key=lambda r: r["images_per_s"], default=None)
    if best:
        print(f"best: {best['variant']} {best['images_per_s']:.1f} images/s"
              + (f", MFU {best['mfu']:.1%}" if best.get("mfu") else "")
              + (" (NVIDIA's published H100 rate 137, our goal 185)" if prec == "fp16" else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--bench", action="append", default=[], help="a bench JSON under OUT (repeatable)")
    parser.add_argument("--checks", choices=("table", "counts"), default="table")
    parser.add_argument("--title", default=None)
    parser.add_argument("--best-for", default=None, metavar="PREC", help="name the fastest row (training.precision)")
    args = parser.parse_args()
    out = args.out
    if args.title:
        print(args.title)
    print((out / "environment.txt").read_text().strip())
    stages = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines()[1:]]
    print(format_table([{"stage": s, "status": st, "seconds": int(sec)} for s, st, sec in stages]), end="")
    if (out / "device_checks.json").exists():
        _print_checks(json.loads((out / "device_checks.json").read_text()), args.checks)
    rows = [r for name in args.bench if (out / name).exists() for r in json.loads((out / name).read_text())]
    if rows:
        print(format_table(rows, fmt="markdown", columns=BENCH_COLUMNS), end="")
        if args.best_for is not None:
            _print_best(rows, args.best_for)
    if (out / "profile.json").exists():
        from sd_mlperf.bench.profile import profile_tables

        for p in json.loads((out / "profile.json").read_text()):
            p["top_kernels"] = p["top_kernels"][:15]
            print(profile_tables(p))
    for name in ("attention.json", "groupnorm.json"):
        if (out / name).exists():
            print(format_table(json.loads((out / name).read_text())))


if __name__ == "__main__":
    main()
