"""The opaque GroupNorm custom op (models/group_norm_op.py): the twin's numerics, and one graph under compile.

apex's extension is wrapped in the same op on a GPU; here the `reference` kernel stands in for it, so these
tests exercise the op's fake implementation, autograd formula and dynamo tracing that the apex path relies on.
"""

import pytest
import torch

from sd_mlperf.models.group_norm_op import KERNELS, apex_passes
from sd_mlperf.models.norm import OpaqueGroupNorm, TorchGroupNorm


def _pair(act: str) -> tuple[OpaqueGroupNorm, TorchGroupNorm]:
    torch.manual_seed(0)
    opaque, reference = OpaqueGroupNorm(4, 16, act=act), TorchGroupNorm(4, 16, act=act)
    with torch.no_grad():
        opaque.weight.normal_()
        opaque.bias.normal_()
    reference.load_state_dict(opaque.state_dict())  # same parameter names as nn.GroupNorm
    return opaque, reference


def _nhwc(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).contiguous(memory_format=torch.channels_last).requires_grad_()


def _forward_backward(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    grads = [x.grad, module.weight.grad, module.bias.grad]
    module.zero_grad(set_to_none=True)
    return [y.detach(), *grads]


@pytest.mark.parametrize("act", ["", "silu"])
def test_op_matches_torch_group_norm_forward_and_backward(act):
    opaque, reference = _pair(act)
    x = _nhwc(2, 16, 5, 6)
    dy = torch.randn(2, 16, 5, 6)
    for got, want, name in zip(_forward_backward(opaque, x, dy), _forward_backward(reference, x, dy),
                               ("y", "dx", "dweight", "dbias"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5, msg=name)
    assert opaque(x).is_contiguous(memory_format=torch.channels_last)  # NHWC in, NHWC out, as apex


def test_op_compiles_into_one_graph_and_matches_eager():
    opaque, _ = _pair("silu")
    x, dy = _nhwc(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(opaque)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    compiled = torch.compile(opaque, fullgraph=True, backend="aot_eager")  # traces forward and backward
    for got, want in zip(_forward_backward(compiled, x, dy), _forward_backward(opaque, x, dy), strict=True):
        torch.testing.assert_close(got, want)
    torch._dynamo.reset()


def test_a_kernel_called_outside_a_custom_op_breaks_the_graph():
    # What the custom op prevents: a call dynamo cannot trace (an extension call in apex's older autograd.Function;
    # here an explicit break stands in for it) splits the graph. Shows the check above can fail.
    forward, _ = KERNELS["reference"]

    def extension_call(x, weight, bias):
        torch._dynamo.graph_break()
        return forward(x, 4, weight, bias, 1e-5, 1, True)[0]

    class Unwrapped(TorchGroupNorm):
        def forward(self, x):
            return extension_call(x, self.weight, self.bias) * 2

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(Unwrapped(4, 16))(_nhwc(2, 16, 4, 4))
    assert explanation.graph_break_count >= 1
    torch._dynamo.reset()


def test_apex_pass_choice_follows_apex():
    assert apex_passes(320, 64 * 64, sm=90) == 2  # 4096 positions: over the one-pass limit of 1024
    assert apex_passes(640, 32 * 32, sm=90) == 1
    assert apex_passes(4096, 512, sm=90) == 2
    assert apex_passes(640, 32 * 32, sm=75) == 2


def test_an_apex_without_custom_ops_runs_through_ours(monkeypatch):
    # An older apex calls its extension from an autograd.Function (a graph break): NormBuilder wraps the extension
    # (`group_norm_cuda`, here a stand-in computing the reference kernel) in sd_mlperf::group_norm_nhwc instead.
    import sys
    import types

    from sd_mlperf.models import group_norm_op
    from sd_mlperf.models import norm as norm_mod

    class OldApexGroupNorm(TorchGroupNorm):
        SUPPORTED_CHANNELS, SUPPORTED_GROUPS = frozenset({16}), frozenset({4})

    forward, backward = KERNELS["reference"]
    extension = types.SimpleNamespace(forward=forward, backward=backward)
    monkeypatch.setitem(sys.modules, "group_norm_cuda", extension)
    monkeypatch.setitem(group_norm_op.KERNELS, "apex", None)  # restored after the test
    monkeypatch.setattr(norm_mod, "_import_apex_group_norm", lambda: OldApexGroupNorm)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    builder = norm_mod.NormBuilder("apex")
    layer = builder(num_groups=4, num_channels=16, eps=1e-5, act="silu")
    assert builder.opaque and isinstance(layer, OpaqueGroupNorm) and layer.kernel == "apex"
    assert "our custom op around apex's extension" in builder.summary()
    reference = TorchGroupNorm(4, 16, act="silu")
    reference.load_state_dict(layer.state_dict())
    x, dy = _nhwc(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    for got, want in zip(_forward_backward(layer, x, dy), _forward_backward(reference, x, dy), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
