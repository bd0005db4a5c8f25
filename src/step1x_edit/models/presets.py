"""Model sizes: `full` (the published model) and `dev` (tiny, random weights, made on the fly, outputs are noise).

The dev preset exists so that the server, the CLI, the tests and CI run without downloading 30 GB of weights.
Its random weights use the golden data's rule (weights ~ N(0, 1/fan_in), biases ~ N(0, 0.05^2), norm weights
1 + N(0, 0.1^2)) so that every block contributes, drawn from one seeded generator: same seed, same model.
"""

from __future__ import annotations

import torch
from torch import nn

from .connector import ConnectorConfig
from .dit import DiTConfig, Step1XEditTransformer2DModel
from .vae import VAEConfig, build_vae

FULL_DIT = DiTConfig()
FULL_VAE = VAEConfig()

DEV_ENCODER_HIDDEN = 64
DEV_DIT = DiTConfig(
    vec_in_dim=128,
    context_in_dim=128,
    hidden_size=128,
    num_heads=4,
    depth=2,
    depth_single_blocks=2,
    axes_dim=(8, 12, 12),
    connector=ConnectorConfig(
        in_channels=DEV_ENCODER_HIDDEN, hidden_size=128, num_heads=4, depth=2, vec_dim=128, has_scale_factor=False
    ),
)
DEV_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
DEV_VERSION = "v1.1"

# Working area per preset when the settings do not name one.
DEFAULT_SIZE_LEVEL = {"full": 1024, "dev": 512}


@torch.no_grad()
def init_random_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        is_norm = "norm" in name and not name.endswith(".linear.weight") and not name.endswith(".linear.bias")
        if leaf == "scale_factor":
            continue  # keeps its constructed value, as in the official model
        if is_norm and leaf in ("weight", "scale"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
        elif leaf == "bias":
            p.copy_(0.05 * torch.randn(p.shape, generator=generator))
        else:
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=generator) / fan_in**0.5)
    return module


def build_dev_dit(seed: int = 0) -> Step1XEditTransformer2DModel:
    return init_random_(Step1XEditTransformer2DModel.from_dit_config(DEV_DIT), torch.Generator().manual_seed(seed)).eval().requires_grad_(False)


def build_dev_vae(seed: int = 0):
    return init_random_(build_vae(DEV_VAE), torch.Generator().manual_seed(seed + 1)).eval().requires_grad_(False)
