"""The pipeline's side of the engine/pipeline seam: the request, the prepared request, the result, the events.

The engine only ever sees these types: it admits an `EditRequest` by asking the pipeline to `prepare` it (validated,
image resized, seeds drawn, batch key known), queues the `PreparedEdit`, hands batches of them to `run`, and passes
the `JobEvent`s that `run` reports (through its callbacks) on to each request's listener. Light on purpose (PIL,
no torch), so the engine and the API import it freely.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from PIL import Image

# The hosted API's defaults (../shared/seed/step1x-edit-api.txt); the HTTP protocol and the CLI use these.
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 2.5
DEFAULT_STRENGTH = 0.8
MAX_SEED = 2**63 - 1
# Random seeds are drawn below 2^53: JavaScript clients parse JSON numbers as doubles, and a reported seed above
# 2^53 would come back as another number. Explicit seeds keep the full range.
RANDOM_SEED_LIMIT = 2**53
# LoRA adapters a request may name, and the bound of their scales (the API, the CLI and the pipeline use these)
MAX_LORAS = 4
MAX_LORA_SCALE = 4.0


@dataclass(frozen=True)
class LoraChoice:
    """One LoRA adapter for a request: its name (a file stem in the server's adapter directory) and scale."""

    name: str
    scale: float = 1.0


@dataclass
class EditRequest:
    """One edit: `n` images from one input image and instruction."""

    image: Image.Image  # any mode/size/orientation; the pipeline applies EXIF orientation and converts to RGB
    prompt: str
    negative_prompt: str = ""
    n: int = 1
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    strength: float = DEFAULT_STRENGTH  # 1.0 = start from pure noise; <1 starts from the noised input latent
    seed: int = -1  # -1 = random; image i uses seed + i
    size_level: int | None = None  # working area ~ size_level^2; None = the pipeline's default
    partial_images: int = 0  # previews wanted (evenly spaced steps) when `run` is given `on_preview`; 0 = none
    loras: tuple[LoraChoice, ...] = ()  # LoRA adapters on the DiT for this request (at most MAX_LORAS)


@dataclass(frozen=True)
class PreparedEdit:
    """A validated request, ready for the worker: everything done that needs no model (orientation, RGB, the resize
    to the working size, the seeds), so the worker thread spends its time on the device."""

    request: EditRequest
    original_size: tuple[int, int]  # after orientation: the size of the output images
    resized: Image.Image  # RGB at the working size
    seeds: tuple[int, ...]  # image i uses seeds[i]
    key: Hashable  # requests with equal keys may be denoised together in lockstep
    # the adapters the request runs with: (name, scale) sorted by name, scale-0 ones dropped (part of the key)
    loras: tuple[tuple[str, float], ...] = ()

    @property
    def images(self) -> int:
        return len(self.seeds)


@dataclass
class EditResult:
    images: list[Image.Image]  # RGB, the input image's size
    seeds: list[int]  # the seed each image used (seed + i)
    text_tokens: int  # encoder input tokens that are text (prompt + negative prompt when guidance runs)
    image_tokens: int  # encoder input tokens that are image patches
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


# --- what happens to a job while it runs (the engine forwards these to the request's listener) ------------------
@dataclass(frozen=True)
class Started:
    """The job left the queue and its batch started."""


@dataclass(frozen=True)
class Progress:
    step: int  # denoising steps done
    total: int


@dataclass(frozen=True)
class Preview:
    step: int  # the step after which the preview was taken
    total: int
    images: list[Image.Image]  # one per output image of the request, at the input's size


JobEvent = Started | Progress | Preview

# `run`'s callbacks: after each step; a request's previews (its index in the batch, the event); between steps.
StepCallback = Callable[[int, int], None]
PreviewCallback = Callable[[int, Preview], None]
StopCheck = Callable[[], bool]


class Cancelled(Exception):
    """`run` stopped between steps because `should_stop()` said so."""


class PipelineLost(Exception):
    """The pipeline can run nothing more: a rank of a multi-process pipeline died or failed mid-batch (the ranks run
    in lockstep, so the others cannot go on). The engine answers its jobs with 503 and stops admitting."""
