"""GPU checks for the data-parallel backends: megatron-core on real CUDA, no host sync in the torch step.

Run on a device machine with `pytest tests/gpu/test_parallel_gpu.py -m gpu -q -rs`. Single GPU: the
multi-rank equivalence runs on CPU/gloo in tests/unit/parallel (the mcore one through a test harness).
Each test is skipped with a reason when CUDA or megatron-core is missing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from sd_mlperf.backends import package_available
from sd_mlperf.config.schema import Config
from sd_mlperf.models.precision import autocast
from sd_mlperf.parallel.data_parallel import apply_data_parallel
from sd_mlperf.parallel.distributed import destroy_distributed
from sd_mlperf.parallel.optimizer import LRSchedule
from sd_mlperf.utils.dist_info import DistInfo

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
needs_mcore = pytest.mark.skipif(not (torch.cuda.is_available() and package_available("megatron.core")),
                                 reason="needs CUDA and megatron-core (pip install 'sd_mlperf[gpu]')")
GBS = 8


class Tiny(nn.Module):
    """Conv + GroupNorm + Linear, like the UNet's layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, 32, 3, padding=1)
        self.norm = nn.GroupNorm(4, 32)
        self.proj = nn.Linear(32, 32)
        self.conv_out = nn.Conv2d(32, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.norm(self.conv_in(x)))
        return self.conv_out(self.proj(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    destroy_distributed()


def _cfg(backend: str, precision: str = "fp32") -> Config:
    cfg = Config()
    cfg.parallel.backend = backend
    cfg.training.precision = precision
    cfg.training.micro_batch_size = GBS
    cfg.optim.warmup_steps = 2
    cfg.optim.base_lr_per_sample = 1e-3
    return cfg


def _dist() -> DistInfo:
    return DistInfo(0, 1, 0, torch.device("cuda", 0), "none")


def _model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def _run(dp, cfg, start, steps, loss_mult=1.0):
    sched = LRSchedule(cfg.optim, GBS)
    for step in range(start, start + steps):
        gen = torch.Generator(device="cuda").manual_seed(step)  # made on the GPU: no host copy to sync on
        x = torch.randn(GBS, 4, 16, 16, generator=gen, device="cuda")
        y = torch.randn(GBS, 4, 16, 16, generator=gen, device="cuda")
        dp.zero_grad()
        with autocast(cfg.training.precision, torch.device("cuda")):
            pred = dp(x)
        loss = ((pred.float() - y) ** 2).mean(dim=(1, 2, 3)).mean()
        dp.backward(loss * loss_mult)
        dp.finish_grad_sync()
        ok, norm = dp.step(sched.lr_at(step))
    return ok, norm


@needs_mcore
def test_mcore_matches_torch_backend_fp32():
    torch_dp = apply_data_parallel(_model(), _cfg("torch"), _dist())
    _run(torch_dp, _cfg("torch"), 0, 3)
    mcore_dp = apply_data_parallel(_model(), _cfg("mcore"), _dist())
    assert mcore_dp.resolution.name == "mcore"
    ok, norm = _run(mcore_dp, _cfg("mcore"), 0, 3)
    assert bool(ok) and torch.isfinite(norm)
    for a, b in zip(torch_dp.parameters(), mcore_dp.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_mcore
def test_mcore_fp16_loss_scaling_and_skip():
    cfg = _cfg("mcore", "fp16")
    dp = apply_data_parallel(_model(), cfg, _dist())
    ok, _ = _run(dp, cfg, 0, 2)
    assert bool(ok) and float(dp.loss_scale) == cfg.training.initial_loss_scale
    before = [p.detach().clone() for p in dp.parameters()]
    ok, _ = _run(dp, cfg, 2, 1, loss_mult=float("inf"))
    assert not bool(ok) and int(dp.num_skipped_steps) == 1
    assert float(dp.loss_scale) == cfg.training.initial_loss_scale / 2
    assert all(torch.equal(a, b) for a, b in zip(before, dp.parameters()))


@needs_mcore
def test_mcore_resume_matches_uninterrupted():
    cfg = _cfg("mcore", "fp16")
    full = apply_data_parallel(_model(), cfg, _dist())
    _run(full, cfg, 0, 4)
    expected = [p.detach().clone() for p in full.parameters()]
    destroy_distributed()
    first = apply_data_parallel(_model(), cfg, _dist())
    _run(first, cfg, 0, 2)
    weights = {k: v.detach().clone() for k, v in first.unwrapped.state_dict().items()}
    state = first.state_dict()
    destroy_distributed()
    model = _model(seed=3)
    model.load_state_dict(weights)
    resumed = apply_data_parallel(model, cfg, _dist())
    resumed.load_state_dict(state)
    _run(resumed, cfg, 2, 2)
    for a, b in zip(expected, resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torch_step_never_syncs(precision):
    cfg = _cfg("torch", precision)
    cfg.optim.grad_clip_norm = 1.0
    dp = apply_data_parallel(_model(), cfg, _dist())
    _run(dp, cfg, 0, 1)  # warm-up: lazy optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ok, norm = _run(dp, cfg, 1, 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(ok) and torch.isfinite(norm)


@needs_mcore
def test_mcore_smoke_unet_fp16_steps():
    from sd_mlperf.config.load import load_config
    from sd_mlperf.models.unet import build_unet

    smoke = Path(__file__).resolve().parents[2] / "conf" / "smoke.yaml"
    cfg = load_config([smoke], ["parallel.backend=mcore", "training.precision=fp16", "run.device=cuda"])
    unet = build_unet(cfg.model.unet)
    dp = apply_data_parallel(unet, cfg, _dist())
    sched = LRSchedule(cfg.optim, cfg.training.micro_batch_size)
    u = cfg.model.unet
    before = [p.detach().clone() for p in dp.parameters()]
    for step in range(3):
        x = torch.randn(4, u.in_channels, 16, 16, device="cuda")
        t = torch.randint(0, 1000, (4,), device="cuda")
        ctx = torch.randn(4, 77, u.context_dim, device="cuda")
        dp.zero_grad()
        with autocast("fp16", torch.device("cuda")):
            loss = ((dp(x, t, ctx).float() - x) ** 2).mean()
        dp.backward(loss)
        dp.finish_grad_sync()
        ok, norm = dp.step(sched.lr_at(step))
    assert bool(ok) and torch.isfinite(norm) and torch.isfinite(loss)
    # Finite is not enough: the last step was clean, so the weights must have moved.
    assert float(norm) > 0 and not all(torch.equal(a, b) for a, b in zip(before, dp.parameters()))
