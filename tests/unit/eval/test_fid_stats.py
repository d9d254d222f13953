"""FID reference statistics: of a folder of images, made once, required by the evaluator; `sd-mlperf fid-stats`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from eval_helpers import make_cfg
from PIL import Image

from sd_mlperf.cli import main
from sd_mlperf.data.coco import read_fid_stats
from sd_mlperf.eval.fid import ensure_folder_fid_stats, image_folder_features, image_folder_stats, require_fid_stats
from sd_mlperf.eval.inception import load_fid_inception
from sd_mlperf.eval.metrics import feature_statistics

SIZES = {"b.png": (32, 32), "a.png": (32, 32), "c.jpg": (40, 24)}  # two sizes: batches split on a change


def _write_images(folder) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name, quality=95)
    (folder / "notes.txt").write_text("not an image")
    return sorted(folder / n for n in SIZES)


@pytest.fixture(scope="module")
def folder_and_features(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs") / "val_images"
    files = _write_images(folder)
    inception = load_fid_inception(None, seed=0)
    with torch.no_grad():
        expected = torch.cat([inception(TF.to_tensor(Image.open(f).convert("RGB"))[None]) for f in files])
    return folder, inception, expected


def test_folder_features_in_file_name_order(folder_and_features):
    folder, inception, expected = folder_and_features
    feats = image_folder_features(folder, inception, batch_size=2)
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-6)
    mu, sigma = image_folder_stats(folder, inception, batch_size=50)
    ref_mu, ref_sigma = feature_statistics(expected)
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-4, atol=1e-8)


def test_unreadable_image_names_the_file(folder_and_features, tmp_path):
    """A truncated image stops the statistics with a ValueError naming the file, not PIL's bare OSError."""
    _, inception, _ = folder_and_features
    folder = tmp_path / "imgs"
    _write_images(folder)
    data = (folder / "b.png").read_bytes()
    (folder / "b.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"b\.png"):
        image_folder_features(folder, inception, batch_size=2)


def test_folder_statistics_are_made_once(folder_and_features, tmp_path):
    folder, inception, expected = folder_and_features
    path = tmp_path / "stats.npz"
    assert ensure_folder_fid_stats(folder, path, inception)
    mu, sigma = read_fid_stats(path)
    ref_mu, _ = feature_statistics(expected)
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-5, atol=1e-7)
    stamp = path.stat().st_mtime_ns
    assert not ensure_folder_fid_stats(folder, path, inception) and path.stat().st_mtime_ns == stamp  # not recomputed
    assert require_fid_stats(str(path)) == path


def test_missing_statistics_name_the_key_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.fid_stats=.*sd-mlperf fid-stats"):
        require_fid_stats(tmp_path / "missing.npz")


def test_fid_stats_command(folder_and_features, tmp_path, capsys):
    folder, _, expected = folder_and_features
    out = tmp_path / "stats.npz"
    smoke = str(make_cfg.__globals__["SMOKE"])
    assert main(["fid-stats", "--images", str(folder), "--out", str(out), "--config", smoke, "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    mu, sigma = read_fid_stats(out)
    np.testing.assert_allclose(mu, feature_statistics(expected)[0], rtol=1e-5, atol=1e-7)
    assert sigma.shape == (2048, 2048)
    assert main(["fid-stats", "--images", str(folder), "--out", str(out), "--config", smoke]) == 1  # exists
    assert main(["fid-stats", "--images", str(tmp_path / "none"), "--out", str(tmp_path / "x.npz"),
                 "--inception-weights", str(tmp_path / "w.pth")]) == 1
