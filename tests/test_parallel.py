"""One request on several ranks (CFG-parallel, Ulysses, ring), run for real with Gloo on this machine's CPU: two
(or four) spawned processes, the pytest process being rank 0.

Every mode must reproduce the single-process result: the DiT call (even and uneven token splits, odd batches), the
golden reference cases within their tolerances (`check-reference`), and a seeded dev-preset edit (the decoded image
within 1e-5 of the single-process one). Impossible degrees are refused before any rank
starts. The server with `--cfg-parallel 2` and what happens when a rank dies: tests/test_parallel_serve.py.
"""

from __future__ import annotations

import sys

import pytest
import torch
from PIL import Image

from step1x_edit.cli import main as cli_main
from step1x_edit.models import presets
from step1x_edit.models.parallel import Degrees, build_mesh, parallelize_dit, problems
from step1x_edit.pipeline import sampling
from step1x_edit.pipeline.parallel import ParallelEditPipeline, run_spmd
from step1x_edit.pipeline.types import EditRequest
from step1x_edit.settings import Settings

MODES = {"cfg": Degrees(cfg=2), "ulysses": Degrees(ulysses=2), "ring": Degrees(ring=2)}
# (latent h, latent w, text tokens, batch): even splits; odd text tokens (uneven: diffusers' "anything" split);
# two image tokens and three text tokens; an odd batch (CFG-parallel: the whole batch on every rank)
CALLS = [(12, 16, 10, 2), (6, 10, 9, 2), (2, 2, 3, 2), (6, 6, 8, 3)]


def _dit_inputs(h: int, w: int, n_txt: int, batch: int) -> tuple:
    g = torch.Generator().manual_seed(h * 100 + n_txt)
    tgt, ref = torch.randn(batch, 16, h, w, generator=g), torch.randn(batch, 16, h, w, generator=g)
    img = torch.cat([sampling.pack(tgt), sampling.pack(ref)], 1)
    ids = torch.cat([sampling.image_ids(h, w), sampling.image_ids(h, w, reference=True)])
    emb = torch.randn(batch, n_txt, presets.DEV_DIT.connector.in_channels, generator=g)
    mask = torch.ones(batch, n_txt)
    mask[-1, n_txt // 2:] = 0  # a padded prompt: the connector's masked mean must see the whole prompt
    t = torch.linspace(0.9, 0.3, batch)
    return img, ids, torch.zeros(n_txt, 3), t, emb, t, mask


def _dit_outputs(rank: int, mesh, modes: list[str]) -> dict[str, list[torch.Tensor]]:
    out = {}
    for name in modes:
        dit = presets.build_dev_dit(0)
        if mesh is not None:
            degrees = MODES[name]
            parallelize_dit(dit, degrees, build_mesh(degrees, "cpu"))
        with torch.inference_mode():
            out[name] = [dit(*_dit_inputs(*call)) for call in CALLS]
    return out


def test_dit_call_matches_one_process_in_each_mode():
    """One group of two ranks, the three modes in turn (a mesh each): every call as in one process (≤ 1e-5)."""
    want = _dit_outputs(0, None, ["cfg"])["cfg"]
    got = run_spmd(Degrees(cfg=2), _dit_outputs, (list(MODES),))
    for name, outs in got.items():
        for call, a, b in zip(CALLS, outs, want, strict=True):
            assert a.shape == b.shape
            err = (a - b).abs().max().item()
            assert err <= 1e-5, f"{name} {call}: {err:.2e}"


def test_impossible_degrees_are_refused_with_a_message():
    one = dict(heads=24, device_type="cpu", device_count=0)
    assert problems(Degrees(), **one) == [] and problems(Degrees(cfg=2, ulysses=4, ring=2), **one) == []
    assert "does not divide the DiT's 24 attention heads" in problems(Degrees(ulysses=5), **one)[0]
    assert "need 4 GPUs, this machine shows 2" in problems(Degrees(cfg=2, ulysses=2), heads=24, device_type="cuda",
                                                           device_count=2)[0]
    assert "bfloat16 or float16" in problems(Degrees(ring=2), heads=24, device_type="cuda", device_count=2,
                                             dtype="float32")[0]
    assert "CUDA_VISIBLE_DEVICES" in problems(Degrees(ring=2), heads=24, device_type="cuda", device_count=2,
                                              device="cuda:1")[0]
    assert "skip" in problems(Degrees(cfg=2), **one, step_cache="first_block")[0]
    assert "use native" in problems(Degrees(ring=2), **one, attention_backend="math")[0]
    assert problems(Degrees(cfg=2), **one, attention_backend="math") == []  # CFG-parallel splits rows, not tokens
    with pytest.raises(ValueError, match="less than or equal to 2"):
        Settings(cfg_parallel=3)


def test_commands_refuse_before_starting_ranks(tmp_path, capsys):
    """The dev DiT has 4 heads: Ulysses 3 cannot split them; `serve` and `edit` say so and exit 2 at once."""
    assert cli_main(["serve", "--preset", "dev", "--device", "cpu", "--ulysses-degree", "3",
                     "--storage-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "impossible parallel settings" in err and "does not divide the DiT's 4 attention heads" in err
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(image)
    assert cli_main(["edit", str(image), "x", "-o", str(tmp_path / "o.png"), "--preset", "dev", "--device", "cpu",
                     "--cfg-parallel", "2", "--step-cache", "first_block"]) == 2
    assert "step_cache 'first_block' cannot run on several ranks" in capsys.readouterr().err


@pytest.mark.parametrize("mode", [
    pytest.param("cfg"),
    pytest.param("ulysses", marks=pytest.mark.slow),
    pytest.param("ring", marks=pytest.mark.slow),
])
def test_check_reference_on_two_ranks(golden_dir, capsys, mode):
    """`check-reference` on both golden directories with two Gloo ranks: every case within its tolerance."""
    flag = {"cfg": "--cfg-parallel", "ulysses": "--ulysses-degree", "ring": "--ring-degree"}[mode]
    dirs = [str(golden_dir / "tiny-a"), str(golden_dir / "tiny-a-v1p1")]
    assert cli_main(["check-reference", flag, "2", *dirs]) == 0
    out = capsys.readouterr().out
    print(out)
    assert out.count("0 failed") == 2 and "9 passed" in out and "10 passed" in out
    assert "2 ranks, CPU processes, Gloo" in out and "denoise_cfg6_10steps_negprefix10" in out


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--ulysses-degree", "2", "--ring-degree", "2"],
                                   ["--cfg-parallel", "2", "--ring-degree", "2"]])
def test_check_reference_on_four_ranks(golden_dir, capsys, flags):
    """Ulysses x ring (the 8x8 case's 10 text tokens do not split in four: that call runs whole), CFG x ring."""
    assert cli_main(["check-reference", *flags, str(golden_dir / "tiny-a-v1p1")]) == 0
    out = capsys.readouterr().out
    assert "10 passed, 0 failed" in out and "4 ranks" in out


def _seeded_edit(pipe, vae, examples_dir) -> tuple[list[Image.Image], torch.Tensor, torch.Tensor]:
    """A seeded two-image edit through `pipe.run`; with the output images, the latent the VAE decodes and the decoded
    image as float tensors (observed with a forward hook on the decoder of `vae`, rank 0's)."""
    seen = {}

    def keep(module, args, output):
        seen["latent"], seen["image"] = args[0].detach().clone(), output.detach().clone()

    handle = vae.decoder.register_forward_hook(keep)
    try:
        req = EditRequest(image=Image.open(examples_dir / "0003.png"), prompt="Change image to anime style",
                          negative_prompt="blurry", n=2, steps=3, seed=7, size_level=256)
        (res,) = pipe.run([req])
    finally:
        handle.remove()
    assert res.seeds == [7, 8]
    return res.images, seen["latent"], seen["image"]


@pytest.fixture(scope="module")
def one_process_edit(examples_dir):
    from step1x_edit.pipeline.edit import build_pipeline

    pipe = build_pipeline(Settings(preset="dev", device="cpu", size_level=256))
    return _seeded_edit(pipe, pipe.vae, examples_dir)


@pytest.mark.parametrize("mode", [
    pytest.param("cfg"),
    pytest.param("ulysses", marks=pytest.mark.slow),
    pytest.param("ring", marks=pytest.mark.slow),
])
def test_seeded_dev_edit_matches_one_process(examples_dir, one_process_edit, mode):
    """The pipeline `serve` and `edit` use on two ranks (rank 0 here, one spawned worker): the same decoded image
    as one process (≤ 1e-5) and final latent, so the PNGs differ at most by one level in a few values."""
    d = MODES[mode]
    settings = Settings(preset="dev", device="cpu", size_level=256, cfg_parallel=d.cfg, ulysses_degree=d.ulysses,
                        ring_degree=d.ring)
    pipe = ParallelEditPipeline(settings)
    try:
        assert pipe.info()["parallel"] == d.describe() and len(pipe.worker_pids) == 1
        images, latent, decoded = _seeded_edit(pipe, pipe.local.vae, examples_dir)
    finally:
        pipe.close()
    want_images, want_latent, want_decoded = one_process_edit
    # The decoded image (in [-1, 1]) within 1e-5; the latent (|values| up to ~15 with the dev weights) within 1e-6
    # of its largest value. Measured: 5e-6 and 1.3e-5 (9e-7 relative) in each mode; the same single-process edit on
    # 1 thread instead of 2 differs from itself by 4.4e-6 and 9.5e-6: float32 rounding, nothing more.
    assert (decoded - want_decoded).abs().max().item() <= 1e-5
    assert (latent - want_latent).abs().max().item() <= 1e-6 * want_latent.abs().max().item()
    for a, b in zip(images, want_images, strict=True):
        diff = (torch.tensor(list(a.tobytes())) - torch.tensor(list(b.tobytes()))).abs()
        assert diff.max().item() <= 1 and (diff > 0).float().mean().item() < 1e-3



@pytest.mark.slow
def test_a_failed_start_up_stops_every_rank_at_once(tmp_path):
    """Weights that do not load: the error names the file, and no worker rank is left behind (none waits for the
    timeout)."""
    import time

    import psutil

    settings = Settings(preset="full", dit_path=tmp_path / "missing.safetensors", vae_path=tmp_path / "vae.safetensors",
                        encoder_path=tmp_path, device="cpu", cfg_parallel=2, parallel_timeout_s=120)
    start = time.monotonic()
    with pytest.raises((FileNotFoundError, ValueError, RuntimeError), match="missing.safetensors"):
        ParallelEditPipeline(settings)
    assert time.monotonic() - start < 60
    assert not [c for c in psutil.Process().children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]


def test_the_projection_counts_what_each_mode_sends():
    """bench/parallel_projection.py: the bytes per step follow the collectives the code makes, and its H800 row is
    calibrated on the official one-GPU time."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "parallel_projection.py"
    spec = importlib.util.spec_from_file_location("parallel_projection", path)
    proj = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = proj  # (its dataclasses look their module up)
    spec.loader.exec_module(proj)
    n_img, s = proj.tokens()
    d, blocks = 3072, 57
    out = 2 * n_img * 64 * 2  # the gathered prediction, bf16
    assert proj.comm_per_rank(Degrees(cfg=2)) == (out / 2, 2)  # one half exchanged, plus the stop flag
    qkvo = blocks * 4 * 2 * (s / 4) * d * 2 * 3 / 4  # Ulysses 4: q, k, v, out of S/4 tokens, 3/4 leave the rank
    assert proj.comm_per_rank(Degrees(ulysses=4))[0] == pytest.approx(qkvo + out * 3 / 4)
    kv = blocks * 2 * 2 * (s / 4) * d * 2 * 3  # ring 4: k and v of the three other ranks
    assert proj.comm_per_rank(Degrees(ring=4))[0] == pytest.approx(kv + out * 3 / 4)
    assert proj.comm_per_rank(Degrees(ulysses=2))[0] == pytest.approx(proj.comm_per_rank(Degrees(ring=2))[0])
    h800 = proj.h800_tflops()
    assert proj.NON_DIT_S + proj.STEPS * proj.step_ms(Degrees(), h800, proj.LINKS["H800 NVLink"])[2] / 1e3 == \
        pytest.approx(proj.OFFICIAL_S[1])
