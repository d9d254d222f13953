"""The dynamic loss scaler."""

from __future__ import annotations

import pytest
import torch

from sd_mlperf.config.schema import TrainingConfig
from sd_mlperf.parallel.loss_scaling import DynamicLossScaler

CPU = torch.device("cpu")


def _scaler(**kw):
    args = {"initial_scale": 8.0, "min_scale": 2.0, "window": 3, "device": CPU} | kw
    return DynamicLossScaler(**args)


def test_overflow_halves_and_counts():
    s = _scaler()
    grads = [torch.tensor([1.0, float("inf")]), torch.tensor([2.0])]
    found = s.unscale_(grads)
    assert found.item() == 1.0
    s.update(found)
    assert s.scale.item() == 4.0 and s.num_skipped.item() == 1
    for _ in range(3):  # floor at min_scale
        s.update(torch.ones(1))
    assert s.scale.item() == 2.0 and s.num_skipped.item() == 4


def test_growth_after_window_and_unscale():
    s = _scaler()
    grads = [torch.tensor([8.0, 16.0])]
    found = s.unscale_(grads)
    assert found.item() == 0.0 and torch.equal(grads[0], torch.tensor([1.0, 2.0]))
    for expected in (8.0, 8.0, 16.0, 16.0):
        s.update(torch.zeros(1))
        assert s.scale.item() == expected
    assert s.num_skipped.item() == 0
    assert s.scale_loss(torch.tensor(0.5)).item() == 8.0


def test_disabled_scaler_only_counts():
    s = _scaler(enabled=False)
    assert s.scale.item() == 1.0 and s.scale_loss(torch.tensor(3.0)).item() == 3.0
    found = s.unscale_([torch.tensor([float("nan")])])
    s.update(found)
    assert s.scale.item() == 1.0 and s.num_skipped.item() == 1


def test_state_roundtrip():
    a = _scaler()
    a.update(torch.ones(1))
    a.update(torch.zeros(1))
    b = _scaler()
    b.load_state_dict(a.state_dict())
    assert b.scale.item() == a.scale.item() == 4.0
    assert b.growth_tracker.item() == 1 and b.num_skipped.item() == 1
    with pytest.raises(ValueError, match="precision"):
        _scaler(enabled=False).load_state_dict(a.state_dict())


@pytest.mark.parametrize("precision,enabled", [("fp16", True), ("bf16", False), ("fp32", False)])
def test_built_from_the_training_section(precision, enabled):
    """Only fp16 scales; the constants come from training.* (a scale of 1 and no growth otherwise)."""
    cfg = TrainingConfig(precision=precision, initial_loss_scale=64.0, min_loss_scale=4.0, loss_scale_window=5)
    s = DynamicLossScaler.from_training(cfg, CPU)
    assert s.enabled is enabled and (s.min_scale, s.window) == (4.0, 5)
    assert s.scale.item() == (64.0 if enabled else 1.0) and s.scale.dtype == torch.float32
    loss = torch.tensor(0.5, dtype=torch.float16)
    scaled = s.scale_loss(loss)
    assert scaled.dtype == torch.float16 and scaled.item() == (32.0 if enabled else 0.5)


def test_state_dict_is_a_copy_and_refuses_a_precision_change_by_name():
    s = _scaler()
    state = s.state_dict()
    state["scale"].fill_(123.0)
    assert s.scale.item() == 8.0  # the saved state does not alias the live tensors
    assert s.unscale_([]).tolist() == [0.0]  # no gradients: nothing found
    with pytest.raises(ValueError, match=r"saved with another training\.precision \(fp16 scaling on\); resume with "
                                         r"the same precision\.$"):
        _scaler(enabled=False).load_state_dict(s.state_dict())


def test_state_lives_on_the_given_device_with_fixed_dtypes():
    """Every tensor on `device` (the meta device stands in for a GPU here), with the dtypes the update kernel needs."""
    meta = torch.device("meta")
    s = DynamicLossScaler.from_training(TrainingConfig(precision="fp16"), meta)
    assert {t.device.type for t in (s.scale, s.growth_tracker, s.num_skipped)} == {"meta"}
    assert (s.scale.dtype, s.growth_tracker.dtype, s.num_skipped.dtype) == (torch.float32, torch.int32, torch.int64)


def test_loading_an_unscaled_state_into_fp16_names_both_sides():
    with pytest.raises(ValueError, match=r"\(fp16 scaling off\); resume with the same precision\.$"):
        _scaler().load_state_dict(_scaler(enabled=False).state_dict())


def test_a_state_saved_before_the_enabled_flag_still_loads():
    state = _scaler().state_dict()
    del state["enabled"]  # checkpoints written before the flag existed
    s = _scaler(initial_scale=2.0)
    s.load_state_dict(state)
    assert s.scale.item() == 8.0
