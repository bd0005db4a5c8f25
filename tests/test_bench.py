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


def test_tiny_run_writes_every_row_and_its_json_twin(tmp_path, capsys):
    """One run of several groups: each measurement is a row of both files (the JSON twin in the schema the GPU
    check commits), modes name exactly the options that were on, fp8 on a CPU says why it did not run."""
    out = tmp_path / "results.md"
    rc = bench.main(["--tiny", "--steps", "1", "--step-iters", "1", "--modes", "baseline,eager,fused,vae,fp8",
                     "--out", str(out)])
    text = out.read_text()
    data = json.loads((tmp_path / "results.json").read_text())
    assert rc == 0, text
    assert capsys.readouterr().out.rstrip().endswith(text.rstrip().splitlines()[-1])  # the table, printed last
    assert "measuring dit_step eager 256" in (tmp_path / "results.md.log").read_text()
    assert data["state"] == "finished" and "CPU" in data["device"] and data["torch"].startswith(torch.__version__)
    assert data["ceilings"]["fp32_tflops"] > 0 and data["ceilings"]["compute"] == "fp32"
    rows = {(r["kind"], r["mode"]): r for r in data["rows"]}
    assert list(rows) == [("dit_step", "baseline"), ("dit_step", "eager"), ("edit", "eager"), ("dit_step", "fused"),
                          ("vae_decode", "fp32"), ("vae_decode", "channels_last"), ("dit_step", "fused+fp8")]
    for r in data["rows"]:
        assert {"kind", "mode", "size", "steps", "n", "seconds", "peak_gib", "mfu", "exact", "status"} <= set(r)
        assert f"| {r['mode']} | {r['size']}² |" in text  # every JSON row is a markdown row
    for key in (("dit_step", "baseline"), ("dit_step", "eager"), ("edit", "eager"), ("dit_step", "fused")):
        assert rows[key]["status"] == "ok" and rows[key]["seconds"] > 0 and rows[key]["exact"], rows[key]
    assert rows[("dit_step", "fused")]["err_vs_bf16"] == 0.0  # fused QKV: the same function
    edit = rows[("edit", "eager")]
    assert set(edit["stages"]) >= {"encoder", "vae_encode", "denoise", "vae_decode"} and edit["steps"] == 1
    assert edit["seconds"] >= edit["stages"]["denoise"] > 0  # the whole loop, not only the DiT calls
    fp8 = rows[("dit_step", "fused+fp8")]
    assert not fp8["exact"] and fp8["status"].startswith("unavailable") and "CUDA" in fp8["status"]
    assert data["baseline_ratio"] == pytest.approx(
        rows[("dit_step", "baseline")]["seconds"] / min(rows[k]["seconds"] for k in (("dit_step", "eager"),
                                                                                       ("dit_step", "fused"))))


def test_budget_starts_a_measurement_only_when_the_longest_still_fits():
    now = [0.0]
    budget = bench.Budget(100, clock=lambda: now[0])
    assert budget.allows() and budget.allows(estimate=100) and not budget.allows(estimate=101)
    with budget.measure():
        now[0] += 30
    now[0] = 70
    assert budget.allows() and not budget.allows(estimate=31)  # 70 + 30 fits, 70 + 31 does not
    now[0] = 70.5
    assert not budget.allows() and "70 s elapsed + 30 s expected > 100 s" in budget.why_not()
    assert bench.Budget(0, clock=lambda: now[0]).allows(estimate=1e9)  # 0 = no budget


def test_a_budget_too_small_for_anything_still_writes_both_files(tmp_path):
    rc = bench.main(["--tiny", "--modes", "baseline,eager", "--budget-s", "0.001", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert rc == 0 and data["state"] == "finished" and data["rows"]
    assert all(r["status"].startswith("skipped: time budget") for r in data["rows"])
    assert "skipped: time budget" in (tmp_path / "results.md").read_text()


def _bench_process(out_dir, *extra):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "step1x_edit.bench", "--tiny", "--out-dir", str(out_dir),
                             "--no-baseline", "--modes", "eager", "--step-iters", "1", "--steps", "1,1,1,1,1,1,1,1",
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_rows(path, rows: int, proc, timeout: float = 240) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.is_file():
            data = json.loads(path.read_text())  # never half a file: written whole, then renamed
            if len(data["rows"]) >= rows:
                return data
        time.sleep(0.2)
    raise AssertionError(f"no {rows} rows within {timeout} s (exit {proc.poll()})")


def test_a_run_killed_midway_leaves_its_table(tmp_path):
    """The GPU command limit kills the run: SIGTERM (gpu-check.sh's `timeout`) ends it with the files marked
    stopped; SIGKILL (no chance to write anything) leaves the files of the last finished row, marked incomplete.
    (Both runs at once: the test waits for the slower.)"""
    import signal

    procs = {sig: _bench_process(tmp_path / sig) for sig in ("SIGKILL", "SIGTERM")}
    try:
        for sig, proc in procs.items():
            _wait_rows(tmp_path / sig / "results.json", 1, proc)
            proc.send_signal(getattr(signal, sig))
        for proc in procs.values():
            proc.wait(60)
    finally:
        for proc in procs.values():
            proc.kill()
    for sig, proc in procs.items():
        data = json.loads((tmp_path / sig / "results.json").read_text())
        text = (tmp_path / sig / "results.md").read_text()
        assert 1 <= len(data["rows"]) < 9 and all(r["status"] == "ok" for r in data["rows"])
        assert data["rows"][0]["kind"] == "dit_step" and all(r["kind"] == "edit" for r in data["rows"][1:])
        assert text.count("| eager | 256² |") == len(data["rows"])
        if sig == "SIGKILL":
            assert data["state"] == "running" and "**incomplete**" in text
        else:
            assert proc.returncode == 0 and data["state"].startswith("stopped by signal 15")
            assert "stopped by signal 15" in text


def test_summary_checks_the_targets():
    from step1x_edit.bench_report import failures, summary

    def row(kind, mode, seconds, **kw):
        return {"kind": kind, "mode": mode, "size": 1024, "steps": kw.pop("steps", 1), "n": kw.pop("n", 1),
                "seconds": seconds, "status": kw.pop("status", "ok"), "exact": "fp8" not in mode, **kw}

    data = {"device": "NVIDIA H200, 140 GiB, sm_90, 132 SMs", "torch": "2.11.0", "state": "finished",
            "ceilings": {"bf16_tflops": 780.0, "fp8_tflops": 1400.0},
            "rows": [row("dit_step", "baseline", 1.0), row("dit_step", "eager", 0.9, mfu=0.5),
                     row("dit_step", "fused+compile", 0.7, mfu=0.72),
                     row("dit_step", "fused+fp8+compile", 0.45, err_vs_bf16=0.02),
                     row("edit", "fused+compile", 18.0, steps=28), row("edit", "fused+compile", 11.5, steps=20),
                     row("http", "fused+compile", 12.0, steps=20, n=1, peak_gib=45.0),
                     row("http", "fused+compile", None, steps=20, n=4, status="error: OutOfMemoryError: ...")]}
    text = summary(data)
    assert "1.43x the diffusers baseline [met]" in text and "MFU 72% [met]" in text
    assert "1.56x over exact [met]" in text and "error vs bf16 2.0e-02" in text
    assert "28 steps: fused+compile 18.0 s | fastest exact [MISSED] (target <= 17 s)" in text
    assert "20 steps: fused+compile 11.5 s | fastest exact [met]" in text
    assert "n=1 12.0 s, peak 45.0 GiB; n=4 error" in text and text.endswith("(commit as bench/results/nvidia-h200.json)")
    assert failures(data) == ["http fused+compile 1024: error: OutOfMemoryError: ..."]
    assert failures({**data, "rows": [row("http", "eager", None, status="unavailable: ModuleNotFoundError: No "
                                                                        "module named 'fastapi'")]})


@pytest.mark.slow
def test_tiny_run_all_groups(tmp_path):
    """Every group on the CPU, the compile (inductor, minutes) and the step cache included."""
    rc = bench.main(["--tiny", "--steps", "2", "--step-iters", "1", "--cache-threshold", "0.9", "--modes",
                     ",".join(bench.MODES), "--e2e-modes", "eager,compile,fp8,cache", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert rc == 0 and data["state"] == "finished", data["errors"]
    ok = {(r["kind"], r["mode"]) for r in data["rows"] if r["status"] == "ok"}
    assert {("dit_step", "fused+compile"), ("edit", "fused+compile"), ("http", "fused+compile"),
            ("edit", "fused+compile+cache"), ("parity", "eager"), ("parity", "fused")} <= ok, ok
    compiled = [r for r in data["rows"] if r["mode"] == "fused+compile" and r["kind"] == "dit_step"][0]
    assert compiled["warmup_s"] > 0 and compiled["err_vs_bf16"] < 1e-5
    assert [r["n"] for r in data["rows"] if r["kind"] == "http"] == [1, 4]
