"""Loading every published checkpoint layout into our (diffusers-named) modules, strictly.

Official names are tied to our parameter names by a table of rules (`DIT_RULES`, `VAE_RULES`): each of our
tensors is one piece of one official tensor (the official fused `qkv` / `linear1` are split into diffusers'
`to_q/k/v` (+ `proj_mlp`), the final-layer modulation has its shift/scale halves swapped, VAE attention 1x1
convs become linears). The same table gives the expected official key set and shapes for a config, so a
missing, unexpected or mis-shaped key is reported by its name in the file, and it converts both ways
(`to_official` is used by tests and by anyone exporting weights). Diffusers-style directories use our own names
(`DIFFUSERS_DIT_RULES`: identity, except `connector.*`, stored there in the official names; `DIFFUSERS_VAE_RULES`:
identity), so the same machinery loads them; `layouts.py` says which layout a path holds.

Tensors are read one at a time from the memory-mapped file(s) and copied straight to the target device and
dtype into a model built on the meta device; the mapping is dropped and re-opened every `REOPEN_BYTES`, so the
host never holds a second full copy (not even as mapped page cache). Every tensor is checked: dtype from the
header before anything is read (floating point only; float8_e4m3fn only for the DiT), finite values after the
copy (a corrupt download shows up as NaN/Inf). FP8 checkpoints are upcast to the compute dtype, or with
`fp8=True` the DiT blocks' Linear weights stay float8_e4m3fn (`FP8Linear` upcasts them per matmul).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from .connector import ConnectorConfig
from .dit import DiTConfig, Step1XEditTransformer2DModel, unsupported_config
from .layouts import (
    FLOAT_DTYPES,
    FP8_DTYPE,
    SCALE_FACTOR_KEY,
    V12_CONNECTOR_MARKERS,
    TensorInfo,
    WeightsError,
    dit_version,
    inspect_dit,
    inspect_vae,
    read_json,
    read_safetensors_header,
    sharded_headers,
)
from .vae import VAEConfig, build_vae

log = logging.getLogger(__name__)

VERSIONS = ("v1.0", "v1.1")


@dataclass(frozen=True)
class Piece:
    """Where one of our tensors lives in the official file."""

    key: str  # official key
    index: int = 0  # position of our tensor among the pieces concatenated (dim 0) into the official tensor
    transform: str = ""  # "" | "swap_halves" | "conv1x1"


Rule = tuple[str, str, int, str]  # (our-name regex, official template, piece index, transform)

_DOUBLE = r"transformer_blocks\.(\d+)\."
_SINGLE = r"single_transformer_blocks\.(\d+)\."
_REFINER = r"connector\.refiner\.token_refiner\.refiner_blocks\.(\d+)\."
_S = "connector.S."
_P = r"(weight|bias)"

DIT_RULES: list[Rule] = [
    (rf"x_embedder\.{_P}", "img_in.{0}", 0, ""),
    (rf"context_embedder\.{_P}", "txt_in.{0}", 0, ""),
    (rf"time_embed\.(in_layer|out_layer)\.{_P}", "time_in.{0}.{1}", 0, ""),
    (rf"vec_embed\.(in_layer|out_layer)\.{_P}", "vector_in.{0}.{1}", 0, ""),
    (rf"{_DOUBLE}norm1\.linear\.{_P}", "double_blocks.{0}.img_mod.lin.{1}", 0, ""),
    (rf"{_DOUBLE}norm1_context\.linear\.{_P}", "double_blocks.{0}.txt_mod.lin.{1}", 0, ""),
    (rf"{_DOUBLE}attn\.to_q\.{_P}", "double_blocks.{0}.img_attn.qkv.{1}", 0, ""),
    (rf"{_DOUBLE}attn\.to_k\.{_P}", "double_blocks.{0}.img_attn.qkv.{1}", 1, ""),
    (rf"{_DOUBLE}attn\.to_v\.{_P}", "double_blocks.{0}.img_attn.qkv.{1}", 2, ""),
    (rf"{_DOUBLE}attn\.add_q_proj\.{_P}", "double_blocks.{0}.txt_attn.qkv.{1}", 0, ""),
    (rf"{_DOUBLE}attn\.add_k_proj\.{_P}", "double_blocks.{0}.txt_attn.qkv.{1}", 1, ""),
    (rf"{_DOUBLE}attn\.add_v_proj\.{_P}", "double_blocks.{0}.txt_attn.qkv.{1}", 2, ""),
    (rf"{_DOUBLE}attn\.norm_q\.weight", "double_blocks.{0}.img_attn.norm.query_norm.scale", 0, ""),
    (rf"{_DOUBLE}attn\.norm_k\.weight", "double_blocks.{0}.img_attn.norm.key_norm.scale", 0, ""),
    (rf"{_DOUBLE}attn\.norm_added_q\.weight", "double_blocks.{0}.txt_attn.norm.query_norm.scale", 0, ""),
    (rf"{_DOUBLE}attn\.norm_added_k\.weight", "double_blocks.{0}.txt_attn.norm.key_norm.scale", 0, ""),
    (rf"{_DOUBLE}attn\.to_out\.0\.{_P}", "double_blocks.{0}.img_attn.proj.{1}", 0, ""),
    (rf"{_DOUBLE}attn\.to_add_out\.{_P}", "double_blocks.{0}.txt_attn.proj.{1}", 0, ""),
    (rf"{_DOUBLE}ff\.net\.0\.proj\.{_P}", "double_blocks.{0}.img_mlp.0.{1}", 0, ""),
    (rf"{_DOUBLE}ff\.net\.2\.{_P}", "double_blocks.{0}.img_mlp.2.{1}", 0, ""),
    (rf"{_DOUBLE}ff_context\.net\.0\.proj\.{_P}", "double_blocks.{0}.txt_mlp.0.{1}", 0, ""),
    (rf"{_DOUBLE}ff_context\.net\.2\.{_P}", "double_blocks.{0}.txt_mlp.2.{1}", 0, ""),
    (rf"{_SINGLE}norm\.linear\.{_P}", "single_blocks.{0}.modulation.lin.{1}", 0, ""),
    (rf"{_SINGLE}attn\.to_q\.{_P}", "single_blocks.{0}.linear1.{1}", 0, ""),
    (rf"{_SINGLE}attn\.to_k\.{_P}", "single_blocks.{0}.linear1.{1}", 1, ""),
    (rf"{_SINGLE}attn\.to_v\.{_P}", "single_blocks.{0}.linear1.{1}", 2, ""),
    (rf"{_SINGLE}proj_mlp\.{_P}", "single_blocks.{0}.linear1.{1}", 3, ""),
    (rf"{_SINGLE}attn\.norm_q\.weight", "single_blocks.{0}.norm.query_norm.scale", 0, ""),
    (rf"{_SINGLE}attn\.norm_k\.weight", "single_blocks.{0}.norm.key_norm.scale", 0, ""),
    (rf"{_SINGLE}proj_out\.{_P}", "single_blocks.{0}.linear2.{1}", 0, ""),
    (rf"norm_out\.linear\.{_P}", "final_layer.adaLN_modulation.1.{0}", 0, "swap_halves"),
    (rf"proj_out\.{_P}", "final_layer.linear.{0}", 0, ""),
    # connector: diffusers' HunyuanVideoTokenRefiner names <- the official SingleTokenRefiner names
    (rf"connector\.refiner\.proj_in\.{_P}", _S + "input_embedder.{0}", 0, ""),
    (rf"connector\.refiner\.time_text_embed\.timestep_embedder\.linear_1\.{_P}", _S + "t_embedder.mlp.0.{0}", 0, ""),
    (rf"connector\.refiner\.time_text_embed\.timestep_embedder\.linear_2\.{_P}", _S + "t_embedder.mlp.2.{0}", 0, ""),
    (rf"connector\.refiner\.time_text_embed\.text_embedder\.(linear_1|linear_2)\.{_P}", _S + "c_embedder.{0}.{1}", 0, ""),
    (rf"{_REFINER}(norm1|norm2)\.{_P}", _S + "individual_token_refiner.blocks.{0}.{1}.{2}", 0, ""),
    (rf"{_REFINER}attn\.to_q\.{_P}", _S + "individual_token_refiner.blocks.{0}.self_attn_qkv.{1}", 0, ""),
    (rf"{_REFINER}attn\.to_k\.{_P}", _S + "individual_token_refiner.blocks.{0}.self_attn_qkv.{1}", 1, ""),
    (rf"{_REFINER}attn\.to_v\.{_P}", _S + "individual_token_refiner.blocks.{0}.self_attn_qkv.{1}", 2, ""),
    (rf"{_REFINER}attn\.to_out\.0\.{_P}", _S + "individual_token_refiner.blocks.{0}.self_attn_proj.{1}", 0, ""),
    (rf"{_REFINER}ff\.net\.0\.proj\.{_P}", _S + "individual_token_refiner.blocks.{0}.mlp.fc1.{1}", 0, ""),
    (rf"{_REFINER}ff\.net\.2\.{_P}", _S + "individual_token_refiner.blocks.{0}.mlp.fc2.{1}", 0, ""),
    (rf"{_REFINER}norm_out\.linear\.{_P}", _S + "individual_token_refiner.blocks.{0}.adaLN_modulation.1.{1}", 0, ""),
    (rf"connector\.global_proj_out\.{_P}", "connector.global_proj_out.{0}", 0, ""),
    (r"connector\.scale_factor", "connector.scale_factor", 0, ""),
]


class RuleSet(list):
    """Rules plus the number of VAE resolution levels, which the reversed decoder block index (`{0r}`) needs."""

    def __init__(self, rules: Iterable[Rule], n_levels: int = 0):
        super().__init__(rules)
        self.n_levels = n_levels


def vae_rules(n_levels: int) -> RuleSet:
    """diffusers AutoencoderKL names -> LDM/FLUX `AutoEncoder` names. Decoder up blocks run in reverse order."""
    res = r"(norm1|conv1|norm2|conv2)"
    rules: list[Rule] = []
    for part in ("encoder", "decoder"):
        rules += [
            (rf"{part}\.(conv_in|conv_out)\.{_P}", part + ".{0}.{1}", 0, ""),
            (rf"{part}\.conv_norm_out\.{_P}", part + ".norm_out.{0}", 0, ""),
            (rf"{part}\.mid_block\.resnets\.(\d+)\.{res}\.{_P}", part + ".mid.block_{0+1}.{1}.{2}", 0, ""),
            (rf"{part}\.mid_block\.attentions\.0\.group_norm\.{_P}", part + ".mid.attn_1.norm.{0}", 0, ""),
            (rf"{part}\.mid_block\.attentions\.0\.to_(q|k|v)\.{_P}", part + ".mid.attn_1.{0}.{1}", 0, "conv1x1"),
            (rf"{part}\.mid_block\.attentions\.0\.to_out\.0\.{_P}", part + ".mid.attn_1.proj_out.{0}", 0, "conv1x1"),
        ]
    rules += [
        (rf"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.{res}\.{_P}", "encoder.down.{0}.block.{1}.{2}.{3}", 0, ""),
        (rf"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.{_P}", "encoder.down.{0}.block.{1}.nin_shortcut.{2}", 0, ""),
        (rf"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.{_P}", "encoder.down.{0}.downsample.conv.{1}", 0, ""),
        (rf"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.{res}\.{_P}", "decoder.up.{0r}.block.{1}.{2}.{3}", 0, ""),
        (rf"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.{_P}", "decoder.up.{0r}.block.{1}.nin_shortcut.{2}", 0, ""),
        (rf"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.{_P}", "decoder.up.{0r}.upsample.conv.{1}", 0, ""),
    ]
    return RuleSet(rules, n_levels)


def _format(template: str, groups: tuple[str, ...], n_levels: int) -> str:
    def sub(m: re.Match) -> str:
        i, mod = int(m.group(1)), m.group(2)
        if mod == "+1":
            return str(int(groups[i]) + 1)
        if mod == "r":
            return str(n_levels - 1 - int(groups[i]))
        return groups[i]

    return re.sub(r"\{(\d+)(\+1|r)?\}", sub, template)


def official_piece(name: str, rules: list[Rule]) -> Piece:
    for pattern, template, index, transform in rules:
        m = re.fullmatch(pattern, name)
        if m:
            return Piece(_format(template, m.groups(), getattr(rules, "n_levels", 0)), index, transform)
    raise KeyError(f"no official name known for parameter {name!r}")


def _pieces(model: nn.Module, rules: list[Rule]) -> dict[str, list[tuple[Piece, str, torch.Size]]]:
    """official key -> [(piece, our name, our shape)] sorted by piece index."""
    groups: dict[str, list[tuple[Piece, str, torch.Size]]] = defaultdict(list)
    for name, p in model.state_dict(keep_vars=True).items():
        piece = official_piece(name, rules)
        groups[piece.key].append((piece, name, p.shape))
    for items in groups.values():
        items.sort(key=lambda it: it[0].index)
    return dict(groups)


def _official_shape(items: list[tuple[Piece, str, torch.Size]]) -> tuple[int, ...]:
    piece, _, shape = items[0]
    if piece.transform == "conv1x1" and len(shape) == 2:
        return (*shape, 1, 1)
    return (sum(s[0] for _, _, s in items), *shape[1:]) if shape else tuple(shape)


def expected_official_shapes(model: nn.Module, rules: list[Rule]) -> dict[str, tuple[int, ...]]:
    return {k: _official_shape(v) for k, v in _pieces(model, rules).items()}


def _split(tensor: torch.Tensor, items: list[tuple[Piece, str, torch.Size]]) -> dict[str, torch.Tensor]:
    piece = items[0][0]
    if piece.transform == "conv1x1":
        return {items[0][1]: tensor.reshape(tensor.shape[:2]) if tensor.ndim == 4 else tensor}
    if piece.transform == "swap_halves":
        a, b = tensor.chunk(2, dim=0)
        return {items[0][1]: torch.cat([b, a], dim=0)}
    if len(items) == 1:
        return {items[0][1]: tensor}
    parts = tensor.split([s[0] for _, _, s in items], dim=0)
    return {name: part for (_, name, _), part in zip(items, parts)}


def to_official(model: nn.Module, rules: list[Rule]) -> dict[str, torch.Tensor]:
    """Our state dict in the official key layout (the inverse of loading)."""
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, items in _pieces(model, rules).items():
        piece = items[0][0]
        tensors = [sd[name] for _, name, _ in items]
        if piece.transform == "conv1x1" and tensors[0].ndim == 2:
            out[key] = tensors[0].reshape(*tensors[0].shape, 1, 1).contiguous()
        elif piece.transform == "swap_halves":
            a, b = tensors[0].chunk(2, dim=0)
            out[key] = torch.cat([b, a], dim=0)
        else:
            out[key] = torch.cat(tensors, dim=0) if len(tensors) > 1 else tensors[0].contiguous()
    return out



# Diffusers-style transformer: our names for everything but the connector, which those checkpoints store under
# the official names (`connector.S.*`, `connector.global_proj_out.*`).
_CONNECTOR_RULES = [r for r in DIT_RULES if r[0].startswith("connector")]
DIFFUSERS_DIT_RULES: list[Rule] = _CONNECTOR_RULES + [(r"((?!connector\.).+)", "{0}", 0, "")]


def diffusers_vae_rules(n_levels: int) -> RuleSet:
    """A diffusers `AutoencoderKL` checkpoint has exactly our names."""
    return RuleSet([(r"(.+)", "{0}", 0, "")], n_levels)


# --------------------------------------------------------------------------------------------------------------
# reading files

REOPEN_BYTES = 256 << 20  # drop the file mapping after this much was read, so mapped pages never pile up


class SafetensorsFile:
    """Key -> shape/dtype from the header (validated first: a truncated or corrupt file is named with its first
    bad tensor), and one tensor at a time from the memory-mapped file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.infos: dict[str, TensorInfo] = read_safetensors_header(self.path)
        self.keys = list(self.infos)
        self._f = None
        self._since_open = 0
        self._open()

    def _open(self) -> None:
        try:
            self._f = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise WeightsError(f"{self.path}: not a readable safetensors file ({e})") from e
        self._since_open = 0

    def release(self) -> None:
        """Drop the mapping (re-opened on the next read)."""
        self._f = None

    def where(self, key: str) -> Path:
        return self.path

    def shape(self, key: str) -> tuple[int, ...]:
        return self.infos[key].shape

    def dtype(self, key: str) -> str:
        return self.infos[key].dtype

    def tensor(self, key: str) -> torch.Tensor:
        """A view of the mapped file: copy it (`.to(..., copy=True)`) before keeping it."""
        if self._f is None or self._since_open >= REOPEN_BYTES:
            self._f = None
            self._open()
        info = self.infos[key]
        self._since_open += info.end - info.start
        try:
            return self._f.get_tensor(key)
        except Exception as e:
            raise WeightsError(f"{self.path}: cannot read tensor {key!r} ({e})") from e


class ShardedSafetensors:
    """A `*.safetensors.index.json` and its shards, read like one file. Every shard must exist and hold exactly
    the keys the index gives it; errors name the index or the shard, and the key."""

    def __init__(self, index: str | Path):
        self.path = Path(index)
        self._shards: dict[Path, SafetensorsFile] = {}
        self._map: dict[str, SafetensorsFile] = {}
        for shard_path, infos in sharded_headers(self.path).items():
            f = SafetensorsFile(shard_path)
            f.release()
            self._shards[shard_path] = f
            for key in infos:
                self._map[key] = f
        self.keys = list(self._map)
        self._current: SafetensorsFile | None = None

    @property
    def files(self) -> list[Path]:
        return [f.path for f in self._shards.values()]

    def where(self, key: str) -> Path:
        return self._map[key].path

    def shape(self, key: str) -> tuple[int, ...]:
        return self._map[key].shape(key)

    def dtype(self, key: str) -> str:
        return self._map[key].dtype(key)

    def tensor(self, key: str) -> torch.Tensor:
        f = self._map[key]
        if self._current is not None and self._current is not f:
            self._current.release()
        self._current = f
        return f.tensor(key)

    def release(self) -> None:
        for f in self._shards.values():
            f.release()


Checkpoint = SafetensorsFile | ShardedSafetensors


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    return ShardedSafetensors(path) if path.name.endswith(".json") else SafetensorsFile(path)


def _list(keys: list[str]) -> str:
    return ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")


def _check_keys(
    file: Checkpoint,
    expected: Mapping[str, tuple[int, ...]],
    ignore: Iterable[str] = (),
    dtypes: Iterable[str] = FLOAT_DTYPES,
) -> None:
    have = set(file.keys) - set(ignore)
    missing = sorted(set(expected) - have)
    unexpected = sorted(have - set(expected))
    bad = [(k, file.shape(k), expected[k]) for k in sorted(have & set(expected)) if file.shape(k) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + _list(missing))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + _list(unexpected))
    for k, got, want in bad[:8]:
        problems.append(f"key {k!r} has shape {list(got)}, expected {list(want)}")
    if problems:
        raise WeightsError(f"{file.path}: checkpoint does not match the model: " + "; ".join(problems))
    allowed = set(dtypes)
    for k in sorted(have & set(expected)):
        dt = file.dtype(k)
        if dt not in allowed:
            info = TensorInfo(dt, (), 0, 0)
            want = "a floating-point type (float32, float16, bfloat16" + (
                ", or float8_e4m3fn" if FP8_DTYPE in allowed else "") + ")"
            raise WeightsError(f"{file.where(k)}: tensor {k!r} has dtype {info.torch_dtype}, expected {want}")


def _check_finite(t: torch.Tensor, where: Path, key: str) -> None:
    # One fp32 reduction per tensor (NaN/Inf propagate; finite weights cannot overflow fp32), exact count only
    # when it fails: an element-wise isfinite pass costs far more on a busy CPU.
    if t.numel() == 0 or bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return
    if t.dtype == torch.float8_e4m3fn:
        bad = int(((t.view(torch.uint8) & 0x7F) == 0x7F).sum())  # e4m3fn has no inf; NaN is S.1111.111
    else:
        bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise WeightsError(f"{where}: tensor {key!r} has {bad} NaN/Inf values: the file is corrupt "
                           "(re-download it: `step1x-edit download`)")


def _fp8_param(name: str, shape: torch.Size) -> bool:
    """The DiT parameters kept in float8 with `fp8=True`: the Linear weights of the double/single blocks (~94% of
    the DiT). Embedders, the final layer, norms, biases and the connector stay in the compute dtype."""
    return len(shape) == 2 and re.fullmatch(r"(single_)?transformer_blocks\.\d+\..+\.weight", name) is not None


class FP8Linear(nn.Linear):
    """`nn.Linear` whose weight is stored as float8_e4m3fn.

    By default the weight is upcast to the input's dtype for each matmul: the matmul is then exact for the stored
    weights (every e4m3 value is a bf16 value), which is what `dit_fp8` promises; the price is one read of the
    float8 weight and a bf16 temporary per call (~3 bytes per parameter of extra traffic per step, about 1-2 % of
    a 1024x1024 step). Keeping the bf16 copies instead would undo the memory saving that is the point of the mode.
    With `scaled_mm` set (by `fastpath.quantize_fp8_`, i.e. `fp8_dynamic`, which accepts approximate matmuls) the
    float8 weight goes to the tensor cores as it is (`torch._scaled_mm`, weight scale 1) with the activations
    quantised per row: no upcast, no second rounding of the weights, no bf16 copy ever made."""

    scaled_mm = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scaled_mm:
            return _scaled_fp8_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype its matmuls run in (the bias keeps it). PEFT reads this attribute for the dtype of a LoRA
        adapter on the layer, which would otherwise be the weight's float8 (no matmul takes it)."""
        return self.bias.dtype if self.bias is not None else torch.get_default_dtype()


E4M3_MAX = 448.0


def _scaled_fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias) on float8 tensor cores: x quantised to e4m3 with one scale per row (amax / 448), the
    stored e4m3 weight with scale 1. Written here because torchao's float8 tensors re-quantise a weight from a
    high-precision copy; this weight is already float8 and its scale is 1 by construction."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    scale = rows.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
    q = (rows.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    ones = torch.ones(1, weight.shape[0], device=x.device, dtype=torch.float32)
    out = torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=ones, out_dtype=x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*shape[:-1], weight.shape[0])


def _load_into(
    model: nn.Module,
    file: Checkpoint,
    rules: list[Rule],
    device: torch.device | str,
    dtype: torch.dtype,
    ignore: Iterable[str] = (),
    dtypes: Iterable[str] = FLOAT_DTYPES,
    fp8: bool = False,
) -> nn.Module:
    groups = _pieces(model, rules)
    _check_keys(file, {k: _official_shape(v) for k, v in groups.items()}, ignore, dtypes)
    state: dict[str, torch.Tensor] = {}
    for key, items in groups.items():
        raw = file.tensor(key)
        for name, t in _split(raw, items).items():
            if fp8 and _fp8_param(name, t.shape):
                if t.dtype != torch.float8_e4m3fn:
                    t = t.clamp(-448.0, 448.0)  # quantise like the official `--quantized` cast, without overflow
                out = t.to(device=device, dtype=torch.float8_e4m3fn, copy=True)
            else:
                out = t.to(device=device, dtype=dtype, copy=True)  # copy: never keep a view of the mapped file
            _check_finite(out, file.where(key), key)
            state[name] = out.contiguous()
        del raw
    file.release()
    model.load_state_dict(state, strict=True, assign=True)
    if fp8:
        use_fp8_linears_(model)
    return model


def use_fp8_linears_(model: nn.Module) -> int:
    """Make every `nn.Linear` holding a float8_e4m3fn weight an `FP8Linear` (idempotent; call it again after
    anything that rebuilds Linears from these weights, e.g. diffusers' `fuse_projections`). Returns the count."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.float8_e4m3fn:
            module.__class__ = FP8Linear
            n += 1
    return n


# --------------------------------------------------------------------------------------------------------------
# DiT


def detect_version(file: Checkpoint) -> str:
    """v1.0 DiT files carry the connector's learned `scale_factor`; v1.1 files do not (v1.2: see layouts)."""
    return dit_version(file.keys)


def _count_blocks(keys: Iterable[str], prefix: str) -> int:
    ids = {int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


# where infer_dit_config finds each dimension, per layout
_DIT_NAMES = {
    "official": dict(x="img_in.weight", qnorm="double_blocks.0.img_attn.norm.query_norm.scale", ctx="txt_in.weight",
                     vec="vector_in.in_layer.weight", out="final_layer.linear.weight",
                     mlp="double_blocks.0.img_mlp.0.weight", double="double_blocks", single="single_blocks"),
    "diffusers": dict(x="x_embedder.weight", qnorm="transformer_blocks.0.attn.norm_q.weight",
                      ctx="context_embedder.weight", vec="vec_embed.in_layer.weight", out="proj_out.weight",
                      mlp="transformer_blocks.0.ff.net.0.proj.weight", double="transformer_blocks",
                      single="single_transformer_blocks"),
}


def infer_dit_config(file: Checkpoint, version: str, head_dim: int = 128, layout: str = "official") -> DiTConfig:
    """Dimensions from tensor shapes. Head counts are not stored in the file: head_dim 128 as in the official
    model (the DiT's is checked against the QK-norm scale size); axes_dim is the official split of 128."""
    n = _DIT_NAMES[layout]
    try:
        hidden, in_ch = file.shape(n["x"])
        head = file.shape(n["qnorm"])[0]
        ctx = file.shape(n["ctx"])[1]
        vec_in = file.shape(n["vec"])[1]
        out_ch = file.shape(n["out"])[0]
        mlp_hidden = file.shape(n["mlp"])[0]
        c_hidden, c_in = file.shape("connector.S.input_embedder.weight")
        c_depth = _count_blocks(file.keys, "connector.S.individual_token_refiner.blocks")
    except Exception as e:
        raise WeightsError(f"{file.path}: not a Step1X-Edit DiT checkpoint (missing {e})") from e
    if head != 128:
        raise WeightsError(f"{file.path}: head dim {head} needs an explicit config (axes_dim unknown)")
    return DiTConfig(
        in_channels=in_ch,
        out_channels=out_ch,
        vec_in_dim=vec_in,
        context_in_dim=ctx,
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head,
        depth=_count_blocks(file.keys, n["double"]),
        depth_single_blocks=_count_blocks(file.keys, n["single"]),
        connector=ConnectorConfig(
            in_channels=c_in,
            hidden_size=c_hidden,
            num_heads=c_hidden // head_dim,
            depth=c_depth,
            vec_dim=vec_in,
            has_scale_factor=version == "v1.0",
        ),
    )


def dit_config_from_diffusers(config: Mapping, version: str, where: str | Path = "config.json") -> DiTConfig:
    """A `DiTConfig` from a diffusers `transformer/config.json` (the diffusers port's `Step1XEditTransformer2DModel`,
    PR #12249, or ours); refuses what this model cannot be, naming the file. The strict key/shape check catches any
    file that disagrees with it."""
    refuse = unsupported_config(config)
    if refuse:
        raise WeightsError(f"{where}: unsupported transformer config: " + "; ".join(refuse))
    return DiTConfig.from_diffusers(config, version)


def dit_config_to_diffusers(cfg: DiTConfig) -> dict:
    """A diffusers `transformer/config.json` for `cfg` (tests and exporters write diffusers directories with it)."""
    return {"_class_name": Step1XEditTransformer2DModel.__name__, **cfg.to_diffusers()}


def with_version(cfg: DiTConfig, version: str) -> DiTConfig:
    return replace(cfg, connector=replace(cfg.connector, has_scale_factor=version == "v1.0"))


def load_dit(
    path: str | Path,
    cfg: DiTConfig | None = None,
    version: str = "auto",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    fp8: bool = False,
) -> tuple[Step1XEditTransformer2DModel, str]:
    """Any DiT layout -> (model, version): an official single file (bf16/fp32 or FP8), an official sharded index
    json, a diffusers `transformer/` folder (single or sharded) or a diffusers pipeline directory.

    `version="auto"` detects it (see `layouts`); forcing v1.1 on a v1.0 file ignores its scale_factor, as the
    official v1.1 code does. FP8 tensors are upcast to `dtype` unless `fp8=True`, which keeps the blocks' Linear
    weights in float8_e4m3fn (and casts them to it when the file is not FP8, like the official `--quantized`)."""
    t0 = time.perf_counter()
    src = inspect_dit(path)
    file = open_checkpoint(src.path)
    ca = sorted(k for k in file.keys if any(m in k for m in V12_CONNECTOR_MARKERS))
    if ca:
        raise WeightsError(f"{file.where(ca[0])}: the v1.2 connector cross-attention (keys {_list(ca)}) is not "
                           "supported yet: only the v1.0/v1.1 connector loads")
    detected = src.version or detect_version(file)
    if version == "auto":
        version = detected
    elif version not in VERSIONS:
        raise WeightsError(f"unknown version {version!r}; expected one of {VERSIONS} or 'auto'")
    ignore: list[str] = []
    if version != detected:
        if detected == "v1.2":
            raise WeightsError(f"{file.path}: a v1.2 checkpoint, but version {version} was requested")
        if version == "v1.1":
            # The official v1.1 code loads with strict=False, so a v1.0 file's scale_factor is ignored.
            ignore.append(SCALE_FACTOR_KEY)
            log.warning("%s looks like v1.0 but v1.1 was requested: ignoring %s", file.path, SCALE_FACTOR_KEY)
        else:
            raise WeightsError(f"{file.path}: v1.0 requested but the file has no {SCALE_FACTOR_KEY} (a v1.1 checkpoint)")
    if cfg is not None:
        cfg = with_version(cfg, version)
    elif src.config is not None:
        cfg = dit_config_from_diffusers(read_json(src.config), version, src.config)
    else:
        cfg = infer_dit_config(file, version, layout=src.layout)
    rules = DIT_RULES if src.layout == "official" else DIFFUSERS_DIT_RULES
    with torch.device("meta"):
        model = Step1XEditTransformer2DModel.from_dit_config(cfg)
    _load_into(model, file, rules, device, dtype, ignore, dtypes=FLOAT_DTYPES | {FP8_DTYPE}, fp8=fp8)
    log.info("DiT %s (%s layout%s) loaded to %s/%s%s in %.1f s", src.path, src.layout,
             ", FP8 file" if src.fp8 else "", device, str(dtype).removeprefix("torch."),
             " with FP8 block weights" if fp8 else "", time.perf_counter() - t0)
    return model.eval().requires_grad_(False), version


# --------------------------------------------------------------------------------------------------------------
# VAE

_VAE_NAMES = {
    "official": dict(conv_in="encoder.conv_in.weight", down="encoder.down", conv1="encoder.down.{i}.block.0.conv1.weight",
                     res="encoder.down.0.block"),
    "diffusers": dict(conv_in="encoder.conv_in.weight", down="encoder.down_blocks",
                      conv1="encoder.down_blocks.{i}.resnets.0.conv1.weight", res="encoder.down_blocks.0.resnets"),
}


def infer_vae_config(file: Checkpoint, layout: str = "official") -> VAEConfig:
    n = _VAE_NAMES[layout]
    try:
        ch = file.shape(n["conv_in"])[0]
        n_levels = _count_blocks(file.keys, n["down"])
        mult = tuple(file.shape(n["conv1"].format(i=i))[0] // ch for i in range(n_levels))
        n_res = _count_blocks(file.keys, n["res"])
        z = file.shape("decoder.conv_in.weight")[1]
        in_ch = file.shape(n["conv_in"])[1]
        out_ch = file.shape("decoder.conv_out.weight")[0]
    except Exception as e:
        raise WeightsError(f"{file.path}: not a FLUX-style autoencoder checkpoint (missing {e})") from e
    return VAEConfig(ch=ch, ch_mult=mult, num_res_blocks=n_res, z_channels=z, in_channels=in_ch, out_ch=out_ch)


def vae_config_from_diffusers(config: Mapping, where: str | Path = "config.json") -> VAEConfig:
    """A `VAEConfig` from a diffusers `vae/config.json` (AutoencoderKL); refuses what our VAE cannot be."""
    c = dict(config)
    refuse = [f"{k}=true" for k in ("use_quant_conv", "use_post_quant_conv") if c.get(k, True)]
    if c.get("norm_num_groups", 32) != 32:
        refuse.append(f"norm_num_groups={c['norm_num_groups']}")
    boc = [int(b) for b in c.get("block_out_channels", (128, 256, 512, 512))]
    if any(b % boc[0] for b in boc):
        refuse.append(f"block_out_channels={boc}")
    if refuse:
        raise WeightsError(f"{where}: not the FLUX autoencoder Step1X-Edit uses ({', '.join(refuse)})")
    shift = c.get("shift_factor")
    if shift is None:
        log.warning("%s: no shift_factor; using FLUX's 0.1159", where)
        shift = 0.1159
    return VAEConfig(
        ch=boc[0],
        ch_mult=tuple(b // boc[0] for b in boc),
        num_res_blocks=int(c.get("layers_per_block", 2)),
        z_channels=int(c.get("latent_channels", 16)),
        in_channels=int(c.get("in_channels", 3)),
        out_ch=int(c.get("out_channels", 3)),
        scale_factor=float(c.get("scaling_factor", 0.3611)),
        shift_factor=float(shift),
    )


def load_vae(
    path: str | Path,
    cfg: VAEConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """Official `vae.safetensors`, or a diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors)
    or pipeline directory."""
    src = inspect_vae(path)
    file = open_checkpoint(src.path)
    if cfg is None:
        cfg = (vae_config_from_diffusers(read_json(src.config), src.config) if src.config is not None
               else infer_vae_config(file, src.layout))
    with torch.device("meta"):
        model = build_vae(cfg)
    n = len(cfg.ch_mult)
    rules = vae_rules(n) if src.layout == "official" else diffusers_vae_rules(n)
    _load_into(model, file, rules, device, dtype)
    return model.eval().requires_grad_(False)


def dit_config_from_dict(params: Mapping, connector: Mapping | None, version: str) -> DiTConfig:
    """A `DiTConfig` from the official `Step1XParams` / `Qwen2Connector` arguments (as in golden cases.json)."""
    conn = ConnectorConfig(
        in_channels=connector["in_channels"],
        hidden_size=connector["hidden_size"],
        num_heads=connector["heads_num"],
        depth=connector["depth"],
        vec_dim=params["vec_in_dim"],
        has_scale_factor=version == "v1.0",
    ) if connector else ConnectorConfig(vec_dim=params["vec_in_dim"], has_scale_factor=version == "v1.0")
    return DiTConfig(
        in_channels=params["in_channels"],
        out_channels=params["out_channels"],
        vec_in_dim=params["vec_in_dim"],
        context_in_dim=params["context_in_dim"],
        hidden_size=params["hidden_size"],
        mlp_ratio=params["mlp_ratio"],
        num_heads=params["num_heads"],
        depth=params["depth"],
        depth_single_blocks=params["depth_single_blocks"],
        axes_dim=tuple(params["axes_dim"]),
        theta=params["theta"],
        connector=conn,
    )


def vae_config_from_dict(params: Mapping) -> VAEConfig:
    return VAEConfig(
        ch=params["ch"],
        ch_mult=tuple(params["ch_mult"]),
        num_res_blocks=params["num_res_blocks"],
        z_channels=params["z_channels"],
        in_channels=params["in_channels"],
        out_ch=params["out_ch"],
        scale_factor=params["scale_factor"],
        shift_factor=params["shift_factor"],
    )


def vae_config_to_diffusers(cfg: VAEConfig) -> dict:
    n = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.z_channels,
        "norm_num_groups": 32,
        "scaling_factor": cfg.scale_factor,
        "shift_factor": cfg.shift_factor,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }


# --------------------------------------------------------------------------------------------------------------
# writing (tests, the RSS bench, exporters)


def save_official(model: nn.Module, rules: list[Rule], path: str | Path) -> None:
    """Write our model in the official layout (tests build checkpoints this way)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in to_official(model, rules).items()}, str(path))


def save_sharded(state: Mapping[str, torch.Tensor], folder: str | Path, stem: str, max_shard_bytes: int) -> Path:
    """`stem-0000i-of-0000n.safetensors` + `stem.safetensors.index.json` (the transformers/diffusers convention)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        t = state[key].contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name))
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = folder / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return index

