"""The `te` attention backend adds no state: same keys as sdpa/math, checkpoints and ldm exports load both ways.

Runs on the CPU against tests/unit/stand_ins.py's Transformer Engine stand-in, which reproduces TE's
base-module extra state (one `_extra_state` entry per DotProductAttention) and its load hook.
"""

from __future__ import annotations

import sys

import pytest
import torch

from sd_mlperf.backends import BackendUnavailable
from sd_mlperf.config.schema import UNetConfig
from sd_mlperf.models.attention import CrossAttention, build_core_attention
from sd_mlperf.models.checkpoint_io import export_unet_ldm, load_unet_state_dict
from sd_mlperf.models.unet import build_unet
from sd_mlperf.utils.manifest import read_manifest, state_dict_manifest
from tests.unit.models.test_unet import UNET_PREFIX, inputs, randomize, tiny_cfg
from tests.unit.stand_ins import DotProductAttention, install_fake_transformer_engine


@pytest.fixture
def fake_te(monkeypatch):
    install_fake_transformer_engine(monkeypatch)
    monkeypatch.setattr("sd_mlperf.backends.cuda_available", lambda: True)


def _te_cores(unet: torch.nn.Module) -> list[str]:
    return [name for name, m in unet.named_modules() if isinstance(m, DotProductAttention)]


def test_te_unet_has_exactly_the_ldm_key_set(fake_te, fixtures_dir):
    with torch.device("meta"):
        unet = build_unet(UNetConfig(attention_backend="te", norm_backend="torch"))
    assert len(_te_cores(unet)) == 32  # the stand-in really is in the model (attn1 + attn2 of 16 transformers)
    expected = read_manifest(fixtures_dir / "sd2_512_base_ema_keys.tsv", prefix=UNET_PREFIX)
    assert state_dict_manifest(unet) == expected
    state = {n: torch.empty(shape, dtype=getattr(torch, dt), device="meta") for n, shape, dt in expected}
    result = unet.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("src,dst", [("te", "math"), ("math", "te"), ("te", "sdpa")])
def test_te_checkpoints_load_strictly_across_backends(fake_te, src, dst):
    a = build_unet(tiny_cfg(attention_backend=src))
    randomize(a)
    state = a.state_dict()
    assert not [k for k in state if k.endswith("_extra_state")]
    b = build_unet(tiny_cfg(attention_backend=dst))
    b.load_state_dict(state, strict=True)
    x, t, ctx = inputs()
    torch.testing.assert_close(b(x, t, ctx), a(x, t, ctx), rtol=1e-5, atol=1e-5)


def test_te_ldm_export_loads_into_sdpa(fake_te, tmp_path):
    te = build_unet(tiny_cfg(attention_backend="te"))
    randomize(te)
    export_unet_ldm(te.state_dict(), tmp_path / "unet.safetensors")
    plain = build_unet(tiny_cfg(attention_backend="sdpa"))
    plain.load_state_dict(load_unet_state_dict(tmp_path / "unet.safetensors"), strict=True)
    assert all(torch.equal(v, te.state_dict()[k]) for k, v in plain.state_dict().items())


def test_te_core_holds_no_state_of_its_own(fake_te):
    unet = build_unet(tiny_cfg(attention_backend="te"))
    core = unet.get_submodule(_te_cores(unet)[0])
    assert core.state_dict() == {}
    core.load_state_dict({}, strict=True)  # nothing missing either


def test_checkpoints_written_by_te_builds_before_the_fix_still_load():
    """Older te builds saved an empty `attnN.core.core._extra_state` per attention; it carries nothing."""
    unet = build_unet(tiny_cfg())
    state = unet.state_dict()
    legacy = dict(state)
    for name in [k[: -len(".to_q.weight")] for k in state if k.endswith(("attn1.to_q.weight", "attn2.to_q.weight"))]:
        legacy[f"{name}.core.core._extra_state"] = torch.empty(0, dtype=torch.uint8)
    assert len(legacy) > len(state)
    build_unet(tiny_cfg(attention_backend="sdpa")).load_state_dict(legacy, strict=True)
    # A non-empty one would be FP8 metadata we cannot honour: it stays an error.
    key = next(k for k in legacy if k.endswith("_extra_state"))
    legacy[key] = torch.ones(3, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="Unexpected key.*_extra_state"):
        build_unet(tiny_cfg()).load_state_dict(legacy, strict=True)


def test_te_core_gets_the_head_layout(fake_te):
    """TE's DotProductAttention is built with (num heads, head channels) in that order; its output is reshaped back."""
    core = build_core_attention("te", num_heads=3, head_channels=16)
    assert (core.core.num_attention_heads, core.core.kv_channels) == (3, 16)
    q, k, v = (torch.randn(2, 5, 3, 16) for _ in range(3))
    torch.testing.assert_close(core(q, k, v), build_core_attention("math", num_heads=3, head_channels=16)(q, k, v),
                               rtol=1e-5, atol=1e-6)


def test_te_head_size_limits_are_exact(fake_te):
    """cuDNN's limit: a multiple of 8 up to 256 inclusive; the message names the key, the limit and the fix."""
    assert build_core_attention("te", num_heads=1, head_channels=256).core.kv_channels == 256
    with pytest.raises(ValueError) as info:
        build_core_attention("te", num_heads=1, head_channels=264)
    assert str(info.value) == ("model.unet.head_channels=264 is not supported by the te attention backend (needs a "
                               "multiple of 8, at most 256); set model.unet.attention_backend=sdpa.")


def test_te_missing_names_the_key_and_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)  # import fails as when TE is absent
    with pytest.raises(BackendUnavailable, match=r"transformer_engine cannot be imported .*\. Set "
                                                 r"model\.unet\.attention_backend=sdpa\.$"):
        build_core_attention("te", num_heads=1, head_channels=64)


def test_attention_layer_is_deterministic_in_training():
    """ldm's to_out dropout has p=0: training and evaluation give the same output."""
    torch.manual_seed(0)
    layer = CrossAttention(16, 8, num_heads=2, head_channels=8, backend="math")
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 3, 8)
    evaluated = layer.eval()(x, ctx)
    torch.testing.assert_close(layer.train()(x, ctx), evaluated, rtol=0, atol=0)
