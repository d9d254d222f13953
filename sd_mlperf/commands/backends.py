"""`sd-mlperf backends`: print what every backend role resolves to here, and why, plus library versions.

This is the check to run inside a new container or on a new cluster: it goes through
`sd_mlperf.backends.resolve_backend` exactly as a training run does, with the config's requested
value for each role, and reads versions from package metadata without importing TE, apex, DALI or
megatron-core. `--fast` requests the fastest backend of every role, so it fails (exit 1, with the
reason and the fix) unless every fast path can run.
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
                        help="request the first (fastest) backend of every role instead of the config's values")
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


def resolve_all(requested: dict[str, str], *, allow_cpu_variant: bool) -> list[dict[str, str]]:
    """Resolve every role; an unavailable named backend becomes a row with status `error` and the reason."""
    from sd_mlperf.backends import ROLES, resolve_backend

    rows = []
    for role, value in requested.items():
        try:
            r = resolve_backend(role, value, allow_cpu_variant=allow_cpu_variant)
            rows.append({"role": role, "key": r.key, "requested": value, "chosen": r.name, "status": "ok",
                         "why": r.why})
        except (RuntimeError, ValueError) as exc:
            rows.append({"role": role, "key": ROLES[role][0], "requested": value, "chosen": "-",
                         "status": "error", "why": str(exc)})
    return rows


def requested_backends(config_files: list[str], overrides: list[str], *, fast: bool) -> dict[str, str]:
    """Each role's requested value: from the merged config, or its first (fastest) name with `fast`."""
    from omegaconf import OmegaConf

    from sd_mlperf.backends import ROLES, backend_names
    from sd_mlperf.config import merge_config

    if fast:
        return {role: backend_names(role)[0] for role in ROLES}
    merged = merge_config(config_files, overrides)
    return {role: str(OmegaConf.select(merged, key)) for role, (key, _) in ROLES.items()}


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
    if args.fast and args.overrides:
        raise ValueError("--fast requests every role's fastest backend; drop the KEY=VALUE overrides or --fast")
    requested = requested_backends(args.config, args.overrides, fast=args.fast)
    rows = resolve_all(requested, allow_cpu_variant=args.cpu_variants)
    versions = library_versions()
    device = device_summary()
    if args.json:
        sys.stdout.write(json.dumps({"device": device, "backends": rows, "versions": versions}, indent=2) + "\n")
    else:
        sys.stdout.write(format_table(rows, versions, device))
    return 0 if all(r["status"] == "ok" for r in rows) else 1
