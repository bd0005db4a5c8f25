"""One batch of edits, start to finish: resize -> VAE encode -> Qwen2.5-VL encode -> denoise -> VAE decode.

`prepare` turns an `EditRequest` into a `PreparedEdit` (validated, oriented, resized, seeded; no model touched, so
the engine runs it off the worker thread at admission); `run` edits a batch of prepared requests that share a batch
key (working size, steps, start index, guidance on/off, LoRA adapters and their scales); each may have its own
prompt, negative prompt, guidance scale and `n`. A batch's adapters are on the DiT while it denoises and off after
(models/lora_adapters.py), so no request's adapters reach another batch. Image i of a request uses seed + i for
everything random (initial noise, then the VAE posterior samples of the reference and img2img latents), drawn on the
CPU so the same seed gives the same noise on any device: an image is reproducible on its own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import time
from collections.abc import Iterable, Sequence

import torch
from PIL import Image, ImageOps

from ..models import fastpath, presets
from ..models import vae as vae_ops
from ..models.encoder import Step1XConditioner, build_dev_conditioner, load_conditioner
from ..models.layouts import V12_REFUSED, resolve_preset, resolve_weights
from ..models.lora_adapters import LoraAdapters, build_adapters
from ..models.weights import load_dit, load_vae
from ..settings import Settings
from . import imaging, memory, sampling
from .types import (
    MAX_LORA_SCALE,
    MAX_LORAS,
    MAX_SEED,
    RANDOM_SEED_LIMIT,
    EditRequest,
    EditResult,
    PreparedEdit,
    Preview,
    PreviewCallback,
    StepCallback,
    StopCheck,
)

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a host clock read without this credits a
    stage's kernels to whichever later stage first waits for them). A no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def warmup_shapes(max_images: int) -> list[tuple[int, bool]]:
    """(n, guided) pairs a warm-up runs so that every batch the server forms finds its compiled graph: batch 1
    (n=1, guidance off), batch 2 (n=1, guided; the dynamic graph of every batch >= 2) and the largest batch."""
    shapes = [(1, False), (1, True)]
    if max_images > 1:
        shapes.append((max_images, True))
    return shapes


class EditPipeline:
    def __init__(
        self,
        dit: torch.nn.Module,
        vae: torch.nn.Module,
        conditioner: Step1XConditioner,
        version: str,
        preset: str,
        size_level: int,
        device: torch.device,
        dtype: torch.dtype,
        vae_dtype: torch.dtype = torch.float32,
        *,
        perf: fastpath.PerfOptions | None = None,
        step_cache: fastpath.StepCache | None = None,
        offload: fastpath.ComponentOffload | None = None,
        adapters: LoraAdapters | None = None,
    ):
        self.dit, self.vae, self.conditioner = dit, vae, conditioner
        self.version, self.preset, self.size_level = version, preset, size_level
        self.device, self.dtype, self.vae_dtype = device, dtype, vae_dtype
        self.truncate = sampling.DEFAULT_TRUNCATE[version]
        self.perf = perf or fastpath.PerfOptions()  # what build_pipeline applied (for info and logs)
        self.step_cache = step_cache  # diffusers' step-cache hooks on the DiT, when one is on
        self.offload = offload  # model offloading, when on
        self._graphs: int | None = None  # compiled graphs after the warm-up (compile only)
        self.adapters = adapters  # LoRA adapters (STEP1X_LORA_DIR), when configured

    def info(self) -> dict:
        out = {
            "version": self.version,
            "preset": self.preset,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "size_level": self.size_level,
        }
        out.update(self.perf.changes())
        if self.step_cache is not None:
            out.update(self.step_cache.stats())
        if self.adapters is not None:
            out["loras"] = self.adapters.describe()
        return out

    def release_memory(self) -> None:
        """After an out-of-memory error (the engine calls this once the failed call's tensors are unreferenced):
        collect garbage and hand the CUDA caching allocator's free blocks back, so the next batch starts clean."""
        import gc

        gc.collect()
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- admission -----------------------------------------------------------------------------------------
    def _size_level(self, req: EditRequest) -> int:
        return req.size_level or self.size_level

    def validate(self, req: EditRequest) -> None:
        """Raise ValueError (naming the field) for anything the pipeline cannot run."""
        if not isinstance(req.image, Image.Image):
            raise ValueError("image: not an image")
        if not isinstance(req.prompt, str):
            raise ValueError("prompt: must be a string")
        if req.n < 1:
            raise ValueError("n: must be at least 1")
        if req.steps < 1:
            raise ValueError("steps: must be at least 1")
        if not 0 <= req.partial_images <= 10:
            raise ValueError("partial_images: must be between 0 and 10")
        if not 0.0 <= req.strength <= 1.0:
            raise ValueError("strength: must be between 0 and 1")
        if not req.guidance_scale >= 1.0 or req.guidance_scale != req.guidance_scale:
            raise ValueError("guidance_scale: must be at least 1")
        if req.seed != -1 and not 0 <= req.seed <= MAX_SEED:
            raise ValueError(f"seed: must be -1 or in [0, {MAX_SEED}]")
        if req.seed != -1 and req.seed + req.n - 1 > MAX_SEED:
            raise ValueError(f"seed: image i uses seed + i, so seed + n - 1 must be at most {MAX_SEED}")
        level = self._size_level(req)
        if not 256 <= level <= 2048:
            raise ValueError("size_level: must be between 256 and 2048")
        self._loras(req)

    def _loras(self, req: EditRequest) -> tuple[tuple[str, float], ...]:
        """The request's adapters as the batch key holds them: (name, scale) sorted by name (the sum does not depend
        on the order), scale-0 ones dropped (they change nothing); ValueError naming the field otherwise."""
        choices = tuple(req.loras or ())
        if not choices:
            return ()
        if len(choices) > MAX_LORAS:
            raise ValueError(f"loras: at most {MAX_LORAS} adapters per request, got {len(choices)}")
        names = [c.name for c in choices]
        for c in choices:
            if not isinstance(c.name, str) or not c.name:
                raise ValueError("loras: each adapter needs a name")
            if names.count(c.name) > 1:
                raise ValueError(f"loras: adapter {c.name[:100]!r} is named more than once")
            if not math.isfinite(c.scale) or abs(c.scale) > MAX_LORA_SCALE:
                raise ValueError(f"loras: the scale of {c.name[:100]!r} must be in [-{MAX_LORA_SCALE:g}, "
                                 f"{MAX_LORA_SCALE:g}]")
        if self.adapters is None:
            raise ValueError("loras: this server has no LoRA adapters (STEP1X_LORA_DIR is not set)")
        self.adapters.library.check(names)
        return tuple(sorted((c.name, float(c.scale)) for c in choices if c.scale != 0))

    def prepare(self, req: EditRequest) -> PreparedEdit:
        """Validate once (ValueError naming the field), apply EXIF orientation, convert to RGB, resize to the working
        size, draw the seeds (random ones below 2^53, see RANDOM_SEED_LIMIT) and compute the batch key. Touches no
        model: safe on any thread, and the worker never repeats it."""
        self.validate(req)
        image = imaging.to_rgb(ImageOps.exif_transpose(req.image))
        level = self._size_level(req)
        w, h = imaging.working_size(*image.size, level)
        seed = req.seed if req.seed != -1 else secrets.randbelow(RANDOM_SEED_LIMIT - req.n)
        start = sampling.start_index(req.steps, req.strength) if req.strength < 1 else 0
        loras = self._loras(req)
        return PreparedEdit(
            request=req,
            original_size=image.size,
            resized=image.resize((w, h), imaging.resize_filter(self.version)),
            seeds=tuple(seed + i for i in range(req.n)),
            key=(w, h, req.steps, start, req.guidance_scale > 1.0, loras),
            loras=loras,
        )

    # --- the walk ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(
        self,
        batch: Sequence[PreparedEdit | EditRequest],
        *,
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
        should_stop: StopCheck | None = None,
    ) -> list[EditResult]:
        """Edit a batch (requests not yet prepared are prepared here). `on_step(step, total)` after each denoising
        step; `should_stop()` before each (true: `Cancelled`). `on_preview(j, Preview)` (only when given, and only
        for requests with `partial_images` > 0) after the evenly spaced steps of `sampling.preview_steps`: request
        j's images at that step (the predicted clean latent, VAE-decoded, at the input's size). Without it nothing
        is decoded."""
        if not batch:
            return []
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            device_sync(self.device)  # one synchronisation per stage, so each stage's time is its own
            now = time.perf_counter()
            timings[stage] = timings.get(stage, 0.0) + now - clock
            clock = now

        prepared = [p if isinstance(p, PreparedEdit) else self.prepare(p) for p in batch]
        if len({p.key for p in prepared}) != 1:
            raise ValueError("requests in one batch must share working size, steps, strength start, guidance and "
                             "LoRA adapters")
        first = prepared[0].request
        guided = first.guidance_scale > 1.0
        lap("preprocess")

        # VAE moments of each reference image, then one posterior sample per output image (seeded below).
        pixels = torch.cat([imaging.pil_to_tensor(p.resized) for p in prepared]).to(self.device, self.vae_dtype)
        moments = vae_ops.encode_moments(self.vae, pixels).float()
        lap("vae_encode")

        images = [p.resized for p in prepared]
        prompts = [p.request.prompt for p in prepared]
        if guided:
            enc = self.conditioner.encode(prompts + [p.request.negative_prompt for p in prepared], images + images)
        else:
            enc = self.conditioner.encode(prompts, images)
        lap("encoder")

        per_image = [(j, s) for j, p in enumerate(prepared) for s in p.seeds]
        rows = torch.tensor([j for j, _ in per_image], device=enc.embeddings.device)
        r = len(prepared)
        cond = sampling.Conditioning(enc.embeddings[rows], enc.mask[rows])
        if guided:
            cond.neg_embedding, cond.neg_mask = enc.embeddings[rows + r], enc.mask[rows + r]
        noise, ref_latent, init_latent = self._latents(moments, per_image, use_init=first.strength < 1.0)
        guidance = torch.tensor([prepared[j].request.guidance_scale for j, _ in per_image])
        lap("prepare_latents")

        on_x0 = x0_at = None
        if on_preview is not None and any(p.request.partial_images > 0 for p in prepared):
            on_x0, x0_at = self._previewer(prepared, on_preview)
        if self.step_cache is not None:
            start = sampling.start_index(first.steps, first.strength) if first.strength < 1.0 else 0
            self.step_cache.begin(first.steps - start)
        with self._adapters_applied(prepared[0].loras):
            if self.adapters is not None:  # a stage (and a device sync) only on a server with adapters
                lap("lora_switch")
            result = sampling.sample(
                self.dit, noise, ref_latent, cond, first.steps, guidance, self.version,
                strength=first.strength, init_latent=init_latent, truncate=self.truncate,
                on_step=on_step, should_stop=should_stop, on_x0=on_x0, x0_at=x0_at,
            )
            lap("denoise")
        if self.adapters is not None:
            lap("lora_switch")  # (taking them off again counts too)
        if self._graphs is not None and fastpath.compiled_graphs() > self._graphs:
            log.warning("this batch compiled %d new graph(s) on the worker (working size %dx%d, %d DiT rows): "
                        "requests waited for it; warm this size up (compile_warmup_sizes)",
                        fastpath.compiled_graphs() - self._graphs, *prepared[0].key[:2], len(per_image) * (1 + guided))
            self._graphs = fastpath.compiled_graphs()

        decoded = self._decode(result.latent)
        outs = [imaging.tensor_to_pil(img) for img in decoded]
        lap("vae_decode")

        results, k = [], 0
        for j, p in enumerate(prepared):
            imgs = [imaging.restore_size(outs[k + i], p.original_size) for i in range(p.images)]
            k += p.images
            text = enc.text_tokens[j] + (enc.text_tokens[j + r] if guided else 0)
            image_tok = enc.image_tokens[j] + (enc.image_tokens[j + r] if guided else 0)
            results.append(EditResult(imgs, list(p.seeds), text, image_tok))
        lap("postprocess")
        for res in results:
            res.timings = dict(timings)
        return results

    def _adapters_applied(self, loras: tuple[tuple[str, float], ...]):
        # without adapters `loras` is empty: `prepare` (via `_loras`) refused any request that named one
        return contextlib.nullcontext() if self.adapters is None else self.adapters.applied(loras)

    def warmup(self, size_levels: Iterable[int], steps: int = 1, max_images: int = 1,
               shapes: Sequence[tuple[int, bool]] | None = None, guided: bool | None = None) -> dict[int, float]:
        """Short edits (square input, `steps` steps) at each size level, one per batch shape the server will run,
        so that compilation (and lazy kernel selection) happens at start-up rather than on the worker while
        requests wait. `shapes`: (n, guided) pairs; default `warmup_shapes(max_images)`: n=1 without guidance
        (batch 1, its own compiled graph), n=1 with it (batch 2: the graph every larger batch reuses, its token
        and batch dimensions being dynamic) and n=max_images with it (the largest batch: its memory is tried
        too). `guided` (the older form): only n=1 with or without guidance. With a compiled DiT a request that still
        compiles is logged by `run`. Returns seconds per size."""
        if guided is not None and shapes is None:
            shapes = [(1, guided)]
        took = {}
        self._graphs = None  # compiling is what a warm-up is for: not logged
        for level in size_levels:
            image = Image.new("RGB", (int(level), int(level)), (128, 128, 128))
            start = time.perf_counter()
            for n, cfg in (warmup_shapes(max_images) if shapes is None else shapes):
                # never more than fits the device; not on several ranks: each must run the same shapes
                single = getattr(self.dit, "parallel_degrees", None) is None
                fits = self.max_images((int(level), int(level), steps, 0, cfg)) if single else None
                req = EditRequest(image=image, prompt="warm-up", steps=steps, strength=1.0, seed=0,
                                  n=min(n, fits) if fits else n, guidance_scale=2.5 if cfg else 1.0,
                                  size_level=int(level))
                self.run([req])
            took[int(level)] = time.perf_counter() - start
        if self.perf.compile:
            self._graphs = fastpath.compiled_graphs()
            log.info("warm-up: %d compiled graphs", self._graphs)
        return took

    def max_images(self, key: tuple) -> int | None:
        """Images one call may hold for batch key `key` (working size, guidance), from the device's free memory
        (see `memory.max_images`); None off CUDA (no limit but the engine's setting)."""
        free = memory.free_device_bytes(self.device)
        if free is None:
            return None
        w, h, guided = key[0], key[1], key[4]
        return memory.max_images(free, h, w, guided, hidden=self.dit.inner_dim, dtype_bytes=self.dtype.itemsize,
                                 vae_dtype_bytes=self.vae_dtype.itemsize,
                                 base_channels=self.vae.config.block_out_channels[0])

    def _decode(self, latent: torch.Tensor) -> torch.Tensor:
        """VAE decode in chunks that fit the device's free memory (all at once off CUDA)."""
        chunk = None
        free = memory.free_device_bytes(self.device)
        if free is not None:
            up = 2 ** (len(self.vae.config.block_out_channels) - 1)  # latent -> pixels
            h, w = latent.shape[-2] * up, latent.shape[-1] * up
            chunk = memory.decode_chunk(free, h, w, self.vae_dtype.itemsize, self.vae.config.block_out_channels[0])
        return vae_ops.decode(self.vae, latent.to(self.vae_dtype), chunk=chunk)

    def _previewer(self, prepared: list[PreparedEdit], on_preview: PreviewCallback):
        """`on_x0` / `x0_at` for `sampling.sample`: decode only the rows of the requests that want a preview at
        this step (one VAE decode of those rows), resize to each input's size, hand them to `on_preview`."""

        def wanted(step: int, total: int) -> list[bool]:
            return [step in sampling.preview_steps(total, p.request.partial_images) for p in prepared]

        def x0_at(step: int, total: int) -> bool:
            return any(wanted(step, total))

        def on_x0(step: int, total: int, x0: torch.Tensor) -> None:
            want = wanted(step, total)
            rows, k = [], 0
            for p, w in zip(prepared, want):
                if w:
                    rows.extend(range(k, k + len(p.seeds)))
                k += len(p.seeds)
            decoded = self._decode(x0[torch.tensor(rows, device=x0.device)])
            pictures = iter([imaging.tensor_to_pil(img) for img in decoded])
            for j, (p, w) in enumerate(zip(prepared, want)):
                if w:
                    images = [imaging.restore_size(next(pictures), p.original_size) for _ in p.seeds]
                    on_preview(j, Preview(step, total, images))

        return on_x0, x0_at

    def _latents(self, moments: torch.Tensor, per_image: list[tuple[int, int]], use_init: bool):
        """Per output image, from its own CPU generator: initial noise, the reference posterior sample and (for
        img2img) the init-image posterior sample, in that order."""
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar)
        shape = (1, *mean.shape[1:])
        cfg = self.vae.config
        noise, refs, inits = [], [], []
        for j, seed in per_image:
            g = torch.Generator().manual_seed(seed)
            noise.append(torch.randn(shape, generator=g))
            refs.append(torch.randn(shape, generator=g))
            if use_init:
                inits.append(torch.randn(shape, generator=g))
        dev = mean.device
        rows = torch.tensor([j for j, _ in per_image], device=dev)

        def posterior(eps: list[torch.Tensor]) -> torch.Tensor:
            z = mean[rows] + std[rows] * torch.cat(eps).to(dev)
            return cfg.scaling_factor * (z - cfg.shift_factor)

        return torch.cat(noise).to(dev), posterior(refs), posterior(inits) if use_init else None


def build_pipeline(settings: Settings, *, mesh=None) -> EditPipeline:  # noqa: ANN001 - a torch DeviceMesh
    """The models named by the settings on their device (real weights, `full`, or the tiny random `dev` preset),
    with the performance options applied, warmed up when compiled. With `mesh` (one rank of several, see
    pipeline/parallel.py) the DiT's calls become collective calls of every rank (models/parallel.py)."""
    opts = fastpath.PerfOptions.from_settings(settings)
    opts.validate()
    if settings.lora_dir is not None and opts.fp8_dynamic:
        # torchao's float8 tensors under PEFT's LoRA layers: not supported by PEFT, and not testable without a GPU
        raise ValueError("lora_dir cannot be combined with fp8_dynamic (torchao's float8 linears take no LoRA "
                         "adapters); use dit_fp8 for FP8 weights with adapters")
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    if opts.fp8_dynamic and dtype != torch.bfloat16:  # before minutes of weight loading, not after
        raise ValueError(f"fp8_dynamic needs dtype bfloat16 (torchao's float8 kernels take bf16 activations), "
                         f"not {str(dtype).removeprefix('torch.')}; set dtype=bfloat16 or turn fp8_dynamic off")
    preset = resolve_preset(settings)
    size_level = settings.size_level or presets.DEFAULT_SIZE_LEVEL[preset]
    if preset == "dev":
        log.warning("dev preset: tiny random weights, outputs are noise (run `step1x-edit download` or set "
                    "STEP1X_MODEL_DIR for the real model)")
        version = presets.DEV_VERSION if settings.version == "auto" else settings.version
        if version == "v1.0":
            raise ValueError("the dev preset is a v1.1 model; version v1.0 needs real weights")
        dit = presets.build_dev_dit(settings.dev_seed).to(device, dtype)
        vae = presets.build_dev_vae(settings.dev_seed).to(device)
        conditioner = build_dev_conditioner(seed=settings.dev_seed, device=device, dtype=dtype,
                                            hidden_size=presets.DEV_ENCODER_HIDDEN)
    else:
        # explicit paths > STEP1X_MODEL_DIR > the Hugging Face cache; any layout (see models/layouts.py)
        plan = resolve_weights(settings)
        log.info("%s", plan.describe())
        if plan.version == "v1.2":
            raise ValueError(f"{plan.dit.path}: {V12_REFUSED}")
        # with offload, weights stay in host memory and each component visits the device only while it runs
        load_to = torch.device("cpu") if opts.offload != "none" else device
        dit, version = load_dit(plan.dit.path, version=settings.version, device=load_to, dtype=dtype,
                                fp8=settings.dit_fp8)
        vae = load_vae(plan.vae.path, device=load_to)
        conditioner = load_conditioner(plan.encoder.path, device=load_to, dtype=dtype)

    changes = opts.changes()
    if changes:
        log.info("performance options: %s", ", ".join(f"{k}={v}" for k, v in changes.items()))
    if opts.fuse_qkv:
        fastpath.fuse_qkv_(dit)
    if opts.fp8_dynamic:
        fastpath.quantize_fp8_(dit, device)
    if opts.attention_backend != "native":
        fastpath.set_attention_backend_(dit, opts.attention_backend)
    if mesh is not None:  # before compiling: the parallel hooks and attention are part of the compiled calls
        from ..models import parallel

        parallel.parallelize_dit(dit, parallel.Degrees.from_settings(settings), mesh)
    adapters = None
    if settings.lora_dir is not None:
        adapters = build_adapters(dit, dit.dit_config, settings.lora_dir, settings.lora_cache_size, MAX_LORAS)
        if opts.compile:  # before compiling: slots that adapters are hot-swapped into, never recompiling
            adapters.prepare_hotswap()
    if opts.compile:
        fastpath.compile_blocks_(dit, mode=opts.compile_mode)
    if opts.vae_bf16 or opts.vae_channels_last:
        fastpath.vae_fast_(vae, opts.vae_bf16, opts.vae_channels_last)
    step_cache = fastpath.StepCache(dit, opts) if opts.step_cache != "none" else None
    offload = fastpath.enable_offload(dit, vae, conditioner, device) if opts.offload == "model" else None
    pipe = EditPipeline(dit, vae, conditioner, version, preset, size_level, device, dtype,
                        vae_dtype=torch.bfloat16 if opts.vae_bf16 else torch.float32,
                        perf=opts, step_cache=step_cache, offload=offload, adapters=adapters)
    if opts.compile:
        sizes = (size_level,) if opts.compile_warmup_sizes is None else opts.compile_warmup_sizes
        if sizes:
            took = pipe.warmup(sizes, max_images=settings.batch_max_images)
            log.info("compile warm-up: %s", ", ".join(f"{s}: {t:.1f} s" for s, t in took.items()))
    return pipe
