"""The benchmark's pieces on the CPU: analytic FLOPs, full-size configurations (on the meta device), random
builds without the host holding weights, and the whole `--tiny` run producing every table row."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from step1x_edit import bench
from step1x_edit.models import presets
from step1x_edit.models.dit import Step1XEditTransformer2DModel


def _sdpa_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@pytest.mark.parametrize("size", [64, 128])
def test_analytic_dit_flops_match_the_flop_counter(size):
    dit = presets.build_dev_dit()
    d = bench.dims(tiny=True)
    x = bench.dit_inputs(size, d, torch.device("cpu"), torch.float32)
    # On the CPU, inference-mode SDPA is not decomposed: count it with PyTorch's own SDPA formula.
    sdpa = torch.ops.aten.scaled_dot_product_attention
    mapping = {sdpa: _sdpa_formula, sdpa.default: _sdpa_formula}  # the overload stops decomposition, the packet counts
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        x.ours(dit)
    measured = counter.get_total_flops()
    analytic = bench.dit_flops(d.dit, bench.image_tokens(size), bench.TXT_TOKENS, batch=2)
    assert abs(analytic - measured) / measured < 0.02, (analytic, measured)


def test_full_size_dit_matches_the_official_parameter_count(golden_dir):
    manifest = json.loads((golden_dir / "manifest-dit-full.json").read_text())
    with torch.device("meta"):
        dit = Step1XEditTransformer2DModel.from_dit_config(presets.FULL_DIT)  # v1.0 layout, like the manifest (has scale_factor)
    assert sum(p.numel() for p in dit.parameters()) == manifest["total_parameters"]
    with torch.device("meta"):
        v11 = Step1XEditTransformer2DModel.from_dit_config(bench.BENCH_DIT)
    assert sum(p.numel() for p in v11.parameters()) == manifest["total_parameters"] - 1


def test_qwen25_vl_7b_config_has_the_published_size():
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = bench.qwen25_vl_7b_config()
    assert cfg.text_config.hidden_size == 3584 and cfg.vision_config.depth == 32
    assert cfg.vision_config.fullatt_block_indexes == [7, 15, 23, 31]
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == 8_292_166_656  # Qwen2.5-VL-7B-Instruct's safetensors total (untied lm_head included)


def test_random_build_goes_through_meta_and_is_seeded():
    d = bench.dims(tiny=True)
    cpu = torch.device("cpu")
    a = bench.build_random(lambda: Step1XEditTransformer2DModel.from_dit_config(d.dit), cpu, torch.bfloat16, seed=3)
    b = bench.build_random(lambda: Step1XEditTransformer2DModel.from_dit_config(d.dit), cpu, torch.bfloat16, seed=3)
    assert all(p.dtype == torch.bfloat16 and p.device == cpu for p in a.parameters())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    w = a.transformer_blocks[0].attn.to_q.weight.float()
    assert abs(w.std().item() - d.dit.hidden_size**-0.5) < 0.01
    base = bench.build_baseline(d, cpu, torch.float32, seed=0)
    assert sum(p.numel() for p in base.parameters()) > 0 and torch.isfinite(base.proj_out.weight).all()


def test_full_size_build_path_with_small_configs(monkeypatch):
    """The non-tiny builders (encoder built on the device from a config, lm_head dropped; DiT and VAE through
    meta) exercised on the CPU with the dev configs."""
    from step1x_edit.models.encoder import dev_config

    monkeypatch.setattr(bench, "qwen25_vl_7b_config", lambda: dev_config(presets.DEV_ENCODER_HIDDEN))
    d = bench.Dims(presets.DEV_DIT, presets.DEV_VAE, presets.DEV_ENCODER_HIDDEN, tiny=False)
    pipe = bench.build_ours(d, torch.device("cpu"), torch.bfloat16, seed=0)
    assert pipe.conditioner.dtype == torch.bfloat16 and isinstance(pipe.conditioner.model.lm_head, torch.nn.Identity)
    assert next(pipe.dit.parameters()).dtype == torch.bfloat16 and pipe.vae.encoder.conv_in.weight.dtype == torch.float32
    enc = pipe.conditioner.encode(["add a hat"], [bench.test_image(64)])
    assert enc.embeddings.shape == (1, bench.TXT_TOKENS, presets.DEV_ENCODER_HIDDEN) and enc.mask.sum() > 100


def _rows(text: str, marker: str) -> dict[str, str]:
    rows = {}
    for mode in ("baseline", *bench.MODES):
        found = [line for line in text.splitlines() if line.startswith(f"| {bench.MODE_LABEL[mode]} |") and marker in line]
        if found:
            rows[mode] = found[0]
    return rows


def test_tiny_run_has_every_row_and_prints_the_table_last(tmp_path, capsys):
    out = tmp_path / "results.md"
    rc = bench.main(["--tiny", "--steps", "2", "--step-iters", "1", "--modes", "eager,fp8", "--no-parity",
                     "--out", str(out)])
    text = out.read_text()
    assert rc == 0, text
    assert capsys.readouterr().out.rstrip().endswith(text.rstrip().splitlines()[-1])
    assert "mode eager" in (tmp_path / "results.md.log").read_text()
    assert "CPU smoke run" in text and "Published reference" in text
    steps, e2e = _rows(text, "| 256² | 1152 |"), _rows(text, "| 256² | 2 |")
    assert set(steps) == {"baseline", *bench.MODES} and set(e2e) == set(bench.MODES)
    assert "| ok |" in steps["baseline"] and "| ok |" in steps["eager"] and "| ok |" in e2e["eager"]
    assert all("not run (--modes)" in e2e[m] for m in ("fused", "sdpa", "compile", "cache"))
    assert "torchao" in e2e["fp8"] or "| ok |" in e2e["fp8"]


@pytest.mark.slow
def test_tiny_run_all_modes_with_parity(tmp_path):
    out = tmp_path / "results.md"
    rc = bench.main(["--tiny", "--steps", "3,2", "--step-iters", "1", "--cache-threshold", "0.9",
                     "--e2e-modes", ",".join(bench.MODES), "--out", str(out)])
    text = out.read_text()
    assert rc == 0, text
    for marker in ("| 256² | 3 |", "| 256² | 2 |"):
        e2e = _rows(text, marker)
        assert all("| ok |" in e2e[m] for m in ("eager", "fused", "sdpa", "compile", "cache")), e2e
    parity = text.split("## Parity")[1].split("##")[0]
    for variant in ("eager bf16", "+ fused QKV", "+ regional compile"):
        assert f"| {variant} |" in parity and parity.split(f"| {variant} |")[1].split("\n")[0].endswith("| ok |")
