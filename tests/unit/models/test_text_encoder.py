"""OpenCLIP text tower: full-size names on meta; tiny variant against open_clip's own forward."""

from __future__ import annotations

import pytest
import torch
from open_clip.model import CLIPTextCfg, _build_text_tower

from sd_mlperf.config.schema import TextEncoderConfig
from sd_mlperf.models.text_encoder import build_text_encoder
from sd_mlperf.utils.manifest import count_parameters, read_manifest, state_dict_manifest

TINY = dict(width=64, num_heads=4, num_layers=3)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_text_encoder(TextEncoderConfig(**TINY))


def test_full_size_matches_checkpoint_and_open_clip_manifests(fixtures_dir):
    with torch.device("meta"):
        enc = build_text_encoder(TextEncoderConfig())
    rows = state_dict_manifest(enc)
    assert rows == read_manifest(fixtures_dir / "sd2_512_base_ema_keys.tsv", prefix="cond_stage_model.model.")
    clip_text = [r for r in read_manifest(fixtures_dir / "open_clip_vit_h_14_keys.tsv")
                 if not r[0].startswith("visual.")]
    assert sorted(rows) == sorted(clip_text)
    assert count_parameters(enc) == 354_032_641
    assert "attn_mask" not in enc.state_dict() and enc.attn_mask.shape == (77, 77)


def test_frozen_stays_frozen(tiny):
    assert not tiny.training and not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training and not any(m.training for m in tiny.modules())


def _open_clip_tokens(tiny, num_layers: int, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's TextTransformer forward (token outputs) with our weights and `num_layers` blocks."""
    cfg = CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=num_layers,
                      output_tokens=True)
    tower = _build_text_tower(64, cfg).eval()
    state = {k: v for k, v in tiny.state_dict().items() if k != "logit_scale"}
    state = {k: v for k, v in state.items() if not k.startswith(f"transformer.resblocks.{num_layers}")}
    tower.load_state_dict(state, strict=True)
    return tower(tokens)[1]


def test_penultimate_output_matches_open_clip(tiny):
    tokens = tiny.tokenize(["a photo of a cat", "two dogs on a beach at sunset"])
    out = tiny(tokens)
    assert out.shape == (2, 77, 64)
    # Reference: the same tower cut to its first num_layers - 1 blocks, then ln_final.
    torch.testing.assert_close(out, _open_clip_tokens(tiny, 2, tokens), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, _open_clip_tokens(tiny, 3, tokens), atol=1e-3)  # the last block is skipped
    torch.testing.assert_close(tiny.encode(["a photo of a cat"]), out[:1])


def test_causal_mask(tiny):
    tokens = tiny.tokenize(["a red house with a green door"])
    changed = tokens.clone()
    changed[0, 5] = 1000
    a, b = tiny(tokens), tiny(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_tokenizer_reference_rules(tiny):
    t = tiny.tokenize(["A Photo", "a photo", ""])
    assert t.shape == (3, 77) and t.dtype == torch.long
    assert torch.equal(t[0], t[1])  # lower-cased
    assert t[2, 0] == 49406 and t[2, 1] == 49407 and t[2, 2:].eq(0).all()  # SOT, EOT, zero padding
    long = tiny.tokenize(["word " * 200])
    assert long[0, 0] == 49406 and long[0, -1] == 49407 and long[0].ne(0).all()  # truncated, EOT kept last


def test_bf16_autocast(tiny):
    """Under bf16 autocast the blocks compute in bf16 and the output stays close to fp32 (but not equal to it)."""
    tokens = tiny.tokenize(["a cat", "a dog on a sofa"])
    dtypes = []
    hook = tiny.transformer.resblocks[0].mlp.c_fc.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    ref = tiny(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(tokens)
    hook.remove()
    assert dtypes == [torch.float32, torch.bfloat16]
    assert out.shape == (2, 77, 64)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert 1e-4 < err < 3e-2, err  # bf16 keeps 8 mantissa bits: about 4e-3 per op, not 0
