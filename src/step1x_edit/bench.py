"""`step1x-edit bench`: the full-size model with random weights, timed on one device, against diffusers' FLUX DiT.

Cost does not depend on the weights' values, so every part is built directly on the device with random weights
(never on the host): Qwen2.5-VL-7B from its published config, the connector + 12B DiT (v1.1 layout), the FLUX VAE;
and, as the baseline, diffusers' `FluxTransformer2DModel` of the same dimensions in plain eager bf16 with PyTorch
SDPA (what the diffusers port of Step1X-Edit runs). The measurement groups (`--modes`, in this order):

baseline   the diffusers DiT, one call at each size (batch 2 = one image with CFG);
eager      our DiT, same shapes (MFU, host syncs per step), then whole edits (`--steps`, default 28 and 20);
attention  diffusers' attention backends timed on the DiT's shapes; the fastest goes on for what follows;
fused      fused QKV projections;
vae        VAE decode of one image, fp32 against bf16 + channels_last (measured apart: nothing else is credited);
compile    regional torch.compile of the DiT blocks (warm-up time, DiT call, whole edits);
http       the real HTTP server on this device with this pipeline: one request of each `--http-n` (latency,
           peak memory, the server's stage times);
fp8        float8 matmuls (torchao) on an uncompiled copy of the DiT (error vs bf16; the exact model stays as it
           was), then, with compile, the copy compiled too (`...+fp8+compile`) and whole edits;
cache      (opt-in) the first-block step cache: with random weights it never skips, so it only costs time;
parity     bf16 variants against fp32 on a full-width, reduced-depth DiT.

After every row the markdown report and its JSON twin are rewritten (`bench_report.py`), so a run killed at a
time limit leaves every row it finished; with `--budget-s` a measurement only starts when the longest one so far
(or its own estimate: a first compile) still fits, and SIGTERM ends the run with the files written. `--tiny` runs
the same code on the CPU with the dev dimensions in fp32 (a dry run, not a performance number).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import datetime as _dt
import gc
import io
import logging
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .bench_args import E2E_MODES, MODES, add_bench_arguments
from .bench_report import Report, Row, Writer, is_exact
from .models import fastpath
from .models.connector import ConnectorConfig
from .models.dit import DiTConfig, Step1XEditTransformer2DModel
from .models.vae import VAEConfig, build_vae

log = logging.getLogger("step1x_edit.bench")

TXT_TOKENS = 640  # the conditioner always hands the DiT 640 positions
# A first regional compile (two block graphs) before the budget lets it start; later ones use the measured time.
COMPILE_ESTIMATE_S = 90.0  # diffusers measured ~10 s for FLUX's regional compile on an H100 (static)

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
    return EditPipeline(dit, vae, conditioner, "v1.1", "tiny" if d.tiny else "full", 512, device, dtype)


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


def time_calls(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int = 1,
               min_warmup_s: float = 0.0) -> float:
    """Mean seconds per call of `fn`, synchronising only before and after the timed loop. Warm-up: at least
    `warmup` calls and at least `min_warmup_s` seconds of them (a GPU's clocks ramp up under load)."""
    start = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - start < min_warmup_s:
        fn()
        done += 1
        if min_warmup_s:
            sync(device)
    sync(device)
    sw = Stopwatch(device)
    a = sw.mark()
    for _ in range(iters):
        fn()
    b = sw.mark()
    sync(device)
    return sw.seconds(a, b) / iters


def ceiling_shapes(tiny: bool) -> list[tuple[int, int, int]]:
    """A square GEMM and the DiT's two largest ones (1024², batch 2: 17664 token rows)."""
    return [(1024, 1024, 1024)] if tiny else [(8192, 8192, 8192), (17664, 3072, 12288), (17664, 12288, 3072)]


def matmul_ceiling(device: torch.device, dtype: torch.dtype, tiny: bool) -> tuple[float, str]:
    """Best measured TFLOP/s over a few large GEMMs in `dtype`."""
    best, where = 0.0, ""
    for m, k, n in ceiling_shapes(tiny):
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        s = time_calls(lambda: a @ b, device, 3 if tiny else 20, warmup=1 if tiny else 5,
                       min_warmup_s=0.0 if tiny else 1.0)
        tf = 2 * m * k * n / s / 1e12
        log.info("matmul %dx%dx%d %s: %.1f TFLOP/s", m, k, n, dtype, tf)
        if tf > best:
            best, where = tf, f"{m}x{k}x{n}"
        del a, b
    return best, where


def fp8_ceiling(device: torch.device, tiny: bool) -> tuple[float, str]:
    """Best measured TFLOP/s of float8 e4m3 GEMMs with per-row scales and bf16 output (`torch._scaled_mm`, what
    torchao's float8 linears and `FP8Linear.scaled_mm` run): the ceiling fp8 modes' MFU is divided by."""
    best, where = 0.0, ""
    for m, k, n in ceiling_shapes(tiny):
        a = torch.randn(m, k, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device=device).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
        sa = torch.ones(m, 1, device=device)
        sb = torch.ones(1, n, device=device)
        s = time_calls(lambda: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16), device,
                       3 if tiny else 20, warmup=1 if tiny else 5, min_warmup_s=0.0 if tiny else 1.0)
        tf = 2 * m * k * n / s / 1e12
        log.info("fp8 matmul %dx%dx%d: %.1f TFLOP/s", m, k, n, tf)
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
                s = time_calls(lambda: dispatch_attention_fn(q, k, v, backend=backend), device,
                               3 if device.type == "cpu" else 10)
            results[name] = f"{s * 1e3:.2f} ms"
            if s < best_t:
                best, best_t = name, s
        except Exception as e:  # a backend that is missing or refuses these shapes is reported, not fatal
            results[name] = f"unavailable ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
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


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


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
# Budget and stopping
# --------------------------------------------------------------------------------------------------------------


class Budget:
    """A measurement starts only when it still fits: elapsed + max(longest measurement so far, its own estimate)
    <= seconds (0 = no limit). `measure()` times one measurement."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.clock, self.seconds = clock, seconds
        self.start = clock()
        self.longest = 0.0

    def elapsed(self) -> float:
        return self.clock() - self.start

    def allows(self, estimate: float = 0.0) -> bool:
        return self.seconds <= 0 or self.elapsed() + max(self.longest, estimate) <= self.seconds

    def why_not(self, estimate: float = 0.0) -> str:
        return (f"skipped: time budget ({self.elapsed():.0f} s elapsed + {max(self.longest, estimate):.0f} s "
                f"expected > {self.seconds:.0f} s)")

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        t = self.clock()
        try:
            yield
        finally:
            self.longest = max(self.longest, self.clock() - t)


class Stopped(BaseException):
    """SIGTERM (a time limit): not an Exception, so no measurement's error handling swallows it."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Stopped(f"signal {signum}")


def _error(e: BaseException) -> str:
    kind = "OOM" if "OutOfMemory" in type(e).__name__ else "error"
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{kind}: {type(e).__name__}: {text}"[:200]


def _unavailable(e: BaseException) -> str:
    return f"unavailable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


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
        "torchao": torchao_version(),
    }
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


def torchao_version() -> str:
    """torchao's version, or why it cannot be used: not installed, or failing on import (a wheel built for another
    torch raises other errors than ImportError; the report says which instead of the run ending there)."""
    try:
        import torchao
    except ImportError:
        return "not installed"
    except Exception as e:  # noqa: BLE001
        return f"unusable: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return str(getattr(torchao, "__version__", "?"))


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------

ORDER = ("fused", "attn", "fp8", "compile", "cache")  # how the options are written in a mode name


class Runner:
    """Builds the models, applies the options group by group, and adds one row per measurement."""

    def __init__(self, args: argparse.Namespace, d: Dims, device: torch.device, dtype: torch.dtype, report: Report,
                 writer: Writer, budget: Budget):
        self.args, self.d, self.device, self.dtype = args, d, device, dtype
        self.report, self.w, self.budget = report, writer, budget
        self.pipe = None
        self.options: dict[str, str] = {}  # option -> its name in mode strings ("attn" -> "cudnn")
        self.eager_out: dict[int, torch.Tensor] = {}
        self.exact_images: dict[tuple[int, int], np.ndarray] = {}
        self.fp8_dit: nn.Module | None = None
        self.fp8_note = ""
        self.compile_s: float | None = None

    # --- bookkeeping --------------------------------------------------------------------------------------------
    def mode(self, *extra: str) -> str:
        names = dict(self.options)
        for e in extra:
            names[e] = e
        parts = [names[o] for o in ORDER if o in names]
        return "+".join(parts) or "eager"

    def measure(self, row: Row, fn: Callable[[Row], None], estimate: float = 0.0) -> Row:
        """Run one measurement into `row` if the budget allows, record its error otherwise, write the files."""
        row.exact = is_exact(row.mode)
        if not self.budget.allows(estimate):
            row.status = self.budget.why_not(estimate)
            return self.w.add(row)
        log.info("measuring %s %s %s²%s", row.kind, row.mode, row.size,
                 f" {row.steps} steps n={row.n}" if row.kind in ("edit", "http") else "")
        with self.budget.measure():
            try:
                fn(row)
            except Exception as e:  # noqa: BLE001 - one failed measurement is a row, not the end of the run
                row.status = _error(e)
                log.exception("%s %s %s failed", row.kind, row.mode, row.size)
                _free(self.device)
        return self.w.add(row)

    def skip(self, kind: str, mode: str, why: str, steps: list[int] | None = None, n: int = 1) -> None:
        for size in self.args.sizes:
            for s in steps or [1]:
                self.w.add(Row(kind, mode, size, s, n, exact=is_exact(mode), status=why))

    # --- groups -------------------------------------------------------------------------------------------------
    def run(self, modes: list[str]) -> None:
        a = self.args
        if "baseline" in modes:
            self.baseline()
        self.pipe = build_ours(self.d, self.device, self.dtype, a.seed)
        if getattr(a, "mesh", None) is not None:  # --cfg-parallel / --ulysses-degree / --ring-degree (cli.py)
            from .models.parallel import parallelize_dit

            parallelize_dit(self.pipe.dit, a.degrees, a.mesh)
        if self.device.type == "cuda":
            log.info("pipeline built: %.1f GiB allocated", torch.cuda.memory_allocated(self.device) / 2**30)
        if "eager" in modes:
            self.dit_steps(syncs=True)
            if "eager" in a.e2e_modes:
                self.edits()
        if "attention" in modes:
            self.attention()
        if "fused" in modes:
            n = fastpath.fuse_qkv_(self.pipe.dit)
            self.options["fused"] = "fused"
            self.pipe.perf = replace(self.pipe.perf, fuse_qkv=True)
            self.dit_steps(note=f"{n} attention modules fused")
        if "vae" in modes:
            self.vae_rows()
        if "compile" in modes:
            self.compile()
        if "http" in modes:  # before fp8: its copy of the DiT would count in the server's peak memory
            self.http()
        if "fp8" in modes:
            self.fp8()
        if "fp8" in modes and "compile" in modes and self.fp8_dit is not None:
            self.fp8_compile()
        if "cache" in modes:
            self.cache()
        if "parity" in modes and a.parity:
            self.parity()

    def baseline(self) -> None:
        try:
            model = build_baseline(self.d, self.device, self.dtype, self.args.seed)
        except Exception as e:  # noqa: BLE001
            self.skip("dit_step", "baseline", _error(e))
            return
        for size in self.args.sizes:
            def fn(row: Row, size: int = size) -> None:
                x = dit_inputs(size, self.d, self.device, self.dtype, seed=self.args.seed)
                with torch.inference_mode():
                    row.seconds = time_calls(baseline_call(model, x, self.d), self.device, self.args.step_iters)
                self._flops(row, connector=False)
            self.measure(Row("dit_step", "baseline", size, note="diffusers FluxTransformer2DModel, eager, PyTorch "
                             "SDPA; same token counts, no connector"), fn)
        del model
        _free(self.device)

    def _flops(self, row: Row, connector: bool = True, fp8: bool = False) -> None:
        flops = dit_flops(self.d.dit, image_tokens(row.size), connector=connector)
        tflops = flops / row.seconds / 1e12
        ceiling = self._ceiling(fp8)
        row.mfu = tflops / ceiling if ceiling else None
        row.extra.update(tokens=image_tokens(row.size) + TXT_TOKENS, tflops=tflops,
                         mfu_ceiling="fp8" if fp8 else self.report.ceilings.get("compute"))
        base = self.report.find("dit_step", "baseline", row.size)
        if base and row.mode != "baseline":
            row.extra["vs_baseline"] = base[0].seconds / row.seconds

    def _ceiling(self, fp8: bool) -> float | None:
        c = self.report.ceilings
        return c.get("fp8_tflops" if fp8 else f"{c.get('compute')}_tflops") or None

    def dit_steps(self, dit: nn.Module | None = None, mode: str | None = None, note: str = "", syncs: bool = False,
                  warmup_s: float | None = None) -> None:
        dit = dit if dit is not None else self.pipe.dit
        mode = mode or self.mode()
        fp8 = "fp8" in mode.split("+")
        for i, size in enumerate(self.args.sizes):
            def fn(row: Row, size: int = size, first: bool = i == 0) -> None:
                x = dit_inputs(size, self.d, self.device, self.dtype, seed=self.args.seed)
                with torch.inference_mode():
                    out = x.ours(dit).float()
                    row.seconds = time_calls(lambda: x.ours(dit), self.device, self.args.step_iters)
                    if mode == "eager":
                        self.eager_out[size] = out
                    elif size in self.eager_out:
                        row.extra["err_vs_bf16"] = rel_err(out, self.eager_out[size])
                    if syncs and first:
                        row.extra["host_syncs_2_steps"] = count_host_syncs(lambda: self._two_steps(x, dit), self.device)
                self._flops(row, fp8=fp8)
                if warmup_s is not None and first:
                    row.extra["warmup_s"] = warmup_s
            self.measure(Row("dit_step", mode, size, note=note), fn)

    def _two_steps(self, x: DiTInputs, dit: nn.Module) -> None:
        from .pipeline import sampling

        half = x.img.shape[1] // 2
        cond = sampling.Conditioning(x.emb[:1], x.mask[:1], x.emb[1:], x.mask[1:])
        sampling.denoise(dit, x.img[:1, :half].float(), x.img[:1, half:].float(), x.ids[: x.ids.shape[0] // 2],
                         x.ids[x.ids.shape[0] // 2:], cond, [1.0, 0.9, 0.8], 4.0, 0.93)

    def edits(self, mode: str | None = None, note: str = "") -> None:
        mode = mode or self.mode()
        for size in self.args.sizes:
            for steps in self.args.steps:
                self.measure(Row("edit", mode, size, steps, 1, note=note),
                             lambda row, size=size, steps=steps: self._edit(row, size, steps))

    def _edit(self, row: Row, size: int, steps: int) -> None:
        from .pipeline.types import EditRequest

        guidance = 6.0 if steps >= 28 else 2.5
        req = EditRequest(image=test_image(size, self.args.seed), prompt="turn the sky purple and add a red kite",
                          steps=steps, guidance_scale=guidance, strength=1.0, seed=self.args.seed, size_level=size)
        cache = self.pipe.step_cache
        before = (cache.calls, cache.skipped) if cache is not None else (0, 0)
        _free(self.device)
        reset_peak(self.device)
        sync(self.device)
        start = time.perf_counter()
        (res,) = self.pipe.run([req])
        sync(self.device)
        row.seconds = time.perf_counter() - start
        stages = {k: round(v, 4) for k, v in res.timings.items()}  # each synchronised on the device (EditPipeline)
        row.extra["stages"] = stages
        row.extra["per_step"] = stages["denoise"] / steps
        row.peak_gib = peak_gib(self.device)
        fp8 = "fp8" in row.mode.split("+")
        ceiling = self._ceiling(fp8)
        if ceiling:
            row.mfu = dit_flops(self.d.dit, image_tokens(size)) * steps / stages["denoise"] / 1e12 / ceiling
        notes = [f"guidance {guidance}"]
        if cache is not None:
            notes.append(f"skipped {cache.skipped - before[1]}/{cache.calls - before[0]} steps")
        img = np.asarray(res.images[0], dtype=np.float64)
        exact = self.exact_images.get((size, steps))
        if is_exact(row.mode):
            self.exact_images.setdefault((size, steps), img)
        elif exact is not None:
            row.extra["image_vs_exact_mean"] = float(np.abs(img - exact).mean())
            notes.append(f"image vs exact: mean |d| {np.abs(img - exact).mean():.2f}, max {np.abs(img - exact).max():.0f} (0-255)")
        row.note = "; ".join(filter(None, [row.note, *notes]))

    def attention(self) -> None:
        cands = [c.strip() for c in self.args.attention_backends.split(",") if c.strip()]
        if self.d.tiny:
            cands = [c for c in cands if c == "native"] + ["math"]
        size = max(self.args.sizes)
        if not self.budget.allows():
            self.report.attention = {"-": self.budget.why_not()}
            self.w.save()
            return
        with self.budget.measure():
            best, results = attention_microbench(self.device, self.dtype, self.d.dit.num_heads, self.d.dit.head_dim,
                                                 image_tokens(size) + TXT_TOKENS, cands)
        self.report.attention, self.report.attention_best = results, best
        self.w.save()
        log.info("attention backends: %s -> %s", results, best)
        if best != "native":
            try:
                fastpath.set_attention_backend_(self.pipe.dit, best)
            except Exception as e:  # noqa: BLE001
                self.skip("dit_step", self.mode("attn"), _unavailable(e))
                return
            self.options["attn"] = best
            self.pipe.perf = replace(self.pipe.perf, attention_backend=best)
            self.dit_steps(note=f"attention backend {best}")

    def vae_rows(self) -> None:
        from .models import vae as vae_ops

        cuda = self.device.type == "cuda"
        fast_name = "bf16+channels_last" if cuda else "channels_last"
        fast = None
        for size in self.args.sizes:
            z = torch.randn(1, self.d.vae.z_channels, size // 8, size // 8, generator=torch.Generator().manual_seed(3))
            z = z.to(self.device)
            ref: dict[str, torch.Tensor] = {}

            def plain(row: Row) -> None:
                with torch.inference_mode():
                    ref["out"] = vae_ops.decode(self.pipe.vae, z).float()
                    row.seconds = time_calls(lambda: vae_ops.decode(self.pipe.vae, z), self.device, 3)

            def quick(row: Row) -> None:
                nonlocal fast
                if fast is None:  # a copy: the pipeline's VAE stays as it is (fp32, exact)
                    fast = fastpath.vae_fast_(copy.deepcopy(self.pipe.vae), bf16=cuda, channels_last=True)
                zz = z.to(torch.bfloat16 if cuda else torch.float32)
                with torch.inference_mode():
                    out = vae_ops.decode(fast, zz).float()
                    row.seconds = time_calls(lambda: vae_ops.decode(fast, zz), self.device, 3)
                if "out" in ref:
                    row.extra["err_vs_fp32"] = rel_err(out, ref["out"])

            self.measure(Row("vae_decode", "fp32", size, note="the pipeline's VAE"), plain)
            self.measure(Row("vae_decode", fast_name, size, exact=not cuda, note="a copy of the VAE"), quick)
        del fast
        _free(self.device)

    def fp8(self) -> None:
        """Float8 matmuls on a copy of the DiT with the exact options so far, uncompiled (the bf16 one stays for
        the exact modes); `fp8_compile` compiles the copy afterwards."""
        mode = "+".join(p for p in self.mode("fp8").split("+") if p != "compile")
        if not self.budget.allows():
            self.skip("dit_step", mode, self.budget.why_not())
            return
        try:
            with self.budget.measure():
                dit = copy.deepcopy(self.pipe.dit)
                for block in fastpath._blocks(dit):  # the copy's blocks would call the original's compiled code
                    block._compiled_call_impl = None
                n = fastpath.quantize_fp8_(dit, self.device)
        except Exception as e:  # noqa: BLE001 - no torchao, no fp8 GPU: the rows say so
            self.skip("dit_step", mode, _unavailable(e))
            dit = None
            _free(self.device)
            return
        self.fp8_dit = dit
        self.fp8_note = f"{n} linears in float8 (torchao per-row dynamic)"
        self.dit_steps(dit, mode, note=self.fp8_note)
        if "fp8" in self.args.e2e_modes and "compile" not in self.args.modes_list:  # else after fp8+compile
            self._with_dit(dit, lambda: self.edits(mode, note=self.fp8_note))

    def _with_dit(self, dit: nn.Module, fn: Callable[[], None]) -> None:
        exact = self.pipe.dit
        self.pipe.dit = dit
        try:
            fn()
        finally:
            self.pipe.dit = exact

    def _compile(self, dit: nn.Module) -> float:
        """Regional compile as the server does it, warmed up on the measured batch (one guided image) at each size;
        returns the warm-up seconds (the compile time)."""
        fastpath.compile_blocks_(dit, mode=self.args.compile_mode)
        start = time.perf_counter()
        self._with_dit(dit, lambda: self.pipe.warmup(self.args.sizes, shapes=[(1, True)]))
        sync(self.device)
        return time.perf_counter() - start

    def compile(self) -> None:
        mode = self.mode("compile")
        estimate = self.compile_s or COMPILE_ESTIMATE_S
        if not self.budget.allows(estimate):
            self.skip("dit_step", mode, self.budget.why_not(estimate))
            return
        # as the server: the pipeline knows it is compiled, so a later run that compiles again is logged
        self.pipe.perf = replace(self.pipe.perf, compile=True, compile_mode=self.args.compile_mode)
        try:
            with self.budget.measure():
                took = self._compile(self.pipe.dit)
        except Exception as e:  # noqa: BLE001
            self.skip("dit_step", mode, _error(e))
            return
        self.compile_s = took
        self.options["compile"] = "compile"
        self.dit_steps(note=f"compile mode {self.args.compile_mode}, dynamic shapes", warmup_s=took)
        if "compile" in self.args.e2e_modes:
            self.edits()

    def fp8_compile(self) -> None:
        mode = self.mode("fp8", "compile")
        if "compile" not in self.options:  # the exact compile did not run (budget, error): no fp8+compile either
            self.skip("dit_step", mode, "not run: the exact compile did not run")
            return
        estimate = self.compile_s or COMPILE_ESTIMATE_S
        if not self.budget.allows(estimate):
            self.skip("dit_step", mode, self.budget.why_not(estimate))
            return
        try:
            with self.budget.measure():
                took = self._compile(self.fp8_dit)
        except Exception as e:  # noqa: BLE001
            self.skip("dit_step", mode, _error(e))
            return
        self.dit_steps(self.fp8_dit, mode, note=self.fp8_note, warmup_s=took)
        if "fp8" in self.args.e2e_modes:
            self._with_dit(self.fp8_dit, lambda: self.edits(mode, note=self.fp8_note))

    def http(self) -> None:
        """The real server (create_app + uvicorn on 127.0.0.1) in this process with this pipeline as it is now."""
        mode = self.mode()
        ns = self.args.http_n
        try:
            server = BenchServer(self.pipe, max(ns), Path(tempfile.mkdtemp(prefix="step1x-bench-")))
        except Exception as e:  # noqa: BLE001 - e.g. the server's packages missing on this machine
            for n in ns:
                self.w.add(Row("http", mode, max(self.args.sizes), self.args.http_steps, n, exact=is_exact(mode),
                               status=_unavailable(e)))
            return
        try:
            size = max(self.args.sizes)
            body = {"model": _model_id(), "prompt": "turn the sky purple and add a red kite",
                    "image": _data_uri(test_image(size, self.args.seed)), "steps": self.args.http_steps,
                    "seed": self.args.seed, "strength": 1.0, "guidance_scale": 2.5, "response_format": "b64_json"}
            one: float | None = None
            for n in ns:
                def fn(row: Row, n: int = n) -> None:
                    before = server.stage_sums()
                    _free(self.device)
                    reset_peak(self.device)
                    status, data, seconds = server.post({**body, "n": n})
                    row.seconds, row.peak_gib = seconds, peak_gib(self.device)
                    if status != 200 or len(data.get("data", [])) != n:
                        raise RuntimeError(f"HTTP {status}: {str(data)[:160]}")
                    after = server.stage_sums()
                    row.extra["server_stages"] = {k: round(after[k] - before.get(k, 0.0), 4) for k in after
                                                  if after[k] - before.get(k, 0.0) > 0}
                estimate = (one or 0.0) * n
                row = self.measure(Row("http", mode, size, self.args.http_steps, n,
                                       note="strength 1.0, guidance 2.5, b64_json; one request at a time"), fn,
                                   estimate=estimate)
                if n == 1 and row.status == "ok":
                    one = row.seconds
        finally:
            server.stop()

    def cache(self) -> None:
        mode = self.mode("cache")
        try:
            self.pipe.step_cache = fastpath.StepCache(self.pipe.dit, fastpath.PerfOptions(
                step_cache="first_block", step_cache_threshold=self.args.cache_threshold))
        except Exception as e:  # noqa: BLE001
            self.skip("edit", mode, _unavailable(e), self.args.steps)
            return
        try:
            self.edits(mode, note=f"first-block cache, threshold {self.args.cache_threshold}; random weights: the "
                                  "skip rate says nothing about real images")
        finally:
            self.pipe.dit.disable_cache()
            self.pipe.step_cache = None

    def parity(self) -> None:
        """fp32 reference vs each bf16 variant on a full-width, reduced-depth DiT (exact variants held to 1e-2)."""
        size = min(self.args.sizes)
        cfg = self.d.parity_dit()
        label = f"DiT {cfg.depth}+{cfg.depth_single_blocks} blocks, hidden {cfg.hidden_size}, batch 2"
        state: dict[str, Any] = {}

        def reference(row: Row) -> None:
            ref_model = build_random(lambda: Step1XEditTransformer2DModel.from_dit_config(cfg), self.device,
                                     torch.float32, self.args.seed)
            x32 = dit_inputs(size, self.d, self.device, torch.float32, seed=self.args.seed)
            with torch.inference_mode():
                state["ref"] = x32.ours(ref_model).float()
            state["model"] = copy.deepcopy(ref_model).to(torch.bfloat16)
            del ref_model
            _free(self.device)
            state["x"] = dit_inputs(size, self.d, self.device, torch.bfloat16, seed=self.args.seed)
            self._parity_check(row, state, lambda m: None)

        variants: list[tuple[str, Callable[[nn.Module], Any]]] = [("fused", fastpath.fuse_qkv_)]
        if self.report.attention_best != "native":
            variants.append((self.report.attention_best,
                             lambda m: fastpath.set_attention_backend_(m, self.report.attention_best)))
        self.measure(Row("parity", "eager", size, note=label), reference)
        for name, change in variants:
            if "model" in state:
                self.measure(Row("parity", name, size, note=label), lambda row, c=change: self._parity_check(row, state, c))
        if "model" in state:
            def fp8(row: Row) -> None:
                q = copy.deepcopy(state["model"])
                try:
                    fastpath.quantize_fp8_(q, self.device)
                except Exception as e:  # noqa: BLE001 - no torchao / no fp8 GPU
                    row.status = _unavailable(e)
                    return
                with torch.inference_mode():
                    out = state["x"].ours(q).float()
                row.extra["err_vs_fp32"] = rel_err(out, state["ref"])
                row.note += "; approximate, not held to 1e-2"
            self.measure(Row("parity", "fp8", size, note=label), fp8)
        state.clear()
        _free(self.device)

    def _parity_check(self, row: Row, state: dict[str, Any], change: Callable[[nn.Module], Any]) -> None:
        change(state["model"])
        with torch.inference_mode():
            out = state["x"].ours(state["model"]).float()
        err = rel_err(out, state["ref"])
        row.extra["err_vs_fp32"] = err
        if err > 1e-2:
            row.status = "FAIL (> 1e-2)"


def _model_id() -> str:
    from . import MODEL_ID

    return MODEL_ID


def _data_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class BenchServer:
    """The project's HTTP server (create_app + uvicorn, 127.0.0.1, a free port) serving a pipeline already built,
    in a thread of this process (so peak device memory is read here)."""

    def __init__(self, pipe: Any, max_images: int, storage: Path):
        import socket

        import httpx
        import uvicorn

        from .api.app import create_app
        from .api.cli_serve import uvicorn_options
        from .settings import Settings

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        settings = Settings(host="127.0.0.1", port=port, storage_dir=storage, batch_max_images=max_images,
                            request_timeout_s=3600, log_level="warning", max_body_bytes=256 * 1024 * 1024)
        app = create_app(settings, pipeline_factory=lambda: pipe)
        self.server = uvicorn.Server(uvicorn.Config(app, **{**uvicorn_options(settings), "lifespan": "on"}))
        self.thread = threading.Thread(target=self.server.run, name="bench-http", daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(timeout=3600)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if self.client.get(self.base + "/ready").status_code == 200:
                    return
            if not self.thread.is_alive():
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("the HTTP server did not become ready")

    def post(self, body: dict) -> tuple[int, dict, float]:
        start = time.perf_counter()
        r = self.client.post(self.base + "/v1/images/generations", json=body)
        seconds = time.perf_counter() - start
        try:
            data = r.json()
        except ValueError:
            data = {"text": r.text[:200]}
        return r.status_code, data, seconds

    def stage_sums(self) -> dict[str, float]:
        """Sums of the server's `step1x_stage_seconds` histogram per stage, from /metrics."""
        text = self.client.get(self.base + "/metrics").text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("step1x_stage_seconds_sum{"):
                head, _, value = line.rpartition(" ")
                out[head.split('stage="', 1)[1].split('"', 1)[0]] = float(value)
        return out

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.client.close()


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _paths(args: argparse.Namespace) -> tuple[Path | None, Path | None, Path]:
    if args.out_dir:
        d = Path(args.out_dir)
        md, js = d / "results.md", d / "results.json"
    elif args.out:
        md = Path(args.out)
        js = md.with_suffix(".json") if md.suffix != ".json" else md.with_name(md.name + ".json")
    else:
        md = js = None
    log_path = Path(args.log) if args.log else (md.with_suffix(md.suffix + ".log") if md is not None else
                                                 Path(f"bench-{time.strftime('%Y%m%d-%H%M%S')}.log"))
    if args.out_dir and not args.log:
        log_path = Path(args.out_dir) / "results.log"
    return md, js, log_path


def run_bench(args: argparse.Namespace) -> int:
    tiny = bool(args.tiny)
    device = torch.device(args.device or ("cpu" if tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: no CUDA device; use --tiny for the CPU dry run", file=sys.stderr)
        return 2
    dtype = torch.float32 if tiny else torch.bfloat16
    args.sizes = _ints(args.sizes) if args.sizes else ([256] if tiny else [1024])
    args.steps = _ints(args.steps) if args.steps else ([3, 2] if tiny else [28, 20])
    args.step_iters = args.step_iters or (2 if tiny else 5)
    args.http_n = _ints(args.http_n) if isinstance(args.http_n, str) else args.http_n
    args.http_steps = args.http_steps or (2 if tiny else 20)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.modes_list = modes
    args.e2e_modes = [m.strip() for m in args.e2e_modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES] + [m for m in args.e2e_modes if m not in E2E_MODES]
    if unknown:
        print(f"bench: unknown modes {unknown}; --modes from {', '.join(MODES)}, --e2e-modes from "
              f"{', '.join(E2E_MODES)}", file=sys.stderr)
        return 2
    md, js, log_path = _paths(args)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    prev_level = root.level
    root.setLevel(logging.INFO)
    command = getattr(args, "command_line", None) or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    report = Report(command=command, tiny=tiny)
    writer = Writer(report, md, js)
    budget = Budget(args.budget_s)
    d = dims(tiny)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() else None
    try:
        report.env = environment(device)
        report.env["dtype"] = str(dtype).removeprefix("torch.")
        if getattr(args, "degrees", None) is not None:
            report.env["parallel"] = f"{args.degrees.describe()} (our DiT only; the baseline and parity on each rank)"
        report.env["model"] = (
            "dev dimensions (DiT hidden 128, 2+2 blocks; tiny Qwen2.5-VL; dev VAE)" if tiny else
            "Step1X-Edit v1.1 full size, random weights: Qwen2.5-VL-7B config, connector, DiT 19+38 blocks "
            "hidden 3072, FLUX VAE")
        report.env["budget"] = f"{args.budget_s:.0f} s" if args.budget_s else "none"
        writer.save()
        log.info("bench start: %s", report.env)
        torch.manual_seed(args.seed)
        torch._dynamo.reset()
        with budget.measure(), torch.inference_mode():
            name = report.env["dtype"].replace("bfloat16", "bf16").replace("float32", "fp32")
            report.ceilings[f"{name}_tflops"], report.ceilings[f"{name}_shape"] = matmul_ceiling(device, dtype, tiny)
            report.ceilings["compute"] = name  # exact modes' MFU is against this one
            try:
                report.ceilings["fp8_tflops"], report.ceilings["fp8_shape"] = fp8_ceiling(device, tiny)
            except Exception as e:  # noqa: BLE001 - no float8 matmul on this device
                report.ceilings["fp8_status"] = _unavailable(e)
        writer.save()
        Runner(args, d, device, dtype, report, writer, budget).run(modes)
        largest = max(args.sizes)
        report.notes.append(
            "vs baseline = diffusers' seconds per call / ours, identical token counts; ours includes the connector "
            f"(~{100 * connector_flops(d.dit.connector, TXT_TOKENS, 2) / dit_flops(d.dit, image_tokens(largest)):.1f} % "
            f"of the FLOPs at {largest}²), the baseline does not.")
        report.notes.append("Options accumulate in the order of the groups; a mode names every option that was on "
                            "(fp8 runs on a copy of the DiT, so later exact modes are without it).")
        report.state = "finished"
    except Stopped as e:
        report.state = f"stopped by {e} after {budget.elapsed():.0f} s (the rows above are every one finished)"
        log.warning("bench %s", report.state)
    except Exception as e:  # noqa: BLE001 - the report is still written
        log.exception("bench failed")
        report.errors.append(_error(e))
        report.state = "failed"
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        writer.save()
        from .bench_report import markdown

        text = markdown(report)
        root.removeHandler(handler)
        handler.close()
        root.setLevel(prev_level)
        print(text)
        print(f"(log: {log_path}{', report: ' + str(md) + ' + ' + str(js) if md else ''})", file=sys.stderr)
    return 1 if report.errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    args.command_line = "python -m step1x_edit.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
