"""Strict loading of the official single-file layout: key sets, shapes, versions, errors that name the key."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from step1x_edit.models import presets
from step1x_edit.models.dit import Step1XEditTransformer2DModel
from step1x_edit.models.vae import build_vae
from step1x_edit.models.weights import (
    DIT_RULES,
    WeightsError,
    detect_version,
    SafetensorsFile,
    dit_config_from_dict,
    expected_official_shapes,
    infer_vae_config,
    load_dit,
    load_vae,
    save_official,
    vae_config_from_dict,
    vae_rules,
    with_version,
)


def _meta(model_fn):
    with torch.device("meta"):
        return model_fn()


def test_full_size_key_set_matches_official_manifest(golden_dir):
    """Our full-size modules map onto exactly the official file's 817 DiT keys and 244 VAE keys and shapes."""
    manifest = json.loads((golden_dir / "manifest-dit-full.json").read_text())["shapes"]
    dit = _meta(lambda: Step1XEditTransformer2DModel.from_dit_config(with_version(presets.FULL_DIT, "v1.0")))
    assert expected_official_shapes(dit, DIT_RULES) == {k: tuple(v) for k, v in manifest.items()}
    vae_manifest = json.loads((golden_dir / "manifest-vae-full.json").read_text())["shapes"]
    vae = _meta(lambda: build_vae(presets.FULL_VAE))
    assert expected_official_shapes(vae, vae_rules(4)) == {k: tuple(v) for k, v in vae_manifest.items()}


def test_full_size_parameter_count(golden_dir):
    manifest = json.loads((golden_dir / "manifest-dit-full.json").read_text())
    dit = _meta(lambda: Step1XEditTransformer2DModel.from_dit_config(with_version(presets.FULL_DIT, "v1.0")))
    assert sum(p.numel() for p in dit.parameters()) == manifest["total_parameters"]


def test_version_detection(golden_dir):
    assert detect_version(SafetensorsFile(golden_dir / "tiny-a" / "dit.safetensors")) == "v1.0"
    assert detect_version(SafetensorsFile(golden_dir / "tiny-a-v1p1" / "dit.safetensors")) == "v1.1"


def _tiny_cfg(golden_dir, version="v1.0"):
    meta = json.loads((golden_dir / "tiny-a" / "cases.json").read_text())
    return dit_config_from_dict(meta["dit_params"], meta["connector_params"], version)


def test_round_trip_official_layout_is_lossless(golden_dir, tmp_path):
    src = golden_dir / "tiny-a" / "dit.safetensors"
    model, version = load_dit(src, _tiny_cfg(golden_dir))
    assert version == "v1.0"
    out = tmp_path / "dit.safetensors"
    save_official(model, DIT_RULES, out)
    a, b = load_file(str(src)), load_file(str(out))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vae_round_trip_and_inferred_config(golden_dir, tmp_path):
    src = golden_dir / "tiny-a" / "vae.safetensors"
    meta = json.loads((golden_dir / "tiny-a" / "cases.json").read_text())
    assert infer_vae_config(SafetensorsFile(src)) == vae_config_from_dict(meta["vae_params"])
    vae = load_vae(src)
    out = tmp_path / "vae.safetensors"
    save_official(vae, vae_rules(4), out)
    a, b = load_file(str(src)), load_file(str(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _write_variant(golden_dir, tmp_path, edit):
    sd = load_file(str(golden_dir / "tiny-a" / "dit.safetensors"))
    edit(sd)
    path = tmp_path / "dit.safetensors"
    save_file(sd, str(path))
    return path


def test_missing_key_is_named(golden_dir, tmp_path):
    path = _write_variant(golden_dir, tmp_path, lambda sd: sd.pop("double_blocks.1.txt_attn.proj.weight"))
    with pytest.raises(WeightsError, match=r"missing keys \(1\): double_blocks\.1\.txt_attn\.proj\.weight"):
        load_dit(path, _tiny_cfg(golden_dir))


def test_unexpected_key_is_named(golden_dir, tmp_path):
    path = _write_variant(golden_dir, tmp_path, lambda sd: sd.__setitem__("guidance_in.in_layer.weight", torch.zeros(2)))
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): guidance_in\.in_layer\.weight"):
        load_dit(path, _tiny_cfg(golden_dir))


def test_wrong_shape_is_named(golden_dir, tmp_path):
    path = _write_variant(golden_dir, tmp_path, lambda sd: sd.__setitem__("img_in.weight", torch.zeros(128, 32)))
    with pytest.raises(WeightsError, match=r"key 'img_in\.weight' has shape \[128, 32\], expected \[128, 64\]"):
        load_dit(path, _tiny_cfg(golden_dir))


def test_integer_tensor_is_refused(golden_dir, tmp_path):
    path = _write_variant(golden_dir, tmp_path, lambda sd: sd.__setitem__("img_in.bias", torch.zeros(128, dtype=torch.int32)))
    with pytest.raises(WeightsError, match=r"'img_in\.bias' has dtype torch\.int32"):
        load_dit(path, _tiny_cfg(golden_dir))


def test_truncated_file_names_the_file(golden_dir, tmp_path):
    data = (golden_dir / "tiny-a" / "dit.safetensors").read_bytes()
    path = tmp_path / "half.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="half.safetensors"):
        load_dit(path, _tiny_cfg(golden_dir))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(WeightsError, match="nope.safetensors: no such file"):
        load_dit(tmp_path / "nope.safetensors")


def test_forcing_versions(golden_dir):
    # v1.1 code accepts a v1.0 file and ignores its scale factor (strict=False upstream)
    model, version = load_dit(golden_dir / "tiny-a" / "dit.safetensors", _tiny_cfg(golden_dir), version="v1.1")
    assert version == "v1.1" and not hasattr(model.connector, "scale_factor")
    with pytest.raises(WeightsError, match="v1.0 requested"):
        load_dit(golden_dir / "tiny-a-v1p1" / "dit.safetensors", _tiny_cfg(golden_dir), version="v1.0")


def test_load_to_bfloat16(golden_dir):
    model, _ = load_dit(golden_dir / "tiny-a" / "dit.safetensors", _tiny_cfg(golden_dir), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
