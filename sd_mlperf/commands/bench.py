"""`sd-mlperf bench {train,data,eval}`: measure a part of the pipeline and print a table of rows.

`train` times the UNet training step (images/s, ms/step, TFLOP/s, MFU, peak memory) for the
config and, with --compare / --variant, for alternatives in the same process; --diffusers adds
the same step on diffusers' UNet2DConditionModel of the same shape (an optional dependency).
`train --profile` profiles the step instead of timing it: kernel time per step by class, the top 40 kernels
and the SDPA backend that ran (sd_mlperf.bench.profile). `attention` and `groupnorm` time every kernel choice
on every attention / GroupNorm shape of the configured UNet (sd_mlperf.bench.probes).
`data` and `eval` run the loader and evaluation benches of sd_mlperf.bench.data / .eval.
The table goes to stdout (text, markdown or JSON); --output also saves the rows as JSON.
"""

from __future__ import annotations

import argparse
import sys

from sd_mlperf.commands._common import add_config_arguments

NAME = "bench"
HELP = "measure the training step (train), the data loader (data) or evaluation (eval); prints a table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The train, data and eval modes, each with --steps, --warmup, --format, --output and the config arguments."""
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    train = modes.add_parser("train", help="time the UNet training step of the config (and alternatives)")
    train.add_argument("--compare", default=None, metavar="GROUPS",
                       help="also time one-at-a-time alternatives to the config: `all`, or comma-separated groups "
                            "among attention, norm, channels_last, compile, cuda_graph, precision")
    train.add_argument("--variant", action="append", default=[], metavar="'NAME: KEY=VALUE ...'",
                       help="also time this named set of overrides (repeatable)")
    train.add_argument("--no-base", action="store_true", help="time only the --variant rows, not the config itself")
    train.add_argument("--diffusers", action="store_true",
                       help="also time diffusers' UNet2DConditionModel of the same shape (pip install diffusers)")
    train.add_argument("--profile", action="store_true",
                       help="profile --steps steps of each variant instead: kernel ms per step by class, the top 40 "
                            "kernels, the SDPA backend that ran (tables on stdout; --output writes the JSON)")
    for mode, text in (("data", "time the training data loader"), ("eval", "time evaluation (sampling + metrics)")):
        modes.add_parser(mode, help=text)
    from sd_mlperf.bench.probes import ATTENTION_KERNELS, NORM_KERNELS

    for mode, text, kernels in (
            ("attention", "time each SDPA backend (and TE) on every attention shape of the UNet", ATTENTION_KERNELS),
            ("groupnorm", "time torch, compiled torch and apex GroupNorm on every GroupNorm shape", NORM_KERNELS)):
        probe = modes.add_parser(mode, help=text)
        probe.add_argument("--kernels", default=",".join(kernels),
                           help=f"comma-separated, among {', '.join(kernels)} (default: all)")
    for p in modes.choices.values():
        p.add_argument("--steps", type=int, default=20, help="timed steps (batches) per row")
        p.add_argument("--warmup", type=int, default=5, help="untimed warmup steps (batches) per row")
        p.add_argument("--format", choices=("text", "markdown", "json"), default="text", help="table format")
        p.add_argument("--output", metavar="FILE", help="also write the rows as JSON here")
        add_config_arguments(p)


def _train_rows(args: argparse.Namespace) -> tuple[list[dict], list[str] | None]:
    from sd_mlperf.bench.train import (
        COLUMNS,
        COMPARE_GROUPS,
        SINGLE_PROCESS,
        TrainBenchSettings,
        Variant,
        bench_train,
        compare_variants,
        parse_variant,
    )
    from sd_mlperf.config import load_config

    settings = TrainBenchSettings(steps=args.steps, warmup_steps=args.warmup)
    variants = [] if args.no_base else [Variant("config")]
    if args.compare:
        groups = COMPARE_GROUPS if args.compare == "all" else [g.strip() for g in args.compare.split(",")]
        base = load_config(args.config, [*args.overrides, *SINGLE_PROCESS])
        variants += compare_variants(base, groups)
    variants += [parse_variant(spec) for spec in args.variant]
    if not variants and not args.diffusers:
        raise ValueError("nothing to measure: --no-base needs at least one --variant (or --diffusers)")
    rows = bench_train(args.config, args.overrides, variants, settings) if variants else []
    columns = list(COLUMNS)
    if args.diffusers:
        from sd_mlperf.bench.diffusers_compare import COLUMNS as DIFFUSERS_COLUMNS
        from sd_mlperf.bench.diffusers_compare import compare_with_diffusers

        rows += compare_with_diffusers(args.config, args.overrides, settings)
        columns += [c for c in DIFFUSERS_COLUMNS if c not in columns]
    return rows, columns


def _profile(args: argparse.Namespace) -> int:
    """`bench train --profile`: each variant's profile tables on stdout, all of them as JSON in --output."""
    import json

    from sd_mlperf.bench.profile import profile_tables, profile_train
    from sd_mlperf.bench.train import SINGLE_PROCESS, Variant, parse_variant
    from sd_mlperf.config import load_config
    from sd_mlperf.parallel.distributed import configure_device, pick_device
    from sd_mlperf.utils.files import atomic_write_text

    variants = ([] if args.no_base else [Variant("config")]) + [parse_variant(v) for v in args.variant]
    profiles = []
    for variant in variants:
        cfg = load_config(args.config, [*args.overrides, *variant.overrides, *SINGLE_PROCESS])
        device = pick_device(cfg.run.device)
        configure_device(device)
        summary = {"variant": variant.name, **profile_train(cfg, device, steps=args.steps, warmup_steps=args.warmup)}
        profiles.append(summary)
        sys.stdout.write(f"[{variant.name}] " + profile_tables(summary) + "\n")
    if args.output:
        atomic_write_text(args.output, json.dumps(profiles, indent=1) + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    """Measure the chosen mode and print its table (stdout); --output also saves the rows as JSON."""
    from sd_mlperf.bench.table import format_table, write_rows
    from sd_mlperf.config import load_config
    from sd_mlperf.utils.logging import logger

    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0 (got {args.steps}, {args.warmup})")
    columns: list[str] | None = None
    if args.mode == "train" and args.profile:
        return _profile(args)
    if args.mode in ("attention", "groupnorm"):
        from sd_mlperf.bench.probes import ATTENTION_KERNELS, NORM_KERNELS, probe_attention, probe_group_norm
        from sd_mlperf.parallel.distributed import configure_device, pick_device

        cfg = load_config(args.config, args.overrides)
        device = pick_device(cfg.run.device)
        configure_device(device)
        probe, known = ((probe_attention, ATTENTION_KERNELS) if args.mode == "attention"
                        else (probe_group_norm, NORM_KERNELS))
        kernels = tuple(k.strip() for k in args.kernels.split(",") if k.strip())
        unknown = sorted(set(kernels) - set(known))
        if unknown or not kernels:
            raise ValueError(f"--kernels {args.kernels!r}: choose from {', '.join(known)}")
        rows = probe(cfg, device, kernels=kernels, steps=args.steps, warmup=args.warmup)
    elif args.mode == "train":
        rows, columns = _train_rows(args)
    elif args.mode == "data":
        from sd_mlperf.bench.data import run_data_bench

        rows = run_data_bench(load_config(args.config, args.overrides), args)
    else:
        from sd_mlperf.bench.eval import run_eval_bench

        rows = run_eval_bench(load_config(args.config, args.overrides), args)
    sys.stdout.write(format_table(rows, fmt=args.format, columns=columns))
    if args.output:
        write_rows(args.output, rows)
        logger.info("bench %s: wrote %d rows to %s", args.mode, len(rows), args.output)
    failed = [r for r in rows if str(r.get("status", "")).startswith("failed")]
    if failed:  # a variant that broke is a failure of the command, not a row to overlook
        logger.error("bench %s: %d of %d row(s) failed", args.mode, len(failed), len(rows))
    return 1 if failed else 0
