"""Toy quality metrics of the synthetic world: does a generated picture show what its caption says?

The evaluator computes them beside FID and CLIP when its prompts are the synthetic dataset's (decided
when it is built; other runs get `NoExtraMetrics`). Per evaluation, over the evaluated prompts:
- toy_background_acc: the fraction of pictures whose border (nearest of the 10 named colours) has the
  caption's background colour. Chance: 0.10, what a random colour or any one fixed colour scores.
- toy_object_acc: the fraction of the captions' objects whose colour is read at their position (a patch
  at its centre). Chance: 0.11, a random colour other than the background's; 0 for pictures without shapes.
- toy_latent_fd: the Frechet distance between VAE latents (posterior means x scale_factor, flattened
  4 x h x w) of the generated pictures, encoded again, and of the validation pictures; lower is better.
  The generated pictures' count is below the dimension: the exact low-rank form is used (eval.metrics).
How pictures are read: sd_mlperf.data.scene_reader. These numbers mean something only with a VAE whose
latents carry the picture (data.synthetic.fit_vae_steps, conf/learn.yaml); with random frozen weights
every picture decodes to about the same colour and the accuracies sit at chance.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from sd_mlperf.config.schema import Config
from sd_mlperf.data.coco import Prompt
from sd_mlperf.data.scene_reader import COLOUR_NAMES, Scene, parse_caption, scene_matches
from sd_mlperf.eval.fid import image_batches
from sd_mlperf.eval.metrics import FrechetReference, feature_statistics
from sd_mlperf.utils.logging import logger

NAMES = ("toy_background_acc", "toy_object_acc", "toy_latent_fd")
CHANCE = {"toy_background_acc": 1 / len(COLOUR_NAMES), "toy_object_acc": 1 / (len(COLOUR_NAMES) - 1)}
"""Chance levels of the accuracies (the module doc says why)."""
_MATCH_COLUMNS = 3  # scene_reader.scene_matches: background right, objects right, objects


class NoExtraMetrics:
    """The evaluator's extra metrics when there are none: no columns, no values."""

    width = 0

    def rows(self, images_BCHW: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        """(B, 0): nothing per picture."""
        return images_BCHW.new_zeros(images_BCHW.shape[0], 0)

    def summarise(self, rows: torch.Tensor) -> dict[str, float]:
        """No metrics."""
        return {}


@torch.no_grad()
def encode_latents(vae: nn.Module, images_BCHW: torch.Tensor, *, scale_factor: float, image_range: str) -> torch.Tensor:
    """Flattened posterior means x scale_factor of float [0, 1] pictures (fp32 VAE, as precompute runs it)."""
    from sd_mlperf.data.decode import to_range

    device = next(vae.parameters()).device
    with torch.autocast(device_type=device.type, enabled=False):
        moments = vae.encode_moments(to_range(images_BCHW.to(device, torch.float32), image_range))
    return (moments[:, : moments.shape[1] // 2] * scale_factor).flatten(1).float()


class ToyMetrics:
    """Per picture: scene read-back columns + its VAE latent; per evaluation: the NAMES metrics."""

    def __init__(self, scenes: Sequence[Scene], *, vae: nn.Module, scale_factor: float, image_range: str,
                 reference: FrechetReference) -> None:
        self.scenes = list(scenes)
        self.vae, self.scale_factor, self.image_range = vae, scale_factor, image_range
        self.reference = reference
        self.width = _MATCH_COLUMNS + reference.mu.shape[0]

    def rows(self, images_BCHW: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        """(B, width) float32 on the images' device: scene_matches columns, then the latent."""
        matches = scene_matches(images_BCHW.float(), [self.scenes[i] for i in indices])
        latents = encode_latents(self.vae, images_BCHW, scale_factor=self.scale_factor,
                                 image_range=self.image_range).to(images_BCHW.device)
        return torch.cat([matches.to(latents), latents], dim=1)

    def summarise(self, rows: torch.Tensor) -> dict[str, float]:
        """The metrics of all evaluated pictures' rows (in any order)."""
        rows = rows.double().cpu()
        return {"toy_background_acc": float(rows[:, 0].mean()),
                "toy_object_acc": float(rows[:, 1].sum() / rows[:, 2].sum().clamp(min=1)),
                "toy_latent_fd": self.reference.distance(rows[:, _MATCH_COLUMNS:])}


def is_synthetic_prompts(cfg: Config) -> bool:
    """True if eval.prompts_file is the one the synthetic dataset writes (data.synthetic_dir)."""
    from sd_mlperf.data.synthetic import PROMPTS_FILE

    d = cfg.data.synthetic_dir
    return d is not None and Path(cfg.eval.prompts_file).resolve() == (Path(d) / PROMPTS_FILE).resolve()


def build_extra_metrics(cfg: Config, prompts: Sequence[Prompt], reference_prompts: Sequence[Prompt], *,
                        vae: nn.Module) -> NoExtraMetrics | ToyMetrics:
    """ToyMetrics when the prompts are the synthetic dataset's, else NoExtraMetrics; checks training.target_toy."""
    toy = is_synthetic_prompts(cfg)
    _check_targets(dict(cfg.training.target_toy), toy)
    return build_toy_metrics(cfg, prompts, reference_prompts, vae=vae) if toy else NoExtraMetrics()


def _check_targets(targets: dict[str, float], toy: bool) -> None:
    """training.target_toy names accuracies that this evaluation computes."""
    if not targets:
        return
    if not toy:
        raise ValueError(f"invalid value for 'training.target_toy': {targets}; toy metrics are computed only on the "
                         f"synthetic prompts (eval.prompts_file = data.synthetic_dir/val2014_30k.tsv). Set "
                         "training.target_toy={} for this run.")
    bad = sorted(set(targets) - set(CHANCE))
    if bad:
        raise ValueError(f"invalid value for 'training.target_toy': unknown or not an accuracy: {', '.join(bad)}; "
                         f"targets are minimum values of {', '.join(CHANCE)}")


def build_toy_metrics(cfg: Config, prompts: Sequence[Prompt], reference_prompts: Sequence[Prompt], *,
                      vae: nn.Module) -> ToyMetrics:
    """Scenes of `prompts` (the evaluated ones) and the latent statistics of `reference_prompts`' pictures."""
    from sd_mlperf.data.synthetic import VAL_IMAGES_DIR

    scale_factor, image_range = cfg.model.vae.scale_factor, cfg.data.image_range
    image_dir = Path(cfg.data.synthetic_dir) / VAL_IMAGES_DIR
    files = [image_dir / f"{p.image_id}.png" for p in reference_prompts]
    latents = torch.cat([encode_latents(vae, images, scale_factor=scale_factor, image_range=image_range)
                         for images in image_batches(files, cfg.eval.batch_size)])
    mu, sigma = feature_statistics(latents)
    logger.info("toy metrics: background-colour accuracy (chance %.2f), object colour at its position (chance "
                "%.2f), latent Frechet distance to %d validation pictures' latents (%d-d)",
                CHANCE["toy_background_acc"], CHANCE["toy_object_acc"], latents.shape[0], latents.shape[1])
    return ToyMetrics([parse_caption(p.caption) for p in prompts], vae=vae, scale_factor=scale_factor,
                      image_range=image_range, reference=FrechetReference(mu, sigma, method="eigh"))
