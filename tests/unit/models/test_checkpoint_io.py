"""Checkpoint I/O on tiny files written here with the real ldm prefixes and Lightning extras."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
import torch

from sd_mlperf.cli import main as cli_main
from sd_mlperf.config.schema import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from sd_mlperf.models import checkpoint_io as cio
from sd_mlperf.models.text_encoder import build_text_encoder
from sd_mlperf.models.unet import build_unet
from sd_mlperf.models.vae import build_vae
from sd_mlperf.utils.logging import reset_log_once

LIGHTNING = "pytorch_lightning.callbacks.model_checkpoint"


def tiny_model_cfg(checkpoint: str | None = None) -> ModelConfig:
    return ModelConfig(
        unet=UNetConfig(model_channels=16, channel_mult=[1, 2], attention_levels=[1], head_channels=8,
                        context_dim=32, resblock_norm_groups=4, transformer_norm_groups=8, attention_backend="math",
                        norm_backend="torch"),
        vae=VAEConfig(base_channels=8, channel_mult=[1, 1, 2, 2], norm_groups=4),
        text_encoder=TextEncoderConfig(width=32, num_heads=2, num_layers=2),
        frozen_checkpoint=checkpoint,
    )


class _FakeModule:
    """Registers a throw-away `pytorch_lightning` package so the test can pickle its class by name."""

    def __enter__(self):
        names = ["pytorch_lightning", "pytorch_lightning.callbacks", LIGHTNING]
        self.saved = {n: sys.modules.get(n) for n in names}
        for n in names:
            sys.modules[n] = types.ModuleType(n)
        cls = type("ModelCheckpoint", (), {"__module__": LIGHTNING})
        sys.modules[LIGHTNING].ModelCheckpoint = cls
        return cls

    def __exit__(self, *exc):
        for n, m in self.saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def ldm_state(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    state = {cio.UNET_PREFIX + k: v for k, v in build_unet(cfg.unet).state_dict().items()}
    state |= {cio.VAE_PREFIX + k: torch.randn_like(v) for k, v in build_vae(cfg.vae).state_dict().items()}
    state |= {cio.TEXT_PREFIX + k: torch.randn_like(v)
              for k, v in build_text_encoder(cfg.text_encoder).state_dict().items()}
    state |= {name: torch.rand(1000) for name in cio.SCHEDULE_BUFFERS}
    state |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(3, dtype=torch.int32)}
    return state


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("ckpt") / "512-base-ema.ckpt"
    state = ldm_state(tiny_model_cfg())
    with _FakeModule() as model_checkpoint:
        torch.save({"state_dict": state, "global_step": 875000, "epoch": 3,
                    "callbacks": {model_checkpoint: {"best_model_score": None}}, "cb": model_checkpoint()}, path)
    return path, state


def _assert_loaded(vae, text, state):
    for k, v in vae.state_dict().items():
        torch.testing.assert_close(v, state[cio.VAE_PREFIX + k], rtol=0, atol=0)
    for k, v in text.state_dict().items():
        torch.testing.assert_close(v, state[cio.TEXT_PREFIX + k], rtol=0, atol=0)


def test_lightning_checkpoint_loads_frozen_parts(ckpt):
    path, state = ckpt
    assert LIGHTNING not in sys.modules  # only the inert stand-in is available while loading
    vae, text = cio.load_frozen_encoders(path, tiny_model_cfg())
    _assert_loaded(vae, text, state)
    assert not vae.training and not any(p.requires_grad for p in [*vae.parameters(), *text.parameters()])


def test_safe_load_unwraps_state_dict_and_keeps_tensors_only(ckpt):
    path, state = ckpt
    loaded = cio.safe_load_state_dict(path)
    assert loaded.keys() == state.keys()


def test_missing_key_is_named(tmp_path, ckpt):
    _, state = ckpt
    broken = {k: v for k, v in state.items() if k != cio.VAE_PREFIX + "decoder.conv_out.bias"}
    torch.save({"state_dict": broken}, tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match=r"missing: first_stage_model\.decoder\.conv_out\.bias"):
        cio.load_frozen_encoders(tmp_path / "missing.ckpt", tiny_model_cfg())


def test_wrong_shape_is_named(tmp_path, ckpt):
    _, state = ckpt
    broken = state | {cio.TEXT_PREFIX + "ln_final.weight": torch.zeros(5)}
    torch.save({"state_dict": broken}, tmp_path / "shape.ckpt")
    with pytest.raises(ValueError, match=r"wrong shape: cond_stage_model\.model\.ln_final\.weight \(file \(5,\)"):
        cio.load_frozen_encoders(tmp_path / "shape.ckpt", tiny_model_cfg())


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"state_dict": {"a": torch.ones(1)}, "payload": _Exploit(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match=r"refused to load.*'pathlib\.(Path|PosixPath)\.touch'|refused to load"):
        cio.safe_load_state_dict(tmp_path / "evil.ckpt")
    assert not marker.exists()
    with pytest.raises(ValueError, match="refused"):
        cio.load_unet_state_dict(tmp_path / "evil.ckpt")


@pytest.mark.parametrize("damage", ["truncated", "junk"])
def test_corrupt_torch_file_names_the_file(tmp_path, ckpt, damage):
    """A half-downloaded or foreign file gives a ValueError naming it, not a bare torch/pickle error."""
    path, _ = ckpt
    bad = tmp_path / "bad.ckpt"
    data = path.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"hello world" * 10)
    for load in (cio.safe_load_state_dict, cio.load_unet_state_dict):
        with pytest.raises(ValueError, match=r"bad\.ckpt.*truncated or corrupt"):
            load(bad)
    cio.save_safetensors({"a": torch.ones(64, 64)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "bad.safetensors").write_bytes(data[: len(data) // 2] if damage == "truncated" else b"junk" * 8)
    with pytest.raises(ValueError, match=r"bad\.safetensors.*truncated or corrupt"):
        cio.safe_load_state_dict(tmp_path / "bad.safetensors")


def test_sha256_verification(ckpt):
    path, _ = ckpt
    digest = cio.file_sha256(path)
    cio.load_frozen_encoders(path, tiny_model_cfg(), sha256=digest)
    with pytest.raises(ValueError, match="does not match"):
        cio.load_frozen_encoders(path, tiny_model_cfg(), sha256="0" * 64)


def test_build_frozen_encoders_checks_the_hash_unless_told_not_to(ckpt):
    path, state = ckpt
    cfg = tiny_model_cfg(str(path))
    cfg.frozen_checkpoint_sha256 = "0" * 64
    with pytest.raises(ValueError, match="does not match"):
        cio.build_frozen_encoders(cfg)
    vae, text = cio.build_frozen_encoders(cfg, verify_sha256=False)  # another rank of the same node
    _assert_loaded(vae, text, state)


def test_convert_frozen_parts_to_safetensors(tmp_path, ckpt, capsys):
    path, state = ckpt
    out = tmp_path / "frozen.safetensors"
    assert cli_main(["convert-checkpoint", "--input", str(path), "--output", str(out)]) == 0
    converted = cio.safe_load_state_dict(out)
    assert all(k.startswith((cio.VAE_PREFIX, cio.TEXT_PREFIX)) for k in converted)
    assert "frozen tensors" in capsys.readouterr().out
    vae, text = cio.load_frozen_encoders(out, tiny_model_cfg())
    _assert_loaded(vae, text, state)


def test_unet_export_round_trip(tmp_path):
    cfg = tiny_model_cfg()
    unet = build_unet(cfg.unet)
    sd = {k: torch.randn_like(v) for k, v in unet.state_dict().items()}
    # The trainer's layout: the UNet weights under `unet` in a torch file.
    torch.save({"unet": sd, "step": 10}, tmp_path / "ours.pt")
    assert cli_main(["convert-checkpoint", "--unet", str(tmp_path / "ours.pt"),
                     "--output", str(tmp_path / "unet.safetensors")]) == 0
    raw = cio.safe_load_state_dict(tmp_path / "unet.safetensors")
    assert all(k.startswith(cio.UNET_PREFIX) for k in raw) and len(raw) == len(sd)
    for source in ("unet.safetensors", "ours.pt"):
        loaded = cio.load_unet_state_dict(tmp_path / source)
        build_unet(cfg.unet).load_state_dict(loaded, strict=True)
        assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    # An ldm .ckpt: prefix stripped, other parts ignored.
    torch.save({"state_dict": {cio.UNET_PREFIX + k: v for k, v in sd.items()} | {"betas": torch.ones(3)}},
               tmp_path / "ldm.ckpt")
    assert cio.load_unet_state_dict(tmp_path / "ldm.ckpt").keys() == sd.keys()


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_build_frozen_encoders_random_warns_once():
    reset_log_once()
    logger = logging.getLogger("sd_mlperf")
    handler = _Collect()
    logger.addHandler(handler)
    try:
        for _ in range(2):
            vae, text = cio.build_frozen_encoders(tiny_model_cfg(None))
    finally:
        logger.removeHandler(handler)
    assert sum("RANDOM weights" in m for m in handler.messages) == 1
    assert not vae.training and not any(p.requires_grad for p in [*vae.parameters(), *text.parameters()])


def test_random_frozen_encoders_ignore_the_callers_rng_state():
    torch.manual_seed(1)
    vae_a, text_a = cio.build_frozen_encoders(tiny_model_cfg(None))
    torch.manual_seed(2)  # e.g. another rank after per-rank seeding
    vae_b, text_b = cio.build_frozen_encoders(tiny_model_cfg(None))
    for a, b in ((vae_a, vae_b), (text_a, text_b)):
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(pa, pb), name
    vae_c, _ = cio.build_frozen_encoders(tiny_model_cfg(None), seed=1)
    assert not torch.equal(vae_c.encoder.conv_in.weight, vae_a.encoder.conv_in.weight)


def test_build_frozen_encoders_loads_path(ckpt):
    path, state = ckpt
    vae, text = cio.build_frozen_encoders(tiny_model_cfg(str(path)))
    _assert_loaded(vae, text, state)


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown checkpoint type"):
        cio.safe_load_state_dict(tmp_path / "w.npz")
    with pytest.raises(FileNotFoundError):
        cio.safe_load_state_dict(tmp_path / "nope.ckpt")
