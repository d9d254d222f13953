"""training.cuda_graph in the trainer, on the CPU: the eager twin of the graphed step equals the default
step, its warmup (in build_trainer, before run_start) changes no training state, the lr lives in a device
tensor that follows the schedule, and unsupported combinations are refused with the keys to change."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from sd_mlperf.training.step import GRAPH_WARMUP_STEPS, GraphedTrainStep, build_train_step, check_cuda_graph_supported
from sd_mlperf.utils.logging import reset_log_once
from tests.unit.training._helpers import CONTEXT, make_batches, make_cfg, make_trainer, record_losses

GRAPH = ["training.cuda_graph=true", f"model.text_encoder.context_length={CONTEXT[0]}"]


def _state(trainer) -> dict:
    """Everything a step may change: weights, AdamW state, loss scaler, the training RNG position."""
    dp = trainer.dp
    return {"weights": {k: v.clone() for k, v in dp.unwrapped.state_dict().items()},
            "adam": [{k: v.clone() for k, v in s.items()} for s in dp.optimizer.state.values()],
            "scaler": [t.clone() for t in (dp.scaler.scale, dp.scaler.growth_tracker, dp.scaler.num_skipped)],
            "rng": trainer.generator.get_state()}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_graphed_step_on_cpu_equals_the_default_step(tmp_path, precision, caplog):
    reset_log_once()
    batches = make_batches(3)
    common = [f"training.precision={precision}", "training.max_steps=3", "logging.interval_steps=3"]
    ref, _ = make_trainer(make_cfg(tmp_path / "ref", *common), batches)
    ref_losses = record_losses(ref)
    ref.fit()
    ref.close()
    with caplog.at_level(logging.INFO, logger="sd_mlperf"):
        graphed, loader = make_trainer(make_cfg(tmp_path / "graph", *common, *GRAPH), batches)
    step = graphed.optimizer_step
    assert isinstance(step, GraphedTrainStep) and not step.graphed  # eager twin on the CPU
    assert sum("training.cuda_graph=true has no effect" in r.getMessage() for r in caplog.records) == 1
    assert loader.pos == 0  # warmup ran on synthetic tensors, not on the data
    losses = record_losses(graphed)
    graphed.fit()
    graphed.close()
    assert losses == ref_losses  # bit-exact: same draws in the same order, same AdamW math
    for name, value in graphed.dp.unwrapped.state_dict().items():
        assert torch.equal(value, ref.dp.unwrapped.state_dict()[name]), name
    assert float(graphed.dp.loss_scale) == float(ref.dp.loss_scale)
    for p, ref_p in zip(graphed.dp.params, ref.dp.params):
        for key, value in ref.dp.optimizer.state[ref_p].items():
            assert torch.equal(graphed.dp.optimizer.state[p][key], value), key


def test_warmup_changes_no_training_state(tmp_path):
    cfg = make_cfg(tmp_path / "graph", "training.precision=fp16", *GRAPH)
    trainer, loader = make_trainer(cfg, make_batches(2))
    default, _ = make_trainer(make_cfg(tmp_path / "ref", "training.precision=fp16"), make_batches(2))
    after_build, fresh = _state(trainer), _state(default)
    for name, value in fresh["weights"].items():  # build_trainer's warmup left the weights as initialised
        assert torch.equal(after_build["weights"][name], value), name
    assert torch.equal(after_build["rng"], fresh["rng"])
    assert all(torch.equal(a, b) for a, b in zip(after_build["scaler"], fresh["scaler"]))
    # Lazily created AdamW state is back at its initial value (step 0, zero moments).
    assert after_build["adam"] and all(not v.any() for s in after_build["adam"] for v in s.values())

    calls = []
    step = trainer.dp.step
    trainer.dp.step = lambda lr: (calls.append(float(lr)), step(lr))[1]
    trainer.optimizer_step.warm_up()  # warm up again: it really runs steps (which update the weights), then undoes them
    assert len(calls) == GRAPH_WARMUP_STEPS and loader.pos == 0
    again = _state(trainer)
    for name, value in after_build["weights"].items():
        assert torch.equal(again["weights"][name], value), name
    assert all(torch.equal(a, b) for a, b in zip(again["scaler"], after_build["scaler"]))
    assert torch.equal(again["rng"], after_build["rng"])
    for saved, now in zip(after_build["adam"], again["adam"]):
        assert all(torch.equal(now[k], v) for k, v in saved.items())
    trainer.close()
    default.close()


def test_lr_tensor_follows_the_warmup_schedule(tmp_path):
    cfg = make_cfg(tmp_path, "optim.warmup_steps=4", "training.max_steps=6", *GRAPH)
    trainer, _ = make_trainer(cfg, make_batches(3))
    seen, tensors = [], []
    step = trainer.dp.step
    trainer.dp.step = lambda lr: (seen.append(float(lr)), tensors.append(lr), step(lr))[2]
    trainer.fit()
    trainer.close()
    peak = cfg.optim.base_lr_per_sample * 2
    expected = [peak * (1e-6 + (1 - 1e-6) * n / 4) for n in range(4)] + [peak, peak]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert all(t is trainer.optimizer_step.lr for t in tensors)  # one tensor, filled in place: what a graph replays
    assert all(g["lr"] is trainer.optimizer_step.lr for g in trainer.dp.optimizer.param_groups)


def test_checkpoint_stores_a_float_lr_and_resume_matches(tmp_path):
    batches = make_batches(5)
    common = ["training.max_steps=5", *GRAPH]
    ref, _ = make_trainer(make_cfg(tmp_path / "ref", *common), batches)
    ref_losses = record_losses(ref)
    ref.fit()
    ref.close()
    cfg = make_cfg(tmp_path / "cut", *common)
    cut, loader = make_trainer(cfg, batches)
    loader.fail_at = 4
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    cut.close()
    cut.dp.optimizer.param_groups[0]["capturable"] = True  # as make_capturable leaves it on a GPU
    state = cut.dp.state_dict()
    assert all(isinstance(g["lr"], float) and not g["capturable"] for g in state["optimizer"]["param_groups"])
    group = cut.dp.optimizer.param_groups[0]
    assert group["capturable"] and group["lr"] is cut.optimizer_step.lr
    resumed, _ = make_trainer(cfg, batches)  # restores, then warms up: the warmup keeps the restored state
    assert resumed.state.step == 3
    losses = record_losses(resumed)
    resumed.fit()
    resumed.close()
    assert losses == ref_losses[3:]


def test_mcore_with_cuda_graph_is_refused(tmp_path):
    cfg = make_cfg(tmp_path, *GRAPH)
    with pytest.raises(ValueError, match=r"training.cuda_graph=true needs parallel.backend=torch.*'mcore'"):
        check_cuda_graph_supported(cfg, "mcore")
    fake_dp = SimpleNamespace(resolution=SimpleNamespace(name="mcore"))
    with pytest.raises(ValueError, match="Set parallel.backend=torch or training.cuda_graph=false"):
        build_train_step(cfg, fake_dp, conditioner=None, lr_schedule=None, generator=torch.Generator(),
                         device=torch.device("cpu"))
    check_cuda_graph_supported(make_cfg(tmp_path), "mcore")  # without a graph mcore is fine


def test_grad_accumulation_with_cuda_graph_is_refused(tmp_path):
    cfg = make_cfg(tmp_path, "training.grad_accumulation_steps=2", "training.micro_batch_size=1", *GRAPH)
    with pytest.raises(ValueError, match="training.grad_accumulation_steps=2.*training.cuda_graph=false"):
        make_trainer(cfg, make_batches(2))


def test_data_of_another_shape_than_captured_is_refused(tmp_path):
    trainer, _ = make_trainer(make_cfg(tmp_path, "training.cuda_graph=true"), make_batches(2))  # context 77
    with pytest.raises(ValueError, match=r"context of shape \(2, 77, 16\).*; check training\.micro_batch_size, "
                                         r"data\.image_size and model\.text_encoder\.context_length, or set "
                                         r"training\.cuda_graph=false$"):
        trainer.train_step(trainer.loader.batches[:1])
    trainer.close()
