"""LoRA adapters through the pipeline and the engine's batching (dev preset, real models): validation at admission,
the batch key that keeps different adapter sets apart, and switching adapters between batches without a trace."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from lora_fixtures import dev_preset_loras, one_thread  # noqa: E402,F401

from step1x_edit.engine.queue import Job, JobQueue  # noqa: E402
from step1x_edit.pipeline.edit import build_pipeline  # noqa: E402
from step1x_edit.pipeline.types import EditRequest, LoraChoice  # noqa: E402
from step1x_edit.settings import Settings  # noqa: E402


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, one_thread):  # noqa: F811 - the fixture imported above
    loras = dev_preset_loras(tmp_path_factory.mktemp("loras"))
    return build_pipeline(Settings(preset="dev", size_level=256, device="cpu", lora_dir=loras))


def _req(*loras: tuple[str, float], **kw) -> EditRequest:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    base = dict(image=image, prompt="add a hat", steps=1, seed=11, loras=tuple(LoraChoice(n, s) for n, s in loras))
    base.update(kw)
    return EditRequest(**base)


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def test_info_lists_the_adapters(pipe):
    assert [a["name"] for a in pipe.info()["loras"]] == ["fix-hand", "sketch"]
    assert pipe.info()["loras"][0] == {"name": "fix-hand", "format": "kohya", "rank": 8, "layers": 40}


@pytest.mark.parametrize("loras, message", [
    ((("nope", 1.0),), "loras: unknown adapter 'nope'; available: fix-hand, sketch"),
    ((("fix-hand", 1.0), ("fix-hand", 0.5)), "loras: adapter 'fix-hand' is named more than once"),
    ((("fix-hand", 4.5),), "loras: the scale of 'fix-hand' must be in [-4, 4]"),
    ((("fix-hand", float("nan")),), "loras: the scale of 'fix-hand' must be in [-4, 4]"),
    (tuple(("fix-hand", 1.0) for _ in range(5)), "loras: at most 4 adapters per request, got 5"),
    ((("nope", 0.0),), "loras: unknown adapter 'nope'"),  # (a scale of 0 does not hide a wrong name)
])
def test_bad_adapter_choices_are_refused_at_admission_naming_the_field(pipe, loras, message):
    with pytest.raises(ValueError) as err:
        pipe.prepare(_req(*loras))
    assert str(err.value).startswith(message)


def test_without_lora_dir_naming_an_adapter_is_refused():
    plain = build_pipeline(Settings(preset="dev", size_level=256, device="cpu"))
    with pytest.raises(ValueError, match=r"^loras: this server has no LoRA adapters \(STEP1X_LORA_DIR"):
        plain.prepare(_req(("fix-hand", 1.0)))
    assert "loras" not in plain.info()


def test_the_batch_key_holds_the_adapter_set(pipe):
    key = lambda *loras: pipe.prepare(_req(*loras)).key  # noqa: E731
    assert key() == key(("sketch", 0.0))  # scale 0 changes nothing: it may share a batch with plain requests
    assert key(("fix-hand", 0.5), ("sketch", 1.0)) == key(("sketch", 1.0), ("fix-hand", 0.5))  # order: same sum
    assert len({key(), key(("fix-hand", 0.5)), key(("fix-hand", 1.0)), key(("sketch", 0.5))}) == 4
    assert pipe.prepare(_req(("sketch", 1.0), ("fix-hand", 0.5))).loras == (("fix-hand", 0.5), ("sketch", 1.0))


def test_a_queue_mixing_adapter_sets_is_split_into_batches_and_each_runs_with_its_own(pipe):
    """The engine's queue batches by key: plain requests together, each adapter set apart; a request batched with
    others gives its output alone (within the one level batching allows), and the plain ones show no adapter."""
    reqs = [_req(seed=1), _req(("fix-hand", 0.8), seed=1), _req(seed=3), _req(("fix-hand", 0.8), ("sketch", 1.0),
            seed=4), _req(("fix-hand", 0.8), seed=5), _req(("sketch", 0.0), seed=6)]
    queue = JobQueue(16)
    jobs = [Job(prepared=pipe.prepare(r)) for r in reqs]
    for job in jobs:
        queue.put(job)
    batches = []
    while queue.stats()[0]:
        batches.append(queue.take_batch(8))
    index = {id(j): i for i, j in enumerate(jobs)}
    assert [[index[id(j)] for j in b] for b in batches] == [[0, 2, 5], [1, 4], [3]]
    results = {}
    for batch in batches:
        for job, result in zip(batch, pipe.run([j.prepared for j in batch])):
            results[index[id(job)]] = _pixels(result)
    for i in (2, 4):  # batched with others vs alone
        assert np.abs(results[i] - _pixels(pipe.run([reqs[i]])[0])).max() <= 1
    assert np.abs(results[0] - results[1]).max() > 10  # same seed: only the adapter differs


def test_run_refuses_a_batch_that_mixes_adapter_sets(pipe):
    with pytest.raises(ValueError, match="LoRA adapters"):
        pipe.run([_req(), _req(("fix-hand", 1.0))])


def test_switching_adapters_between_batches_leaves_nothing_behind(pipe):
    (base,) = pipe.run([_req()])
    (a,) = pipe.run([_req(("fix-hand", 1.0))])
    (ab,) = pipe.run([_req(("fix-hand", 1.0), ("sketch", -0.5))])
    (b,) = pipe.run([_req(("sketch", -0.5))])
    (back,) = pipe.run([_req()])
    (zero,) = pipe.run([_req(("fix-hand", 0.0))])
    assert np.array_equal(_pixels(back), _pixels(base)) and np.array_equal(_pixels(zero), _pixels(base))
    assert np.array_equal(_pixels(pipe.run([_req(("fix-hand", 1.0))])[0]), _pixels(a))
    assert len({_pixels(x).tobytes() for x in (base, a, ab, b)}) == 4
    assert "lora_switch" in a.timings


def test_offload_pipeline_takes_adapters(pipe, tmp_path_factory):
    """Model offload (components moved onto the execution device only while they run) with adapters: they are part
    of the DiT and move with it. On this CPU-only machine both devices are the CPU, so this checks the hooks and
    adapters together, not the transfers."""
    loras = dev_preset_loras(tmp_path_factory.mktemp("loras-offload"))
    off = build_pipeline(Settings(preset="dev", size_level=256, device="cpu", lora_dir=loras, offload="model"))
    # adapters loaded, switched and dropped between the DiT's visits to the device (their layers are added to the
    # DiT after the offload took its host copies): every run matches the pipeline without offload
    for choice in [(("fix-hand", 0.7),), (("sketch", 1.0),), (), (("fix-hand", 0.7), ("sketch", 0.5))]:
        req = _req(*choice)
        assert np.array_equal(_pixels(off.run([req])[0]), _pixels(pipe.run([req])[0])), choice
    # each run brings the encoder, then the DiT (which sends the encoder back); the VAE came once and stays
    assert off.offload.loads[-2:] == ["encoder", "dit"] and off.offload.loads.count("vae") == 1


def test_fp8_dynamic_with_adapters_is_refused_at_start_up(tmp_path):
    with pytest.raises(ValueError, match="lora_dir cannot be combined with fp8_dynamic"):
        build_pipeline(Settings(preset="dev", device="cpu", lora_dir=tmp_path, fp8_dynamic=True))


@pytest.mark.slow  # (inductor compiles the blocks on the CPU: ~1.5 min on 2 cores)
def test_compiled_pipeline_switches_adapters_without_recompiling(tmp_path_factory,
                                                                  one_thread):  # noqa: F811 - imported fixture
    """compile=True with adapters: hot-swap slots are prepared before compiling; once a variant (no adapter, one,
    two) has been met, switching adapters adds no compiled graph, and switching back gives the base pixels."""
    import torch

    from torch._dynamo.utils import counters

    loras = dev_preset_loras(tmp_path_factory.mktemp("loras-compile"))
    torch._dynamo.reset()
    compiled = build_pipeline(Settings(preset="dev", size_level=256, device="cpu", lora_dir=loras, compile=True))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))

    def run(*loras):
        before = counters["stats"]["unique_graphs"]
        (result,) = compiled.run([_req(*loras, image=image)])
        return _pixels(result), counters["stats"]["unique_graphs"] - before

    base, new = run()
    assert new == 0  # the start-up warm-up compiled this one
    one, new = run(("fix-hand", 0.8))
    assert new > 0  # the first batch with one adapter compiles that variant once
    two, new = run(("fix-hand", 0.8), ("sketch", 1.0))
    for loras, want in [((("sketch", 1.0),), None), ((), base), ((("fix-hand", 0.8),), one),
                        ((("sketch", -1.0), ("fix-hand", 2.0)), None), ((("fix-hand", 0.8), ("sketch", 1.0)), two)]:
        pixels, new = run(*loras)
        assert new == 0, f"recompiled for {loras}"
        if want is not None:
            assert np.array_equal(pixels, want)
    assert compiled.adapters.hotswap and compiled.adapters.swaps >= 5
    torch._dynamo.reset()


def _dit_with_adapters(rank, mesh, lora_dir, choices):  # noqa: ANN001 - one rank of run_spmd (mesh None: alone)
    import torch

    from step1x_edit.models import presets
    from step1x_edit.models.lora_adapters import LoraAdapters, LoraLibrary
    from step1x_edit.models.parallel import Degrees, parallelize_dit
    from step1x_edit.pipeline import sampling

    dit = presets.build_dev_dit(0)
    if mesh is not None:
        parallelize_dit(dit, Degrees(cfg=2), mesh)
    adapters = LoraAdapters(dit, LoraLibrary(lora_dir, presets.DEV_DIT), 8, 4)
    g = torch.Generator().manual_seed(0)
    tgt, ref = torch.randn(2, 16, 8, 12, generator=g), torch.randn(2, 16, 8, 12, generator=g)
    img = torch.cat([sampling.pack(tgt), sampling.pack(ref)], 1)
    ids = torch.cat([sampling.image_ids(8, 12), sampling.image_ids(8, 12, reference=True)])
    emb = torch.randn(2, 7, presets.DEV_DIT.connector.in_channels, generator=g)
    t = torch.tensor([0.7, 0.7])
    with torch.inference_mode():
        out = []
        for plan in choices:
            with adapters.applied(plan):
                out.append(dit(img, ids, torch.zeros(7, 3), t, emb, t, torch.ones(2, 7)))
    return out


@pytest.mark.slow  # (two spawned ranks: ~30 s on a busy 2-core machine)
def test_cfg_parallel_ranks_apply_the_same_adapters(tmp_path):
    """Two CFG-parallel ranks (Gloo on the CPU), each with its own adapters, in step: as one process."""
    from step1x_edit.models.parallel import Degrees
    from step1x_edit.pipeline.parallel import run_spmd

    loras = dev_preset_loras(tmp_path / "loras")
    plans = [[], [("fix-hand", 0.8)], [("fix-hand", 0.8), ("sketch", -1.0)], []]
    alone = _dit_with_adapters(0, None, loras, plans)
    together = run_spmd(Degrees(cfg=2), _dit_with_adapters, (loras, plans))
    for a, b in zip(alone, together):
        assert (a - b).abs().max() <= 1e-5
    assert (alone[1] - alone[0]).abs().max() > 1e-2 and (alone[3] - alone[0]).abs().max() == 0


def test_sequence_parallelism_with_adapters_is_refused_before_any_rank_starts(tmp_path):
    from step1x_edit.pipeline.parallel import startup_problems

    bad = startup_problems(Settings(preset="dev", device="cpu", lora_dir=tmp_path, ulysses_degree=2))
    assert any("lora_dir cannot be combined with ulysses_degree / ring_degree" in b for b in bad)
    assert startup_problems(Settings(preset="dev", device="cpu", lora_dir=tmp_path, cfg_parallel=2)) == []
