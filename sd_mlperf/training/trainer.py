"""The training loop: `Trainer` holds parts that `build_trainer` made; `fit()` reads like a checklist.

No backend or distributed branches live here: data parallelism, precision and the optimizer sit
behind `dp` (sd_mlperf.parallel), the step's math (eager, or one CUDA graph with training.cuda_graph)
behind `optimizer_step` (sd_mlperf.training.step), the data behind `loader` + `conditioner`, evaluation behind any
object with `evaluate(unet, samples_count=, step=) -> result with .fid/.clip`. The loop syncs with the
device only at log intervals and at checkpoints (marked "host sync").
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from sd_mlperf.training.checkpoints import Checkpointer, capture_rng_state, restore_rng_state, saved_global_batch_size
from sd_mlperf.training.eval_checkpoints import EvalCheckpointWriter, stop_requested
from sd_mlperf.training.meter import IntervalMeter
from sd_mlperf.training.metrics import Progress
from sd_mlperf.training.mlperf_log import MLPerfLogger
from sd_mlperf.training.step import TrainStep
from sd_mlperf.utils.errors import UserError
from sd_mlperf.utils.logging import logger
from sd_mlperf.utils.seeds import stream_seed

if TYPE_CHECKING:
    from sd_mlperf.parallel.data_parallel import DataParallelModel
    from sd_mlperf.parallel.optimizer import LRSchedule

UNBOUNDED_STEPS = 2**62
"""max_steps when neither training.max_steps nor training.max_samples is set (stop at the target)."""


class NonFiniteLossError(UserError):
    """The loss (or gradient norm) of an applied step was NaN or inf: training cannot continue."""


class EvalResultLike(Protocol):
    """What an evaluator returns (sd_mlperf.eval.evaluator.EvalResult has these and more: the trainer also reads
    its `extra` metrics, the toy metrics of synthetic runs, when present)."""

    fid: float
    clip: float


class EvaluatorLike(Protocol):
    """Anything that can score the UNet; tests inject fakes with given FID/CLIP values."""

    def evaluate(self, unet: torch.nn.Module, *, samples_count: int, step: int) -> EvalResultLike:
        """Generate, score and return FID and CLIP."""
        ...


@dataclass(frozen=True)
class TrainPlan:
    """The numbers the loop needs, fixed at build time."""

    global_batch_size: int
    grad_accumulation_steps: int
    steps_per_block: int
    """Checkpoint (and evaluate) every this many steps: CEIL(checkpoint_every_samples / GBS)."""
    max_steps: int
    log_interval_steps: int
    num_timesteps: int
    loss_scaling: bool
    """fp16 skips overflowing steps (counted); without loss scaling a non-finite loss stops the run."""
    precision: str
    target_fid: float
    target_clip: float
    stop_at_target: bool
    seed: int
    """The run seed (drawn or given), saved in every checkpoint so that a resume keeps it."""
    save_resumable: bool
    """Write the resumable checkpoint (weights, optimizer, RNGs, data position) at every block end."""
    target_toy: dict[str, float] = field(default_factory=dict)
    """Minimum values of extra (toy) metrics that the quality target also needs (training.target_toy)."""


@dataclass
class TrainState:
    """What advances during training (saved in every checkpoint)."""

    step: int = 0
    samples_count: int = 0
    reached_target: bool = False
    evals: list[dict[str, float]] = field(default_factory=list)
    last_checkpoint: Path | None = None


class Trainer:
    """Holds the built parts; `train_step` is one optimizer step, `fit` is the run."""

    def __init__(self, *, plan: TrainPlan, dp: DataParallelModel, optimizer_step: TrainStep, loader: Iterable[dict],
                 lr_schedule: LRSchedule, generator: torch.Generator, checkpointer: Checkpointer, mlperf: MLPerfLogger,
                 progress: Progress, run_dir: Path, evaluator: EvaluatorLike | None = None,
                 collector: EvalCheckpointWriter | None = None,
                 reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """`collector` collects weights-only checkpoints for offline evaluation (eval.inline=false); then the
        trainer writes no run_stop: `sd-mlperf evaluate --run-dir` places it in the final log."""
        self.plan = plan
        self.dp = dp
        self.optimizer_step = optimizer_step  # eager or one CUDA graph; `state.step` counts the steps done
        self.loader = loader
        self.lr_schedule = lr_schedule
        self.generator = generator
        self.checkpointer = checkpointer
        self.mlperf = mlperf
        self.progress = progress
        self.evaluator = evaluator
        self.collector = collector
        self.run_dir = Path(run_dir)
        self.meter = IntervalMeter(reduce_mean)
        self.state = TrainState()

    # -- one step ------------------------------------------------------------------------------------
    def train_step(self, micro_batches: Sequence[dict]) -> dict[str, torch.Tensor]:
        """One optimizer step (conditioner, noise, v-loss, backward, grad sync, AdamW) at this step's lr."""
        return self.optimizer_step(micro_batches, self.state.step)  # metric tensors: no host sync

    # -- the run ---------------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        """Train until the quality target, max steps or max samples; checkpoint and evaluate every block."""
        s, plan = self.state, self.plan
        if s.step >= plan.max_steps:
            logger.info("nothing to train: step %d already reached the stop step %d", s.step, plan.max_steps)
            return s
        self.mlperf.run_start(s.samples_count)
        end_reason, stop = "error", ""  # "error" until the loop ends normally: an exception keeps it
        try:
            self.mlperf.block_start(s.samples_count)
            batches = self._batches()
            while s.step < plan.max_steps:
                metrics = self.train_step([next(batches) for _ in range(plan.grad_accumulation_steps)])
                s.step += 1
                s.samples_count += plan.global_batch_size
                self.meter.add(**metrics)
                self.progress.tick(s.step)
                if s.step % plan.log_interval_steps == 0:
                    self.log_progress()  # host sync
                if s.step % plan.steps_per_block == 0 or s.step == plan.max_steps:
                    self.mlperf.block_stop(s.samples_count)
                    self.end_block()  # host sync (finite check, state to CPU)
                    stop = self.stop_reason()
                    if stop:
                        break
                    if s.step < plan.max_steps:
                        self.mlperf.block_start(s.samples_count)
            end_reason = stop or "max_steps"
        except KeyboardInterrupt:  # Ctrl-C: the end is recorded as interrupted, never as a normal end
            end_reason = "interrupted"
            raise
        finally:
            self.end_run(end_reason)
        logger.info("training finished at step %d (%d samples): %s; target %s", s.step, s.samples_count, end_reason,
                    "reached" if s.reached_target else "not reached (inline)" if self.evaluator else
                    "judged offline (sd-mlperf evaluate --run-dir)")
        return s

    def end_block(self) -> None:
        """At every block end: the resumable checkpoint, the weights for offline evaluation, inline evaluation."""
        if self.plan.save_resumable:
            if self.collector is not None:
                # The resumable checkpoint claims this step: the collections before it must be durable first (a
                # resume collects this step's own again if a kill comes before it is; EvalCheckpointWriter.resume).
                self.collector.wait()
            self.save_checkpoint()
        if self.collector is not None and self.state.step % self.plan.steps_per_block == 0:
            # Only on the 512,000-image cadence the rules score: not the off-cadence last step of max_samples.
            self.raise_if_nonfinite()
            s = self.state
            self.collector.collect(s.step, s.samples_count, self.dp.unwrapped.state_dict(),
                                   global_batch_size=self.plan.global_batch_size, seed=self.plan.seed)
        self.evaluate()

    def stop_reason(self) -> str:
        """Why to stop after this block ('' = go on): the target reached inline, or RUN/STOP (ranks agree)."""
        if self.state.reached_target and self.plan.stop_at_target:
            return "target"
        flag = torch.tensor([float(stop_requested(self.run_dir))], device=self.generator.device)
        if self.meter.reduce_mean(flag).item() > 0:  # host sync; every rank stops if any saw the file
            logger.info("stopping at step %d: %s asks for it", self.state.step, self.run_dir / "STOP")
            return "stop_requested"
        return ""

    def end_run(self, reason: str) -> None:
        """End of training: run_stop (inline evaluation), or the end record for the offline evaluator."""
        s = self.state
        if self.collector is None:
            record = functools.partial(self.mlperf.run_stop, s.samples_count, success=s.reached_target)
            where = self.mlperf.path
        else:
            record = functools.partial(self.collector.finish, s.samples_count, reason)
            where = self.collector.dir
        if reason not in ("error", "interrupted"):
            record()
            return
        try:  # training is failing or interrupted already: record the end, never hide that behind a writer's error
            record()
        except Exception as exc:  # noqa: BLE001 -- logged; the training error propagates
            logger.error("could not record the end of training in %s: %s", where, exc)

    def _batches(self) -> Iterator[dict]:
        while True:  # the reference samples shards with replacement: no epochs
            yield from self.loader

    def log_progress(self) -> None:
        """One progress line + JSON record (host sync)."""
        self.raise_if_nonfinite()
        s = self.state
        metrics = self.meter.pop()
        to_ckpt = self.plan.steps_per_block - s.step % self.plan.steps_per_block
        self.progress.log_train(s.step, s.samples_count, metrics, lr=self.lr_schedule.lr_at(max(s.step - 1, 0)),
                                loss_scale=float(self.dp.loss_scale), steps_to_checkpoint=to_ckpt)

    def raise_if_nonfinite(self) -> None:
        """Stop with a clear message if an applied step had a NaN/inf loss (host sync, all ranks agree)."""
        if not self.meter.any_fatal():
            return
        last = self.state.last_checkpoint or self.checkpointer.latest()
        raise NonFiniteLossError(
            f"the loss or gradient norm became NaN/inf by step {self.state.step} (training.precision="
            f"{self.plan.precision}, lr {self.lr_schedule.lr_at(self.state.step):.3e}); no checkpoint was written "
            f"after it. Last good checkpoint: {last or 'none'}. Lower optim.base_lr_per_sample or lengthen "
            "optim.warmup_steps, or use training.precision=fp16 (dynamic loss scaling) or fp32.")

    # -- evaluation and checkpoints ------------------------------------------------------------------
    def evaluate(self) -> None:
        """Score the UNet (if an evaluator was built) and log FID and CLIP; sets reached_target."""
        if self.evaluator is None:
            return
        s = self.state
        self.mlperf.eval_start(s.samples_count)
        start = time.perf_counter()
        result = self.evaluator.evaluate(self.dp.unwrapped, samples_count=s.samples_count, step=s.step)
        seconds = time.perf_counter() - start
        fid, clip = float(result.fid), float(result.clip)
        extra = dict(getattr(result, "extra", {}))  # only FID and CLIP go to the MLPerf log
        self.mlperf.eval_result(s.samples_count, fid, clip)
        self.mlperf.eval_stop(s.samples_count)
        self.dp.module.train()  # the evaluator may have switched to eval mode
        s.evals.append({"step": s.step, "samples_count": s.samples_count, "fid": fid, "clip": clip, **extra})
        self.progress.log_eval(s.step, s.samples_count, fid, clip, seconds, extra=extra)
        toy_met = all(extra.get(name, -math.inf) >= value for name, value in self.plan.target_toy.items())
        if fid <= self.plan.target_fid and clip >= self.plan.target_clip and toy_met:
            s.reached_target = True

    def rank_state(self) -> dict[str, Any]:
        """This rank's part of a checkpoint: RNGs, data position, LR schedule position."""
        s = self.state
        return {"rng": capture_rng_state(self.generator), "run_seed": self.plan.seed,
                "data": self.loader.state_dict(), "reached_target": s.reached_target,
                "lr_schedule": {"next_step": s.step, "next_lr": self.lr_schedule.lr_at(s.step)}}

    def save_checkpoint(self) -> Path:
        """Write a complete checkpoint of the current step (never one with a non-finite loss behind it)."""
        self.raise_if_nonfinite()
        s = self.state
        # Collective: every rank calls it; the state is gathered on rank 0.
        optimizer_state = self.dp.state_dict() if self.checkpointer.cfg.save_optimizer else None
        s.last_checkpoint = self.checkpointer.save(s.step, s.samples_count, unet_state=self.dp.unwrapped.state_dict(),
                                                   optimizer_state=optimizer_state, rank_state=self.rank_state(),
                                                   global_batch_size=self.plan.global_batch_size)
        return s.last_checkpoint

    def restore(self, path: str | Path) -> None:
        """Resume exactly: weights, optimizer/scaler, RNGs, data position, step and samples_count.

        build_trainer calls it before `optimizer_step.warm_up()`: loading optimizer state replaces its tensors,
        and a captured CUDA graph (training.cuda_graph) keeps using the ones it recorded.
        """
        model, optimizer_state, rank = self.checkpointer.load(path)
        step, samples_count = int(model["step"]), int(model["samples_count"])
        saved_world = int(model.get("world_size", 1))
        resharded = saved_world != self.checkpointer.world_size  # checkpoint.allow_reshard let it through
        self._check_global_batch(model, path)
        if resharded:
            self._check_reshard(saved_world)
        s = self.state
        s.step, s.samples_count = step, samples_count
        self.dp.unwrapped.load_state_dict(model["unet"])  # weights first: the optimizer may copy them
        if optimizer_state is not None:
            self.dp.load_state_dict(optimizer_state, reshard=resharded)
        else:
            logger.warning("checkpoint %s has no optimizer state (checkpoint.save_optimizer=false): the AdamW "
                           "moments and the loss scale restart, so the run will not match an uninterrupted one", path)
        if resharded:
            self._restart_streams(s.step, saved_world_size=saved_world)
        else:
            restore_rng_state(rank["rng"], self.generator)
            self.loader.load_state_dict(rank["data"])
        s.reached_target = bool(rank.get("reached_target", False))  # the same on every rank
        s.last_checkpoint = Path(path)
        self.mlperf.resumed(str(path), s.samples_count)  # a resumed run is not a valid timed run
        if self.collector is not None:  # marks the resume in the index; collects this step again if it is missing
            self.collector.resume(s.step, s.samples_count, self.dp.unwrapped.state_dict(),
                                  on_cadence=s.step % self.plan.steps_per_block == 0,
                                  global_batch_size=self.plan.global_batch_size, seed=self.plan.seed)
        self.progress.log_resume(s.step, s.samples_count, str(path))
        logger.info("resumed from %s at step %d (%d samples)", path, s.step, s.samples_count)

    def _check_global_batch(self, model: dict[str, Any], path: str | Path) -> None:
        """A resumed run keeps the global batch: the lr, step <-> samples and the evaluation points depend on it."""
        saved, here = saved_global_batch_size(model), self.plan.global_batch_size
        if saved is None:
            logger.warning("checkpoint %s does not say its global batch; resuming with %d", path, here)
        elif saved != here:
            raise ValueError(
                f"checkpoint {path} trained with a global batch of {saved} on {model.get('world_size', 1)} ranks; this "
                f"run's is {here} on {self.checkpointer.world_size}. A resumed run keeps it (the lr, the step <-> "
                "samples count and the evaluation points depend on it): set training.micro_batch_size x ranks x "
                f"training.grad_accumulation_steps = {saved}, or start a new run (training.resume=never) from its "
                "weights.")

    def _check_reshard(self, saved_world: int) -> None:
        """A resharded resume needs a backend that reshards and a loader that can restart its streams."""
        if not self.dp.supports_reshard:  # checked before loading anything (also without optimizer state)
            raise ValueError(self.dp.reshard_refusal(saved_world))
        if not hasattr(self.loader, "restart_at"):
            raise RuntimeError(f"checkpoint.allow_reshard: the training loader ({type(self.loader).__name__}) has no "
                               "restart_at(batches) to start fresh data streams; resume with the saved world size.")

    def _restart_streams(self, step: int, *, saved_world_size: int) -> None:
        """After a resharded resume: noise RNG and data streams from (run.seed, rank, step), fresh."""
        self.loader.restart_at(step * self.plan.grad_accumulation_steps)  # type: ignore[attr-defined]
        # The step's generator was seeded from (run.seed, rank); move it on with the step, as the loader does.
        self.generator.manual_seed(stream_seed(self.generator.initial_seed(), step))
        logger.warning("resumed a checkpoint of %d ranks on %d (checkpoint.allow_reshard, global batch %d): the "
                       "noise and data streams restart, so the run does not match an uninterrupted one",
                       saved_world_size, self.checkpointer.world_size, self.plan.global_batch_size)

    def close(self) -> None:
        """Close the writers (and the loader, if it holds workers or files)."""
        self.progress.close()
        self.mlperf.close()
        if self.collector is not None:
            self.collector.close()
        close_loader = getattr(self.loader, "close", None)
        if callable(close_loader):
            close_loader()
