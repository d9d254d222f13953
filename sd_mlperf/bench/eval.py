"""`sd-mlperf bench eval`: images/s of the three parts of an evaluation, and a projection to 30,000 prompts.

Rows, all on one device and one process, with the config's models at random weights (speed does
not depend on the values; nothing is loaded):
- `generation`: text encoding, DDIM (eval.ddim_steps, guidance doubles the UNet batch), VAE decode;
  eval.batch_size prompts per batch; `--steps // 5` timed batches (at least 1) after one warmup batch.
- `inception`: FID Inception features of data.image_size images (resized to 299 inside).
- `clip`: CLIP preprocessing (PIL, as the reference) + image tower + cosine with cached text features.
- `fid_linalg`: the Frechet distance of eval.fid_method on random full-rank 2048-d statistics.
- `projection`: per-device images/s of the whole pipeline (1 / sum of 1/rate) and the time for
  eval.num_prompts prompts (30,000 in the benchmark) on 8 devices like this one, plus fid_linalg.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sd_mlperf.bench import bench_seed
from sd_mlperf.config.load import latent_size
from sd_mlperf.config.schema import Config
from sd_mlperf.parallel.distributed import pick_device
from sd_mlperf.utils.logging import logger
from sd_mlperf.utils.manifest import count_parameters

PROJECTION_DEVICES = 8


def _timed(fn: Callable[[], Any], *, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call, averaged over `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def _row(part: str, device_label: str, batch: int, seconds_per_batch: float, **extra: Any) -> dict[str, Any]:
    return {"part": part, "device": device_label, "batch": batch, "ms_per_batch": 1e3 * seconds_per_batch,
            "images_per_s": batch / seconds_per_batch, **extra}


def _bench_generation(cfg: Config, device: torch.device, label: str, steps: int, warmup: int) -> dict[str, Any]:
    from sd_mlperf.diffusion.ddim import make_ddim_schedule
    from sd_mlperf.diffusion.schedule import make_alphas_cumprod
    from sd_mlperf.eval.evaluator import encode_prompts, generate_images
    from sd_mlperf.models.text_encoder import build_text_encoder
    from sd_mlperf.models.unet import build_unet
    from sd_mlperf.models.vae import build_vae

    e, batch = cfg.eval, cfg.eval.batch_size
    side = latent_size(cfg)
    torch.manual_seed(bench_seed(cfg))
    unet = build_unet(cfg.model.unet, compute_precisions={"eval.precision": e.precision}).to(device).eval()
    vae = build_vae(cfg.model.vae).to(device).eval()
    text_encoder = build_text_encoder(cfg.model.text_encoder).to(device).eval()
    schedule = make_ddim_schedule(make_alphas_cumprod(cfg.diffusion), e.ddim_steps, e.eta)
    uncond = encode_prompts(text_encoder, [""], e.precision, device)
    captions = [f"a photo of object number {i} on a table" for i in range(batch)]

    def generate() -> torch.Tensor:
        return generate_images(unet, captions, list(range(batch)), cfg=e, noise_seed=bench_seed(cfg),
                               schedule=schedule, uncond=uncond, text_encoder=text_encoder, vae=vae,
                               scale_factor=cfg.model.vae.scale_factor,
                               latent_shape=(cfg.model.vae.embed_dim, side, side), device=device)

    seconds = _timed(generate, steps=max(1, steps // 5), warmup=min(warmup, 1), device=device)
    return _row("generation", label, batch, seconds, ddim_steps=e.ddim_steps, guidance=e.guidance_scale,
                image_size=cfg.data.image_size, precision=e.precision,
                unet_params=count_parameters(unet))


def _bench_inception(cfg: Config, device: torch.device, label: str, steps: int, warmup: int) -> dict[str, Any]:
    from sd_mlperf.eval.inception import load_fid_inception
    from sd_mlperf.models.precision import autocast

    e, size = cfg.eval, cfg.data.image_size
    images = torch.rand(e.batch_size, 3, size, size, device=device)
    inception = load_fid_inception(e.inception_weights if _exists(e.inception_weights) else None, device)

    def features() -> torch.Tensor:
        with autocast(e.precision, device):
            return inception(images).float()

    seconds = _timed(features, steps=steps, warmup=warmup, device=device)
    return _row("inception", label, e.batch_size, seconds, image_size=size, precision=e.precision)


def _bench_clip(cfg: Config, device: torch.device, label: str, steps: int, warmup: int) -> dict[str, Any]:
    from sd_mlperf.eval.clip_score import ClipScorer, load_clip

    e, size = cfg.eval, cfg.data.image_size
    images = torch.rand(e.batch_size, 3, size, size, device=device)
    model = load_clip(e.clip_weights if _exists(e.clip_weights) else None, tiny=e.clip_tiny, device=device)
    scorer = ClipScorer(model, device=device, precision=e.precision)
    text = scorer.text_features([f"caption {i}" for i in range(e.batch_size)])
    seconds = _timed(lambda: scorer.scores(images, text), steps=steps, warmup=warmup, device=device)
    return _row("clip", label, e.batch_size, seconds, model="tiny" if e.clip_tiny else "ViT-H-14",
                image_size=size, precision=e.precision)


def _bench_fid_linalg(cfg: Config, device: torch.device, label: str) -> dict[str, Any]:
    from sd_mlperf.eval.inception import FEATURE_DIM
    from sd_mlperf.eval.metrics import FrechetReference, feature_statistics

    rng = np.random.default_rng(0)
    num = FEATURE_DIM + 952  # more images than dimensions: full-rank covariances, as with 30,000 prompts
    ref = FrechetReference(*feature_statistics(rng.random((num, FEATURE_DIM))), method=cfg.eval.fid_method,
                           device=device)
    generated = rng.random((num, FEATURE_DIM)).astype(np.float32)
    start = time.perf_counter()
    ref.distance(generated)
    seconds = time.perf_counter() - start
    return {"part": "fid_linalg", "device": label, "method": cfg.eval.fid_method, "ms_per_batch": 1e3 * seconds}


@torch.no_grad()
def run_eval_bench(cfg: Config, args: Any) -> list[dict[str, Any]]:
    """Rows for `sd-mlperf bench eval` (see the module docstring)."""
    from sd_mlperf.bench.train import device_name

    steps, warmup = max(1, int(getattr(args, "steps", 20))), max(0, int(getattr(args, "warmup", 5)))
    device = pick_device(cfg.run.device)
    label = device_name(device)
    rows = [bench(cfg, device, label, steps, warmup) for bench in (_bench_generation, _bench_inception, _bench_clip)]
    per_device = 1.0 / sum(1.0 / row["images_per_s"] for row in rows)
    rows.append(_bench_fid_linalg(cfg, device, label))
    e = cfg.eval
    projected = e.num_prompts / (PROJECTION_DEVICES * per_device) + rows[-1]["ms_per_batch"] / 1e3
    rows.append({"part": "projection", "device": label, "images_per_s": per_device, "num_prompts": e.num_prompts,
                 "devices": PROJECTION_DEVICES, "projected_s": projected})
    logger.info("bench eval: %.3f img/s per device; %d prompts on %d such devices: about %.0f s", per_device,
                e.num_prompts, PROJECTION_DEVICES, projected)
    return rows


def _exists(path: str | None) -> bool:
    import os

    return path is not None and os.path.isfile(path)
