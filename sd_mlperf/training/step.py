"""One optimizer step of the trainer, chosen once by `build_train_step` from `training.cuda_graph`.

- `EagerTrainStep` (default): per micro-batch the conditioner, the diffusion loss and backward,
  then the gradient sync and the AdamW step at the scheduled lr (a float).
- `GraphedTrainStep` (`training.cuda_graph=true`): the conditioner runs eagerly (it may tokenize
  captions on the host), then timesteps, noise, forward, backward, gradient reduce and the fused,
  capturable AdamW step replay from one CUDA graph (`training.cuda_graph`). z0 and the context are
  copied into static buffers; the lr is a device tensor filled before each replay. The warmup
  (`warm_up()`, called by build_trainer after resume and before `run_start`) runs on synthetic
  tensors of the real shapes and changes no weight, optimizer/scaler state or RNG position. On a
  CPU the same object runs its eager twin (same warmup, same math), warned once.

With `model.unet.compile` the compilation happens in `warm_up()` too, before `run_start` (the rules
allow untimed initialisation): the graphed step's warmup steps compile; the eager step runs
`COMPILE_WARMUP_PASSES` forward/backward passes on the synthetic tensors and drops their gradients
(no optimizer step, so no weight moves; the generator's position is restored). Its seconds are logged.

Both share `DiffusionLoss` and `step_metrics`, so the two paths cannot drift apart.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from sd_mlperf.config.load import latent_size, uses_loss_scaling, world_size
from sd_mlperf.config.schema import Config
from sd_mlperf.diffusion.schedule import add_noise, make_alphas_cumprod, sample_timesteps, v_loss, v_target

if TYPE_CHECKING:
    from sd_mlperf.parallel.data_parallel import DataParallelModel
    from sd_mlperf.parallel.optimizer import LRSchedule

GRAPH_WARMUP_STEPS = 3
"""Eager steps before capture: cuDNN autotuning and lazy allocations (Adam moments) happen there."""
GRAPH_WARMUP_STEPS_DDP = 11
"""torch DDP needs at least 11 eager iterations before a full-backward capture (PyTorch CUDA graph notes)."""
COMPILE_WARMUP_PASSES = 2
"""Eager step with model.unet.compile: the first pass compiles forward and backward, the second shows no recompile."""


class TrainStep(Protocol):
    """Callable(micro_batches, step) -> metric tensors {loss, ok, grad_norm, fatal}; `warm_up()` before run_start."""

    graphed: bool

    def __call__(self, micro_batches: Sequence[dict], step: int) -> dict[str, torch.Tensor]:
        """Run optimizer step `step` (0-based) on `micro_batches`."""
        ...

    def warm_up(self) -> None:
        """Prepare the step (graph capture) without changing any training state."""
        ...


@dataclass
class DiffusionLoss:
    """z0, context -> v-MSE: timesteps and noise from `generator`, noisy latents, forward under autocast."""

    dp: DataParallelModel
    alphas_cumprod: torch.Tensor
    num_timesteps: int
    autocast: Callable[[], contextlib.AbstractContextManager]
    generator: torch.Generator

    def __call__(self, z0: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The fp32 loss of one micro-batch (draw order: timesteps, then noise)."""
        g = self.generator
        t = sample_timesteps(z0.shape[0], self.num_timesteps, generator=g, device=g.device).to(z0.device)
        noise = torch.randn(z0.shape, generator=g, device=g.device, dtype=z0.dtype).to(z0.device)
        x_t = add_noise(z0, noise, t, self.alphas_cumprod)
        v = v_target(z0, noise, t, self.alphas_cumprod)
        with self.autocast():
            v_pred = self.dp.module(x_t, t, context)
        return v_loss(v_pred, v)  # fp32: per-sample MSE over C,H,W, then the batch mean


def step_metrics(loss: torch.Tensor, ok: torch.Tensor, grad_norm: torch.Tensor,
                 loss_scaling: bool) -> dict[str, torch.Tensor]:
    """The step's metric tensors; `fatal` marks an applied step with a non-finite loss or grad norm."""
    nonfinite = ~torch.isfinite(loss) | ~torch.isfinite(grad_norm)
    fatal = nonfinite & (ok | (not loss_scaling))  # an fp16 overflow is a skipped step, not fatal
    return {"loss": loss, "ok": ok, "grad_norm": grad_norm, "fatal": fatal}


class _StepParts:
    """What both steps hold: the loss, the conditioner, the lr schedule, the device."""

    def __init__(self, *, loss_fn: DiffusionLoss, conditioner: Callable[..., Any], lr_schedule: LRSchedule,
                 device: torch.device, loss_scaling: bool) -> None:
        self.loss_fn = loss_fn
        self.dp = loss_fn.dp
        self.conditioner = conditioner
        self.lr_schedule = lr_schedule
        self.device = device
        self.loss_scaling = loss_scaling

    def condition(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """z0 and context of one micro-batch (a fresh latent draw from the step's generator)."""
        return self.conditioner(batch, generator=self.loss_fn.generator, device=self.device)


class EagerTrainStep(_StepParts):
    """The default step: forward/backward per micro-batch, finish the gradient sync, AdamW at this lr."""

    graphed = False

    def __init__(self, *, compile_inputs: dict[str, torch.Tensor] | None = None, **parts: Any) -> None:
        super().__init__(**parts)
        self.compile_inputs = compile_inputs
        """Synthetic z0/context for the compile warmup (model.unet.compile), or None: nothing to prepare."""

    def warm_up(self) -> None:
        """With a compiled UNet: compile on the synthetic inputs (forward + backward, no optimizer step)."""
        if self.compile_inputs is None:
            return
        generator = self.loss_fn.generator
        position = generator.get_state()
        with _timed(f"compile warmup ({COMPILE_WARMUP_PASSES} forward/backward passes on synthetic tensors)"):
            for _ in range(COMPILE_WARMUP_PASSES):
                self.dp.zero_grad()
                loss = self.loss_fn(self.compile_inputs["z0"], self.compile_inputs["context"])
                self.dp.backward(loss)
                self.dp.finish_grad_sync()  # collectives run as in a real step; the gradients are dropped
            self.dp.zero_grad()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # host sync: before run_start, so compile time is not timed
        generator.set_state(position)

    def forward_backward(self, batch: dict) -> torch.Tensor:
        """One micro-batch: conditioner (fresh latent draw), loss, backward; returns the detached loss."""
        z0, context = self.condition(batch)
        loss = self.loss_fn(z0, context)
        self.dp.backward(loss)  # x loss scale, / grad_accumulation_steps
        return loss.detach()

    def __call__(self, micro_batches: Sequence[dict], step: int) -> dict[str, torch.Tensor]:
        """One optimizer step over `micro_batches` at the lr of step `step`."""
        lr = self.lr_schedule.lr_at(step)
        self.dp.zero_grad()
        losses = []
        for batch in micro_batches[:-1]:
            with self.dp.accumulating():  # no gradient reduction before the last micro-batch
                losses.append(self.forward_backward(batch))
        losses.append(self.forward_backward(micro_batches[-1]))
        self.dp.finish_grad_sync()
        ok, grad_norm = self.dp.step(lr)
        return step_metrics(torch.stack(losses).mean(), ok, grad_norm, self.loss_scaling)


class GraphedTrainStep(_StepParts):
    """training.cuda_graph: conditioner eager, the rest one CUDA graph replay (eager twin on the CPU)."""

    def __init__(self, *, loss_fn: DiffusionLoss, conditioner: Callable[..., Any], lr_schedule: LRSchedule,
                 device: torch.device, loss_scaling: bool, example_inputs: dict[str, torch.Tensor],
                 cuda_graph: bool, warmup_steps: int, compiled: bool = False) -> None:
        super().__init__(loss_fn=loss_fn, conditioner=conditioner, lr_schedule=lr_schedule, device=device,
                         loss_scaling=loss_scaling)
        self.compiled = compiled
        self.example_inputs = example_inputs
        self.cuda_graph = cuda_graph
        self.warmup_steps = warmup_steps
        self.lr = torch.zeros((), dtype=lr_dtype(device), device=device)
        self.runner: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None

    @property
    def graphed(self) -> bool:
        """Whether the step replays a captured CUDA graph (False before warm_up and on the CPU)."""
        return bool(getattr(self.runner, "graphed", False))

    def step_fn(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The captured part: zero grads, loss, backward, grad sync, AdamW at the lr tensor. No host sync."""
        self.dp.zero_grad()  # set_to_none: backward inside the graph writes fresh gradients
        loss = self.loss_fn(inputs["z0"], inputs["context"])
        self.dp.backward(loss)
        self.dp.finish_grad_sync()
        ok, grad_norm = self.dp.step(self.lr)
        return step_metrics(loss.detach(), ok, grad_norm, self.loss_scaling)

    def warm_up(self) -> None:
        """Warm up on the synthetic inputs and capture (CUDA) or keep eager (CPU); changes no training state."""
        from sd_mlperf.parallel.optimizer import make_capturable
        from sd_mlperf.training.cuda_graph import build_step_runner, tensor_attributes

        if self.cuda_graph and self.device.type == "cuda":
            make_capturable(self.dp.optimizer)  # with ZeRO: its param_groups and its local AdamW's
        optimizer = self.dp.local_optimizer  # the AdamW whose state this rank's step mutates
        self.lr.fill_(self.lr_schedule.lr_at(0))  # warmup steps run at a real lr; their updates are undone
        what = "compile + " if self.compiled else ""
        with _timed(f"step warmup ({what}{self.warmup_steps} steps on synthetic tensors, then capture)"):
            self.runner = build_step_runner(self.step_fn, self.example_inputs, model=self.dp.unwrapped,
                                            optimizer=optimizer, cuda_graph=self.cuda_graph,
                                            warmup_steps=self.warmup_steps,
                                            extra_tensors=[*tensor_attributes(self.dp.scaler),
                                                           *getattr(self.dp, "master_params", [])],
                                            generators=[self.loss_fn.generator])

    def __call__(self, micro_batches: Sequence[dict], step: int) -> dict[str, torch.Tensor]:
        """Step `step`: lr into its tensor, conditioner, then one replay (or eager call) on static inputs."""
        assert self.runner is not None, "GraphedTrainStep.warm_up() must run before the first step"
        assert len(micro_batches) == 1, "build_train_step refuses grad accumulation with training.cuda_graph"
        self.lr.fill_(self.lr_schedule.lr_at(step))  # a device write, no host sync
        z0, context = self.condition(micro_batches[0])
        inputs = {"z0": z0, "context": context}
        for key, value in inputs.items():
            expected = self.example_inputs[key].shape
            if value.shape != expected:
                raise ValueError(f"training.cuda_graph=true: the step was captured for {key} of shape "
                                 f"{tuple(expected)} (from the config) but the data gave {tuple(value.shape)}; "
                                 "check training.micro_batch_size, data.image_size and "
                                 "model.text_encoder.context_length, or set training.cuda_graph=false")
        out = self.runner(inputs)
        # The graph overwrites its outputs on the next replay: hand out copies (device ops, no sync).
        return {key: value.clone() for key, value in out.items()}


def lr_dtype(device: torch.device) -> torch.dtype:
    """The graphed step's lr tensor: fp32 on CUDA, as the fused kernel reads it (a float lr is rounded to fp32
    there too); the CPU kernel computes in double, so fp64 keeps the eager twin bit-identical to the float path."""
    return torch.float32 if device.type == "cuda" else torch.float64


def synthetic_step_inputs(cfg: Config, device: torch.device) -> dict[str, torch.Tensor]:
    """z0 (B, C, H/f, W/f) and context (B, L, D) of the configured shapes, from a fixed private seed."""
    u, b, size = cfg.model.unet, cfg.training.micro_batch_size, latent_size(cfg)
    g = torch.Generator().manual_seed(0)  # not the training generator: warmup must not move its position
    z0 = torch.randn(b, u.in_channels, size, size, generator=g)
    if u.channels_last:
        z0 = z0.contiguous(memory_format=torch.channels_last)
    context = torch.randn(b, cfg.model.text_encoder.context_length, u.context_dim, generator=g)
    return {"z0": z0.to(device), "context": context.to(device)}


def check_cuda_graph_supported(cfg: Config, parallel_backend: str) -> None:
    """Refuse training.cuda_graph=true where the step cannot be captured (ValueError naming the keys)."""
    if not cfg.training.cuda_graph:
        return
    if parallel_backend != "torch":
        raise ValueError(f"training.cuda_graph=true needs parallel.backend=torch, but parallel.backend resolved to "
                         f"{parallel_backend!r}: megatron-core's optimizer step reads found_inf on the host, which a "
                         "CUDA graph cannot capture. Set parallel.backend=torch or training.cuda_graph=false.")
    if cfg.training.grad_accumulation_steps != 1:
        raise ValueError(f"training.cuda_graph=true captures one micro-batch per step, but "
                         f"training.grad_accumulation_steps={cfg.training.grad_accumulation_steps}; set "
                         "training.grad_accumulation_steps=1 (raise training.micro_batch_size or the GPU count "
                         "instead) or training.cuda_graph=false.")


def build_train_step(cfg: Config, dp: DataParallelModel, *, conditioner: Callable[..., Any], lr_schedule: LRSchedule,
                     generator: torch.Generator, device: torch.device) -> EagerTrainStep | GraphedTrainStep:
    """The trainer's step for training.cuda_graph (decided here, once); call `warm_up()` before run_start."""
    from sd_mlperf.models.precision import autocast

    check_cuda_graph_supported(cfg, dp.resolution.name)
    precision = cfg.training.precision
    loss_fn = DiffusionLoss(dp=dp, alphas_cumprod=make_alphas_cumprod(cfg.diffusion).to(device),
                            num_timesteps=cfg.diffusion.num_timesteps, generator=generator,
                            autocast=lambda: autocast(precision, device))
    common = {"loss_fn": loss_fn, "conditioner": conditioner, "lr_schedule": lr_schedule, "device": device,
              "loss_scaling": uses_loss_scaling(precision)}
    compiled = cfg.model.unet.compile
    if not cfg.training.cuda_graph:
        return EagerTrainStep(**common, compile_inputs=synthetic_step_inputs(cfg, device) if compiled else None)
    return GraphedTrainStep(**common, example_inputs=synthetic_step_inputs(cfg, device), cuda_graph=True,
                            warmup_steps=GRAPH_WARMUP_STEPS_DDP if world_size(cfg) > 1 else GRAPH_WARMUP_STEPS,
                            compiled=compiled)


@contextlib.contextmanager
def _timed(what: str) -> Iterator[None]:
    """Log the seconds `what` took (the untimed initialisation before run_start)."""
    from sd_mlperf.utils.logging import logger

    start = time.perf_counter()
    yield
    logger.info("%s took %.1f s (before run_start)", what, time.perf_counter() - start)
