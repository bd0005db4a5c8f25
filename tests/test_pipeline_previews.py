"""Previews of the current prediction (`partial_images`): where they are taken, what they are, and that the default
path does not pay for them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from step1x_edit.pipeline import sampling
from step1x_edit.pipeline.edit import build_pipeline
from step1x_edit.pipeline.types import EditRequest, Preview
from step1x_edit.settings import Settings


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline(Settings(preset="dev", size_level=256, device="cpu"))


def _req(**kw):
    rng = np.random.default_rng(kw.pop("image_seed", 0))
    base = dict(image=Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)), prompt="add a hat",
                steps=4, seed=11, strength=1.0)
    base.update(kw)
    return EditRequest(**base)


@pytest.mark.parametrize("total,count,expected", [
    (20, 3, [5, 10, 15]), (4, 3, [1, 2, 3]), (4, 2, [1, 3]), (4, 1, [2]), (10, 2, [3, 7]),
    (2, 3, [1]), (1, 3, []), (20, 0, []), (0, 2, []),
])
def test_preview_steps_are_evenly_spaced_and_never_the_last(total, count, expected):
    assert sampling.preview_steps(total, count) == expected


def _count_decodes(pipe, monkeypatch) -> list[int]:
    calls: list[int] = []
    original = pipe.vae.decoder.forward

    def spy(z, *args, **kw):
        calls.append(z.shape[0])
        return original(z, *args, **kw)

    monkeypatch.setattr(pipe.vae.decoder, "forward", spy)
    return calls


def test_previews_only_for_requests_that_ask_and_results_unchanged(pipe, monkeypatch):
    wants = _req(partial_images=2, n=2, seed=3)
    plain = _req(image_seed=1, seed=9)
    (ref_a,), (ref_b,) = pipe.run([_req(n=2, seed=3)]), pipe.run([_req(image_seed=1, seed=9)])
    calls = _count_decodes(pipe, monkeypatch)
    got: list[tuple[int, Preview]] = []
    res_a, res_b = pipe.run([wants, plain], on_preview=lambda j, preview: got.append((j, preview)))
    assert [(j, p.step, p.total) for j, p in got] == [(0, 1, 4), (0, 3, 4)]  # request 1 asked for none
    for _, preview in got:
        assert len(preview.images) == 2 and all(p.size == (96, 64) and p.mode == "RGB" for p in preview.images)
    # one decode of only the asking request's 2 rows per preview, then the final decode of all 3 images
    assert calls == [2, 2, 3]
    assert not np.array_equal(np.asarray(got[0][1].images[0]), np.asarray(got[1][1].images[0]))
    for a, b in [(res_a.images[0], ref_a.images[0]), (res_a.images[1], ref_a.images[1]), (res_b.images[0], ref_b.images[0])]:
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1  # batching rounding only


def test_no_decode_without_a_callback_or_without_partial_images(pipe, monkeypatch):
    calls = _count_decodes(pipe, monkeypatch)
    pipe.run([_req(partial_images=3)])  # asked, but nobody listens
    pipe.run([_req()], on_preview=lambda *a: pytest.fail("nobody asked"))
    assert calls == [1, 1]


def test_img2img_previews_count_the_steps_actually_run(pipe):
    got = []
    pipe.run([_req(strength=0.5, steps=8, partial_images=3)], on_preview=lambda j, p: got.append((p.step, p.total)))
    assert got == [(1, 4), (2, 4), (3, 4)]  # 8 steps from index 4: 4 run


def test_x0_is_the_flow_matching_prediction():
    """After step i, x0 = x_before - t_curr * v: the last one is the final latent itself."""
    torch.manual_seed(0)

    class Toy(torch.nn.Module):  # v = a fixed linear map of x: enough to check the arithmetic
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(64, 64) * 0.1)

        compute_dtype = torch.float32

        def forward(self, img, ids, txt_ids, t, emb, t_vec, mask):
            return img @ self.w

    x = torch.randn(1, 4, 64)
    ref = torch.randn(1, 4, 64)
    ids = torch.zeros(4, 3)
    cond = sampling.Conditioning(torch.zeros(1, 2, 8), torch.ones(1, 2, dtype=torch.bool))
    ts = [1.0, 0.7, 0.3, 0.0]
    trace, seen = [], []
    out = sampling.denoise(Toy(), x, ref, ids, ids, cond, ts, 1.0, 1.0, trace=trace,
                           on_x0=lambda s, t, x0: seen.append((s, t, x0)), x0_at=lambda s, t: True)
    assert [(s, t) for s, t, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    befores = [x] + [tr.x for tr in trace[:-1]]
    for (step, _, x0), before, tr in zip(seen, befores, trace):
        v = tr.raw_pred[:, :4]
        torch.testing.assert_close(x0, before - ts[step - 1] * v)
    torch.testing.assert_close(seen[-1][2], out)
