"""Memory planning (`pipeline/memory.py`): its per-pixel and per-token constants re-measured on the real modules,
the VAE decode in chunks, and the engine batching below its setting when the pipeline says fewer images fit.

Peak activation memory is measured device-independently: every tensor the dispatcher creates is counted while
alive (the same allocations a GPU would make, without a GPU)."""

from __future__ import annotations

import threading
import weakref
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from step1x_edit import bench
from step1x_edit.engine.queue import Job, JobQueue
from step1x_edit.models import presets
from step1x_edit.models import vae as vae_ops
from step1x_edit.models.dit import Step1XEditTransformer2DModel
from step1x_edit.pipeline import memory
from step1x_edit.pipeline.types import PreparedEdit


class PeakBytes(TorchDispatchMode):
    """Peak bytes of live tensor storage created inside the mode (inputs and weights made before it not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t._is_view():
                storage = t.untyped_storage()
                key, n = storage.data_ptr(), storage.nbytes()
                if n == 0 or key in self._seen:
                    continue
                self._seen.add(key)
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, n)
        return out

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self._seen.discard(key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vae_decode_bytes_per_pixel_is_what_the_flux_vae_uses(dtype):
    """The full-size VAE (128 channels at full resolution), at two small sizes: the planned bytes cover the measured
    peak with the margin and no more (peak activation memory is linear in the pixels)."""
    vae = bench.build_random(lambda: vae_ops.build_vae(bench.BENCH_VAE), torch.device("cpu"), dtype, seed=0)
    for h, w in ((32, 32), (48, 64)):
        z = torch.randn(1, 16, h // 8, w // 8, dtype=dtype)
        with torch.inference_mode(), PeakBytes() as peak:
            vae_ops.decode(vae, z)
        planned = memory.vae_decode_bytes(h, w, dtype_bytes=dtype.itemsize)
        print(f"VAE decode {h}x{w} {dtype}: measured {peak.peak} B ({peak.peak / (h * w):.0f} B/pixel), planned {planned}")
        assert peak.peak <= planned <= memory.MARGIN * 1.02 * peak.peak


def test_dit_activation_bytes_per_token():
    """A full-width-per-head DiT (head_dim 128, 6 heads: the per-token arithmetic of the 24-head model, in units of
    the width) with one block of each kind: the planned bytes per token cover the measured slope."""
    cfg = replace(bench.BENCH_DIT, hidden_size=768, num_heads=6, depth=1, depth_single_blocks=1, context_in_dim=256,
                  connector=replace(bench.BENCH_DIT.connector, in_channels=64, hidden_size=256, num_heads=2))
    dit = bench.build_random(lambda: Step1XEditTransformer2DModel.from_dit_config(cfg), torch.device("cpu"),
                             torch.bfloat16, seed=0)
    d = bench.Dims(cfg, bench.BENCH_VAE, 64, tiny=False)
    peaks = {}
    for size in (256, 384):
        x = bench.dit_inputs(size, d, torch.device("cpu"), torch.bfloat16, batch=2)
        with torch.inference_mode(), PeakBytes() as peak:
            x.ours(dit)
        peaks[size] = peak.peak
    rows_tokens = {s: 2 * memory.dit_tokens(s, s) for s in peaks}
    slope = (peaks[384] - peaks[256]) / (rows_tokens[384] - rows_tokens[256])
    widths = slope / (cfg.hidden_size * 2)
    print(f"DiT activations: {slope:.0f} B per token-row = {widths:.1f} x hidden (bf16); constant {memory.DIT_ACTIVATION_WIDTHS}")
    assert widths <= memory.DIT_ACTIVATION_WIDTHS * 1.05
    planned = memory.dit_bytes_per_image(384, 384, guided=True, hidden=cfg.hidden_size, dtype_bytes=2)
    assert peaks[384] <= planned


def test_limits_follow_free_memory_and_size():
    gib = 1 << 30
    # 4 images at 2048 in one fp32 decode: ~51 GB (the figure that ran an 80 GB card out of memory)
    assert 50e9 < 4 * memory.vae_decode_bytes(2048, 2048) / memory.MARGIN < 53e9
    assert memory.decode_chunk(20 * gib, 2048, 2048) == 1 and memory.decode_chunk(5 * gib, 2048, 2048) == 1
    for free, dtype_bytes in ((40 * gib, 4), (40 * gib, 2), (9 * gib, 4)):
        chunk, one = memory.decode_chunk(free, 1024, 1024, dtype_bytes), memory.vae_decode_bytes(1024, 1024, dtype_bytes)
        assert chunk * one <= free - memory.RESERVE_BYTES < (chunk + 1) * one  # as many as fit, no more
    # batch limit: 139 GiB H200 minus ~41 GB of weights leaves room for many; an 80 GB card at 2048 for fewer
    h200, h100 = 95 * gib, 37 * gib
    assert memory.max_images(h200, 1024, 1024, guided=True) > 8
    assert memory.max_images(h100, 2048, 2048, guided=True) < memory.max_images(h100, 1024, 1024, guided=True)
    assert memory.max_images(h100, 2048, 2048, guided=False) >= memory.max_images(h100, 2048, 2048, guided=True)
    assert memory.max_images(2 * gib, 2048, 2048, guided=True) == 1  # never below one: the request gets to try


def test_chunked_decode_is_the_same_decode():
    vae = presets.build_dev_vae()
    z = torch.randn(3, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = vae_ops.decode(vae, z)
        for chunk in (1, 2):
            assert (vae_ops.decode(vae, z, chunk=chunk) - whole).abs().max().item() <= 1e-5


def _job(key: str, n: int) -> Job:
    from PIL import Image

    img = Image.new("RGB", (8, 8))
    return Job(prepared=PreparedEdit(request=None, original_size=(8, 8), resized=img, seeds=tuple(range(n)), key=key))


def test_queue_batches_below_the_setting_when_fewer_fit():
    q = JobQueue(depth=16)
    for key, n in (("big", 1), ("big", 1), ("big", 1), ("small", 2), ("small", 2)):
        q.put(_job(key, n))
    fits = {"big": 2, "small": None}
    asked: list[str] = []

    def limit(key):
        asked.append(key)
        return fits[key]

    assert [j.key for j in q.take_batch(4, limit=limit)] == ["big", "big"]  # 2 fit, not the 4 of the setting
    assert [j.key for j in q.take_batch(4, limit=limit)] == ["big"]
    assert [j.images for j in q.take_batch(4, limit=limit)] == [2, 2]  # no limit: the setting's 4 images
    assert asked == ["big", "big", "small"]


def test_engine_asks_the_pipeline_how_many_fit():
    """The worker passes the pipeline's `max_images(key)` to the queue; a pipeline without it batches as before."""
    from step1x_edit.engine.worker import Engine
    from step1x_edit.pipeline.types import EditResult

    class Fits:
        def __init__(self) -> None:
            self.calls: list[int] = []
            self.gate = threading.Event()

        def info(self):
            return {}

        def prepare(self, req):
            return PreparedEdit(request=req, original_size=(8, 8), resized=None, seeds=(0,), key="k")

        def max_images(self, key):
            return 2

        def release_memory(self):
            pass

        def run(self, batch, **_):
            self.gate.wait(10)
            self.calls.append(len(batch))
            return [EditResult([], [0], 0, 0) for _ in batch]

    pipe = Fits()
    engine = Engine(lambda: pipe, queue_depth=8, batch_max_images=4, batch_wait_s=0.05)
    engine.start()
    assert engine.wait_loaded(10)
    jobs = [engine.submit(object()) for _ in range(5)]
    pipe.gate.set()
    for job in jobs:
        job.future.result(10)
    engine.shutdown(10)
    assert sum(pipe.calls) == 5 and max(pipe.calls) <= 2
