"""The performance options on the CPU: every exact option computes the same function as the plain path (fp32,
1e-5), the step cache is invisible when off and measurable when on, offloading moves components and changes
nothing, and the golden reference check still passes with the exact options applied."""

from __future__ import annotations

import argparse
import dataclasses

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


def _fp8_dev_dit():
    """The dev DiT with its block Linears stored in float8 (as `dit_fp8` loads them), behind FP8Linear."""
    from step1x_edit.models.weights import use_fp8_linears_

    dit = presets.build_dev_dit()
    with torch.no_grad():
        for name, module in dit.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_")):
                module.weight = torch.nn.Parameter(module.weight.to(torch.float8_e4m3fn), requires_grad=False)
    use_fp8_linears_(dit)
    return dit

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
    from step1x_edit.models.weights import FP8Linear

    unfused = _forward(_fp8_dev_dit(), _inputs())
    dit = _fp8_dev_dit()
    fastpath.fuse_qkv_(dit)
    qkv = dit.transformer_blocks[0].attn.to_qkv
    assert type(qkv) is FP8Linear and qkv.weight.dtype == torch.float8_e4m3fn
    assert _err(_forward(dit, _inputs()), unfused) <= TOL


def test_float8_stored_weights_go_to_scaled_mm_as_they_are(plain_out):
    """fp8_dynamic on `dit_fp8` weights: the token-wise FP8Linears multiply in float8 (torch._scaled_mm, which the
    CPU runs too) on the stored weights, instead of upcasting the whole DiT to bf16 and re-quantising it.
    Approximate (activations quantised per row), so compared by relative error; nothing is upcast in memory."""
    dit = _fp8_dev_dit()
    upcast = _forward(dit, _inputs())
    stored = {n: p.data_ptr() for n, p in dit.named_parameters() if p.dtype == torch.float8_e4m3fn}
    n = fastpath.use_scaled_mm_(dit)
    qkv, mod = dit.transformer_blocks[0].attn.to_q, dit.transformer_blocks[0].norm1.linear
    # per double block q/k/v x 2 streams, 2 out projections, 2 x 2 feed-forward linears = 12; per single block 5
    assert n == 2 * 12 + 2 * 5 and qkv.scaled_mm and not mod.scaled_mm  # token-wise only; modulation exact
    scaled = _forward(dit, _inputs())
    rel = ((scaled - upcast).norm() / upcast.norm()).item()
    print(f"float8 matmuls on stored weights vs upcast: relative error {rel:.2e}")
    assert 0 < rel < 5e-2
    assert {n: p.data_ptr() for n, p in dit.named_parameters() if p.dtype == torch.float8_e4m3fn} == stored


def test_fp8_without_torchao_or_gpu_is_a_clear_error():
    dit = presets.build_dev_dit()
    with pytest.raises(RuntimeError, match="torchao|CUDA"):
        fastpath.quantize_fp8_(dit, "cpu")


def test_torchao_config_leaves_inductor_settings_alone():
    """torchao's `set_inductor_config=True` default switches on slow inductor tuning for the whole process, so every
    compile after an fp8 quantisation was slow (the benchmark quantised before compiling)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig
    from torchao.quantization.granularity import PerRow

    config = fastpath.fp8_config(Float8DynamicActivationFloat8WeightConfig, PerRow)
    assert config.set_inductor_config is False and all(isinstance(g, PerRow) for g in config.granularity)
    assert Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()).set_inductor_config is True  # the default


def test_fp8_dynamic_with_another_dtype_is_refused_before_loading():
    """torchao's float8 kernels take bf16 activations (fp16/fp32 tripped an assertion inside torchao at start-up):
    refused with the fix named, before any weight is loaded."""
    for dtype in ("auto", "float32", "float16"):  # auto on the CPU = float32
        with pytest.raises(ValueError, match="fp8_dynamic needs dtype bfloat16"):
            build_pipeline(Settings(preset="dev", device="cpu", dtype=dtype, fp8_dynamic=True))


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
    assert plain_pipe.step_cache is None and plain_pipe.offload is None and not plain_pipe.dit.is_cache_enabled
    assert not getattr(plain_pipe.dit.transformer_blocks[0].attn, "fused_projections", False)
    assert plain_pipe.perf.changes() == {}
    assert set(plain_pipe.info()) == {"version", "preset", "device", "dtype", "size_level"}


def test_exact_options_together_give_the_same_edit(plain_result):
    pipe = build_pipeline(Settings(preset="dev", size_level=256, device="cpu", fuse_qkv=True,
                                   attention_backend="math", vae_channels_last=True))
    assert pipe.perf.changes() == {"fuse_qkv": True, "attention_backend": "math", "vae_channels_last": True}
    assert pipe.info()["fuse_qkv"] is True
    (res,) = pipe.run([_req()])
    diff = np.abs(_pixels(res) - _pixels(plain_result)).max()
    print(f"exact options, whole edit: max pixel diff {diff}")
    assert diff <= 1  # uint8 rounding of values equal to ~1e-6


def test_offload_moves_components_in_order_and_changes_nothing(plain_result):
    pipe = build_pipeline(Settings(preset="dev", size_level=256, device="cpu", offload="model"))
    (res,) = pipe.run([_req()])
    assert pipe.offload.loads == ["vae", "encoder", "dit"]  # encode, condition, denoise; the VAE stays for decode
    assert np.array_equal(_pixels(res), _pixels(plain_result))


def test_offload_previews_never_evict_the_dit(plain_pipe):
    """A preview decode between steps uses the VAE, which stays on the device: the DiT comes in once per call
    instead of once per preview (it used to go back to the host for every preview and come again)."""
    pipe = build_pipeline(Settings(preset="dev", size_level=256, device="cpu", offload="model"))
    previews = []
    (res,) = pipe.run([_req(steps=6, partial_images=3)], on_preview=lambda j, p: previews.append(p.step))
    assert previews == sampling.preview_steps(6, 3) == [2, 3, 4]
    assert pipe.offload.loads == ["vae", "encoder", "dit"]
    (again,) = pipe.run([_req(steps=6, partial_images=3)], on_preview=lambda j, p: None)
    assert pipe.offload.loads == ["vae", "encoder", "dit", "encoder", "dit"]  # next call: encoder, then DiT again
    assert np.array_equal(_pixels(res), _pixels(again))


def test_offload_eviction_points_back_at_one_host_copy():
    """Weights never change, so eviction copies nothing back: the parameters point at the host copy made once.
    (The `meta` device stands in for the accelerator: it holds no data, so a value that survives the round
    trip can only have come from that host copy.)"""
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    weights = a.weight.detach().clone()
    off = fastpath.ComponentOffload("meta", "cpu")
    off.add("a", a, [a])
    off.add("b", b, [b])
    host_ptr = a.weight.data_ptr()
    off.load("a")
    assert a.weight.device.type == "meta" and off.resident == "a"
    off.load("b")  # a goes back: same host storage, same values
    assert a.weight.device.type == "cpu" and a.weight.data_ptr() == host_ptr and torch.equal(a.weight, weights)
    assert b.weight.device.type == "meta" and off.loads == ["a", "b"]


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


# --- step caches: diffusers' hooks on the FLUX blocks ------------------------------------------------------------


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


def _cache(dit, **options):
    return fastpath.StepCache(dit, fastpath.PerfOptions(**options))


def _first_block_changes(dit, run) -> list[float]:
    """Per step, the relative L1 change of the first block's image residual from the previous step's (what the
    first-block cache compares with its threshold), measured on the uncached model."""
    residuals = []
    hook = dit.transformer_blocks[0].register_forward_hook(
        lambda mod, args, kwargs, out: residuals.append(out[1] - kwargs["hidden_states"]), with_kwargs=True)
    run(dit)
    hook.remove()
    return [((a - b).abs().mean() / b.abs().mean()).item() for a, b in zip(residuals[1:], residuals[:-1])]


def test_step_cache_off_means_no_hooks():
    pipe = build_pipeline(Settings(preset="dev", size_level=256, device="cpu", step_cache="none"))
    assert pipe.step_cache is None and not pipe.dit.is_cache_enabled


def test_first_block_cache_that_never_skips_is_bit_identical():
    run = _denoise_case()
    exact = run(presets.build_dev_dit())
    dit = presets.build_dev_dit()
    cache = _cache(dit, step_cache="first_block", step_cache_threshold=1e-30)
    assert dit.is_cache_enabled
    assert torch.equal(run(dit), exact)
    assert (cache.calls, cache.skipped) == (6, 0)


def test_first_block_cache_skips_steps_with_a_measured_deviation():
    steps = 10
    run = _denoise_case(steps)
    dit = presets.build_dev_dit()
    exact = run(dit)
    changes = sorted(_first_block_changes(dit, run))
    # A threshold in the middle of this random model's per-step changes: some steps skipped, not all.
    threshold = changes[len(changes) // 2] * 1.001
    cache = _cache(dit, step_cache="first_block", step_cache_threshold=threshold)
    out = run(dit)
    rel = ((out - exact).norm() / exact.norm()).item()
    print(f"first-block cache threshold {threshold:.3f} (random dev DiT, {steps} steps, CFG): skipped "
          f"{cache.skipped}/{cache.calls}, final latent relative L2 deviation {rel:.3f}; "
          f"uncached per-step relative L1 changes {[round(c, 3) for c in changes]}")
    assert 0 < cache.skipped < cache.calls == steps
    assert 0 < rel < 1
    first = cache.skipped
    assert torch.equal(run(dit), out)  # a new denoise call starts fresh (state reset): the same steps again
    assert cache.calls == 2 * steps and cache.skipped == 2 * first


def test_taylorseer_predicts_steps_between_full_ones():
    steps = 8
    run = _denoise_case(steps)
    dit = presets.build_dev_dit()
    exact = run(dit)
    cache = _cache(dit, step_cache="taylorseer", step_cache_interval=3, step_cache_warmup_steps=2)
    out = run(dit)
    rel = ((out - exact).norm() / exact.norm()).item()
    print(f"TaylorSeer interval 3, warm-up 2 ({steps} steps): {cache.skipped}/{cache.calls} steps predicted, "
          f"final latent relative L2 deviation {rel:.3f}")
    assert 0 < cache.skipped < cache.calls == steps and 0 < rel
    assert torch.equal(run(dit), out)  # reset between denoise calls


def test_magcache_calibration_skips_nothing_and_ratios_skip_steps():
    steps = 6
    run = _denoise_case(steps)
    dit = presets.build_dev_dit()
    exact = run(dit)
    calibrating = _cache(dit, step_cache="magcache", step_cache_mag_ratios="calibrate")
    calibrating.begin(steps)
    assert torch.equal(run(dit), exact) and calibrating.skipped == 0
    dit.disable_cache()
    cache = _cache(dit, step_cache="magcache", step_cache_mag_ratios=",".join(["1.0"] * 10),
                   step_cache_threshold=1.0)
    cache.begin(steps)
    out = run(dit)
    print(f"MagCache, ratios 1.0, threshold 1.0: {cache.skipped}/{cache.calls} steps skipped")
    assert 0 < cache.skipped < cache.calls and not torch.equal(out, exact)
    cache.begin(steps + 2)  # another step count: the hooks are re-applied for it
    assert dit.is_cache_enabled and cache._steps == steps + 2


def test_magcache_needs_its_ratios():
    with pytest.raises(ValueError, match="step_cache_mag_ratios"):
        build_pipeline(Settings(preset="dev", size_level=256, device="cpu", step_cache="magcache"))
    with pytest.raises(ValueError, match="not a list of numbers"):
        fastpath.mag_ratios("1.0,fast")


def test_step_cache_setting_puts_the_hooks_on_the_pipeline_dit():
    pipe = build_pipeline(Settings(preset="dev", size_level=256, device="cpu", step_cache="first_block",
                                   step_cache_threshold=1.0))
    assert pipe.dit.is_cache_enabled and pipe.step_cache is not None
    (res,) = pipe.run([_req(steps=4)])
    info = pipe.info()
    assert info["step_cache"] == "first_block" and info["step_cache_calls"] == 4
    assert info["step_cache_skipped"] == pipe.step_cache.skipped > 0
    assert res.images[0].size == (96, 64)


def test_warmup_runs_one_step_per_size(plain_pipe):
    took = plain_pipe.warmup([256, 320], steps=1)
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
def test_golden_reference_passes_with_a_step_cache_that_never_skips(golden_dir, monkeypatch):
    load_dit = reference.load_dit

    def wrapped(*a, **kw):
        dit, version = load_dit(*a, **kw)
        _cache(dit, step_cache="first_block", step_cache_threshold=1e-30)
        return dit, version

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
    monkeypatch.setenv("STEP1X_STEP_CACHE", "first_block")
    monkeypatch.setenv("STEP1X_STEP_CACHE_THRESHOLD", "0.08")
    monkeypatch.setenv("STEP1X_COMPILE_WARMUP_SIZES", "[512, 1024]")
    monkeypatch.setenv("STEP1X_OFFLOAD", "model")
    opts = fastpath.PerfOptions.from_settings(Settings())
    assert opts.fuse_qkv and opts.step_cache_threshold == 0.08 and opts.offload == "model"
    assert opts.compile_warmup_sizes == (512, 1024)
    assert fastpath.PerfOptions.from_settings(Settings(fuse_qkv=False)).changes() == {
        "step_cache": "first_block", "step_cache_threshold": 0.08, "compile_warmup_sizes": (512, 1024),
        "offload": "model"}
    assert fastpath.PerfOptions.from_settings(Settings(step_cache="none")).changes().keys().isdisjoint(
        {"step_cache", "step_cache_threshold"})  # cache parameters only count with a cache


def test_cli_flags_map_onto_settings():
    from step1x_edit.cli_args import add_settings_arguments, settings_from_args
    from step1x_edit.settings import PERFORMANCE_FIELDS

    p = argparse.ArgumentParser()
    add_settings_arguments(p, ("performance",))
    args = p.parse_args(["--fuse-qkv", "--no-compile", "--attention-backend", "cudnn", "--offload", "model",
                         "--step-cache", "taylorseer", "--step-cache-interval", "4", "--compile-warmup-sizes",
                         "512,768", "--fp8-dynamic"])
    given = {k: v for k, v in vars(args).items() if v is not None}
    assert given == {"fuse_qkv": True, "compile": False, "attention_backend": "cudnn", "offload": "model",
                     "step_cache": "taylorseer", "step_cache_interval": 4, "compile_warmup_sizes": [512, 768],
                     "fp8_dynamic": True}
    s = settings_from_args(args)
    assert s.fuse_qkv and s.offload == "model" and s.compile_warmup_sizes == [512, 768] and s.fp8_dynamic
    assert {k for k, v in vars(p.parse_args([])).items()} == set(PERFORMANCE_FIELDS)
    assert {f.name for f in dataclasses.fields(fastpath.PerfOptions)} == set(PERFORMANCE_FIELDS)
    with pytest.raises(SystemExit):
        p.parse_args(["--step-cache", "teacache"])
