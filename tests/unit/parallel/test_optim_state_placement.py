"""place_step_counters: fused AdamW step counters back on their parameter's device after ZeRO's load.

torch's ZeroRedundancyOptimizer.load_state_dict moves 0-d state (Adam's `step`) to the CPU; on a GPU
the fused kernel then fails. With no GPU here, parameters on the meta device stand in for "another
device than the CPU": the placement rule is the same.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sd_mlperf.parallel.optimizer import make_capturable, place_step_counters


def _optimizer_with_cpu_steps(fused: bool) -> tuple[torch.optim.Optimizer, torch.nn.Parameter]:
    param = torch.nn.Parameter(torch.empty(3, device="meta"))
    opt = torch.optim.AdamW([param], lr=1e-3)  # unfused to build on meta; the flag is what the rule reads
    opt.param_groups[0]["fused"] = fused
    opt.state[param] = {"step": torch.tensor(7.0, dtype=torch.float64), "exp_avg": torch.empty(3, device="meta")}
    return opt, param


def test_fused_groups_get_their_steps_on_the_parameter_device_as_float32():
    opt, param = _optimizer_with_cpu_steps(fused=True)
    place_step_counters(opt)
    step = opt.state[param]["step"]
    assert step.device == param.device and step.dtype == torch.float32


def test_unfused_groups_keep_host_steps():
    opt, param = _optimizer_with_cpu_steps(fused=False)
    place_step_counters(opt)
    assert opt.state[param]["step"].device.type == "cpu"  # torch's own convention for unfused AdamW


def test_steps_already_in_place_are_left_as_they_are():
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([param], lr=1e-3, fused=True)
    param.grad = torch.ones(3)
    opt.step()
    before = opt.state[param]["step"]
    place_step_counters(opt)
    assert opt.state[param]["step"] is before and float(before) == 1.0


def test_make_capturable_accepts_zeros_empty_entries_for_other_ranks_parameters():
    mine, theirs = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([mine, theirs], lr=1e-3, fused=True)
    mine.grad = torch.ones(3)
    opt.step()
    opt.state[theirs] = None  # what ZeroRedundancyOptimizer.load_state_dict leaves for another rank's shard
    assert all(g["capturable"] for g in make_capturable(opt).param_groups)


def test_the_torch_backend_places_step_counters_after_every_load(monkeypatch):
    import sd_mlperf.parallel.torch_adapter as torch_adapter
    from sd_mlperf.parallel.data_parallel import apply_data_parallel
    from tests.unit.training._helpers import cpu_dist, make_cfg

    dp = apply_data_parallel(torch.nn.Linear(2, 2), make_cfg(Path("/nonexistent")), cpu_dist())
    calls = []
    monkeypatch.setattr(torch_adapter, "place_step_counters", calls.append)
    dp.load_state_dict(dp.state_dict())
    assert calls == [dp.local_optimizer]


def test_every_fused_or_capturable_group_is_placed_and_cast():
    """Groups are read one by one (an unfused one first does not stop the rest); device and dtype each count."""
    on_meta = torch.nn.Parameter(torch.empty(3, device="meta"))
    on_cpu, other_rank = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(1))
    unfused = torch.nn.Parameter(torch.empty(2, device="meta"))
    opt = torch.optim.AdamW([{"params": [unfused]}, {"params": [on_meta]}, {"params": [on_cpu, other_rank]}], lr=1e-3)
    opt.param_groups[1]["capturable"] = True  # capturable alone is enough
    opt.param_groups[2]["fused"] = True
    opt.state[unfused] = {"step": torch.tensor(3.0)}
    opt.state[on_meta] = {"step": torch.tensor(7.0)}  # float32 already, on the wrong device
    opt.state[on_cpu] = {"step": torch.tensor(7.0, dtype=torch.float64)}  # right device, wrong dtype
    opt.state[other_rank] = {}  # no state (ZeRO: another rank's parameter)
    place_step_counters(opt)
    assert opt.state[unfused]["step"].device.type == "cpu"
    assert opt.state[on_meta]["step"].device.type == "meta"
    assert opt.state[on_cpu]["step"].dtype == torch.float32 and "step" not in opt.state[other_rank]


def test_make_capturable_marks_zeros_local_optimizer_and_checks_step_placement():
    outer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, fused=True)
    outer.optim = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, fused=True)  # as ZeRO holds it
    make_capturable(outer)
    assert outer.param_groups[0]["capturable"] and outer.optim.param_groups[0]["capturable"]
    opt, param = _optimizer_with_cpu_steps(fused=True)  # a CPU step counter for a parameter elsewhere
    with pytest.raises(AssertionError, match="^fused AdamW keeps its step on the parameter's device$"):
        make_capturable(opt)
