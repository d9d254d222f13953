"""TEST-ONLY: run megatron-core DDP + DistributedOptimizer on CPU/gloo by redirecting its CUDA requests.

megatron-core assumes CUDA: buffers are allocated with `device=torch.cuda.current_device()` or
`device='cuda'`, parameters are checked with `param.type() == 'torch.cuda.FloatTensor'`, and a few
calls go to torch.cuda directly. Inside `cuda_on_cpu()`:
- a TorchFunctionMode rewrites every `device=` argument (and the target of `.to()`) that means
  CUDA into the CPU, makes `.cuda()` a no-op, and reports CUDA type names from `Tensor.type()`;
- torch.cuda.current_device/synchronize/Stream/stream/current_stream are stubbed.
Nothing else changes: the math, the collectives (gloo) and megatron's own code run unmodified.
The library never imports this module; it exists so CI exercises sd_mlperf's mcore adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode

_CUDA_TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
                    torch.bfloat16: "torch.cuda.BFloat16Tensor", torch.int64: "torch.cuda.LongTensor",
                    torch.int32: "torch.cuda.IntTensor", torch.uint8: "torch.cuda.ByteTensor"}


def _is_cuda(device: Any) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True  # a bare index means a CUDA ordinal
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _CUDA_TYPE_NAMES.get(args[0].dtype, "torch.cuda.Tensor")
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = tuple("cpu" if i > 0 and _is_cuda(a) else a for i, a in enumerate(args))
        return func(*args, **kwargs)


class _FakeStream:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


@contextlib.contextmanager
def cuda_on_cpu() -> Iterator[None]:
    """Run the body with megatron-core's CUDA requests served by the CPU."""
    stubs = {"current_device": lambda: 0, "synchronize": lambda *a, **k: None, "Stream": _FakeStream,
             "current_stream": lambda *a, **k: _FakeStream(), "stream": lambda *a, **k: contextlib.nullcontext()}
    with contextlib.ExitStack() as stack:
        for name, stub in stubs.items():
            stack.enter_context(mock.patch.object(torch.cuda, name, stub))
        stack.enter_context(_CudaToCpu())
        yield
