"""Every checkpoint layout people download loads to the same model; bad files give errors naming file and key.

One tiny model (layout_fixtures.py) is written as: the official single file (v1.0 and v1.1), the official FP8
file, the official keys sharded with an index json, and a diffusers-style directory (sharded transformer with an
index json, vae/ with config.json, text_encoder/ + processor/). All load, auto-detected, to identical DiT outputs
(FP8: within its measured quantisation error), and whole pipelines built from them give identical images.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))

import layout_fixtures as LF  # noqa: E402
from step1x_edit.models import layouts as L  # noqa: E402
from step1x_edit.models import weights as W  # noqa: E402
from step1x_edit.settings import Settings  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))  # never the user's real cache
    for var in ("STEP1X_MODEL_DIR", "STEP1X_DIT_PATH", "STEP1X_VAE_PATH", "STEP1X_ENCODER_PATH", "STEP1X_PRESET"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def tiny():
    return {"v1.1": LF.tiny_dit("v1.1"), "v1.0": LF.tiny_dit("v1.0", seed=5), "vae": LF.tiny_vae()}


@pytest.fixture(scope="module")
def ref(tiny):
    return {v: LF.dit_out(tiny[v]) for v in ("v1.0", "v1.1")}


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return LF.write_encoder(tmp_path_factory.mktemp("enc") / "Qwen2.5-VL-7B-Instruct")


@pytest.fixture(scope="module")
def ckpts(tiny, tmp_path_factory):
    """Every DiT layout of the tiny model: name -> (path given to the loader, version)."""
    d = tmp_path_factory.mktemp("ckpt")
    out = {
        "official v1.1": (LF.write_official_dit(tiny["v1.1"], d / "step1x-edit-v1p1-official.safetensors"), "v1.1"),
        "official v1.0": (LF.write_official_dit(tiny["v1.0"], d / "v10" / "step1x-edit-i1258.safetensors"), "v1.0"),
        "official sharded": (LF.write_official_sharded_dit(tiny["v1.1"], d / "sharded"), "v1.1"),
    }
    root = LF.write_diffusers(tiny["v1.1"], tiny["vae"], d / "Step1X-Edit-v1p1-diffusers")
    out["diffusers directory"] = (root, "v1.1")
    out["diffusers transformer/"] = (root / "transformer", "v1.1")
    out["diffusers index json"] = (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json", "v1.1")
    single = LF.write_diffusers(tiny["v1.1"], tiny["vae"], d / "single", sharded=False)
    out["diffusers single file"] = (single / "transformer" / "diffusion_pytorch_model.safetensors", "v1.1")
    return out


LAYOUTS = ["official v1.1", "official v1.0", "official sharded", "diffusers directory", "diffusers transformer/",
           "diffusers index json", "diffusers single file"]


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_dit_layout_loads_to_identical_outputs(name, ckpts, ref):
    path, version = ckpts[name]
    model, got = W.load_dit(path)  # everything auto-detected: layout, version, config
    assert got == version
    assert torch.equal(LF.dit_out(model), ref[version])


def test_detection_reports_layout_version_and_sharding(ckpts):
    seen = {name: L.inspect_dit(ckpts[name][0]) for name in LAYOUTS}
    assert {n: (s.layout, s.version, s.sharded) for n, s in seen.items()} == {
        "official v1.1": ("official", "v1.1", False),
        "official v1.0": ("official", "v1.0", False),
        "official sharded": ("official", "v1.1", True),
        "diffusers directory": ("diffusers", "v1.1", True),
        "diffusers transformer/": ("diffusers", "v1.1", True),
        "diffusers index json": ("diffusers", "v1.1", True),
        "diffusers single file": ("diffusers", "v1.1", False),
    }
    assert seen["diffusers directory"].config.name == "config.json"
    assert "bfloat16" in seen["official v1.1"].describe() and "official layout" in seen["official v1.1"].describe()


def test_diffusers_config_matches_inferred_config(ckpts, tiny):
    cfg = W.dit_config_from_diffusers(json.loads((ckpts["diffusers transformer/"][0] / "config.json").read_text()), "v1.1")
    inferred = W.infer_dit_config(W.open_checkpoint(ckpts["official v1.1"][0]), "v1.1")
    assert cfg == inferred == W.with_version(LF.TINY_DIT, "v1.1")


def test_vae_layouts_load_to_identical_outputs(ckpts, tiny, tmp_path):
    want = tiny["vae"].state_dict()
    official = LF.write_official_vae(tiny["vae"], tmp_path / "vae.safetensors")
    root = ckpts["diffusers directory"][0]
    loaded = {p: W.load_vae(p) for p in (official, root, root / "vae", root / "vae" / "diffusion_pytorch_model.safetensors")}
    for path, vae in loaded.items():
        got = vae.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), path
    out = LF.vae_out(tiny["vae"])
    assert torch.equal(LF.vae_out(loaded[official]), out) and torch.equal(LF.vae_out(loaded[root]), out)
    assert L.inspect_vae(official).layout == "official" and L.inspect_vae(root).layout == "diffusers"


# --------------------------------------------------------------------------------------------------------------
# FP8


def test_fp8_file_upcast_and_fp8_storage(tiny, ref, tmp_path):
    path = LF.write_official_dit(tiny["v1.1"], tmp_path / "step1x-edit-v1p1-official-fp8.safetensors", fp8=True)
    src = L.inspect_dit(path)
    assert src.fp8 and "FP8" in src.describe()
    # reference: the bf16 model with its matrices rounded through float8_e4m3fn, as the file holds them
    rounded = LF.tiny_dit("v1.1")
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.ndim == 2:
                p.copy_(p.to(torch.float8_e4m3fn).float())
    want = LF.dit_out(rounded)

    upcast, version = W.load_dit(path)  # default: upcast at load to the compute dtype
    assert version == "v1.1" and {p.dtype for p in upcast.parameters()} == {torch.float32}
    out = LF.dit_out(upcast)
    assert torch.equal(out, want)
    err = ((out - ref["v1.1"]).norm() / ref["v1.1"].norm()).item()
    print(f"FP8 relative error vs the bf16 model: {err:.4f}")
    assert 1e-4 < err < 0.1  # FP8 quantisation error, measured (about 0.04 for this model)

    kept, _ = W.load_dit(path, fp8=True)  # FP8 storage: block matrices stay float8, upcast per matmul
    blocks = [p for n, p in kept.named_parameters() if "transformer_blocks." in n and p.ndim == 2]
    assert blocks and all(p.dtype == torch.float8_e4m3fn for p in blocks)
    assert kept.x_embedder.weight.dtype == torch.float32 and isinstance(kept.transformer_blocks[0].attn.to_q, W.FP8Linear)
    assert torch.equal(LF.dit_out(kept), want)


def test_fp8_storage_from_a_bf16_file_quantises_the_blocks(ckpts, ref):
    model, _ = W.load_dit(ckpts["official v1.1"][0], fp8=True)
    assert model.single_transformer_blocks[0].proj_mlp.weight.dtype == torch.float8_e4m3fn
    out = LF.dit_out(model)
    err = ((out - ref["v1.1"]).norm() / ref["v1.1"].norm()).item()
    assert 0 < err < 0.1


# --------------------------------------------------------------------------------------------------------------
# versions


def test_v12_directory_transformer_and_vae_load_but_the_pipeline_refuses(tiny, tmp_path, encoder_dir):
    root = LF.write_diffusers(tiny["v1.1"], tiny["vae"], tmp_path / "Step1X-Edit-v1p2", encoder_dir,
                              class_name="Step1XEditPipelineV1P2")
    assert L.inspect_dit(root).version == "v1.2"
    model, version = W.load_dit(root)
    assert version == "v1.2" and W.load_vae(root) is not None
    with pytest.raises(W.WeightsError, match="a v1.2 checkpoint, but version v1.1 was requested"):
        W.load_dit(root, version="v1.1")
    from step1x_edit.pipeline.edit import build_pipeline

    with pytest.raises(ValueError, match=r"v1\.2 .*conditioner.*not implemented yet"):
        build_pipeline(Settings(model_dir=root, device="cpu"))


def test_v12_connector_cross_attention_is_refused_by_name(ckpts, tmp_path):
    sd = load_file(str(ckpts["official v1.1"][0]))
    sd["connector.S.input_embedder_CA.weight"] = torch.zeros(256, 64, dtype=torch.bfloat16)
    save_file(sd, str(tmp_path / "ca.safetensors"))
    with pytest.raises(W.WeightsError, match=r"ca\.safetensors: the v1\.2 connector cross-attention .*input_embedder_CA"):
        W.load_dit(tmp_path / "ca.safetensors")
    cfg = W.dit_config_to_diffusers(LF.TINY_DIT) | {"connector_need_CA": True}
    with pytest.raises(W.WeightsError, match="connector_need_CA"):
        W.dit_config_from_diffusers(cfg, "v1.1", "transformer/config.json")


# --------------------------------------------------------------------------------------------------------------
# bad files: the error names the file and the key


def _copy(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    return dst


def test_corrupt_tensor_data_names_file_and_key(ckpts, tmp_path):
    path = _copy(ckpts["official v1.1"][0], tmp_path / "bad.safetensors")
    LF.replace_tensor_bytes(path, "single_blocks.0.linear2.weight", 0xFF)  # 0xFFFF is a bf16 NaN
    with pytest.raises(W.WeightsError, match=r"bad\.safetensors: tensor 'single_blocks\.0\.linear2\.weight' has \d+ NaN"):
        W.load_dit(path)


def test_corrupt_fp8_data_names_file_and_key(tiny, tmp_path):
    path = LF.write_official_dit(tiny["v1.1"], tmp_path / "fp8.safetensors", fp8=True)
    LF.replace_tensor_bytes(path, "double_blocks.0.img_mlp.2.weight", 0x7F)  # e4m3fn NaN
    for fp8 in (False, True):
        with pytest.raises(W.WeightsError, match=r"fp8\.safetensors: tensor 'double_blocks\.0\.img_mlp\.2\.weight' has \d+ NaN"):
            W.load_dit(path, fp8=fp8)


def test_corrupt_header_names_file(ckpts, tmp_path):
    path = _copy(ckpts["official v1.1"][0], tmp_path / "hdr.safetensors")
    data = bytearray(path.read_bytes())
    data[20:30] = b"\x00garbage!\xff"
    path.write_bytes(bytes(data))
    with pytest.raises(W.WeightsError, match=r"hdr\.safetensors: corrupt safetensors header"):
        W.load_dit(path)


def test_truncated_file_names_file_and_first_missing_key(ckpts, tmp_path):
    src = ckpts["official v1.1"][0]
    path = tmp_path / "cut.safetensors"
    path.write_bytes(src.read_bytes()[: src.stat().st_size * 2 // 3])
    with pytest.raises(W.WeightsError, match=r"cut\.safetensors: truncated: \d+ of \d+ bytes; tensor '[\w.]+' and \d+ more"):
        W.load_dit(path)
    with pytest.raises(W.WeightsError, match="cut.safetensors"):
        L.inspect_dit(path)


@pytest.mark.parametrize("dtype, shown", [(torch.int32, "torch.int32"), (torch.float64, "torch.float64"),
                                          (torch.float8_e5m2, "torch.float8_e5m2")])
def test_wrong_dtype_names_file_and_key(ckpts, tmp_path, dtype, shown):
    sd = load_file(str(ckpts["official v1.1"][0]))
    sd["txt_in.weight"] = sd["txt_in.weight"].to(dtype)
    save_file(sd, str(tmp_path / "dt.safetensors"))
    with pytest.raises(W.WeightsError, match=rf"dt\.safetensors: tensor 'txt_in\.weight' has dtype {shown}"):
        W.load_dit(tmp_path / "dt.safetensors")


def test_fp8_vae_is_refused(tiny, tmp_path):
    sd = W.to_official(tiny["vae"], W.vae_rules(4))
    sd["decoder.conv_out.weight"] = sd["decoder.conv_out.weight"].to(torch.float8_e4m3fn)
    save_file(sd, str(tmp_path / "vae.safetensors"))
    with pytest.raises(W.WeightsError, match=r"vae\.safetensors: tensor 'decoder\.conv_out\.weight' has dtype torch\.float8_e4m3fn"):
        W.load_vae(tmp_path / "vae.safetensors")


def test_missing_shard_names_index_shard_and_key(ckpts, tmp_path):
    root = shutil.copytree(ckpts["diffusers directory"][0], tmp_path / "d")
    index = root / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[1]
    (root / "transformer" / shard).unlink()
    with pytest.raises(W.WeightsError, match=rf"index\.json: shard {shard} is missing .*holds \d+ keys, e\.g\. '[\w.]+'"):
        W.load_dit(root)


def test_shard_without_a_listed_key_names_shard_and_key(ckpts, tmp_path):
    folder = shutil.copytree(ckpts["official sharded"][0].parent, tmp_path / "s")
    index = folder / ckpts["official sharded"][0].name
    shard = json.loads(index.read_text())["weight_map"]["img_in.weight"]
    sd = load_file(str(folder / shard))
    del sd["img_in.weight"]
    save_file(sd, str(folder / shard))
    with pytest.raises(W.WeightsError, match=rf"{shard}: missing keys listed for it in .*index\.json \(1\): img_in\.weight"):
        W.load_dit(index)


def test_half_downloaded_cache_file_names_the_incomplete_blob(ckpts, tmp_path):
    snap = LF.cache_repo(tmp_path / "hub", L.STEP1X_REPO, {"step1x-edit-v1p1-official.safetensors": ckpts["official v1.1"][0]})
    link = snap / "step1x-edit-v1p1-official.safetensors"
    blob = LF.blob_of(link)
    blob.rename(blob.with_name(blob.name + ".incomplete"))  # huggingface_hub's name for a partial download
    with pytest.raises(W.WeightsError, match=r"official\.safetensors: no such file \(an interrupted download: .*\.incomplete holds \d+ bytes"):
        W.load_dit(link)


def test_diffusers_config_disagreeing_with_weights_names_the_key(ckpts, tmp_path):
    root = shutil.copytree(ckpts["diffusers directory"][0], tmp_path / "d")
    cfg = json.loads((root / "transformer" / "config.json").read_text())
    cfg["num_single_layers"] = 2
    (root / "transformer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(W.WeightsError, match=r"index\.json: checkpoint does not match the model: missing keys \(\d+\): single_transformer_blocks\.1\."):
        W.load_dit(root)


# --------------------------------------------------------------------------------------------------------------
# finding the weights: explicit paths > STEP1X_MODEL_DIR > the Hugging Face cache > dev


def test_resolution_order_and_preset(ckpts, tiny, tmp_path, encoder_dir, monkeypatch):
    official = LF.write_official_dir(tiny["v1.1"], tiny["vae"], tmp_path / "official", encoder_dir)
    s = Settings(model_dir=official)
    assert L.resolve_preset(s) == "full"
    plan = L.resolve_weights(s)
    assert plan.dit.path.name == "step1x-edit-v1p1-official.safetensors" and plan.version == "v1.1"
    assert plan.vae.path.name == "vae.safetensors" and plan.encoder.path.name == "Qwen2.5-VL-7B-Instruct"
    assert set(plan.sources.values()) == {f"STEP1X_MODEL_DIR={official}"}
    assert "official layout" in plan.describe()
    # an explicit path wins over the model directory, component by component
    plan = L.resolve_weights(Settings(model_dir=official, dit_path=ckpts["official v1.0"][0]))
    assert plan.version == "v1.0" and plan.sources["dit"] == "STEP1X_DIT_PATH" and plan.sources["vae"].startswith("STEP1X_MODEL_DIR")
    # a directory as the DiT path brings the VAE and encoder it holds
    plan = L.resolve_weights(Settings(dit_path=official))
    assert plan.vae.path == official / "vae.safetensors" and plan.sources["encoder"].endswith("(STEP1X_DIT_PATH)")
    # the environment variable is the same setting
    monkeypatch.setenv("STEP1X_MODEL_DIR", str(ckpts["diffusers directory"][0]))
    plan = L.resolve_weights(Settings(encoder_path=encoder_dir))
    assert plan.dit.layout == "diffusers" and plan.vae.layout == "diffusers" and plan.sources["encoder"] == "STEP1X_ENCODER_PATH"
    with pytest.raises(W.WeightsError, match=r"missing encoder \(set STEP1X_ENCODER_PATH\).*found dit from STEP1X_MODEL_DIR"):
        L.resolve_weights(Settings())  # this diffusers directory has no text_encoder/
    monkeypatch.delenv("STEP1X_MODEL_DIR")
    # nothing anywhere: auto -> dev; full -> an error that says what to do
    assert L.resolve_preset(Settings()) == "dev"
    with pytest.raises(W.WeightsError, match=r"missing dit .*vae .*encoder .*step1x-edit download"):
        L.resolve_weights(Settings(preset="full"))


def test_both_versions_in_one_folder_pick_by_setting(tiny, tmp_path):
    folder = tmp_path / "both"
    LF.write_official_dir(tiny["v1.1"], tiny["vae"], folder, None, "v1.1")
    LF.write_official_dit(tiny["v1.0"], folder / "step1x-edit-i1258.safetensors")
    assert L.find_in_dir(folder).dit.version == "v1.1"
    assert L.find_in_dir(folder, "v1.0").dit.version == "v1.0"
    assert any("2 DiT files" in n for n in L.find_in_dir(folder).notes)


# --------------------------------------------------------------------------------------------------------------
# whole pipelines from different layouts of the same weights give the same image


def _edit(pipe):
    from step1x_edit.pipeline.types import EditRequest

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    (res,) = pipe.run([EditRequest(image=img, prompt="add a hat", steps=1, seed=3, size_level=256)])
    return np.asarray(res.images[0])


def test_pipelines_from_official_dir_and_diffusers_dir_match(tiny, tmp_path, encoder_dir):
    from step1x_edit.pipeline.edit import build_pipeline

    official = LF.write_official_dir(tiny["v1.1"], tiny["vae"], tmp_path / "official", encoder_dir)
    diffusers = LF.write_diffusers(tiny["v1.1"], tiny["vae"], tmp_path / "diffusers", encoder_dir)
    a = build_pipeline(Settings(model_dir=official, device="cpu", size_level=256))
    b = build_pipeline(Settings(model_dir=diffusers, device="cpu", size_level=256))
    assert a.preset == b.preset == "full" and a.version == b.version == "v1.1"
    assert np.array_equal(_edit(a), _edit(b))
