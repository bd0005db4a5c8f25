"""The README's walk-through, checked where it can be without a network or a second terminal: one way to call the
command, the Python example says how to get the SDK, the slow example says how slow, the files the examples write
are git-ignored, and the packaging metadata is in the form setuptools no longer warns about.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_the_command_is_called_one_way_that_works_without_activating():
    """Some commands were `.venv/bin/step1x-edit …`, others a bare `step1x-edit …` (not on PATH after `make serve`)."""
    bare = re.findall(r"(?<![\w/.-])step1x-edit (?:serve|edit|check-reference|download|bench)\b", README)
    assert bare == [], bare
    assert ".venv/bin/step1x-edit serve" in README and ".venv/bin/step1x-edit download" in README


def test_the_python_example_says_how_to_install_the_sdk():
    """`openai` is only in the test extra, so the Python example failed after `make serve`."""
    before = README[:README.index("```python")]
    assert ".venv/bin/pip install -c constraints.txt openai" in before and ".venv/bin/python" in before
    assert not any(dep.startswith("openai") for dep in PYPROJECT["project"]["dependencies"])  # (else say so)
    assert re.search(r"^openai==", (REPO / "constraints.txt").read_text(), re.M)


def test_the_slow_example_says_how_long_it_takes():
    """A 20-step edit on a CPU was silent for a while with no word about it."""
    before_curl = README[:README.index("/v1/images/generations -H")]
    paragraph = before_curl[before_curl.rindex("curl, as in the hosted API's example"):]
    assert re.search(r"\d+ s on", paragraph) and "prints nothing until" in paragraph


def test_files_the_examples_write_are_git_ignored():
    written = set(re.findall(r"> (\w[\w.-]*\.json)\b", README)) | set(re.findall(r"-o (\w[\w.-]*\.png)", README))
    written |= {name.replace("{event.image_index}", "0") for name in re.findall(r"f\"(out-\{[^}]+\}\.png)\"", README)}
    written |= set(re.findall(r"writes `(out-\d\.png)`", README))
    assert {"req.json", "out.png", "out-0.png"} <= written, written
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip(reason="not a git checkout")
    done = subprocess.run(["git", "check-ignore", *sorted(written)], cwd=REPO, capture_output=True, text=True)
    assert set(done.stdout.split()) == written, done.stdout


def test_license_is_an_spdx_expression():
    """`license = {text = ...}` made setuptools warn three times per install (deprecated table form)."""
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    requires = " ".join(PYPROJECT["build-system"]["requires"])
    assert re.search(r"setuptools>=(\d+)", requires) and int(re.search(r"setuptools>=(\d+)", requires)[1]) >= 77


def test_the_settings_table_is_the_one_settings_py_declares():
    from step1x_edit.cli_args import settings_table

    table = README.split("<!-- settings-table -->\n", 1)[1].split("\n<!-- /settings-table -->", 1)[0]
    assert table == settings_table(), "regenerate it: .venv/bin/python -m step1x_edit.cli_args"


def test_the_request_fields_table_lists_every_protocol_field():
    from step1x_edit.api.protocol import EditParams, GenerationRequest

    table = README.split("### Request fields", 1)[1].split("\n\n", 2)[1]
    rows = {line.split("|")[1].strip().strip("`") for line in table.splitlines() if line.startswith("| `")}
    assert rows == set(GenerationRequest.model_fields) | set(EditParams.model_fields)
