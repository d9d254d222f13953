"""CLIP score: ViT-H-14 key manifest, strict loading, the reference's PIL preprocessing, cosine scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import transforms

from sd_mlperf.eval.clip_score import (
    OPENAI_MEAN,
    OPENAI_STD,
    ClipScorer,
    build_clip,
    clip_preprocess,
    load_clip,
)
from sd_mlperf.utils.manifest import read_manifest, state_dict_manifest


def test_full_size_matches_the_open_clip_vit_h_14_manifest_on_meta(fixtures_dir):
    with torch.device("meta"):
        model = build_clip()
    expected = read_manifest(fixtures_dir / "open_clip_vit_h_14_keys.tsv")
    assert state_dict_manifest(model) == expected
    assert sum(p.numel() for p in model.parameters()) == 986_109_441


@pytest.fixture(scope="module")
def tiny_clip_file(tmp_path_factory):
    torch.manual_seed(3)
    state = build_clip(tiny=True).state_dict()
    path = tmp_path_factory.mktemp("clip") / "open_clip_pytorch_model.bin"
    torch.save(state, path)
    return path, state


def test_strict_load_of_a_tiny_file(tiny_clip_file, tmp_path):
    path, state = tiny_clip_file
    model = load_clip(path, tiny=True)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    bad = {k: v for k, v in state.items() if not k.startswith("visual.ln_post")}
    bad_path = tmp_path / "bad.bin"
    torch.save(bad, bad_path)
    with pytest.raises(ValueError, match=r"missing: visual\.ln_post\.weight, visual\.ln_post\.bias") as info:
        load_clip(bad_path, tiny=True)
    assert str(bad_path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="eval.clip_weights"):
        load_clip(tmp_path / "absent.bin", tiny=True)


def _reference_preprocess(image: torch.Tensor) -> torch.Tensor:
    """The MLPerf reference: ToPILImage (x * 255 truncated), then open_clip's eval transform."""
    pil = transforms.ToPILImage()(image)
    pipeline = transforms.Compose([
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(OPENAI_MEAN, OPENAI_STD),
    ])
    return pipeline(pil)


@pytest.mark.parametrize("size", [(64, 64), (80, 48), (512, 512)])
def test_preprocessing_is_the_reference_bit_for_bit(size):
    torch.manual_seed(0)
    images = torch.rand(2, 3, *size)
    ours = clip_preprocess(images)
    assert ours.shape == (2, 3, 224, 224)
    for i in range(2):
        torch.testing.assert_close(ours[i], _reference_preprocess(images[i]), rtol=0, atol=1e-6)


def test_preprocessing_matches_open_clips_own_transform():
    import open_clip

    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    image = torch.rand(3, 96, 96)
    ours = clip_preprocess(image[None])[0]
    theirs = preprocess(transforms.ToPILImage()(image))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_scores_are_cosines_of_normalised_features(tiny_clip_file):
    import open_clip

    model = load_clip(tiny_clip_file[0], tiny=True)
    scorer = ClipScorer(model, device="cpu")
    captions = ["a red square", "two dogs on a beach"]
    images = torch.rand(2, 3, 64, 64)
    text = scorer.text_features(captions)
    scores = scorer.scores(images, text)
    tokens = open_clip.get_tokenizer("ViT-H-14")(captions)
    t = model.encode_text(tokens)
    v = model.encode_image(clip_preprocess(images))
    expected = torch.nn.functional.cosine_similarity(v, t, dim=-1)
    torch.testing.assert_close(scores, expected.detach(), rtol=1e-5, atol=1e-6)
    assert torch.all(scores.abs() <= 1.0)
    # The score is not scaled by 100 nor clipped at 0.
    assert float(np.mean(scores.numpy())) == pytest.approx(float(expected.mean()), abs=1e-6)


def test_inspect_command_lists_the_real_keys(tmp_path, fixtures_dir, capsys):
    from sd_mlperf.cli import main

    assert main(["inspect", "clip", "--keys", str(tmp_path / "keys.tsv")]) == 0
    assert "986,109,441 parameters" in capsys.readouterr().out
    assert read_manifest(tmp_path / "keys.tsv") == read_manifest(fixtures_dir / "open_clip_vit_h_14_keys.tsv")
