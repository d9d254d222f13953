"""GroupNorm(+SiLU) over NHWC as opaque `torch.library` custom ops, so torch.compile keeps one graph.

apex's NHWC GroupNorm calls its CUDA extension (`group_norm_cuda.forward/backward`) from an
autograd.Function in older releases; dynamo cannot trace an extension call and breaks the graph
there (once per GroupNorm layer: 61 breaks in the SD2 UNet). Registered as custom ops with a fake
(shape-only) implementation and an autograd formula, the kernel is one node in the compiled graph
instead; inductor fuses around it. Newer apex registers such ops itself (`apex::group_norm_nhwc_fprop`);
`models/norm.py` then uses apex's module as it is.

Which kernel runs is a string argument naming an entry of `KERNELS`: `apex` (the extension, registered
when apex is imported) or `reference` (plain PyTorch, the CPU twin, with an explicit backward formula,
so the CPU tests exercise the same op, fake and autograd plumbing the apex kernel uses).
Kernel signatures follow apex's extension:
  forward(x, G, weight, bias, eps, passes, silu) -> (y, stats)
  backward(dy, stats, x, G, weight, bias, eps, passes, silu) -> (dx, dweight, dbias)
where stats is a float32 vector of 2 * N * G numbers (per-group mean and rstd for `reference`, apex's sums
for `apex`: only the kernel that wrote it reads it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Forward = Callable[..., tuple[torch.Tensor, torch.Tensor]]
Backward = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
KERNELS: dict[str, tuple[Forward, Backward]] = {}


def _reference_forward(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       passes: int, silu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    x_NGK = x.float().reshape(n, num_groups, -1)
    mean_NG = x_NGK.mean(-1)
    rstd_NG = (x_NGK.var(-1, unbiased=False) + eps).rsqrt()
    y = F.group_norm(x.float(), num_groups, weight.float(), bias.float(), eps)
    if silu:
        y = F.silu(y)
    y = y.to(x.dtype).contiguous(memory_format=torch.channels_last)
    return y, torch.cat([mean_NG.flatten(), rstd_NG.flatten()])


def _reference_backward(dy: torch.Tensor, stats: torch.Tensor, x: torch.Tensor, num_groups: int,
                        weight: torch.Tensor, bias: torch.Tensor, eps: float, passes: int,
                        silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c = x.shape[:2]
    mean_NG, rstd_NG = stats.view(2, n, num_groups)
    x_NGK = x.float().reshape(n, num_groups, -1)
    xhat = ((x_NGK - mean_NG[..., None]) * rstd_NG[..., None]).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    dpre = dy.float()
    if silu:  # d silu(z)/dz = s(z) (1 + z (1 - s(z))) at z = xhat * w + b
        z = xhat * weight.float().view(shape) + bias.float().view(shape)
        s = torch.sigmoid(z)
        dpre = dpre * s * (1 + z * (1 - s))
    reduce_dims = [0, *range(2, x.dim())]
    dbias = dpre.sum(reduce_dims)
    dweight = (dpre * xhat).sum(reduce_dims)
    dxhat_NGK = (dpre * weight.float().view(shape)).reshape(n, num_groups, -1)
    xhat_NGK = xhat.reshape(n, num_groups, -1)
    dx_NGK = rstd_NG[..., None] * (dxhat_NGK - dxhat_NGK.mean(-1, keepdim=True)
                                   - xhat_NGK * (dxhat_NGK * xhat_NGK).mean(-1, keepdim=True))
    dx = dx_NGK.reshape(x.shape).to(x.dtype).contiguous(memory_format=torch.channels_last)
    return dx, dweight.to(weight.dtype), dbias.to(bias.dtype)


KERNELS["reference"] = (_reference_forward, _reference_backward)


@torch.library.custom_op("sd_mlperf::group_norm_nhwc", mutates_args=())
def group_norm_nhwc(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float,
                    passes: int, silu: bool, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """y = GroupNorm(x) (then SiLU), and the statistics its backward reads; one opaque node under compile."""
    forward, _ = KERNELS[kernel]
    return forward(x, num_groups, weight, bias, eps, passes, silu)


@group_norm_nhwc.register_fake
def _(x, weight, bias, num_groups, eps, passes, silu, kernel):
    y = torch.empty_like(x, memory_format=torch.channels_last)
    return y, x.new_empty(2 * x.shape[0] * num_groups, dtype=torch.float32)


@torch.library.custom_op("sd_mlperf::group_norm_nhwc_backward", mutates_args=())
def group_norm_nhwc_backward(dy: torch.Tensor, stats: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor, num_groups: int, eps: float, passes: int, silu: bool,
                             kernel: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) of group_norm_nhwc."""
    _, backward = KERNELS[kernel]
    return backward(dy, stats, x, num_groups, weight, bias, eps, passes, silu)


@group_norm_nhwc_backward.register_fake
def _(dy, stats, x, weight, bias, num_groups, eps, passes, silu, kernel):
    return (torch.empty_like(x, memory_format=torch.channels_last), torch.empty_like(weight),
            torch.empty_like(bias))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, num_groups, eps, passes, silu, kernel = inputs
    ctx.save_for_backward(x, weight, bias, output[1])
    ctx.args = (num_groups, eps, passes, silu, kernel)


def _backward(ctx, dy, dstats):
    x, weight, bias, stats = ctx.saved_tensors
    dy = dy.contiguous(memory_format=torch.channels_last)  # apex reads NHWC gradients only
    dx, dweight, dbias = group_norm_nhwc_backward(dy, stats, x, weight, bias, *ctx.args)
    return dx, dweight, dbias, None, None, None, None, None


group_norm_nhwc.register_autograd(_backward, setup_context=_setup_context)


def register_apex_kernel() -> None:
    """Make `kernel="apex"` call apex's extension (imports group_norm_cuda; ImportError if it is absent)."""
    import group_norm_cuda  # apex's compiled extension (apex built with --group_norm)

    KERNELS["apex"] = (group_norm_cuda.forward, group_norm_cuda.backward)


def apex_passes(num_channels: int, hw: int, sm: int) -> int:
    """apex's own choice between its one-pass and two-pass kernels (apex.contrib.group_norm.GroupNorm.forward)."""
    max_hw_one_pass = 1024 if sm >= 80 else 256
    return 2 if (hw >= 512 and num_channels in (3136, 3584, 4096)) or hw > max_hw_one_pass else 1
