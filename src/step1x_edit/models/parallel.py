"""One DiT call on several ranks: CFG-parallel (the prompt and negative-prompt rows on different ranks) and sequence
parallelism (each rank a slice of the tokens: Ulysses all-to-all and/or ring attention).

Sequence parallelism is diffusers' context parallelism, driven by the model's `_cp_plan` (models/dit.py): the root
splits `img_ids` / `txt_ids`, the outputs of `x_embedder` and `context_embedder` are split along the tokens (after
the connector, which needs the whole masked prompt), attention runs through diffusers' templated Ulysses / ring
attention, and `proj_out` is gathered. On CUDA that is `ModelMixin.enable_parallelism` as it is (NCCL). Written by
hand, each for a reason given where it is:

- `_enable_on_cpu`: `enable_parallelism` cannot run without an accelerator (it picks the device as
  `rank % torch.accelerator.device_count()`, a division by zero on a CPU-only machine); the same steps, in order.
- `_LseFluxAttnProcessor`: ring attention merges partial results by their log-sum-exp; diffusers' `native` backend
  returns none, and its LSE backends (cuDNN, flash, sage, ...) are CUDA kernels. On CPU, FLUX's processor with the
  attention call going to diffusers' own templated ring / unified attention, given a forward op that returns the
  LSE (PyTorch's fused CPU attention kernel). Ulysses needs no LSE and runs on diffusers' `native` path as it is
  (Gloo has the all-to-all it needs).
- `_SplitChooser`: diffusers splits equally (it asserts divisibility) unless told, when the config is made, to
  split unevenly (`ulysses_anything` / `ring_anything`, which cost a size exchange per attention call and exist for
  pure Ulysses or pure ring only). The token counts change per request (the image size), so the choice is made per
  call: equal slices when the counts divide, uneven ones when they do not, and for Ulysses x ring (no uneven mode)
  the call runs whole on every rank, through a twin of the model without the parallel hooks (same weights).
- `_CfgSplit`: diffusers has no CFG / data parallelism (its `_modeling_parallel` lists it as a TODO). Each rank of
  the `cfg` mesh dimension runs its share of the batch rows ([prompt rows; negative rows] -> rank 0 the prompt rows,
  rank 1 the negative ones) and the outputs are all-gathered, so every rank holds the whole prediction and does the
  same guidance and Euler arithmetic: the latents stay identical on every rank. A batch that does not divide (one
  unguided image) runs whole on every rank.

Ranks are laid out on a (cfg, ring, ulysses) device mesh. Constraints are checked before any rank starts
(`problems`): Ulysses must divide the heads, the degrees make the world size, no more ranks than GPUs, and no step
cache (each rank would decide on its own which blocks to skip, and ranks that disagree wait on each other forever).
"""

from __future__ import annotations

import copy
import inspect
import itertools
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections, apply_rotary_emb
from torch import nn

log = logging.getLogger(__name__)

MESH_DIMS = ("cfg", "ring", "ulysses")


@dataclass(frozen=True)
class Degrees:
    """How many ranks one request uses: cfg (1 or 2) x ring x ulysses."""

    cfg: int = 1
    ulysses: int = 1
    ring: int = 1

    @classmethod
    def from_settings(cls, settings: Any) -> Degrees:
        return cls(cfg=int(settings.cfg_parallel), ulysses=int(settings.ulysses_degree), ring=int(settings.ring_degree))

    @property
    def world_size(self) -> int:
        return self.cfg * self.ulysses * self.ring

    @property
    def sequence(self) -> int:
        """Ranks that share one row's tokens."""
        return self.ulysses * self.ring

    def describe(self) -> str:
        parts = [f"{name} {n}" for name, n in (("cfg-parallel", self.cfg), ("ulysses", self.ulysses),
                                               ("ring", self.ring)) if n > 1]
        return " x ".join(parts) + f" = {self.world_size} ranks" if parts else "1 rank"


# attention backends (settings names) with context-parallel support in diffusers 0.42; on CPU only `native`
SEQUENCE_PARALLEL_BACKENDS = ("native", "cudnn", "flash", "flash-attn", "flash-attn-3", "sage")


def problems(degrees: Degrees, *, heads: int, device_type: str, device_count: int, dtype: str = "auto",
             device: str = "auto", step_cache: str = "none", offload: str = "none",
             attention_backend: str = "native") -> list[str]:
    """What makes these degrees impossible here (empty: fine). Checked before any rank starts, so a bad
    configuration is a message at start-up, never a crash mid-request."""
    out = []
    if degrees.world_size == 1:
        return out
    if degrees.cfg not in (1, 2):
        out.append(f"cfg_parallel must be 1 or 2 (got {degrees.cfg}): guidance has two branches")
    if heads % degrees.ulysses:
        out.append(f"ulysses_degree {degrees.ulysses} does not divide the DiT's {heads} attention heads (Ulysses "
                   f"gives each rank whole heads); use one of "
                   f"{', '.join(str(d) for d in range(1, heads + 1) if heads % d == 0)}")
    if device_type == "cuda":
        if device not in ("auto", "cuda"):
            out.append(f"device {device!r}: with several ranks, rank r uses cuda:r; choose the GPUs with "
                       "CUDA_VISIBLE_DEVICES instead")
        if degrees.world_size > device_count:
            out.append(f"{degrees.describe()} need {degrees.world_size} GPUs, this machine shows {device_count} "
                       "(CUDA_VISIBLE_DEVICES)")
        if degrees.ring > 1 and dtype == "float32":
            out.append("ring attention on CUDA needs dtype bfloat16 or float16 (its log-sum-exp kernels are half "
                       "precision); use ulysses_degree, or the default dtype")
    if degrees.sequence > 1 and (attention_backend not in SEQUENCE_PARALLEL_BACKENDS
                                 or (device_type == "cpu" and attention_backend != "native")):
        usable = "native" if device_type == "cpu" else ", ".join(SEQUENCE_PARALLEL_BACKENDS)
        out.append(f"attention_backend {attention_backend!r} has no sequence-parallel (Ulysses / ring) support "
                   f"here; use {usable}")
    if step_cache != "none":
        out.append(f"step_cache {step_cache!r} cannot run on several ranks: each rank would decide alone which "
                   "blocks to skip, and ranks that disagree wait on each other forever")
    if offload != "none":
        out.append("offload: with several ranks each rank keeps its whole model on its own GPU")
    return out


def build_mesh(degrees: Degrees, device_type: str) -> dist.device_mesh.DeviceMesh:
    """The (cfg, ring, ulysses) mesh over the initialised default process group (every rank calls this)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (degrees.cfg, degrees.ring, degrees.ulysses), mesh_dim_names=MESH_DIMS)


def parallelize_dit(dit: nn.Module, degrees: Degrees, mesh: dist.device_mesh.DeviceMesh) -> None:
    """Make every call of `dit` a collective call of all ranks: sequence parallelism over the (ring, ulysses)
    dimensions, CFG-parallel over `cfg`. Every rank calls this in the same order (it creates process groups), with
    the same model; afterwards every rank must make the same calls with the same inputs."""
    heads = int(dit.config.num_attention_heads)
    if heads % degrees.ulysses:
        raise ValueError(f"ulysses_degree {degrees.ulysses} does not divide the DiT's {heads} attention heads")
    registry = _hooks(dit)
    if degrees.sequence > 1:
        # The twin shares every parameter and buffer (no copy of the weights): the model as it is before the
        # parallel hooks, for calls whose tokens cannot be split.
        memo = {id(t): t for t in itertools.chain(dit.parameters(), dit.buffers())}
        plain = copy.deepcopy(dit, memo)
        cp = _context_parallel_config(degrees, mesh)
        if _on_accelerator(dit):
            _prepare_backend_for_ring(dit, degrees)
            dit.enable_parallelism(config=cp)
        else:
            _enable_on_cpu(dit, cp, mesh, ring=degrees.ring > 1)
        registry.register_hook(_SplitChooser(cp, plain, degrees), "step1x_sequence_split")
    if degrees.cfg > 1:
        registry.register_hook(_CfgSplit(mesh["cfg"].get_group(), degrees.cfg), "step1x_cfg_parallel")
    dit.parallel_degrees = degrees
    log.info("DiT on %s (rank %d)", degrees.describe(), dist.get_rank())


# --------------------------------------------------------------------------------------------------------------
# sequence parallelism
# --------------------------------------------------------------------------------------------------------------


def _hooks(module: nn.Module) -> HookRegistry:
    return HookRegistry.check_if_exists_or_initialize(module)


def _on_accelerator(dit: nn.Module) -> bool:
    return next(dit.parameters()).device.type != "cpu"


def _context_parallel_config(degrees: Degrees, mesh):
    from diffusers.models._modeling_parallel import ContextParallelConfig

    # The whole 3-D mesh: diffusers takes its ("ring", "ulysses") part, the rank's own cfg slice.
    return ContextParallelConfig(ring_degree=degrees.ring, ulysses_degree=degrees.ulysses, mesh=mesh)


def _prepare_backend_for_ring(dit: nn.Module, degrees: Degrees) -> None:
    """Ring attention needs a backend that returns the log-sum-exp; PyTorch's flash kernel when none was chosen."""
    if degrees.ring == 1:
        return
    from diffusers.models.attention_dispatch import AttentionBackendName

    for module in dit.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            backend = processor._attention_backend
            if backend is None or AttentionBackendName(backend) == AttentionBackendName.NATIVE:
                log.info("ring attention: attention backend _native_flash (native returns no log-sum-exp)")
                dit.set_attention_backend("_native_flash")
            return


def _enable_on_cpu(dit: nn.Module, cp, mesh, *, ring: bool) -> None:
    """`ModelMixin.enable_parallelism` without an accelerator: the same steps (record the config, hand it to every
    attention processor, hook the `_cp_plan` in), with the LSE-returning processor when ring attention is on."""
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ParallelConfig

    config = ParallelConfig(context_parallel_config=cp)
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    dit._parallel_config = config
    for module in dit.modules():
        processor = getattr(module, "processor", None)
        if processor is None or not hasattr(processor, "_parallel_config"):
            continue
        if ring:
            processor = _LseFluxAttnProcessor()
            module.set_processor(processor)
        processor._parallel_config = config
    apply_context_parallel(dit, cp, dit._cp_plan)


def _attention_with_lse(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """A forward op for diffusers' templated ring attention on CPU: [B, S, H, D] in; out [B, S, H, D] and, asked
    for, the log-sum-exp [B, S, H]. PyTorch's fused CPU kernel, the one plain SDPA uses for these inputs. Inference
    only (no backward op)."""
    if attn_mask is not None or enable_gqa:
        raise ValueError("the CPU ring attention op takes no mask and no grouped-query attention")
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, scale=scale)
    out = out.transpose(1, 2)
    return (out, lse.transpose(1, 2)) if return_lse else out


class _LseFluxAttnProcessor(FluxAttnProcessor):
    """diffusers' `FluxAttnProcessor` (diffusers 0.42's body, unchanged) with the attention call going to diffusers'
    templated context-parallel attention with `_attention_with_lse` as its forward op (see the module docstring)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if self._parallel_config is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query, encoder_key, encoder_value = (
                x.unflatten(-1, (-1, attn.head_dim)) for x in (encoder_query, encoder_key, encoder_value))
            encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        hidden_states = _templated_context_parallel_attention(
            query, key, value, attention_mask, forward_op=_attention_with_lse, backward_op=None,
            _parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


class _CallArgs:
    """The DiT forward's arguments by name (hooks see them positional or by keyword)."""

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict):
        self.bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)

    def __getitem__(self, name: str) -> Any:
        return self.bound.arguments[name]

    def __setitem__(self, name: str, value: Any) -> None:
        self.bound.arguments[name] = value

    def call(self, fn) -> Any:
        args = self.bound.args[1:]  # without `self`
        return fn(*args, **self.bound.kwargs)


class _SplitChooser(ModelHook):
    """Per call: equal token slices when the text and image tokens divide by the sequence ranks; else diffusers'
    uneven split (pure Ulysses or pure ring); else (Ulysses x ring, or fewer tokens than ranks) the whole call on
    every rank through the twin without parallel hooks. The counts are the same on every rank, so every rank takes
    the same branch."""

    def __init__(self, cp, plain: nn.Module, degrees: Degrees):
        super().__init__()
        self.cp, self.plain, self.degrees = cp, plain, degrees

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        a = _CallArgs(module, args, kwargs)
        n_img, n_txt, ranks = a["hidden_states"].shape[1], a["encoder_hidden_states"].shape[1], self.degrees.sequence
        even = n_img % ranks == 0 and n_txt % ranks == 0
        pure = self.degrees.ring == 1 or self.degrees.ulysses == 1
        if not even and (not pure or min(n_img, n_txt) < ranks):
            return a.call(self.plain)
        # read by diffusers' split/gather hooks and attention at call time
        self.cp.ulysses_anything = not even and self.degrees.ulysses > 1
        self.cp.ring_anything = not even and self.degrees.ring > 1
        return self.fn_ref.original_forward(*args, **kwargs)


class _CfgSplit(ModelHook):
    """Batch rows split across the cfg ranks ([prompt rows; negative rows]: rank 0 the first half, rank 1 the
    second), the outputs all-gathered along the batch; a batch that does not divide runs whole on every rank."""

    ROW_ARGS = ("hidden_states", "timestep", "encoder_hidden_states", "t_vec", "encoder_attention_mask")

    def __init__(self, group, size: int):
        super().__init__()
        self.group, self.size = group, size
        self.rank = dist.get_rank(group)

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        a = _CallArgs(module, args, kwargs)
        batch = a["hidden_states"].shape[0]
        if batch % self.size:
            return self.fn_ref.original_forward(*args, **kwargs)
        for name in self.ROW_ARGS:
            a[name] = a[name].chunk(self.size, dim=0)[self.rank]
        out = a.call(self.fn_ref.original_forward).contiguous()
        parts = [torch.empty_like(out) for _ in range(self.size)]
        dist.all_gather(parts, out, group=self.group)
        return torch.cat(parts, dim=0)


__all__ = ["Degrees", "MESH_DIMS", "build_mesh", "parallelize_dit", "problems"]
