"""Cross/self attention: the layer owns q/k/v/out, a core-attention backend does only the math.

Shapes: B batch, L query tokens, S key tokens, H heads, D head channels, C = H*D model channels.
Core backends take and return bshd tensors (q_BLHD, k_BSHD, v_BSHD -> out_BLHD):
- `math`: explicit softmax(q k^T * D^-0.5) v with the logits and softmax in fp32, as the ldm
  reference (`_ATTN_PRECISION = "fp32"`) computes it. The reference twin.
- `sdpa`: torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels).
- `te`: Transformer Engine DotProductAttention, bshd, no mask (cuDNN fused attention on GPU). TE's
  fused and flash kernels need fp16/bf16 inputs, so `auto` takes it only for half-precision compute
  (models/unet.py). TE modules save an `_extra_state` entry each; ours is made to save none, so every
  backend has the same state dict (see `_without_extra_state`).
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from sd_mlperf.backends import BackendUnavailable

# Where te builds before the no-extra-state fix saved their (empty) TE extra state, under a CrossAttention.
LEGACY_TE_EXTRA_STATE = "core.core._extra_state"


class CoreAttention(Protocol):
    """A core-attention backend: keyword-only constructor, bshd in and out, no parameters."""

    def __init__(self, *, num_heads: int, head_channels: int) -> None: ...

    def __call__(self, q_BLHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor) -> torch.Tensor: ...


class MathAttention(nn.Module):
    """Reference numerics: fp32 logits and softmax, then probabilities in v's dtype times v."""

    def __init__(self, *, num_heads: int, head_channels: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = head_channels**-0.5

    def forward(self, q_BLHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T * scale) v."""
        with torch.autocast(device_type=q_BLHD.device.type, enabled=False):
            logits_BHLS = torch.einsum("blhd,bshd->bhls", q_BLHD.float(), k_BSHD.float()) * self.scale
            probs_BHLS = logits_BHLS.softmax(dim=-1)
        return torch.einsum("bhls,bshd->blhd", probs_BHLS.to(v_BSHD.dtype), v_BSHD)


class SDPAttention(nn.Module):
    """torch scaled_dot_product_attention (it picks flash, memory-efficient or math itself)."""

    def __init__(self, *, num_heads: int, head_channels: int) -> None:
        super().__init__()
        self.num_heads = num_heads

    def forward(self, q_BLHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor) -> torch.Tensor:
        """SDPA on bhsd views of the bshd inputs."""
        out_BHLD = F.scaled_dot_product_attention(q_BLHD.transpose(1, 2), k_BSHD.transpose(1, 2),
                                                  v_BSHD.transpose(1, 2))
        return out_BHLD.transpose(1, 2)


@functools.cache
def _without_extra_state(cls: type[nn.Module]) -> type[nn.Module]:
    """`cls` with nn.Module's own (absent) extra state: no `_extra_state` key is saved or expected.

    TE's base module overrides get_extra_state to save its FP8 metadata, so torch adds one
    `prefix + "_extra_state"` entry per DotProductAttention (an empty tensor outside fp8_autocast,
    which this UNet never uses) and then requires it on a strict load; TE's load hook forgives only
    keys containing `core_attention._extra_state`. torch saves and expects that entry only when the
    class overrides get_extra_state / set_extra_state, so a subclass that restores nn.Module's methods
    removes it, and the te state dict equals the sdpa/math one (models never rename or add state).
    """
    return type(f"{cls.__name__}NoExtraState", (cls,), {
        "__module__": __name__,
        "get_extra_state": nn.Module.get_extra_state, "set_extra_state": nn.Module.set_extra_state,
    })


class TEAttention(nn.Module):
    """Transformer Engine DotProductAttention (bshd, no mask); holds no parameters and no state."""

    def __init__(self, *, num_heads: int, head_channels: int) -> None:
        super().__init__()
        try:
            from transformer_engine.pytorch import DotProductAttention
        except ImportError as exc:
            raise BackendUnavailable(f"model.unet.attention_backend=te: transformer_engine cannot be imported "
                                     f"({exc}); it ships in the NGC PyTorch container. Set "
                                     "model.unet.attention_backend=sdpa.") from exc
        self.num_heads = num_heads
        self.head_channels = head_channels
        self.core = _without_extra_state(DotProductAttention)(
            num_heads, head_channels, qkv_format="bshd", attn_mask_type="no_mask", attention_dropout=0.0)

    def forward(self, q_BLHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor) -> torch.Tensor:
        """TE returns [B, L, H*D]; reshape back to bshd."""
        out = self.core(q_BLHD.contiguous(), k_BSHD.contiguous(), v_BSHD.contiguous())
        return out.view(q_BLHD.shape[0], q_BLHD.shape[1], self.num_heads, self.head_channels)


def _drop_legacy_te_extra_state(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook: drop the empty TE extra state that te builds saved before they stopped saving it.

    An empty tensor carries nothing (TE writes one outside FP8), so old te checkpoints and ldm exports
    load strictly into every backend; a non-empty one (FP8 metadata) is left to fail as unexpected.
    """
    key = prefix + LEGACY_TE_EXTRA_STATE
    value = state_dict.get(key)
    if isinstance(value, torch.Tensor) and value.numel() == 0:
        del state_dict[key]


CORE_ATTENTION: dict[str, type[nn.Module]] = {"te": TEAttention, "sdpa": SDPAttention, "math": MathAttention}


def build_core_attention(backend: str, *, num_heads: int, head_channels: int) -> nn.Module:
    """The core-attention module of a resolved backend name."""
    if backend == "te" and (head_channels % 8 != 0 or head_channels > 256):
        # cuDNN fused attention needs D a multiple of 8 and at most 256; decided here, not per call.
        raise ValueError(f"model.unet.head_channels={head_channels} is not supported by the te attention backend "
                         "(needs a multiple of 8, at most 256); set model.unet.attention_backend=sdpa.")
    return CORE_ATTENTION[backend](num_heads=num_heads, head_channels=head_channels)


class CrossAttention(nn.Module):
    """ldm CrossAttention: to_q/to_k/to_v (no bias), to_out.0 (bias); self-attention when context is None."""

    def __init__(self, query_dim: int, context_dim: int | None, num_heads: int, head_channels: int,
                 backend: str) -> None:
        super().__init__()
        inner = num_heads * head_channels
        context_dim = query_dim if context_dim is None else context_dim
        self.num_heads = num_heads
        self.head_channels = head_channels
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))
        self.core = build_core_attention(backend, num_heads=num_heads, head_channels=head_channels)
        self.register_load_state_dict_pre_hook(_drop_legacy_te_extra_state)

    def forward(self, x_BLC: torch.Tensor, context_BSE: torch.Tensor | None = None) -> torch.Tensor:
        """Project, attend with the core backend, project out."""
        context_BSE = x_BLC if context_BSE is None else context_BSE
        B, L, _ = x_BLC.shape
        S = context_BSE.shape[1]
        q = self.to_q(x_BLC).view(B, L, self.num_heads, self.head_channels)
        k = self.to_k(context_BSE).view(B, S, self.num_heads, self.head_channels)
        v = self.to_v(context_BSE).view(B, S, self.num_heads, self.head_channels)
        out_BLHD = self.core(q, k, v)
        return self.to_out(out_BLHD.reshape(B, L, self.num_heads * self.head_channels))
