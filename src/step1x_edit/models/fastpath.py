"""Performance options applied to the models in place: each off by default, none of them model code of its own.

`pipeline/edit.build_pipeline` applies them from the settings (`PerfOptions`); the benchmark applies them one by one.

Exact options (same function, bf16 rounding aside):
- `fuse_qkv`: one [3*d, d] matmul for q/k/v (and one for the text stream of the double blocks), taken by
  diffusers' FluxAttnProcessor through its fused path; the unfused layers are dropped so no weight is held twice.
- `attention_backend`: the DiT blocks' attention kernel through diffusers' attention dispatcher.
- `compile`: regional `torch.compile` of the repeated blocks (the model's `_repeated_blocks`).
- `vae_bf16` / `vae_channels_last`: the VAE in bf16 and/or channels_last.

Approximate, opt-in:
- `fp8_dynamic`: torchao float8 dynamic quantisation of the DiT blocks' linears (CUDA, compute capability 8.9+).
- `step_cache`: diffusers' cache hooks on the FLUX blocks (`CacheMixin.enable_cache`): first-block cache,
  TaylorSeer, MagCache. `StepCache` applies one, re-configures it per step count where the hook needs that
  (MagCache), and counts the steps the last block really computed.

Memory mode: `offload="model"` keeps components on the CPU and moves each to the device only while it runs.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, fields
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
STEP_CACHES = ("none", "first_block", "taylorseer", "magcache")


@dataclass(frozen=True)
class PerfOptions:
    """The performance settings as one value (defaults = the plain path). Field names are `Settings` names."""

    fuse_qkv: bool = False
    compile: bool = False
    compile_mode: str = "default"
    compile_warmup_sizes: tuple[int, ...] | None = None  # None = the pipeline's size_level; () = no warm-up
    attention_backend: str = "native"
    vae_bf16: bool = False
    vae_channels_last: bool = False
    step_cache: str = "none"
    step_cache_threshold: float = 0.05
    step_cache_interval: int = 5
    step_cache_warmup_steps: int = 3
    step_cache_mag_ratios: str | None = None
    fp8_dynamic: bool = False
    offload: str = "none"

    @classmethod
    def from_settings(cls, settings: Any) -> PerfOptions:
        values = {}
        for f in fields(cls):
            v = getattr(settings, f.name)
            values[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**values)

    def changes(self) -> dict[str, Any]:
        """The options that differ from the defaults (cache parameters only when a cache is on)."""
        default = PerfOptions()
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)}
        if self.step_cache == "none":
            out = {k: v for k, v in out.items() if not k.startswith("step_cache")}
        return out

    def validate(self) -> None:
        resolve_attention_backend(self.attention_backend)
        for name, value, allowed in (("offload", self.offload, OFFLOAD_MODES),
                                     ("compile_mode", self.compile_mode, COMPILE_MODES),
                                     ("step_cache", self.step_cache, STEP_CACHES)):
            if value not in allowed:
                raise ValueError(f"{name}: must be one of {', '.join(allowed)}, got {value!r}")
        if self.step_cache == "magcache":
            mag_ratios(self.step_cache_mag_ratios)


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
    separate layers; returns how many attention modules were fused. diffusers' FluxAttnProcessor takes its fused
    path by itself (`attn.fused_projections`, `to_qkv`, `to_added_qkv`). Not diffusers' own
    `fuse_qkv_projections()`: it re-initialises a new Linear in the weights' dtype (impossible for float8-stored
    weights) and keeps the unfused copies (a second copy of ~1/3 of the weights)."""
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
    """Route the DiT blocks' attention through one backend; raises if its package is missing. Per block rather than
    diffusers' `ModelMixin.set_attention_backend`, which also makes it the process-wide default: the connector's
    masked attention must stay on SDPA (flash kernels take no mask)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    value = resolve_attention_backend(name)
    backend = AttentionBackendName(value)
    _check_attention_backend_requirements(backend)
    for block in _blocks(dit):
        block.attn.processor._attention_backend = None if value == "native" else backend
    return value


# Enough room for the graphs one server compiles (block classes x {batch 1, batch >= 2} x compile variants); past
# torch's default of 8 dynamo would silently run the blocks eager for every new shape.
RECOMPILE_LIMIT = 64


def compile_blocks_(dit: nn.Module, mode: str = "default", fullgraph: bool = False, dynamic: bool | None = True,
                    backend: Any = None) -> int:
    """Regional compilation (diffusers' `compile_repeated_blocks`: `module.compile()` on each block named in
    `_repeated_blocks`); the embedders, the connector and the output head stay eager. Returns the block count.

    `dynamic=True` (default): the batch and token dimensions are symbolic from the first call, so one graph per block
    class serves every working size, aspect ratio and batch of two or more rows; batch 1 (guidance off, n=1) gets a
    second graph (torch specialises sizes 0 and 1). Left to torch (`None`), the first shape compiles static and
    the second recompiles dynamic, and every batch size on the way adds another. Duck sizing is turned off: with it
    a token count that happens to equal a model width (e.g. 3072 tokens, 512x768) would be fused with that static
    width and recompile static. The recompile limit is raised to RECOMPILE_LIMIT (dynamo's default of 8 would,
    once hit, run new shapes eager without an error). `backend` is for tests (e.g. a graph-counting backend)."""
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    if dynamic:
        fx_config.use_duck_shape = False
    for name in ("recompile_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(RECOMPILE_LIMIT, getattr(torch._dynamo.config, name)))
    kwargs: dict[str, Any] = {"fullgraph": fullgraph, "dynamic": dynamic}
    if mode != "default":
        kwargs["mode"] = mode
    if backend is not None:
        kwargs["backend"] = backend
    dit.compile_repeated_blocks(**kwargs)
    return len(_blocks(dit))


def compiled_graphs() -> int:
    """Graphs torch.compile has produced in this process so far (dynamo's own counter): a number that grows while
    serving means a request compiled (the worker stalled for it)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _fp8_filter(module: nn.Module, fqn: str) -> bool:
    # Token-wise linears of the blocks only: the per-sample modulation linears (M = batch) gain nothing.
    return (
        isinstance(module, nn.Linear)
        and fqn.startswith(("transformer_blocks.", "single_transformer_blocks."))
        and ".norm" not in fqn
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def use_scaled_mm_(dit: nn.Module) -> int:
    """The token-wise linears whose weights are stored in float8 (the loader's `dit_fp8`: `FP8Linear`) run their
    matmuls in float8 on those weights as they are (`FP8Linear.scaled_mm`); returns how many. The modulation
    linears keep the exact upcast (one row per sample: nothing to gain)."""
    from .weights import FP8Linear

    n = 0
    for name, module in dit.named_modules():
        if isinstance(module, FP8Linear) and _fp8_filter(module, name):
            module.scaled_mm = True
            n += 1
    return n


def quantize_fp8_(dit: nn.Module, device: torch.device | str | None = None) -> int:
    """Float8 matmuls (approximate) in the blocks' token-wise linears, returns how many: bf16 linears get torchao's
    float8 dynamic activation + float8 weight quantisation (per-row scales); linears whose weights `dit_fp8`
    already stores in float8 use them as they are (`use_scaled_mm_`: no upcast to a 25 GB bf16 copy first, no
    second rounding). `set_inductor_config=False`: torchao's default would switch on slow inductor tuning for the
    whole process (every later compile)."""
    from .weights import FP8Linear

    dev = torch.device(device) if device is not None else next(dit.parameters()).device
    if dev.type != "cuda":
        raise RuntimeError(f"fp8_dynamic needs a CUDA GPU with float8 support (compute capability 8.9+), not {dev}")
    if torch.cuda.get_device_capability(dev) < (8, 9):
        raise RuntimeError(f"fp8_dynamic needs compute capability 8.9+; {torch.cuda.get_device_name(dev)} has "
                           f"{torch.cuda.get_device_capability(dev)}")
    dtype = dit.compute_dtype
    if dtype != torch.bfloat16:
        raise RuntimeError(f"fp8_dynamic needs the DiT in bfloat16 (torchao's float8 kernels), not {dtype}; "
                           "set dtype=bfloat16")

    def plain(module: nn.Module, fqn: str) -> bool:
        return not isinstance(module, FP8Linear) and _fp8_filter(module, fqn)

    count = sum(plain(m, n) for n, m in dit.named_modules())
    if count:
        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_
            from torchao.quantization.granularity import PerRow
        except Exception as e:  # noqa: BLE001 - ImportError, or a torchao built for another torch failing on import
            raise RuntimeError(f"fp8_dynamic needs torchao (pip install torchao; not a dependency of this "
                               f"package): {type(e).__name__}: {e}") from e
        quantize_(dit, fp8_config(Float8DynamicActivationFloat8WeightConfig, PerRow), filter_fn=plain, device=dev)
    return count + use_scaled_mm_(dit)


def fp8_config(config_class: Any, per_row: Any) -> Any:
    """torchao's float8 dynamic config as this project uses it: per-row scales, and inductor's global settings
    left alone (torchao's `set_inductor_config=True` default turns on slow tuning for every later compile)."""
    return config_class(granularity=per_row(), set_inductor_config=False)


# --------------------------------------------------------------------------------------------------------------
# Step cache: diffusers' hooks
# --------------------------------------------------------------------------------------------------------------


def mag_ratios(spec: str | None) -> torch.Tensor | None:
    """`step_cache_mag_ratios`: comma-separated numbers, `flux` (diffusers' FLUX.1-dev ratios) or `calibrate`
    (None: calibration mode)."""
    if spec is None or not spec.strip():
        raise ValueError("step_cache=magcache needs step_cache_mag_ratios: the model's per-step magnitude ratios "
                         "(comma-separated), `flux` (FLUX.1-dev's, not calibrated for Step1X-Edit) or `calibrate` "
                         "(skips nothing and logs the ratios of each run, to paste here)")
    spec = spec.strip().lower()
    if spec == "calibrate":
        return None
    if spec == "flux":
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        return FLUX_MAG_RATIOS.clone()
    try:
        values = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"step_cache_mag_ratios: not a list of numbers: {spec[:60]!r}") from None
    if len(values) < 2:
        raise ValueError("step_cache_mag_ratios: needs at least two ratios")
    return torch.tensor(values)


class StepCache:
    """One of diffusers' step caches on the DiT, and a count of the DiT calls and of those the blocks computed.

    The hooks live on the FLUX blocks (diffusers' `TransformerBlockRegistry` knows them); the sampler resets their
    state at the start of each denoise call and wraps each DiT call in `cache_context`. `begin(steps)` is called
    before each denoise call: MagCache's config holds the step count, so it is re-applied when that changes.
    """

    def __init__(self, dit: nn.Module, opts: PerfOptions):
        self.dit, self.opts = dit, opts
        self.kind = opts.step_cache
        self.calls = 0  # DiT calls since construction
        self.computed = 0  # of those, calls in which the last block really ran its attention
        self._steps: int | None = None
        last = dit.single_transformer_blocks[-1] if len(dit.single_transformer_blocks) else dit.transformer_blocks[-1]
        dit.x_embedder.register_forward_hook(self._count_call)
        last.attn.norm_q.register_forward_hook(self._count_computed)
        if self.kind != "magcache":
            dit.enable_cache(self._config(None))

    def _count_call(self, *_: Any) -> None:
        self.calls += 1

    def _count_computed(self, *_: Any) -> None:
        self.computed += 1

    @property
    def skipped(self) -> int:
        return self.calls - self.computed

    def _config(self, steps: int | None) -> Any:
        from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

        o = self.opts
        if self.kind == "first_block":
            return FirstBlockCacheConfig(threshold=o.step_cache_threshold)
        if self.kind == "taylorseer":
            return TaylorSeerCacheConfig(cache_interval=o.step_cache_interval,
                                         disable_cache_before_step=o.step_cache_warmup_steps,
                                         taylor_factors_dtype=self.dit.compute_dtype)
        ratios = mag_ratios(o.step_cache_mag_ratios)
        return MagCacheConfig(threshold=o.step_cache_threshold, num_inference_steps=int(steps or 28),
                              mag_ratios=ratios, calibrate=ratios is None)

    def begin(self, steps: int) -> None:
        if self.kind == "magcache" and steps != self._steps:
            if self.dit.is_cache_enabled:
                self.dit.disable_cache()
            self.dit.enable_cache(self._config(steps))
            self._steps = steps

    def stats(self) -> dict[str, Any]:
        return {"step_cache": self.kind, "step_cache_calls": self.calls, "step_cache_skipped": self.skipped}


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

    Written here rather than diffusers' `enable_model_cpu_offload`, which belongs to a `DiffusionPipeline` (this
    project's pipeline is not one) and moves components in a fixed sequence; here the first call decides.

    - A `keep` component (the VAE: 0.3 GB) comes to the device on first use and stays, evicting nothing: a preview
      decode between two denoising steps would otherwise send the 25 GB DiT back to the host and fetch it again.
    - Each component's weights have one host copy, made once (in page-locked memory when the execution device is
      CUDA, so uploads run at full bus speed and asynchronously); eviction only points the parameters back at it
      (nothing is copied back). Modules added later (LoRA layers loaded on demand) get their host copy when first
      seen, and a tensor replaced while the component was on the host becomes the new host copy; changes made
      while a component is on the device are not kept (the pipeline switches adapters before the DiT's first call,
      while the conditioner's visit has sent the DiT to the host).
    `loads` records the order in which components were brought in (for logs and tests).
    """

    def __init__(self, execution_device: torch.device | str, offload_device: torch.device | str = "cpu"):
        self.execution_device = torch.device(execution_device)
        self.offload_device = torch.device(offload_device)
        self.pin = self.execution_device.type == "cuda" and self.offload_device.type == "cpu"
        self.components: dict[str, nn.Module] = {}
        self.kept: set[str] = set()
        self.on_device: set[str] = set()
        self.resident: str | None = None
        self.loads: list[str] = []
        # component -> module -> (kind, attribute) -> host tensor; weak keys: a module deleted later (an adapter
        # evicted from the cache) drops its copies, and a new module at the same address is not mistaken for it
        self._host: dict[str, weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str], torch.Tensor]]] = {}
        self._handles: list[Any] = []

    def add(self, name: str, component: nn.Module, triggers: Sequence[nn.Module], keep: bool = False) -> None:
        component.to(self.offload_device)
        if self.pin:
            component._apply(lambda t: t.pin_memory())
        self._host[name] = weakref.WeakKeyDictionary()
        self.components[name] = component
        for module, kind, attr, t in _slots(component):
            self._host_copy(name, module, kind, attr, t)
        if keep:
            self.kept.add(name)
        for module in triggers:
            self._handles.append(module.register_forward_pre_hook(partial(self._before, name), with_kwargs=True))

    def load(self, name: str) -> None:
        if name in self.on_device:
            return
        if name not in self.kept:
            if self.resident is not None:
                self._to_host(self.resident)
            self.resident = name
        self._to_device(name)
        self.loads.append(name)

    def _host_copy(self, name: str, module: nn.Module, kind: str, attr: str, t: torch.Tensor) -> torch.Tensor:
        """The host copy of one tensor slot: the one kept, unless the slot is new or was given another tensor on
        the host side (then that tensor, pinned if uploads are pinned)."""
        per = self._host[name].setdefault(module, {})
        host = per.get((kind, attr))
        fresh = host is None or (t.device == self.offload_device and t.data_ptr() != host.data_ptr())
        if fresh:
            host = t.detach().to(self.offload_device)
            if self.pin and not host.is_pinned():
                host = host.pin_memory()
            per[(kind, attr)] = host
        return host

    def _to_device(self, name: str) -> None:
        for module, kind, attr, t in _slots(self.components[name]):
            host = self._host_copy(name, module, kind, attr, t)
            _set(module, kind, attr, host.to(self.execution_device, non_blocking=self.pin))
        self.on_device.add(name)

    def _to_host(self, name: str) -> None:
        for module, kind, attr, t in _slots(self.components[name]):
            per = self._host[name].get(module, {})
            # a slot first seen on the device (an adapter loaded while the DiT was there): copied down once
            _set(module, kind, attr, per[(kind, attr)] if (kind, attr) in per
                 else self._host_copy(name, module, kind, attr, t))
        self.on_device.discard(name)

    def _move(self, x: Any) -> Any:
        return x.to(self.execution_device) if isinstance(x, torch.Tensor) and x.device != self.execution_device else x

    def _before(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.load(name)
        return tree_map(self._move, args), tree_map(self._move, kwargs)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _slots(module: nn.Module) -> Any:
    """(owner module, "param" | "buffer", attribute name, tensor) of every parameter and buffer."""
    for m in module.modules():
        for attr, p in m._parameters.items():
            if p is not None:
                yield m, "param", attr, p
        for attr, b in m._buffers.items():
            if b is not None:
                yield m, "buffer", attr, b


def _set(module: nn.Module, kind: str, attr: str, value: torch.Tensor) -> None:
    if kind == "param":
        param = module._parameters[attr]
        if torch._has_compatible_shallow_copy_type(param, value):
            param.data = value  # the same Parameter object (what nn.Module.to does)
        else:  # e.g. an accelerator whose tensors are of another type: a new Parameter, as nn.Module._apply does
            module._parameters[attr] = nn.Parameter(value, requires_grad=param.requires_grad)
    else:
        module._buffers[attr] = value


def encoder_module(conditioner: Any) -> tuple[nn.Module, nn.Module]:
    """(the encoder's weights holder, the module the conditioner calls) of a Step1XConditioner."""
    model = conditioner.model
    return model, getattr(model, "model", model)


def enable_offload(dit: nn.Module, vae: nn.Module, conditioner: Any, device: torch.device | str,
                   offload_device: torch.device | str = "cpu") -> ComponentOffload:
    off = ComponentOffload(device, offload_device)
    enc, enc_call = encoder_module(conditioner)
    off.add("encoder", enc, [enc_call])
    off.add("dit", dit, [dit])
    off.add("vae", vae, [vae.encoder, vae.decoder], keep=True)  # small: stays once it came (previews, decode)
    return off


__all__ = [
    "ATTENTION_BACKENDS",
    "COMPILE_MODES",
    "ComponentOffload",
    "OFFLOAD_MODES",
    "PerfOptions",
    "STEP_CACHES",
    "StepCache",
    "compile_blocks_",
    "enable_offload",
    "encoder_module",
    "fuse_qkv_",
    "mag_ratios",
    "quantize_fp8_",
    "use_scaled_mm_",
    "resolve_attention_backend",
    "set_attention_backend_",
    "vae_fast_",
]
