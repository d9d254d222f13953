"""Batch -> (z0, context): the one call between the data and the training step.

Which path runs is decided here once, from `data.train_format`:
- latents: from stored `moments` (a fresh draw from N(mean, exp(logvar)) each time a sample is
  seen), or from `images` encoded online by the frozen VAE in fp32 (cached and online latents must
  match, so the VAE never runs under autocast);
- context: the cached `context` (moments_embeddings) or the frozen text encoder run on `captions`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sd_mlperf.config.schema import Config
from sd_mlperf.utils.manifest import module_device


class BatchConditioner:
    """Callable(batch, generator=None, device=None) -> (z0 (B, 4, h, w) float32, context (B, 77, D))."""

    def __init__(self, *, latents_from: str, context_from: str, vae: torch.nn.Module | None,
                 text_encoder: torch.nn.Module | None, sample_latents: Callable[..., torch.Tensor]) -> None:
        assert latents_from in ("moments", "images") and context_from in ("context", "captions")
        self.latents_from, self.context_from = latents_from, context_from
        self.vae, self.text_encoder = vae, text_encoder
        self._sample_latents = sample_latents

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.latents_from == "moments":
            moments = batch["moments"]
        else:
            images = batch["images"]
            vae_device = module_device(self.vae)
            # fp32 VAE math, autocast off: online latents must equal the precomputed ones.
            with torch.autocast(device_type=vae_device.type, enabled=False):
                moments = self.vae.encode_moments(images.to(vae_device, torch.float32, non_blocking=True))
        if device is not None:
            moments = moments.to(device, non_blocking=True)
        z0 = self._sample_latents(moments.float(), generator)
        if self.context_from == "context":
            context = batch["context"]
        else:
            context = self.text_encoder.encode(list(batch["captions"]))
        if device is not None:
            context = context.to(device, non_blocking=True)
        return z0, context


def build_batch_conditioner(cfg: Config, vae: torch.nn.Module | None,
                            text_encoder: torch.nn.Module | None) -> BatchConditioner:
    """The conditioner for `data.train_format`; it holds only the frozen parts that format needs."""
    from sd_mlperf.models.vae import sample_latents

    fmt = cfg.data.train_format
    latents_from = "images" if fmt == "images" else "moments"
    context_from = "context" if fmt == "moments_embeddings" else "captions"
    if latents_from == "images" and vae is None:
        raise ValueError("data.train_format=images encodes images online and needs the frozen VAE; none was given.")
    if context_from == "captions" and text_encoder is None:
        raise ValueError(f"data.train_format={fmt} runs the text encoder on captions; none was given.")
    vae_cfg = cfg.model.vae
    return BatchConditioner(
        latents_from=latents_from, context_from=context_from,
        vae=vae if latents_from == "images" else None,
        text_encoder=text_encoder if context_from == "captions" else None,
        sample_latents=lambda moments, generator: sample_latents(moments, vae_cfg, generator=generator))
