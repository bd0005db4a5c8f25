"""`step1x-edit bench`: the full-size model with random weights, timed per stage, against diffusers' FLUX stack.

Cost does not depend on the weights' values, so the benchmark builds every part directly on the device with random
weights (never on the host): the Qwen2.5-VL-7B encoder from its published config, the connector + 12B DiT (v1.1
layout), the FLUX VAE; and, as the baseline, diffusers' `FluxTransformer2DModel` with the same dimensions in plain
eager bf16 with PyTorch SDPA (what the diffusers port of Step1X-Edit runs). One run:

1. environment, bf16 matmul ceiling (large GEMMs timed here), attention-backend micro-benchmark (picks the fastest);
2. parity: a full-width, reduced-depth DiT in fp32 on the device against each fast variant in bf16 (relative error);
3. baseline: DiT time per step at each working size (batch 2 = CFG, 640 text tokens + target + reference tokens);
4. for each mode, applied cumulatively to our pipeline (eager -> fused QKV -> best SDPA backend -> regional compile
   with VAE bf16 + channels_last -> step cache -> FP8): DiT time per step on the same shapes (MFU, speed-up over
   the baseline, host syncs per step), then full edits at each size for each step count (encoder, VAE encode, DiT
   per step, VAE decode, end to end, peak memory);
5. markdown tables, printed last and written to --out (with machine, versions, command and date); a log beside it.

`--tiny` runs the same code on the CPU with the dev dimensions in fp32 (a smoke test, not a performance number).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import gc
import logging
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .bench_args import MODES, add_bench_arguments
from .models import fastpath
from .models.connector import ConnectorConfig
from .models.dit import DiTConfig, Step1XEditTransformer2DModel
from .models.vae import VAEConfig, build_vae

log = logging.getLogger("step1x_edit.bench")

MODE_LABEL = {
    "baseline": "baseline: diffusers FluxTransformer2DModel, eager, PyTorch SDPA",
    "eager": "ours, eager (exact)",
    "fused": "+ fused QKV (exact)",
    "sdpa": "+ best attention backend (exact)",
    "compile": "+ regional compile, VAE bf16 channels_last (exact)",
    "cache": "+ first-block step cache (approximate)",
    "fp8": "+ FP8 dynamic quantisation (approximate)",
}
TXT_TOKENS = 640  # the conditioner always hands the DiT 640 positions
PUBLISHED = (
    "Published reference (official code, one H800, batch 1, CFG, 28 steps, bf16, flash-attention): "
    "512 / 768 / 1024 px: 5 / 11 / 22 s end to end, peak 42.5 / 46.5 / 49.8 GB; FP8 weights 6.8 / 13.5 / 25 s; "
    "TeaCache 16.8 s at 1024."
)

# --------------------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------------------

BENCH_DIT = DiTConfig(connector=ConnectorConfig(has_scale_factor=False))  # full size, v1.1 (no scale_factor)
BENCH_VAE = VAEConfig()


def qwen25_vl_7b_config():
    """Qwen2.5-VL-7B-Instruct's published config.json values (text and vision), transformers 5 layout."""
    from .models.encoder import full_config

    return full_config()


@dataclass(frozen=True)
class Dims:
    """What one bench run builds: full size on the GPU, or the dev dimensions on the CPU (`--tiny`)."""

    dit: DiTConfig
    vae: VAEConfig
    encoder_hidden: int
    tiny: bool

    @property
    def baseline_kwargs(self) -> dict[str, Any]:
        c = self.dit
        return dict(patch_size=1, in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.depth,
                    num_single_layers=c.depth_single_blocks, attention_head_dim=c.head_dim,
                    num_attention_heads=c.num_heads, joint_attention_dim=c.context_in_dim,
                    pooled_projection_dim=c.vec_in_dim, guidance_embeds=False, axes_dims_rope=tuple(c.axes_dim))

    def parity_dit(self) -> DiTConfig:
        """Full width, two double and four single blocks: the per-block arithmetic without 12B parameters."""
        return replace(self.dit, depth=min(2, self.dit.depth), depth_single_blocks=min(4, self.dit.depth_single_blocks))


def dims(tiny: bool) -> Dims:
    if tiny:
        from .models import presets

        return Dims(presets.DEV_DIT, presets.DEV_VAE, presets.DEV_ENCODER_HIDDEN, True)
    return Dims(BENCH_DIT, BENCH_VAE, 3584, False)


# --------------------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------------------


def connector_flops(c: ConnectorConfig, n_txt: int, batch: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one connector call on [batch, n_txt, in_channels]."""
    h, cin, L = c.hidden_size, c.in_channels, n_txt
    per_row = 2 * (256 * h + h * h)  # timestep embedder
    per_row += 2 * (cin * h + h * h)  # pooled text projection
    per_row += 2 * L * cin * h  # proj_in
    mlp = int(h * c.mlp_ratio)
    per_block = 2 * L * 4 * h * h + 4 * L * L * h + 2 * L * 2 * h * mlp + 2 * h * 2 * h
    per_row += c.depth * per_block
    per_row += 2 * cin * c.vec_dim  # global_proj_out
    return batch * per_row


def dit_flops(cfg: DiTConfig, n_img: int, n_txt: int = TXT_TOKENS, batch: int = 2, connector: bool = True) -> int:
    """Matmul FLOPs of one DiT call: `n_img` image tokens (target + reference), `n_txt` text tokens, `batch` rows.

    Every Linear counts 2*M*K*N; attention counts 4*S^2*hidden per row (QK^T and PV). Elementwise work (norms,
    RoPE, activations, modulation arithmetic) is not counted, as usual for MFU."""
    d, S = cfg.hidden_size, n_img + n_txt
    mlp = int(d * cfg.mlp_ratio)
    per_row = 2 * n_img * cfg.in_channels * d + 2 * n_txt * cfg.context_in_dim * d  # x / context embedders
    per_row += 2 * (256 * d + d * d) + 2 * (cfg.vec_in_dim * d + d * d)  # time / vector embedders
    double = 2 * 2 * d * 6 * d  # two AdaLayerNormZero modulations
    double += 2 * S * d * 3 * d + 4 * S * S * d + 2 * S * d * d  # qkv (both streams), attention, out projections
    double += 2 * S * 2 * d * (4 * d)  # feed-forwards (d -> 4d -> d) of both streams
    single = 2 * d * 3 * d + 2 * S * d * (3 * d + mlp) + 4 * S * S * d + 2 * S * (d + mlp) * d
    per_row += cfg.depth * double + cfg.depth_single_blocks * single
    per_row += 2 * d * 2 * d + 2 * n_img * d * cfg.out_channels  # final adaptive norm and projection
    total = batch * per_row
    if connector:
        total += connector_flops(cfg.connector, n_txt, batch)
    return total


def image_tokens(size: int) -> int:
    """Target + reference tokens of a square working size (latent /8, packed 2x2)."""
    return 2 * (size // 16) ** 2


# --------------------------------------------------------------------------------------------------------------
# Building on the device
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


@torch.no_grad()
def init_random_on_device_(module: nn.Module, seed: int) -> nn.Module:
    """The dev preset's rule (weights ~ N(0, 1/fan_in), biases ~ N(0, 0.05^2), norm weights 1 + N(0, 0.1^2)),
    drawn on the parameters' own device: nothing of the size of the model ever exists on the host."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in module.named_parameters():
        g = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
        leaf = name.rsplit(".", 1)[-1]
        is_norm = "norm" in name and not name.endswith((".linear.weight", ".linear.bias"))
        if leaf == "scale_factor":
            p.fill_(-0.91)
        elif is_norm and leaf in ("weight", "scale"):
            p.normal_(1.0, 0.1, generator=g)
        elif leaf == "bias":
            p.normal_(0.0, 0.05, generator=g)
        else:
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=g)
    return module


def build_random(factory: Callable[[], nn.Module], device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """Construct on the meta device in `dtype`, allocate on `device` (to_empty), fill with `init_random_on_device_`."""
    with torch.device("meta"), default_dtype(dtype):
        module = factory()
    buffers = [n for n, _ in module.named_buffers()]
    if buffers:
        raise RuntimeError(f"{type(module).__name__} has buffers {buffers[:3]}: to_empty would leave them garbage")
    module = module.to_empty(device=device)
    return init_random_on_device_(module, seed).eval().requires_grad_(False)


def build_encoder(d: Dims, device: torch.device, dtype: torch.dtype, seed: int):
    """The conditioner with a random Qwen2.5-VL (7B config, built on the device) and the real tokenizer."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from .models.encoder import Step1XConditioner, build_dev_conditioner, dev_processor

    if d.tiny:
        return build_dev_conditioner(seed=seed, device=device, dtype=dtype, hidden_size=d.encoder_hidden)
    config = qwen25_vl_7b_config()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.lm_head = nn.Identity()  # as load_conditioner: the vocabulary projection is never used
    model = model.to(device).eval().requires_grad_(False)
    return Step1XConditioner(model, dev_processor())


def build_ours(d: Dims, device: torch.device, dtype: torch.dtype, seed: int):
    from .pipeline.edit import EditPipeline

    dit = build_random(lambda: Step1XEditTransformer2DModel.from_dit_config(d.dit), device, dtype, seed)
    vae = build_random(lambda: build_vae(d.vae), device, torch.float32, seed + 1)
    conditioner = build_encoder(d, device, dtype, seed + 2)
    pipe = EditPipeline(dit, vae, conditioner, "v1.1", "tiny" if d.tiny else "full", 512, device, dtype)
    return pipe


def build_baseline(d: Dims, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return build_random(lambda: FluxTransformer2DModel(**d.baseline_kwargs), device, dtype, seed)


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Marks on the device's stream (CUDA events) or host clock (CPU); read after one synchronisation."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a


def time_calls(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int = 1) -> float:
    """Mean seconds per call of `fn` after `warmup` calls, synchronising only before and after the timed loop."""
    for _ in range(warmup):
        fn()
    sync(device)
    sw = Stopwatch(device)
    start = sw.mark()
    for _ in range(iters):
        fn()
    end = sw.mark()
    sync(device)
    return sw.seconds(start, end) / iters


class StageTimer:
    """Forward hooks recording device-side start/end marks of each call of the named modules (no syncs)."""

    def __init__(self, device: torch.device, modules: dict[str, list[nn.Module]]):
        self.sw = Stopwatch(device)
        self.marks: dict[str, list[list]] = {k: [] for k in modules}
        self.handles = []
        for name, mods in modules.items():
            for m in mods:
                self.handles.append(m.register_forward_pre_hook(lambda *_, n=name: self.marks[n].append([self.sw.mark()])))
                self.handles.append(m.register_forward_hook(lambda *_, n=name: self.marks[n][-1].append(self.sw.mark())))

    def reset(self) -> None:
        for v in self.marks.values():
            v.clear()

    def durations(self) -> dict[str, list[float]]:
        return {k: [self.sw.seconds(a, b) for a, b in v] for k, v in self.marks.items()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def matmul_ceiling(device: torch.device, dtype: torch.dtype, tiny: bool) -> tuple[float, str]:
    """Best measured TFLOP/s over a few large GEMMs (square and DiT-shaped), in the run's dtype."""
    shapes = [(1024, 1024, 1024)] if tiny else [(8192, 8192, 8192), (17664, 3072, 12288), (17664, 12288, 3072)]
    best, where = 0.0, ""
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        iters = 3 if tiny else 20
        s = time_calls(lambda: a @ b, device, iters, warmup=2)
        tf = 2 * m * k * n / s / 1e12
        log.info("matmul %dx%dx%d %s: %.1f TFLOP/s", m, k, n, dtype, tf)
        if tf > best:
            best, where = tf, f"{m}x{k}x{n}"
        del a, b
    return best, where


def attention_microbench(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int, seq: int,
                         candidates: list[str]) -> tuple[str, dict[str, str]]:
    """Time diffusers' attention dispatch for each backend on [2, seq, heads, head_dim]; the fastest wins."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
        dispatch_attention_fn,
    )

    q, k, v = (torch.randn(2, seq, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    results: dict[str, str] = {}
    best, best_t = "native", math.inf
    for name in candidates:
        try:
            value = fastpath.resolve_attention_backend(name)
            backend = AttentionBackendName(value)
            _check_attention_backend_requirements(backend)
            with torch.inference_mode():
                s = time_calls(lambda: dispatch_attention_fn(q, k, v, backend=backend), device, 3 if device.type == "cpu" else 10)
            results[name] = f"{s * 1e3:.2f} ms"
            if s < best_t:
                best, best_t = name, s
        except Exception as e:  # a backend that is missing or refuses these shapes is reported, not fatal
            results[name] = f"unavailable ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    return best, results


def count_host_syncs(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Synchronising CUDA calls made by `fn` (torch.cuda.set_sync_debug_mode warnings); None off CUDA."""
    if device.type != "cuda":
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius, in float64)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


@dataclass
class DiTInputs:
    img: torch.Tensor
    ids: torch.Tensor
    txt_ids: torch.Tensor
    t: torch.Tensor
    emb: torch.Tensor
    mask: torch.Tensor

    def ours(self, dit: nn.Module) -> torch.Tensor:
        return dit(self.img, self.ids, self.txt_ids, self.t, self.emb, self.t, self.mask)


def dit_inputs(size: int, d: Dims, device: torch.device, dtype: torch.dtype, batch: int = 2, seed: int = 0) -> DiTInputs:
    from .pipeline import sampling

    lat = size // 8
    g = torch.Generator().manual_seed(seed)
    n = (lat // 2) ** 2
    img = torch.randn(batch, 2 * n, d.dit.in_channels, generator=g)
    ids = torch.cat([sampling.image_ids(lat, lat), sampling.image_ids(lat, lat, reference=True, version="v1.1")])
    emb = torch.randn(batch, TXT_TOKENS, d.encoder_hidden, generator=g)
    mask = torch.zeros(batch, TXT_TOKENS, dtype=torch.long)
    mask[:, :300] = 1  # a typical prompt + image: ~300 of the 640 positions are valid
    emb = emb * mask[..., None]
    return DiTInputs(img.to(device, dtype), ids.to(device), torch.zeros(TXT_TOKENS, 3, device=device),
                     torch.full((batch,), 0.6, device=device, dtype=dtype), emb.to(device, dtype), mask.to(device))


def baseline_call(model: nn.Module, x: DiTInputs, d: Dims) -> Callable[[], Any]:
    """One diffusers FLUX forward on the same token counts (context = the connector's output width)."""
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(x.img.shape[0], TXT_TOKENS, d.dit.context_in_dim, generator=g).to(x.img.device, x.img.dtype)
    pooled = torch.randn(x.img.shape[0], d.dit.vec_in_dim, generator=g).to(x.img.device, x.img.dtype)
    return lambda: model(hidden_states=x.img, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=x.t,
                         img_ids=x.ids, txt_ids=x.txt_ids, return_dict=False)


def test_image(size: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size, dtype=np.float32)
    arr = np.stack([base[None, :].repeat(size, 0), base[:, None].repeat(size, 1), rng.uniform(0, 255, (size, size))], -1)
    return Image.fromarray(arr.astype(np.uint8))


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


@dataclass
class StepRow:
    mode: str
    size: int
    status: str = "not run"
    ms: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    speedup: float | None = None
    syncs: int | None = None
    err_vs_eager: float | None = None
    note: str = ""


@dataclass
class E2ERow:
    mode: str
    size: int
    steps: int
    status: str = "not run"
    encoder: float | None = None
    vae_enc: float | None = None
    dit_step: float | None = None
    denoise: float | None = None
    vae_dec: float | None = None
    total: float | None = None
    peak_gb: float | None = None
    note: str = ""


@dataclass
class Report:
    env: dict[str, str] = field(default_factory=dict)
    ceiling: float | None = None
    ceiling_shape: str = ""
    attention: dict[str, str] = field(default_factory=dict)
    best_backend: str = "native"
    parity: list[tuple[str, str, str, str]] = field(default_factory=list)
    steps: list[StepRow] = field(default_factory=list)
    e2e: list[E2ERow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.monotonic(), seconds

    def left(self) -> bool:
        return self.seconds <= 0 or time.monotonic() - self.start < self.seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device: torch.device) -> dict[str, str]:
    import diffusers
    import transformers

    env = {
        "date (UTC)": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "host": platform.node() or "?",
        "python": platform.python_version(),
        "torch": torch.__version__ + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else ""),
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import torchao

        env["torchao"] = torchao.__version__
    except ImportError:
        env["torchao"] = "not installed"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["device"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs"
        with contextlib.suppress(Exception):
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
            env["driver, max SM clock, power limit"] = out.splitlines()[0] if out else "?"
        env["cudnn"] = str(torch.backends.cudnn.version())
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return env


def parity(report: Report, d: Dims, device: torch.device, size: int, seed: int, compile_mode: str,
           modes: list[str], best_backend: str) -> None:
    """fp32 reference vs each variant in bf16 on a full-width, reduced-depth DiT (threshold 1e-2)."""
    cfg = d.parity_dit()
    ref_model = build_random(lambda: Step1XEditTransformer2DModel.from_dit_config(cfg), device, torch.float32, seed)
    x32 = dit_inputs(size, d, device, torch.float32, seed=seed)
    with torch.inference_mode():
        ref = x32.ours(ref_model).float()
    x16 = dit_inputs(size, d, device, torch.bfloat16, seed=seed)
    model = copy.deepcopy(ref_model).to(torch.bfloat16)
    del ref_model
    _free(device)
    label = f"DiT {cfg.depth}+{cfg.depth_single_blocks} blocks, hidden {cfg.hidden_size}, {size}px, batch 2"
    steps: list[tuple[str, Callable[[nn.Module], Any]]] = [("eager bf16", lambda m: None)]
    if "fused" in modes:
        steps.append(("+ fused QKV", lambda m: fastpath.fuse_qkv_(m)))
    if "sdpa" in modes and best_backend != "native":
        steps.append((f"+ attention {best_backend}", lambda m: fastpath.set_attention_backend_(m, best_backend)))
    if "fp8" in modes:
        steps.append(("+ FP8 (torchao), eager", None))
    if "compile" in modes:
        steps.append(("+ regional compile", lambda m: fastpath.compile_blocks_(m, mode=compile_mode)))
    bf16_out = None
    for name, change in steps:
        try:
            if change is None:  # fp8: on a copy, so the exact variants go on unquantised
                q = copy.deepcopy(model)
                fastpath.quantize_fp8_(q, device)
                with torch.inference_mode():
                    out = x16.ours(q).float()
                del q
                report.parity.append((name, label, f"{rel_err(out, ref):.2e}",
                                      f"approximate (not held to 1e-2); vs eager bf16 {rel_err(out, bf16_out):.2e}"))
                continue
            change(model)
            with torch.inference_mode():
                out = x16.ours(model).float()
            bf16_out = out if bf16_out is None else bf16_out
            e = rel_err(out, ref)
            report.parity.append((name, label, f"{e:.2e}", "ok" if e <= 1e-2 else "FAIL (> 1e-2)"))
        except Exception as exc:
            kind = "unavailable" if change is None else "error"
            report.parity.append((name, label, "-", f"{kind}: {type(exc).__name__}: {exc}".splitlines()[0][:160]))
    del model
    _free(device)  # (compiled block graphs stay cached: the full model's blocks reuse them at this size)


class ModeRunner:
    """Applies the modes cumulatively to one pipeline and measures each."""

    def __init__(self, args: argparse.Namespace, d: Dims, device: torch.device, dtype: torch.dtype, report: Report,
                 baseline_ms: dict[int, float], budget: Budget):
        self.args, self.d, self.device, self.dtype = args, d, device, dtype
        self.report, self.baseline_ms, self.budget = report, baseline_ms, budget
        self.pipe = build_ours(d, device, dtype, args.seed)
        if getattr(args, "mesh", None) is not None:  # --cfg-parallel / --ulysses-degree / --ring-degree (cli.py)
            from .models.parallel import parallelize_dit

            parallelize_dit(self.pipe.dit, args.degrees, args.mesh)
        self.active: list[str] = []
        self.compiled = False
        self.eager_out: dict[int, torch.Tensor] = {}
        self.prev_images: dict[tuple[int, int], np.ndarray] = {}
        if device.type == "cuda":
            log.info("pipeline built: %.1f GiB allocated", torch.cuda.memory_allocated(device) / 2**30)

    @property
    def dit(self) -> nn.Module:
        return self.pipe.dit

    def apply(self, mode: str) -> str:
        """Change the pipeline for `mode`; returns a note. Raises (leaving the pipeline as it was) if unavailable."""
        pipe, dit = self.pipe, self.dit
        if mode == "eager":
            return "defaults"
        if mode == "fused":
            return f"{fastpath.fuse_qkv_(dit)} attention modules fused"
        if mode == "sdpa":
            fastpath.set_attention_backend_(dit, self.report.best_backend)
            return f"attention backend {self.report.best_backend}"
        if mode == "compile":
            fastpath.compile_blocks_(dit, mode=self.args.compile_mode)
            self.compiled = True
            bf16 = self.device.type == "cuda"
            fastpath.vae_fast_(pipe.vae, bf16=bf16, channels_last=True)
            if bf16:
                pipe.vae_dtype = torch.bfloat16
            return f"compile mode {self.args.compile_mode}; VAE {'bf16 ' if bf16 else ''}channels_last"
        if mode == "cache":
            pipe.step_cache = fastpath.StepCache(dit, fastpath.PerfOptions(
                step_cache="first_block", step_cache_threshold=self.args.cache_threshold))
            return f"threshold {self.args.cache_threshold}"
        if mode == "fp8":
            fastpath.quantize_fp8_(dit, self.device)  # raises before touching anything if unavailable
            if dit.is_cache_enabled:  # the step cache is measured on its own row
                dit.disable_cache()
            pipe.step_cache = None
            torch._dynamo.reset()
            if self.compiled:
                fastpath.compile_blocks_(dit, mode=self.args.compile_mode)
            return "float8 dynamic, per-row scales; step cache off"
        raise ValueError(mode)

    def warm(self, size: int) -> float:
        start = time.perf_counter()
        self.pipe.warmup([size], guided=True, steps=1)
        sync(self.device)
        return time.perf_counter() - start

    def step_row(self, mode: str, size: int, note: str) -> StepRow:
        row = StepRow(mode, size, note=note)
        x = dit_inputs(size, self.d, self.device, self.dtype, seed=self.args.seed)
        with torch.inference_mode():
            out = x.ours(self.pipe.dit).float()
            if mode == "cache":
                row.note += "; per-step time from the edits below (a repeated step would always hit the cache)"
            else:
                row.ms = 1e3 * time_calls(lambda: x.ours(self.pipe.dit), self.device, self.args.step_iters)
            if mode == "eager":
                self.eager_out[size] = out
            elif size in self.eager_out and mode != "cache":
                row.err_vs_eager = rel_err(out, self.eager_out[size])
            from .pipeline import sampling

            if True:
                def two_steps():
                    cond = sampling.Conditioning(x.emb[:1], x.mask[:1], x.emb[1:], x.mask[1:])
                    sampling.denoise(self.pipe.dit, x.img[:1, : x.img.shape[1] // 2].float(),
                                     x.img[:1, x.img.shape[1] // 2:].float(), x.ids[: x.ids.shape[0] // 2],
                                     x.ids[x.ids.shape[0] // 2:], cond, [1.0, 0.9, 0.8], 4.0, 0.93)
                row.syncs = count_host_syncs(two_steps, self.device)
        if row.ms is not None:
            flops = dit_flops(self.d.dit, image_tokens(size))
            row.tflops = flops / (row.ms / 1e3) / 1e12
            if self.report.ceiling:
                row.mfu = row.tflops / self.report.ceiling
            if size in self.baseline_ms:
                row.speedup = self.baseline_ms[size] / row.ms
        row.status = "ok"
        return row

    def e2e_row(self, mode: str, size: int, steps: int, timer: StageTimer) -> E2ERow:
        from .pipeline.types import EditRequest

        row = E2ERow(mode, size, steps)
        guidance = 6.0 if steps >= 28 else 2.5
        req = EditRequest(image=test_image(size, self.args.seed), prompt="turn the sky purple and add a red kite",
                          steps=steps, guidance_scale=guidance, strength=1.0, seed=self.args.seed, size_level=size)
        _free(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        timer.reset()
        calls_before, skipped_before = (self.pipe.step_cache.calls, self.pipe.step_cache.skipped) if \
            self.pipe.step_cache is not None else (0, 0)
        sync(self.device)
        start = time.perf_counter()
        (res,) = self.pipe.run([req])
        sync(self.device)
        row.total = time.perf_counter() - start
        dur = timer.durations()
        row.encoder = sum(dur["encoder"])
        row.vae_enc = sum(dur["vae_encode"])
        row.vae_dec = sum(dur["vae_decode"])
        row.denoise = sum(dur["dit"])
        row.dit_step = row.denoise / max(1, len(dur["dit"]))
        if self.device.type == "cuda":
            row.peak_gb = torch.cuda.max_memory_allocated(self.device) / 1e9
        img = np.asarray(res.images[0], dtype=np.float64)
        notes = [f"guidance {guidance}"]
        cache = self.pipe.step_cache
        if cache is not None:
            notes.append(f"skipped {cache.skipped - skipped_before}/{cache.calls - calls_before} steps")
        prev = self.prev_images.get((size, steps))
        if prev is not None and mode in ("cache", "fp8"):
            notes.append(f"image vs exact: mean |d| {np.abs(img - prev).mean():.2f}, max {np.abs(img - prev).max():.0f} (0-255)")
        if mode not in ("cache", "fp8"):
            self.prev_images[(size, steps)] = img
        row.note = "; ".join(notes)
        row.status = "ok"
        return row

    def run(self, modes: list[str]) -> None:
        args, rep = self.args, self.report
        enc, enc_call = fastpath.encoder_module(self.pipe.conditioner)
        for mode in MODES:
            if mode not in modes:
                rep.steps += [StepRow(mode, s, "not run (--modes)") for s in args.sizes]
                rep.e2e += [E2ERow(mode, s, n, "not run (--modes)") for s in args.sizes for n in args.steps]
                continue
            if not self.budget.left():
                rep.steps += [StepRow(mode, s, "skipped: time budget") for s in args.sizes]
                rep.e2e += [E2ERow(mode, s, n, "skipped: time budget") for s in args.sizes for n in args.steps]
                continue
            try:
                note = self.apply(mode)
                self.active.append(mode)
                log.info("mode %s: %s", mode, note)
            except Exception as e:
                why = f"unavailable: {type(e).__name__}: {e}".splitlines()[0][:200]
                log.warning("mode %s %s", mode, why)
                rep.steps += [StepRow(mode, s, why) for s in args.sizes]
                rep.e2e += [E2ERow(mode, s, n, why) for s in args.sizes for n in args.steps]
                continue
            timer = StageTimer(self.device, {"encoder": [enc_call], "vae_encode": [self.pipe.vae.encoder],
                                             "vae_decode": [self.pipe.vae.decoder], "dit": [self.pipe.dit]})
            try:
                for size in args.sizes:
                    warm_note = ""
                    if not self.budget.left():
                        rep.steps.append(StepRow(mode, size, "skipped: time budget"))
                        rep.e2e += [E2ERow(mode, size, n, "skipped: time budget") for n in args.steps]
                        continue
                    try:
                        if self.compiled or (not self.d.tiny and mode == self.active[0]):  # first use / compile
                            took = self.warm(size)
                            if mode in ("compile", "cache", "fp8") and self.compiled:
                                warm_note = f"; warm-up (compile) {took:.0f} s"
                        rep.steps.append(self.step_row(mode, size, note + warm_note))
                    except Exception as e:
                        rep.steps.append(StepRow(mode, size, _error(e)))
                        log.exception("step timing %s %d", mode, size)
                        _free(self.device)
                    for n in args.steps:
                        if mode not in args.e2e_modes:
                            rep.e2e.append(E2ERow(mode, size, n, "not run (--e2e-modes)"))
                            continue
                        if not self.budget.left():
                            rep.e2e.append(E2ERow(mode, size, n, "skipped: time budget"))
                            continue
                        try:
                            rep.e2e.append(self.e2e_row(mode, size, n, timer))
                        except Exception as e:
                            rep.e2e.append(E2ERow(mode, size, n, _error(e)))
                            log.exception("edit %s %d %d", mode, size, n)
                            _free(self.device)
                    log.info("mode %s size %d done (%.0f s elapsed)", mode, size, self.budget.elapsed())
            finally:
                timer.remove()


def _error(e: BaseException) -> str:
    kind = "OOM" if "OutOfMemory" in type(e).__name__ else "error"
    return f"{kind}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


def run_baseline(report: Report, d: Dims, device: torch.device, dtype: torch.dtype, args: argparse.Namespace,
                 budget: Budget) -> dict[int, float]:
    ms: dict[int, float] = {}
    try:
        model = build_baseline(d, device, dtype, args.seed)
    except Exception as e:
        report.steps += [StepRow("baseline", s, _error(e)) for s in args.sizes]
        return ms
    for size in args.sizes:
        row = StepRow("baseline", size, note="same token counts, no connector")
        if not budget.left():
            row.status = "skipped: time budget"
        else:
            try:
                x = dit_inputs(size, d, device, dtype, seed=args.seed)
                call = baseline_call(model, x, d)
                with torch.inference_mode():
                    row.ms = 1e3 * time_calls(call, device, args.step_iters)
                flops = dit_flops(d.dit, image_tokens(size), connector=False)
                row.tflops = flops / (row.ms / 1e3) / 1e12
                row.mfu = row.tflops / report.ceiling if report.ceiling else None
                row.speedup = 1.0
                row.status = "ok"
                ms[size] = row.ms
            except Exception as e:
                row.status = _error(e)
                _free(device)
        report.steps.append(row)
    del model
    _free(device)
    return ms


def markdown(report: Report, args: argparse.Namespace, command: str) -> str:
    lines = ["# Step1X-Edit speed on one device", ""]
    if args.tiny:
        lines += ["**CPU smoke run (`--tiny`: dev dimensions, fp32, CPU). Not a performance measurement.**", ""]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in report.env.items()]
    lines += [f"| command | `{command}` |", ""]
    if report.ceiling:
        lines.append(f"Matmul ceiling (measured in this run, {report.env.get('dtype', '')}, best of "
                     f"{report.ceiling_shape}): **{report.ceiling:.1f} TFLOP/s**. MFU = analytic DiT matmul FLOPs per "
                     "step / step time / this ceiling.")
    if report.attention:
        lines.append("Attention backends (one call, [2, S, heads, head_dim] at the largest size): "
                     + ", ".join(f"{k} {v}" for k, v in report.attention.items())
                     + f"; chosen: **{report.best_backend}**.")
    lines += [""]
    if report.parity:
        lines += ["## Parity (bf16 variants against our fp32 path, relative Frobenius error; threshold 1e-2)", "",
                  "| variant | model | rel. error vs fp32 | status |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {s} |" for a, b, c, s in report.parity]
        lines += [""]
    lines += ["## DiT time per step (batch 2 = CFG, 640 text tokens + target + reference tokens)", "",
              "| mode | size | tokens | ms / step | TFLOP/s | MFU | speed-up vs baseline | host syncs (2-step denoise) "
              "| rel. err vs eager | status | notes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.steps:
        lines.append(
            f"| {MODE_LABEL.get(r.mode, r.mode)} | {r.size}² | {image_tokens(r.size) + TXT_TOKENS} | {_fmt(r.ms, '.1f')} "
            f"| {_fmt(r.tflops, '.1f')} | {_fmt(r.mfu, '.1%')} | {_fmt(r.speedup, '.2f')} | {'-' if r.syncs is None else r.syncs} "
            f"| {_fmt(r.err_vs_eager, '.1e')} | {r.status} | {r.note} |")
    lines += ["", "## Edits end to end (seconds; stage times measured on the device, per-step = mean DiT call)", "",
              "| mode | size | steps | encoder | VAE encode | DiT / step | denoise | VAE decode | end to end | peak GB "
              "| status | notes |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.e2e:
        lines.append(
            f"| {MODE_LABEL.get(r.mode, r.mode)} | {r.size}² | {r.steps} | {_fmt(r.encoder, '.3f')} | {_fmt(r.vae_enc, '.3f')} "
            f"| {_fmt(r.dit_step, '.3f')} | {_fmt(r.denoise, '.2f')} | {_fmt(r.vae_dec, '.3f')} | {_fmt(r.total, '.2f')} "
            f"| {_fmt(r.peak_gb, '.1f')} | {r.status} | {r.note} |")
    lines += [""] + [f"- {n}" for n in report.notes] + [f"- {PUBLISHED}"]
    if report.errors:
        lines += ["", "Errors:"] + [f"- {e}" for e in report.errors]
    return "\n".join(lines) + "\n"


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def run_bench(args: argparse.Namespace) -> int:
    tiny = bool(args.tiny)
    device = torch.device(args.device or ("cpu" if tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: no CUDA device; use --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    dtype = torch.float32 if tiny else torch.bfloat16
    args.sizes = _ints(args.sizes) if args.sizes else ([256] if tiny else [512, 768, 1024])
    args.steps = _ints(args.steps) if args.steps else ([3, 2] if tiny else [28, 20])
    args.step_iters = args.step_iters or (2 if tiny else 5)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.e2e_modes = [m.strip() for m in args.e2e_modes.split(",") if m.strip()]
    unknown = [m for m in modes + args.e2e_modes if m not in MODES]
    if unknown:
        print(f"bench: unknown modes {unknown}; choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else None
    log_path = Path(args.log) if args.log else (out.with_suffix(out.suffix + ".log") if out else
                                                 Path(f"bench-{time.strftime('%Y%m%d-%H%M%S')}.log"))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    prev_level = root.level
    root.setLevel(logging.INFO)
    command = getattr(args, "command_line", None) or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    report = Report()
    budget = Budget(args.budget_s)
    d = dims(tiny)
    try:
        report.env = environment(device)
        report.env["dtype"] = str(dtype).removeprefix("torch.")
        if getattr(args, "degrees", None) is not None:
            report.env["parallel"] = f"{args.degrees.describe()} (our DiT only; the baseline and parity on each rank)"
        report.env["model"] = (
            "dev dimensions (DiT hidden 128, 2+2 blocks; tiny Qwen2.5-VL; dev VAE)" if tiny else
            "Step1X-Edit v1.1 full size, random weights: Qwen2.5-VL-7B config, connector, DiT 19+38 blocks "
            "hidden 3072, FLUX VAE"
        )
        report.env["edits"] = ("square input = working size, strength 1.0 (every step runs), CFG on "
                               "(guidance 6.0 at >= 28 steps, 2.5 below), seed " + str(args.seed))
        log.info("bench start: %s", report.env)
        torch.manual_seed(args.seed)
        # One process compiles several variants (parity model, each mode): a clean slate and room for them all.
        torch._dynamo.reset()
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        with torch.inference_mode():
            report.ceiling, report.ceiling_shape = matmul_ceiling(device, dtype, tiny)
        largest = max(args.sizes)
        cands = [c.strip() for c in args.attention_backends.split(",") if c.strip()]
        if tiny:
            cands = [c for c in cands if c in ("native",)] + ["math"]
        report.best_backend, report.attention = attention_microbench(
            device, dtype, d.dit.num_heads, d.dit.head_dim, image_tokens(largest) + TXT_TOKENS, cands)
        log.info("attention backends: %s -> %s", report.attention, report.best_backend)
        if args.parity:
            parity(report, d, device, min(args.sizes), args.seed, args.compile_mode, modes, report.best_backend)
        baseline_ms = run_baseline(report, d, device, dtype, args, budget) if args.baseline else {}
        if not args.baseline:
            report.steps += [StepRow("baseline", s, "not run (--no-baseline)") for s in args.sizes]
        runner = ModeRunner(args, d, device, dtype, report, baseline_ms, budget)
        runner.run(modes)
        report.notes.append(
            "Speed-up = baseline ms/step / our ms/step on identical token counts; ours includes the connector "
            f"(~{100 * connector_flops(d.dit.connector, TXT_TOKENS, 2) / dit_flops(d.dit, image_tokens(largest)):.1f} % of the "
            f"FLOPs at {largest}²), the baseline does not.")
        report.notes.append("Modes are cumulative in the order of the table (each row has the options of the rows "
                            "above it that ran), except that the FP8 row runs without the step cache.")
        report.notes.append("Random weights: the step cache's skip rate and deviation say nothing about real images; "
                            "the first-block residual of a random model changes far more per step than a trained one's.")
    except Exception as e:  # the table is still written
        log.exception("bench failed")
        report.errors.append(_error(e))
    finally:
        text = markdown(report, args, command)
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
        log.info("report:\n%s", text)
        root.removeHandler(handler)
        handler.close()
        root.setLevel(prev_level)
        print(text)
        print(f"(log: {log_path}{', report: ' + str(out) if out else ''})", file=sys.stderr)
    return 1 if report.errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    args.command_line = "python bench/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
