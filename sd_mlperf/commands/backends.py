"""`sd-mlperf backends`: print what every backend role resolves to here, and why, plus library versions.

This is the check to run inside a new container or on a new cluster: it goes through
`sd_mlperf.backends.resolve_backend` exactly as a training run does, with the config's requested
value for each role and what the config rules out (fp32 compute for TE, channels_last=false for
apex, a CUDA graph for megatron-core), and reads versions from package metadata without importing
TE, apex, DALI or megatron-core. `--fast --config FILE...` fails (exit 1, with the reason) when that
config resolves any `auto` role to a slower twin than its fastest backend here, asks for a CUDA
graph without CUDA, or leaves model.unet.compile off on CUDA (or on where inductor cannot compile);
`--fast` alone requests the fastest backend of every role, so it fails unless every fast path can run.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata

from sd_mlperf.commands._common import add_config_arguments

NAME = "backends"
HELP = "print each backend role's resolution and why (with library versions); --fast fails unless all fast paths run"

# library -> distribution names that provide it, in the order tried (NGC builds use other names than PyPI).
LIBRARIES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "transformer_engine": ("transformer_engine", "transformer-engine", "transformer_engine_torch"),
    "apex": ("apex",),
    "dali": ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali"),
    "megatron-core": ("megatron-core", "megatron_core"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Config files and overrides, plus --fast, --cpu-variants and --json."""
    add_config_arguments(parser)
    parser.add_argument("--fast", action="store_true",
                        help="with --config: fail unless the config resolves every auto role to its fastest backend "
                             "here; alone: request the first (fastest) backend of every role")
    parser.add_argument("--cpu-variants", action="store_true",
                        help="accept a named backend's CPU variant (DALI CPU pipelines) where no GPU is visible")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def library_versions() -> dict[str, str | None]:
    """Installed version of each library of interest (None if absent), from package metadata only."""
    found: dict[str, str | None] = {}
    for lib, dists in LIBRARIES.items():
        found[lib] = None
        for dist in dists:
            try:
                found[lib] = f"{metadata.version(dist)} ({dist})" if dist != lib else metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def device_summary() -> str:
    """One line naming the CUDA device torch sees, or saying there is none."""
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA device visible (torch {torch.__version__}, built for CUDA {torch.version.cuda})"
    major, minor = torch.cuda.get_device_capability(0)
    return (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)} (sm_{major}{minor}), "
            f"CUDA {torch.version.cuda}")


def resolve_all(requested: dict[str, str], *, allow_cpu_variant: bool,
                unsuitable: dict[str, dict[str, str]] | None = None, fast: bool = False) -> list[dict[str, str]]:
    """Resolve every role; an unavailable named backend becomes a row with status `error` and the reason.

    `unsuitable` is config_unsuitable(cfg); with `fast`, an `auto` role that resolves to a slower twin is an
    error row too (the config fell back here).
    """
    from sd_mlperf.backends import ROLES, fallbacks, resolve_backend

    rows = []
    for role, value in requested.items():
        try:
            r = resolve_backend(role, value, allow_cpu_variant=allow_cpu_variant,
                                unsuitable=(unsuitable or {}).get(role))
            slow = fast and bool(fallbacks([r]))
            rows.append({"role": role, "key": r.key, "requested": value, "chosen": r.name,
                         "status": "error" if slow else "ok", "why": ("fell back to a slower twin: " if slow else "")
                         + r.why})
        except (RuntimeError, ValueError) as exc:
            rows.append({"role": role, "key": ROLES[role][0], "requested": value, "chosen": "-",
                         "status": "error", "why": str(exc)})
    return rows


def requested_backends(config_files: list[str], overrides: list[str], *,
                       fast: bool) -> tuple[dict[str, str], dict[str, dict[str, str]], list[dict[str, str]]]:
    """(each role's requested value, what the config rules out per role, extra rows for other fast-path keys).

    With `fast` and no config file: every role's first (fastest) name, nothing ruled out.
    """
    from omegaconf import OmegaConf

    from sd_mlperf.backends import ROLES, backend_names, config_unsuitable, cuda_available
    from sd_mlperf.config import merge_config

    if fast and not config_files:
        return {role: backend_names(role)[0] for role in ROLES}, {}, []
    merged = merge_config(config_files, overrides)
    # Training decodes images only from raw shards; with cached latents the decode role is not used.
    used = [role for role in ROLES if role != "decode" or merged.data.train_format == "images"]
    requested = {role: str(OmegaConf.select(merged, ROLES[role][0])) for role in used}
    extra = [compile_row(bool(merged.model.unet.compile), fast=fast)]
    if merged.training.cuda_graph:
        ok = cuda_available()
        extra.append({"role": "step", "key": "training.cuda_graph", "requested": "true",
                      "chosen": "graph" if ok else "eager", "status": "ok" if ok or not fast else "error",
                      "why": "one CUDA graph per step" if ok else "no CUDA device: the step runs eagerly"})
    return requested, config_unsuitable(merged), extra


def compile_row(compiled: bool, *, fast: bool) -> dict[str, str]:
    """The model.unet.compile row: with --fast on CUDA, compile off is an error (eager is the slower path)."""
    import torch

    from sd_mlperf.backends import compile_available, cuda_available

    device = torch.device("cuda" if cuda_available() else "cpu")
    if compiled:
        ok, why = compile_available(device)
        return {"role": "compile", "key": "model.unet.compile", "requested": "true",
                "chosen": "inductor" if ok else "-", "status": "ok" if ok else "error",
                "why": "torch.compile, before run_start" if ok else why}
    slow = fast and device.type == "cuda"
    return {"role": "compile", "key": "model.unet.compile", "requested": "false", "chosen": "eager",
            "status": "error" if slow else "ok",
            "why": ("eager UNet: 157 vs 104 images/s on an H200 (docs/gpu_runs/2026-11-29_h200.md); set "
                    "model.unet.compile=true") if slow else "eager UNet"}


def format_table(rows: list[dict[str, str]], versions: dict[str, str | None], device: str) -> str:
    """Human-readable report: device, one line per role, then versions."""
    lines = [f"device: {device}"]
    width = max(len(r["key"]) for r in rows)
    for r in rows:
        mark = "" if r["status"] == "ok" else "ERROR "
        lines.append(f"{r['role']:<10} {r['key']:<{width}} = {r['requested']:<6} -> {r['chosen']:<7} {mark}{r['why']}")
    lines.append("versions: " + ", ".join(f"{lib} {v or 'not installed'}" for lib, v in versions.items()))
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Print the report; exit 1 if any requested backend cannot run here."""
    if args.fast and args.overrides and not args.config:
        raise ValueError("--fast without --config requests every role's fastest backend; drop the KEY=VALUE overrides, "
                         "or give --config to check what that config resolves to")
    requested, unsuitable, extra = requested_backends(args.config, args.overrides, fast=args.fast)
    rows = resolve_all(requested, allow_cpu_variant=args.cpu_variants, unsuitable=unsuitable, fast=args.fast) + extra
    versions = library_versions()
    device = device_summary()
    if args.json:
        sys.stdout.write(json.dumps({"device": device, "backends": rows, "versions": versions}, indent=2) + "\n")
    else:
        sys.stdout.write(format_table(rows, versions, device))
    return 0 if all(r["status"] == "ok" for r in rows) else 1
