"""GroupNorm role: `auto` falls back to torch, with the reason, when apex cannot load; named apex says how to build."""

from __future__ import annotations

import pytest
from torch import nn

from sd_mlperf.models.norm import TorchGroupNorm
from sd_mlperf.models.unet import build_unet
from tests.unit.models.test_unet import tiny_cfg
from tests.unit.stand_ins import APEX_EXTENSIONS, fake_apex_site, write_fake_apex


@pytest.fixture
def apex_site(tmp_path, monkeypatch):
    monkeypatch.setattr("sd_mlperf.backends.cuda_available", lambda: True)
    yield from fake_apex_site(tmp_path, monkeypatch)


def _norm(unet):
    return {r.role: r for r in unet.backend_resolutions}["norm"]


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
