"""The performance options on the CPU: every exact option computes the same function as the plain path (fp32,
1e-5), the step cache is invisible when off and measurable when on, offloading moves components and changes
nothing, and the golden reference check still passes with the exact options applied."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from step1x_edit import reference
from step1x_edit.models import fastpath, presets
from step1x_edit.models import vae as vae_ops
from step1x_edit.pipeline import sampling
from step1x_edit.pipeline.edit import build_pipeline
from step1x_edit.pipeline.types import EditRequest
from step1x_edit.settings import Settings

TOL = 1e-5


def _inputs(h=16, w=16, txt=24, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 2 * (h // 2) * (w // 2), 64, generator=g)
    ids = torch.cat([sampling.image_ids(h, w), sampling.image_ids(h, w, reference=True)])
    emb = torch.randn(batch, txt, presets.DEV_ENCODER_HIDDEN, generator=g)
    mask = torch.ones(batch, txt, dtype=torch.long)
    mask[-1, txt // 2 :] = 0
    t = torch.tensor([0.7] * batch)
    return img, ids, torch.zeros(txt, 3), t, emb, t, mask


def _forward(dit, inputs):
    with torch.inference_mode():
        return dit(*inputs)


def _err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module")
def plain_out():
    return _forward(presets.build_dev_dit(), _inputs())


def test_fused_qkv_same_function(plain_out):
    dit = presets.build_dev_dit()
    assert fastpath.fuse_qkv_(dit) == 4
    attn = dit.transformer_blocks[0].attn
    assert attn.fused_projections and hasattr(attn, "to_added_qkv") and not hasattr(attn, "to_q")
    assert not any(p.requires_grad for p in dit.parameters())
    err = _err(_forward(dit, _inputs()), plain_out)
    print(f"fused QKV: max abs err {err:.2e}")
    assert err <= TOL
    assert fastpath.fuse_qkv_(dit) == 0  # idempotent


@pytest.mark.parametrize("backend", ["math", "native"])
def test_attention_backend_same_function(plain_out, backend):
    dit = presets.build_dev_dit()
    try:
        fastpath.set_attention_backend_(dit, backend)
        out = _forward(dit, _inputs())
    except RuntimeError as e:  # e.g. a CUDA-only kernel on the CPU
        pytest.skip(reason=f"{backend} not usable on this machine: {e}")
    err = _err(out, plain_out)
    print(f"attention {backend}: max abs err {err:.2e}")
    assert err <= TOL


def test_unknown_attention_backend_and_missing_packages_fail_clearly():
    with pytest.raises(ValueError, match="attention_backend"):
        fastpath.resolve_attention_backend("fastest-please")
    assert fastpath.resolve_attention_backend("cudnn") == "_native_cudnn"
    with pytest.raises(ValueError, match="attention_backend"):
        build_pipeline(Settings(preset="dev", device="cpu", attention_backend="nope"))


def test_fused_qkv_keeps_float8_stored_weights(plain_out):
    """With the loader's `dit_fp8` (weights stored as float8_e4m3fn in FP8Linear), fusing concatenates the float8
    weights as they are: same outputs as the unfused float8 model, nothing upcast in memory."""
    from step1x_edit.models.weights import FP8Linear, use_fp8_linears_

    def fp8_dit():
        dit = presets.build_dev_dit()
        with torch.no_grad():
            for name, module in dit.named_modules():
                if isinstance(module, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_")):
                    module.weight = torch.nn.Parameter(module.weight.to(torch.float8_e4m3fn), requires_grad=False)
        use_fp8_linears_(dit)
        return dit

    unfused = _forward(fp8_dit(), _inputs())
    dit = fp8_dit()
    fastpath.fuse_qkv_(dit)
    qkv = dit.transformer_blocks[0].attn.to_qkv
    assert type(qkv) is FP8Linear and qkv.weight.dtype == torch.float8_e4m3fn
    assert _err(_forward(dit, _inputs()), unfused) <= TOL
    # fp8_dynamic starts by upcasting such storage back to plain Linears, exactly
    assert fastpath._upcast_fp8_storage_(dit, torch.float32) > 0
    assert type(dit.transformer_blocks[0].attn.to_qkv) is torch.nn.Linear
    assert _err(_forward(dit, _inputs()), unfused) <= TOL


def test_fp8_without_torchao_or_gpu_is_a_clear_error():
    dit = presets.build_dev_dit()
    with pytest.raises(RuntimeError, match="torchao|CUDA"):
        fastpath.quantize_fp8_(dit, "cpu")


def test_vae_channels_last_fp32_same_function():
    vae = presets.build_dev_vae()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 64, 48, generator=g) * 2 - 1
    z = torch.randn(1, 16, 8, 6, generator=g)
    with torch.inference_mode():
        moments, image = vae_ops.encode_moments(vae, x), vae_ops.decode(vae, z)
        fastpath.vae_fast_(vae, bf16=False, channels_last=True)
        assert vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        e1 = _err(vae_ops.encode_moments(vae, x), moments)
        e2 = _err(vae_ops.decode(vae, z), image)
    print(f"VAE channels_last: encode max abs err {e1:.2e}, decode {e2:.2e}")
    assert e1 <= TOL and e2 <= TOL


# --- whole pipeline ----------------------------------------------------------------------------------------------


def _image(w=96, h=64, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _req(**kw):
    base = dict(image=_image(), prompt="add a hat", steps=3, seed=11, strength=1.0, guidance_scale=4.0)
    base.update(kw)
    return EditRequest(**base)


@pytest.fixture(scope="module")
def plain_pipe():
    return build_pipeline(Settings(preset="dev", size_level=256, device="cpu"))


@pytest.fixture(scope="module")
def plain_result(plain_pipe):
    (res,) = plain_pipe.run([_req()])
    return res


def _pixels(res) -> np.ndarray:
    return np.asarray(res.images[0], dtype=np.int64)


def test_defaults_touch_nothing(plain_pipe):
    assert isinstance(plain_pipe.dit, type(presets.build_dev_dit()))
    assert plain_pipe.step_cache is None and plain_pipe.offload is None
    assert not getattr(plain_pipe.dit.transformer_blocks[0].attn, "fused_projections", False)
    assert fastpath.describe(plain_pipe) == {}


def test_exact_options_together_give_the_same_edit(plain_result):
    pipe = build_pipeline(Settings(preset="dev", size_level=256, device="cpu", fuse_qkv=True,
                                   attention_backend="math", vae_channels_last=True))
    assert fastpath.describe(pipe) == {"fuse_qkv": True, "attention_backend": "math", "vae_channels_last": True}
    (res,) = pipe.run([_req()])
    diff = np.abs(_pixels(res) - _pixels(plain_result)).max()
    print(f"exact options, whole edit: max pixel diff {diff}")
    assert diff <= 1  # uint8 rounding of values equal to ~1e-6


def test_offload_moves_components_in_order_and_changes_nothing(plain_result):
    pipe = build_pipeline(Settings(preset="dev", size_level=256, device="cpu", offload="model"))
    (res,) = pipe.run([_req()])
    assert pipe.offload.loads == ["vae", "encoder", "dit", "vae"]  # encode, condition, denoise, decode
    assert np.array_equal(_pixels(res), _pixels(plain_result))


def test_offload_hooks_load_on_call_and_come_off():
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    expected = (a(x), b(x))
    off = fastpath.ComponentOffload("cpu", "cpu")  # device-agnostic: CPU -> CPU still runs every hook
    off.add("a", a, [a])
    off.add("b", b, [b])
    assert torch.equal(b(x), expected[1]) and torch.equal(a(x), expected[0]) and torch.equal(a(x), expected[0])
    assert off.loads == ["b", "a"] and off.resident == "a"
    off.remove()
    b(x)
    assert off.loads == ["b", "a"]


def test_step_cache_off_is_not_even_a_wrapper():
    pipe = build_pipeline(Settings(preset="dev", size_level=256, device="cpu", step_cache_threshold=0.0))
    assert pipe.step_cache is None and not isinstance(pipe.dit, fastpath.FirstBlockCache)


def _denoise_case(steps=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    x, ref = torch.randn(1, 64, 64, generator=g), torch.randn(1, 64, 64, generator=g)
    emb = torch.randn(1, 24, presets.DEV_ENCODER_HIDDEN, generator=g)
    ones = torch.ones(1, 24, dtype=torch.long)
    cond = sampling.Conditioning(emb, ones, emb * 0, ones)
    ids, ref_ids = sampling.image_ids(16, 16), sampling.image_ids(16, 16, reference=True)

    def run(model):
        with torch.inference_mode():
            return sampling.denoise(model, x, ref, ids, ref_ids, cond, sampling.get_schedule(steps, 64), 3.0, 0.93)

    return run


def test_step_cache_that_never_skips_is_bit_identical():
    dit = presets.build_dev_dit()
    inputs = _inputs()
    cached = fastpath.FirstBlockCache(dit, threshold=1e-30)
    assert torch.equal(_forward(cached, inputs), _forward(dit, inputs))
    run = _denoise_case()
    assert torch.equal(run(cached), run(dit))
    assert cached.stats.calls == 6 and cached.stats.skipped == 0 and len(cached.stats.decisions) == 5
    assert cached.cfg is dit.cfg and cached.connector is dit.connector  # stands in for the DiT


def test_step_cache_on_skips_steps_with_a_measured_deviation():
    dit, steps = presets.build_dev_dit(), 10
    run = _denoise_case(steps)
    exact = run(dit)
    probe = fastpath.FirstBlockCache(dit, threshold=1e-30)
    run(probe)
    changes = sorted(probe.stats.decisions)
    # A threshold in the middle of this random model's per-step changes: some steps skipped, not all.
    cached = fastpath.FirstBlockCache(dit, threshold=changes[len(changes) // 2] * 1.001)
    out = run(cached)
    stats = cached.stats
    rel = ((out - exact).norm() / exact.norm()).item()
    print(f"step cache threshold {cached.threshold:.3f} (random dev DiT, {steps} steps, CFG): skipped "
          f"{stats.skipped}/{stats.calls}, final latent relative L2 deviation {rel:.3f}; "
          f"uncached per-step relative L1 changes {[round(c, 3) for c in changes]}")
    assert 0 < stats.skipped < stats.calls == steps
    assert 0 < rel < 1
    run(cached)  # a new denoise call starts fresh: its first step runs in full
    assert cached.stats.calls == steps and cached.total.calls == 2 * steps


def test_step_cache_setting_wraps_the_pipeline_dit():
    pipe = build_pipeline(Settings(preset="dev", size_level=256, device="cpu", step_cache_threshold=1.0))
    assert isinstance(pipe.dit, fastpath.FirstBlockCache) and pipe.step_cache is pipe.dit
    (res,) = pipe.run([_req(steps=4)])
    info = fastpath.describe(pipe)
    assert info["step_cache_calls"] == 4 and info["step_cache_skipped_fraction"] == pipe.step_cache.stats.skipped / 4
    assert res.images[0].size == (96, 64)


def test_warmup_runs_one_step_per_size(plain_pipe):
    took = fastpath.warmup(plain_pipe, [256, 320], steps=1)
    assert set(took) == {256, 320} and all(t > 0 for t in took.values())


# --- golden reference with the exact options ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-a-v1p1", pytest.param("tiny-a", marks=pytest.mark.slow)])
def test_golden_reference_passes_with_the_exact_options(golden_dir, monkeypatch, name):
    load_dit, load_vae = reference.load_dit, reference.load_vae

    def fast_dit(*a, **kw):
        dit, version = load_dit(*a, **kw)
        fastpath.fuse_qkv_(dit)
        fastpath.set_attention_backend_(dit, "math")
        return dit, version

    def fast_vae(*a, **kw):
        return fastpath.vae_fast_(load_vae(*a, **kw), bf16=False, channels_last=True)

    monkeypatch.setattr(reference, "load_dit", fast_dit)
    monkeypatch.setattr(reference, "load_vae", fast_vae)
    results = reference.check_reference(golden_dir / name)
    worst = max(r.max_err for r in results if r.max_err is not None)
    print(f"{name} with fused QKV + math attention + VAE channels_last: worst max err {worst:.2e}")
    assert [r for r in results if r.status != "ok"] == []


@pytest.mark.slow
def test_golden_reference_passes_with_the_step_cache_off_wrapper(golden_dir, monkeypatch):
    load_dit = reference.load_dit

    def wrapped(*a, **kw):
        dit, version = load_dit(*a, **kw)
        return fastpath.FirstBlockCache(dit, threshold=1e-30), version

    monkeypatch.setattr(reference, "load_dit", wrapped)
    results = reference.check_reference(golden_dir / "tiny-a-v1p1")
    assert [r for r in results if r.status != "ok"] == []


@pytest.mark.slow
def test_regional_compile_same_function(plain_out):
    dit = presets.build_dev_dit()
    fastpath.fuse_qkv_(dit)
    torch._dynamo.reset()
    assert fastpath.compile_blocks_(dit, fullgraph=True) == 4  # no graph breaks inside the blocks
    err = _err(_forward(dit, _inputs()), plain_out)
    err2 = _err(_forward(dit, _inputs(h=24, w=16)), _forward(presets.build_dev_dit(), _inputs(h=24, w=16)))
    print(f"regional compile (+ fused QKV): max abs err {err:.2e}, second shape {err2:.2e}")
    assert err <= TOL and err2 <= TOL


@pytest.mark.slow
def test_compile_option_with_warmup_in_the_pipeline(plain_result):
    pipe = build_pipeline(Settings(preset="dev", size_level=256, device="cpu", compile=True, fuse_qkv=True))
    (res,) = pipe.run([_req()])
    assert np.abs(_pixels(res) - _pixels(plain_result)).max() <= 1


# --- settings and flags ------------------------------------------------------------------------------------------


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("STEP1X_FUSE_QKV", "true")
    monkeypatch.setenv("STEP1X_STEP_CACHE_THRESHOLD", "0.08")
    monkeypatch.setenv("STEP1X_COMPILE_WARMUP_SIZES", "[512, 1024]")
    monkeypatch.setenv("STEP1X_OFFLOAD", "model")
    opts = fastpath.PerfOptions.from_settings(Settings())
    assert opts.fuse_qkv and opts.step_cache_threshold == 0.08 and opts.offload == "model"
    assert opts.compile_warmup_sizes == (512, 1024)
    assert fastpath.PerfOptions.from_settings(Settings(fuse_qkv=False)).changes() == {
        "step_cache_threshold": 0.08, "compile_warmup_sizes": (512, 1024), "offload": "model"}


def test_cli_flags_map_onto_settings():
    p = argparse.ArgumentParser()
    fastpath.add_performance_arguments(p)
    args = p.parse_args(["--fuse-qkv", "--no-compile", "--attention-backend", "cudnn", "--offload", "model",
                         "--step-cache-threshold", "0.1", "--compile-warmup-sizes", "512,768", "--fp8-dynamic"])
    given = fastpath.performance_overrides(args)
    assert given == {"fuse_qkv": True, "compile": False, "attention_backend": "cudnn", "offload": "model",
                     "step_cache_threshold": 0.1, "compile_warmup_sizes": [512, 768], "fp8_dynamic": True}
    assert {k: v for k, v in vars(args).items() if v is not None} == given  # dest = the Settings field
    s = Settings(**given)
    assert s.fuse_qkv and s.offload == "model" and s.compile_warmup_sizes == [512, 768] and s.fp8_dynamic
    assert fastpath.performance_overrides(p.parse_args([])) == {}
    serve = argparse.ArgumentParser()
    fastpath.add_performance_arguments(serve, prefix="serve_")  # for cli_serve's `serve_<field>` convention
    assert fastpath.performance_overrides(serve.parse_args(["--vae-bf16"]), prefix="serve_") == {"vae_bf16": True}
    assert set(fastpath.PERF_FIELDS) <= set(Settings.model_fields)
