"""The Step1X-Edit diffusion transformer as a diffusers model: FLUX.1-style MM-DiT (no guidance embedding) with the
connector inside.

The double- and single-stream blocks, RoPE, QK-norm, the attention dispatch and the final adaptive norm are
diffusers' FLUX modules, which compute the same function as the official `modules/layers.py`. The class is a
diffusers `ModelMixin` so that diffusers' own machinery applies to it unchanged: `ConfigMixin` (config.json,
save/load), `PeftAdapterMixin` (LoRA adapters), `CacheMixin` (first-block cache, TaylorSeer, MagCache hooks on the
FLUX blocks), `AttentionMixin`, regional compilation (`_repeated_blocks`) and context parallelism (`_cp_plan`).

Written here because it is Step1X-specific: the timestep/vector MLP embedders (named `time_embed` / `vec_embed` as in
the diffusers-style Step1X checkpoints), the connector call inside the forward, and the config. The registered
config uses the names of the diffusers port's `Step1XEditTransformer2DModel` (diffusers PR #12249), so
`save_pretrained` writes a `transformer/config.json` that the diffusers-layout loader reads back. Parameter names
follow diffusers' FluxTransformer2DModel; official checkpoints are converted by `weights.py`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention import AttentionMixin
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous
from diffusers.models.transformers.transformer_flux import (
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from diffusers.utils import apply_lora_scale
from torch import nn

from .connector import ConnectorConfig, Step1XConnector


@dataclass(frozen=True)
class DiTConfig:
    """The model's dimensions, typed (presets, loaders, FLOP counts); defaults are the full-size model. Mirrors the
    official `Step1XParams`; `to_diffusers()` gives the model's registered config."""

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
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_diffusers(self) -> dict[str, Any]:
        """The registered config of `Step1XEditTransformer2DModel` (diffusers PR #12249 names, plus `mlp_ratio`,
        `rope_theta`, `connector_mlp_ratio` and `connector_scale_factor`, which that port fixes or drops)."""
        c = self.connector
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.depth,
            "num_single_layers": self.depth_single_blocks,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "joint_attention_dim": self.context_in_dim,
            "vector_in_dim": self.vec_in_dim,
            "axes_dims_rope": list(self.axes_dim),
            "rope_theta": self.theta,
            "mlp_ratio": self.mlp_ratio,
            "connector_in_channels": c.in_channels,
            "connector_hidden_size": c.hidden_size,
            "connector_heads_num": c.num_heads,
            "connector_depth": c.depth,
            "connector_mlp_ratio": c.mlp_ratio,
            "connector_scale_factor": c.has_scale_factor,
        }

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], version: str | None = None) -> DiTConfig:
        """From a registered config or a diffusers `transformer/config.json`; `version` (v1.0 | v1.1) decides the
        connector's scale factor when given (the diffusers port's config does not record it)."""
        c = dict(config)
        heads, head_dim = int(c.get("num_attention_heads", 24)), int(c.get("attention_head_dim", 128))
        in_ch = int(c.get("in_channels", 64))
        vec = int(c.get("vector_in_dim", c.get("pooled_projection_dim", 768)))
        scale = bool(c.get("connector_scale_factor", False)) if version is None else version == "v1.0"
        return cls(
            in_channels=in_ch,
            out_channels=int(c.get("out_channels") or in_ch),
            vec_in_dim=vec,
            context_in_dim=int(c.get("joint_attention_dim", 4096)),
            hidden_size=heads * head_dim,
            mlp_ratio=float(c.get("mlp_ratio", 4.0)),
            num_heads=heads,
            depth=int(c.get("num_layers", 19)),
            depth_single_blocks=int(c.get("num_single_layers", 38)),
            axes_dim=tuple(int(a) for a in c.get("axes_dims_rope", (16, 56, 56))),
            theta=int(c.get("rope_theta", 10000)),
            connector=ConnectorConfig(
                in_channels=int(c.get("connector_in_channels", 3584)),
                hidden_size=int(c.get("connector_hidden_size", 4096)),
                num_heads=int(c.get("connector_heads_num", 32)),
                depth=int(c.get("connector_depth", 2)),
                mlp_ratio=float(c.get("connector_mlp_ratio", 4.0)),
                vec_dim=vec,
                has_scale_factor=scale,
            ),
        )


def unsupported_config(config: Mapping[str, Any]) -> list[str]:
    """What in a transformer config (ours, or a diffusers-port config.json) this model cannot be; [] when fine."""
    c = dict(config)
    refuse = []
    if c.get("guidance_embeds"):
        refuse.append("guidance_embeds=true (Step1X-Edit has no guidance embedding)")
    if c.get("patch_size", 1) != 1:
        refuse.append(f"patch_size={c['patch_size']} (expected 1)")
    if c.get("timestep_in_dim", 256) != 256:
        refuse.append(f"timestep_in_dim={c['timestep_in_dim']} (expected 256)")
    if c.get("connector_need_CA"):
        refuse.append("connector_need_CA=true (the v1.2 connector cross-attention is not supported yet)")
    head_dim = int(c.get("attention_head_dim", 128))
    axes = [int(a) for a in c.get("axes_dims_rope", (16, 56, 56))]
    if sum(axes) != head_dim:
        refuse.append(f"sum(axes_dims_rope)={sum(axes)} must equal attention_head_dim={head_dim}")
    if int(c.get("connector_hidden_size", 4096)) != int(c.get("joint_attention_dim", 4096)):
        refuse.append("connector_hidden_size must equal joint_attention_dim")
    return refuse


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


class Step1XEditTransformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin, CacheMixin, AttentionMixin):
    """The official `Step1XEdit` (connector + DiT) on diffusers' FLUX blocks."""

    _supports_gradient_checkpointing = False
    _in_cache_context = False
    _no_split_modules = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    _repeated_blocks = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]
    # Context parallelism: each rank takes a slice of the text tokens (after the connector, whose masked attention
    # and masked mean need the whole prompt) and of the image tokens, and of the position ids alike, so the rotary
    # embedding computed inside the forward matches its slice; the blocks' attention then runs through diffusers'
    # Ulysses / ring attention, and the output projection is gathered back.
    _cp_plan = {
        "": {
            "img_ids": ContextParallelInput(split_dim=0, expected_dims=2, split_output=False),
            "txt_ids": ContextParallelInput(split_dim=0, expected_dims=2, split_output=False),
        },
        "x_embedder": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
        "context_embedder": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }

    @register_to_config
    def __init__(
        self,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        vector_in_dim: int = 768,
        axes_dims_rope: tuple[int, ...] = (16, 56, 56),
        rope_theta: int = 10000,
        mlp_ratio: float = 4.0,
        connector_in_channels: int = 3584,
        connector_hidden_size: int = 4096,
        connector_heads_num: int = 32,
        connector_depth: int = 2,
        connector_mlp_ratio: float = 4.0,
        connector_scale_factor: bool = False,
        # accepted so a diffusers-port config.json loads as it is; only the values Step1X-Edit v1.0/v1.1 use
        patch_size: int = 1,
        timestep_in_dim: int = 256,
        guidance_embeds: bool = False,
        connector_need_CA: bool = False,  # noqa: N803 - the diffusers port's name
    ):
        super().__init__()
        refuse = unsupported_config(self.config)
        if refuse:
            raise ValueError("unsupported Step1X-Edit transformer config: " + "; ".join(refuse))
        h = num_attention_heads * attention_head_dim
        self.out_channels = out_channels or in_channels
        self.inner_dim = h
        self.pos_embed = FluxPosEmbed(theta=rope_theta, axes_dim=list(axes_dims_rope))
        self.x_embedder = nn.Linear(in_channels, h)
        self.time_embed = MLPEmbedder(timestep_in_dim, h)
        self.vec_embed = MLPEmbedder(vector_in_dim, h)
        self.context_embedder = nn.Linear(joint_attention_dim, h)
        self.transformer_blocks = nn.ModuleList(
            FluxTransformerBlock(dim=h, num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim)
            for _ in range(num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleTransformerBlock(dim=h, num_attention_heads=num_attention_heads,
                                       attention_head_dim=attention_head_dim, mlp_ratio=mlp_ratio)
            for _ in range(num_single_layers)
        )
        self.norm_out = AdaLayerNormContinuous(h, h, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(h, self.out_channels)
        self.connector = Step1XConnector(ConnectorConfig(
            in_channels=connector_in_channels, hidden_size=connector_hidden_size, num_heads=connector_heads_num,
            depth=connector_depth, mlp_ratio=connector_mlp_ratio, vec_dim=vector_in_dim,
            has_scale_factor=connector_scale_factor))

    @classmethod
    def from_dit_config(cls, cfg: DiTConfig) -> Step1XEditTransformer2DModel:
        return cls(**cfg.to_diffusers())

    @property
    def dit_config(self) -> DiTConfig:
        return DiTConfig.from_diffusers(self.config)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations run in (float8-stored or quantised block weights keep the embedders' dtype)."""
        return self.x_embedder.weight.dtype

    @apply_lora_scale("joint_attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        t_vec: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The official `Step1XEdit.forward(img, img_ids, txt_ids, timesteps, llm_embedding, t_vec, mask)`, same
        positional order: packed image tokens [B, N, 64] (target then reference), position ids [N, 3] / [L, 3]
        (shared by the batch), timestep / t_vec [B] in [0, 1], encoder hidden states [B, L, C] and their mask
        [B, L] (1 = valid). Returns [B, N, out_channels] for all N image tokens.

        With a step cache enabled, a call outside `cache_context` (one forward: reference checks, benchmarks) runs in
        a context of its own whose state is dropped afterwards, instead of failing as diffusers' hooks would."""
        args = (hidden_states, img_ids, txt_ids, timestep, encoder_hidden_states, t_vec, encoder_attention_mask,
                joint_attention_kwargs)
        if self.is_cache_enabled and not self._in_cache_context:
            try:
                with self.cache_context("single"):
                    return self._forward(*args)
            finally:
                self._reset_stateful_cache()
        return self._forward(*args)

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: Any):
        """diffusers' `CacheMixin.cache_context`, remembering that one is active (see `forward`)."""
        self._in_cache_context = True
        try:
            with super().cache_context(name, **kwargs):
                yield
        finally:
            self._in_cache_context = False

    def _forward(self, hidden_states, img_ids, txt_ids, timestep, encoder_hidden_states, t_vec,
                 encoder_attention_mask, joint_attention_kwargs):
        dtype = self.compute_dtype
        txt, y = self.connector(encoder_hidden_states.to(dtype), t_vec, encoder_attention_mask)
        t_emb = get_timestep_embedding(timestep * 1000, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
        temb = self.time_embed(t_emb.to(dtype)) + self.vec_embed(y)
        encoder = self.context_embedder(txt)
        hidden = self.x_embedder(hidden_states.to(dtype))
        rotary = self.pos_embed(torch.cat([txt_ids, img_ids], dim=0))

        for block in self.transformer_blocks:
            encoder, hidden = block(hidden_states=hidden, encoder_hidden_states=encoder, temb=temb,
                                    image_rotary_emb=rotary, joint_attention_kwargs=joint_attention_kwargs)
        # A single-stream block returns views into its joined [text; image] sequence (batch stride = the joined
        # length). Handing the first block such views too (one concatenation, as the block itself does) gives
        # every single block the same input strides: one compiled graph instead of two (torch.compile guards on
        # strides). The values are the same.
        if len(self.single_transformer_blocks):
            n_txt = encoder.shape[1]
            joint = torch.cat([encoder, hidden], dim=1)
            encoder, hidden = joint[:, :n_txt], joint[:, n_txt:]
        for block in self.single_transformer_blocks:
            encoder, hidden = block(hidden_states=hidden, encoder_hidden_states=encoder, temb=temb,
                                    image_rotary_emb=rotary, joint_attention_kwargs=joint_attention_kwargs)
        return self.proj_out(self.norm_out(hidden, temb))


__all__ = ["DiTConfig", "MLPEmbedder", "Step1XEditTransformer2DModel", "unsupported_config"]
