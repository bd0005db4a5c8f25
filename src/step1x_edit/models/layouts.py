"""Where the weights are and what they are: layout and version detection, without importing torch.

Everything here reads only file names, JSON and safetensors headers (8 bytes + a JSON block), so `Settings` can
ask "are there weights?" cheaply and errors about a bad file come before any tensor is read. Loading is
`weights.py`'s job.

Layouts understood (see `../shared/docs/model.md`, "Checkpoints people download"):

- official single files: `step1x-edit-i1258.safetensors` (v1.0, has `connector.scale_factor`),
  `step1x-edit-v1p1-official.safetensors` (v1.1), FP8 variants of either (DiT tensors float8_e4m3fn), and
  `vae.safetensors` (FLUX `AutoEncoder` keys);
- the same keys sharded (`*.safetensors.index.json` + shards);
- diffusers-style directories (`Step1X-Edit-v1p1-diffusers`, `Step1X-Edit-v1p2`): `model_index.json`,
  `transformer/` (config.json + `diffusion_pytorch_model*.safetensors`, usually sharded with an index json),
  `vae/` (AutoencoderKL), `text_encoder/` + `processor/` (Qwen2.5-VL);
- the encoder as a `Qwen2.5-VL-7B-Instruct` directory.

A DiT's key names tell official (`img_in.weight`) from diffusers (`x_embedder.weight`); a VAE's tell official
(`encoder.norm_out.weight`) from diffusers (`encoder.conv_norm_out.weight`). The version: v1.2 when
`model_index.json` names the v1.2 pipeline (or the transformer config / keys have the v1.2 connector
cross-attention); otherwise v1.0 when the DiT has `connector.scale_factor`, else v1.1.

Where weights are looked for, first hit per component wins: explicit paths (`STEP1X_DIT_PATH`,
`STEP1X_VAE_PATH`, `STEP1X_ENCODER_PATH`) > `STEP1X_MODEL_DIR` > the Hugging Face cache (`stepfun-ai/Step1X-Edit`,
`stepfun-ai/Step1X-Edit-v1p1-diffusers`, `Qwen/Qwen2.5-VL-7B-Instruct`) > nothing (the caller falls back to dev).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

# --- the published files ---------------------------------------------------------------------------------------
STEP1X_REPO = "stepfun-ai/Step1X-Edit"
OFFICIAL_DIT_FILES = {"v1.1": "step1x-edit-v1p1-official.safetensors", "v1.0": "step1x-edit-i1258.safetensors"}
OFFICIAL_VAE_FILE = "vae.safetensors"
DIFFUSERS_REPOS = {"v1.1": "stepfun-ai/Step1X-Edit-v1p1-diffusers", "v1.2": "stepfun-ai/Step1X-Edit-v1p2"}
ENCODER_REPO = "Qwen/Qwen2.5-VL-7B-Instruct"
ENCODER_DIRNAME = "Qwen2.5-VL-7B-Instruct"
# what `step1x-edit download` fetches of the encoder repo
ENCODER_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]

SCALE_FACTOR_KEY = "connector.scale_factor"
V12_CONNECTOR_MARKERS = ("connector.S.input_embedder_CA.", ".cross_attnblock.")

V12_REFUSED = (
    "Step1X-Edit v1.2 (ReasonEdit-S) weights: its transformer and VAE load, but its conditioner (the new 90-token "
    "prefix with text before the image, up to 2048 tokens, M-RoPE text positions, text_token_mapping) and its "
    "thinking/reflection modes are not implemented yet, so this server cannot run it. Use v1.1 "
    "(`step1x-edit download --version v1.1`, or STEP1X_MODEL_DIR pointing at Step1X-Edit-v1p1-diffusers)."
)

DOWNLOAD_HINT = "run `step1x-edit download` (or set STEP1X_MODEL_DIR / STEP1X_DIT_PATH)"


class WeightsError(ValueError):
    """A checkpoint that does not fit the model; the message names the file and the offending keys."""


# --------------------------------------------------------------------------------------------------------------
# safetensors headers

# safetensors dtype names -> (torch dtype name, bytes per element)
ST_DTYPES: dict[str, tuple[str, float]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1), "F8_E8M0": ("float8_e8m0fnu", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1), "BOOL": ("bool", 1),
    "F4": ("float4_e2m1fn_x2", 0.5),
}
FLOAT_DTYPES = {"F32", "F16", "BF16"}
FP8_DTYPE = "F8_E4M3"
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors name: F32, BF16, F8_E4M3, ...
    shape: tuple[int, ...]
    start: int  # byte offsets in the data block
    end: int

    @property
    def torch_dtype(self) -> str:
        return "torch." + ST_DTYPES.get(self.dtype, (self.dtype.lower(), 0))[0]


def _incomplete_hint(path: Path) -> str:
    """For a missing/dangling file in a Hugging Face cache snapshot: is its blob still `.incomplete`?"""
    try:
        if path.is_symlink():
            target = Path(os.path.normpath(path.parent / os.readlink(path)))
            partial = target.with_name(target.name + ".incomplete")
            if partial.exists():
                return (f" (an interrupted download: {partial} holds {partial.stat().st_size} bytes so far; "
                        f"run `step1x-edit download` again to resume)")
            return f" (a dangling link to {target}: the download did not finish; run `step1x-edit download` again)"
        partial = path.with_name(path.name + ".incomplete")
        if partial.exists():
            return f" (an interrupted download: {partial} exists; run `step1x-edit download` again to resume)"
        for folder in list(path.parents)[:3]:  # a `--dir` (huggingface_hub local_dir) download keeps partials here
            dl = folder / ".cache" / "huggingface" / "download"
            if dl.is_dir() and any(dl.rglob("*.incomplete")):
                return f" (interrupted downloads in {dl}: run `step1x-edit download --dir {folder}` again to resume)"
    except OSError:
        pass
    return ""


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Key -> TensorInfo, checking that the file is complete and self-consistent (cheap: reads the header only).

    Errors name the file and, for a truncated or inconsistent file, the first tensor affected."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file{_incomplete_hint(path)}")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path}: not a safetensors file ({size} bytes: too short; an interrupted download?)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise WeightsError(
                    f"{path}: not a safetensors file or truncated (header length {n} but the file has {size} bytes)"
                )
            raw = f.read(n)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise WeightsError(f"{path}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{path}: corrupt safetensors header entry for key {key!r} ({e})") from e
        if dtype not in ST_DTYPES:
            raise WeightsError(f"{path}: key {key!r} has an unknown dtype {dtype!r}")
        numel = 1
        for s in shape:
            numel *= s
        if end - start != int(numel * ST_DTYPES[dtype][1]) or start < 0:
            raise WeightsError(
                f"{path}: corrupt header: key {key!r} ({dtype} {list(shape)}) spans {end - start} bytes, "
                f"expected {int(numel * ST_DTYPES[dtype][1])}"
            )
        infos[key] = TensorInfo(dtype, shape, int(start), int(end))
    beyond = sorted((info.end, k) for k, info in infos.items() if info.end > data_size)
    if beyond:
        needed = max(e for e, _ in beyond) + 8 + n
        first = min(beyond, key=lambda ek: infos[ek[1]].start)[1]
        raise WeightsError(
            f"{path}: truncated: {size} of {needed} bytes; tensor {first!r}"
            + (f" and {len(beyond) - 1} more lie" if len(beyond) > 1 else " lies")
            + " past the end of the file (an interrupted download? run `step1x-edit download` again)"
        )
    used = max((info.end for info in infos.values()), default=0)
    if used != data_size:
        raise WeightsError(f"{path}: corrupt: {data_size - used} bytes after the last tensor (expected {8 + n + used} "
                           f"bytes in all, the file has {size})")
    return infos


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise WeightsError(f"{path}: no such file{_incomplete_hint(Path(path))}") from e
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise WeightsError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return data


def read_index(index: Path) -> dict[str, str]:
    """`weight_map` of a sharded checkpoint's index json (key -> shard file name), checking every shard exists."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{index}: no weight_map (not a sharded safetensors index)")
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(key)
    for shard, keys in sorted(by_shard.items()):
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise WeightsError(
                f"{index}: shard {shard} is missing ({shard_path}; it holds {len(keys)} keys, e.g. {sorted(keys)[0]!r})"
                f"{_incomplete_hint(shard_path) or ' - an incomplete download? run `step1x-edit download` again'}"
            )
    return weight_map


# --------------------------------------------------------------------------------------------------------------
# what a path holds


@dataclass(frozen=True)
class Source:
    """One component's weights: where they are and how they are laid out."""

    path: Path  # a .safetensors file, a *.safetensors.index.json, or a directory (encoder)
    layout: str  # "official" | "diffusers" | "encoder"
    sharded: bool = False
    config: Path | None = None  # diffusers config.json, when there is one
    version: str | None = None  # DiT only: v1.0 | v1.1 | v1.2
    dtypes: tuple[str, ...] = ()  # safetensors dtypes seen (DiT/VAE)
    nbytes: int = 0
    root: Path | None = None  # the diffusers pipeline directory this came from, if any

    @property
    def fp8(self) -> bool:
        return FP8_DTYPE in self.dtypes

    def describe(self) -> str:
        kind = {"official": "official layout", "diffusers": "diffusers layout", "encoder": "Qwen2.5-VL directory"}
        if self.layout == "encoder" and not (self.path / "config.json").is_file():
            kind["encoder"] = "Qwen2.5-VL in a diffusers directory's text_encoder/ + processor/"
        bits = [("sharded " if self.sharded else "") + kind[self.layout]]
        if self.version:
            bits.append(self.version)
        if self.dtypes:
            bits.append("/".join(ST_DTYPES[d][0] for d in self.dtypes) + (" (FP8)" if self.fp8 else ""))
        if self.nbytes:
            bits.append(human_bytes(self.nbytes))
        return f"{self.path}  [{', '.join(bits)}]"


def sharded_headers(index: Path) -> dict[Path, dict[str, TensorInfo]]:
    """shard path -> its header, checking that every shard holds exactly the keys the index gives it."""
    by_shard: dict[str, set[str]] = {}
    for key, shard in read_index(index).items():
        by_shard.setdefault(shard, set()).add(key)
    out = {}
    for shard, keys in sorted(by_shard.items()):
        path = index.parent / shard
        infos = read_safetensors_header(path)
        if keys - set(infos):
            k = sorted(keys - set(infos))
            raise WeightsError(f"{path}: missing keys listed for it in {index.name} ({len(k)}): " + ", ".join(k[:8])
                               + (" ..." if len(k) > 8 else "") + " (an incomplete or mixed-up download?)")
        if set(infos) - keys:
            k = sorted(set(infos) - keys)
            raise WeightsError(f"{path}: holds keys that {index.name} does not list ({len(k)}): " + ", ".join(k[:8])
                               + (" ..." if len(k) > 8 else ""))
        out[path] = infos
    return out


def human_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def header_keys(path: Path) -> tuple[dict[str, TensorInfo], list[Path]]:
    """All TensorInfos of a file or an index json (every shard's header), plus the files read."""
    if path.name.endswith(".json"):
        shards = sharded_headers(path)
        infos: dict[str, TensorInfo] = {}
        for shard_infos in shards.values():
            infos.update(shard_infos)
        return infos, list(shards)
    return read_safetensors_header(path), [path]


def _dtype_summary(infos: dict[str, TensorInfo]) -> tuple[str, ...]:
    order = ["F8_E4M3", "BF16", "F16", "F32"]
    seen = {i.dtype for i in infos.values()}
    return tuple(sorted(seen, key=lambda d: order.index(d) if d in order else len(order)))


def _weights_file_in(folder: Path, stem: str) -> Path | None:
    """`stem.safetensors.index.json` or `stem.safetensors` in a diffusers component folder."""
    for name in (f"{stem}.safetensors.index.json", f"{stem}.safetensors"):
        if (folder / name).is_file() or (folder / name).is_symlink():
            return folder / name
    return None


def pipeline_version(root: Path) -> str | None:
    """v1.2 when a diffusers directory's `model_index.json` names the v1.2 pipeline or its transformer config has
    the v1.2 connector cross-attention; None when it does not say (the DiT keys decide then)."""
    index = root / "model_index.json"
    if index.is_file():
        name = str(read_json(index).get("_class_name", ""))
        if "v1p2" in name.lower() or "V1P2" in name:
            return "v1.2"
    cfg = root / "transformer" / "config.json"
    if cfg.is_file() and read_json(cfg).get("connector_need_CA"):
        return "v1.2"
    return None


def dit_version(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(m in k for k in keys for m in V12_CONNECTOR_MARKERS):
        return "v1.2"
    return "v1.0" if SCALE_FACTOR_KEY in keys else "v1.1"


def inspect_dit(path: str | Path) -> Source:
    """What DiT a path holds: an official file, an index json, a diffusers `transformer/` folder or pipeline
    directory (or a folder with official files: see `find_in_dir`)."""
    path = Path(path)
    root = None
    if path.is_dir():
        if (path / "transformer").is_dir():
            root, path = path, path / "transformer"
        elif (path / "config.json").is_file() and (path.parent / "model_index.json").is_file():
            root = path.parent
        weights = _weights_file_in(path, "diffusion_pytorch_model")
        if weights is None:
            found = find_in_dir(path)
            if found.dit is None:
                raise WeightsError(f"{path}: no DiT weights found (expected a Step1X-Edit .safetensors file, an index "
                                   "json, or a diffusers folder with transformer/diffusion_pytorch_model*.safetensors)")
            return found.dit
        path = weights
    infos, files = header_keys(path)
    layout = _layout_of(path, infos, "img_in.weight", "x_embedder.weight", "a Step1X-Edit DiT checkpoint")
    version = dit_version(infos)
    if root is None and path.parent.name == "transformer" and (path.parent.parent / "model_index.json").is_file():
        root = path.parent.parent
    if layout == "diffusers" and root is not None:
        version = pipeline_version(root) or version
    cfg = None
    if layout == "diffusers":
        cand = path.parent / "config.json"
        cfg = cand if cand.is_file() else None
    return Source(path, layout, sharded=path.name.endswith(".json"), config=cfg, version=version,
                  dtypes=_dtype_summary(infos), nbytes=sum(f.stat().st_size for f in files), root=root)


def _layout_of(path: Path, infos: dict, official_key: str, diffusers_key: str, what: str) -> str:
    """`official` or `diffusers`, told apart by one key each layout always has."""
    if official_key in infos:
        return "official"
    if diffusers_key in infos:
        return "diffusers"
    raise WeightsError(f"{path}: not {what} (neither {official_key} nor {diffusers_key}; "
                       f"keys include {sorted(infos)[:4]})")


def inspect_vae(path: str | Path) -> Source:
    path = Path(path)
    root = None
    if path.is_dir():
        if (path / "vae").is_dir():
            root, path = path, path / "vae"
        weights = _weights_file_in(path, "diffusion_pytorch_model")
        if weights is None:
            if (path / OFFICIAL_VAE_FILE).is_file():
                weights = path / OFFICIAL_VAE_FILE
            else:
                raise WeightsError(f"{path}: no VAE weights found (expected vae.safetensors or a diffusers vae/ folder)")
        path = weights
    infos, files = header_keys(path)
    layout = _layout_of(path, infos, "encoder.norm_out.weight", "encoder.conv_norm_out.weight",
                        "a FLUX-style autoencoder checkpoint")
    cfg = path.parent / "config.json" if layout == "diffusers" and (path.parent / "config.json").is_file() else None
    return Source(path, layout, sharded=path.name.endswith(".json"), config=cfg, dtypes=_dtype_summary(infos),
                  nbytes=sum(f.stat().st_size for f in files), root=root)


def inspect_encoder(path: str | Path) -> Source:
    """A Qwen2.5-VL directory, or a diffusers directory with text_encoder/ (+ processor/). Checked cheaply here;
    `encoder.load_conditioner` does the full checks."""
    path = Path(path)
    if (path / "config.json").is_file() or (path / "text_encoder" / "config.json").is_file():
        return Source(path, "encoder")
    raise WeightsError(f"{path}: not a Qwen2.5-VL-7B-Instruct directory (no config.json, and no text_encoder/config.json)")


# --------------------------------------------------------------------------------------------------------------
# finding the weights


@dataclass
class Found:
    dit: Source | None = None
    vae: Source | None = None
    encoder: Source | None = None
    notes: list[str] = field(default_factory=list)


def _prefer(cands: list[Source], version: str) -> Source:
    """Among DiT candidates: the requested version (auto: v1.1, then v1.0), official names, non-FP8, name order."""
    rank = {"auto": ["v1.1", "v1.0", "v1.2"], "v1.1": ["v1.1", "v1.0", "v1.2"], "v1.0": ["v1.0", "v1.1", "v1.2"]}
    order = rank.get(version, rank["auto"])
    official_names = set(OFFICIAL_DIT_FILES.values())

    def key(s: Source):
        return (order.index(s.version) if s.version in order else 9, s.path.name not in official_names, s.fp8,
                s.path.name)

    return sorted(cands, key=key)[0]


def find_in_dir(folder: str | Path, version: str = "auto") -> Found:
    """Weights in one folder: a diffusers pipeline directory, or official files (+ a Qwen2.5-VL-7B-Instruct
    subfolder, as `step1x-edit download --dir` lays them out)."""
    folder = Path(folder)
    found = Found()
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a directory")
    if (folder / "transformer").is_dir() or (folder / "model_index.json").is_file():
        found.dit = inspect_dit(folder) if (folder / "transformer").is_dir() else None
        found.vae = inspect_vae(folder) if (folder / "vae").is_dir() else None
        if (folder / "text_encoder").is_dir():
            found.encoder = inspect_encoder(folder)
    else:
        dits, vaes = [], []
        names = sorted(p for p in folder.iterdir() if p.name.endswith((".safetensors", ".safetensors.index.json")))
        shard_members = set()
        for p in names:
            if p.name.endswith(".json"):
                try:
                    shard_members |= set(read_index(p).values())
                except WeightsError as e:
                    found.notes.append(str(e))
        for p in names:
            if p.name in shard_members:
                continue
            try:
                infos, _ = header_keys(p)
            except WeightsError as e:
                if p.name in OFFICIAL_DIT_FILES.values() or p.name == OFFICIAL_VAE_FILE:
                    raise
                found.notes.append(f"skipped {e}")
                continue
            if "img_in.weight" in infos or "x_embedder.weight" in infos:
                dits.append(inspect_dit(p))
            elif "encoder.norm_out.weight" in infos or "encoder.conv_norm_out.weight" in infos:
                vaes.append(inspect_vae(p))
        if dits:
            found.dit = _prefer(dits, version)
            if len(dits) > 1:
                found.notes.append(f"{len(dits)} DiT files in {folder}: using {found.dit.path.name} "
                                   f"(others: {', '.join(d.path.name for d in dits if d is not found.dit)})")
        if vaes:
            found.vae = sorted(vaes, key=lambda s: (s.path.name != OFFICIAL_VAE_FILE, s.path.name))[0]
        for sub in (folder / ENCODER_DIRNAME, folder / "encoder"):
            if (sub / "config.json").is_file():
                found.encoder = inspect_encoder(sub)
                break
        else:
            if (folder / "text_encoder" / "config.json").is_file():  # text_encoder/ + processor/
                found.encoder = inspect_encoder(folder)
    return found


def hub_cache_dir(explicit: str | Path | None = None) -> Path:
    """The Hugging Face hub cache, read from the environment at call time (HF_HUB_CACHE > HF_HOME/hub > default)."""
    if explicit:
        return Path(explicit).expanduser()
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def cached_file(cache: Path, repo_id: str, filename: str, revision: str = "main") -> Path | None:
    """A file of a repo in the hub cache (huggingface_hub's own lookup), or None."""
    if not repo_folder(cache, repo_id).is_dir():
        return None  # skips importing huggingface_hub when there is nothing to find
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache), revision=revision)
    return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None


def interrupted_downloads(cache: Path, repo_id: str) -> list[Path]:
    blobs = repo_folder(cache, repo_id) / "blobs"
    return sorted(blobs.glob("*.incomplete")) if blobs.is_dir() else []


def find_in_hf_cache(cache: Path, version: str = "auto") -> Found:
    """Step1X-Edit weights in the hub cache: the official files (requested version first), else the diffusers
    directories; the encoder from Qwen/Qwen2.5-VL-7B-Instruct or the diffusers directory's text_encoder/."""
    found = Found()
    order = ["v1.0", "v1.1"] if version == "v1.0" else ["v1.1", "v1.0"]
    for v in order:
        hit = cached_file(cache, STEP1X_REPO, OFFICIAL_DIT_FILES[v])
        if hit:
            found.dit = inspect_dit(hit)
            break
    vae = cached_file(cache, STEP1X_REPO, OFFICIAL_VAE_FILE)
    if vae:
        found.vae = inspect_vae(vae)
    for v in ("v1.1", "v1.2"):
        if found.dit and found.vae and found.encoder:
            break
        index = cached_file(cache, DIFFUSERS_REPOS[v], "model_index.json")
        if index is None:
            continue
        try:
            sub = find_in_dir(index.parent)
        except WeightsError as e:
            found.notes.append(f"skipped the cached {DIFFUSERS_REPOS[v]}: {e}")
            continue
        if found.dit is None and sub.dit is not None:
            found.dit = sub.dit
        if found.vae is None and sub.vae is not None and found.dit is not None and found.dit.root == index.parent:
            found.vae = sub.vae
        if found.encoder is None and sub.encoder is not None:
            found.encoder = sub.encoder
    if found.encoder is None:
        cfg = cached_file(cache, ENCODER_REPO, "config.json")
        if cfg is not None:
            found.encoder = inspect_encoder(cfg.parent)
    for repo in (STEP1X_REPO, *DIFFUSERS_REPOS.values(), ENCODER_REPO):
        for blob in interrupted_downloads(cache, repo):
            found.notes.append(f"interrupted download in the cache: {blob} ({blob.stat().st_size} bytes); "
                               "run `step1x-edit download` again to resume")
    return found


@dataclass
class WeightsPlan:
    dit: Source
    vae: Source
    encoder: Source
    sources: dict[str, str]  # component -> how it was found
    notes: list[str] = field(default_factory=list)

    @property
    def version(self) -> str:
        return self.dit.version or "v1.1"

    def describe(self) -> str:
        lines = [f"Step1X-Edit {self.version} weights:"]
        for name in ("dit", "vae", "encoder"):
            src: Source = getattr(self, name)
            lines.append(f"  {name:8s} {src.describe()}  (from {self.sources[name]})")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _settings_get(settings: Any, name: str, default: Any = None) -> Any:
    return getattr(settings, name, default)


def locate(settings: Any) -> tuple[Found, dict[str, str]]:
    """Per component, the first of: explicit path, STEP1X_MODEL_DIR, the Hugging Face cache."""
    version = _settings_get(settings, "version", "auto")
    found, sources = Found(), {}
    explicit = {"dit": _settings_get(settings, "dit_path"), "vae": _settings_get(settings, "vae_path"),
                "encoder": _settings_get(settings, "encoder_path")}
    inspectors = {"dit": inspect_dit, "vae": inspect_vae, "encoder": inspect_encoder}
    for name, value in explicit.items():
        if value:
            setattr(found, name, inspectors[name](value))
            sources[name] = f"STEP1X_{name.upper()}_PATH"
    # a directory given as the DiT path (diffusers pipeline folder, or a folder of official files) also provides
    # the VAE and the encoder it holds
    folder = found.dit.root if found.dit is not None and found.dit.root is not None else None
    if folder is None and explicit["dit"] and Path(explicit["dit"]).is_dir():
        folder = Path(explicit["dit"])
    if folder is not None:
        root = find_in_dir(folder, version)
        for name in ("vae", "encoder"):
            if getattr(found, name) is None and getattr(root, name) is not None:
                setattr(found, name, getattr(root, name))
                sources[name] = f"the directory {folder} (STEP1X_DIT_PATH)"
    searches: list[tuple[str, Any]] = []
    model_dir = _settings_get(settings, "model_dir")
    if model_dir:
        searches.append((f"STEP1X_MODEL_DIR={model_dir}", lambda: find_in_dir(model_dir, version)))
    if _settings_get(settings, "hf_cache", True):
        cache = hub_cache_dir(_settings_get(settings, "hf_cache_dir"))
        searches.append((f"the Hugging Face cache {cache}", lambda: find_in_hf_cache(cache, version)))
    for label, search in searches:
        if all(getattr(found, n) is not None for n in ("dit", "vae", "encoder")):
            break
        hit = search()
        found.notes += hit.notes
        for name in ("dit", "vae", "encoder"):
            if getattr(found, name) is None and getattr(hit, name) is not None:
                setattr(found, name, getattr(hit, name))
                sources[name] = label
    return found, sources


def has_weights(settings: Any) -> bool:
    """Cheap: is there a Step1X-Edit DiT to run (explicit, STEP1X_MODEL_DIR or the HF cache)? No torch import.

    A DiT found without a VAE or encoder still counts, so the user gets an error naming what is missing rather
    than a silent dev preset."""
    if _settings_get(settings, "dit_path") or _settings_get(settings, "model_dir"):
        return True
    if not _settings_get(settings, "hf_cache", True):
        return False
    cache = hub_cache_dir(_settings_get(settings, "hf_cache_dir"))
    try:
        if any(cached_file(cache, STEP1X_REPO, f) for f in OFFICIAL_DIT_FILES.values()):
            return True
        return any(cached_file(cache, repo, "model_index.json") for repo in DIFFUSERS_REPOS.values())
    except Exception as e:  # a broken cache must not stop the dev preset from starting
        log.warning("could not look in the Hugging Face cache %s: %s", cache, e)
        return False


def resolve_preset(settings: Any) -> str:
    """The settings' preset with `auto` decided: `full` when a Step1X-Edit DiT is configured or found
    (STEP1X_DIT_PATH, STEP1X_MODEL_DIR, the Hugging Face cache), else `dev`. File-system lookups only, no torch."""
    preset = _settings_get(settings, "preset", "auto")
    if preset != "auto":
        return preset
    return "full" if has_weights(settings) else "dev"


def resolve_weights(settings: Any) -> WeightsPlan:
    """All three components, or a WeightsError saying what is missing and where it was looked for."""
    found, sources = locate(settings)
    missing = [n for n in ("dit", "vae", "encoder") if getattr(found, n) is None]
    if missing:
        where = []
        if _settings_get(settings, "model_dir"):
            where.append(f"STEP1X_MODEL_DIR={_settings_get(settings, 'model_dir')}")
        if _settings_get(settings, "hf_cache", True):
            where.append(f"the Hugging Face cache {hub_cache_dir(_settings_get(settings, 'hf_cache_dir'))}")
        have = ", ".join(f"{n} from {sources[n]}" for n in ("dit", "vae", "encoder") if n in sources)
        hint = {"dit": "STEP1X_DIT_PATH", "vae": "STEP1X_VAE_PATH", "encoder": "STEP1X_ENCODER_PATH"}
        raise WeightsError(
            "Step1X-Edit weights not found: missing "
            + ", ".join(f"{n} (set {hint[n]})" for n in missing)
            + f"; looked in: {', '.join(where) or 'no place (no paths set, Hugging Face cache disabled)'}"
            + (f"; found {have}" if have else "")
            + "".join(f"; note: {n}" for n in found.notes)
            + f". To get the weights: {DOWNLOAD_HINT}."
        )
    return WeightsPlan(found.dit, found.vae, found.encoder, sources, found.notes)
