"""The DiT became a diffusers model (ModelMixin, config, hooks) without changing a single output: the dev weights
and a seeded edit recorded before that change (tests/data/before/, see make_before.py) are reproduced exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from step1x_edit.models import presets
from step1x_edit.pipeline.edit import build_pipeline
from step1x_edit.pipeline.types import EditRequest
from step1x_edit.settings import Settings

BEFORE = Path(__file__).resolve().parent / "data" / "before"


def test_dev_preset_weights_are_unchanged():
    saved = load_file(str(BEFORE / "dit.safetensors"))
    now = presets.build_dev_dit(0).state_dict()
    assert set(now) == set(saved)
    for name, tensor in now.items():
        assert torch.equal(tensor.to(torch.bfloat16), saved[name]), name


def test_seeded_edit_is_unchanged(examples_dir):
    pipe = build_pipeline(Settings(preset="dev", device="cpu", size_level=256))
    pipe.dit.load_state_dict({k: v.float() for k, v in load_file(str(BEFORE / "dit.safetensors")).items()})
    req = EditRequest(image=Image.open(examples_dir / "0003.png"), prompt="Change image to anime style",
                      negative_prompt="blurry", n=2, steps=4, seed=7, size_level=256)
    (res,) = pipe.run([req])
    assert res.seeds == [7, 8] and (res.text_tokens, res.image_tokens) == (467, 546)
    for i, img in enumerate(res.images):
        with Image.open(BEFORE / f"edit-{i}.png") as before:
            assert np.array_equal(np.asarray(img), np.asarray(before)), f"image {i} differs"
