"""State-dict manifests: names, shapes and dtypes as TSV, the format of shared/fixtures/*.tsv."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from sd_mlperf.utils.files import atomic_write_text

Row = tuple[str, tuple[int, ...], str]


def state_dict_manifest(state: Mapping[str, torch.Tensor] | torch.nn.Module, prefix: str = "") -> list[Row]:
    """(name, shape, dtype) for every tensor, in state-dict order; works on the meta device."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    return [(prefix + k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()]


def format_manifest(rows: Iterable[Row]) -> str:
    """TSV text: header `name\tshape\tdtype`, shape as comma-separated sizes (empty for scalars)."""
    lines = ["name\tshape\tdtype"]
    lines += [f"{n}\t{','.join(str(s) for s in shape)}\t{dtype}" for n, shape, dtype in rows]
    return "\n".join(lines) + "\n"


def write_manifest(path: str | os.PathLike, rows: Iterable[Row]) -> None:
    """Write a manifest TSV atomically."""
    atomic_write_text(path, format_manifest(rows))


def read_manifest(path: str | os.PathLike, prefix: str | None = None, strip_prefix: bool = True) -> list[Row]:
    """Read a manifest TSV; keep rows starting with `prefix` (removed when strip_prefix)."""
    rows: list[Row] = []
    lines = Path(path).read_text().splitlines()
    if not lines or lines[0] != "name\tshape\tdtype":
        raise ValueError(f"{path}: not a manifest (expected header 'name<TAB>shape<TAB>dtype')")
    for line in lines[1:]:
        name, shape, dtype = line.split("\t")
        if prefix is not None:
            if not name.startswith(prefix):
                continue
            if strip_prefix:
                name = name[len(prefix):]
        rows.append((name, tuple(int(s) for s in shape.split(",")) if shape else (), dtype))
    return rows


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameter values (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (frozen encoders live on one device)."""
    return next(module.parameters()).device
