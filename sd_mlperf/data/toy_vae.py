"""A toy frozen VAE fitted to the synthetic pictures, so that their latents carry the picture (a smoke asset).

With random frozen weights a sampled latent is mostly VAE sampling noise around a mean that barely
depends on the picture, so nothing the UNet learns shows in its samples. Here `model.vae` is fitted once
to fresh pictures of the synthetic world (a stream of scenes of its own, from `data.synthetic.seed`),
its latents are standardised, and it is written with the random text tower, under ldm names
(`first_stage_model.*`, `cond_stage_model.model.*`), to `model.frozen_checkpoint`: training, precompute
and evaluation then load it exactly as they load 512-base-ema.ckpt. A JSON file beside it records what it
was fitted with; a run with the same settings reuses it, other settings fit it again.

The recipe, and why:
- init: variance-preserving conv weights and zero residual branches (conv2, attention proj_out), so the
  untrained VAE is a plain conv autoencoder; torch's default init shrinks the signal about 3x per conv;
- loss: MSE of the reconstruction (in [-1, 1]) of a posterior sample + kl_weight x KL, as the SD VAE's
  (kl_weight 1e-6, no perceptual or GAN term); the posterior starts narrow (logvar -6);
- Adam, lr warmed up then cosine-decayed; batches of fresh pictures, never the same one twice;
- latents standardised at the end: the per-channel mean and std of posterior samples over a few hundred
  pictures are folded into quant_conv and post_quant_conv, so latents have about zero mean and unit
  variance and the decoder sees the same latents as before (conf/learn.yaml: scale_factor 1.0).
The toy VAE's GroupNorms need a large eps (conf/learn.yaml: model.vae.norm_eps 1.0, one group): a
per-sample norm of a nearly flat picture otherwise removes its colour, and the fit stalls.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sd_mlperf.config.schema import Config
from sd_mlperf.data.synthetic import VAE_FIT_STREAM, VAL_STREAM, make_square_sample
from sd_mlperf.utils.files import atomic_write_text
from sd_mlperf.utils.logging import logger


@dataclass(frozen=True)
class FitRecipe:
    """How the toy VAE is fitted (fixed; `version` changes when the recipe does, so cached fits are redone)."""

    version: int = 1
    batch_size: int = 8
    lr: float = 2e-3
    warmup_steps: int = 20
    final_lr_fraction: float = 0.05
    kl_weight: float = 1e-6
    initial_logvar: float = -6.0
    num_stat_images: int = 256
    """Pictures whose latents give the per-channel mean and std folded into the weights."""
    num_report_images: int = 64
    """Validation pictures whose reconstructions are read back for the fit report."""


RECIPE = FitRecipe()


def pictures(seed: int, stream: int, start: int, count: int, size: int) -> torch.Tensor:
    """Square pictures `start .. start+count-1` of a stream of scenes, float [0, 1], (count, 3, size, size)."""
    arrays = [np.asarray(make_square_sample(seed, stream, i, size)[0]) for i in range(start, start + count)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def _encoder_input(images01: torch.Tensor, image_range: str) -> torch.Tensor:
    from sd_mlperf.data.decode import to_range

    return to_range(images01, image_range)  # what precompute feeds the VAE (data.image_range)


def init_for_fitting(vae: nn.Module, initial_logvar: float) -> None:
    """Variance-preserving convs, zero residual branches, a narrow initial posterior (see the module doc)."""
    with torch.no_grad():
        for name, module in vae.named_modules():
            if isinstance(module, nn.Conv2d):
                if name.endswith(("conv2", "proj_out")):
                    nn.init.zeros_(module.weight)
                else:
                    nn.init.kaiming_uniform_(module.weight, a=1.0)  # Var(w) = 1 / fan_in
                nn.init.zeros_(module.bias)
        embed = vae.quant_conv.out_channels // 2
        vae.quant_conv.bias[embed:].fill_(initial_logvar)


def _kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1).mean()


def fit(vae: nn.Module, *, steps: int, seed: int, image_size: int, image_range: str,
        recipe: FitRecipe = RECIPE) -> float:
    """Fit `vae` in place to `steps` batches of fresh pictures; returns the last 10% of steps' mean MSE."""
    from sd_mlperf.models.vae import DiagonalGaussian

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=recipe.lr)

    def lr_factor(step: int) -> float:
        warm = min(1.0, (step + 1) / recipe.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * step / steps))
        return warm * (recipe.final_lr_fraction + (1.0 - recipe.final_lr_fraction) * cosine)

    vae.train()
    start, tail, log_every = time.perf_counter(), [], max(1, steps // 10)
    for step in range(steps):
        images = pictures(seed, VAE_FIT_STREAM, step * recipe.batch_size, recipe.batch_size, image_size)
        posterior = DiagonalGaussian(vae.encode_moments(_encoder_input(images, image_range)))
        reconstruction = vae.decode(posterior.sample(generator))
        mse = (reconstruction - (2.0 * images - 1.0)).pow(2).mean()
        loss = mse + recipe.kl_weight * _kl(posterior.mean, posterior.logvar)
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * lr_factor(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(mse.detach())
        if step >= steps - max(1, steps // 10):
            tail.append(value)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            logger.info("toy VAE fit: step %d/%d, reconstruction MSE %.4f (%.0f s, about %.0f s left)", step + 1,
                        steps, value, elapsed, elapsed / (step + 1) * (steps - step - 1))
    vae.eval()
    return sum(tail) / len(tail)


@torch.no_grad()
def standardise_latents(vae: nn.Module, images_in: torch.Tensor, generator: torch.Generator) -> dict[str, list]:
    """Fold per-channel (z - mean) / std of posterior samples into quant_conv and post_quant_conv (exact)."""
    from sd_mlperf.models.vae import DiagonalGaussian

    posterior = DiagonalGaussian(vae.encode_moments(images_in))
    z = posterior.sample(generator)
    mean, std = z.mean(dim=(0, 2, 3)).double(), z.std(dim=(0, 2, 3)).double()
    c = mean.numel()
    q, p = vae.quant_conv, vae.post_quant_conv
    # Mean rows: mu' = (mu - m) / s. Logvar rows: logvar' = logvar - 2 log s. post_quant_conv(z) = P(s z' + m).
    q.weight[:c] = (q.weight[:c].double() / std.view(c, 1, 1, 1)).to(q.weight.dtype)
    q.bias[:c] = ((q.bias[:c].double() - mean) / std).to(q.bias.dtype)
    q.bias[c:] = (q.bias[c:].double() - 2.0 * std.log()).to(q.bias.dtype)
    p.bias.copy_((p.bias.double() + p.weight.double()[:, :, 0, 0] @ mean).to(p.bias.dtype))
    p.weight.copy_((p.weight.double() * std.view(1, c, 1, 1)).to(p.weight.dtype))
    return {"latent_mean": mean.tolist(), "latent_std": std.tolist()}


@torch.no_grad()
def reconstruction_report(vae: nn.Module, *, seed: int, image_size: int, image_range: str,
                          count: int) -> dict[str, float]:
    """MSE and read-back accuracies of the reconstructions of `count` validation pictures (never fitted to)."""
    from sd_mlperf.data.scene_reader import parse_caption, scene_matches

    images = pictures(seed, VAL_STREAM, 0, count, image_size)
    scenes = [parse_caption(make_square_sample(seed, VAL_STREAM, i, image_size)[1]) for i in range(count)]
    mean = vae.encode_moments(_encoder_input(images, image_range))[:, : vae.quant_conv.out_channels // 2]
    decoded = vae.decode(mean)
    reconstruction = ((decoded + 1.0) / 2.0).clamp(0.0, 1.0)
    rows = scene_matches(reconstruction, scenes)
    return {"val_mse": float((decoded - (2.0 * images - 1.0)).pow(2).mean()),
            "val_background_acc": float(rows[:, 0].mean()),
            "val_object_acc": float(rows[:, 1].sum() / rows[:, 2].sum())}


def _fit_key(cfg: Config) -> dict[str, Any]:
    """What the fitted weights depend on (the scale factor and logvar clamp do not: latents are standardised)."""
    vae = {k: v for k, v in asdict(cfg.model.vae).items() if k not in ("scale_factor", "logvar_min", "logvar_max")}
    s = cfg.data.synthetic
    return {"recipe": asdict(RECIPE), "steps": s.fit_vae_steps, "seed": s.seed, "image_size": cfg.data.image_size,
            "image_range": cfg.data.image_range, "vae": vae, "text_encoder": asdict(cfg.model.text_encoder)}


def record_path(checkpoint: str | Path) -> Path:
    """The JSON record beside a toy checkpoint: what it was fitted with, and its report."""
    return Path(checkpoint).with_suffix(".json")


def is_fitted(cfg: Config) -> bool:
    """True if model.frozen_checkpoint holds a toy VAE fitted with exactly these settings."""
    path = Path(cfg.model.frozen_checkpoint)
    try:
        return path.is_file() and json.loads(record_path(path).read_text())["key"] == _fit_key(cfg)
    except (OSError, ValueError, KeyError):
        return False


def ensure_toy_frozen_checkpoint(cfg: Config) -> bool:
    """Fit the toy VAE and write it to model.frozen_checkpoint unless fitted with these settings; True if fitted.

    A new fit makes the synthetic data's precomputed latents stale: they are removed (they lie in
    data.synthetic_dir), so precompute encodes them again with the new VAE.
    """
    from sd_mlperf.models.checkpoint_io import TEXT_PREFIX, VAE_PREFIX, save_safetensors
    from sd_mlperf.models.text_encoder import build_text_encoder
    from sd_mlperf.models.vae import build_vae

    if is_fitted(cfg):
        logger.info("toy VAE: reusing %s (fitted with these settings)", cfg.model.frozen_checkpoint)
        return False
    s, d = cfg.data.synthetic, cfg.data
    logger.info("toy VAE: fitting model.vae to %d batches of %d synthetic pictures (%dpx), seed %d; written once to "
                "%s", s.fit_vae_steps, RECIPE.batch_size, d.image_size, s.seed, cfg.model.frozen_checkpoint)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        vae = build_vae(cfg.model.vae)
        text_encoder = build_text_encoder(cfg.model.text_encoder)  # stays random: its embeddings differ per caption
        init_for_fitting(vae, RECIPE.initial_logvar)
    train_mse = fit(vae, steps=s.fit_vae_steps, seed=s.seed, image_size=d.image_size, image_range=d.image_range)
    stat_images = _encoder_input(pictures(s.seed, VAE_FIT_STREAM, 10**9, RECIPE.num_stat_images, d.image_size),
                                 d.image_range)
    stats = standardise_latents(vae, stat_images, torch.Generator().manual_seed(s.seed))
    report = {"train_mse": train_mse, **reconstruction_report(vae, seed=s.seed, image_size=d.image_size,
                                                              image_range=d.image_range,
                                                              count=RECIPE.num_report_images),
              **stats, "fit_seconds": time.perf_counter() - start}
    state = {VAE_PREFIX + k: v for k, v in vae.state_dict().items()}
    state.update({TEXT_PREFIX + k: v for k, v in text_encoder.state_dict().items()})
    _remove_stale_latents(cfg)
    save_safetensors(state, cfg.model.frozen_checkpoint, metadata={"format": "pt", "sd_mlperf": "toy VAE"})
    atomic_write_text(record_path(cfg.model.frozen_checkpoint),
                      json.dumps({"key": _fit_key(cfg), "report": report}, indent=2) + "\n")
    logger.info("toy VAE: fitted in %.0f s; validation pictures read back from their latents: background colour "
                "%.0f%%, object colours %.0f%% (MSE %.4f)", report["fit_seconds"], 100 * report["val_background_acc"],
                100 * report["val_object_acc"], report["val_mse"])
    return True


def _remove_stale_latents(cfg: Config) -> None:
    out = Path(cfg.data.train_shards)
    if cfg.data.train_format == "images" or not out.exists():
        return
    root = Path(cfg.data.synthetic_dir).resolve()
    if root not in out.resolve().parents:
        raise ValueError(f"data.train_shards={out} holds latents of another VAE and lies outside data.synthetic_dir="
                         f"{cfg.data.synthetic_dir}; remove it, or move it into data.synthetic_dir, before the toy VAE "
                         "is fitted again")
    logger.info("toy VAE: removing %s, latents precomputed with an earlier VAE", out)
    shutil.rmtree(out)
