"""GroupNorm role: `auto` falls back to torch, with the reason, when apex cannot load; named apex says how to build."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sd_mlperf.backends import BackendUnavailable
from sd_mlperf.models import norm as norm_mod
from sd_mlperf.models.norm import NormBuilder, TorchGroupNorm
from sd_mlperf.models.unet import build_unet
from sd_mlperf.utils.logging import reset_log_once
from tests.unit.models.test_unet import FakeApexGroupNorm, tiny_cfg
from tests.unit.stand_ins import APEX_EXTENSIONS, fake_apex_site, write_fake_apex


@pytest.fixture
def apex_site(tmp_path, monkeypatch):
    monkeypatch.setattr("sd_mlperf.backends.cuda_available", lambda: True)
    yield from fake_apex_site(tmp_path, monkeypatch)


def _norm(unet):
    return {r.role: r for r in unet.backend_resolutions}["norm"]


def _use_apex(monkeypatch, cls):
    """`cls` as apex's GroupNorm, of a recent apex that calls its kernels through its own torch.library ops."""
    monkeypatch.setattr(norm_mod, "_import_apex_group_norm", lambda: cls)
    monkeypatch.setattr(norm_mod, "_registers_custom_ops", lambda apex_cls: True)


def test_auto_builds_torch_norms_when_apex_lacks_its_extensions(apex_site):
    write_fake_apex(apex_site)  # apex installed without --group_norm
    unet = build_unet(tiny_cfg(norm_backend="auto", channels_last=True))
    res = _norm(unet)
    assert res.name == "torch" and "group_norm_cuda" in res.why and "--group_norm" in res.why, res.why
    assert all(type(m) is TorchGroupNorm for m in unet.modules() if isinstance(m, nn.GroupNorm))


def test_auto_degrades_when_the_apex_import_fails(apex_site):
    write_fake_apex(apex_site, built=APEX_EXTENSIONS)  # on disk, but not loadable (as an ABI mismatch)
    unet = build_unet(tiny_cfg(norm_backend="auto", channels_last=True))
    res = _norm(unet)
    assert res.name == "torch" and "apex skipped" in res.why and "cannot be imported" in res.why, res.why
    assert all(type(m) is TorchGroupNorm for m in unet.modules() if isinstance(m, nn.GroupNorm))
    with pytest.raises(RuntimeError, match=r"model.unet.norm_backend=apex.*cannot be imported.*--group_norm"):
        build_unet(tiny_cfg(norm_backend="apex", channels_last=True))


def test_torch_norm_repr_shows_the_folded_activation():
    plain = repr(nn.GroupNorm(2, 4))[len("GroupNorm"):]  # torch's own fields, whatever its version prints
    assert repr(TorchGroupNorm(2, 4, act="silu")) == "TorchGroupNorm" + plain[:-1] + ", act=silu)"
    assert repr(TorchGroupNorm(2, 4)) == "TorchGroupNorm" + plain


def test_builder_counts_each_kernel_and_says_why(monkeypatch):
    torch_builder = NormBuilder("torch")
    for channels in (8, 16):
        torch_builder(num_groups=4, num_channels=channels, eps=1e-5, act="silu")
    assert torch_builder.summary() == "GroupNorm: 2 layers on torch"
    _use_apex(monkeypatch, FakeApexGroupNorm)  # supports (4, 16) only
    apex = NormBuilder("apex")
    layers = [apex(num_groups=g, num_channels=c, eps=1e-5) for g, c in ((4, 16), (4, 16), (4, 8), (2, 16))]
    assert [type(m) for m in layers] == [FakeApexGroupNorm, FakeApexGroupNorm, TorchGroupNorm, TorchGroupNorm]
    assert apex.summary() == ("GroupNorm: 2 layers on apex NHWC (apex's custom ops), 2 on torch (apex lacks "
                              "(groups, channels) (2, 16), (4, 8))")


def test_apex_import_failure_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex.contrib.group_norm", None)  # the import fails, as on an ABI mismatch
    with pytest.raises(BackendUnavailable, match=r"^model\.unet\.norm_backend=apex: apex\.contrib\.group_norm cannot "
                                                 r"be imported .*Or set model\.unet\.norm_backend=auto \(or "
                                                 r"model\.unet\.norm_backend=torch, the reference kernel\)\.$"):
        NormBuilder("apex")


@pytest.mark.parametrize("act", ["silu", ""])
def test_torch_norm_is_group_norm_then_silu(act):
    """Against torch's own GroupNorm (+ SiLU), with an eps large enough to matter."""
    torch.manual_seed(0)
    ours = TorchGroupNorm(2, 4, eps=0.5, act=act)
    ref = nn.GroupNorm(2, 4, eps=0.5)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 3, 3) * 0.3
    expected = F.silu(ref(x)) if act else ref(x)
    torch.testing.assert_close(ours(x), expected, rtol=1e-6, atol=1e-6)


class _RecordingApexGroupNorm(TorchGroupNorm):
    """apex's constructor signature, no support lists (the builder then uses apex's documented ones)."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=False, act=""):
        super().__init__(num_groups, num_channels, eps=eps, act=act)
        self.affine_arg = affine


def test_builder_passes_the_layer_arguments_and_defaults_to_apex_kernel_list(monkeypatch):
    _use_apex(monkeypatch, _RecordingApexGroupNorm)
    builder = NormBuilder("apex")
    fused = builder(num_groups=32, num_channels=320, eps=1e-6, act="silu")
    assert type(fused) is _RecordingApexGroupNorm
    assert (fused.eps, fused.affine_arg, fused.act) == (1e-6, True, "silu")
    assert type(builder(num_groups=32, num_channels=96, eps=1e-6)) is TorchGroupNorm  # not in APEX_CHANNELS
    fallback = builder(num_groups=8, num_channels=320, eps=1e-6, act="silu")  # not in APEX_GROUPS
    assert type(fallback) is TorchGroupNorm and (fallback.eps, fallback.act) == (1e-6, "silu")
    assert builder(num_groups=8, num_channels=320, eps=1e-6).act == ""  # no activation unless asked
    assert builder(num_groups=32, num_channels=320, eps=1e-6).act == ""


def test_builder_logs_its_summary_once_at_the_right_level(monkeypatch, caplog):
    _use_apex(monkeypatch, FakeApexGroupNorm)  # supports (4, 16) only
    reset_log_once()
    clean, mixed, plain = NormBuilder("apex"), NormBuilder("apex"), NormBuilder("torch")
    clean(num_groups=4, num_channels=16, eps=1e-5)
    mixed(num_groups=4, num_channels=8, eps=1e-5)
    plain(num_groups=4, num_channels=8, eps=1e-5)
    with caplog.at_level(logging.INFO, logger="sd_mlperf"):
        for builder in (clean, mixed, plain, clean, mixed):
            builder.log_summary()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "GroupNorm: 1 layers on apex NHWC (apex's custom ops), 0 on torch"),
        (logging.WARNING,
         "GroupNorm: 0 layers on apex NHWC (apex's custom ops), 1 on torch (apex lacks (groups, channels) (4, 8))"),
    ]
