"""step_metrics: which non-finite steps are fatal (an applied update) and which are an fp16 skip."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from sd_mlperf.training.step import DiffusionLoss, EagerTrainStep, GraphedTrainStep, step_metrics

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(("loss", "grad_norm", "ok", "loss_scaling", "fatal"), [
    (0.5, 1.0, True, True, False),     # a clean step
    (0.5, INF, False, True, False),    # fp16 overflow: skipped and the scale backs off, not fatal
    (NAN, 1.0, False, True, False),
    (NAN, 1.0, True, True, True),      # applied with a NaN loss: the run is broken
    (0.5, INF, True, True, True),
    (0.5, NAN, False, False, True),    # bf16/fp32: no scaler, so any non-finite value is fatal
    (INF, 1.0, False, False, True),
    (0.5, 1.0, False, False, False),
])
def test_fatal_marks_non_finite_steps_that_are_not_an_fp16_skip(loss, grad_norm, ok, loss_scaling, fatal):
    out = step_metrics(torch.tensor(loss), torch.tensor(ok), torch.tensor(grad_norm), loss_scaling)
    assert set(out) == {"loss", "ok", "grad_norm", "fatal"}
    assert bool(out["fatal"]) is fatal and out["fatal"].dtype == torch.bool
    assert bool(out["ok"]) is ok and (torch.equal(out["loss"], torch.tensor(loss)) or loss != loss)


def _graphed(device: str = "cpu") -> GraphedTrainStep:
    loss_fn = SimpleNamespace(dp=None, generator=None)  # enough for what these checks reach
    return GraphedTrainStep(loss_fn=loss_fn, conditioner=None, lr_schedule=None, device=torch.device(device),
                            loss_scaling=True, example_inputs={}, cuda_graph=False, warmup_steps=1)


def test_graphed_step_keeps_its_lr_tensor_on_the_device_and_checks_its_use():
    step = _graphed("meta")  # the meta device stands in for a GPU: the lr tensor must live there
    assert step.lr.device.type == "meta" and step.lr.shape == ()
    assert _graphed().lr.dtype == torch.float64  # the CPU kernel computes in double: the eager twin stays exact
    with pytest.raises(AssertionError, match=r"^GraphedTrainStep\.warm_up\(\) must run before the first step$"):
        _graphed()([{}], 0)
    ready = _graphed()
    ready.runner = lambda inputs: inputs
    with pytest.raises(AssertionError, match=r"^build_train_step refuses grad accumulation with training\.cuda_graph$"):
        ready([{}, {}], 0)


class _FakeDP:
    """Records what the step asks of the data-parallel model."""

    def __init__(self, ok: bool, grad_norm: float) -> None:
        self.calls, self.accumulating_now, self.result = [], False, (torch.tensor(ok), torch.tensor(grad_norm))

    def zero_grad(self):
        self.calls.append("zero_grad")

    @contextlib.contextmanager
    def accumulating(self):
        self.accumulating_now = True
        yield
        self.accumulating_now = False

    def backward(self, loss):
        self.calls.append(("backward", float(loss), self.accumulating_now))

    def finish_grad_sync(self):
        self.calls.append("sync")

    def step(self, lr):
        self.calls.append(("step", lr))
        return self.result


class _Loss:
    """A loss of z0 itself, holding what the step reads from the real one."""

    def __init__(self, dp: _FakeDP, generator: torch.Generator) -> None:
        self.dp, self.generator = dp, generator

    def __call__(self, z0: torch.Tensor, context: None) -> torch.Tensor:
        return z0


def test_eager_step_accumulates_every_micro_batch_then_steps_once():
    dp = _FakeDP(ok=False, grad_norm=float("inf"))  # an fp16 overflow: skipped, not fatal
    generator = torch.Generator()
    seen = []

    def conditioner(batch, *, generator, device):
        seen.append((batch["i"], generator, device))
        return torch.tensor(float(batch["i"])), None

    step = EagerTrainStep(loss_fn=_Loss(dp, generator), conditioner=conditioner,
                          lr_schedule=SimpleNamespace(lr_at=lambda s: 0.1 * s), device=torch.device("cpu"),
                          loss_scaling=True)
    out = step([{"i": 1}, {"i": 2}, {"i": 3}], step=5)
    assert [i for i, _, _ in seen] == [1, 2, 3]
    assert all(g is generator and d == torch.device("cpu") for _, g, d in seen)  # the step's generator and device
    assert dp.calls == ["zero_grad", ("backward", 1.0, True), ("backward", 2.0, True), ("backward", 3.0, False),
                        "sync", ("step", 0.5)]
    assert out["loss"].item() == 2.0 and not bool(out["fatal"])


def test_diffusion_loss_feeds_the_unet_the_noisy_latents_timesteps_and_context():
    """The v-MSE of one micro-batch, rebuilt by hand from the same generator draws (timesteps, then noise)."""
    from sd_mlperf.config.schema import DiffusionConfig
    from sd_mlperf.diffusion.schedule import add_noise, make_alphas_cumprod, v_target

    acp = make_alphas_cumprod(DiffusionConfig())
    seen = []

    def unet(x_t, t, context):
        seen.append((x_t, t, context))
        return x_t * context.mean()

    loss_fn = DiffusionLoss(dp=SimpleNamespace(module=unet), alphas_cumprod=acp, num_timesteps=1000,
                            autocast=contextlib.nullcontext, generator=torch.Generator().manual_seed(3))
    z0, context = torch.randn(2, 4, 3, 3), torch.full((2, 5, 6), 0.5)
    loss = loss_fn(z0, context)
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (2,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    x_t = add_noise(z0, noise, t, acp)
    assert torch.equal(seen[0][1], t) and seen[0][2] is context and torch.equal(seen[0][0], x_t)
    torch.testing.assert_close(loss, ((x_t * 0.5 - v_target(z0, noise, t, acp)) ** 2).mean())
