"""FID and CLIP-score arithmetic, exactly as the MLPerf reference computes them (numpy/scipy, float64).

The reference takes pytorch-fid's `calculate_frechet_distance(mu_ref, sigma_ref, mu_gen, sigma_gen)`:
sqrtm of the covariance product, a 1e-6 diagonal offset if that is not finite, the real part. The
generated statistics are `np.mean` / `np.cov(rowvar=False)` over the float64 copy of the float32
Inception features.

scipy's sqrtm of a 2048 x 2048 product is slow (about 15 s to over a minute of CPU, per evaluation).
`eval.fid_method=eigh` computes the same trace, Tr sqrtm(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)),
from symmetric eigenvalues in float64 with torch (on the GPU when there is one), with S1^1/2 of the
fixed reference statistics computed once; with fewer images than feature dimensions it uses the
exact low-rank form sum sqrt(eig(L^T S1 L)), S2 = L L^T. It agrees with the reference to about 1e-9
relative on full-rank statistics (tests/unit/eval/test_metrics.py); `sqrtm`, the reference, stays
the default. torchmetrics' FID (eigenvalues of the non-symmetric product) is a third, independent
formula, used only as a check in the tests.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from scipy import linalg

from sd_mlperf.utils.logging import logger


def _as_float64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def frechet_distance(mu1: np.ndarray | torch.Tensor, sigma1: np.ndarray | torch.Tensor,
                     mu2: np.ndarray | torch.Tensor, sigma2: np.ndarray | torch.Tensor, eps: float = 1e-6) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) in float64, as pytorch-fid computes it."""
    mu1, mu2 = np.atleast_1d(_as_float64(mu1)), np.atleast_1d(_as_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    if mu1.shape != mu2.shape:
        raise ValueError(f"FID: mean vectors differ in length: {mu1.shape} vs {mu2.shape} "
                         "(are the reference statistics from the 2048-d pool features?)")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"FID: covariance shapes {sigma1.shape} and {sigma2.shape} do not fit means of {mu1.shape}")
    diff = mu1 - mu2
    # The product of two covariances can be nearly singular; the reference then adds eps to the diagonals.
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        logger.warning("FID: singular covariance product; adding %g to the diagonal of both covariances", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}; "
                             "the statistics are not valid covariances")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of N x D features: np.mean and np.cov(rowvar=False) in float64, as the reference."""
    act = _as_float64(features)
    if act.ndim != 2 or act.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 feature rows of shape (N, D), got {act.shape}; "
                         "evaluate at least 2 prompts (eval.num_prompts)")
    return np.mean(act, axis=0), np.cov(act, rowvar=False)


def mean_clip_score(scores: np.ndarray | torch.Tensor) -> float:
    """The CLIP score: plain mean of per-image cosine similarities (not x100, not clipped at 0)."""
    values = _as_float64(scores).reshape(-1)
    if values.size == 0:
        raise ValueError("CLIP score of zero images")
    return float(np.mean(values))


FidMethod = Literal["sqrtm", "eigh"]


def _sqrt_psd(sigma: torch.Tensor) -> torch.Tensor:
    # Symmetric square root; tiny negative eigenvalues from rounding are clipped to 0.
    w, v = torch.linalg.eigh((sigma + sigma.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def _trace_sqrt(m: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum())


class FrechetReference:
    """The real images' (mu, sigma) and the FID of generated features against them, by `method`."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray, *, method: FidMethod = "sqrtm",
                 device: torch.device | str = "cpu") -> None:
        if method not in ("sqrtm", "eigh"):
            raise ValueError(f"invalid value for 'eval.fid_method': {method!r}; allowed: sqrtm, eigh")
        self.mu, self.sigma = _as_float64(mu), _as_float64(sigma)
        self.method = method
        self.device = torch.device(device)
        self._sigma_sqrt: torch.Tensor | None = None  # S1^1/2, fixed for the run

    def distance(self, features: np.ndarray | torch.Tensor) -> float:
        """FID of generated N x D features against the reference statistics."""
        if self.method == "sqrtm":
            mu2, sigma2 = feature_statistics(features)
            # The reference's argument order: real statistics first, generated second.
            return frechet_distance(self.mu, self.sigma, mu2, sigma2)
        act = torch.as_tensor(_as_float64(features), device=self.device)
        n, d = act.shape
        if n < 2 or d != self.mu.shape[0]:
            raise ValueError(f"FID needs N >= 2 features of dimension {self.mu.shape[0]}, got {tuple(act.shape)}")
        mu1 = torch.as_tensor(self.mu, device=self.device)
        sigma1 = torch.as_tensor(self.sigma, device=self.device)
        mu2 = act.mean(dim=0)
        centred = (act - mu2) / (n - 1) ** 0.5  # sigma2 = centred^T centred
        diff = mu1 - mu2
        if n <= d:  # sigma2 has rank < n: the exact n x n form
            tr_covmean = _trace_sqrt(centred @ sigma1 @ centred.T)
        else:
            if self._sigma_sqrt is None:
                self._sigma_sqrt = _sqrt_psd(sigma1)
            h = self._sigma_sqrt
            tr_covmean = _trace_sqrt(h @ (centred.T @ centred) @ h)
        tr2 = float(centred.pow(2).sum())
        return float(diff.dot(diff)) + float(torch.trace(sigma1)) + tr2 - 2 * tr_covmean
