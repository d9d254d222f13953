"""The whole training step (forward, backward, gradient reduce, optimizer step) in one CUDA graph.

MLPerf allows warming up on synthetic data before `run_start` as long as no weights change.
`build_step_runner` therefore snapshots every tensor the step mutates, runs the warmup steps on a
side stream (lazy state such as Adam moments and the loss-scale tensors gets allocated there),
captures one step into a graph, and writes the snapshot back in place: addresses stay the ones
the graph recorded, values return to their initial state. Each training step then copies the
batch into static input buffers and replays the graph; outputs are static tensors (read them
only at the log interval: reading is a host sync).

Requirements on `step_fn` for capture: no host syncs (`.item()`, `.cpu()`, data-dependent
Python branches), device-resident constants (e.g. alphas_cumprod already on the GPU), an
optimizer made capturable (`parallel.optimizer.make_capturable`), and gradients set to None (not
zeroed) at its start, so backward writes them rather than accumulating. Random draws
(timesteps, noise) are fine: the default CUDA generator advances its offset on each replay, and so
does any generator passed in `generators` (registered with the graph before capture). Their
positions are part of the snapshot, so warmup leaves the training RNG streams where they were.

The CPU twin is `EagerStepRunner`: same interface, eager calls, the same side-effect-free warmup.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch

from sd_mlperf.utils.logging import log_once, logger

Batch = dict[str, torch.Tensor]
StepFn = Callable[[Batch], dict[str, torch.Tensor]]


class TrainingStateSnapshot:
    """Copies of the tensors a training step mutates; `restore()` writes them back in place.

    Covers the model's parameters and buffers, the optimizer's per-parameter state, and
    `extra_tensors`: a loss scaler's scale and counters (`tensor_attributes(scaler)`), a distributed
    optimizer's fp32 main shards. Optimizer state created after the snapshot (Adam's lazily
    allocated moments and step) is zeroed on restore, which is exactly Adam(W)'s initial state.
    `generators` (the step's random streams) get their positions back too.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 extra_tensors: Iterable[torch.Tensor] = (), generators: Iterable[torch.Generator] = ()) -> None:
        self.optimizer = optimizer
        self._generator_states = [(g, g.get_state()) for g in generators]
        tensors = itertools.chain(model.parameters(), model.buffers(), extra_tensors)
        # Host copies: at the full SD2 size the weights alone are 3.5 GB that warmup should not hold on the GPU.
        self._saved = [(t, _host_copy(t)) for t in tensors]
        self._saved_state = {(id(p), key): _host_copy(value)
                             for p, state in optimizer.state.items()
                             for key, value in state.items() if torch.is_tensor(value)}

    def __enter__(self) -> TrainingStateSnapshot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    @torch.no_grad()
    def restore(self) -> None:
        """Write the saved values back into the same tensors (so captured addresses stay valid)."""
        for tensor, saved in self._saved:
            tensor.copy_(saved)
        for p, state in self.optimizer.state.items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    saved = self._saved_state.get((id(p), key))
                    if saved is None:
                        value.zero_()
                    else:
                        value.copy_(saved)
        for generator, state in self._generator_states:
            generator.set_state(state)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def tensor_attributes(obj: object) -> list[torch.Tensor]:
    """The tensors held directly as attributes of `obj` (a loss scaler's scale and counters)."""
    return [value for value in vars(obj).values() if torch.is_tensor(value)]


def warmup_without_side_effects(step_fn: StepFn, batch: Batch, *, model: torch.nn.Module,
                                optimizer: torch.optim.Optimizer, steps: int = 3,
                                extra_tensors: Iterable[torch.Tensor] = (),
                                generators: Iterable[torch.Generator] = ()) -> None:
    """Run `steps` training steps on `batch`, then restore every weight, optimizer state, extra tensor and RNG."""
    with TrainingStateSnapshot(model, optimizer, extra_tensors, generators):
        for _ in range(steps):
            step_fn(batch)
        optimizer.zero_grad(set_to_none=True)


class EagerStepRunner:
    """The CPU twin of `CudaGraphStepRunner`: calls `step_fn` directly."""

    graphed = False

    def __init__(self, step_fn: StepFn) -> None:
        self.step_fn = step_fn

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Run one training step on `batch`."""
        return self.step_fn(batch)


class CudaGraphStepRunner:
    """One training step captured in a CUDA graph; calling it copies the batch in and replays."""

    graphed = True

    def __init__(self, step_fn: StepFn, example_batch: Batch, *, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, warmup_steps: int = 3,
                 extra_tensors: Iterable[torch.Tensor] = (), generators: Iterable[torch.Generator] = ()) -> None:
        devices = {t.device.type for t in example_batch.values()}
        if devices != {"cuda"}:
            raise RuntimeError(f"CUDA graph capture needs the batch on a CUDA device, got {sorted(devices)}; "
                               "set training.cuda_graph=false on this machine")
        if warmup_steps < 1:
            raise ValueError(f"CUDA graph capture needs at least one warmup step, got {warmup_steps}")
        extra_tensors, generators = list(extra_tensors), list(generators)
        # Static inputs: the graph reads these addresses on every replay.
        self.static_batch = {k: v.detach().clone() for k, v in example_batch.items()}
        # A graph must not keep weight casts that autocast cached outside it; each UNet weight is cast
        # once per step anyway, so the cache saves nothing. Applies to every autocast entered later.
        torch.set_autocast_cache_enabled(False)
        self.graph = torch.cuda.CUDAGraph()
        for generator in generators:
            if generator.device.type == "cuda" and not _is_default_generator(generator):
                # Replays then read (and advance) this generator's position, as eager draws do;
                # torch.cuda.graph registers the default generator itself.
                self.graph.register_generator_state(generator)
        # Capture runs no kernels, but warmup does: on exit every weight goes back to its start value.
        with TrainingStateSnapshot(model, optimizer, extra_tensors, generators):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warmup off the default stream, as capture requires
                for _ in range(warmup_steps):
                    step_fn(self.static_batch)
            torch.cuda.current_stream().wait_stream(side)
            optimizer.zero_grad(set_to_none=True)  # backward in the graph allocates grads from its pool
            # thread_local: a pin-memory or loader thread touching CUDA during capture is not an error.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.static_out = step_fn(self.static_batch)
        torch.cuda.synchronize()
        logger.info("cuda_graph: training step captured after %d warmup steps (weights restored)", warmup_steps)

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Copy `batch` into the static inputs and replay the step; returns the static outputs."""
        for key, value in batch.items():
            self.static_batch[key].copy_(value, non_blocking=True)
        self.graph.replay()
        return self.static_out


def _is_default_generator(generator: torch.Generator) -> bool:
    index = generator.device.index if generator.device.index is not None else torch.cuda.current_device()
    return generator is torch.cuda.default_generators[index]


def build_step_runner(step_fn: StepFn, example_batch: Batch, *, model: torch.nn.Module,
                      optimizer: torch.optim.Optimizer, cuda_graph: bool = False, warmup_steps: int = 3,
                      extra_tensors: Iterable[torch.Tensor] = (),
                      generators: Iterable[torch.Generator] = ()) -> EagerStepRunner | CudaGraphStepRunner:
    """The step runner for training.cuda_graph: captured on CUDA, eager elsewhere (warned once).

    Either way `warmup_steps` steps run first on `example_batch` (synthetic data) and change no
    weights, optimizer or scaler state, or position of `generators`, so cuDNN autotuning and
    lazy allocations happen before `run_start`.
    """
    on_cuda = all(t.device.type == "cuda" for t in example_batch.values())
    if cuda_graph and on_cuda:
        return CudaGraphStepRunner(step_fn, example_batch, model=model, optimizer=optimizer,
                                   warmup_steps=warmup_steps, extra_tensors=extra_tensors, generators=generators)
    if cuda_graph:
        log_once("cuda_graph_cpu", "training.cuda_graph=true has no effect without a CUDA device; running eager")
    if warmup_steps > 0:
        warmup_without_side_effects(step_fn, example_batch, model=model, optimizer=optimizer,
                                    steps=warmup_steps, extra_tensors=extra_tensors, generators=generators)
    return EagerStepRunner(step_fn)
