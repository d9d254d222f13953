"""`sd-mlperf bench train`: images/s, ms/step, TFLOP/s and MFU of the UNet training step.

What is timed is the trainer's own step object (`sd_mlperf.training.step.build_train_step`: eager, or
one CUDA graph replay with training.cuda_graph) at the peak lr, minus data loading: its conditioner
hands over ready synthetic latents and context of the configured shapes (`synthetic_step_inputs`),
so the latent draw from VAE moments and any text encoding are not timed. Inside the step: timesteps
and noise from the step's device generator, noisy latents and v-target, forward under autocast,
v-loss, backward, gradient sync and the loss-scaled fused AdamW step of the data-parallel backend.
The bench runs one process (world size 1), so no gradient reduce happens; multi-GPU scaling is not
measured here.

Each variant (the config itself, or the config plus dotted overrides) builds a fresh UNet and
optimizer, lets the step prepare itself as the trainer does (`warm_up()`: the graph capture), runs
`warmup_steps` untimed steps that change no weights (training.cuda_graph.TrainingStateSnapshot),
then times each of `steps` steps (CUDA events on the GPU) and reports medians. Model FLOPs per image
are counted on the real model (models/flops.py); MFU is against the dense 16-bit peak of the device.
"""

from __future__ import annotations

import contextlib
import gc
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sd_mlperf.backends import BackendUnavailable, attention_unsuitable, backend_names, resolve_backend
from sd_mlperf.bench import bench_seed
from sd_mlperf.bench.table import add_ratios
from sd_mlperf.config.load import latent_size, load_config
from sd_mlperf.config.schema import Config
from sd_mlperf.parallel.distributed import configure_device, pick_device
from sd_mlperf.training.step import synthetic_step_inputs
from sd_mlperf.utils.logging import logger

# The bench is one process: these are appended to every variant's overrides.
SINGLE_PROCESS = ("parallel.num_nodes=1", "parallel.gpus_per_node=1", "training.grad_accumulation_steps=1")
COMPARE_GROUPS = ("attention", "norm", "channels_last", "compile", "cuda_graph", "precision")
COLUMNS = ("variant", "device", "precision", "attention", "norm", "channels_last", "compile", "cuda_graph", "batch",
           "latent", "ms_per_step", "ms_min", "images_per_s", "speedup", "tflop_per_image", "tflop_per_s", "mfu",
           "peak_mem_gib", "loss", "status")
"""Column order of the train table (`speedup` is images/s relative to the first row)."""


@dataclass(frozen=True)
class Variant:
    """A named set of dotted overrides applied on top of the bench's config."""

    name: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainBenchSettings:
    """How long to measure."""

    steps: int = 20
    warmup_steps: int = 5
    """Untimed steps after the step's own warm_up() (which captures the graph with training.cuda_graph)."""


def parse_variant(spec: str) -> Variant:
    """`NAME: key=value key=value` (overrides separated by spaces) -> Variant."""
    name, sep, rest = spec.partition(":")
    if not sep or not name.strip():
        raise ValueError(f"--variant {spec!r}: expected 'NAME: key=value ...', e.g. 'graph: training.cuda_graph=true'")
    overrides = tuple(rest.split())
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"--variant {spec!r}: {bad} are not dotted key=value overrides")
    return Variant(name.strip(), overrides)


def device_name(device: torch.device) -> str:
    """A short name for the table: the GPU's name, or the CPU with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()} x{torch.get_num_threads()}"


def compare_variants(cfg: Config, groups: Sequence[str] = COMPARE_GROUPS) -> list[Variant]:
    """One-at-a-time alternatives to `cfg` for `--compare`: each flips a single fast-path choice of the config."""
    unknown = sorted(set(groups) - set(COMPARE_GROUPS))
    if unknown:
        raise ValueError(f"--compare: unknown group(s) {unknown}; choose from {', '.join(COMPARE_GROUPS)}")
    u, tr = cfg.model.unet, cfg.training
    variants: list[Variant] = []
    if "attention" in groups:
        chosen = resolve_backend("attention", u.attention_backend).name
        # te computes in fp16/bf16 only: in an fp32 config its row would be a config error, not a measurement.
        unsuitable = attention_unsuitable({"training.precision": tr.precision})
        variants += [Variant(f"attention={n}", (f"model.unet.attention_backend={n}",))
                     for n in backend_names("attention") if n != chosen and n not in unsuitable]
    if "norm" in groups:
        chosen = resolve_backend("norm", u.norm_backend).name
        # apex's kernel reads NHWC only, so its variant turns channels-last on as well.
        variants += [Variant(f"norm={n}", (f"model.unet.norm_backend={n}",)
                             + (("model.unet.channels_last=true",) if n == "apex" else ()))
                     for n in backend_names("norm") if n != chosen]
    for group, key, value in (("channels_last", "model.unet.channels_last", u.channels_last),
                              ("compile", "model.unet.compile", u.compile),
                              ("cuda_graph", "training.cuda_graph", tr.cuda_graph)):
        if group in groups:
            variants.append(Variant(f"{group}={str(not value).lower()}", (f"{key}={str(not value).lower()}",)))
    if "precision" in groups:
        others = ("bf16", "fp32") if pick_device(cfg.run.device).type == "cpu" else ("fp16", "bf16")
        variants += [Variant(f"precision={p}", (f"training.precision={p}",)) for p in others if p != tr.precision]
    return variants


def synthetic_batch(cfg: Config, device: torch.device) -> dict[str, torch.Tensor]:
    """z0 (B, C, H/f, W/f) and context (B, L, D) of the configured shapes: what the step's conditioner returns."""
    return synthetic_step_inputs(cfg, device)


def _ready_batch(batch: dict[str, torch.Tensor], *, generator: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # The bench's conditioner: the batch already holds z0 and the context (data loading is not timed).
    return batch["z0"], batch["context"]


def time_steps(runner: Callable[[dict[str, torch.Tensor]], Any], batch: dict[str, torch.Tensor], steps: int,
               device: torch.device) -> tuple[list[float], Any]:
    """Seconds of each of `steps` calls (CUDA events on the GPU, wall clock on the CPU) and the last output."""
    out = None
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            out = runner(batch)
            end.record()
        torch.cuda.synchronize(device)  # host sync: once, after all timed steps
        return [start.elapsed_time(end) / 1e3 for start, end in events], out
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = runner(batch)
        times.append(time.perf_counter() - t0)
    return times, out


class _FlopCache:
    """Model FLOPs per trained image, counted once per UNet shape."""

    def __init__(self) -> None:
        self._cache: dict[str, float] = {}

    def per_image(self, cfg: Config) -> float:
        from sd_mlperf.models.flops import flop_config, unet_train_flops

        key = repr((flop_config(cfg.model.unet), latent_size(cfg), cfg.model.text_encoder.context_length))
        if key not in self._cache:
            self._cache[key] = float(unet_train_flops(cfg.model.unet, latent_size=latent_size(cfg),
                                                      context_length=cfg.model.text_encoder.context_length))
        return self._cache[key]


def build_runner(cfg: Config, device: torch.device, batch: dict[str, torch.Tensor], warmup_steps: int,
                 unet: torch.nn.Module | None = None) -> tuple[Any, Any, Callable]:
    """UNet (fast path applied), data-parallel wrapper with its optimizer, and the warmed-up step runner.

    The runner calls the trainer's step (`build_train_step`, prepared with `warm_up()` as the trainer
    does) on a `synthetic_batch` at the peak lr; `warmup_steps` untimed calls change no weights,
    optimizer or scaler state, or RNG position. `unet` replaces our UNet with another model of the
    same forward signature (the diffusers comparison); it must already live on `device`.
    """
    from sd_mlperf.backends import compile_available
    from sd_mlperf.config.load import global_batch_size
    from sd_mlperf.models.unet import build_unet
    from sd_mlperf.parallel.data_parallel import apply_data_parallel
    from sd_mlperf.parallel.optimizer import LRSchedule
    from sd_mlperf.training.cuda_graph import TrainingStateSnapshot, tensor_attributes
    from sd_mlperf.training.step import build_train_step
    from sd_mlperf.utils.dist_info import DistInfo

    if cfg.training.cuda_graph and device.type != "cuda":
        raise BackendUnavailable("training.cuda_graph=true needs a CUDA device")
    if cfg.model.unet.compile:
        ok, why = compile_available(device)
        if not ok:
            raise BackendUnavailable(why)
    if unet is None:
        with torch.device(device):  # initialise the weights where they will live
            unet = build_unet(cfg.model.unet,  # applies channels-last and compile from the config
                              compute_precisions={"training.precision": cfg.training.precision})
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device, backend="none")
    dp = apply_data_parallel(unet, cfg, dist)
    lr_schedule = LRSchedule(cfg.optim, global_batch_size(cfg))
    generator = torch.Generator(device=device).manual_seed(bench_seed(cfg))  # draws where they are used
    step = build_train_step(cfg, dp, conditioner=_ready_batch, lr_schedule=lr_schedule, generator=generator,
                            device=device)
    step.warm_up()  # as build_trainer does: the graph capture (training.cuda_graph), else nothing
    peak_step = lr_schedule.first_peak_step()

    def runner(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return step([b], peak_step)

    if warmup_steps > 0:
        scaler = getattr(dp, "scaler", None)  # the torch backend's; megatron keeps its own
        optimizer = getattr(dp, "local_optimizer", dp.optimizer)
        extra = [*(tensor_attributes(scaler) if scaler is not None else ()), *getattr(dp, "master_params", [])]
        with TrainingStateSnapshot(unet, optimizer, extra, [generator]):
            for _ in range(warmup_steps):
                runner(batch)
    return unet, dp, runner


def describe(cfg: Config, device: torch.device) -> dict[str, Any]:
    """The configuration columns of a row (attention/norm as requested until a build resolves them)."""
    u, tr = cfg.model.unet, cfg.training
    return {"device": device_name(device), "precision": tr.precision, "attention": u.attention_backend,
            "norm": u.norm_backend, "channels_last": u.channels_last, "compile": u.compile,
            "cuda_graph": tr.cuda_graph, "batch": tr.micro_batch_size, "latent": latent_size(cfg)}


def measure(cfg: Config, device: torch.device, settings: TrainBenchSettings, flops: _FlopCache) -> dict[str, Any]:
    """The measured columns of a row: build, warm up, time `settings.steps` steps of `cfg` on `device`."""
    from sd_mlperf.models.flops import peak_tflops

    tr = cfg.training
    row: dict[str, Any] = {}
    torch.manual_seed(bench_seed(cfg))
    batch = synthetic_batch(cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    unet, dp, runner = build_runner(cfg, device, batch, settings.warmup_steps)
    chosen = {r.role: r.name for r in unet.backend_resolutions}
    row["attention"], row["norm"] = chosen["attention"], chosen["norm"]
    times, out = time_steps(runner, batch, settings.steps, device)
    loss = float(out["loss"])  # host sync, after timing
    seconds = statistics.median(times)
    images_per_s = tr.micro_batch_size / seconds
    flop_per_image = flops.per_image(cfg)
    tflop_per_s = flop_per_image * images_per_s / 1e12
    peak = peak_tflops(device_name(device), tr.precision)
    row.update({
        "ms_per_step": seconds * 1e3,
        "ms_min": min(times) * 1e3,
        "images_per_s": images_per_s,
        "tflop_per_image": flop_per_image / 1e12,
        "tflop_per_s": tflop_per_s,
        "mfu": tflop_per_s / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "loss": loss,
        "status": "ok" if math.isfinite(loss) else "failed: non-finite loss",
    })
    return row


@contextlib.contextmanager
def threads_as_configured(cfg: Config) -> Iterator[None]:
    """CPU intra-op threads as training uses them (run.num_threads, as train.py sets it); restored on exit."""
    before = torch.get_num_threads()
    if cfg.run.num_threads is not None:
        torch.set_num_threads(cfg.run.num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def error_status(exc: BaseException, *, skip: bool = False, limit: int = 200) -> str:
    """A bench row's status for an error, on one line: `skipped: why` where the caller knows it is an expected,
    named condition (a backend this machine lacks, a kernel refusing the inputs), else `failed: out of memory` or
    `failed: Type: why` (a failed row makes `sd-mlperf bench` exit 1)."""
    why = " ".join(str(exc).split())[:limit]
    if skip:
        return "skipped: " + why
    if isinstance(exc, torch.OutOfMemoryError):
        return "failed: out of memory"
    return f"failed: {type(exc).__name__}: {why}"


def _release(device: torch.device, compiled: bool) -> None:
    gc.collect()
    if compiled:
        torch._dynamo.reset()  # each variant compiles a fresh model; do not pile up guards
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_train(config_files: Sequence[str], overrides: Sequence[str], variants: Sequence[Variant],
                settings: TrainBenchSettings | None = None) -> list[dict[str, Any]]:
    """Measure each variant in this process; each row's status is `ok`, `skipped: why` or `failed: why`.

    Only a backend this machine lacks (BackendUnavailable) skips a variant. Any other error (CUDA error,
    out of memory, graph capture, a bad override) is that variant's failure: its traceback is logged and
    the remaining variants still run.
    """
    settings = settings or TrainBenchSettings()
    flops = _FlopCache()
    rows: list[dict[str, Any]] = []
    for variant in variants:
        cfg = load_config(config_files, [*overrides, *variant.overrides, *SINGLE_PROCESS])
        device = pick_device(cfg.run.device)  # one process: GPU 0 of those visible
        configure_device(device)
        logger.info("bench train: %s (%s)", variant.name, " ".join(variant.overrides) or "as configured")
        with threads_as_configured(cfg):
            row = {"variant": variant.name, **describe(cfg, device)}
            try:
                row.update(measure(cfg, device, settings, flops))
            except BackendUnavailable as exc:  # a backend (or CUDA, for graphs) this machine lacks
                row["status"] = error_status(exc, skip=True)
                logger.warning("bench train: %s %s", variant.name, row["status"])
            except Exception as exc:  # anything else is a failure of this variant, with its traceback
                row["status"] = error_status(exc)
                logger.error("bench train: %s %s", variant.name, row["status"], exc_info=exc)
        rows.append(row)
        _release(device, cfg.model.unet.compile)
    return add_ratios(rows, "images_per_s", name="speedup")
