"""`bench/gpu-check.sh`, the one command a GPU session runs, exercised on the CPU (`--tiny`) in an environment shaped
like the GPU machine's: its image's packages plus the carried wheels' packages, nothing else (`bench/device_sim.py`).
A package the check needs that neither list holds fails here instead of in a 15-minute GPU lease. (`.ci/run` runs
the full dry run, every group, with the real wheels downloaded and installed by the script.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu-check.sh"


def _sim(dest: Path, wheel_list: Path | None = None) -> Path:
    args = [sys.executable, str(ROOT / "bench" / "device_sim.py"), str(dest), "--with-carried"]
    if wheel_list is not None:
        args += ["--wheel-list", str(wheel_list)]
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=120)
    return dest / "bin" / "python"


def _check(python: Path, out: Path, *args: str, wheel_list: Path | None = None, timeout: int = 600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("STEP1X_")}
    env["PYTHON"] = str(python)
    if wheel_list is not None:
        env["WHEEL_LIST"] = str(wheel_list)
    return subprocess.run(["bash", str(SCRIPT), "--tiny", "--out-dir", str(out), *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd="/")


def test_environment_of_the_image_and_the_wheels_runs_the_dry_run(tmp_path):
    python = _sim(tmp_path / "env")
    probe = subprocess.run([str(python), "-c", "import fastapi, torch, diffusers; import playwright"],
                           capture_output=True, text=True)
    assert "No module named 'playwright'" in probe.stderr  # only what the lists name (it is installed here)
    p = _check(python, tmp_path / "out", "--", "--modes", "http", "--http-steps", "1", "--http-n", "1")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "import check: 16 of 16 listed packages import" in p.stdout
    assert p.stdout.strip().splitlines()[-1].startswith("(commit as bench/results/cpu")  # the summary, last
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["state"] == "finished"
    assert [(r["kind"], r["mode"], r["n"], r["status"]) for r in data["rows"]] == [("http", "eager", 1, "ok")]
    assert data["ceilings"]["fp32_tflops"] > 0 and data["rows"][0]["server_stages"]["pipeline_denoise"] > 0
    assert {f.name for f in (tmp_path / "out").iterdir()} == {"results.md", "results.json", "results.log",
                                                              "stdout.txt"}


def test_missing_wheels_are_named_before_anything_runs(tmp_path):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "diffusers-0.42.1-py3-none-any.whl").write_bytes(b"")
    env = dict(os.environ, PYTHON=sys.executable)
    p = subprocess.run(["bash", str(SCRIPT), "--wheels", str(tmp_path / "wheels"), "--out-dir", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 3 and "missing wheels" in p.stderr
    assert "transformers==5.24.0" in p.stderr and "fastapi==0.165.0" in p.stderr and "diffusers" not in p.stderr
    assert not (tmp_path / "o" / "results.json").exists()


@pytest.mark.slow
def test_a_package_left_off_the_list_fails_the_dry_run(tmp_path):
    """The environment check can fail: without fastapi and starlette on the list the server cannot start."""
    short = tmp_path / "wheels.txt"
    short.write_text("\n".join(line for line in (ROOT / "bench" / "device-wheels.txt").read_text().splitlines()
                               if not line.startswith(("fastapi", "starlette"))) + "\n")
    python = _sim(tmp_path / "env", short)
    p = _check(python, tmp_path / "out", "--", "--modes", "http", "--http-n", "1", wheel_list=short)
    assert p.returncode != 0
    assert "FAILED http eager 256" in p.stdout and "No module named" in p.stdout
