"""Flow-matching sampling as the official code does it: shifted schedule, token packing, position ids,
classifier-free guidance with v1.1's per-token norm rescale, Euler steps on the target tokens only.

Written by hand: the schedule, guidance rule and reference-token handling are Step1X-specific and must match
the official arithmetic operation for operation (diffusers' FlowMatchEulerDiscreteScheduler computes the shift
in another order and has no reference tokens).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .types import Cancelled

RESCALE_EXPONENT = 0.4
# `timesteps_truncate` of each version's generate_image: steps with t > truncate use the norm-rescaled guidance.
DEFAULT_TRUNCATE = {"v1.0": 1.0, "v1.1": 0.93}


def get_schedule(num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15) -> list[float]:
    """`linspace(1, 0, steps+1)` shifted by mu(seq_len), in float32 like the official `get_schedule`."""
    t = torch.linspace(1, 0, num_steps + 1)
    m = (max_shift - base_shift) / (4096 - 256)
    mu = m * image_seq_len + (base_shift - m * 256)
    t = math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    return t.tolist()


def start_index(num_steps: int, strength: float) -> int:
    """img2img: the official `t_idx = int((1 - strength) * num_steps)`."""
    return int((1 - strength) * num_steps)


def preview_steps(total: int, count: int) -> list[int]:
    """Evenly spaced steps (1-based, after which a preview is taken) for `count` previews of a `total`-step run.

    The last step is never one of them (its preview would be the result itself), so a short run gives fewer
    previews than asked for: 4 steps and 3 previews -> [1, 2, 3]; 20 and 3 -> [5, 10, 15]; 1 step -> [].
    """
    if count <= 0 or total <= 1:
        return []
    return sorted({min(total - 1, max(1, round((j + 1) * total / (count + 1)))) for j in range(count)})


def pack(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), C*4] (`b c (h 2) (w 2) -> b (h w) (c 2 2)`)."""
    b, c, h, w = latent.shape
    x = latent.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, latent_h: int, latent_w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.reshape(b, latent_h // 2, latent_w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, latent_h, latent_w)


def image_ids(latent_h: int, latent_w: int, reference: bool = False, version: str = "v1.1") -> torch.Tensor:
    """Position ids [N, 3]: target (0, row, col); reference (0, row, col) in v1.0, (1, row+1, col+1) in v1.1."""
    base = 1.0 if (reference and version == "v1.1") else 0.0
    ids = torch.full((latent_h // 2, latent_w // 2, 3), base)
    ids[..., 1] = ids[..., 1] + torch.arange(latent_h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(latent_w // 2)[None, :]
    return ids.reshape(-1, 3)


def rescale_divisor(diff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token L2 norm n of cond-uncond over channels and the divisor n**0.4 where n > 1, else 1."""
    norm = torch.norm(diff, dim=2, keepdim=True)
    divisor = torch.where(norm > 1.0, torch.pow(norm, RESCALE_EXPONENT), torch.ones_like(norm))
    return norm, divisor


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor | float, rescale: bool) -> tuple:
    """`uncond + g * (cond - uncond)`, divided per token by the norm divisor when `rescale`."""
    if rescale:
        norm, divisor = rescale_divisor(cond - uncond)
        return uncond + scale * (cond - uncond) / divisor, norm, divisor
    return uncond + scale * (cond - uncond), None, None


@dataclass
class Conditioning:
    """Encoder output for the DiT: prompt rows, and negative rows when guidance runs (same batch order)."""

    embedding: torch.Tensor  # [B, L, C]
    mask: torch.Tensor  # [B, L]
    neg_embedding: torch.Tensor | None = None
    neg_mask: torch.Tensor | None = None

    @property
    def guided(self) -> bool:
        return self.neg_embedding is not None


@dataclass
class StepTrace:
    """What one step did, for reference checks and debugging (kept only when asked for)."""

    raw_pred: torch.Tensor  # DiT output for all image tokens, cond rows then uncond rows
    x: torch.Tensor | None = None  # target tokens after the step
    rescale_norm: torch.Tensor | None = None
    rescale_divisor: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


def denoise(
    model: torch.nn.Module,
    x: torch.Tensor,
    ref: torch.Tensor,
    target_ids: torch.Tensor,
    ref_ids: torch.Tensor,
    cond: Conditioning,
    timesteps: list[float],
    guidance: torch.Tensor | float,
    truncate: float,
    on_step: Callable[[int, int], None] | None = None,
    trace: list[StepTrace] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_x0: Callable[[int, int, torch.Tensor], None] | None = None,
    x0_at: Callable[[int, int], bool] | None = None,
) -> torch.Tensor:
    """Euler steps on the packed target tokens `x` [B, N, 64] next to the fixed reference tokens `ref` [B, N, 64].

    With negative conditioning the DiT runs on [prompt rows; negative rows] and `guidance` (a float or a [B]
    tensor, one scale per row) combines them. x is kept in float32 whatever the model's dtype.

    `on_x0(step, total, x0)` (previews) is called after `on_step` for the steps where `x0_at(step, total)` is true,
    with the flow-matching prediction of the clean tokens: x_t = t*noise + (1-t)*x0 and v = noise - x0 give
    x0 = x_t - t*v, here taken after the step as x_next - t_next*v (the same value). Nothing extra runs otherwise.

    `should_stop()` is asked before each step; when true the loop raises `Cancelled`. A model with one of diffusers'
    step caches enabled (`is_cache_enabled`) gets its cache state reset for this call and each step wrapped in
    `cache_context` (one context: the prompt and negative rows run as one batch).
    """
    dtype = model.compute_dtype
    n_tok = x.shape[1]
    txt_ids = torch.zeros(cond.embedding.shape[1], 3, device=x.device)
    ids = torch.cat([target_ids, ref_ids], dim=0).to(x.device)
    cached = bool(getattr(model, "is_cache_enabled", False))
    if cached:
        model._reset_stateful_cache()
    emb, mask = cond.embedding, cond.mask
    if cond.guided:
        emb = torch.cat([emb, cond.neg_embedding], dim=0)
        mask = torch.cat([mask, cond.neg_mask], dim=0)
    if isinstance(guidance, torch.Tensor):
        guidance = guidance.to(device=x.device, dtype=torch.float32).reshape(-1, 1, 1)
    ref_in = ref.to(dtype)
    total = len(timesteps) - 1
    try:
        for i, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
            if should_stop is not None and should_stop():
                raise Cancelled("stopped between steps")
            img = torch.cat([x.to(dtype), ref_in], dim=1)
            if cond.guided:
                img = torch.cat([img, img], dim=0)
            t_vec = torch.full((img.shape[0],), t_curr, dtype=dtype, device=x.device)
            context = (model.cache_context("cond", step_index=i, num_inference_steps=total, timestep=t_curr) if cached
                       else contextlib.nullcontext())
            with context:
                raw = model(img, ids, txt_ids, t_vec, emb, t_vec, mask)
            pred = raw[:, :n_tok].float()
            norm = divisor = None
            if cond.guided:
                c, u = pred.chunk(2, dim=0)
                pred, norm, divisor = guide(c, u, guidance, t_curr > truncate)
            x = x + (t_prev - t_curr) * pred
            if trace is not None:
                trace.append(StepTrace(raw_pred=raw.float(), x=x.clone(), rescale_norm=norm, rescale_divisor=divisor))
            if on_step is not None:
                on_step(i + 1, total)
            if on_x0 is not None and (x0_at is None or x0_at(i + 1, total)):
                on_x0(i + 1, total, x - t_prev * pred)
    finally:
        if cached:  # the hooks' saved residuals are this call's tensors: let them go
            model._reset_stateful_cache()
    return x


@dataclass
class SampleResult:
    latent: torch.Tensor  # [B, C, H, W] final target latent
    start_x: torch.Tensor  # [B, C, H, W] the latent the loop started from (noise, or the img2img mix)
    timesteps: list[float]  # the schedule actually run


def sample(
    model: torch.nn.Module,
    noise: torch.Tensor,
    ref_latent: torch.Tensor,
    cond: Conditioning,
    steps: int,
    guidance: torch.Tensor | float,
    version: str,
    strength: float = 1.0,
    init_latent: torch.Tensor | None = None,
    truncate: float | None = None,
    on_step: Callable[[int, int], None] | None = None,
    trace: list[StepTrace] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_x0: Callable[[int, int, torch.Tensor], None] | None = None,
    x0_at: Callable[[int, int], bool] | None = None,
) -> SampleResult:
    """The official generate_image after conditioning: schedule for this latent size, optional img2img start
    at index int((1 - strength) * steps) from t*noise + (1-t)*init, denoise, unpack. Latents [B, 16, H, W].
    `on_x0` gets the predicted clean latent [B, 16, H, W] (see `denoise`)."""
    _, _, h, w = noise.shape
    timesteps = get_schedule(steps, (h // 2) * (w // 2))
    x = noise.float()
    if init_latent is not None and strength < 1.0:
        t_idx = start_index(steps, strength)
        t = timesteps[t_idx]
        x = t * x + (1 - t) * init_latent.float()
        timesteps = timesteps[t_idx:]
    if truncate is None:
        truncate = DEFAULT_TRUNCATE[version]
    out = denoise(
        model,
        pack(x),
        pack(ref_latent.float()),
        image_ids(h, w),
        image_ids(h, w, reference=True, version=version),
        cond,
        timesteps,
        guidance,
        truncate,
        on_step=on_step,
        trace=trace,
        should_stop=should_stop,
        on_x0=None if on_x0 is None else (lambda step, total, x0: on_x0(step, total, unpack(x0, h, w))),
        x0_at=x0_at,
    )
    return SampleResult(latent=unpack(out, h, w), start_x=x, timesteps=timesteps)
