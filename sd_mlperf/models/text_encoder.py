"""The frozen OpenCLIP ViT-H-14 text tower: tokens -> resblocks 0..22 -> ln_final -> [B, 77, 1024].

Shapes: B batch, L context length (77), D width.
Built from open_clip's own text-tower code with no pretrained download. The module adopts the
tower's parts under the names open_clip's CLIP uses, in its state-dict order, so they equal the
`cond_stage_model.model.*` rows of fixtures/sd2_512_base_ema_keys.tsv (the file also holds
`text_projection` and `logit_scale`, which the penultimate-layer output never uses; they are
kept so the load is strict). The causal mask is a non-persistent buffer, as in open_clip.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sd_mlperf.config.schema import TextEncoderConfig


class FrozenOpenCLIPTextEncoder(nn.Module):
    """Frozen text encoder: eval mode, no grads, and it stays so after .train()."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        from open_clip.model import CLIPTextCfg, _build_text_tower

        text_cfg = CLIPTextCfg(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.width,
                               heads=cfg.num_heads, layers=cfg.num_layers, mlp_ratio=cfg.mlp_ratio)
        # embed_dim = width as in ViT-H-14 (text_projection is width x width there).
        tower = _build_text_tower(cfg.width, text_cfg)
        self.cfg = cfg
        # Parameters first, in open_clip CLIP's registration order, then submodules: the fixture's order.
        self.positional_embedding = tower.positional_embedding
        self.text_projection = tower.text_projection
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.transformer = tower.transformer
        self.token_embedding = tower.token_embedding
        self.ln_final = tower.ln_final
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        self.num_run_layers = cfg.num_layers - cfg.skip_last_layers
        self._tokenizer = None
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenOpenCLIPTextEncoder:
        """Ignore train(): the encoder is frozen and always in eval mode."""
        return super().train(False)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """open_clip's tokenizer: lower-case, SOT/EOT, zero-pad to context length, truncate keeping EOT."""
        if self._tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer

            self._tokenizer = SimpleTokenizer(context_length=self.cfg.context_length)
        return self._tokenizer(list(captions))

    def forward(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> penultimate-layer features after ln_final (B, L, D)."""
        x_BLD = self.token_embedding(tokens_BL) + self.positional_embedding
        mask = self.attn_mask.to(x_BLD.dtype)
        for block in self.transformer.resblocks[: self.num_run_layers]:
            x_BLD = block(x_BLD, attn_mask=mask)
        return self.ln_final(x_BLD)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (B, L, D) context on the module's device."""
        tokens = self.tokenize(captions).to(self.positional_embedding.device)
        return self(tokens)


def build_text_encoder(cfg: TextEncoderConfig) -> FrozenOpenCLIPTextEncoder:
    """Build the frozen text tower from `model.text_encoder` (random weights until loaded)."""
    return FrozenOpenCLIPTextEncoder(cfg)
