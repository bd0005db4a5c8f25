"""The Step1X-Edit diffusion transformer: FLUX.1-style MM-DiT (no guidance embedding) plus the connector.

The double- and single-stream blocks, RoPE, QK-norm, the attention dispatch and the final adaptive norm are
diffusers' FLUX modules, which compute the same function as the official `modules/layers.py`. What is
Step1X-specific and written here: the timestep/vector MLP embedders (named `time_embed` / `vec_embed` as in the
diffusers-style Step1X checkpoints), the connector call inside the forward, and the module's config. Parameter
names follow diffusers' FluxTransformer2DModel, so diffusers-layout weights load as they are and official
weights are converted by `weights.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.normalization import AdaLayerNormContinuous
from diffusers.models.transformers.transformer_flux import (
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch import nn

from .connector import ConnectorConfig, Step1XConnector


@dataclass(frozen=True)
class DiTConfig:
    """Mirrors the official `Step1XParams`; defaults are the full-size model."""

    in_channels: int = 64  # 16 latent channels packed 2x2
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10000
    qkv_bias: bool = True
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear with the layer names of the Step1X checkpoints (`in_layer` / `out_layer`).

    Written by hand only because diffusers' equivalent (`TimestepEmbedding`) names its layers linear_1/linear_2.
    """

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class Step1XEditTransformer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if sum(cfg.axes_dim) != cfg.head_dim:
            raise ValueError(f"sum(axes_dim)={sum(cfg.axes_dim)} must equal head_dim={cfg.head_dim}")
        if cfg.connector.hidden_size != cfg.context_in_dim or cfg.connector.vec_dim != cfg.vec_in_dim:
            raise ValueError("connector hidden_size/vec_dim must match the DiT's context_in_dim/vec_in_dim")
        self.cfg = cfg
        h = cfg.hidden_size
        self.pos_embed = FluxPosEmbed(theta=cfg.theta, axes_dim=list(cfg.axes_dim))
        self.x_embedder = nn.Linear(cfg.in_channels, h)
        self.time_embed = MLPEmbedder(256, h)
        self.vec_embed = MLPEmbedder(cfg.vec_in_dim, h)
        self.context_embedder = nn.Linear(cfg.context_in_dim, h)
        self.transformer_blocks = nn.ModuleList(
            FluxTransformerBlock(dim=h, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim)
            for _ in range(cfg.depth)
        )
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleTransformerBlock(
                dim=h, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, mlp_ratio=cfg.mlp_ratio
            )
            for _ in range(cfg.depth_single_blocks)
        )
        self.norm_out = AdaLayerNormContinuous(h, h, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(h, cfg.out_channels)
        self.connector = Step1XConnector(cfg.connector)

    def rotary_embedding(self, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [S, head_dim] for text then image positions; ids are [S, 3] (shared by the batch)."""
        return self.pos_embed(torch.cat([txt_ids, img_ids], dim=0))

    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        llm_embedding: torch.Tensor,
        t_vec: torch.Tensor,
        mask: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The official `Step1XEdit.forward`: img [B, N, 64] packed tokens (target then reference), ids [N, 3] /
        [L, 3] (a leading batch dim is accepted and must be uniform), timesteps / t_vec [B] in [0, 1],
        llm_embedding [B, L, C], mask [B, L]. Returns [B, N, out_channels] for all N image tokens."""
        if rotary_emb is None:
            if img_ids.ndim == 3:
                img_ids, txt_ids = img_ids[0], txt_ids[0]
            rotary_emb = self.rotary_embedding(txt_ids, img_ids)
        dtype = self.x_embedder.weight.dtype
        txt, y = self.connector(llm_embedding.to(dtype), t_vec, mask)

        t_emb = get_timestep_embedding(timesteps * 1000, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
        vec = self.time_embed(t_emb.to(dtype)) + self.vec_embed(y)
        txt = self.context_embedder(txt)
        hidden = self.x_embedder(img.to(dtype))

        for block in self.transformer_blocks:
            txt, hidden = block(hidden_states=hidden, encoder_hidden_states=txt, temb=vec, image_rotary_emb=rotary_emb)
        for block in self.single_transformer_blocks:
            txt, hidden = block(hidden_states=hidden, encoder_hidden_states=txt, temb=vec, image_rotary_emb=rotary_emb)

        return self.proj_out(self.norm_out(hidden, vec))
