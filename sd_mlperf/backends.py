"""Backend registry: per role, an ordered table of name -> cheap probe.

Roles are the fast parts of the pipeline that have a plain-PyTorch twin. `auto` takes the first
available name (the table order; the last one is the reference) and records why each better
option was skipped; a named backend that is unavailable is an error naming the config key, the
reason and the fix. Probes import nothing heavy: they look for packages and compiled extensions on
disk (find_spec, file names) and ask torch whether CUDA is present. What only the caller knows (the
compute precision, the memory format) comes in as `unsuitable`: names `auto` passes over, with why.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sd_mlperf.utils.errors import UserError
from sd_mlperf.utils.logging import logger


class BackendUnavailable(UserError):
    """A backend named in the config cannot run on this machine; the message says why and how to fix it."""


@dataclass(frozen=True)
class Probe:
    """Whether a backend can run here; `reason` says why not, `fix` (optional) how to make it run."""

    ok: bool
    reason: str = ""
    fix: str = ""


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


def module_source(name: str) -> Path | None:
    """The .py file of module `name` (dotted), found on disk without importing it or its parents."""
    top, *rest = name.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not rest:
        return Path(spec.origin) if spec is not None and spec.origin else None
    for loc in spec.submodule_search_locations or []:
        path = Path(loc).joinpath(*rest).with_suffix(".py")
        if path.is_file():
            return path
    return None


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

# apex compiles its GroupNorm kernels as top-level extensions only when built with --group_norm
# (setup.py; group_norm_v2_cuda also needs nvcc >= 12.4); apex/contrib/group_norm/group_norm.py
# imports them at its top, group_norm_cuda always and group_norm_v2_cuda since 2025-03.
APEX_GROUP_NORM_EXTENSIONS = ("group_norm_cuda", "group_norm_v2_cuda")
APEX_GROUP_NORM_BUILD = ("Rebuild apex from its source tree with the GroupNorm extensions: APEX_CPP_EXT=1 "
                         "APEX_CUDA_EXT=1 APEX_GROUP_NORM=1 pip install -v --no-build-isolation . (older apex: "
                         "pip install --global-option=--group_norm ...), or use the NGC PyTorch container, which "
                         "ships it built")


def apex_group_norm_extensions() -> tuple[str, ...]:
    """The compiled extensions the installed apex GroupNorm imports, read from its source (not imported)."""
    source = module_source("apex.contrib.group_norm.group_norm")
    try:
        text = source.read_text(encoding="utf-8") if source else ""
    except OSError:
        text = ""
    # Unindented imports only: those run unconditionally when the module loads.
    names = tuple(dict.fromkeys(re.findall(r"^import\s+(group_norm\w*_cuda)\b", text, flags=re.MULTILINE)))
    return names or APEX_GROUP_NORM_EXTENSIONS[:1]


def _apex_group_norm() -> Probe:
    if not package_available("apex.contrib.group_norm"):
        return Probe(False, f"apex.contrib.group_norm is not installed ({NGC}; apex must be built with --group_norm)")
    missing = [ext for ext in apex_group_norm_extensions() if not package_available(ext)]
    if missing:
        return Probe(False, f"apex is installed without the compiled GroupNorm extension(s) {', '.join(missing)} "
                            "that apex.contrib.group_norm imports: apex builds them only with --group_norm",
                     fix=APEX_GROUP_NORM_BUILD)
    if not cuda_available():
        return Probe(False, "no CUDA device is visible")
    return Probe(True)


# TE's fused and flash attention kernels take fp16/bf16 only; in fp32 TE falls back to its unfused
# attention, which materialises B x H x L^2 fp32 scores (4096^2 per head at 64x64 latents).
HALF_PRECISIONS = ("fp16", "bf16")
TE_FP32_REASON = "fp32 compute: TE's fused kernels need fp16/bf16"


TE_COMPILE_REASON = ("model.unet.compile=true: TE's DotProductAttention breaks the compiled graph, while sdpa "
                     "compiles into it and runs cuDNN's fused attention (the kernel TE's fused attention calls) on "
                     "sm90; `sd-mlperf bench train --profile` names the SDPA kernel that ran")


def attention_unsuitable(compute_precisions: Mapping[str, str] | None, *, compiled: bool = False) -> dict[str, str]:
    """Attention backends that cannot serve a module computing in these precisions ({config key: value}), and why.

    None means not stated (tools, tests): nothing is ruled out. `compiled` (model.unet.compile) rules te out: one
    graph matters more than TE's wrapper around the same cuDNN kernel. Pass the result as resolve_backend's
    `unsuitable`.
    """
    if any(value not in HALF_PRECISIONS for value in (compute_precisions or {}).values()):
        return {"te": TE_FP32_REASON}
    return {"te": TE_COMPILE_REASON} if compiled else {}


# role -> (config key, ordered {name: probe}); the last name is the reference twin.
ROLES: dict[str, tuple[str, dict[str, Callable[[], Probe]]]] = {
    "attention": ("model.unet.attention_backend", {
        "te": _needs("transformer_engine", NGC, gpu=True),
        "sdpa": _always,
        "math": _always,
    }),
    "norm": ("model.unet.norm_backend", {
        "apex": _apex_group_norm,
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


def resolve_backend(role: str, requested: str, *, allow_cpu_variant: bool = False,
                    unsuitable: Mapping[str, str] | None = None) -> Resolution:
    """Pick the backend for `role`: `auto` or a name. Raises BackendUnavailable if a named one cannot run.

    `unsuitable` maps names to why they cannot serve this build (the caller's dtypes or layout): `auto`
    skips them with that reason; naming one is a ValueError (callers raise a more specific one first).
    """
    if role not in ROLES:
        raise KeyError(f"unknown backend role {role!r}; roles: {sorted(ROLES)}")
    key, table = ROLES[role]
    reference = list(table)[-1]
    unsuitable = unsuitable or {}
    assert reference not in unsuitable, f"the reference backend of {role} must serve every build"
    if requested == "auto":
        skipped = []
        for name, probe in table.items():
            # The build's own limits first: they hold on every machine, so the reason does not vary.
            result = Probe(False, unsuitable[name]) if name in unsuitable else probe()
            if result.ok:
                why = "auto: " + ("; ".join(skipped) if skipped else "first choice available")
                return Resolution(role, key, requested, name, why)
            skipped.append(f"{name} skipped ({result.reason})")
        raise AssertionError(f"the reference backend of {role} must always be available")
    if requested not in table:
        raise ValueError(f"invalid value for '{key}': {requested!r}; allowed: auto, {', '.join(table)}.")
    if requested in unsuitable:
        raise ValueError(f"{key}={requested} cannot serve this build: {unsuitable[requested]}. "
                         f"Set {key}=auto (or {key}={reference}, the reference implementation).")
    result = table[requested]()
    if not result.ok and allow_cpu_variant and (role, requested) in CPU_CAPABLE:
        result = CPU_CAPABLE[(role, requested)]()
        if result.ok:
            return Resolution(role, key, requested, requested, "requested (CPU variant: no CUDA device)")
    if not result.ok:
        fix = f"{result.fix}. Or set" if result.fix else "Install it, or set"
        raise BackendUnavailable(
            f"{key}={requested} cannot run here: {result.reason}. "
            f"{fix} {key}=auto (or {key}={reference}, the reference implementation)."
        )
    return Resolution(role, key, requested, requested, "requested")


APEX_NEEDS_NHWC = "model.unet.channels_last=false; apex needs NHWC input"
MCORE_NO_GRAPH = ("training.cuda_graph=true: megatron-core's optimizer step reads found_inf on the host, which a CUDA "
                  "graph cannot capture")


def training_precisions(cfg: Any) -> dict[str, str]:
    """Every precision the trained UNet computes in, by config key (the inline evaluator runs the same module)."""
    precisions = {"training.precision": str(cfg.training.precision)}
    if cfg.eval.inline:
        precisions["eval.precision"] = str(cfg.eval.precision)
    return precisions


def config_unsuitable(cfg: Any) -> dict[str, dict[str, str]]:
    """Per role, the backends a training run of `cfg` rules out whatever the machine, and why."""
    return {
        "attention": attention_unsuitable(training_precisions(cfg), compiled=cfg.model.unet.compile),
        "norm": {} if cfg.model.unet.channels_last else {"apex": APEX_NEEDS_NHWC},
        "parallel": {"mcore": MCORE_NO_GRAPH} if cfg.training.cuda_graph else {},
        "decode": {},
    }


def fallbacks(resolutions: list[Resolution]) -> list[Resolution]:
    """The roles `auto` resolved to a slower twin than the role's fastest backend (named choices are choices).

    sdpa taken over te because the UNet is compiled is the fast path (TE_COMPILE_REASON), not a fallback.
    """
    return [r for r in resolutions if r.requested == "auto" and r.name != backend_names(r.role)[0]
            and not (r.role == "attention" and r.name == "sdpa" and TE_COMPILE_REASON in r.why)]


def _short_choice(r: Resolution) -> str:
    """`attention=sdpa (auto, not te)`: the choice, and under `auto` the faster names it passed over."""
    if r.requested != "auto":
        return f"{r.role}={r.name}"
    names = backend_names(r.role)
    passed = names[: names.index(r.name)] if r.name in names else []
    return f"{r.role}={r.name} (auto" + (f", not {'/'.join(passed)})" if passed else ")")


def summarize(resolutions: list[Resolution]) -> str:
    """One short line listing each role's choice, for the startup log (the reasons: resolutions_to_dict)."""
    return "backends: " + ", ".join(_short_choice(r) for r in resolutions)


def log_resolutions(resolutions: list[Resolution], *, details: str | Path | None = None) -> None:
    """Log the one startup line with what was chosen; `details` names the file that says why."""
    logger.info(summarize(resolutions) + (f"; why: {details}" if details is not None else ""))


def resolutions_to_dict(resolutions: list[Resolution]) -> dict[str, dict[str, str]]:
    """A YAML-friendly view (written to resolved_backends.yaml in the run directory)."""
    return {r.role: {"key": r.key, "requested": r.requested, "chosen": r.name, "why": r.why} for r in resolutions}


def compile_available(device: torch.device) -> tuple[bool, str]:
    """Whether inductor can generate code for `device` (Triton on CUDA, a C++ compiler on the CPU), and why not."""
    if device.type == "cuda":
        ok = importlib.util.find_spec("triton") is not None
        return ok, "" if ok else "triton is not installed (pip install triton, or set model.unet.compile=false)"
    ok = any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
    return ok, "" if ok else "no C++ compiler for inductor's CPU backend (install g++, or set model.unet.compile=false)"
