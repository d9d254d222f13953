"""LR schedule: warmup curve, the step that reaches the peak, and AdamW's fixed hyperparameters."""

from __future__ import annotations

import math

import pytest
import torch

from sd_mlperf.config.load import ConfigError, validate
from sd_mlperf.config.schema import Config, OptimConfig
from sd_mlperf.parallel.optimizer import LRSchedule, adamw_kernel_options, adamw_kwargs, make_capturable


def test_peak_is_base_lr_times_global_batch():
    assert math.isclose(LRSchedule(OptimConfig(), 512).peak_lr, 6.4e-5, rel_tol=1e-12)  # REFERENCE.md
    assert math.isclose(LRSchedule(OptimConfig(), 64).peak_lr, 8e-6, rel_tol=1e-12)


def test_warmup_curve_reference_values():
    sched = LRSchedule(OptimConfig(), 512)  # warmup 1000 from 1e-6 x lr
    peak = 6.4e-5
    assert math.isclose(sched.lr_at(0), 1e-6 * peak, rel_tol=1e-9)
    assert math.isclose(sched.lr_at(500), peak * (1e-6 + (1 - 1e-6) * 0.5), rel_tol=1e-12)
    assert math.isclose(sched.lr_at(999), peak * (1e-6 + (1 - 1e-6) * 0.999), rel_tol=1e-12)
    assert sched.lr_at(999) < peak
    assert sched.first_peak_step() == 1000
    assert sched.lr_at(1000) == peak and sched.lr_at(10**7) == peak


def test_warmup_is_linear_and_increasing():
    sched = LRSchedule(OptimConfig(warmup_steps=10, warmup_start_factor=0.1), 100)
    lrs = [sched.lr_at(s) for s in range(12)]
    diffs = [b - a for a, b in zip(lrs[:10], lrs[1:11])]
    assert all(math.isclose(d, diffs[0], rel_tol=1e-9) for d in diffs)  # the last warmup step lands on the peak
    assert math.isclose(diffs[0], sched.peak_lr * 0.9 / 10, rel_tol=1e-9)
    assert lrs[10] == lrs[11] == sched.peak_lr


def test_no_warmup_and_bad_input():
    sched = LRSchedule(OptimConfig(warmup_steps=0), 8)
    assert sched.lr_at(0) == sched.peak_lr
    with pytest.raises(ValueError):
        sched.lr_at(-1)
    with pytest.raises(ValueError, match="micro_batch_size"):
        LRSchedule(OptimConfig(), 0)


def test_adamw_kwargs():
    kw = adamw_kwargs(OptimConfig(), 1e-4)
    assert kw == {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}


@pytest.mark.parametrize(("key", "value"), [("beta1", 0.95), ("beta2", 0.99), ("eps", 1e-6), ("weight_decay", 0.1)])
def test_closed_division_fixes_adamw(key, value):
    cfg = Config()
    setattr(cfg.optim, key, value)
    with pytest.raises(ConfigError, match=rf"optim\.{key}.*run\.division=open"):
        validate(cfg)
    cfg.run.division = "open"
    validate(cfg)
    kw = adamw_kwargs(cfg.optim, 1.0)  # the open-division value reaches the optimizer
    assert (kw["betas"], kw["eps"], kw["weight_decay"]) == (
        (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.eps, cfg.optim.weight_decay)
    assert getattr(cfg.optim, key) == value


def test_batch_of_one_and_the_messages():
    assert LRSchedule(OptimConfig(warmup_steps=0), 1).peak_lr == OptimConfig().base_lr_per_sample
    with pytest.raises(ValueError, match=r"^step must be >= 0, got -1$"):
        LRSchedule(OptimConfig(), 8).lr_at(-1)
    with pytest.raises(ValueError, match=r"^global batch size must be positive, got 0; check "
                                         r"training\.micro_batch_size and parallel\.\*$"):
        LRSchedule(OptimConfig(), 0)


def test_kernel_options_capturable_only_on_cuda_when_asked():
    """The options are decided from the device object; no GPU is needed to ask about one."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert adamw_kernel_options(cuda, capturable=True) == {"fused": True, "capturable": True}
    assert adamw_kernel_options(cuda) == adamw_kernel_options(cpu, capturable=True) == {"fused": True}


def test_make_capturable_refuses_unfused_adamw_with_the_fix():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], fused=False)
    with pytest.raises(ValueError, match=r"^CUDA graph capture of the optimizer step needs fused AdamW \(fused=True\); "
                                         r"build it with parallel\.optimizer\.adamw_kernel_options\(\) or set "
                                         r"training\.cuda_graph=false$"):
        make_capturable(opt)


def test_only_adamw_is_built():
    with pytest.raises(ValueError, match=r"^invalid value for 'optim\.name': 'sgd'; only adamw is implemented\.$"):
        adamw_kwargs(OptimConfig(name="sgd"), 1e-3)
