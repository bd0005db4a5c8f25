"""LoRA files made by the tests, in the official (kohya) layout, and their delta merged into official weights by hand.

The reference never goes through the project's conversion: it adds scale * alpha / rank * up @ down to the official
tensor of each adapted layer (`double_blocks.0.img_attn.qkv.weight`, ...), as the official inference merges a LoRA.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

# every kind of block layer the official files adapt, and a few outside the blocks
DOUBLE = ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "img_mod.lin",
          "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2", "txt_mod.lin")
SINGLE = ("linear1", "linear2", "modulation.lin")
OUTSIDE = ("img_in", "txt_in", "final_layer.linear", "final_layer.adaLN_modulation.1")


def block_layers(depth: int, single_depth: int) -> list[str]:
    return ([f"double_blocks.{i}.{n}" for i in range(depth) for n in DOUBLE]
            + [f"single_blocks.{i}.{n}" for i in range(single_depth) for n in SINGLE])


def kohya_key(layer: str) -> str:
    return "lora_unet_" + layer.replace(".", "_")


def make_kohya(official: Mapping[str, torch.Tensor], layers: Iterable[str], rank: int = 4, alpha: float | None = 2.0,
               seed: int = 0, std: float = 0.1) -> dict[str, torch.Tensor]:
    """Random down/up matrices (and alpha) for `layers`, shaped after the official weights."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for layer in layers:
        out_f, in_f = official[layer + ".weight"].shape
        k = kohya_key(layer)
        sd[k + ".lora_down.weight"] = torch.randn(rank, in_f, generator=g) * std
        sd[k + ".lora_up.weight"] = torch.randn(out_f, rank, generator=g) * std
        if alpha is not None:
            sd[k + ".alpha"] = torch.tensor(float(alpha))
    return sd


def save(sd: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def merge_by_hand(official: Mapping[str, torch.Tensor], lora: Mapping[str, torch.Tensor],
                  scale: float) -> dict[str, torch.Tensor]:
    """The official weights with scale * alpha / rank * up @ down added to each adapted layer (float64 products)."""
    merged = dict(official)
    for key, down in lora.items():
        if not key.endswith(".lora_down.weight"):
            continue
        prefix = key.removesuffix(".lora_down.weight")
        up = lora[prefix + ".lora_up.weight"]
        rank = down.shape[0]
        alpha = float(lora[prefix + ".alpha"]) if prefix + ".alpha" in lora else float(rank)
        layer = next(k for k in official if k.endswith(".weight") and kohya_key(k.removesuffix(".weight")) == prefix)
        delta = (up.double() @ down.double()) * (scale * alpha / rank)
        merged[layer] = (official[layer].double() + delta).to(official[layer].dtype)
    return merged


def dev_preset_loras(directory: Path, names: Iterable[str] = ("fix-hand", "sketch"), rank: int = 8) -> Path:
    """Official-layout LoRAs on every block layer of the dev preset's DiT (random, strong enough to show)."""
    from step1x_edit.models import presets
    from step1x_edit.models.weights import DIT_RULES, to_official

    with torch.device("meta"):
        dit = presets.Step1XEditTransformer2DModel.from_dit_config(presets.DEV_DIT)
    official = to_official(dit, DIT_RULES)
    layers = block_layers(presets.DEV_DIT.depth, presets.DEV_DIT.depth_single_blocks)
    for seed, name in enumerate(names):
        save(make_kohya(official, layers, rank=rank, alpha=rank / 2, seed=100 + seed, std=0.3),
             directory / f"{name}.safetensors")
    return directory


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is faster than two, and much faster on a busy machine, where two OpenMP threads spin
    on each other (tests using it import it: `from lora_fixtures import one_thread`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
