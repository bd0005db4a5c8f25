"""`step1x-edit download` against a local directory laid out as the Hugging Face hub cache (no network: the
tests run with HF_HUB_OFFLINE=1), and the server finding the weights there by default."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import layout_fixtures as LF  # noqa: E402
from step1x_edit import download as D  # noqa: E402
from step1x_edit.models import layouts as L  # noqa: E402
from step1x_edit.settings import Settings  # noqa: E402

pytestmark = pytest.mark.timeout(120)
DIT = "step1x-edit-v1p1-official.safetensors"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    import huggingface_hub.constants as C

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)  # read at import time by huggingface_hub
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for var in ("STEP1X_MODEL_DIR", "STEP1X_DIT_PATH", "STEP1X_VAE_PATH", "STEP1X_ENCODER_PATH", "STEP1X_PRESET",
                "STEP1X_HF_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny model's official files and a Qwen2.5-VL directory, built once."""
    d = tmp_path_factory.mktemp("files")
    model, vae = LF.tiny_dit("v1.1"), LF.tiny_vae()
    return {
        "dit": LF.write_official_dit(model, d / DIT),
        "vae": LF.write_official_vae(vae, d / "vae.safetensors"),
        "encoder": LF.write_encoder(d / "Qwen2.5-VL-7B-Instruct"),
        "model": model,
        "vae_model": vae,
    }


def _hub(tmp_path: Path, files, tree: bool = True) -> Path:
    cache = tmp_path / "hub"
    LF.cache_repo(cache, L.STEP1X_REPO, {DIT: files["dit"], "vae.safetensors": files["vae"]}, tree=tree)
    LF.cache_folder(cache, L.ENCODER_REPO, files["encoder"], commit="b" * 40, tree=tree)
    return cache


def _args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    D.add_download_arguments(parser)
    argv = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    return parser.parse_args(argv)


def test_download_resolves_and_verifies_from_the_cache(tmp_path, files, capsys):
    _hub(tmp_path, files)
    assert D.run_download(_args()) == 0
    out = capsys.readouterr()
    assert out.err.count("ok: ") == 2 and "sizes match the hub's file listing" in out.err
    assert "step1x-edit serve" in out.out
    assert D.run_download(_args(verify_hash=True)) == 0  # sha256 against the listing


def test_server_finds_the_weights_in_the_cache_by_default(tmp_path, files):
    from step1x_edit.pipeline.edit import build_pipeline

    _hub(tmp_path, files)
    settings = Settings(device="cpu", size_level=256)  # no paths: HF_HUB_CACHE is the only hint
    assert L.resolve_preset(settings) == "full"
    plan = L.resolve_weights(settings)
    assert plan.dit.path.name == DIT and plan.sources["dit"].startswith("the Hugging Face cache")
    assert plan.encoder.path.name == "b" * 40  # the Qwen snapshot folder
    pipe = build_pipeline(settings)
    assert pipe.preset == "full" and pipe.version == "v1.1"
    assert L.resolve_preset(Settings(hf_cache=False)) == "dev"


def test_truncated_blob_is_caught_against_the_hub_size(tmp_path, files, capsys):
    cache = _hub(tmp_path, files)
    blob = LF.blob_of(L.repo_folder(cache, L.STEP1X_REPO) / "snapshots" / ("a" * 40) / DIT)
    blob.write_bytes(blob.read_bytes()[:-1000])
    assert D.run_download(_args(no_encoder=True)) == 1
    err = capsys.readouterr().err
    assert f"{DIT}: {files['dit'].stat().st_size - 1000} bytes, the hub says {files['dit'].stat().st_size}" in err


def test_truncated_file_without_listing_is_caught_by_its_header(tmp_path, files, capsys):
    cache = _hub(tmp_path, files, tree=False)
    blob = LF.blob_of(L.repo_folder(cache, L.STEP1X_REPO) / "snapshots" / ("a" * 40) / DIT)
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    assert D.run_download(_args(no_encoder=True)) == 1
    assert "truncated" in (err := capsys.readouterr().err) and DIT in err and "tensor '" in err


def test_same_size_corruption_is_caught_by_the_hash(tmp_path, files, capsys):
    cache = _hub(tmp_path, files)
    blob = LF.blob_of(L.repo_folder(cache, L.STEP1X_REPO) / "snapshots" / ("a" * 40) / "vae.safetensors")
    LF.replace_tensor_bytes(blob, "decoder.conv_out.weight", 0x11)
    assert D.run_download(_args(no_encoder=True)) == 0  # sizes and headers are fine
    assert D.run_download(_args(no_encoder=True, verify_hash=True)) == 1
    assert "vae.safetensors: sha256" in capsys.readouterr().err


def test_half_downloaded_blob_is_reported_as_interrupted(tmp_path, files, capsys):
    cache = _hub(tmp_path, files)
    link = L.repo_folder(cache, L.STEP1X_REPO) / "snapshots" / ("a" * 40) / DIT
    blob = LF.blob_of(link)
    blob.rename(blob.with_name(blob.name + ".incomplete"))
    assert D.run_download(_args(no_encoder=True)) == 1
    err = capsys.readouterr().err
    assert DIT in err and "interrupted" in err and ".incomplete" in err
    # the server does not pick the partial file up, and says so when asked for the full model
    with pytest.raises(L.WeightsError, match=r"missing dit.*interrupted download in the cache"):
        L.resolve_weights(Settings(preset="full"))


def test_nothing_in_the_cache_offline(tmp_path, capsys):
    assert D.run_download(_args()) == 1
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_refused_versions_and_layouts(capsys):
    assert D.run_download(_args(version="v1.2")) == 2
    assert "v1.2" in (err := capsys.readouterr().err) and "not implemented yet" in err
    assert D.run_download(_args(version="v1.0", layout="diffusers")) == 2
    assert "no diffusers-style repository for v1.0" in capsys.readouterr().err


def test_plan_names_the_published_files():
    jobs = D.plan_jobs("v1.0", "official")
    assert jobs[0].repo_id == "stepfun-ai/Step1X-Edit" and jobs[0].patterns == ["step1x-edit-i1258.safetensors", "vae.safetensors"]
    assert jobs[1].repo_id == "Qwen/Qwen2.5-VL-7B-Instruct" and "*.safetensors" in jobs[1].patterns
    (job,) = D.plan_jobs("v1.1", "diffusers")
    assert job.repo_id == "stepfun-ai/Step1X-Edit-v1p1-diffusers" and "text_encoder/*" in job.patterns


def test_dir_download_checked_offline_and_found_by_model_dir(tmp_path, files, capsys):
    out = tmp_path / "weights"
    out.mkdir()
    shutil.copy(files["dit"], out / DIT)
    shutil.copy(files["vae"], out / "vae.safetensors")
    shutil.copytree(files["encoder"], out / "Qwen2.5-VL-7B-Instruct")
    assert D.run_download(_args(dir=out)) == 0
    assert f"STEP1X_MODEL_DIR={out.resolve()} step1x-edit serve" in capsys.readouterr().out
    plan = L.resolve_weights(Settings(model_dir=out))
    assert plan.dit.path == out / DIT and plan.encoder.path == out / "Qwen2.5-VL-7B-Instruct"
    (out / "vae.safetensors").unlink()
    partial = out / ".cache" / "huggingface" / "download" / "Zm9v.0123abcd.incomplete"  # huggingface_hub's partial
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 100)
    assert D.run_download(_args(dir=out, no_encoder=True)) == 1
    err = capsys.readouterr().err
    assert "vae.safetensors: missing (interrupted downloads in" in err
    with pytest.raises(L.WeightsError, match=r"vae\.safetensors: no such file \(interrupted downloads in .*--dir"):
        L.inspect_vae(out / "vae.safetensors")


def test_diffusers_repo_in_the_cache_is_found(tmp_path, files):
    root = LF.write_diffusers(files["model"], files["vae_model"], tmp_path / "src", files["encoder"])
    cache = tmp_path / "hub"
    LF.cache_folder(cache, "stepfun-ai/Step1X-Edit-v1p1-diffusers", root)
    assert D.run_download(_args(layout="diffusers")) == 0
    plan = L.resolve_weights(Settings())
    assert plan.dit.layout == "diffusers" and plan.dit.sharded and plan.vae.layout == "diffusers"
    assert plan.encoder.path == plan.dit.root
