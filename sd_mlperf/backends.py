"""Backend registry: per role, an ordered table of name -> cheap probe.

Roles are the fast parts of the pipeline that have a plain-PyTorch twin. `auto` takes the first
available name (the table order; the last one is the reference) and records why each better
option was skipped; a named backend that is unavailable is an error naming the config key, the
reason and the fix. Probes import nothing heavy: they look for packages with find_spec and ask
torch whether CUDA is present.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sd_mlperf.utils.logging import logger


@dataclass(frozen=True)
class Probe:
    """Whether a backend can run here; `reason` says why not (and how to fix it)."""

    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class Resolution:
    """The outcome of resolving one role."""

    role: str
    key: str
    requested: str
    name: str
    why: str


def package_available(name: str) -> bool:
    """True if `name` (dotted allowed) can be imported, without importing it or its parents.

    find_spec("a.b") would import package `a` (megatron's __init__ pulls in torch and more), so
    submodules are located on disk under the top-level package's search path instead.
    """
    top, *rest = name.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    locations = list(spec.submodule_search_locations or [])
    for part in rest:
        found = []
        for loc in locations:
            base = Path(loc) / part
            if base.is_dir():
                found.append(str(base))
            elif any(base.with_suffix(ext).is_file() for ext in (".py", ".so", ".pyc")) or list(
                    Path(loc).glob(f"{part}.*.so")):
                return part == rest[-1]
        if not found:
            return False
        locations = found
    return True


def cuda_available() -> bool:
    """True if torch sees a CUDA device."""
    import torch

    return torch.cuda.is_available()


def _needs(package: str, install_hint: str, *, gpu: bool) -> Callable[[], Probe]:
    def probe() -> Probe:
        if not package_available(package):
            return Probe(False, f"{package} is not installed ({install_hint})")
        if gpu and not cuda_available():
            return Probe(False, "no CUDA device is visible")
        return Probe(True)

    return probe


def _always() -> Probe:
    return Probe(True)


NGC = "it ships in the NGC PyTorch container"

# role -> (config key, ordered {name: probe}); the last name is the reference twin.
ROLES: dict[str, tuple[str, dict[str, Callable[[], Probe]]]] = {
    "attention": ("model.unet.attention_backend", {
        "te": _needs("transformer_engine", NGC, gpu=True),
        "sdpa": _always,
        "math": _always,
    }),
    "norm": ("model.unet.norm_backend", {
        "apex": _needs("apex.contrib.group_norm", NGC + "; apex must be built with --group_norm", gpu=True),
        "torch": _always,
    }),
    "parallel": ("parallel.backend", {
        "mcore": _needs("megatron.core", "pip install 'sd_mlperf[gpu]'", gpu=True),
        "torch": _always,
    }),
    "decode": ("data.decode_backend", {
        "dali": _needs("nvidia.dali", "pip install 'sd_mlperf[dali]'", gpu=True),
        "nvjpeg": lambda: Probe(cuda_available(), "no CUDA device is visible"),
        "pil": _always,
    }),
}

# Named backends that also run without a GPU (their CPU variant), though `auto` only picks them on GPU.
CPU_CAPABLE = {("decode", "dali"): lambda: Probe(package_available("nvidia.dali"),
                                                  "nvidia.dali is not installed (pip install 'sd_mlperf[dali]')")}


def backend_names(role: str) -> list[str]:
    """The backends of `role` in `auto` preference order."""
    return list(ROLES[role][1])


def resolve_backend(role: str, requested: str, *, allow_cpu_variant: bool = False) -> Resolution:
    """Pick the backend for `role`: `auto` or a name. Raises RuntimeError if a named one cannot run."""
    if role not in ROLES:
        raise KeyError(f"unknown backend role {role!r}; roles: {sorted(ROLES)}")
    key, table = ROLES[role]
    reference = list(table)[-1]
    if requested == "auto":
        skipped = []
        for name, probe in table.items():
            result = probe()
            if result.ok:
                why = "auto: " + ("; ".join(skipped) if skipped else "first choice available")
                return Resolution(role, key, requested, name, why)
            skipped.append(f"{name} skipped ({result.reason})")
        raise AssertionError(f"the reference backend of {role} must always be available")
    if requested not in table:
        raise ValueError(f"invalid value for '{key}': {requested!r}; allowed: auto, {', '.join(table)}.")
    result = table[requested]()
    if not result.ok and allow_cpu_variant and (role, requested) in CPU_CAPABLE:
        result = CPU_CAPABLE[(role, requested)]()
        if result.ok:
            return Resolution(role, key, requested, requested, "requested (CPU variant: no CUDA device)")
    if not result.ok:
        raise RuntimeError(
            f"{key}={requested} cannot run here: {result.reason}. "
            f"Install it, or set {key}=auto (or {key}={reference}, the reference implementation)."
        )
    return Resolution(role, key, requested, requested, "requested")


def summarize(resolutions: list[Resolution]) -> str:
    """One line listing each role's choice, for the startup log."""
    return "backends: " + ", ".join(f"{r.role}={r.name} ({r.why})" for r in resolutions)


def log_resolutions(resolutions: list[Resolution]) -> None:
    """Log the one startup line with what was chosen and why."""
    logger.info(summarize(resolutions))


def resolutions_to_dict(resolutions: list[Resolution]) -> dict[str, dict[str, str]]:
    """A YAML-friendly view (written to resolved_backends.yaml in the run directory)."""
    return {r.role: {"key": r.key, "requested": r.requested, "chosen": r.name, "why": r.why} for r in resolutions}
