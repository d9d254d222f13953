"""Frechet distance and CLIP-score arithmetic against independent float64 implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sd_mlperf.eval import metrics
from sd_mlperf.eval.metrics import FrechetReference, feature_statistics, frechet_distance, mean_clip_score


def _eig_reference(mu1, sigma1, mu2, sigma2) -> float:
    """Independent formula: Tr sqrtm(S1 S2) = sum of sqrt of the eigenvalues of S1 S2 (float64 numpy)."""
    diff = mu1 - mu2
    eig = np.linalg.eigvals(sigma1 @ sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(eig.astype(complex)).real.sum())


def _random_stats(rng, n, d, shift=0.0, scale=1.0):
    feats = rng.standard_normal((n, d)) * scale + shift
    return feats, np.mean(feats, axis=0), np.cov(feats, rowvar=False)


@pytest.mark.parametrize("d", [16, 96])
def test_frechet_distance_matches_float64_reference(d):
    rng = np.random.default_rng(d)
    _, mu1, s1 = _random_stats(rng, 4 * d, d)
    _, mu2, s2 = _random_stats(rng, 3 * d, d, shift=0.3, scale=1.4)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_eig_reference(mu1, s1, mu2, s2), rel=1e-6)
    # torchmetrics' formula, a third implementation, in float64.
    from torchmetrics.image.fid import _compute_fid

    tm = _compute_fid(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2))).item()
    assert ours == pytest.approx(tm, rel=1e-6)
    # Tensors are accepted as well as arrays.
    assert frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), mu2, s2) == pytest.approx(ours, rel=1e-12)


def test_fid_is_zero_for_identical_sets():
    rng = np.random.default_rng(0)
    feats, mu, sigma = _random_stats(rng, 200, 32)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    assert abs(FrechetReference(mu, sigma, method="eigh").distance(feats)) < 1e-8
    assert abs(FrechetReference(mu, sigma, method="sqrtm").distance(feats)) < 1e-8


def test_feature_statistics_is_numpy_mean_and_cov():
    feats = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    mu, sigma = feature_statistics(torch.from_numpy(feats))
    np.testing.assert_array_equal(mu, np.mean(feats.astype(np.float64), axis=0))
    np.testing.assert_array_equal(sigma, np.cov(feats.astype(np.float64), rowvar=False))
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(feats[:1])


@pytest.mark.parametrize("n", [6, 40, 200])  # fewer and more images than dimensions
def test_eigh_method_agrees_with_sqrtm(n):
    rng = np.random.default_rng(n)
    _, mu1, s1 = _random_stats(rng, 300, 48)
    gen, mu2, s2 = _random_stats(rng, n, 48, shift=0.2, scale=0.8)
    ref = frechet_distance(mu1, s1, mu2, s2)
    fast = FrechetReference(mu1, s1, method="eigh")
    assert fast.distance(gen) == pytest.approx(ref, rel=1e-6)
    assert fast.distance(torch.from_numpy(gen).float()) == pytest.approx(ref, rel=1e-5)  # float32 features
    assert FrechetReference(mu1, s1, method="sqrtm").distance(gen) == ref


def _sqrtm_fails_once(monkeypatch) -> list:
    """The first sqrtm gives NaN (a singular product), later ones the real root; the list records the inputs."""
    calls = []
    real_sqrtm = metrics.linalg.sqrtm

    def flaky_sqrtm(a):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(metrics.linalg, "sqrtm", flaky_sqrtm)
    return calls


def test_singular_product_gets_the_diagonal_offset(monkeypatch):
    calls = _sqrtm_fails_once(monkeypatch)
    rng = np.random.default_rng(3)
    _, mu1, s1 = _random_stats(rng, 60, 6)
    _, mu2, s2 = _random_stats(rng, 60, 6)
    value = frechet_distance(mu1, s1, mu2, s2, eps=1e-3)
    assert len(calls) == 2
    off = np.eye(6) * 1e-3
    np.testing.assert_allclose(calls[1], (s1 + off) @ (s2 + off))
    assert np.isfinite(value)


def test_singular_product_offset_defaults_to_the_reference_eps(monkeypatch, caplog):
    """pytorch-fid's default offset is 1e-6, and the warning says which offset was added."""
    calls = _sqrtm_fails_once(monkeypatch)
    rng = np.random.default_rng(4)
    _, mu1, s1 = _random_stats(rng, 40, 4)
    _, mu2, s2 = _random_stats(rng, 40, 4)
    with caplog.at_level("WARNING", logger="sd_mlperf"):
        frechet_distance(mu1, s1, mu2, s2)
    off = np.eye(4) * 1e-6
    np.testing.assert_allclose(calls[1], (s1 + off) @ (s2 + off), rtol=1e-12)
    assert ("FID: singular covariance product; adding 1e-06 to the diagonal of both covariances"
            in caplog.messages)


def test_float32_and_torch_inputs_are_computed_in_float64():
    """The reference computes on the float64 copy of float32 features; a float32 pipeline would drift."""
    rng = np.random.default_rng(5)
    feats32 = (rng.standard_normal((50, 8)) * 3 + 100).astype(np.float32)  # an offset float32 cov would feel
    mu, sigma = feature_statistics(feats32)
    assert mu.dtype == sigma.dtype == np.float64
    ref_mu, ref_sigma = np.mean(feats32.astype(np.float64), axis=0), np.cov(feats32.astype(np.float64), rowvar=False)
    np.testing.assert_array_equal(mu, ref_mu)
    np.testing.assert_array_equal(sigma, ref_sigma)
    tensor = torch.from_numpy(feats32).requires_grad_(True)  # detached, moved to the CPU, widened
    t_mu, t_sigma = feature_statistics(tensor)
    np.testing.assert_array_equal(t_mu, ref_mu)
    np.testing.assert_array_equal(t_sigma, ref_sigma)
    _, mu2, s2 = _random_stats(rng, 50, 8, shift=99.0, scale=3.0)
    expected = frechet_distance(ref_mu, ref_sigma, mu2, s2)
    assert frechet_distance(torch.from_numpy(ref_mu), torch.from_numpy(ref_sigma), mu2, s2) == expected
    assert mean_clip_score(np.array([0.1, 0.2], dtype=np.float32)) == pytest.approx(0.15, rel=1e-7)


def test_bad_shapes_and_methods_are_errors():
    with pytest.raises(ValueError, match="mean vectors"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"\(are the reference statistics from the 2048-d pool features\?\)$"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    # Covariances that agree with each other but not with the means.
    with pytest.raises(ValueError, match=r"^FID: covariance shapes \(4, 4\) and \(4, 4\) do not fit means of \(3,\)$"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="covariance shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="eval.fid_method"):
        FrechetReference(np.zeros(3), np.eye(3), method="svd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dimension 3"):
        FrechetReference(np.zeros(3), np.eye(3), method="eigh").distance(np.zeros((5, 4)))


def test_clip_score_is_plain_mean():
    scores = torch.tensor([0.25, -0.05, 0.4])
    assert mean_clip_score(scores) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        mean_clip_score(np.zeros(0))


def test_sqrtm_imaginary_parts_are_dropped_when_tiny_and_refused_when_not(monkeypatch):
    """pytorch-fid's rule: keep the real part if the diagonal's imaginary part is within 1e-3, else refuse."""
    rng = np.random.default_rng(6)
    _, mu1, s1 = _random_stats(rng, 40, 4)
    _, mu2, s2 = _random_stats(rng, 40, 4)
    expected = frechet_distance(mu1, s1, mu2, s2)
    real_sqrtm = metrics.linalg.sqrtm
    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda a: real_sqrtm(a) + 1e-9j)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)
    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda a: real_sqrtm(a) + 0.5j * np.eye(4))
    with pytest.raises(ValueError, match=r"^FID: sqrtm has an imaginary component of 0\.5; "
                                         r"the statistics are not valid covariances$"):
        frechet_distance(mu1, s1, mu2, s2)


def test_two_feature_rows_are_enough_and_fewer_are_refused():
    rng = np.random.default_rng(7)
    _, mu1, s1 = _random_stats(rng, 30, 3)
    two = rng.standard_normal((2, 3))
    mu2, s2 = feature_statistics(two)
    expected = frechet_distance(mu1, s1, mu2, s2)
    assert FrechetReference(mu1, s1).method == "sqrtm"  # the reference's formula unless asked otherwise
    assert FrechetReference(mu1, s1).distance(two) == expected
    assert FrechetReference(mu1, s1, method="eigh").distance(two) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match=r"^FID needs at least 2 feature rows of shape \(N, D\), got \(1, 3\); "
                                         r"evaluate at least 2 prompts \(eval\.num_prompts\)$"):
        feature_statistics(two[:1])
    with pytest.raises(ValueError, match="N >= 2"):
        FrechetReference(mu1, s1, method="eigh").distance(two[:1])
    with pytest.raises(ValueError, match="^CLIP score of zero images$"):
        mean_clip_score(np.zeros(0))
