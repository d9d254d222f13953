"""SD2 UNet: full-size structure on the meta device; tiny models for numerics, backends and round trips."""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from sd_mlperf.backends import ROLES, Probe
from sd_mlperf.config import merge_config
from sd_mlperf.config.schema import UNetConfig
from sd_mlperf.models import norm as norm_mod
from sd_mlperf.models.blocks import ResBlock, SpatialTransformer, timestep_embedding
from sd_mlperf.models.norm import TorchGroupNorm
from sd_mlperf.models.unet import UNetModel, build_unet
from sd_mlperf.utils.manifest import count_parameters, read_manifest, state_dict_manifest
from tests.unit.stand_ins import install_fake_transformer_engine

UNET_PREFIX = "model.diffusion_model."
REPO_ROOT = Path(__file__).resolve().parents[3]


def tiny_cfg(**overrides) -> UNetConfig:
    base = dict(model_channels=16, channel_mult=[1, 2], attention_levels=[0, 1], head_channels=8, context_dim=24,
                resblock_norm_groups=4, transformer_norm_groups=8, attention_backend="math", norm_backend="torch")
    return UNetConfig(**{**base, **overrides})


def randomize(module: nn.Module, seed: int = 0) -> None:
    """Non-zero values everywhere, so zero-initialised layers do not hide a path from the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def inputs(batch: int = 2, size: int = 8, cfg: UNetConfig | None = None):
    cfg = cfg or tiny_cfg()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, 7, cfg.context_dim, generator=g)
    return x, t, ctx


@pytest.fixture(scope="module")
def full_unet() -> UNetModel:
    with torch.device("meta"):
        return build_unet(UNetConfig(attention_backend="math", norm_backend="torch"))


def test_full_size_matches_checkpoint_manifest(full_unet, fixtures_dir):
    expected = read_manifest(fixtures_dir / "sd2_512_base_ema_keys.tsv", prefix=UNET_PREFIX)
    assert len(expected) == 686
    assert state_dict_manifest(full_unet) == expected  # names, shapes, dtypes and order
    assert count_parameters(full_unet) == 865_910_724


def test_full_size_group_norm_settings(full_unet):
    norms = {name: m for name, m in full_unet.named_modules() if isinstance(m, nn.GroupNorm)}
    res = [m for n, m in norms.items() if not n.endswith(".norm")]
    st = [m for n, m in norms.items() if n.endswith(".norm")]
    assert len(res) == 45 and len(st) == 16
    assert all((m.num_groups, m.eps, m.act) == (16, 1e-5, "silu") for m in res)
    assert all((m.num_groups, m.eps, m.act) == (32, 1e-6, "") for m in st)
    heads = sorted({m.attn1.num_heads for m in full_unet.modules() if hasattr(m, "attn1")})
    assert heads == [5, 10, 20]


def test_zero_initialised_layers():
    unet = build_unet(tiny_cfg())
    zero = [unet.out[2]]
    zero += [m.out_layers[3] for m in unet.modules() if isinstance(m, ResBlock)]
    zero += [m.proj_out for m in unet.modules() if isinstance(m, SpatialTransformer)]
    assert all(torch.count_nonzero(p) == 0 for m in zero for p in m.parameters())
    assert torch.count_nonzero(unet.input_blocks[0][0].weight) > 0  # defaults elsewhere
    x, t, ctx = inputs()
    assert torch.count_nonzero(unet(x, t, ctx)) == 0  # zero output head at init, as the reference


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0, 10])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = [math.exp(-math.log(10000) * i / 4) for i in range(4)]
    want = [math.cos(10 * f) for f in freqs] + [math.sin(10 * f) for f in freqs]
    torch.testing.assert_close(emb[1], torch.tensor(want))


def test_forward_shape_and_backward():
    unet = build_unet(tiny_cfg())
    randomize(unet)
    x, t, ctx = inputs()
    out = unet(x, t, ctx)
    assert out.shape == x.shape
    out.square().mean().backward()
    missing = [n for n, p in unet.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@pytest.mark.parametrize("src,dst", [("math", "sdpa"), ("sdpa", "math"), ("sdpa", "sdpa")])
def test_state_dict_round_trip_across_backends(src, dst):
    a = build_unet(tiny_cfg(attention_backend=src))
    randomize(a)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = build_unet(tiny_cfg(attention_backend=dst))
    b.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    x, t, ctx = inputs()
    torch.testing.assert_close(b(x, t, ctx), a(x, t, ctx), rtol=1e-5, atol=1e-5)


def test_backend_resolutions_recorded():
    unet = build_unet(tiny_cfg(attention_backend="sdpa"))
    roles = {r.role: r.name for r in unet.backend_resolutions}
    assert roles == {"attention": "sdpa", "norm": "torch"}
    auto = build_unet(tiny_cfg(attention_backend="auto", norm_backend="auto"))
    assert {r.role for r in auto.backend_resolutions} == {"attention", "norm"}
    assert all(r.why.startswith("auto") for r in auto.backend_resolutions)


@pytest.mark.skipif(torch.cuda.is_available(), reason="te/apex may be available on a GPU machine")
def test_unavailable_named_backends_raise_with_fix():
    with pytest.raises(RuntimeError, match="attention_backend=te cannot run here"):
        build_unet(tiny_cfg(attention_backend="te"))
    with pytest.raises(RuntimeError, match="norm_backend=apex cannot run here"):
        build_unet(tiny_cfg(norm_backend="apex", channels_last=True))


def test_channels_last_matches_contiguous():
    a = build_unet(tiny_cfg())
    randomize(a)
    b = build_unet(tiny_cfg(channels_last=True))
    b.load_state_dict(a.state_dict())
    assert b.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    x, t, ctx = inputs()
    torch.testing.assert_close(b(x, t, ctx), a(x, t, ctx), rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_same_gradients():
    a = build_unet(tiny_cfg())
    randomize(a)
    b = build_unet(tiny_cfg(activation_checkpointing=True))
    b.load_state_dict(a.state_dict())
    assert b.middle_block.use_checkpoint and not a.middle_block.use_checkpoint
    x, t, ctx = inputs()
    for m in (a, b):
        m(x, t, ctx).square().mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("checkpointing,expected_runs", [(False, 1), (True, 2)])
def test_activation_checkpointing_recomputes_in_backward(checkpointing, expected_runs):
    """Equal gradients hold with or without recomputation; what checkpointing means is a second forward in backward."""
    unet = build_unet(tiny_cfg(activation_checkpointing=checkpointing)).train()
    runs = []
    for block in (unet.input_blocks[1], unet.middle_block, unet.output_blocks[0]):
        block[0].register_forward_hook(lambda *args: runs.append(torch.is_grad_enabled()))
    x, t, ctx = inputs()
    out = unet(x, t, ctx)
    assert len(runs) == 3
    out.square().mean().backward()
    assert len(runs) == 3 * expected_runs
    with torch.no_grad():  # no recomputation without autograd (evaluation)
        unet(x, t, ctx)
    assert len(runs) == 3 * expected_runs + 3


def test_unet_draws_no_random_numbers_in_training(monkeypatch):
    """What lets activation checkpointing skip saving RNG state: forward + backward leave every RNG untouched."""
    unet = build_unet(tiny_cfg(activation_checkpointing=True)).train()
    randomize(unet)
    x, t, ctx = inputs()
    before = torch.get_rng_state()

    def refuse(*args, **kwargs):  # as torch < 2.10 refuses reading the CUDA RNG state inside a graph capture
        raise RuntimeError("RNG state read during capture")

    monkeypatch.setattr(torch, "get_rng_state", refuse)
    unet(x, t, ctx).square().mean().backward()
    monkeypatch.undo()
    assert torch.equal(torch.get_rng_state(), before)


def test_bf16_autocast_forward_on_cpu():
    unet = build_unet(tiny_cfg(attention_backend="sdpa"))
    randomize(unet)
    x, t, ctx = inputs()
    ref = unet(x, t, ctx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(x, t, ctx)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 5e-2


class FakeApexGroupNorm(TorchGroupNorm):
    """Test double with apex.contrib.group_norm.GroupNorm's constructor and support lists."""

    SUPPORTED_CHANNELS = frozenset({16})
    SUPPORTED_GROUPS = frozenset({4})

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, act=""):
        super().__init__(num_groups, num_channels, eps=eps, act=act)


def _fake_apex(monkeypatch):
    monkeypatch.setattr(norm_mod, "_import_apex_group_norm", lambda: FakeApexGroupNorm)
    # A recent apex, whose module calls its kernels through its own torch.library ops: used as it is.
    monkeypatch.setattr(norm_mod, "_registers_custom_ops", lambda cls: True)
    monkeypatch.setitem(ROLES["norm"][1], "apex", lambda: Probe(True))  # the probe passes; limits still apply


def test_apex_path_counts_unsupported_shapes_and_keeps_names(monkeypatch):
    _fake_apex(monkeypatch)
    fused = build_unet(tiny_cfg(norm_backend="apex", channels_last=True))
    plain = build_unet(tiny_cfg())
    assert state_dict_manifest(fused) == state_dict_manifest(plain)
    kinds = [type(m) for m in fused.modules() if isinstance(m, nn.GroupNorm)]
    # channels 16 with 4 groups are "supported" by the double; 32-channel and 8-group norms are not.
    assert 0 < kinds.count(FakeApexGroupNorm) < len(kinds)
    why = {r.role: r.why for r in fused.backend_resolutions}["norm"]
    assert f"{kinds.count(FakeApexGroupNorm)} layers on apex NHWC" in why and "apex lacks" in why


def test_apex_without_channels_last(monkeypatch):
    _fake_apex(monkeypatch)
    with pytest.raises(ValueError, match="channels_last"):
        build_unet(tiny_cfg(norm_backend="apex", channels_last=False))
    unet = build_unet(tiny_cfg(norm_backend="auto", channels_last=False))
    res = {r.role: r for r in unet.backend_resolutions}["norm"]
    assert res.name == "torch" and "channels_last=false" in res.why
    assert not any(isinstance(m, FakeApexGroupNorm) for m in unet.modules())


def test_checkpoint_manifest_loads_strictly(fixtures_dir):
    """The real checkpoint's UNet rows, as meta tensors, load with strict=True."""
    with torch.device("meta"):
        full_unet = build_unet(UNetConfig(attention_backend="math", norm_backend="torch"))
    rows = read_manifest(fixtures_dir / "sd2_512_base_ema_keys.tsv", prefix=UNET_PREFIX)
    state = {n: torch.empty(shape, dtype=getattr(torch, dt), device="meta") for n, shape, dt in rows}
    result = full_unet.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_smoke_config_builds_and_runs():
    cfg = OmegaConf.to_object(merge_config([REPO_ROOT / "conf" / "smoke.yaml"]).model.unet)
    cfg = dataclasses.replace(cfg, attention_backend="sdpa")
    unet = build_unet(cfg)
    x = torch.randn(1, 4, 8, 8)
    assert unet(x, torch.tensor([5]), torch.randn(1, 77, cfg.context_dim)).shape == x.shape


def test_compile_flag_keeps_names():
    unet = build_unet(tiny_cfg(compile=True))
    assert unet._compiled_call_impl is not None  # nn.Module.compile, applied at build
    assert state_dict_manifest(unet) == state_dict_manifest(build_unet(tiny_cfg()))


def test_channels_last_reaches_every_group_norm():
    """apex's kernel only runs on NHWC input: with channels_last every norm must see it."""
    unet = build_unet(tiny_cfg(channels_last=True))
    randomize(unet)
    seen = []
    for m in unet.modules():
        if isinstance(m, nn.GroupNorm):
            m.register_forward_pre_hook(lambda _m, args: seen.append(
                args[0].is_contiguous(memory_format=torch.channels_last)))
    unet(*inputs())
    assert len(seen) == sum(isinstance(m, nn.GroupNorm) for m in unet.modules()) and all(seen)


TE_FP32_WHY = "te skipped (fp32 compute: TE's fused kernels need fp16/bf16)"


@pytest.mark.parametrize("precisions,chosen", [
    ({"training.precision": "fp32"}, "sdpa"),
    ({"training.precision": "fp16", "eval.precision": "fp32"}, "sdpa"),  # the inline evaluator runs the same module
    ({"training.precision": "fp16", "eval.precision": "bf16"}, "te"),
])
def test_auto_takes_te_only_for_half_precision_compute(monkeypatch, precisions, chosen):
    install_fake_transformer_engine(monkeypatch)  # TE "available": only the precision can rule it out
    monkeypatch.setattr("sd_mlperf.backends.cuda_available", lambda: True)
    unet = build_unet(tiny_cfg(attention_backend="auto"), compute_precisions=precisions)
    res = {r.role: r for r in unet.backend_resolutions}["attention"]
    assert res.name == chosen
    assert (TE_FP32_WHY in res.why) == (chosen == "sdpa"), res.why


def test_named_te_with_fp32_compute_is_a_config_error():
    with pytest.raises(ValueError) as info:
        build_unet(tiny_cfg(attention_backend="te"),
                   compute_precisions={"training.precision": "fp16", "eval.precision": "fp32"})
    msg = str(info.value)
    assert "model.unet.attention_backend=te" in msg and "eval.precision=fp32" in msg  # key and value
    assert "fp16/bf16" in msg  # the reason
    assert "model.unet.attention_backend=sdpa" in msg and "eval.precision=fp16" in msg  # the fixes
