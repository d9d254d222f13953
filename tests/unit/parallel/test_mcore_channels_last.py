"""mcore keeps channels-last conv weights NHWC inside its flat buffers (CPU/gloo via the test harness).

megatron's _ParamAndGradBuffer hands every parameter a contiguous view of its slice (param.data with
the distributed optimizer, main_grad always): a channels-last conv weight would become NCHW and
every conv would transpose it each pass. The adapter re-views those slices channels-last; here the
real UNet (model.unet.channels_last=true) goes through apply_data_parallel with parallel.backend=mcore
and must keep NHWC weights that alias the buffers and train exactly as the torch backend does.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from mcore_cpu_harness import cuda_on_cpu
from parallel_helpers import cpu_dist, make_cfg

from sd_mlperf.backends import package_available
from sd_mlperf.config.schema import UNetConfig
from sd_mlperf.models.unet import build_unet
from sd_mlperf.parallel.data_parallel import apply_data_parallel, channels_last_weights
from sd_mlperf.parallel.distributed import destroy_distributed
from sd_mlperf.parallel.optimizer import LRSchedule
from sd_mlperf.utils.dist_info import DistInfo
from sd_mlperf.utils.logging import logger

pytestmark = pytest.mark.skipif(not package_available("megatron.core"),
                                reason="megatron-core is not installed (pip install 'sd_mlperf[gpu]')")

STEPS = 3


def _unet() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = UNetConfig(model_channels=16, channel_mult=[1, 2], attention_levels=[1], head_channels=8, context_dim=24,
                     resblock_norm_groups=4, transformer_norm_groups=8, attention_backend="math",
                     norm_backend="torch", channels_last=True)
    unet = build_unet(cfg)
    with torch.no_grad():  # zero-initialised output convs would hide the gradient of everything before them
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


def _batch(step: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    context = torch.randn(2, 5, 24, generator=g)
    target = torch.randn(2, 4, 8, 8, generator=g)
    return x, t, context, target


def _train(dp, cfg) -> None:
    sched = LRSchedule(cfg.optim, 8)
    for step in range(STEPS):
        x, t, context, target = _batch(step)
        dp.zero_grad()
        dp.backward(((dp(x, t, context) - target) ** 2).mean())
        dp.finish_grad_sync()
        ok, _ = dp.step(sched.lr_at(step))
        assert bool(ok)


def _apply_mcore(model, cfg, monkeypatch):
    """apply_data_parallel with parallel.backend=mcore, the harness standing in for the GPU."""
    import sd_mlperf.backends as backends

    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    # A single-rank gloo group first, or the adapter would ask for nccl on a "cuda" device.
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    return apply_data_parallel(model, cfg, DistInfo(0, 1, 0, torch.device("cuda", 0), "none"))


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("distributed_optimizer", [True, False])
def test_channels_last_weights_stay_nhwc_and_train_like_torch(monkeypatch, caplog, distributed_optimizer):
    monkeypatch.setattr(logger, "propagate", True)  # setup_logging may have turned it off: caplog needs it
    unet = _unet()
    reference = copy.deepcopy(unet)  # deepcopy keeps the channels-last strides
    num_nhwc = len(channels_last_weights(unet))
    assert num_nhwc > 4  # the 3x3 convs; 1x1 kernels are NCHW and NHWC at once
    cfg = make_cfg(backend="mcore", distributed_optimizer=distributed_optimizer)
    try:
        with cuda_on_cpu():
            with caplog.at_level(logging.INFO, logger=logger.name):
                dp = _apply_mcore(unet, cfg, monkeypatch)
            assert "data parallel: mcore over 1 rank(s)" in caplog.text
            assert f"NHWC conv weights {num_nhwc}/{num_nhwc}" in caplog.text  # the startup line shows the layout
            buffer = dp.module.buffers[0]
            nhwc = channels_last_weights(dp.unwrapped)
            assert len(nhwc) == num_nhwc  # none turned contiguous
            for p in nhwc:
                assert p.main_grad.is_contiguous(memory_format=torch.channels_last)
                assert p.main_grad.stride() == p.stride()  # param and grad elements pair up in the flat buffer
                assert _storage(p.main_grad) == _storage(buffer.grad_data)
                if distributed_optimizer:  # param.data is a view into megatron's parameter buffer
                    assert _storage(p) == _storage(buffer.param_data)
            _train(dp, cfg)
            # Still NHWC views of the buffer after the steps: the optimizer's updates landed in them.
            assert len(channels_last_weights(dp.unwrapped)) == num_nhwc
            if distributed_optimizer:
                assert all(_storage(p) == _storage(buffer.param_data) for p in nhwc)
    finally:
        destroy_distributed()
    torch_cfg = make_cfg(backend="torch", distributed_optimizer=distributed_optimizer)
    ref = apply_data_parallel(reference, torch_cfg, cpu_dist())
    _train(ref, torch_cfg)
    initial = _unet()
    for (name, got), want in zip(dp.unwrapped.named_parameters(), ref.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(got, initial.get_parameter(name)), name  # every weight took the updates
