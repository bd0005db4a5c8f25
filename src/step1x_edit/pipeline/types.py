"""The pipeline's request and result records: what the engine hands in and gets back."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

# The hosted API's defaults (../shared/seed/step1x-edit-api.txt); the CLI uses the same ones.
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 2.5
DEFAULT_STRENGTH = 0.8


@dataclass
class EditRequest:
    """One edit: `n` images from one input image and instruction."""

    image: Image.Image  # any mode/size; converted to RGB by the pipeline
    prompt: str
    negative_prompt: str = ""
    n: int = 1
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    strength: float = DEFAULT_STRENGTH  # 1.0 = start from pure noise; <1 starts from the noised input latent
    seed: int = -1  # -1 = random; image i uses seed + i
    size_level: int | None = None  # working area ~ size_level^2; None = the pipeline's default
    partial_images: int = 0  # previews wanted (evenly spaced steps) when `run` is given `on_preview`; 0 = none


@dataclass
class EditResult:
    images: list[Image.Image]  # RGB, the input image's size
    seeds: list[int]  # the seed each image used (seed + i)
    text_tokens: int  # encoder input tokens that are text (prompt + negative prompt when guidance runs)
    image_tokens: int  # encoder input tokens that are image patches
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
