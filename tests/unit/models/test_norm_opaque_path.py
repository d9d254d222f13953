"""NormBuilder's choice of apex path and the OpaqueGroupNorm layer's arguments to the custom op (CPU stand-ins)."""

import sys
import types

import torch

from sd_mlperf.models import group_norm_op
from sd_mlperf.models import norm as norm_mod
from sd_mlperf.models.group_norm_op import KERNELS
from sd_mlperf.models.norm import OpaqueGroupNorm, TorchGroupNorm


def test_registers_custom_ops_reads_the_fprop_of_apexs_module(monkeypatch):
    module = types.ModuleType("fake_apex_group_norm")
    cls = type("GroupNorm", (), {"__module__": module.__name__})
    assert not norm_mod._registers_custom_ops(cls)  # the module is not imported
    monkeypatch.setitem(sys.modules, module.__name__, module)
    assert not norm_mod._registers_custom_ops(cls)  # no fprop at all
    module.group_norm_nhwc_fprop = lambda *args: None  # an older apex: a plain function around the extension
    assert not norm_mod._registers_custom_ops(cls)
    module.group_norm_nhwc_fprop = types.SimpleNamespace(register_fake=lambda fn: fn)  # a torch.library op
    assert norm_mod._registers_custom_ops(cls) is True


def test_opaque_layer_hands_its_shape_eps_and_sm_to_the_op(monkeypatch):
    calls = {}

    def passes(num_channels, hw, sm):
        calls["passes"] = (num_channels, hw, sm)
        return 7

    def op(x, weight, bias, num_groups, eps, num_passes, silu, kernel):
        calls["op"] = (x.is_contiguous(memory_format=torch.channels_last), num_groups, eps, num_passes, silu, kernel)
        return x, None

    monkeypatch.setattr(group_norm_op, "apex_passes", passes)
    monkeypatch.setattr(group_norm_op, "group_norm_nhwc", op)
    layer = OpaqueGroupNorm(4, 16, eps=0.25, act="silu", kernel="apex", sm=80)
    layer(torch.randn(2, 16, 3, 5))  # NCHW in: the layer makes it NHWC; H x W = 15 positions
    assert calls == {"passes": (16, 15, 80), "op": (True, 4, 0.25, 7, True, "apex")}
    default = OpaqueGroupNorm(4, 16)
    assert (default.eps, default.act, default.kernel, default.sm) == (1e-5, "", "reference", 90)


def test_builder_wraps_an_older_apex_for_this_devices_sm_and_says_so(monkeypatch):
    class OldApexGroupNorm(TorchGroupNorm):  # apex's constructor signature
        SUPPORTED_CHANNELS, SUPPORTED_GROUPS = frozenset({16}), frozenset({4})

        def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, act=""):
            super().__init__(num_groups, num_channels, eps=eps, act=act)

    forward, backward = KERNELS["reference"]
    monkeypatch.setitem(sys.modules, "group_norm_cuda", types.SimpleNamespace(forward=forward, backward=backward))
    monkeypatch.setitem(group_norm_op.KERNELS, "apex", None)  # restored after the test
    monkeypatch.setattr(norm_mod, "_import_apex_group_norm", lambda: OldApexGroupNorm)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (10, 3))
    builder = norm_mod.NormBuilder("apex")
    layer = builder(num_groups=4, num_channels=16, eps=0.25, act="silu")
    assert builder.opaque is True and type(layer) is OpaqueGroupNorm
    assert (layer.kernel, layer.sm, layer.eps, layer.act, layer.num_groups) == ("apex", 103, 0.25, "silu", 4)
    assert builder.summary() == "GroupNorm: 1 layers on apex NHWC (our custom op around apex's extension), 0 on torch"
    monkeypatch.setattr(norm_mod, "_registers_custom_ops", lambda cls: True)  # a recent apex: used as it is
    recent = norm_mod.NormBuilder("apex")
    assert recent.opaque is False and type(recent(num_groups=4, num_channels=16, eps=0.25)) is OldApexGroupNorm
    assert norm_mod.NormBuilder("torch").opaque is False
