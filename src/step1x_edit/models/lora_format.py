"""LoRA files for the DiT, checked and converted to our (diffusers) module names: official/kohya and diffusers/PEFT.

Official (kohya) files, as the Step1X-Edit repository trains them, name each adapted layer by its official module
path with `_` for `.`: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` [r, in], `.lora_up.weight` [out, r]
and `.alpha` (a scalar; absent = r); the layer's weight changes by scale * alpha / r * up @ down. The official names
come from `weights.DIT_RULES`, the table that loads the checkpoints, so every Linear layer that table maps may carry
a LoRA, whichever of them the file holds. A fused official layer (`img_attn.qkv`, `txt_attn.qkv`, a single block's
`linear1` = q, k, v and the MLP input) lands on our separate layers exactly: the down matrix is shared and the up
matrix split by rows (row i of up @ down is row i of up times down); the final layer's modulation swaps the halves of
the up matrix as the loader swaps the weight's.

diffusers/PEFT files name our modules: `[transformer.]<module>.lora_A.weight` / `.lora_B.weight`, with alpha / r from
diffusers' `lora_adapter_metadata` (or `<module>.alpha` keys), scale 1 without either (diffusers' convention).

Anything else is refused with the file and the key: text-encoder keys (`lora_te*`, `text_encoder*`), modules the
DiT does not have, other adapter kinds (LoHa, LoKr, DoRA, LoRA biases), shapes that do not fit the layer or whose
ranks disagree. The checks need the header only (`inspect_lora`), so a bad file is named at start-up without reading
its tensors; `load_lora` reads the tensors (and refuses NaN/Inf).

Written here rather than taken from diffusers: its FLUX kohya converter (`_convert_kohya_flux_lora_to_diffusers`)
hard-codes FLUX.1's 19/38 blocks and 3072 widths (so it cannot check a file against this model, nor convert the tests'
tiny models), maps the embedders onto FluxTransformer2DModel's names rather than Step1X-Edit's, and leaves keys it
does not know behind instead of naming them. The PEFT form for fused projections (`fuse_qkv`) is ours too: diffusers
has no LoRA form for layers it fused itself.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .dit import DiTConfig, Step1XEditTransformer2DModel
from .layouts import FLOAT_DTYPES, WeightsError, read_safetensors_header
from .weights import DIT_RULES, _pieces  # (the rule table's grouping of our tensors per official key)

KOHYA_PREFIX = "lora_unet_"
_KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
_PEFT_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".alpha": "alpha"}
_TEXT_ENCODER = ("lora_te", "text_encoder", "te_", "te1_", "te2_")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' `LORA_ADAPTER_METADATA_KEY`: the LoraConfig as JSON
# our fused layers (models/fastpath.fuse_qkv_) and the separate layers they replace, in row order
FUSED = {"attn.to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
         "attn.to_added_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}


@dataclass(frozen=True)
class Target:
    """Where one official layer's output rows land: our layers, each with its row count, in row order."""

    pieces: tuple[tuple[str, int], ...]
    swap_halves: bool = False  # the final layer's modulation: (shift, scale) officially, (scale, shift) here

    @property
    def out_features(self) -> int:
        return sum(rows for _, rows in self.pieces)


@dataclass(frozen=True)
class LoraModule:
    """One adapted layer of a file."""

    prefix: str  # its key prefix in the file (messages name it)
    down: str  # tensor keys
    up: str
    alpha: str | None
    rank: int
    in_features: int
    target: Target
    default_alpha: float  # when there is no alpha tensor
    rslora: bool = False  # scale alpha / sqrt(r) (a PEFT option)


@dataclass(frozen=True)
class LoraFile:
    """A checked adapter file: its name (the file stem), layout and layers."""

    name: str
    path: Path
    layout: str  # "kohya" (official) | "peft" (diffusers)
    modules: tuple[LoraModule, ...]
    size_bytes: int

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules)

    @property
    def targets(self) -> set[str]:
        """Our (unfused) layers the file changes."""
        return {name for m in self.modules for name, _ in m.target.pieces}

    def describe(self) -> dict:
        return {"name": self.name, "format": self.layout, "rank": self.rank, "layers": len(self.targets)}


@functools.lru_cache(maxsize=8)
def module_maps(cfg: DiTConfig) -> tuple[dict[str, tuple[int, int]], dict[str, Target]]:
    """(our Linear layers -> (in, out) features, official layer path -> Target) for a DiT config, from a model built
    on the meta device (no memory) and the loader's rule table."""
    with torch.device("meta"):
        model = Step1XEditTransformer2DModel.from_dit_config(cfg)
    linears = {name: (m.in_features, m.out_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    official: dict[str, Target] = {}
    for key, items in _pieces(model, DIT_RULES).items():
        names = [ours.removesuffix(".weight") for _, ours, _ in items]
        if not key.endswith(".weight") or not all(n in linears for n in names):
            continue
        official[key.removesuffix(".weight")] = Target(tuple((n, linears[n][1]) for n in names),
                                                       swap_halves=items[0][0].transform == "swap_halves")
    return linears, official


@functools.lru_cache(maxsize=8)
def _kohya_names(cfg: DiTConfig) -> dict[str, str]:
    """kohya layer name (`double_blocks_0_img_attn_qkv`) -> official path (`double_blocks.0.img_attn.qkv`)."""
    return {path.replace(".", "_"): path for path in module_maps(cfg)[1]}


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors' own error types
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
    raw = meta.get(METADATA_KEY) or meta.get("transformer." + METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise WeightsError(f"{path}: its {METADATA_KEY} is not JSON ({e})") from e
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: its {METADATA_KEY} is not a JSON object")
    # diffusers pipelines save the keys prefixed with the component (`transformer.r`)
    return {k.removeprefix("transformer."): v for k, v in config.items()}


def _peft_alpha(config: Mapping, module: str, rank: int) -> float:
    """alpha of `module` by PEFT's rules: `alpha_pattern` (a key matching the end of the name, `^` anchoring it)
    over `lora_alpha`; without metadata alpha = r (scale 1)."""
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(value)
    alpha = config.get("lora_alpha")
    return float(alpha) if alpha is not None else float(rank)


def inspect_lora(path: str | Path, cfg: DiTConfig, name: str | None = None) -> LoraFile:
    """Check a LoRA file against the DiT of `cfg` from its header alone; WeightsError naming the file and the key
    for anything this model cannot take."""
    path = Path(path)
    infos = read_safetensors_header(path)
    if not infos:
        raise WeightsError(f"{path}: holds no tensors")
    linears, official = module_maps(cfg)
    kohya = _kohya_names(cfg)

    def refuse(key: str, why: str) -> WeightsError:
        return WeightsError(f"{path}: key {key!r}: {why}")

    config: dict | None = None
    layers: dict[str, dict[str, str]] = {}  # key prefix -> {"down"|"up"|"alpha": key}
    target_of: dict[str, Target] = {}
    layout_of: dict[str, str] = {}
    for key in infos:
        if key.startswith(_TEXT_ENCODER):
            raise refuse(key, "a text-encoder LoRA key: only the DiT (diffusion transformer) takes adapters here")
        if key.startswith(KOHYA_PREFIX):
            suffixes, layout = _KOHYA_SUFFIXES, "kohya"
        else:
            suffixes, layout = _PEFT_SUFFIXES, "peft"
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if suffix is None:
            raise refuse(key, "not a LoRA tensor (expected lora_down/lora_up/alpha or lora_A/lora_B; LoHa, LoKr, "
                              "DoRA and LoRA biases are not supported)")
        prefix = key[: -len(suffix)]
        if layout == "kohya":
            path_ = kohya.get(prefix[len(KOHYA_PREFIX):])
            if path_ is None:
                raise refuse(key, "no such layer in the Step1X-Edit DiT")
            target = official[path_]
        else:
            module = prefix.removeprefix("base_model.model.").removeprefix("transformer.")
            if module not in linears:
                raise refuse(key, f"the DiT has no Linear layer {module!r}")
            target = Target(((module, linears[module][1]),))
        layers.setdefault(prefix, {})[suffixes[suffix]] = key
        target_of[prefix], layout_of[prefix] = target, layout

    seen: dict[str, str] = {}  # our layer -> the prefix adapting it
    modules = []
    for prefix, keys in layers.items():
        for part in ("down", "up"):
            if part not in keys:
                other = keys.get("up") or keys.get("down") or keys["alpha"]
                raise refuse(other, f"its layer has no {'lora_down' if part == 'down' else 'lora_up'} "
                                    f"({'lora_A' if part == 'down' else 'lora_B'}) tensor")
        for part, key in keys.items():
            if infos[key].dtype not in FLOAT_DTYPES:
                raise refuse(key, f"dtype {infos[key].torch_dtype}, expected float32, float16 or bfloat16")
        down, up = infos[keys["down"]].shape, infos[keys["up"]].shape
        target = target_of[prefix]
        in_features = linears[target.pieces[0][0]][0]
        if len(down) != 2 or len(up) != 2:
            raise refuse(keys["down"] if len(down) != 2 else keys["up"], "not a matrix (only Linear layers)")
        if down[0] != up[1]:
            raise refuse(keys["up"], f"rank mismatch: the down matrix has rank {down[0]}, the up matrix {up[1]}")
        if down[0] < 1:
            raise refuse(keys["down"], "rank 0")
        if down[1] != in_features:
            raise refuse(keys["down"], f"shape {list(down)}: the layer takes {in_features} inputs")
        if up[0] != target.out_features:
            raise refuse(keys["up"], f"shape {list(up)}: the layer has {target.out_features} outputs")
        if "alpha" in keys and math.prod(infos[keys["alpha"]].shape) != 1:
            raise refuse(keys["alpha"], f"alpha must be a scalar, got shape {list(infos[keys['alpha']].shape)}")
        for ours, _ in target.pieces:
            if ours in seen:
                raise refuse(keys["down"], f"layer {ours} is adapted twice (also by {seen[ours]!r})")
            seen[ours] = prefix
        rank = down[0]
        rslora = False
        default_alpha = float(rank)
        if layout_of[prefix] == "peft":
            if config is None:
                config = _metadata(path)
            if config.get("use_dora"):
                raise refuse(keys["down"], "a DoRA adapter (use_dora in its metadata) is not supported")
            rslora = bool(config.get("use_rslora"))
            default_alpha = _peft_alpha(config, target.pieces[0][0], rank)
        modules.append(LoraModule(prefix, keys["down"], keys["up"], keys.get("alpha"), rank, in_features, target,
                                  default_alpha, rslora))
    layouts = {layout_of[m.prefix] for m in modules}
    return LoraFile(name or path.stem, path, "kohya" if layouts == {"kohya"} else "+".join(sorted(layouts)),
                    tuple(modules), path.stat().st_size)


# a tensor source: key -> tensor (the file's, or meta tensors of the header's shapes for planning)
TensorSource = Callable[[str], torch.Tensor]


def convert(lora: LoraFile, tensor: TensorSource) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Our (unfused) layer -> (A [r, in], B [out, r]) in float32 with alpha / r folded into B, so that the layer's
    change is B @ A times the request's scale. Layers split from one official layer share the same A object."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for m in lora.modules:
        a = tensor(m.down).float()
        b = tensor(m.up).float()
        if m.alpha is None:
            alpha = m.default_alpha
        elif a.device.type == "meta":
            alpha = 1.0  # planning only: shapes matter, not values
        else:
            alpha = float(tensor(m.alpha).float().reshape(()))
        b = b * (alpha / (math.sqrt(m.rank) if m.rslora else m.rank))
        if m.target.swap_halves:
            first, second = b.chunk(2, dim=0)
            b = torch.cat([second, first])
        rows = [r for _, r in m.target.pieces]
        for (name, _), part in zip(m.target.pieces, b.split(rows, dim=0)):
            out[name] = (a, part)
    return out


def read_tensors(lora: LoraFile, device: torch.device | str = "cpu") -> TensorSource:
    """A tensor source over the file (copies, checked finite); the file is opened once per call."""
    from safetensors import safe_open

    f = safe_open(str(lora.path), framework="pt", device="cpu")

    def get(key: str) -> torch.Tensor:
        try:
            t = f.get_tensor(key)
        except Exception as e:  # safetensors' own error types
            raise WeightsError(f"{lora.path}: cannot read tensor {key!r} ({e})") from e
        if t.numel() and not bool(torch.isfinite(t.float()).all()):
            raise WeightsError(f"{lora.path}: tensor {key!r} has NaN/Inf values: the file is corrupt")
        return t.to(device)

    return get


def meta_tensors(lora: LoraFile) -> TensorSource:
    """Meta tensors of the header's shapes (no data): to plan ranks and layers without reading the file."""
    infos = read_safetensors_header(lora.path)
    return lambda key: torch.empty(infos[key].shape, device="meta")


def _linear(model: nn.Module, name: str) -> nn.Linear | None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    module = getattr(module, "base_layer", module)  # already wrapped by PEFT for another adapter
    return module if isinstance(module, nn.Linear) else None


def _live_layout(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], model: nn.Module):
    """`pairs` on the layers `model` has now: q/k/v pairs onto the fused layer where `fuse_qkv` fused them."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    groups: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, pair in pairs.items():
        fused = None
        for fused_name, members in FUSED.items():
            for i, member in enumerate(members):
                if name.endswith("." + member):
                    block = name[: -len(member)]
                    if _linear(model, name) is None and _linear(model, block + fused_name) is not None:
                        fused = (block + fused_name, i)
        if fused is None:
            out[name] = pair
        else:
            groups.setdefault(fused[0], {})[fused[1]] = pair
    for fused_name, members in groups.items():
        out[fused_name] = _fuse(members, _linear(model, fused_name).out_features // 3)
    return out


def _fuse(members: Mapping[int, tuple[torch.Tensor, torch.Tensor]], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA for a fused [q; k; v] layer from LoRAs of its parts, exactly: A stacks the parts' distinct A matrices
    (an official qkv LoRA has one, shared: its rank stays r), B is block-structured so that rows of part i see only
    part i's A; parts without a LoRA get zero rows."""
    distinct: list[torch.Tensor] = []
    for a, _ in members.values():
        if not any(a is d for d in distinct):
            distinct.append(a)
    cols = {}
    offset = 0
    for d in distinct:
        cols[id(d)] = offset
        offset += d.shape[0]
    a0, b0 = next(iter(members.values()))
    a = torch.cat(distinct) if len(distinct) > 1 else distinct[0]
    b = torch.zeros(3 * rows, offset, dtype=b0.dtype, device=b0.device)
    for i, (ai, bi) in members.items():
        c = cols[id(ai)]
        b[i * rows:(i + 1) * rows, c:c + ai.shape[0]] = bi
    return a, b


def peft_state_dict(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], model: nn.Module,
                    dtype: torch.dtype | None = None, rank: int | None = None,
                    path: Path | str = "") -> tuple[dict[str, torch.Tensor], int]:
    """A PEFT state dict (`<layer>.lora_A.weight`, `.lora_B.weight`) for `model` as it is now (fused or not), every
    layer padded with zeros to one rank (the largest, or `rank`) so that one LoraConfig describes it; returns it
    and that rank. Padding adds exact zeros."""
    live = _live_layout(pairs, model)
    top = max(a.shape[0] for a, _ in live.values())
    rank = top if rank is None else rank
    if top > rank:
        raise WeightsError(f"{path}: rank {top} is above the {rank} this server was prepared for")
    sd: dict[str, torch.Tensor] = {}
    for name, (a, b) in sorted(live.items()):
        layer = _linear(model, name)
        if layer is None or a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            raise WeightsError(f"{path}: the DiT's layer {name} does not take this LoRA "
                               f"(A {list(a.shape)}, B {list(b.shape)})")
        r = a.shape[0]
        if r < rank:
            a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
        sd[name + ".lora_A.weight"] = a.to(dtype) if dtype is not None else a
        sd[name + ".lora_B.weight"] = b.to(dtype) if dtype is not None else b
    return sd, rank


def lora_config(rank: int, layers: set[str] | list[str], alpha: float | None = None) -> dict:
    """The LoraConfig (as diffusers' adapter metadata) for a state dict of `peft_state_dict`: one rank, scale
    alpha / rank (1 by default: alpha is folded into B), the layers by exact name (PEFT's list form would also match
    every name ending in one, e.g. each block's `proj_out` for the final `proj_out`)."""
    names = "|".join(re.escape(n) for n in sorted(layers))
    return {"r": rank, "lora_alpha": rank if alpha is None else alpha, "target_modules": f"^(?:{names})$"}


__all__ = ["FUSED", "LoraFile", "LoraModule", "Target", "convert", "inspect_lora", "lora_config", "meta_tensors",
           "module_maps", "peft_state_dict", "read_tensors"]
