"""Test-only stand-ins for the optional GPU libraries, reproducing exactly the behaviour our code meets.

- `install_fake_transformer_engine`: puts a `transformer_engine.pytorch` module into sys.modules, where
  the TE attention backend imports it. Its DotProductAttention reproduces, from TE v2.9-v2.12:
  `TransformerEngineBaseModule.get_extra_state` (outside FP8 it returns an empty uint8 tensor, so torch
  saves a `prefix + "_extra_state"` entry for every instance), `set_extra_state` (accepts that tensor),
  the base `_load_from_state_dict`, and DotProductAttention's load post-hook that forgives only missing
  keys containing `core_attention._extra_state`. Its math is torch SDPA on bshd tensors, returning
  [B, L, H*D] as TE does. The probe sees the package (it has a __spec__); CUDA is the test's business.
- `write_fake_apex`: an apex source tree on disk whose `apex/contrib/group_norm/group_norm.py` imports
  the compiled extensions at the top, as apex's does; the extensions exist only if asked for, and
  then as empty files (found by the probe, unloadable by the import, like an ABI mismatch).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class TransformerEngineBaseModule(nn.Module):
    """TE's base-module extra-state contract, without FP8 (module/base.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.fp8 = False
        self.fp8_calibration = False
        self.fp8_meta = {"fp8_checkpoint": False}
        self.primary_weights_in_fp8 = False

    def get_extra_state(self) -> torch.Tensor:
        """As TE: an empty uint8 tensor when there is no FP8 state to save."""
        if not (self.fp8_meta["fp8_checkpoint"] or self.fp8 or self.fp8_calibration):
            return torch.empty(0, dtype=torch.uint8)
        raise NotImplementedError("the stand-in has no FP8 state")

    def set_extra_state(self, state: torch.Tensor | None) -> None:
        """As TE: None and empty tensors are accepted and change nothing."""
        if state is None or state.numel() == 0:
            return
        raise NotImplementedError("the stand-in has no FP8 state")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if self.primary_weights_in_fp8:  # TE loads FP8 metadata before the weights; never true here
            key = prefix + torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX
            if key in state_dict:
                self.set_extra_state(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class DotProductAttention(TransformerEngineBaseModule):
    """TE's DotProductAttention as our backend uses it: bshd, no mask, no dropout."""

    def __init__(self, num_attention_heads: int, kv_channels: int, num_gqa_groups: int | None = None,
                 attention_dropout: float = 0.0, qkv_format: str = "sbhd", attn_mask_type: str = "causal",
                 **kwargs) -> None:
        super().__init__()
        assert (qkv_format, attn_mask_type, attention_dropout) == ("bshd", "no_mask", 0.0), "the stand-in's scope"
        self.num_attention_heads = num_attention_heads
        self.kv_channels = kv_channels

        def remove_extra_states_check(module, incompatible_keys):
            # TE forgives only this key pattern (dot_product_attention.py).
            for key in list(incompatible_keys.missing_keys):
                if "core_attention._extra_state" in key:
                    incompatible_keys.missing_keys.remove(key)

        self.register_load_state_dict_post_hook(remove_extra_states_check)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """bshd in, [B, L, H*D] out."""
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


def install_fake_transformer_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `from transformer_engine.pytorch import DotProductAttention` give the stand-in (undone by monkeypatch)."""
    top = types.ModuleType("transformer_engine")
    top.__spec__ = importlib.machinery.ModuleSpec("transformer_engine", None, is_package=True)
    sub = types.ModuleType("transformer_engine.pytorch")
    sub.__spec__ = importlib.machinery.ModuleSpec("transformer_engine.pytorch", None)
    sub.DotProductAttention = DotProductAttention
    top.pytorch = sub
    monkeypatch.setitem(sys.modules, "transformer_engine", top)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", sub)


APEX_EXTENSIONS = ("group_norm_cuda", "group_norm_v2_cuda")  # apex >= 2025-03 imports both


def write_fake_apex(root: Path, *, imports: tuple[str, ...] = APEX_EXTENSIONS, built: tuple[str, ...] = ()) -> Path:
    """An apex tree under `root` (put it on sys.path) whose group_norm.py imports `imports`; `built` exist."""
    pkg = root / "apex" / "contrib" / "group_norm"
    pkg.mkdir(parents=True)
    (root / "apex" / "__init__.py").write_text("")
    (root / "apex" / "contrib" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from .group_norm import *\n")
    lines = ["import functools", "import os", "import torch", *(f"import {name}" for name in imports),
             "", "__all__ = ['GroupNorm']", "GroupNorm = None"]
    (pkg / "group_norm.py").write_text("\n".join(lines) + "\n")
    for name in built:
        (root / f"{name}{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    importlib.invalidate_caches()  # the path finders cache directory listings
    return root


def fake_apex_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Fixture body: a directory first on sys.path for `write_fake_apex`; apex modules from it are forgotten after."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    yield site
    for name in [n for n in sys.modules if n.split(".")[0] in ("apex", *APEX_EXTENSIONS)]:
        del sys.modules[name]
