"""The CPU twin of the CUDA-graph step: side-effect-free warmup, eager runner, capturable optimizer."""

from __future__ import annotations

import logging

import pytest
import torch

from sd_mlperf.parallel.loss_scaling import DynamicLossScaler
from sd_mlperf.parallel.optimizer import adamw_kernel_options, make_capturable
from sd_mlperf.training.cuda_graph import (
    CudaGraphStepRunner,
    EagerStepRunner,
    TrainingStateSnapshot,
    build_step_runner,
    tensor_attributes,
    warmup_without_side_effects,
)
from sd_mlperf.utils.logging import reset_log_once


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.SiLU(), torch.nn.Linear(8, 3))
    model.register_buffer("calls", torch.zeros(()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01,
                            **adamw_kernel_options(torch.device("cpu")))
    scaler = DynamicLossScaler(initial_scale=1024.0, min_scale=1.0, window=2, device=torch.device("cpu"))

    def step(batch):
        opt.zero_grad(set_to_none=True)
        model.calls += 1
        loss = (model(batch["x"]) - batch["y"]).pow(2).mean()
        scaler.scale_loss(loss).backward()
        found_inf = scaler.unscale_([p.grad for p in model.parameters()])
        opt.found_inf = found_inf.reshape(())  # fused AdamW subtracts it from its 0-d step counters
        opt.step()
        scaler.update(found_inf)
        return {"loss": loss.detach()}

    return model, opt, scaler, step


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(5, 6, generator=g), "y": torch.randn(5, 3, generator=g)}


def test_warmup_changes_no_weights_and_the_next_step_equals_a_fresh_start():
    model, opt, scaler, step = _parts()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    warmup_without_side_effects(step, _batch(1), model=model, optimizer=opt, steps=3,
                                extra_tensors=tensor_attributes(scaler))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert float(scaler.scale) == 1024.0 and int(scaler.growth_tracker) == 0
    assert all(float(s["step"]) == 0 for s in opt.state.values())

    fresh_model, _, _, fresh_step = _parts()
    out, fresh_out = step(_batch(2)), fresh_step(_batch(2))
    assert torch.equal(out["loss"], fresh_out["loss"])
    for (k, v), w in zip(model.state_dict().items(), fresh_model.state_dict().values()):
        assert torch.equal(v, w), k  # same Adam bias correction: the step counter really restarted


def test_snapshot_keeps_state_that_existed_before():
    model, opt, scaler, step = _parts()
    step(_batch(1))  # state exists now (a resumed run)
    saved = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    snap = TrainingStateSnapshot(model, opt, tensor_attributes(scaler))
    step(_batch(2))
    snap.restore()
    for k, v in opt.state[model[0].weight].items():
        assert torch.equal(v, saved[k]), k


def test_build_step_runner_is_eager_on_cpu_and_warns_once(caplog):
    reset_log_once()
    model, opt, _, step = _parts()
    with caplog.at_level(logging.WARNING, logger="sd_mlperf"):
        runner = build_step_runner(step, _batch(1), model=model, optimizer=opt, cuda_graph=True, warmup_steps=1)
        build_step_runner(step, _batch(1), model=model, optimizer=opt, cuda_graph=True, warmup_steps=0)
    assert isinstance(runner, EagerStepRunner) and not runner.graphed
    assert sum("cuda_graph" in r.getMessage() for r in caplog.records) == 1
    assert torch.isfinite(runner(_batch(3))["loss"])


def test_graph_runner_refuses_cpu_tensors():
    model, opt, _, step = _parts()
    with pytest.raises(RuntimeError, match="training.cuda_graph=false"):
        CudaGraphStepRunner(step, _batch(1), model=model, optimizer=opt)


def test_make_capturable_needs_fused_adamw():
    model, opt, _, _ = _parts()
    assert all(g["capturable"] for g in make_capturable(opt).param_groups)
    plain = torch.optim.AdamW(model.parameters(), foreach=False)
    with pytest.raises(ValueError, match="fused"):
        make_capturable(plain)


def test_kernel_options():
    assert adamw_kernel_options(torch.device("cpu"), capturable=True) == {"fused": True}
    assert adamw_kernel_options(torch.device("cuda"), capturable=True) == {"fused": True, "capturable": True}


def test_warmup_puts_the_step_generators_back():
    model, opt, scaler, _ = _parts()
    g = torch.Generator().manual_seed(5)

    def noisy_step(batch):
        noise = torch.randn(batch["x"].shape, generator=g)  # the step's own random draws
        opt.zero_grad(set_to_none=True)
        (model(batch["x"] + noise) - batch["y"]).pow(2).mean().backward()
        opt.step()
        return {}

    expected = torch.randn(4, generator=torch.Generator().manual_seed(5))
    warmup_without_side_effects(noisy_step, _batch(1), model=model, optimizer=opt, steps=2, generators=[g])
    assert torch.equal(torch.randn(4, generator=g), expected)
    # Without it the position moves: the check above can fail.
    warmup_without_side_effects(noisy_step, _batch(1), model=model, optimizer=opt, steps=1)
    assert not torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=torch.Generator().manual_seed(5)))


def test_make_capturable_marks_zero_and_its_local_adamw(tmp_path):
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        p = torch.nn.Parameter(torch.randn(3))
        zero = ZeroRedundancyOptimizer([p], optimizer_class=torch.optim.AdamW, lr=1e-3, fused=True)
        assert make_capturable(zero) is zero
        assert zero.optim.param_groups[0]["capturable"]  # the local AdamW too, not only through ZeRO's next sync
        zero._sync_param_groups(zero.param_groups, zero.optim.param_groups)  # what ZeRO's step() does first
        assert zero.optim.param_groups[0]["capturable"] and zero.param_groups[0]["capturable"]
    finally:
        dist.destroy_process_group()
