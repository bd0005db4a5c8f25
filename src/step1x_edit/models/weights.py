"""Loading the official single-file checkpoints into our (diffusers-named) modules, strictly.

Official names are tied to our parameter names by a table of rules (`DIT_RULES`, `VAE_RULES`): each of our
tensors is one piece of one official tensor (the official fused `qkv` / `linear1` are split into diffusers'
`to_q/k/v` (+ `proj_mlp`), the final-layer modulation has its shift/scale halves swapped, VAE attention 1x1
convs become linears). The same table gives the expected official key set and shapes for a config, so a
missing, unexpected or mis-shaped key is reported by its name in the file, and it converts both ways
(`to_official` is used by tests and by anyone exporting weights).

Tensors are read one at a time from the memory-mapped file and moved straight to the target device and dtype
into a model built on the meta device, so the host never holds a second full copy.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import safe_open
from torch import nn

from .connector import ConnectorConfig
from .dit import DiTConfig, Step1XEditTransformer
from .vae import VAEConfig, build_vae

log = logging.getLogger(__name__)

VERSIONS = ("v1.0", "v1.1")
SCALE_FACTOR_KEY = "connector.scale_factor"


class WeightsError(ValueError):
    """A checkpoint that does not fit the model; the message names the file and the offending keys."""


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


# --------------------------------------------------------------------------------------------------------------
# reading files


class SafetensorsFile:
    """Key -> shape/dtype without reading data, and one tensor at a time (memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightsError(f"{self.path}: no such file")
        try:
            self._f = safe_open(str(self.path), framework="pt", device="cpu")
            self.keys = list(self._f.keys())
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise WeightsError(f"{self.path}: not a readable safetensors file ({e})") from e

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self._f.get_slice(key).get_dtype()

    def tensor(self, key: str) -> torch.Tensor:
        try:
            return self._f.get_tensor(key)
        except Exception as e:
            raise WeightsError(f"{self.path}: cannot read tensor {key!r} ({e})") from e


def _check_keys(file: SafetensorsFile, expected: Mapping[str, tuple[int, ...]], ignore: Iterable[str] = ()) -> None:
    have = set(file.keys) - set(ignore)
    missing = sorted(set(expected) - have)
    unexpected = sorted(have - set(expected))
    bad = [(k, file.shape(k), expected[k]) for k in sorted(have & set(expected)) if file.shape(k) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(
            f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else "")
        )
    for k, got, want in bad[:8]:
        problems.append(f"key {k!r} has shape {list(got)}, expected {list(want)}")
    if problems:
        raise WeightsError(f"{file.path}: checkpoint does not match the model: " + "; ".join(problems))


def _load_into(
    model: nn.Module,
    file: SafetensorsFile,
    rules: list[Rule],
    device: torch.device | str,
    dtype: torch.dtype,
    ignore: Iterable[str] = (),
) -> nn.Module:
    groups = _pieces(model, rules)
    _check_keys(file, {k: _official_shape(v) for k, v in groups.items()}, ignore)
    state: dict[str, torch.Tensor] = {}
    for key, items in groups.items():
        raw = file.tensor(key)
        if not (raw.is_floating_point()):
            raise WeightsError(f"{file.path}: tensor {key!r} has dtype {raw.dtype}, expected a floating-point type")
        for name, t in _split(raw, items).items():
            state[name] = t.to(device=device, dtype=dtype).contiguous()
    model.load_state_dict(state, strict=True, assign=True)
    return model


# --------------------------------------------------------------------------------------------------------------
# DiT


def detect_version(file: SafetensorsFile) -> str:
    """v1.0 DiT files carry the connector's learned `scale_factor`; v1.1 files do not."""
    return "v1.0" if SCALE_FACTOR_KEY in file.keys else "v1.1"


def _count_blocks(keys: Iterable[str], prefix: str) -> int:
    ids = {int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def infer_dit_config(file: SafetensorsFile, version: str, head_dim: int = 128) -> DiTConfig:
    """Dimensions from tensor shapes. Head counts are not stored in the file: head_dim 128 as in the official
    model (the DiT's is checked against the QK-norm scale size); axes_dim is the official split of 128."""
    try:
        hidden, in_ch = file.shape("img_in.weight")
        head = file.shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
        ctx = file.shape("txt_in.weight")[1]
        vec_in = file.shape("vector_in.in_layer.weight")[1]
        out_ch = file.shape("final_layer.linear.weight")[0]
        mlp_hidden = file.shape("double_blocks.0.img_mlp.0.weight")[0]
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
        depth=_count_blocks(file.keys, "double_blocks"),
        depth_single_blocks=_count_blocks(file.keys, "single_blocks"),
        connector=ConnectorConfig(
            in_channels=c_in,
            hidden_size=c_hidden,
            num_heads=c_hidden // head_dim,
            depth=c_depth,
            vec_dim=vec_in,
            has_scale_factor=version == "v1.0",
        ),
    )


def with_version(cfg: DiTConfig, version: str) -> DiTConfig:
    return replace(cfg, connector=replace(cfg.connector, has_scale_factor=version == "v1.0"))


def load_dit(
    path: str | Path,
    cfg: DiTConfig | None = None,
    version: str = "auto",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Step1XEditTransformer, str]:
    """Official single-file DiT (+ connector) -> (model, version). `version="auto"` detects it from the file."""
    file = SafetensorsFile(path)
    detected = detect_version(file)
    if version == "auto":
        version = detected
    elif version not in VERSIONS:
        raise WeightsError(f"unknown version {version!r}; expected one of {VERSIONS} or 'auto'")
    ignore: list[str] = []
    if version != detected:
        if version == "v1.1":
            # The official v1.1 code loads with strict=False, so a v1.0 file's scale_factor is ignored.
            ignore.append(SCALE_FACTOR_KEY)
            log.warning("%s looks like v1.0 but v1.1 was requested: ignoring %s", file.path, SCALE_FACTOR_KEY)
        else:
            raise WeightsError(f"{file.path}: v1.0 requested but the file has no {SCALE_FACTOR_KEY} (a v1.1 checkpoint)")
    cfg = with_version(cfg, version) if cfg is not None else infer_dit_config(file, version)
    with torch.device("meta"):
        model = Step1XEditTransformer(cfg)
    _load_into(model, file, DIT_RULES, device, dtype, ignore)
    return model.eval().requires_grad_(False), version


# --------------------------------------------------------------------------------------------------------------
# VAE


def infer_vae_config(file: SafetensorsFile) -> VAEConfig:
    try:
        ch = file.shape("encoder.conv_in.weight")[0]
        n_levels = _count_blocks(file.keys, "encoder.down")
        mult = tuple(file.shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(n_levels))
        n_res = _count_blocks(file.keys, "encoder.down.0.block")
        z = file.shape("decoder.conv_in.weight")[1]
        in_ch = file.shape("encoder.conv_in.weight")[1]
        out_ch = file.shape("decoder.conv_out.weight")[0]
    except Exception as e:
        raise WeightsError(f"{file.path}: not a FLUX-style autoencoder checkpoint (missing {e})") from e
    return VAEConfig(ch=ch, ch_mult=mult, num_res_blocks=n_res, z_channels=z, in_channels=in_ch, out_ch=out_ch)


def load_vae(
    path: str | Path,
    cfg: VAEConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    file = SafetensorsFile(path)
    cfg = cfg or infer_vae_config(file)
    with torch.device("meta"):
        model = build_vae(cfg)
    _load_into(model, file, vae_rules(len(cfg.ch_mult)), device, dtype)
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
        qkv_bias=params["qkv_bias"],
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


def save_official(model: nn.Module, rules: list[Rule], path: str | Path) -> None:
    """Write our model in the official layout (tests build checkpoints this way)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in to_official(model, rules).items()}, str(path))


def manifest_shapes(path: str | Path) -> dict[str, list[int]]:
    return json.loads(Path(path).read_text())["shapes"]
