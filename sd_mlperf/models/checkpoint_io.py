"""Safe checkpoint reading and the frozen-encoder / UNet weight conversions.

Nothing here executes pickled code: torch files load with `weights_only=True`, and the only
non-torch globals accepted are inert stand-ins for the PyTorch Lightning classes that
`512-base-ema.ckpt`-style files carry (REFERENCE.md, "Frozen parts"). Any other global is
refused with an error that names it; there is no fallback to `weights_only=False`.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sd_mlperf.config.closed_division import FROZEN_CHECKPOINT_SHA256
from sd_mlperf.utils.files import atomic_path, file_sha256
from sd_mlperf.utils.logging import log_once, logger

if TYPE_CHECKING:
    from sd_mlperf.config.schema import ModelConfig
    from sd_mlperf.models.text_encoder import FrozenOpenCLIPTextEncoder
    from sd_mlperf.models.vae import AutoencoderKL

TORCH_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."
# Tensors of 512-base-ema.ckpt that belong to neither frozen part nor the UNet (fixtures/README.md).
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
})
KNOWN_EXTRA_PREFIXES = ("model_ema.",)
SD2_BASE_EMA_SHA256 = FROZEN_CHECKPOINT_SHA256  # the closed division accepts only this one


class _LightningStandIn:
    """Inert placeholder for a pickled Lightning object: it stores its state and runs no code."""

    def __setstate__(self, state: object) -> None:
        self.__dict__["_state"] = state


def _stand_in(qualname: str) -> type:
    # One distinct class per name: the weights-only unpickler maps each allow-listed name to one object.
    return type(qualname.rsplit(".", 1)[1], (_LightningStandIn,), {"__module__": __name__})


# Lightning globals found in released SD checkpoints (REFERENCE.md); `lightning.pytorch` is the 2.x name.
LIGHTNING_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
)
_SAFE_GLOBALS = [(_stand_in(name), name) for name in LIGHTNING_GLOBALS]


def _torch_load_weights_only(path: Path) -> object:
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_can_mmap(path))
    except pickle.UnpicklingError as exc:
        match = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"the global '{match.group(1)}'" if match else "an object the safe loader does not allow"
        raise ValueError(
            f"{path}: refused to load: the file pickles {what}, which could run code. Only tensors and the "
            f"Lightning stand-ins ({', '.join(LIGHTNING_GLOBALS)}) are accepted. Convert the file to "
            f"safetensors in an environment you trust, or use a checkpoint that holds only tensors."
        ) from exc
    except (RuntimeError, KeyError, EOFError) as exc:  # torch's reader and the legacy unpickler on bad bytes
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: not a readable PyTorch file ({type(exc).__name__}: {reason}); it is truncated "
                         f"or corrupt. Download it again (a sha256 check catches this: "
                         f"model.frozen_checkpoint_sha256 or --sha256).") from exc


def _can_mmap(path: Path) -> bool:
    # mmap needs the zip format (torch >= 1.6 files); legacy files load without it.
    import zipfile

    return zipfile.is_zipfile(path)


def safe_load_state_dict(path: str | os.PathLike, *, entries: tuple[str, ...] = ("state_dict",)
                         ) -> dict[str, torch.Tensor]:
    """Read a state dict from .ckpt/.pth/.pt/.bin (weights-only) or .safetensors; unwrap `entries` in order.

    The default unwraps Lightning's `state_dict`; non-tensor entries are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc}); it is truncated or corrupt. "
                             "Write or download it again.") from exc
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: unknown checkpoint type '{path.suffix}'; expected .safetensors or one of "
                         f"{', '.join(TORCH_SUFFIXES)}")
    obj = _torch_load_weights_only(path)
    for entry in entries:
        if isinstance(obj, Mapping) and isinstance(obj.get(entry), Mapping):
            obj = obj[entry]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors, possibly under "
                         f"{' or '.join(map(repr, entries))}), got {type(obj).__name__}")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    dropped = [k for k in obj if k not in state]
    if dropped:
        logger.debug("%s: ignoring %d non-tensor entries: %s", path, len(dropped), ", ".join(map(str, dropped[:5])))
    return state


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raise ValueError naming the file and both hashes if its sha256 differs from `expected`."""
    actual = file_sha256(path)
    if actual.lower() != expected.lower():
        raise ValueError(f"{path}: sha256 {actual} does not match the expected {expected}. The file is corrupt or "
                         f"not the one configured; download it again or fix model.frozen_checkpoint_sha256.")


def split_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries whose name starts with `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def check_state_dict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str,
                     prefix: str = "") -> None:
    """Raise ValueError listing missing, unexpected and mis-shaped keys (named with `prefix`) for `module`."""
    expected = module.state_dict()
    missing = [prefix + k for k in expected if k not in state]
    unexpected = [prefix + k for k in state if k not in expected]
    shapes = [f"{prefix}{k} (file {tuple(v.shape)}, model {tuple(expected[k].shape)})"
              for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"{source}: does not match {type(module).__name__}: " + "; ".join(problems)
                         + ". Check that the checkpoint and the model config describe the same network.")


def strict_load(model: torch.nn.Module, path: str | os.PathLike, expected: str) -> None:
    """Load a weights file into `model` with strict=True; a mismatch names the file, the keys and `expected`."""
    state = safe_load_state_dict(path)
    try:
        check_state_dict(model, state, source=str(path))
    except ValueError as exc:
        raise ValueError(f"{exc} Expected {expected}.") from exc
    model.load_state_dict(state, strict=True)


def frozen_parts(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split an ldm state dict into (VAE, text tower) dicts; UNet keys and known extras are dropped."""
    vae = split_prefix(state, VAE_PREFIX)
    text = split_prefix(state, TEXT_PREFIX)
    other = [k for k in state if not k.startswith((VAE_PREFIX, TEXT_PREFIX, UNET_PREFIX))
             and k not in SCHEDULE_BUFFERS and not k.startswith(KNOWN_EXTRA_PREFIXES)]
    if other:
        logger.info("ignoring %d unknown checkpoint keys (e.g. %s)", len(other), ", ".join(other[:3]))
    return vae, text


def load_frozen_encoders(path: str | os.PathLike, cfg: ModelConfig, *, sha256: str | None = None,
                         ) -> tuple[AutoencoderKL, FrozenOpenCLIPTextEncoder]:
    """Build the VAE and text tower from `cfg` and load them strictly from an ldm checkpoint."""
    from sd_mlperf.models.text_encoder import build_text_encoder
    from sd_mlperf.models.vae import build_vae

    if sha256:
        verify_sha256(path, sha256)
    state = safe_load_state_dict(path)
    vae_state, text_state = frozen_parts(state)
    vae = build_vae(cfg.vae)
    text = build_text_encoder(cfg.text_encoder)
    check_state_dict(vae, vae_state, source=str(path), prefix=VAE_PREFIX)
    check_state_dict(text, text_state, source=str(path), prefix=TEXT_PREFIX)
    vae.load_state_dict(vae_state, strict=True)
    text.load_state_dict(text_state, strict=True)
    vae.requires_grad_(False).eval()
    logger.info("loaded VAE (%d tensors) and text tower (%d tensors) from %s; %d UNet keys dropped",
                len(vae_state), len(text_state), path, sum(k.startswith(UNET_PREFIX) for k in state))
    return vae, text


def build_frozen_encoders(cfg: ModelConfig, *, seed: int = 0,
                          verify_sha256: bool = True) -> tuple[AutoencoderKL, FrozenOpenCLIPTextEncoder]:
    """Load the frozen parts from `cfg.frozen_checkpoint`, or build them random (smoke mode) when it is null.

    Random parts are drawn from `seed` alone, not the caller's RNG state, so training ranks, precompute and
    offline evaluation all rebuild the very same "frozen" encoders. `verify_sha256=False` skips the hash
    (the trainer hashes the 5.2 GB file once per node, not once per GPU).
    """
    from sd_mlperf.models.text_encoder import build_text_encoder
    from sd_mlperf.models.vae import build_vae

    if cfg.frozen_checkpoint:
        sha256 = cfg.frozen_checkpoint_sha256 if verify_sha256 else None
        return load_frozen_encoders(cfg.frozen_checkpoint, cfg, sha256=sha256)
    log_once("frozen-random", "model.frozen_checkpoint is null: the VAE and text encoder have RANDOM weights; "
             "losses, FID and CLIP scores are meaningless (smoke/benchmark mode only)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = build_vae(cfg.vae)
        text_encoder = build_text_encoder(cfg.text_encoder)
    vae.requires_grad_(False).eval()
    return vae, text_encoder


def save_safetensors(state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors atomically (contiguous CPU copies, shared storage broken)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def export_unet_ldm(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write our UNet weights as safetensors under ldm names (`model.diffusion_model.*`)."""
    save_safetensors({UNET_PREFIX + k: v for k, v in state_dict.items()}, path, metadata={"format": "pt"})


def load_unet_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """UNet weights from an `export_unet_ldm` file, an ldm .ckpt, a trainer checkpoint or a plain state dict."""
    state = safe_load_state_dict(path, entries=("unet", "state_dict"))  # `unet`: the trainer's checkpoint layout
    if any(k.startswith(UNET_PREFIX) for k in state):
        return split_prefix(state, UNET_PREFIX)
    return state
