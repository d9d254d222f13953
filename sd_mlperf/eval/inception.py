"""pytorch-fid's "FID Inception" (TF inception-2015-12-05 ported), the network the MLPerf FID uses.

It is torchvision's Inception3(num_classes=1008, aux_logits=False) with the pool branches of the
Mixed blocks changed to match TensorFlow: average pools exclude the padding (count_include_pad=False)
in Mixed_5b..5d, 6b..6e and 7b, and Mixed_7c max-pools. Parameter names are those of
`pt_inception-2015-12-05-6726825d.pth` (tests/fixtures/pt_inception_2015_12_05_keys.tsv), which
loads with strict=True. Features: float images in [0, 1] -> bilinear resize to 299 -> [-1, 1] ->
blocks up to Mixed_7c -> global average pool -> 2048-d. The fc layer is kept only so the file loads.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import inception as tv

from sd_mlperf.models.checkpoint_io import strict_load
from sd_mlperf.utils.logging import log_once

FEATURE_DIM = 2048
INPUT_SIZE = 299


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool does not count the zero padding.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(tv.InceptionA):
    """Mixed_5b/5c/5d with the TF average pool."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class FIDInceptionC(tv.InceptionC):
    """Mixed_6b..6e with the TF average pool."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = layer(b7d)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, b7d, bp], 1)


class FIDInceptionE(tv.InceptionE):
    """Mixed_7b (TF average pool) and Mixed_7c (max pool): the pool is chosen at construction."""

    def __init__(self, in_channels: int, *, max_pool: bool) -> None:
        super().__init__(in_channels)
        self.max_pool = max_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3d, bp], 1)


class FIDInceptionV3(tv.Inception3):
    """The FID InceptionV3; `forward(images)` maps float [0, 1] images (N,3,H,W) to (N, 2048) features."""

    def __init__(self) -> None:
        # init_weights=False: default PyTorch init, cheap; real use always loads the weights file.
        super().__init__(num_classes=1008, aux_logits=False, init_weights=False)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """2048-d pool features of float images in [0, 1] (any size; resized to 299 bilinear)."""
        x = F.interpolate(images_BCHW, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def build_fid_inception() -> FIDInceptionV3:
    """The full-size FID InceptionV3 with untrained weights (works on the meta device)."""
    return FIDInceptionV3()


def _randomize_for_smoke(model: FIDInceptionV3, seed: int) -> None:
    # Variance-preserving random weights keep the smoke run's features away from 0 and from overflow.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)


def load_fid_inception(weights: str | os.PathLike | None, device: torch.device | str = "cpu",
                       *, seed: int = 0) -> FIDInceptionV3:
    """The FID Inception in eval mode on `device`: weights from `weights`, or random (smoke only) if None."""
    model = build_fid_inception()
    if weights is None:
        log_once("fid-inception-random", "eval.inception_weights is null: FID uses a RANDOM-weight Inception; "
                 "the FID values are meaningless (smoke runs only)")
        _randomize_for_smoke(model, seed)
    else:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"eval.inception_weights={weights} does not exist; download "
                                    "pt_inception-2015-12-05-6726825d.pth (see docs/data.md) or set the path")
        strict_load(model, weights, "the FID Inception weights pt_inception-2015-12-05-6726825d.pth "
                    "(pytorch-fid release fid_weights)")
    return model.to(device).eval().requires_grad_(False)
