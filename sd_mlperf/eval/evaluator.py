"""The evaluator: prompts -> DDIM with guidance -> VAE decode -> FID Inception + CLIP -> FID and CLIP score.

Every rank generates its contiguous block of prompts (sd_mlperf.eval.distributed); features and
scores are gathered in prompt order, so the metrics are the same on every rank and for any world
size. Prompt i always starts from the noise of (evaluation seed, i), the evaluation seed deriving from
the run's logged seed (config.load.evaluation_seed). Rank 0 writes a PNG grid of the first
eval.num_grid_images prompts with their captions and a JSON with the metrics and timings under
`run_dir/eval/`. The trainer logs the MLPerf eval_* events; the evaluator does not.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from sd_mlperf.config.load import evaluation_seed, vae_downsample_factor
from sd_mlperf.config.schema import Config, EvalConfig
from sd_mlperf.data.coco import Prompt
from sd_mlperf.diffusion.ddim import DDIMSchedule, PromptNoise, ddim_sample, make_ddim_schedule
from sd_mlperf.eval.clip_score import ClipScorer
from sd_mlperf.eval.distributed import block_counts, gather_rows, main_rank_result, shard_indices
from sd_mlperf.eval.inception import FEATURE_DIM
from sd_mlperf.eval.metrics import FrechetReference, mean_clip_score
from sd_mlperf.models.precision import autocast
from sd_mlperf.utils.files import atomic_write_text
from sd_mlperf.utils.logging import logger, show_progress_bar


@dataclass
class EvalResult:
    """Metrics of one evaluation (identical on every rank) and where rank 0 wrote its outputs."""

    fid: float
    clip: float
    num_images: int
    seconds: float
    grid_path: Path | None = None
    json_path: Path | None = None
    step: int = 0
    samples_count: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)
    """Seconds of this rank's generation (sampling + decode), inception, clip, and gather/metrics."""
    extra: dict[str, float] = field(default_factory=dict)
    """Metrics beside FID and CLIP: the toy metrics of synthetic runs (sd_mlperf.eval.toy_metrics), else none."""


class ExtraMetrics(Protocol):
    """Metrics beside FID and CLIP, chosen when the evaluator is built (toy_metrics.ToyMetrics or NoExtraMetrics)."""

    width: int
    """Columns per picture that `rows` returns."""

    def rows(self, images_BCHW: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        """(B, width) per-picture values of float [0, 1] pictures of the given prompt indices."""
        ...

    def summarise(self, rows: torch.Tensor) -> dict[str, float]:
        """The metrics, from the rows of every evaluated picture."""
        ...


@dataclass(frozen=True)
class _Timer:
    device: torch.device
    totals: dict[str, float]

    def lap(self, name: str, since: float) -> float:
        if self.device.type == "cuda":  # time the GPU work, not the launch
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.totals[name] = self.totals.get(name, 0.0) + now - since
        return now


@torch.no_grad()
def encode_prompts(text_encoder: nn.Module, captions: list[str], precision: str,
                   device: torch.device) -> torch.Tensor:
    """Cross-attention context (B, 77, D) of captions, under the evaluation's autocast."""
    with autocast(precision, device):
        return text_encoder.encode(captions).to(device)


@torch.no_grad()
def generate_images(unet: Callable, captions: list[str], indices: Sequence[int], *, cfg: EvalConfig,
                    noise_seed: int, schedule: DDIMSchedule, uncond: torch.Tensor, text_encoder: nn.Module,
                    vae: nn.Module, scale_factor: float, latent_shape: tuple[int, int, int],
                    device: torch.device) -> torch.Tensor:
    """Prompts -> DDIM with guidance -> VAE decode -> clamp((x + 1) / 2, 0, 1): float32 images (B, 3, H, W)."""
    cond = encode_prompts(text_encoder, captions, cfg.precision, device)
    noise = PromptNoise(noise_seed, indices)  # prompt i always starts from the noise of (seed, i)
    x_T = noise.draw(latent_shape, device)
    z = ddim_sample(unet, x_T, cond, uncond, schedule, guidance_scale=cfg.guidance_scale, noise=noise,
                    precision=cfg.precision)
    with autocast(cfg.precision, device):
        x = vae.decode((1.0 / scale_factor) * z)  # the reference: 1 / scale_factor * z
    return torch.clamp((x.float() + 1.0) / 2.0, min=0.0, max=1.0)


class Evaluator:
    """Scores a UNet on the validation prompts; every rank must call `evaluate` together."""

    def __init__(self, cfg: EvalConfig, *, schedule: DDIMSchedule, prompts: Sequence[Prompt], frechet: FrechetReference,
                 vae: nn.Module, scale_factor: float, text_encoder: nn.Module, inception: nn.Module,
                 clip_scorer: ClipScorer, latent_shape: tuple[int, int, int], rank: int, world_size: int,
                 device: torch.device, out_dir: Path, noise_seed: int, progress_bar: bool = False,
                 extra_metrics: ExtraMetrics | None = None) -> None:
        from sd_mlperf.eval.toy_metrics import NoExtraMetrics

        self.cfg = cfg
        self.extra_metrics = extra_metrics or NoExtraMetrics()
        self.noise_seed = noise_seed
        self.schedule = schedule
        self.prompts = list(prompts)
        self.frechet = frechet
        self.vae, self.scale_factor, self.text_encoder = vae, scale_factor, text_encoder
        self.inception, self.clip_scorer = inception, clip_scorer
        self.latent_shape = latent_shape
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.out_dir = out_dir
        self.progress_bar = progress_bar
        self.local = shard_indices(len(self.prompts), rank, world_size, cfg.batch_size)
        self.park_device = torch.device("cpu") if self.device.type == "cuda" else self.device
        self._metric_models_to(self.park_device)
        self._uncond: torch.Tensor | None = None
        self._clip_text: dict[int, torch.Tensor] = {}  # batch start -> the frozen CLIP's caption features

    def _metric_models_to(self, device: torch.device) -> None:
        # On a GPU the FID Inception and CLIP (about 4 GB for ViT-H-14 in fp32) wait in host memory between
        # evaluations, leaving the memory to training; moving them takes well under a second.
        self.inception.to(device)
        self.clip_scorer.model.to(device)

    def _generate_and_score(self, unet: Callable, timer: _Timer) -> tuple[list, list, list]:
        feats, scores, grid = [], [], []
        bar = self._progress()
        bs = self.cfg.batch_size
        for lo in range(0, len(self.local), bs):
            indices = list(self.local[lo: lo + bs])
            t = time.perf_counter()
            images = self.generate(unet, indices)
            t = timer.lap("generation", t)
            with autocast(self.cfg.precision, self.device):
                feats.append(self.inception(images).float())
            t = timer.lap("inception", t)
            if lo not in self._clip_text:  # captions are fixed: encode each batch's once per run
                self._clip_text[lo] = self.clip_scorer.text_features([self.prompts[i].caption for i in indices])
            clip = self.clip_scorer.scores(images, self._clip_text[lo]).float()
            t = timer.lap("clip", t)
            # One row per picture: CLIP score, then the extra metrics' columns (gathered together).
            scores.append(torch.cat([clip[:, None], self.extra_metrics.rows(images, indices).to(clip)], dim=1))
            timer.lap("extra_metrics", t)
            keep = [j for j, i in enumerate(indices) if i < self.cfg.num_grid_images]
            if keep:
                grid.append(images[keep].mul(255).to(torch.uint8))
            if bar is not None:  # the ranks run their blocks at the same pace: rank 0's count x world size
                bar.update(min(len(indices) * self.world_size, bar.total - bar.n))
        if bar is not None:
            bar.close()
        return feats, scores, grid

    def generate(self, unet: Callable, indices: Sequence[int]) -> torch.Tensor:
        """Float [0, 1] images (B, 3, H, W), fp32, for the given prompt indices."""
        if self._uncond is None:
            self._uncond = encode_prompts(self.text_encoder, [""], self.cfg.precision, self.device)
        captions = [self.prompts[i].caption for i in indices]
        return generate_images(unet, captions, indices, cfg=self.cfg, noise_seed=self.noise_seed,
                               schedule=self.schedule, uncond=self._uncond, text_encoder=self.text_encoder,
                               vae=self.vae, scale_factor=self.scale_factor,
                               latent_shape=self.latent_shape, device=self.device)

    # -- the whole evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, unet: Callable, *, samples_count: int, step: int, out_dir: Path | None = None) -> EvalResult:
        """Generate the images of this rank's prompts, gather, and compute FID and CLIP (all ranks).

        `out_dir` is where rank 0 writes this evaluation's grid and JSON (default: the evaluator's `out_dir`), so one
        evaluator scores checkpoints of several runs into each run's own directory.
        """
        out_dir = self.out_dir if out_dir is None else Path(out_dir)
        start = time.perf_counter()
        module = unet if isinstance(unet, nn.Module) else None
        was_training = bool(module is not None and module.training)
        timer = _Timer(self.device, {})
        try:
            if module is not None:
                module.eval()
            self._metric_models_to(self.device)
            feats, scores, grid = self._generate_and_score(unet, timer)
        finally:
            self._metric_models_to(self.park_device)
            if module is not None and was_training:
                module.train()
        t = time.perf_counter()
        result = self._finish(feats, scores, grid, samples_count, step, out_dir)
        timer.lap("gather_and_metrics", t)
        result.seconds = time.perf_counter() - start
        result.timings_s = dict(timer.totals)
        if self.rank == 0:
            result.json_path = self._write_json(result, out_dir)
            logger.info("eval step %d: FID %.4f CLIP %.4f%s, %d images in %.1f s (%.2f img/s over %d rank(s))", step,
                        result.fid, result.clip, "".join(f" {k} {v:.4g}" for k, v in result.extra.items()),
                        result.num_images, result.seconds, result.num_images / max(result.seconds, 1e-9),
                        self.world_size)
        return result

    def _finish(self, feats: list, scores: list, grid: list, samples_count: int, step: int,
                out_dir: Path) -> EvalResult:
        n = len(self.prompts)
        counts = block_counts(n, self.world_size, self.cfg.batch_size)
        local_feats = torch.cat(feats) if feats else torch.zeros(0, FEATURE_DIM, device=self.device)
        width = 1 + self.extra_metrics.width
        local_scores = torch.cat(scores) if scores else torch.zeros(0, width, device=self.device)
        # Rows come back in prompt order whatever the world size; padding is trimmed before any use.
        all_feats = gather_rows(local_feats.contiguous(), counts, rank=self.rank).cpu()
        all_scores = gather_rows(local_scores.contiguous(), counts, rank=self.rank).cpu()
        def metrics() -> tuple[float, float, dict[str, float]]:
            return (self.frechet.distance(all_feats), mean_clip_score(all_scores[:, 0]),
                    self.extra_metrics.summarise(all_scores[:, 1:]))

        # One rank does the (CPU-heavy with sqrtm) linear algebra; the others wait (and raise if it failed).
        fid, clip, extra = main_rank_result(metrics, is_main=self.rank == 0)
        grid_counts = block_counts(n, self.world_size, self.cfg.batch_size, limit=self.cfg.num_grid_images)
        factor = vae_downsample_factor(self.vae.cfg) if hasattr(self.vae, "cfg") else 8  # 8: a stand-in VAE
        h, w = self.latent_shape[1] * factor, self.latent_shape[2] * factor
        local_grid = torch.cat(grid) if grid else torch.zeros(0, 3, h, w, dtype=torch.uint8, device=self.device)
        grid_images = gather_rows(local_grid.contiguous(), grid_counts, rank=self.rank).cpu()
        result = EvalResult(fid=fid, clip=clip, num_images=n, seconds=math.nan, step=step, samples_count=samples_count,
                            extra=extra)
        if self.rank == 0 and grid_images.shape[0] > 0:
            from sd_mlperf.eval.grid import save_grid

            captions = [self.prompts[i].caption for i in range(grid_images.shape[0])]
            result.grid_path = save_grid(out_dir / f"step_{step:07d}.png", grid_images, captions)
        return result

    def _write_json(self, result: EvalResult, out_dir: Path) -> Path:
        path = out_dir / f"step_{result.step:07d}.json"
        record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}
        record.update({"images_per_s": result.num_images / max(result.seconds, 1e-9), "world_size": self.world_size,
                       "ddim_steps": self.schedule.num_steps, "guidance_scale": self.cfg.guidance_scale,
                       "eta": self.cfg.eta, "seed": self.noise_seed, "precision": self.cfg.precision,
                       "prompts_file": self.cfg.prompts_file, "fid_stats": self.cfg.fid_stats,
                       "inception_weights": self.cfg.inception_weights, "clip_weights": self.cfg.clip_weights,
                       "time": time.time()})
        record["json_path"] = str(path)
        atomic_write_text(path, json.dumps(record, indent=2, allow_nan=True) + "\n")
        return path

    def _progress(self) -> Any:
        if not self.progress_bar or self.rank != 0:
            return None
        from tqdm import tqdm

        return tqdm(total=len(self.prompts), unit="img", desc=f"eval ({self.world_size} rank(s))", file=sys.stderr,
                    dynamic_ncols=True)


def build_evaluator(cfg: Config, *, vae: nn.Module, text_encoder: nn.Module, rank: int, world_size: int,
                    device: torch.device | str, run_dir: str | Path, out_subdir: str = "eval") -> Evaluator:
    """Load prompts, reference statistics, the FID Inception and CLIP; return the evaluator of this rank."""
    from sd_mlperf.data.coco import read_fid_stats, read_prompts
    from sd_mlperf.diffusion.schedule import make_alphas_cumprod
    from sd_mlperf.eval.clip_score import load_clip
    from sd_mlperf.eval.fid import require_fid_stats
    from sd_mlperf.eval.inception import load_fid_inception
    from sd_mlperf.eval.toy_metrics import build_extra_metrics

    e = cfg.eval
    device = torch.device(device)
    all_prompts = read_prompts(e.prompts_file)
    if len(all_prompts) < e.num_prompts:
        raise ValueError(f"invalid value for 'eval.num_prompts': {e.num_prompts}; {e.prompts_file} holds only "
                         f"{len(all_prompts)} prompts. Lower eval.num_prompts (or --num-prompts) or use the full file.")
    prompts = all_prompts[: e.num_prompts]
    if len(prompts) < 2:
        raise ValueError(f"invalid value for 'eval.num_prompts': {e.num_prompts}; FID needs at least 2 images")
    # Loaded into host memory: the evaluator moves them to `device` only while it evaluates.
    inception = load_fid_inception(e.inception_weights, "cpu")
    mu, sigma = read_fid_stats(require_fid_stats(e.fid_stats), FEATURE_DIM)
    clip = load_clip(e.clip_weights, tiny=e.clip_tiny, device="cpu")
    factor = vae_downsample_factor(cfg.model.vae)
    if cfg.data.image_size % factor:
        raise ValueError(f"invalid value for 'data.image_size': {cfg.data.image_size}; must be a multiple of {factor}")
    side = cfg.data.image_size // factor
    schedule = make_ddim_schedule(make_alphas_cumprod(cfg.diffusion), e.ddim_steps, e.eta)
    here = len(shard_indices(len(prompts), rank, world_size, e.batch_size))
    logger.info("evaluator: %d prompts over %d rank(s) (%d here), DDIM %d steps, guidance %g, eta %g, %s, %dx%d px",
                len(prompts), world_size, here, e.ddim_steps, e.guidance_scale, e.eta, e.precision,
                cfg.data.image_size, cfg.data.image_size)
    return Evaluator(e, schedule=schedule, prompts=prompts, frechet=FrechetReference(mu, sigma, method=e.fid_method,
                                                                                     device=device), vae=vae,
                     scale_factor=cfg.model.vae.scale_factor, text_encoder=text_encoder, inception=inception,
                     clip_scorer=ClipScorer(clip, device=device, precision=e.precision),
                     latent_shape=(cfg.model.vae.embed_dim, side, side), rank=rank, world_size=world_size,
                     device=device, out_dir=Path(run_dir) / out_subdir, noise_seed=evaluation_seed(cfg),
                     progress_bar=show_progress_bar(cfg.logging.progress_bar),
                     extra_metrics=build_extra_metrics(cfg, prompts, all_prompts, vae=vae))
