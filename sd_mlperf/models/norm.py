"""The GroupNorm(+SiLU) role: apex's fused NHWC kernel or torch, with identical parameters.

Both backends expose `weight` and `bias` exactly as `torch.nn.GroupNorm` does, so checkpoints
move between them. The SiLU that follows a norm in the ldm layout (`in_layers.1`,
`out_layers.1`, `out.1`) is folded into the norm module (`act="silu"`), which lets apex fuse it;
the Sequential slot it leaves is an `nn.Identity`, which holds no parameters, so names stay
those of the reference.

Which kernel runs is decided at build time, per layer, from the shape: apex supports a fixed
list of channel and group counts and needs channels-last input. Layers outside that list use
torch; they are counted and logged once (NormBuilder.summary()).

Under torch.compile apex must not break the graph: an apex that registers its kernels as torch.library
custom ops (newer releases) is used as it is; an older one, whose autograd.Function calls the extension
directly, gets its extension wrapped in our own opaque ops (`OpaqueGroupNorm`, models/group_norm_op.py).
"""

from __future__ import annotations

import logging
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from sd_mlperf.backends import APEX_GROUP_NORM_BUILD, BackendUnavailable
from sd_mlperf.utils.logging import log_once

Activation = Literal["silu", ""]

# apex.contrib.group_norm.GroupNorm's one-pass kernel list (its docstring); read from the class when present.
APEX_CHANNELS = frozenset({128, 256, 320, 448, 512, 640, 768, 896, 960, 1024, 1280, 1344, 1536, 1792, 1920,
                           2048, 2240, 2560, 2688, 3072, 3136, 3584, 4096})
APEX_GROUPS = frozenset({16, 32})


class GroupNormFactory(Protocol):
    """Builds one GroupNorm(+activation) layer; keyword-only so implementations interchange."""

    def __call__(self, *, num_groups: int, num_channels: int, eps: float, act: Activation = "") -> nn.Module: ...


class TorchGroupNorm(nn.GroupNorm):
    """torch GroupNorm with an optional SiLU after it (the reference numerics)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, act: Activation = "") -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """GroupNorm, then SiLU if `act == "silu"`."""
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.silu(y) if self.act == "silu" else y

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", act={self.act}" if self.act else "")


class OpaqueGroupNorm(TorchGroupNorm):
    """GroupNorm(+SiLU) through the `sd_mlperf::group_norm_nhwc` custom op: one graph node under torch.compile.

    `kernel` names the implementation (models/group_norm_op.KERNELS): `apex` or `reference` (plain PyTorch).
    Parameters are nn.GroupNorm's; the input must be channels-last (NHWC), as apex requires.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, act: Activation = "", *,
                 kernel: str = "reference", sm: int = 90) -> None:
        super().__init__(num_groups, num_channels, eps=eps, act=act)
        self.kernel = kernel
        self.sm = sm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The custom op on NHWC input (shape-derived passes, as apex chooses them)."""
        from sd_mlperf.models.group_norm_op import apex_passes, group_norm_nhwc

        hw = x.shape[2] * x.shape[3]
        passes = apex_passes(self.num_channels, hw, self.sm)
        y, _ = group_norm_nhwc(x.contiguous(memory_format=torch.channels_last), self.weight, self.bias,
                               self.num_groups, self.eps, passes, self.act == "silu", self.kernel)
        return y


class NormBuilder:
    """Makes every GroupNorm of one model for the resolved backend; counts layers per kernel."""

    def __init__(self, backend: str) -> None:
        assert backend in ("apex", "torch"), backend
        self.backend = backend
        self.num_apex = 0
        self.num_torch = 0
        self.unsupported: set[tuple[int, int]] = set()
        self._apex_cls: type | None = None
        self.opaque = False
        """True when apex's extension runs through our custom op (its release registers none itself)."""
        if backend == "apex":
            self._apex_cls = _import_apex_group_norm()
            self.opaque = not _registers_custom_ops(self._apex_cls)
            if self.opaque:
                from sd_mlperf.models.group_norm_op import register_apex_kernel

                register_apex_kernel()

    def __call__(self, *, num_groups: int, num_channels: int, eps: float, act: Activation = "") -> nn.Module:
        """One layer: apex where its kernel covers (groups, channels), else torch."""
        if self._apex_cls is not None:
            groups_ok = num_groups in getattr(self._apex_cls, "SUPPORTED_GROUPS", APEX_GROUPS)
            channels_ok = num_channels in getattr(self._apex_cls, "SUPPORTED_CHANNELS", APEX_CHANNELS)
            if groups_ok and channels_ok:
                self.num_apex += 1
                if self.opaque:
                    major, minor = torch.cuda.get_device_capability()
                    return OpaqueGroupNorm(num_groups, num_channels, eps=eps, act=act, kernel="apex",
                                           sm=10 * major + minor)
                return self._apex_cls(num_groups, num_channels, eps=eps, affine=True, act=act)
            self.unsupported.add((num_groups, num_channels))
        self.num_torch += 1
        return TorchGroupNorm(num_groups, num_channels, eps=eps, act=act)

    def summary(self) -> str:
        """One line: how many layers use each kernel and why."""
        if self.backend == "torch":
            return f"GroupNorm: {self.num_torch} layers on torch"
        how = "our custom op around apex's extension" if self.opaque else "apex's custom ops"
        text = f"GroupNorm: {self.num_apex} layers on apex NHWC ({how}), {self.num_torch} on torch"
        if self.unsupported:
            text += " (apex lacks (groups, channels) " + ", ".join(map(str, sorted(self.unsupported))) + ")"
        return text

    def log_summary(self) -> None:
        """Log the apex/torch split once per distinct summary (a warning if some layers fell back)."""
        if self.backend == "apex":
            text = self.summary()
            log_once("norm:" + text, text, level=logging.WARNING if self.unsupported else logging.INFO)


def _registers_custom_ops(apex_cls: type) -> bool:
    """Whether this apex release calls its kernel through a torch.library custom op (compiles without a break)."""
    import sys

    fprop = getattr(sys.modules.get(apex_cls.__module__), "group_norm_nhwc_fprop", None)
    return fprop is not None and hasattr(fprop, "register_fake")


def _import_apex_group_norm() -> type:
    try:
        from apex.contrib.group_norm import GroupNorm
    except ImportError as exc:
        # The probe found the package and its extensions on disk; they may still fail to load (missing
        # symbols when apex was built against another torch or CUDA).
        raise BackendUnavailable(
            f"model.unet.norm_backend=apex: apex.contrib.group_norm cannot be imported ({exc}). "
            f"{APEX_GROUP_NORM_BUILD}, against this torch. Or set model.unet.norm_backend=auto (or "
            "model.unet.norm_backend=torch, the reference kernel).") from exc
    return GroupNorm
