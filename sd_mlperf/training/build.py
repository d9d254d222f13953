"""Building a Trainer from the config: MLPerf init events, the run seed, every part, then resume and warm-up.

`build_trainer` is the one place that knows how the parts fit; `Trainer` (sd_mlperf.training.trainer) only runs them.
It runs three steps in order: `_start_run` (run directory, resume point, seed, MLPerf init events), `_build_parts`
(the parts, held by a new Trainer) and `_resume_and_warm_up`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from sd_mlperf.backends import Resolution, fallbacks, log_resolutions, resolutions_to_dict, training_precisions
from sd_mlperf.config.load import (
    global_batch_size,
    latent_size,
    run_directory,
    save_resolved_config,
    steps_between_checkpoints,
    uses_loss_scaling,
)
from sd_mlperf.config.schema import Config
from sd_mlperf.parallel.distributed import agree_on_resume, agree_on_seed
from sd_mlperf.training.checkpoints import Checkpointer, saved_run_seed
from sd_mlperf.training.eval_checkpoints import EVAL_CHECKPOINT_DIR, STOP_FILE, EvalCheckpointWriter
from sd_mlperf.training.metrics import Hardware, Progress
from sd_mlperf.training.mlperf_log import TRAINING_LOG_FILE, MLPerfLogger, page_cache_cleared, training_log_path
from sd_mlperf.training.trainer import UNBOUNDED_STEPS, EvaluatorLike, Trainer, TrainPlan
from sd_mlperf.utils.dist_info import DistInfo
from sd_mlperf.utils.files import atomic_write_text
from sd_mlperf.utils.logging import log_once, logger
from sd_mlperf.utils.tensorboard import build_tensorboard_sink


def plan_from_config(cfg: Config) -> TrainPlan:
    """The loop's numbers: block length from the MLPerf cadence, the stop step from max_steps/max_samples."""
    tr, gbs = cfg.training, global_batch_size(cfg)
    limits = [UNBOUNDED_STEPS]
    if tr.max_steps is not None:
        limits.append(tr.max_steps)
    if tr.max_samples is not None:
        limits.append(math.ceil(tr.max_samples / gbs))
    return TrainPlan(global_batch_size=gbs, grad_accumulation_steps=tr.grad_accumulation_steps,
                     steps_per_block=steps_between_checkpoints(cfg), max_steps=min(limits),
                     log_interval_steps=cfg.logging.interval_steps, num_timesteps=cfg.diffusion.num_timesteps,
                     loss_scaling=uses_loss_scaling(tr.precision), precision=tr.precision, target_fid=tr.target_fid,
                     target_clip=tr.target_clip, stop_at_target=tr.stop_at_target, seed=cfg.run.seed,
                     save_resumable=cfg.checkpoint.resumable, target_toy=dict(tr.target_toy))


def _mean_over_ranks(world_size: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if world_size == 1:
        return None

    def reduce_mean(t: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(t)  # SUM then divide: gloo has no AVG
        return t / world_size

    return reduce_mean


def _device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return generator
    # Noise is drawn where it is used; seed the device generator from this rank's stream.
    seeded = torch.Generator(device=device)
    seeded.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator).item()))
    return seeded


class FromConfig(enum.Enum):
    """Marks a part that `build_trainer` builds from the config, as opposed to a given object (or None)."""

    FROM_CONFIG = enum.auto()


FROM_CONFIG = FromConfig.FROM_CONFIG
"""build_trainer's default `evaluator`: the configured one (eval.inline), built here."""


@dataclass(frozen=True)
class RunStart:
    """What `_start_run` settled before any part exists."""

    cfg: Config
    """The config with run.seed fixed (given, drawn, or the resumed checkpoint's)."""
    run_dir: Path
    plan: TrainPlan
    checkpointer: Checkpointer
    resume_from: Path | None
    """The checkpoint training.resume picked, or None for a fresh run."""
    mlperf: MLPerfLogger
    """Its init events (cache_clear, init_start, submission, hyperparameters) are written."""


def build_trainer(cfg: Config, dist: DistInfo, *, evaluator: EvaluatorLike | None | FromConfig = FROM_CONFIG,
                  data: tuple[Iterable[dict], Callable[..., Any]] | None = None,
                  init_time_ms: int | None = None) -> Trainer:
    """Build every part from the config (MLPerf init events included), then resume per training.resume and warm up.

    `evaluator` replaces the configured one (any object with `evaluate`, or None for no evaluator); `data` =
    (loader, conditioner) replaces the configured data pipeline. Both exist for tests and tools. A null run.seed
    is drawn here (or taken from the checkpoint a run resumes); `trainer.plan.seed` holds the one used. A run on
    the synthetic dataset needs its files first: sd_mlperf.training.smoke_assets.prepare_smoke_assets.
    """
    run = _start_run(cfg, dist, init_time_ms)
    trainer = _build_parts(run, dist, evaluator=evaluator, data=data)
    _resume_and_warm_up(trainer, run.resume_from)
    return trainer


def _start_run(cfg: Config, dist: DistInfo, init_time_ms: int | None) -> RunStart:
    """The run directory, the checkpoint to resume, the run seed and plan, the MLPerf init events, config.yaml."""
    run_dir = run_directory(cfg)
    checkpointer = Checkpointer(cfg.checkpoint, run_dir, rank=dist.rank, world_size=dist.world_size,
                                barrier=torch.distributed.barrier if dist.world_size > 1 else None)
    checkpointer.recover()
    if dist.world_size > 1:
        torch.distributed.barrier()  # rank 0 recovered what a kill left before any rank looks for checkpoints
    resume_from = agree_on_resume(checkpointer.resolve(cfg.training.resume), dist)
    check_fresh_run_dir(cfg, run_dir, resume_from)
    if dist.world_size > 1:
        torch.distributed.barrier()  # every rank has looked at the run directory before rank 0 writes into it
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=_run_seed(cfg, dist, resume_from)))
    plan = plan_from_config(cfg)
    if dist.is_main and resume_from is None and (run_dir / STOP_FILE).exists():
        logger.warning("removing %s left by an earlier run: this run starts fresh", run_dir / STOP_FILE)
        (run_dir / STOP_FILE).unlink()
    mlperf = MLPerfLogger(training_log_path(cfg, run_dir), enabled=dist.is_main)
    cleared = page_cache_cleared()
    if not cleared and dist.is_main:
        log_once("cache-not-cleared", "the launcher did not drop the page cache before this run (the MLPerf rules "
                 "require it for a timed run): cache_clear is logged false. slurm/run_and_time.sh drops it where "
                 "permitted and sets SD_MLPERF_CACHE_CLEARED=1; elsewhere run `sync; echo 3 > "
                 "/proc/sys/vm/drop_caches` as root on every node and set that variable.")
    mlperf.init_start(init_time_ms, cache_cleared=cleared)
    mlperf.submission(cfg)
    mlperf.hyperparameters(cfg, global_batch_size=plan.global_batch_size)
    if dist.is_main:
        save_resolved_config(cfg, run_dir)
    return RunStart(cfg=cfg, run_dir=run_dir, plan=plan, checkpointer=checkpointer, resume_from=resume_from,
                    mlperf=mlperf)


def _build_parts(run: RunStart, dist: DistInfo, *, evaluator: EvaluatorLike | None | FromConfig,
                 data: tuple[Iterable[dict], Callable[..., Any]] | None) -> Trainer:
    """UNet, data, data parallelism + optimizer, evaluator, step and progress writers, held by a new Trainer."""
    from sd_mlperf.models.unet import build_unet
    from sd_mlperf.parallel.data_parallel import apply_data_parallel
    from sd_mlperf.parallel.distributed import seed_everything
    from sd_mlperf.parallel.optimizer import LRSchedule
    from sd_mlperf.training.step import build_train_step

    cfg, plan, run_dir = run.cfg, run.plan, run.run_dir
    hardware = progress_hardware(cfg, dist)
    torch.manual_seed(cfg.run.seed)  # the same UNet init on every rank, whatever the backend
    # The UNet computes in training.precision, and in eval.precision when the inline evaluator runs it.
    unet = build_unet(cfg.model.unet, compute_precisions=training_precisions(cfg))
    generator = _device_generator(seed_everything(cfg.run.seed, dist.rank), dist.device)
    build_eval = evaluator is FROM_CONFIG and cfg.eval.inline
    vae, text_encoder = _build_frozen(cfg, dist) if (data is None or build_eval) else (None, None)
    loader, conditioner = data if data is not None else _build_data(cfg, dist, vae, text_encoder)
    dp = apply_data_parallel(unet, cfg, dist)
    _record_backends(cfg, dist, run_dir, [*unet.backend_resolutions, dp.resolution])
    if evaluator is FROM_CONFIG:
        evaluator = _build_evaluator(cfg, dist, vae, text_encoder, run_dir) if cfg.eval.inline else None
    lr_schedule = LRSchedule(cfg.optim, plan.global_batch_size)
    optimizer_step = build_train_step(cfg, dp, conditioner=conditioner, lr_schedule=lr_schedule,
                                      generator=generator, device=dist.device)
    # TensorBoard (rank 0): the same records as metrics.jsonl, and the grids the inline evaluator writes to RUN/eval.
    sinks = [build_tensorboard_sink(run_dir, run_dir / "eval")] if cfg.logging.tensorboard and dist.is_main else []
    return Trainer(
        plan=plan, dp=dp, optimizer_step=optimizer_step, loader=loader, lr_schedule=lr_schedule, generator=generator,
        checkpointer=run.checkpointer, mlperf=run.mlperf, evaluator=evaluator,
        reduce_mean=_mean_over_ranks(dist.world_size), run_dir=run_dir,
        collector=None if cfg.eval.inline else EvalCheckpointWriter(run_dir, enabled=dist.is_main),
        progress=Progress(cfg.logging, run_dir, enabled=dist.is_main, global_batch_size=plan.global_batch_size,
                          total_steps=plan.max_steps if plan.max_steps < UNBOUNDED_STEPS else None, hardware=hardware,
                          sinks=sinks))


def _resume_and_warm_up(trainer: Trainer, resume_from: Path | None) -> None:
    """Restore the checkpoint (or log the fresh start), then warm the step up."""
    if resume_from is not None:
        trainer.restore(resume_from)
    else:
        trainer.progress.log_start()
    # After resume (loading optimizer state replaces its tensors; a graph must record the final ones) and
    # before run_start (fit): warmup on synthetic inputs, changing no weights, as the MLPerf rules allow.
    trainer.optimizer_step.warm_up()


def _record_backends(cfg: Config, dist: DistInfo, run_dir: Path, resolutions: list[Resolution]) -> None:
    """resolved_backends.yaml (rank 0), the one startup line naming it, and the closed division's slow-twin warning."""
    path = run_dir / "resolved_backends.yaml"
    if dist.is_main:
        atomic_write_text(path, yaml.safe_dump(resolutions_to_dict(resolutions)))
    log_resolutions(resolutions, details=path)
    _warn_slow_twins(cfg, dist, resolutions)


def progress_hardware(cfg: Config, dist: DistInfo) -> Hardware:
    """What the progress line needs for per-GPU img/s, MFU and peak memory, derived once here.

    Rank 0 (the one that logs) counts the UNet's training FLOPs per image on the meta device (under a second for
    the SD2 UNet); MFU is against the dense 16-bit peak of the GPU (n/a on the CPU, unknown GPUs and fp32).
    """
    from sd_mlperf.models.flops import peak_tflops, unet_train_flops

    cuda = dist.device.type == "cuda"
    flops = None
    if dist.is_main:
        flops = float(unet_train_flops(cfg.model.unet, latent_size=latent_size(cfg),
                                       context_length=cfg.model.text_encoder.context_length))
    peak = peak_tflops(torch.cuda.get_device_name(dist.device), cfg.training.precision) if cuda else None
    return Hardware(world_size=dist.world_size, unit="GPU" if cuda else "rank", flop_per_image=flops,
                    peak_flop_per_s=peak * 1e12 if peak else None, memory_device=dist.device if cuda else None)


def _warn_slow_twins(cfg: Config, dist: DistInfo, resolutions: list[Resolution]) -> None:
    """A benchmark run (closed division) on a GPU says at start which roles fell back to a plain-PyTorch twin."""
    slow = fallbacks(resolutions)
    if dist.is_main and dist.device.type == "cuda" and cfg.run.division == "closed" and slow:
        logger.warning("this benchmark run uses slower twins: %s. `sd-mlperf backends --fast --config ...` checks "
                       "a config on this machine.", "; ".join(f"{r.key}={r.name} ({r.why})" for r in slow))


def check_fresh_run_dir(cfg: Config, run_dir: Path, resume_from: Path | None = None) -> None:
    """One run per directory: a fresh run never starts where another run left its log, index or checkpoints.

    Any division: a run that starts fresh (training.resume=never, or auto with no checkpoint to resume) in such a
    directory would append to the earlier run's eval_checkpoints/index.jsonl and mix their scores. The closed
    division also refuses auto with a checkpoint: a relaunch with a reused run name would resume silently, which
    is not a valid timed run. A resume asked for by path continues that run (its log is marked resumed).
    """
    resume = cfg.training.resume
    if resume not in ("auto", "never") or (resume == "auto" and resume_from is not None
                                           and cfg.run.division != "closed"):
        return
    names = (cfg.logging.mlperf_log_file, TRAINING_LOG_FILE, "checkpoints", EVAL_CHECKPOINT_DIR)
    earlier = [str(run_dir / n) for n in names if (run_dir / n).exists()]
    if earlier:
        raise ValueError(
            f"run directory {run_dir} already holds an earlier run ({', '.join(earlier)}); a run directory holds one "
            f"run (training.resume={resume} would start a new one there and mix their logs and scores): set run.name "
            "to a new name (slurm/sbatch.sh --num-runs names them for you), or remove that directory. To continue "
            "the earlier run instead, set training.resume to one of its checkpoints (RUN/checkpoints/step_XXXXXXX); "
            "its log is then marked resumed and `sd-mlperf package` refuses it for a timed result.")


def _run_seed(cfg: Config, dist: DistInfo, resume_from: Path | None) -> int:
    """run.seed, else the resumed checkpoint's, else rank 0's draw from the OS (every rank gets the same)."""
    saved = saved_run_seed(resume_from) if resume_from is not None else None
    if saved is not None and cfg.run.seed is None:
        logger.info("run.seed is null: the resumed run keeps its seed %d", saved)
        return saved
    if saved is not None and saved != cfg.run.seed:
        logger.warning("run.seed=%d differs from the seed %d of the resumed checkpoint %s; using %d", cfg.run.seed,
                       saved, resume_from, cfg.run.seed)
    return agree_on_seed(cfg.run.seed, dist)


def _build_frozen(cfg: Config, dist: DistInfo) -> tuple[Any, Any]:
    from sd_mlperf.models.checkpoint_io import build_frozen_encoders

    # One hash per node: a bad file fails local rank 0, and the launcher then stops the job.
    vae, text_encoder = build_frozen_encoders(cfg.model, verify_sha256=dist.local_rank == 0)
    return vae.to(dist.device).eval(), text_encoder.to(dist.device).eval()


def _build_data(cfg: Config, dist: DistInfo, vae: Any, text_encoder: Any) -> tuple[Iterable[dict], Callable[..., Any]]:
    from sd_mlperf.data.conditioning import build_batch_conditioner
    from sd_mlperf.data.laion import build_train_loader

    loader = build_train_loader(cfg.data, micro_batch_size=cfg.training.micro_batch_size, rank=dist.rank,
                                world_size=dist.world_size, seed=cfg.run.seed, latent_size=latent_size(cfg))
    return loader, build_batch_conditioner(cfg, vae, text_encoder)


def _build_evaluator(cfg: Config, dist: DistInfo, vae: Any, text_encoder: Any, run_dir: Path) -> EvaluatorLike:
    from sd_mlperf.eval.evaluator import build_evaluator

    return build_evaluator(cfg, vae=vae, text_encoder=text_encoder, rank=dist.rank, world_size=dist.world_size,
                           device=dist.device, run_dir=run_dir)
