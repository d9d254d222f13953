"""FID Inception: the real key manifest, strict loading of a file in the real format, the TF pool patches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sd_mlperf.eval.inception import (
    FEATURE_DIM,
    FIDInceptionA,
    FIDInceptionE,
    build_fid_inception,
    load_fid_inception,
)
from sd_mlperf.utils.manifest import read_manifest, state_dict_manifest


def test_full_size_matches_the_pt_inception_manifest_on_meta(fixtures_dir):
    with torch.device("meta"):
        model = build_fid_inception()
    expected = read_manifest(fixtures_dir / "pt_inception_2015_12_05_keys.tsv")
    assert state_dict_manifest(model) == expected  # names, shapes, dtypes and order
    assert len(expected) == 566


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A .pth in the real format (a plain state dict under the pytorch-fid names) with random values."""
    torch.manual_seed(1)
    model = build_fid_inception()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in state.items():
        if v.is_floating_point():
            v.normal_(0, 0.05)
            if k.endswith("running_var"):
                v.abs_().add_(0.5)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return path, state


def test_strict_load_from_file(inception_file):
    path, state = inception_file
    model = load_fid_inception(path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    feats = model(torch.rand(1, 3, 40, 56))
    assert feats.shape == (1, FEATURE_DIM) and torch.isfinite(feats).all()


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("Mixed_7c.branch_pool.conv.weight"), r"missing: Mixed_7c\.branch_pool\.conv\.weight"),
    (lambda s: s.__setitem__("AuxLogits.fc.weight", torch.zeros(1)), r"unexpected: AuxLogits\.fc\.weight"),
    (lambda s: s.__setitem__("fc.weight", torch.zeros(1000, 2048)), r"wrong shape: fc\.weight"),
])
def test_strict_load_names_the_problem(inception_file, tmp_path, edit, message):
    _, state = inception_file
    bad = dict(state)
    edit(bad)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError, match=message) as info:
        load_fid_inception(path)
    assert str(path) in str(info.value) and "pt_inception-2015-12-05" in str(info.value)


def test_missing_file_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        load_fid_inception(tmp_path / "nope.pth")


def test_features_resize_bilinear_to_299_and_scale_to_minus1_1(inception_file, monkeypatch):
    model = load_fid_inception(inception_file[0])
    seen = {}
    original = model.Conv2d_1a_3x3.forward

    def spy(x):
        seen["x"] = x
        return original(x)

    monkeypatch.setattr(model.Conv2d_1a_3x3, "forward", spy)
    images = torch.rand(1, 3, 64, 80)
    model(images)
    expected = 2 * F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(seen["x"], expected)


def test_pool_branches_follow_tensorflow():
    torch.manual_seed(0)
    x = torch.rand(1, 192, 9, 9) + 1.0
    block = FIDInceptionA(192, pool_features=32).eval()
    out = block(x)
    pool = block.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
    torch.testing.assert_close(out[:, -32:], pool)
    with_pad = block.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1))
    assert not torch.allclose(out[:, -32:], with_pad)  # borders differ: the padding is not counted
    e_max = FIDInceptionE(64, max_pool=True).eval()
    y = torch.rand(1, 64, 5, 5)
    torch.testing.assert_close(e_max(y)[:, -192:], e_max.branch_pool(F.max_pool2d(y, 3, stride=1, padding=1)))


def test_inspect_command_lists_the_real_keys(tmp_path, fixtures_dir, capsys):
    from sd_mlperf.cli import main

    assert main(["inspect", "inception", "--keys", str(tmp_path / "keys.tsv")]) == 0
    assert "566 tensors" in capsys.readouterr().out
    assert read_manifest(tmp_path / "keys.tsv") == read_manifest(fixtures_dir / "pt_inception_2015_12_05_keys.tsv")
