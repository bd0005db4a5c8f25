"""The whole edit on the dev preset: determinism, seeds, batching, guidance on/off, img2img, sizes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from step1x_edit.pipeline.edit import build_pipeline
from step1x_edit.pipeline.types import EditRequest
from step1x_edit.settings import Settings


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline(Settings(preset="dev", size_level=256, device="cpu"))


def _image(w=96, h=64, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _req(**kw):
    base = dict(image=_image(), prompt="add a hat", steps=2, seed=11)
    base.update(kw)
    return EditRequest(**base)


def _same(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def test_same_seed_same_pixels_and_input_size(pipe):
    (a,), (b,) = pipe.run([_req()]), pipe.run([_req()])
    assert a.images[0].size == (96, 64) and a.images[0].mode == "RGB"
    assert _same(a.images[0], b.images[0])
    (c,) = pipe.run([_req(seed=12)])
    assert not _same(a.images[0], c.images[0])


def test_n_images_use_consecutive_seeds_and_each_is_reproducible_alone(pipe):
    (many,) = pipe.run([_req(n=3, seed=100)])
    assert many.seeds == [100, 101, 102]
    assert not _same(many.images[0], many.images[1])
    (alone,) = pipe.run([_req(n=1, seed=101)])
    assert np.abs(np.asarray(alone.images[0], dtype=int) - np.asarray(many.images[1], dtype=int)).max() <= 1


def test_batching_two_requests_equals_running_them_alone(pipe):
    r1 = _req(prompt="make it night", seed=3, guidance_scale=2.0)
    r2 = _req(image=_image(seed=5), prompt='write "HELLO" on the wall', negative_prompt="blurry", seed=9,
              guidance_scale=5.0, n=2)
    assert pipe.prepare(r1).key == pipe.prepare(r2).key
    together = pipe.run([r1, r2])
    (alone1,), (alone2,) = pipe.run([r1]), pipe.run([r2])
    for x, y in [(together[0].images[0], alone1.images[0]), (together[1].images[1], alone2.images[1])]:
        assert np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() <= 1
    assert together[1].seeds == [9, 10]
    assert together[0].text_tokens == alone1.text_tokens and together[1].image_tokens == alone2.image_tokens


def test_random_seed_is_reported_and_reproduces(pipe):
    (a,) = pipe.run([_req(seed=-1)])
    assert 0 <= a.seeds[0] < 2**63
    (b,) = pipe.run([_req(seed=a.seeds[0])])
    assert _same(a.images[0], b.images[0])


def test_guidance_one_skips_the_negative_branch(pipe, monkeypatch):
    batch_sizes = []
    original = pipe.dit.forward

    def spy(img, *args, **kw):
        batch_sizes.append(img.shape[0])
        return original(img, *args, **kw)

    monkeypatch.setattr(pipe.dit, "forward", spy)
    (off,) = pipe.run([_req(guidance_scale=1.0, negative_prompt="ignored")])
    assert batch_sizes == [1, 1]
    batch_sizes.clear()
    (on,) = pipe.run([_req(guidance_scale=2.5)])
    assert batch_sizes == [2, 2]
    assert off.text_tokens < on.text_tokens  # the negative prompt is not encoded without guidance


def test_strength_controls_how_many_steps_run(pipe, monkeypatch):
    calls = []
    original = pipe.dit.forward
    monkeypatch.setattr(pipe.dit, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    pipe.run([_req(steps=4, strength=0.5)])
    assert len(calls) == 2  # starts at index int(0.5 * 4) = 2
    calls.clear()
    (zero,) = pipe.run([_req(steps=4, strength=0.0)])
    assert calls == []  # nothing to denoise: the VAE round trip of the input
    assert zero.images[0].size == (96, 64)


def test_progress_callback_counts_steps(pipe):
    seen = []
    pipe.run([_req(steps=3, strength=1.0)], on_step=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_mixed_batch_keys_are_refused(pipe):
    with pytest.raises(ValueError, match="share"):
        pipe.run([_req(steps=2), _req(steps=3)])


@pytest.mark.parametrize("field,value", [("n", 0), ("steps", 0), ("strength", 1.5), ("guidance_scale", 0.5),
                                         ("seed", -2), ("guidance_scale", float("nan"))])
def test_invalid_requests_name_the_field(pipe, field, value):
    with pytest.raises(ValueError, match=field):
        pipe.validate(_req(**{field: value}))


def test_seed_plus_n_must_stay_in_range(pipe):
    with pytest.raises(ValueError, match="seed"):
        pipe.prepare(_req(seed=2**63 - 2, n=3))  # refused at admission, not inside a shared batch
    pipe.validate(_req(seed=2**63 - 3, n=3))


def test_exif_orientation_is_applied_once(pipe):
    import io

    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    prepared = pipe.prepare(_req(image=Image.open(io.BytesIO(buf.getvalue()))))
    assert prepared.original_size == (20, 40)  # the displayed orientation: the output's size
    r, g, b = prepared.resized.resize((20, 40)).getpixel((10, 3))  # the left edge moved to the top
    assert b > 200 and r < 60


def test_random_seeds_stay_below_2_53_for_javascript_clients(pipe):
    seeds = [pipe.prepare(_req(seed=-1, n=4)).seeds for _ in range(200)]
    assert all(s[-1] < 2**53 for s in seeds) and len({s[0] for s in seeds}) > 190
    assert pipe.prepare(_req(seed=2**63 - 4, n=4)).seeds[-1] == 2**63 - 1  # explicit seeds keep the full range


def test_odd_inputs_become_rgb_edits(pipe):
    rgba = Image.new("RGBA", (40, 30), (10, 200, 30, 128))
    (r,) = pipe.run([_req(image=rgba)])
    assert r.images[0].size == (40, 30) and r.images[0].mode == "RGB"
    exif_rotated = _image(96, 64)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    exif_rotated.info["exif"] = exif.tobytes()
    import io

    buf = io.BytesIO()
    exif_rotated.save(buf, "JPEG", exif=exif.tobytes())
    (rot,) = pipe.run([_req(image=Image.open(io.BytesIO(buf.getvalue())))])
    assert rot.images[0].size == (64, 96)


def test_each_stage_time_waits_for_the_device(pipe, monkeypatch):
    """On CUDA a stage's kernels run asynchronously: each clock read first waits for the device (a no-op here), so
    the stage timings (and the Prometheus stage metrics made of them) are each stage's own."""
    from step1x_edit.pipeline import edit

    waited = []
    monkeypatch.setattr(edit, "device_sync", lambda device: waited.append(device))
    (r,) = pipe.run([_req()])
    assert len(waited) == len(r.timings) == 7 and set(waited) == {pipe.device}


def test_timings_cover_every_stage(pipe):
    (r,) = pipe.run([_req()])
    assert {"vae_encode", "encoder", "denoise", "vae_decode"} <= set(r.timings)
