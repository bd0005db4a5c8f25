"""The Step1X-Edit connector: Qwen2.5-VL hidden states -> DiT text context and pooled vector.

The per-token path is HunyuanVideo's token refiner, which diffusers ships as `HunyuanVideoTokenRefiner`
(same math: masked-mean pooled text projection + timestep embedding as conditioning, LayerNorm, masked
self-attention with the first key always visible, gated residuals, SiLU MLP). Only the pooled projection and
v1.0's learned `scale_factor` are Step1X-specific and written here. Official checkpoints store this module
under `connector.` with other key names; `weights.py` converts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoTokenRefiner
from torch import nn


@dataclass(frozen=True)
class ConnectorConfig:
    in_channels: int = 3584  # Qwen2.5-VL-7B hidden size
    hidden_size: int = 4096  # = DiT context_in_dim
    num_heads: int = 32
    depth: int = 2
    mlp_ratio: float = 4.0
    vec_dim: int = 768  # pooled vector size (= DiT vec_in_dim)
    # v1.0 scales the pooled mean by (1 + scale_factor), a learned scalar; v1.1 has no such parameter.
    has_scale_factor: bool = True


class Step1XConnector(nn.Module):
    def __init__(self, cfg: ConnectorConfig):
        super().__init__()
        self.cfg = cfg
        self.refiner = HunyuanVideoTokenRefiner(
            in_channels=cfg.in_channels,
            num_attention_heads=cfg.num_heads,
            attention_head_dim=cfg.hidden_size // cfg.num_heads,
            num_layers=cfg.depth,
            mlp_ratio=cfg.mlp_ratio,
        )
        self.global_proj_out = nn.Linear(cfg.in_channels, cfg.vec_dim)
        if cfg.has_scale_factor:
            self.scale_factor = nn.Parameter(torch.full((1,), -0.91))

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L, in_channels], t [B] in [0, 1], mask [B, L] (1 = valid) -> (txt [B, L, hidden], y [B, vec_dim])."""
        mask_f = mask.to(x.dtype).unsqueeze(-1)
        pooled = (x * mask_f).sum(dim=1) / mask_f.sum(dim=1)
        if self.cfg.has_scale_factor:
            pooled = pooled * (1 + self.scale_factor)
        y = self.global_proj_out(pooled)
        txt = self.refiner(x, t * 1000, mask)
        return txt, y
