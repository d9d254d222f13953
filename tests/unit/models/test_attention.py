"""The `te` attention backend adds no state: same keys as sdpa/math, checkpoints and ldm exports load both ways.

Runs on the CPU against tests/unit/stand_ins.py's Transformer Engine stand-in, which reproduces TE's
base-module extra state (one `_extra_state` entry per DotProductAttention) and its load hook.
"""

from __future__ import annotations

import pytest
import torch

from sd_mlperf.config.schema import UNetConfig
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
