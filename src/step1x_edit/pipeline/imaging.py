"""Image <-> tensor conversions and the official resize rules."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

MULTIPLE = 16  # VAE 8x down + 2x2 packing
MAX_ASPECT = 8.0  # refuse strips: the working area stays ~size_level^2, so one side would become enormous


def working_size(width: int, height: int, size_level: int) -> tuple[int, int]:
    """The official `input_process_image` size rule: area ~ size_level^2, aspect kept, sides floored to x16."""
    if width < 1 or height < 1:
        raise ValueError(f"image has no pixels ({width}x{height})")
    r = width / height
    if max(r, 1 / r) > MAX_ASPECT:
        raise ValueError(f"image aspect ratio {width}x{height} is more extreme than {MAX_ASPECT:g}:1")
    if width > height:
        w_new = math.ceil(math.sqrt(size_level * size_level * r))
        h_new = math.ceil(w_new / r)
    else:
        h_new = math.ceil(math.sqrt(size_level * size_level / r))
        w_new = math.ceil(h_new * r)
    w_new, h_new = w_new // MULTIPLE * MULTIPLE, h_new // MULTIPLE * MULTIPLE
    if w_new < MULTIPLE or h_new < MULTIPLE:
        raise ValueError(f"image {width}x{height} is too narrow for working size level {size_level}")
    return w_new, h_new


def resize_filter(version: str) -> Image.Resampling:
    """v1.1 resizes the input with LANCZOS; v1.0 with Pillow's default for RGB images (bicubic)."""
    return Image.Resampling.LANCZOS if version == "v1.1" else Image.Resampling.BICUBIC


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB without surprises: transparent pixels go on white (not black), palette/CMYK/16-bit converted."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def resize_for_model(image: Image.Image, size_level: int, version: str) -> Image.Image:
    w, h = working_size(*image.size, size_level)
    return image.resize((w, h), resize_filter(version))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL -> [1, 3, H, W] float32 in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (arr * 2.0 - 1.0).unsqueeze(0)


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> RGB PIL, with the official conversion (clamp, 127.5 * (x + 1), truncate to uint8)."""
    x = image.detach().float().clamp(-1.0, 1.0)
    arr = (127.5 * (x + 1.0)).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def restore_size(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Back to the input's size with Pillow's default filter, as the official `output_process_image`."""
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)
