"""check-reference on the golden directories, and on directories of the same format it has never seen."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file, save_file

from step1x_edit.cli import main as cli_main
from step1x_edit.reference import check_reference


def test_tiny_a_v1_0_all_cases_within_tolerance(golden_dir):
    results = check_reference(golden_dir / "tiny-a")
    assert {r.name for r in results} >= {"connector", "dit_fwd", "dit_fwd_8x8", "schedule", "input_process_image",
                                         "denoise_cfg6_4steps", "denoise_img2img_s0.7", "denoise_cfg2.5_3steps", "vae"}
    assert [r for r in results if r.status != "ok"] == []


def test_tiny_a_v1_1_all_cases_within_tolerance(golden_dir):
    results = check_reference(golden_dir / "tiny-a-v1p1")
    assert "denoise_cfg6_10steps_negprefix10" in {r.name for r in results}
    assert [r for r in results if r.status != "ok"] == []


def test_cli_exit_codes(golden_dir, tmp_path, capsys):
    assert cli_main(["check-reference", str(golden_dir / "tiny-a-v1p1")]) == 0
    out = capsys.readouterr().out
    assert "denoise_cfg6_10steps_negprefix10" in out and "0 failed" in out
    assert cli_main(["check-reference", str(tmp_path)]) == 1  # not a golden directory


def test_a_wrong_weight_fails_the_check(golden_dir, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(golden_dir / "tiny-a-v1p1", d)
    sd = load_file(str(d / "dit.safetensors"))
    sd["single_blocks.1.norm.key_norm.scale"] = sd["single_blocks.1.norm.key_norm.scale"] * 1.01
    save_file(sd, str(d / "dit.safetensors"))
    bad = {r.name for r in check_reference(d) if r.status == "FAIL"}
    assert {"dit_fwd", "denoise_cfg6_4steps"} <= bad and "connector" not in bad and "vae" not in bad


def test_unknown_case_kind_counts_as_failure(golden_dir, tmp_path):
    d = tmp_path / "extra"
    shutil.copytree(golden_dir / "tiny-a", d)
    meta = json.loads((d / "cases.json").read_text())
    meta["cases"]["something_new"] = {"call": "?"}
    (d / "cases.json").write_text(json.dumps(meta))
    results = {r.name: r.status for r in check_reference(d)}
    assert results["something_new"] == "SKIP"
    assert cli_main(["check-reference", str(d)]) == 1


def test_other_dimensions_and_seeds(golden_dir, tmp_path):
    """A directory in the same format with a different config, latent size, seeds and version: the checker
    reads everything from cases.json / the tensors, so it runs every case (here the outputs come from the
    golden v1.0 directory's weights re-dimensioned: only the structure is new, values are recomputed)."""
    from step1x_edit.models.dit import Step1XEditTransformer2DModel
    from step1x_edit.models.presets import init_random_
    from step1x_edit.models.weights import DIT_RULES, dit_config_from_dict, save_official
    from step1x_edit.pipeline import sampling

    d = tmp_path / "tiny-b"
    d.mkdir()
    meta = json.loads((golden_dir / "tiny-a" / "cases.json").read_text())
    meta["dit_params"].update(hidden_size=64, num_heads=2, context_in_dim=96, axes_dim=[4, 14, 14])
    meta["connector_params"].update(in_channels=48, hidden_size=96, heads_num=3)
    cfg = dit_config_from_dict(meta["dit_params"], meta["connector_params"], "v1.0")
    dit = init_random_(Step1XEditTransformer2DModel.from_dit_config(cfg), torch.Generator().manual_seed(7)).eval()
    save_official(dit, DIT_RULES, d / "dit.safetensors")
    shutil.copy(golden_dir / "tiny-a" / "vae.safetensors", d / "vae.safetensors")
    g = torch.Generator().manual_seed(99)
    emb, mask = torch.randn(1, 9, 48, generator=g), torch.tensor([[1] * 6 + [0] * 3])
    tgt, ref = torch.randn(1, 16, 8, 12, generator=g), torch.randn(1, 16, 8, 12, generator=g)
    img = torch.cat([sampling.pack(tgt), sampling.pack(ref)], 1)
    ids = torch.cat([sampling.image_ids(8, 12), sampling.image_ids(8, 12, reference=True, version="v1.0")])
    t = torch.tensor([0.42])
    with torch.no_grad():
        pred = dit(img, ids, torch.zeros(9, 3), t, emb, t, mask)
    tensors = {"fwd.latent_target": tgt, "fwd.latent_ref": ref, "fwd.img": img, "fwd.img_ids": ids[None],
               "fwd.txt_ids": torch.zeros(1, 9, 3), "fwd.timesteps": t, "fwd.t_vec": t.clone(), "fwd.llm_embedding": emb,
               "fwd.mask": mask, "fwd.pred": pred}
    save_file(tensors, str(d / "cases.safetensors"))
    meta["cases"] = {"fwd": {"call": "dit(...)"}}
    (d / "cases.json").write_text(json.dumps(meta))
    results = check_reference(d)
    assert [(r.name, r.status) for r in results] == [("fwd", "ok")]
    assert results[0].max_err == 0.0
