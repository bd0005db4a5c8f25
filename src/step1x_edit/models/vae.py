"""The FLUX autoencoder as diffusers' `AutoencoderKL` (16 latent channels, 8x down, no quant convs).

The official `vae.safetensors` uses the LDM/FLUX key layout; `weights.py` converts it. Scaling follows the
official `AutoEncoder.encode/decode`: latent = scale * (z - shift), z = latent / scale + shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    in_channels: int = 3
    out_ch: int = 3
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def build_vae(cfg: VAEConfig) -> AutoencoderKL:
    n = len(cfg.ch_mult)
    return AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_ch,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=32,
        scaling_factor=cfg.scale_factor,
        shift_factor=cfg.shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def encode_moments(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Raw encoder output [B, 2*z, h, w] (mean then logvar), x in [-1, 1]."""
    return vae.encoder(x)


def encode(vae: AutoencoderKL, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled latent. With a generator, samples the posterior as the official code does; without, uses the mean."""
    mean, logvar = encode_moments(vae, x).chunk(2, dim=1)
    z = mean
    if generator is not None:
        noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
        z = mean + torch.exp(0.5 * logvar) * noise.to(device=mean.device, dtype=mean.dtype)
    cfg = vae.config
    return cfg.scaling_factor * (z - cfg.shift_factor)


def decode(vae: AutoencoderKL, latent: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Image in about [-1, 1] (not clamped) from a scaled latent. `chunk`: at most this many images per decoder
    call (the decoder's activations grow with the batch: ~12.9 GB per 2048x2048 image in fp32); None = all at once.
    Every image is decoded on its own anyway (no op mixes the batch), so chunking changes no value."""
    cfg = vae.config
    z = latent / cfg.scaling_factor + cfg.shift_factor
    if chunk is None or chunk >= z.shape[0]:
        return vae.decoder(z)
    return torch.cat([vae.decoder(part) for part in z.split(max(1, chunk))])
