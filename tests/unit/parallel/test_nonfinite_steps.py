"""An inf gradient behaves the same in every backend x distributed optimizer x precision combination.

fp16: the step is skipped and counted, the loss scale backs off, training goes on.
bf16/fp32: the step is skipped and counted too, and the step's metrics say `fatal`, so the trainer
stops the run (raise_if_nonfinite) with the weights of the last good step: nothing corrupt to save.
megatron's FP32Optimizer (fp32 without the distributed optimizer) never checks on its own.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from mcore_cpu_harness import cuda_on_cpu
from parallel_helpers import cpu_dist, make_cfg, tiny_model, train_step

from sd_mlperf.backends import Resolution, package_available
from sd_mlperf.parallel.data_parallel import apply_data_parallel
from sd_mlperf.parallel.distributed import destroy_distributed
from sd_mlperf.training.step import step_metrics

CASES = list(itertools.product(("mcore", "torch"), (True, False), ("fp32", "bf16", "fp16")))


def _build(cfg):
    if cfg.parallel.backend == "torch":
        return apply_data_parallel(tiny_model(), cfg, cpu_dist())
    from sd_mlperf.parallel.mcore_adapter import McoreDataParallel

    resolution = Resolution("parallel", "parallel.backend", "mcore", "mcore", "test harness")
    return McoreDataParallel(tiny_model(), cfg, cpu_dist(), resolution)


def _step(dp, cfg, step, lr=1e-3):
    """One training step; returns the trainer's step metrics (train_step.step_metrics)."""
    loss, ok, grad_norm = train_step(dp, cfg, step, lr)
    return step_metrics(loss, ok, grad_norm, loss_scaling=cfg.training.precision == "fp16")


def _inf_at_one_element(grad):
    grad = grad.clone()
    grad.view(-1)[0] = float("inf")
    return grad


@pytest.mark.parametrize(("backend", "distributed_optimizer", "precision"), CASES)
def test_an_inf_gradient_never_reaches_the_weights(backend, distributed_optimizer, precision):
    if backend == "mcore" and not package_available("megatron.core"):
        pytest.skip("megatron-core is not installed (pip install 'sd_mlperf[gpu]')")
    cfg = make_cfg(backend=backend, precision=precision, distributed_optimizer=distributed_optimizer)
    with cuda_on_cpu() if backend == "mcore" else contextlib.nullcontext():
        try:
            dp = _build(cfg)
            clean = _step(dp, cfg, 0)  # Adam state exists before the bad step
            assert bool(clean["ok"]) and not bool(clean["fatal"])
            before = [p.detach().clone() for p in dp.parameters()]
            scale = float(dp.loss_scale)
            # The loss stays finite: only the gradient norm / inf check can tell.
            hook = dp.unwrapped.conv_in.weight.register_hook(_inf_at_one_element)
            bad = _step(dp, cfg, 1)
            hook.remove()
            assert torch.isfinite(bad["loss"])
            assert not bool(bad["ok"])
            assert bool(bad["fatal"]) == (precision != "fp16")  # bf16/fp32 stop the run; fp16 skips
            assert all(torch.equal(a, b) for a, b in zip(before, dp.parameters()))  # weights untouched
            assert int(dp.num_skipped_steps) == 1
            assert float(dp.loss_scale) == (scale / 2 if precision == "fp16" else 1.0)
            after = _step(dp, cfg, 2)  # the next clean step updates normally
            assert bool(after["ok"]) and torch.isfinite(after["grad_norm"])
            assert all(torch.isfinite(p).all() for p in dp.parameters())
            assert not all(torch.equal(a, b) for a, b in zip(before, dp.parameters()))
        finally:
            if backend == "mcore":
                destroy_distributed()
