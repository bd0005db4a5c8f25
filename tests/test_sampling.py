"""Schedule, packing, position ids and the guidance rule, including the cases the golden data stresses."""

from __future__ import annotations

import json

import pytest
import torch

from step1x_edit.pipeline import sampling


def test_schedule_matches_golden_exactly(golden_dir):
    results = json.loads((golden_dir / "tiny-a-v1p1" / "cases.json").read_text())["cases"]["schedule"]["results"]
    for r in results.values():
        ours = sampling.get_schedule(r["num_steps"], r["image_seq_len"])
        assert ours == r["timesteps"]
        assert [i for i, t in enumerate(ours[:-1]) if t > 0.93] == r["rescale_step_indices"]


def test_schedule_endpoints_and_monotone():
    t = sampling.get_schedule(20, 4096)
    assert t[0] == 1.0 and t[-1] == 0.0 and len(t) == 21
    assert all(a > b for a, b in zip(t, t[1:]))


@pytest.mark.parametrize("steps,strength,expected", [(4, 0.7, 1), (20, 0.8, 3), (28, 1.0, 0), (20, 0.0, 20), (3, 0.5, 1)])
def test_img2img_start_index(steps, strength, expected):
    # float arithmetic as upstream: (1 - 0.8) * 20 = 3.9999999999999996 -> index 3
    assert sampling.start_index(steps, strength) == expected


def test_pack_unpack_round_trip_and_layout():
    x = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).reshape(2, 16, 4, 6)
    p = sampling.pack(x)
    assert p.shape == (2, 6, 64)
    # token (row 0, col 1), channel c, sub-pixel (ph, pw) = x[b, c, 2*0+ph, 2*1+pw]
    assert p[1, 1, 5 * 4 + 1 * 2 + 0] == x[1, 5, 1, 2]
    assert torch.equal(sampling.unpack(p, 4, 6), x)


def test_image_ids_per_version():
    t = sampling.image_ids(4, 6)
    assert t.shape == (6, 3) and t[4].tolist() == [0, 1, 1]
    assert torch.equal(sampling.image_ids(4, 6, reference=True, version="v1.0"), t)
    r = sampling.image_ids(4, 6, reference=True, version="v1.1")
    assert r[0].tolist() == [1, 1, 1] and r[4].tolist() == [1, 2, 2]


def test_guidance_rescale_only_above_norm_one():
    cond = torch.zeros(1, 3, 4)
    uncond = torch.zeros(1, 3, 4)
    cond[0, 0, 0] = 3.0  # norm 3 -> divided by 3**0.4
    cond[0, 1, 0] = 0.5  # norm 0.5 -> unchanged
    cond[0, 2, 0] = 1.0  # norm exactly 1 -> unchanged
    out, norm, div = sampling.guide(cond, uncond, 2.0, rescale=True)
    assert norm[0, :, 0].tolist() == [3.0, 0.5, 1.0]
    assert out[0, 0, 0].item() == pytest.approx(6.0 / 3.0**0.4)
    assert out[0, 1, 0].item() == 1.0 and out[0, 2, 0].item() == 2.0
    plain, _, _ = sampling.guide(cond, uncond, 2.0, rescale=False)
    assert plain[0, 0, 0].item() == 6.0


def test_guidance_scale_per_row():
    cond, uncond = torch.ones(2, 1, 4), torch.zeros(2, 1, 4)
    out, _, _ = sampling.guide(cond, uncond, torch.tensor([1.5, 4.0]).reshape(-1, 1, 1), rescale=False)
    assert out[:, 0, 0].tolist() == [1.5, 4.0]
