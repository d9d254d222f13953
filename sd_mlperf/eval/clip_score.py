"""CLIP score with OpenCLIP ViT-H-14 (laion2b_s32b_b79k), preprocessed exactly as the MLPerf reference.

The reference turns each float image into a PIL image (`ToPILImage`: x * 255 truncated to uint8),
then applies open_clip's eval transform: Resize(224, bicubic) on the PIL image (PIL's antialiased
bicubic), CenterCrop(224), ToTensor, OpenAI mean/std. The score of an image is the cosine of the
normalised image and text features; the metric is their plain mean (not x100, not clipped).
torch's uint8 bicubic resize differs from PIL's by up to one grey level, so the resize stays in PIL
(about 5 ms per 512x512 image per CPU core, small next to sampling).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode

from sd_mlperf.models.checkpoint_io import strict_load
from sd_mlperf.models.precision import autocast
from sd_mlperf.utils.errors import UserError
from sd_mlperf.utils.logging import log_once

CLIP_MODEL_NAME = "ViT-H-14"
CLIP_IMAGE_SIZE = 224
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# Same CLIP code at toy width, for smoke tests: the towers, the tokenizer (vocab, 77 tokens) and the
# 224 input are those of ViT-H-14, only widths and depths shrink.
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": CLIP_IMAGE_SIZE, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def build_clip(tiny: bool = False) -> nn.Module:
    """OpenCLIP ViT-H-14 (image + text towers, untrained; works on the meta device), or the tiny twin."""
    import open_clip

    cfg = TINY_CLIP_CFG if tiny else open_clip.get_model_config(CLIP_MODEL_NAME)
    if cfg is None:
        raise UserError(f"open_clip has no {CLIP_MODEL_NAME} config; pip install 'open_clip_torch>=2.20'")
    return open_clip.model.CLIP(**cfg)


def load_clip(weights: str | os.PathLike | None, *, tiny: bool = False, device: torch.device | str = "cpu",
              seed: int = 0) -> nn.Module:
    """The CLIP model in eval mode: weights (open_clip_pytorch_model.bin) loaded strictly, or random if None."""
    if weights is None:
        log_once("clip-random", "eval.clip_weights is null: the CLIP score uses a RANDOM-weight CLIP; "
                 "the CLIP values are meaningless (smoke runs only)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_clip(tiny)
    else:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"eval.clip_weights={weights} does not exist; download ViT-H-14 "
                                    "laion2b_s32b_b79k open_clip_pytorch_model.bin (see docs/data.md) or set the path")
        model = build_clip(tiny)
        strict_load(model, weights, "OpenCLIP ViT-H-14 laion2b_s32b_b79k open_clip_pytorch_model.bin (a plain state "
                    "dict); with eval.clip_tiny=true, a tiny CLIP state dict")
    return model.to(device).eval().requires_grad_(False)


def _pil_preprocess(image_HWC: np.ndarray) -> torch.Tensor:
    img = Image.fromarray(image_HWC)
    img = TF.resize(img, CLIP_IMAGE_SIZE, interpolation=InterpolationMode.BICUBIC)
    img = TF.center_crop(img, CLIP_IMAGE_SIZE)
    return TF.pil_to_tensor(img)


def clip_preprocess(images_BCHW: torch.Tensor, *, num_threads: int = 4) -> torch.Tensor:
    """Float [0, 1] images -> normalised (B, 3, 224, 224) float32 on the input's device, as the reference."""
    # ToPILImage truncates: x.mul(255).byte(); done in fp32 whatever the decode dtype was.
    u8 = images_BCHW.float().mul(255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    with ThreadPoolExecutor(max_workers=max(1, min(num_threads, len(u8)))) as pool:  # PIL releases the GIL
        crops = list(pool.map(_pil_preprocess, list(u8)))
    x = torch.stack(crops).to(images_BCHW.device).float().div_(255)
    mean = torch.tensor(OPENAI_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ClipScorer:
    """Text and image features of a loaded CLIP model, and per-image cosine scores."""

    def __init__(self, model: nn.Module, *, device: torch.device | str, precision: str = "fp32") -> None:
        import open_clip

        self.model = model
        self.device = torch.device(device)
        self.precision = precision
        self.tokenizer = open_clip.get_tokenizer(CLIP_MODEL_NAME)  # open_clip's BPE, 77 tokens, no download

    @torch.no_grad()
    def text_features(self, captions: Sequence[str]) -> torch.Tensor:
        """L2-normalised text features (N, D), float32."""
        tokens = self.tokenizer(list(captions)).to(self.device)
        with autocast(self.precision, self.device):
            feats = self.model.encode_text(tokens)
        return nn.functional.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def image_features(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features (N, D), float32, from float [0, 1] images of any size."""
        x = clip_preprocess(images_BCHW.to(self.device))
        with autocast(self.precision, self.device):
            feats = self.model.encode_image(x)
        return nn.functional.normalize(feats.float(), dim=-1)

    def scores(self, images_BCHW: torch.Tensor, text_features_ND: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each image with its own caption's features (N,), float32."""
        return (self.image_features(images_BCHW) * text_features_ND.to(self.device)).sum(dim=-1)
