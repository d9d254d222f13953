"""Whether torch.compile can run here (the UNet compiles itself in place: models/unet.py apply_compile)."""

from __future__ import annotations

import importlib.util
import shutil

import torch


def compile_available(device: torch.device) -> tuple[bool, str]:
    """Whether inductor can generate code for `device` (Triton on CUDA, a C++ compiler on the CPU), and why not."""
    if device.type == "cuda":
        ok = importlib.util.find_spec("triton") is not None
        return ok, "" if ok else "triton is not installed (pip install triton, or set model.unet.compile=false)"
    ok = any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
    return ok, "" if ok else "no C++ compiler for inductor's CPU backend (install g++, or set model.unet.compile=false)"
