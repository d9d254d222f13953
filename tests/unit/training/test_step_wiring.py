"""How the step is assembled and prepared, with the data-parallel model and the loss faked: what build_train_step
hands each step (device, loss scaling, compile inputs, warmup count), the synthetic warmup tensors, the eager
step's compile warmup (its passes, its restored generator, its CUDA sync) and what the graphed step's warmup asks
of build_step_runner. The meta device stands in for a GPU where only placement matters."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest
import torch

from sd_mlperf.training import cuda_graph
from sd_mlperf.training.step import (
    COMPILE_WARMUP_PASSES,
    GRAPH_WARMUP_STEPS,
    GRAPH_WARMUP_STEPS_DDP,
    EagerTrainStep,
    GraphedTrainStep,
    build_train_step,
    check_cuda_graph_supported,
    lr_dtype,
    synthetic_step_inputs,
)
from tests.unit.training._helpers import make_cfg

TORCH_DP = SimpleNamespace(resolution=SimpleNamespace(name="torch"))
META = torch.device("meta")


def _build(cfg, device=META):
    return build_train_step(cfg, TORCH_DP, conditioner=None, lr_schedule=None, generator=torch.Generator(),
                            device=device)


@pytest.mark.parametrize(("precision", "loss_scaling"), [("fp16", True), ("bf16", False), ("fp32", False)])
def test_build_places_the_schedule_on_the_device_and_scales_only_fp16(tmp_path, precision, loss_scaling):
    step = _build(make_cfg(tmp_path, f"training.precision={precision}"))
    assert isinstance(step, EagerTrainStep) and step.compile_inputs is None  # compile off: nothing to warm up
    assert step.loss_scaling is loss_scaling
    assert step.loss_fn.alphas_cumprod.device == META and step.device == META
    assert step.loss_fn.num_timesteps == 1000


def test_build_gives_the_compiled_eager_step_the_synthetic_inputs(tmp_path):
    cfg = make_cfg(tmp_path, "model.unet.compile=true")
    step = _build(cfg, torch.device("cpu"))
    expected = synthetic_step_inputs(cfg, torch.device("cpu"))
    assert set(step.compile_inputs) == {"z0", "context"}
    for key, value in expected.items():
        assert torch.equal(step.compile_inputs[key], value), key
    assert all(t.device == META for t in _build(cfg).compile_inputs.values())


@pytest.mark.parametrize(("gpus", "compiled", "warmup"), [(1, "false", GRAPH_WARMUP_STEPS),
                                                          (2, "true", GRAPH_WARMUP_STEPS_DDP)])
def test_build_graphed_step_warms_up_as_its_world_size_needs(tmp_path, gpus, compiled, warmup):
    cfg = make_cfg(tmp_path, "training.cuda_graph=true", f"parallel.gpus_per_node={gpus}",
                   f"model.unet.compile={compiled}")
    step = _build(cfg)
    assert isinstance(step, GraphedTrainStep) and step.cuda_graph is True
    assert step.warmup_steps == warmup and step.compiled is (compiled == "true")
    assert {k: (v.shape, v.device) for k, v in step.example_inputs.items()} == {
        k: (v.shape, META) for k, v in synthetic_step_inputs(cfg, torch.device("cpu")).items()}
    assert GRAPH_WARMUP_STEPS == 3 and GRAPH_WARMUP_STEPS_DDP == 11  # DDP capture needs 11 (PyTorch's notes)


@pytest.mark.parametrize("channels_last", [False, True])
def test_synthetic_inputs_are_fixed_draws_of_the_configured_shapes(tmp_path, channels_last):
    cfg = make_cfg(tmp_path, f"model.unet.channels_last={str(channels_last).lower()}",
                   "model.text_encoder.context_length=7")
    torch.manual_seed(99)  # the global RNG plays no part
    inputs = synthetic_step_inputs(cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 7, 16, generator=g)
    assert torch.equal(inputs["z0"], z0) and torch.equal(inputs["context"], context)
    assert inputs["z0"].is_contiguous(memory_format=torch.channels_last) is channels_last
    on_meta = synthetic_step_inputs(cfg, META)
    assert on_meta["z0"].device == META and on_meta["context"].device == META


def test_lr_tensor_is_fp32_on_cuda_and_fp64_elsewhere():
    assert lr_dtype(torch.device("cuda", 0)) == torch.float32  # the fused kernel's dtype
    assert lr_dtype(torch.device("cpu")) == torch.float64 and lr_dtype(META) == torch.float64


class _RecordingDP:
    """The data-parallel calls a step makes, in order."""

    def __init__(self) -> None:
        self.calls: list = []
        self.scaler = SimpleNamespace(scale=torch.tensor(8.0), tracker=torch.tensor(0), name="not a tensor")
        self.master_params = [torch.zeros(2), torch.ones(3)]
        self.unwrapped = "the model"
        self.local_optimizer = "the local AdamW"
        self.optimizer = "the optimizer"

    def zero_grad(self):
        self.calls.append("zero_grad")

    def backward(self, loss):
        self.calls.append(("backward", loss))

    def finish_grad_sync(self):
        self.calls.append("sync")

    def step(self, lr):
        self.calls.append(("step", lr))
        return torch.tensor(False), torch.tensor(float("inf"))  # an fp16 overflow


class _DrawingLoss:
    """A loss that draws from the step's generator (as the real one does) and records its inputs."""

    def __init__(self, dp, generator) -> None:
        self.dp, self.generator, self.inputs = dp, generator, []

    def __call__(self, z0, context):
        self.inputs.append((z0, context))
        return torch.randn((), generator=self.generator) + z0.sum() + context.sum()


def _eager(device="cpu", compile_inputs=None):
    dp = _RecordingDP()
    loss = _DrawingLoss(dp, torch.Generator().manual_seed(5))
    return EagerTrainStep(loss_fn=loss, conditioner=None, lr_schedule=None, device=torch.device(device),
                          loss_scaling=True, compile_inputs=compile_inputs)


def test_eager_compile_warmup_runs_its_passes_drops_the_grads_and_restores_the_generator(caplog, monkeypatch):
    inputs = {"z0": torch.ones(1), "context": torch.full((1,), 2.0)}
    step = _eager(compile_inputs=inputs)
    before = step.loss_fn.generator.get_state()
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", synced.append)
    with caplog.at_level(logging.INFO, logger="sd_mlperf"):
        step.warm_up()
    assert COMPILE_WARMUP_PASSES == 2
    losses = [c[1] for c in step.dp.calls if c[0] == "backward"]
    assert step.dp.calls == ["zero_grad", ("backward", losses[0]), "sync",
                             "zero_grad", ("backward", losses[1]), "sync", "zero_grad"]
    assert all(torch.is_tensor(x) for x in losses) and losses[0] != losses[1]  # two fresh draws
    assert all(z0 is inputs["z0"] and ctx is inputs["context"] for z0, ctx in step.loss_fn.inputs)
    assert torch.equal(step.loss_fn.generator.get_state(), before)  # the training draws are unchanged
    assert synced == []  # no CUDA call on the CPU
    messages = [r.getMessage() for r in caplog.records]
    assert any(re.fullmatch(r"compile warmup \(2 forward/backward passes on synthetic tensors\) took \d+\.\d s "
                            r"\(before run_start\)", m) for m in messages), messages


def test_eager_compile_warmup_waits_for_the_gpu_before_run_start(monkeypatch):
    cuda = torch.device("cuda", 1)  # a device object needs no GPU; the fakes never touch it
    step = _eager(device=cuda, compile_inputs={"z0": torch.ones(1), "context": torch.ones(1)})
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", synced.append)
    step.warm_up()
    assert synced == [cuda]


def test_eager_step_without_compile_inputs_has_nothing_to_warm_up():
    step = _eager()
    before = step.loss_fn.generator.get_state()
    step.warm_up()
    assert step.dp.calls == [] and torch.equal(step.loss_fn.generator.get_state(), before)


def _graphed(compiled=None):
    dp = _RecordingDP()
    loss = _DrawingLoss(dp, torch.Generator().manual_seed(5))
    kwargs = {} if compiled is None else {"compiled": compiled}
    return GraphedTrainStep(loss_fn=loss, conditioner=None, lr_schedule=SimpleNamespace(lr_at=lambda s: 0.25 + s),
                            device=torch.device("cpu"), loss_scaling=True,
                            example_inputs={"z0": torch.ones(1), "context": torch.ones(1)}, cuda_graph=True,
                            warmup_steps=7, **kwargs)


def test_graphed_step_fn_marks_an_fp16_overflow_as_a_skip_not_fatal():
    step = _graphed()
    out = step.step_fn({"z0": torch.ones(1), "context": torch.ones(1)})
    assert step.dp.calls[0] == "zero_grad" and step.dp.calls[2:] == ["sync", ("step", step.lr)]
    assert not bool(out["ok"]) and not bool(out["fatal"])  # loss scaling on: the overflow is skipped


@pytest.mark.parametrize(("compiled", "what"), [(None, ""), (False, ""), (True, "compile + ")])
def test_graphed_warmup_hands_build_step_runner_everything_it_restores(monkeypatch, caplog, compiled, what):
    step = _graphed(compiled)
    seen = {}

    def fake_runner(step_fn, example_inputs, **kwargs):
        seen.update(kwargs, step_fn=step_fn, example_inputs=example_inputs)
        return SimpleNamespace(graphed=True)

    monkeypatch.setattr(cuda_graph, "build_step_runner", fake_runner)
    with caplog.at_level(logging.INFO, logger="sd_mlperf"):
        step.warm_up()
    assert step.graphed and float(step.lr) == 0.25  # warmup steps run at the lr of step 0
    assert seen["step_fn"] == step.step_fn and seen["example_inputs"] is step.example_inputs
    assert seen["model"] == "the model" and seen["optimizer"] == "the local AdamW"
    assert seen["cuda_graph"] is True and seen["warmup_steps"] == 7
    extra = seen["extra_tensors"]  # the scaler's tensors and the fp32 masters are restored after the warmup
    assert len(extra) == 4 and extra[0] is step.dp.scaler.scale and extra[1] is step.dp.scaler.tracker
    assert extra[2] is step.dp.master_params[0] and extra[3] is step.dp.master_params[1]
    assert seen["generators"] == [step.loss_fn.generator]
    message = f"step warmup ({what}7 steps on synthetic tensors, then capture) took"
    assert any(r.getMessage().startswith(message) for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_graphed_warmup_without_master_params_restores_the_scaler_only(monkeypatch):
    step = _graphed()
    del step.dp.master_params  # the fp32-weights path keeps no masters
    seen = {}
    monkeypatch.setattr(cuda_graph, "build_step_runner", lambda *a, **kw: seen.update(kw))
    step.warm_up()
    assert len(seen["extra_tensors"]) == 2


def test_cuda_graph_refusals_give_the_whole_message(tmp_path):
    graph = ["training.cuda_graph=true"]
    with pytest.raises(ValueError) as mcore:
        check_cuda_graph_supported(make_cfg(tmp_path, *graph), "mcore")
    assert str(mcore.value) == (
        "training.cuda_graph=true needs parallel.backend=torch, but parallel.backend resolved to 'mcore': "
        "megatron-core's optimizer step reads found_inf on the host, which a CUDA graph cannot capture. Set "
        "parallel.backend=torch or training.cuda_graph=false.")
    cfg = make_cfg(tmp_path, *graph, "training.grad_accumulation_steps=2", "training.micro_batch_size=1")
    with pytest.raises(ValueError) as accumulation:
        check_cuda_graph_supported(cfg, "torch")
    assert str(accumulation.value) == (
        "training.cuda_graph=true captures one micro-batch per step, but training.grad_accumulation_steps=2; set "
        "training.grad_accumulation_steps=1 (raise training.micro_batch_size or the GPU count instead) or "
        "training.cuda_graph=false.")
    check_cuda_graph_supported(make_cfg(tmp_path, "training.grad_accumulation_steps=2"), "mcore")  # no graph: fine
