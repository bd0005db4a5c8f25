"""Performance options of the pipeline: each one off by default, each applied in place by `apply_performance`.

Exact options (same function, bf16 rounding aside):
- `fuse_qkv`: diffusers' `fuse_projections()` on every DiT attention (one [3*d, d] matmul instead of three, and one
  for the text stream of the double blocks); the unfused q/k/v layers are dropped so no weight is held twice.
- `attention_backend`: the attention kernel of the DiT blocks through diffusers' attention dispatcher (`native` =
  PyTorch SDPA choosing for itself, `cudnn`, `flash`, `efficient`, `math` = SDPA restricted to that kernel,
  `flash-attn` / `flash-attn-3` / `sage` / `xformers` = those packages, when installed). The connector keeps SDPA
  (its attention is masked).
- `compile`: regional `torch.compile` of the 19 + 38 repeated blocks (each block compiled; the two block kinds share
  code, so two graphs are compiled per shape regime), `warmup()` runs one step per working size at start-up.
- `vae_bf16` / `vae_channels_last`: the VAE in bf16 and/or in channels_last memory format.

Options that change the numbers (opt-in):
- `fp8_dynamic`: torchao float8 dynamic quantisation (per-row scales) of the DiT blocks' linear layers; needs
  torchao and a CUDA GPU with float8 tensor cores (compute capability 8.9+). torchao is imported only when asked
  for. (The loader's `dit_fp8` only stores weights in float8; the two combine.)
- `step_cache_threshold`: a first-block cache (`FirstBlockCache`): each step runs the first double block; when its
  output residual changed by less than the threshold (relative L1) since the last fully computed step, the rest of
  the blocks are skipped and their residual from that step is reused. 0 = off (the model is not wrapped at all).

Memory mode:
- `offload="model"`: encoder, DiT and VAE live on the CPU and each moves to the execution device only while it runs
  (`ComponentOffload`), so the peak holds one component's weights, not all three.

Everything here is device-agnostic except fp8_dynamic, so the exact options, the cache and offloading are tested on CPU.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

log = logging.getLogger(__name__)

# Short names -> diffusers AttentionBackendName values. Any other diffusers backend name is accepted as is.
ATTENTION_BACKENDS = {
    "native": "native",
    "cudnn": "_native_cudnn",
    "flash": "_native_flash",
    "efficient": "_native_efficient",
    "math": "_native_math",
    "flash-attn": "flash",
    "flash-attn-3": "_flash_3",
    "sage": "sage",
    "xformers": "xformers",
}
OFFLOAD_MODES = ("none", "model")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class PerfOptions:
    """The `# --- performance ---` settings, as one value (defaults = today's plain path)."""

    fuse_qkv: bool = False
    compile: bool = False
    compile_mode: str = "default"
    compile_warmup_sizes: tuple[int, ...] | None = None  # None = the pipeline's size_level; () = no warm-up
    attention_backend: str = "native"
    vae_bf16: bool = False
    vae_channels_last: bool = False
    step_cache_threshold: float = 0.0
    fp8_dynamic: bool = False
    offload: str = "none"

    @classmethod
    def from_settings(cls, settings: Any) -> PerfOptions:
        values = {}
        for f in fields(cls):
            if hasattr(settings, f.name):
                v = getattr(settings, f.name)
                values[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**values)

    def changes(self) -> dict[str, Any]:
        """The options that differ from the defaults."""
        default = PerfOptions()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)}

    def validate(self) -> None:
        resolve_attention_backend(self.attention_backend)
        if self.offload not in OFFLOAD_MODES:
            raise ValueError(f"offload: must be one of {', '.join(OFFLOAD_MODES)}, got {self.offload!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode: must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if not self.step_cache_threshold >= 0:
            raise ValueError("step_cache_threshold: must be >= 0 (0 = off)")


# --------------------------------------------------------------------------------------------------------------
# DiT: fused projections, attention backend, regional compile, fp8
# --------------------------------------------------------------------------------------------------------------


def _blocks(dit: nn.Module) -> list[nn.Module]:
    return [*dit.transformer_blocks, *dit.single_transformer_blocks]


def _concat_linears(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the parts' outputs side by side, holding the concatenated weights as they are
    (any dtype, float8 storage included) and of the parts' class (e.g. the loader's FP8Linear)."""
    weight = torch.cat([p.weight.detach() for p in parts])
    bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")  # no init work
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    fused.__class__ = type(parts[0])
    return fused


def fuse_qkv_(dit: nn.Module) -> int:
    """Fuse q/k/v (and the text stream's q/k/v) of every DiT block into one Linear each, in place, dropping the
    separate layers (no weight is held twice); returns how many attention modules were fused. diffusers'
    FluxAttnProcessor takes its fused path by itself (`attn.fused_projections`, `to_qkv`, `to_added_qkv`), as
    after diffusers' own `fuse_projections()`, which is not used because it re-initialises a new Linear in the
    weights' dtype (impossible for float8-stored weights) and keeps the unfused copies."""
    n = 0
    with torch.no_grad():
        for block in _blocks(dit):
            attn = block.attn
            if getattr(attn, "fused_projections", False):
                continue
            attn.to_qkv = _concat_linears([attn.to_q, attn.to_k, attn.to_v])
            del attn.to_q, attn.to_k, attn.to_v
            if getattr(attn, "add_q_proj", None) is not None:
                attn.to_added_qkv = _concat_linears([attn.add_q_proj, attn.add_k_proj, attn.add_v_proj])
                del attn.add_q_proj, attn.add_k_proj, attn.add_v_proj
            attn.fused_projections = True
            n += 1
    return n


def resolve_attention_backend(name: str) -> str:
    """A short name (see ATTENTION_BACKENDS) or a diffusers AttentionBackendName value -> the diffusers value."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    value = ATTENTION_BACKENDS.get(name.lower(), name.lower())
    valid = {b.value for b in AttentionBackendName}
    if value not in valid:
        raise ValueError(f"attention_backend: unknown backend {name!r}; one of {', '.join(ATTENTION_BACKENDS)} "
                         "or a diffusers attention backend name")
    return value


def set_attention_backend_(dit: nn.Module, name: str) -> str:
    """Route the DiT blocks' attention through one backend; raises if its package is missing."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    value = resolve_attention_backend(name)
    backend = AttentionBackendName(value)
    _check_attention_backend_requirements(backend)
    for block in _blocks(dit):
        block.attn.processor._attention_backend = None if value == "native" else backend
    return value


def compile_blocks_(dit: nn.Module, mode: str = "default", fullgraph: bool = False, dynamic: bool | None = None) -> int:
    """Regional compilation: `module.compile()` on each repeated block (the embedders, the connector and the
    output head stay eager). Compilation happens on the first call per shape regime; see `warmup`. The blocks
    compile without graph breaks (tests check it with fullgraph=True); the default stays fullgraph=False so that
    a process that reaches dynamo's recompile limit (many shape regimes) falls back to eager instead of failing.
    `dynamic=None`: the first shape compiles static, a second one recompiles with dynamic sizes."""
    kwargs: dict[str, Any] = {"fullgraph": fullgraph, "dynamic": dynamic}
    if mode != "default":
        kwargs["mode"] = mode
    blocks = _blocks(dit)
    for block in blocks:
        block.compile(**kwargs)
    return len(blocks)


def _fp8_filter(module: nn.Module, fqn: str) -> bool:
    # Token-wise linears of the blocks only: the per-sample modulation linears (M = batch) gain nothing.
    return (
        isinstance(module, nn.Linear)
        and fqn.startswith(("transformer_blocks.", "single_transformer_blocks."))
        and ".norm" not in fqn
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def _upcast_fp8_storage_(dit: nn.Module, dtype: torch.dtype) -> int:
    """Linears whose weights are stored in float8 (the loader's `dit_fp8`) back to plain Linears in `dtype`
    (exact: every float8_e4m3fn value is a bf16 value), so torchao can quantise them with its own scales."""
    n = 0
    for module in dit.modules():
        if isinstance(module, nn.Linear) and module.weight.dtype == torch.float8_e4m3fn:
            module.weight = nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
            if module.bias is not None and module.bias.dtype != dtype:
                module.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
            module.__class__ = nn.Linear
            n += 1
    return n


def quantize_fp8_(dit: nn.Module, device: torch.device | str | None = None) -> int:
    """torchao float8 dynamic activation + float8 weight quantisation (per-row scales) of the blocks' linears:
    the matmuls run on the float8 tensor cores. Weights stored in float8 by `dit_fp8` are taken as they are
    (upcast, then re-scaled per row by torchao)."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_
        from torchao.quantization.granularity import PerRow
    except ImportError as e:
        raise RuntimeError(f"fp8_dynamic needs torchao (pip install torchao; not a dependency of this package): {e}"
                           ) from e
    dev = torch.device(device) if device is not None else next(dit.parameters()).device
    if dev.type != "cuda":
        raise RuntimeError(f"fp8_dynamic needs a CUDA GPU with float8 support (compute capability 8.9+), not {dev}")
    if torch.cuda.get_device_capability(dev) < (8, 9):
        raise RuntimeError(f"fp8_dynamic needs compute capability 8.9+; {torch.cuda.get_device_name(dev)} has "
                           f"{torch.cuda.get_device_capability(dev)}")
    _upcast_fp8_storage_(dit, _param_dtype(dit))
    count = sum(_fp8_filter(m, n) for n, m in dit.named_modules())
    quantize_(dit, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=_fp8_filter,
              device=dev)
    return count


# --------------------------------------------------------------------------------------------------------------
# Step cache
# --------------------------------------------------------------------------------------------------------------


def relative_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean|a - b| / mean|b| (a 0-d tensor, float32)."""
    return (a.float() - b.float()).abs().mean() / b.float().abs().mean().clamp_min(1e-12)


@dataclass
class CacheStats:
    calls: int = 0
    skipped: int = 0
    decisions: list[float] = field(default_factory=list)  # relative L1 change of the first block, per step

    @property
    def skipped_fraction(self) -> float:
        return self.skipped / self.calls if self.calls else 0.0


class FirstBlockCache(nn.Module):
    """Wraps the DiT with a first-block cache; same call signature and `rotary_embedding` as the DiT.

    Each call runs the embedders, the connector and the first double block. The relative L1 change of that block's
    image-stream residual against the one of the last *fully computed* step decides: below `threshold`, the
    remaining blocks are skipped and the image hidden state is the first block's output plus the remaining blocks'
    residual saved at that step; otherwise everything runs and both residuals are saved. The first step of each
    denoise call always runs in full (the sampler calls `rotary_embedding` once per call, which resets the cache;
    a change of shape or a timestep that does not decrease resets it too). One decision per batch (all rows move
    together); the decision reads one scalar back from the device per step.
    """

    def __init__(self, dit: nn.Module, threshold: float):
        super().__init__()
        if not threshold > 0:
            raise ValueError("FirstBlockCache needs a threshold > 0 (0 = do not wrap)")
        self.dit = dit
        self.threshold = float(threshold)
        self.stats = CacheStats()  # the current (last) denoise call
        self.total = CacheStats()  # since construction
        self.reset()

    def __getattr__(self, name: str) -> Any:
        """Anything else (cfg, connector, blocks, ...) is the wrapped DiT's, so the wrapper stands in for it."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("dit")
            if inner is None:  # (during construction or unpickling)
                raise
            return getattr(inner, name)

    def reset(self) -> None:
        self._first_residual: torch.Tensor | None = None
        self._rest_residual: torch.Tensor | None = None
        self._key: tuple | None = None
        self._last_t: float | None = None
        self.stats = CacheStats()

    def rotary_embedding(self, txt_ids: torch.Tensor, img_ids: torch.Tensor):
        self.reset()
        return self.dit.rotary_embedding(txt_ids, img_ids)

    def forward(self, img, img_ids, txt_ids, timesteps, llm_embedding, t_vec, mask, rotary_emb=None) -> torch.Tensor:
        from diffusers.models.embeddings import get_timestep_embedding

        dit = self.dit
        if rotary_emb is None:
            if img_ids.ndim == 3:
                img_ids, txt_ids = img_ids[0], txt_ids[0]
            rotary_emb = dit.rotary_embedding(txt_ids, img_ids)
        dtype = _param_dtype(dit)
        txt, y = dit.connector(llm_embedding.to(dtype), t_vec, mask)
        t_emb = get_timestep_embedding(timesteps * 1000, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
        vec = dit.time_embed(t_emb.to(dtype)) + dit.vec_embed(y)
        txt = dit.context_embedder(txt)
        hidden = dit.x_embedder(img.to(dtype))

        blocks = list(dit.transformer_blocks)
        txt, first = blocks[0](hidden_states=hidden, encoder_hidden_states=txt, temb=vec, image_rotary_emb=rotary_emb)
        first_residual = first - hidden

        key = (tuple(img.shape), tuple(llm_embedding.shape), img.dtype)
        t_now = float(timesteps.reshape(-1)[0]) if timesteps.device.type == "cpu" else None
        if self._key != key or (t_now is not None and self._last_t is not None and t_now >= self._last_t):
            self.reset()
        self._key, self._last_t = key, t_now
        self.stats.calls += 1
        self.total.calls += 1

        skip = False
        if self._first_residual is not None:
            change = relative_l1(first_residual, self._first_residual).item()
            self.stats.decisions.append(change)
            skip = change < self.threshold
        if skip:
            hidden = first + self._rest_residual
            self.stats.skipped += 1
            self.total.skipped += 1
        else:
            hidden = first
            for block in blocks[1:]:
                txt, hidden = block(hidden_states=hidden, encoder_hidden_states=txt, temb=vec,
                                    image_rotary_emb=rotary_emb)
            for block in dit.single_transformer_blocks:
                txt, hidden = block(hidden_states=hidden, encoder_hidden_states=txt, temb=vec,
                                    image_rotary_emb=rotary_emb)
            self._first_residual = first_residual
            self._rest_residual = hidden - first
        return dit.proj_out(dit.norm_out(hidden, vec))


def _param_dtype(module: nn.Module) -> torch.dtype:
    """The DiT's compute dtype (float8-quantised weights report their original dtype through x_embedder)."""
    return module.x_embedder.weight.dtype


def unwrap(dit: nn.Module) -> nn.Module:
    return dit.dit if isinstance(dit, FirstBlockCache) else dit


# --------------------------------------------------------------------------------------------------------------
# VAE and offloading
# --------------------------------------------------------------------------------------------------------------


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    return args


def vae_fast_(vae: nn.Module, bf16: bool, channels_last: bool) -> nn.Module:
    """The VAE in bf16 and/or channels_last (weights and the encoder/decoder inputs)."""
    if bf16:  # (nn.Module.to: diffusers' own `to` warns about fp32-only modules, of which this VAE has none)
        nn.Module.to(vae, torch.bfloat16)
    if channels_last:
        nn.Module.to(vae, memory_format=torch.channels_last)
        for part in (vae.encoder, vae.decoder):
            part.register_forward_pre_hook(_channels_last_input)
    return vae


class ComponentOffload:
    """Model-level offloading: each registered component stays on `offload_device` until one of its trigger
    modules is called; then the resident component goes back and this one comes in (with the call's tensors).

    `loads` records the order in which components were brought in (for logs and tests).
    """

    def __init__(self, execution_device: torch.device | str, offload_device: torch.device | str = "cpu"):
        self.execution_device = torch.device(execution_device)
        self.offload_device = torch.device(offload_device)
        self.components: dict[str, nn.Module] = {}
        self.resident: str | None = None
        self.loads: list[str] = []
        self._handles: list[Any] = []

    def add(self, name: str, component: nn.Module, triggers: Sequence[nn.Module]) -> None:
        component.to(self.offload_device)
        self.components[name] = component
        for module in triggers:
            self._handles.append(module.register_forward_pre_hook(partial(self._before, name), with_kwargs=True))

    def load(self, name: str) -> None:
        if self.resident == name:
            return
        if self.resident is not None:
            self.components[self.resident].to(self.offload_device)
        self.components[name].to(self.execution_device)
        self.resident = name
        self.loads.append(name)

    def _move(self, x: Any) -> Any:
        return x.to(self.execution_device) if isinstance(x, torch.Tensor) and x.device != self.execution_device else x

    def _before(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.load(name)
        return tree_map(self._move, args), tree_map(self._move, kwargs)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def encoder_module(conditioner: Any) -> tuple[nn.Module, nn.Module]:
    """(the encoder's weights holder, the module the conditioner calls) of a Step1XConditioner."""
    model = conditioner.model
    return model, getattr(model, "model", model)


def enable_offload(pipe: Any, offload_device: torch.device | str = "cpu") -> ComponentOffload:
    off = ComponentOffload(pipe.device, offload_device)
    enc, enc_call = encoder_module(pipe.conditioner)
    off.add("encoder", enc, [enc_call])
    off.add("dit", pipe.dit, [pipe.dit])
    off.add("vae", pipe.vae, [pipe.vae.encoder, pipe.vae.decoder])
    return off


# --------------------------------------------------------------------------------------------------------------
# Putting it together
# --------------------------------------------------------------------------------------------------------------


def apply_performance(pipe: Any, settings: Any) -> Any:
    """Apply the settings' performance options to a built EditPipeline, in place; returns it. With the default
    settings nothing is touched. Order: fuse -> fp8 -> attention backend -> compile -> VAE -> step cache ->
    offload -> compile warm-up."""
    opts = settings if isinstance(settings, PerfOptions) else PerfOptions.from_settings(settings)
    opts.validate()
    changes = opts.changes()
    pipe.perf_options = opts
    pipe.step_cache = None
    pipe.offload = None
    if not changes:
        return pipe
    log.info("performance options: %s", ", ".join(f"{k}={v}" for k, v in changes.items()))
    dit = pipe.dit
    if opts.fuse_qkv:
        fuse_qkv_(dit)
    if opts.fp8_dynamic:
        quantize_fp8_(dit, pipe.device)
    if opts.attention_backend != "native":
        set_attention_backend_(dit, opts.attention_backend)
    if opts.compile:
        compile_blocks_(dit, mode=opts.compile_mode)
    if opts.vae_bf16 or opts.vae_channels_last:
        vae_fast_(pipe.vae, opts.vae_bf16, opts.vae_channels_last)
        if opts.vae_bf16:
            pipe.vae_dtype = torch.bfloat16
    if opts.step_cache_threshold > 0:
        pipe.dit = pipe.step_cache = FirstBlockCache(dit, opts.step_cache_threshold)
    if opts.offload == "model":
        pipe.offload = enable_offload(pipe)
    if opts.compile:
        sizes = (pipe.size_level,) if opts.compile_warmup_sizes is None else opts.compile_warmup_sizes
        if sizes:
            took = warmup(pipe, sizes)
            log.info("compile warm-up: %s", ", ".join(f"{s}: {t:.1f} s" for s, t in took.items()))
    return pipe


def warmup(pipe: Any, size_levels: Iterable[int], guided: bool = True, steps: int = 1) -> dict[int, float]:
    """One short edit per working-size bucket (square input of that size), so that compilation (and any lazy
    kernel selection) happens at start-up rather than in the first requests. Returns seconds per size."""
    from PIL import Image

    from ..pipeline.types import EditRequest

    took = {}
    for level in size_levels:
        image = Image.new("RGB", (int(level), int(level)), (128, 128, 128))
        req = EditRequest(image=image, prompt="warm-up", steps=steps, strength=1.0, seed=0,
                          guidance_scale=2.5 if guided else 1.0, size_level=int(level))
        start = time.perf_counter()
        pipe.run([req])
        took[int(level)] = time.perf_counter() - start
    if pipe.step_cache is not None:
        pipe.step_cache.total = CacheStats()
    return took


PERF_FIELDS = tuple(f.name for f in fields(PerfOptions))


def add_performance_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """CLI flags for the `# --- performance ---` settings. Each flag's dest is `prefix + <Settings field>`; flags not
    given stay None, so the environment or the default applies (see `performance_overrides`)."""
    g = parser.add_argument_group("performance (all off by default)")
    b = argparse.BooleanOptionalAction

    def add(flag: str, field_name: str, **kw: Any) -> None:
        g.add_argument(flag, dest=prefix + field_name, default=None, **kw)

    add("--fuse-qkv", "fuse_qkv", action=b, help="fused q/k/v projections (exact)")
    add("--compile", "compile", action=b,
        help="torch.compile the repeated DiT blocks, warmed up at start-up (exact; minutes of start-up)")
    add("--compile-mode", "compile_mode", choices=COMPILE_MODES, help="torch.compile mode (reduce-overhead = CUDA graphs)")
    add("--compile-warmup-sizes", "compile_warmup_sizes", metavar="SIZES",
        type=lambda v: [int(x) for x in v.split(",") if x.strip()],
        help="comma-separated size levels to warm up (default: the size level; empty = none)")
    add("--attention-backend", "attention_backend", metavar="NAME",
        help=f"DiT attention kernel: {', '.join(ATTENTION_BACKENDS)} (default native = PyTorch's choice)")
    add("--vae-bf16", "vae_bf16", action=b, help="VAE in bf16")
    add("--vae-channels-last", "vae_channels_last", action=b, help="VAE in channels_last memory format (exact)")
    add("--step-cache-threshold", "step_cache_threshold", type=float, metavar="T",
        help="first-block step cache: skip the DiT's other blocks when the first block's residual changed by less "
             "than T (relative L1; 0 = off; approximate)")
    add("--fp8-dynamic", "fp8_dynamic", action=b,
        help="float8 matmuls: torchao dynamic quantisation of the DiT linears (needs torchao and an fp8 GPU; "
             "combines with --dit-fp8)")
    add("--offload", "offload", choices=OFFLOAD_MODES,
        help="model = encoder/DiT/VAE kept on the CPU, each moved to the GPU only while it runs")


def performance_overrides(args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The performance settings given on the command line, by Settings field name."""
    out = {}
    for name in PERF_FIELDS:
        value = getattr(args, prefix + name, None)
        if value is not None:
            out[name] = value
    return out


def describe(pipe: Any) -> dict[str, Any]:
    """What is enabled, and the step cache's counters, for logs and /v1/models-style info."""
    opts: PerfOptions = getattr(pipe, "perf_options", PerfOptions())
    out: dict[str, Any] = dict(opts.changes())
    cache = getattr(pipe, "step_cache", None)
    if cache is not None:
        out["step_cache_calls"] = cache.total.calls
        out["step_cache_skipped_fraction"] = round(cache.total.skipped_fraction, 4)
    return out


__all__ = [
    "ATTENTION_BACKENDS",
    "CacheStats",
    "ComponentOffload",
    "FirstBlockCache",
    "PerfOptions",
    "PERF_FIELDS",
    "add_performance_arguments",
    "apply_performance",
    "compile_blocks_",
    "describe",
    "enable_offload",
    "fuse_qkv_",
    "quantize_fp8_",
    "performance_overrides",
    "relative_l1",
    "resolve_attention_backend",
    "set_attention_backend_",
    "unwrap",
    "vae_fast_",
    "warmup",
]
