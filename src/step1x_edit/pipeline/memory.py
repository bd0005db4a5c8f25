"""How many images fit: the VAE decode chunk and the batch limit, from the device's free memory and the working size.

A constant batch limit is wrong at both ends: four images at size_level 2048 decoded in one fp32 VAE call need
~51 GB beyond the ~41 GB of weights (an 80 GB card runs out), while at 512 a far larger batch fits. So the decode
goes in chunks sized to the memory that is free, and the engine asks `EditPipeline.max_images(key)` before it
fills a batch.

The per-pixel and per-token figures are activation peaks measured on this project's modules (live tensor bytes
counted at the dispatcher, `tests/test_memory.py` re-measures them and holds these constants to them):
- VAE decode: 3073 bytes per output pixel in fp32 (1537 in bf16) for the FLUX VAE (128 channels at full
  resolution), i.e. 12.9 GB for one 2048x2048 image;
- DiT forward: 17.2-17.4 values of the model width per token per batch row in the compute dtype (QKV, rotary
  temporaries in float32, the single blocks' 4x MLP next to the attention output; measured at widths 3072 and
  768), e.g. 1.9 GB for one guided 1024x1024 image in bf16 (2 rows x 8832 tokens).
Both get a 25 % margin on top: cuDNN/cuBLAS workspaces and allocator fragmentation are not in the count.

Written by hand because no library models this pipeline's memory; pure arithmetic, no torch at import.
"""

from __future__ import annotations

import math

VAE_DECODE_BYTES_PER_PIXEL_FP32 = 3073  # measured, FLUX VAE (block_out_channels[0] = 128)
DIT_ACTIVATION_WIDTHS = 17.5  # measured 17.2-17.4: peak activation values per token per row, in units of the hidden size
MARGIN = 1.25  # workspaces and fragmentation
RESERVE_BYTES = 1 << 30  # never plan to fill the last GiB
TEXT_TOKENS = 640  # the conditioner always hands the DiT 640 positions


def vae_decode_bytes(height: int, width: int, dtype_bytes: int = 4, base_channels: int = 128) -> int:
    """Peak activation bytes of decoding one image of height x width pixels (margin included)."""
    per_pixel = VAE_DECODE_BYTES_PER_PIXEL_FP32 * dtype_bytes / 4 * base_channels / 128
    return int(per_pixel * height * width * MARGIN)


def dit_tokens(height: int, width: int) -> int:
    """Tokens of one DiT row for a working size: target + reference image tokens (latent /8, packed 2x2) + text."""
    return 2 * (height // 16) * (width // 16) + TEXT_TOKENS


def dit_bytes_per_image(height: int, width: int, guided: bool, hidden: int = 3072, dtype_bytes: int = 2) -> int:
    """Peak DiT activation bytes one output image adds to a batch (two rows with guidance; margin included)."""
    rows = 2 if guided else 1
    return int(rows * dit_tokens(height, width) * hidden * DIT_ACTIVATION_WIDTHS * dtype_bytes * MARGIN)


def decode_chunk(free_bytes: int, height: int, width: int, dtype_bytes: int = 4, base_channels: int = 128) -> int:
    """Images per VAE decode call that fit in `free_bytes` (at least 1: one image is the smallest unit)."""
    one = vae_decode_bytes(height, width, dtype_bytes, base_channels)
    return max(1, (free_bytes - RESERVE_BYTES) // max(1, one))


def max_images(free_bytes: int, height: int, width: int, guided: bool, *, hidden: int = 3072, dtype_bytes: int = 2,
               vae_dtype_bytes: int = 4, base_channels: int = 128) -> int:
    """Images one pipeline call may hold at this working size: the DiT activations of every image plus one image's
    VAE decode (the decode goes in chunks) within `free_bytes`. At least 1 (a request always gets to try)."""
    room = free_bytes - RESERVE_BYTES - vae_decode_bytes(height, width, vae_dtype_bytes, base_channels)
    per_image = dit_bytes_per_image(height, width, guided, hidden, dtype_bytes)
    return max(1, math.floor(room / per_image)) if room > 0 else 1


def free_device_bytes(device) -> int | None:  # noqa: ANN001 - torch.device (torch imported lazily)
    """Bytes a new allocation can get on a CUDA device: the driver's free memory plus what the caching allocator
    holds unused. None off CUDA (the host's memory is not managed here)."""
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(0, cached))
