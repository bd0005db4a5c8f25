"""The official resize rule, refusals for degenerate shapes, colour-mode handling and output conversion."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from step1x_edit.pipeline import imaging


def test_working_size_matches_golden(golden_dir):
    results = json.loads((golden_dir / "tiny-a-v1p1" / "cases.json").read_text())["cases"]["input_process_image"]["results"]
    for r in results:
        assert imaging.working_size(r["w"], r["h"], r["size_level"]) == (r["w_new"], r["h_new"]), r


def test_lanczos_resize_matches_pillow_pinned_bytes(golden_dir):
    from safetensors.torch import load_file
    import PIL

    t = load_file(str(golden_dir / "tiny-a-v1p1" / "cases.safetensors"))
    src = Image.open(golden_dir / "tiny-a-v1p1" / "resize_src_333x777.png")
    assert np.array_equal(np.asarray(src), t["input_process_image.src"].numpy())
    ours = np.asarray(imaging.resize_for_model(src, 256, "v1.1"))
    key = {"11.1.0": "resized_lanczos", "13.0.0": "resized_lanczos_pillow13"}.get(PIL.__version__)
    if key is None:
        pytest.skip(reason=f"no golden bytes for Pillow {PIL.__version__}")
    assert np.array_equal(ours, t["input_process_image." + key].numpy())
    # v1.0 uses bicubic: a different image of the same size
    assert not np.array_equal(np.asarray(imaging.resize_for_model(src, 256, "v1.0")), ours)


@pytest.mark.parametrize("w,h", [(1000, 10), (5, 5000), (0, 10)])
def test_degenerate_shapes_are_refused(w, h):
    with pytest.raises(ValueError):
        imaging.working_size(w, h, 512)


def test_small_image_is_upscaled_to_the_working_area():
    assert imaging.working_size(20, 20, 512) == (512, 512)


def test_to_rgb_modes():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    assert imaging.to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert imaging.to_rgb(Image.new("CMYK", (4, 4), (0, 0, 0, 0))).mode == "RGB"
    assert imaging.to_rgb(Image.new("P", (4, 4))).mode == "RGB"
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert imaging.to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)
    assert imaging.to_rgb(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_tensor_round_trip_and_official_truncation():
    img = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    t = imaging.pil_to_tensor(img)
    assert t.shape == (1, 3, 4, 4) and t.min() >= -1 and t.max() <= 1
    x = torch.full((3, 1, 1), 0.999)  # 127.5 * 1.999 = 254.87 -> 254 (truncated, as the official code)
    assert imaging.tensor_to_pil(x).getpixel((0, 0)) == (254, 254, 254)
    assert imaging.tensor_to_pil(torch.full((3, 1, 1), 5.0)).getpixel((0, 0)) == (255, 255, 255)
