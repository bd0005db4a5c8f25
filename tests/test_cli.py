"""The `step1x-edit` command line as a user runs it (a real subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys

from PIL import Image


def _run(*args, env=None):
    e = dict(os.environ, **(env or {}))
    e = {k: v for k, v in e.items() if not k.startswith("STEP1X_")} | {"STEP1X_SIZE_LEVEL": "256"}
    return subprocess.run([sys.executable, "-m", "step1x_edit.cli", *args], capture_output=True, text=True, env=e,
                          timeout=300)


def test_edit_example_writes_png_of_input_size(examples_dir, tmp_path):
    out = tmp_path / "out.png"
    src = examples_dir / "0000.jpg"
    p = _run("edit", str(src), "make it a pencil sketch", "-o", str(out), "--steps", "2", "--seed", "7")
    assert p.returncode == 0, p.stderr
    assert "dev preset" in p.stderr  # says loudly that the output is noise
    assert "seed 7" in p.stdout
    assert "denoise" in p.stderr and "2/2" in p.stderr  # the progress bar, per step
    assert p.stdout.startswith(f"wrote {out}: 1024x1536, seed 7, ") and " s (dev preset, cpu)" in p.stdout
    with Image.open(out) as img, Image.open(src) as ref:
        assert img.format == "PNG" and img.size == ref.size


def test_edit_n_writes_numbered_files(examples_dir, tmp_path):
    out = tmp_path / "o.png"
    p = _run("edit", str(examples_dir / "0003.png"), "x", "-o", str(out), "--steps", "1", "--n", "2", "--seed", "1")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "o-0.png").is_file() and (tmp_path / "o-1.png").is_file()


def test_edit_bad_input_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    p = _run("edit", str(bad), "x", "-o", str(tmp_path / "o.png"))
    assert p.returncode == 2 and "cannot read image" in p.stderr and "Traceback" not in p.stderr

def test_edit_bad_parameter_names_it(examples_dir, tmp_path):
    p = _run("edit", str(examples_dir / "0000.jpg"), "x", "-o", str(tmp_path / "o.png"), "--steps", "0")
    assert p.returncode == 2 and "steps" in p.stderr and "Traceback" not in p.stderr


def test_check_reference_command(golden_dir):
    p = _run("check-reference", str(golden_dir / "tiny-a"), str(golden_dir / "tiny-a-v1p1"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("0 failed") == 2


def test_edit_takes_lora_adapters_by_name(examples_dir, tmp_path):
    """(That the adapter changes the pixels, and only its request's, is checked in-process: test_lora_pipeline.py.)"""
    sys.path.insert(0, os.path.dirname(__file__))
    from lora_fixtures import dev_preset_loras

    loras = dev_preset_loras(tmp_path / "loras", names=("fix-hand",))
    args = ("edit", str(examples_dir / "0003.png"), "x", "--steps", "1", "--seed", "3", "--lora-dir", str(loras))
    out = tmp_path / "lora.png"
    adapted = _run(*args, "-o", str(out), "--lora", "fix-hand:0.8",
                   env={"OMP_NUM_THREADS": "1"})  # (tiny models: one thread is quicker, above all on a busy machine)
    assert adapted.returncode == 0, adapted.stderr
    assert adapted.stdout.startswith(f"wrote {out}: ") and ", lora fix-hand:0.8, " in adapted.stdout
    with Image.open(out) as img:
        assert img.format == "PNG"
    bad = _run(*args, "-o", str(out), "--lora", "fix-hand:lots")
    assert bad.returncode == 2 and "expected NAME or NAME:SCALE" in bad.stderr and "Traceback" not in bad.stderr
