"""One tiny Step1X-Edit model written out in every checkpoint layout people download (keys converted the other way
by the same rule tables the loader uses), plus a fake Hugging Face hub cache. Shared by test_layouts.py and
test_download.py.

The DiT has head_dim 128 (hidden 256, 2 heads, the official axes split) so that the official single file's
config is inferred from shapes exactly as for the real checkpoint; the connector takes 64-wide encoder states,
the width of the dev Qwen2.5-VL (`encoder.build_dev_conditioner`), so a whole pipeline can be built from them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from step1x_edit.models import presets
from step1x_edit.models import weights as W
from step1x_edit.models.connector import ConnectorConfig
from step1x_edit.models.dit import DiTConfig, Step1XEditTransformer2DModel
from step1x_edit.models.vae import build_vae

ENCODER_HIDDEN = 64
TINY_DIT = DiTConfig(
    vec_in_dim=64,
    context_in_dim=256,
    hidden_size=256,
    num_heads=2,
    depth=1,
    depth_single_blocks=1,
    connector=ConnectorConfig(in_channels=ENCODER_HIDDEN, hidden_size=256, num_heads=2, depth=1, vec_dim=64,
                              has_scale_factor=False),
)
TINY_VAE = presets.DEV_VAE
SHARD_BYTES = 1_500_000  # small shards: the tiny transformer becomes ~7 files


def tiny_dit(version: str = "v1.1", seed: int = 0) -> Step1XEditTransformer2DModel:
    """Random tiny DiT with bf16-representable weights (checkpoints are bf16), held in fp32."""
    model = Step1XEditTransformer2DModel.from_dit_config(W.with_version(TINY_DIT, version))
    presets.init_random_(model, torch.Generator().manual_seed(seed))
    if version == "v1.0":
        with torch.no_grad():
            model.connector.scale_factor.fill_(-0.75)
    return model.to(torch.bfloat16).float().eval().requires_grad_(False)


def tiny_vae(seed: int = 0):
    vae = presets.init_random_(build_vae(TINY_VAE), torch.Generator().manual_seed(seed + 1))
    return vae.to(torch.bfloat16).float().eval().requires_grad_(False)


def bf16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}


def dit_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    n, length = 16, 8
    img = torch.randn(2, n, 64, generator=g)
    ids = torch.zeros(n, 3)
    ids[:, 1], ids[:, 2] = torch.arange(n) // 4, torch.arange(n) % 4
    txt_ids = torch.zeros(length, 3)
    t = torch.tensor([0.7, 0.2])
    llm = torch.randn(2, length, ENCODER_HIDDEN, generator=g)
    mask = torch.ones(2, length)
    mask[1, 5:] = 0
    return img, ids, txt_ids, t, llm, t, mask


@torch.no_grad()
def dit_out(model, inputs=None) -> torch.Tensor:
    img, ids, txt_ids, t, llm, tv, mask = inputs or dit_inputs()
    return model(img, ids, txt_ids, t, llm, tv, mask).float()


@torch.no_grad()
def vae_out(vae) -> torch.Tensor:
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)
    from step1x_edit.models import vae as V

    return V.decode(vae, V.encode(vae, x))


# --------------------------------------------------------------------------------------------------------------
# writers, one per layout


def write_official_dit(model, path: Path, fp8: bool = False) -> Path:
    state = bf16(W.to_official(model, W.DIT_RULES))
    if fp8:  # what the FP8 community files (and the official --quantized cast) hold: float8_e4m3fn matrices
        state = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v) for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def write_official_sharded_dit(model, folder: Path) -> Path:
    return W.save_sharded(bf16(W.to_official(model, W.DIT_RULES)), folder, "step1x-edit-v1p1-official", SHARD_BYTES)


def write_official_vae(vae, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(bf16(W.to_official(vae, W.vae_rules(len(TINY_VAE.ch_mult)))), str(path))
    return path


def write_diffusers(model, vae, root: Path, encoder_dir: Path | None = None, class_name: str = "Step1XEditPipeline",
                    sharded: bool = True) -> Path:
    """A Step1X-Edit-v1p1-diffusers-style directory: model_index.json, transformer/ (sharded + index json),
    vae/, scheduler/, and text_encoder/ + processor/ split from a Qwen2.5-VL folder when given."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": class_name, "_diffusers_version": "0.36.0.dev0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers",
        "Qwen2_5_VLForConditionalGeneration"], "processor": ["transformers", "Qwen2_5_VLProcessor"],
        "transformer": ["diffusers", "Step1XEditTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    tr = root / "transformer"
    state = bf16(W.to_official(model, W.DIFFUSERS_DIT_RULES))
    if sharded:
        W.save_sharded(state, tr, "diffusion_pytorch_model", SHARD_BYTES)
    else:
        tr.mkdir(parents=True, exist_ok=True)
        save_file(state, str(tr / "diffusion_pytorch_model.safetensors"))
    (tr / "config.json").write_text(json.dumps(W.dit_config_to_diffusers(model.dit_config)))
    (root / "vae").mkdir(exist_ok=True)
    save_file(bf16(vae.state_dict()), str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    (root / "vae" / "config.json").write_text(json.dumps(W.vae_config_to_diffusers(TINY_VAE)))
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler"}))
    if encoder_dir is not None:
        for sub in ("text_encoder", "processor"):
            (root / sub).mkdir(exist_ok=True)
        for f in encoder_dir.iterdir():
            sub = "text_encoder" if f.name.startswith(("model", "config", "generation")) else "processor"
            shutil.copy(f, root / sub / f.name)
    return root


def write_encoder(folder: Path) -> Path:
    """The dev Qwen2.5-VL (real vocabulary, tiny weights) saved as a Qwen2.5-VL-7B-Instruct-style directory."""
    from step1x_edit.models import encoder as E
    from step1x_edit.models import qwen_vocab as qv

    folder.mkdir(parents=True, exist_ok=True)
    cond = E.build_dev_conditioner(seed=0, hidden_size=ENCODER_HIDDEN, dtype=torch.bfloat16)
    cond.model.save_pretrained(folder)
    shutil.copy(qv.cached_tokenizer_json(), folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": qv.CHAT_TEMPLATE}))
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}))
    return folder


def write_official_dir(model, vae, folder: Path, encoder_dir: Path | None, version: str = "v1.1") -> Path:
    """What `step1x-edit download --dir folder` leaves: the official files + Qwen2.5-VL-7B-Instruct/."""
    name = {"v1.1": "step1x-edit-v1p1-official.safetensors", "v1.0": "step1x-edit-i1258.safetensors"}[version]
    write_official_dit(model, folder / name)
    write_official_vae(vae, folder / "vae.safetensors")
    if encoder_dir is not None:
        shutil.copytree(encoder_dir, folder / "Qwen2.5-VL-7B-Instruct", dirs_exist_ok=True)
    return folder


# --------------------------------------------------------------------------------------------------------------
# a fake Hugging Face hub cache: models--org--name/{blobs,refs,snapshots,trees}


def cache_repo(cache: Path, repo_id: str, files: dict[str, Path], commit: str = "a" * 40, tree: bool = True) -> Path:
    """Lay `files` (repo path -> a local file) out as huggingface_hub does: blobs named by sha256, relative
    symlinks from snapshots/<commit>/, refs/main, and the tree listing (trees/<commit>.json) with sizes."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    snap = storage / "snapshots" / commit
    listing = {}
    for rel, src in files.items():
        data = Path(src).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (storage / "blobs" / sha).write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(storage / "blobs" / sha, link.parent), link)
        listing[rel] = {"size": len(data), "blob_id": hashlib.sha1(data).hexdigest(), "lfs_sha256": sha,
                        "lfs_size": len(data)}
    if tree:
        (storage / "trees").mkdir(exist_ok=True)
        (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    return snap


def cache_folder(cache: Path, repo_id: str, folder: Path, **kw) -> Path:
    files = {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}
    return cache_repo(cache, repo_id, files, **kw)


def blob_of(link: Path) -> Path:
    return Path(os.path.normpath(link.parent / os.readlink(link)))


def replace_tensor_bytes(path: Path, key: str, byte: int) -> None:
    """Overwrite one tensor's data in a safetensors file (a corrupt download of the same size)."""
    from step1x_edit.models.layouts import read_safetensors_header

    info = read_safetensors_header(path)[key]
    n = int.from_bytes(path.read_bytes()[:8], "little")
    data = bytearray(path.read_bytes())
    start = 8 + n + info.start
    data[start:8 + n + info.end] = bytes([byte]) * (info.end - info.start)
    path.write_bytes(bytes(data))

