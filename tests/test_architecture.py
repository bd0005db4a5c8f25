"""The layering of docs/architecture.md, checked on the source: who may import whom, and which parts stay light.

api -> engine -> pipeline -> models (each may import the layers below it, never above); storage and settings are
leaves (settings imports nothing of the project; storage only itself). The HTTP side (api, engine, storage, the
CLI parser) never imports torch, diffusers or transformers: torch loads on the worker thread, and
`step1x-edit --help` answers without it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "step1x_edit"
# what each part may import of the project (besides itself)
ALLOWED = {
    "settings": set(),
    "storage": set(),
    "models": {"settings"},
    "pipeline": {"models", "settings"},
    "engine": {"pipeline"},
    "api": {"engine", "pipeline", "models", "storage", "settings", "cli_args", "__init__"},
    # Ray Serve (imported only by cli.py when --ray is asked for; nothing else imports it, see below)
    "deploy": {"api", "engine", "pipeline", "storage", "settings", "cli_args"},
}


def _part(module: str) -> str:
    """`step1x_edit.api.app` -> `api`; top-level modules are their own part; names of the package itself
    (`from .. import MODEL_ID`) are `__init__`."""
    parts = module.split(".")
    if len(parts) == 1 or not ((PACKAGE / f"{parts[1]}.py").is_file() or (PACKAGE / parts[1]).is_dir()):
        return "__init__"
    return parts[1]


def _imports(path: Path) -> set[str]:
    """Project modules imported by a file (absolute names), at any depth (lazy imports inside functions too)."""
    module = "step1x_edit." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
                if not node.module:  # `from .. import x`: x may be a module
                    found.update(f"{base}.{alias.name}" for alias in node.names)
            else:
                name = node.module or ""
            if name.startswith("step1x_edit"):
                found.add(name)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("step1x_edit"))
    return found


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_layers_import_only_downwards(part):
    files = [PACKAGE / f"{part}.py"] if (PACKAGE / f"{part}.py").is_file() else sorted((PACKAGE / part).rglob("*.py"))
    assert files
    bad = []
    for path in files:
        for name in _imports(path):
            other = _part(name)
            if other != part and other not in ALLOWED[part]:
                bad.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert bad == []


def test_the_http_side_and_the_cli_parser_never_import_torch():
    code = ("import sys, step1x_edit.api.app, step1x_edit.storage.local, step1x_edit.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_only_the_command_line_imports_the_ray_deployment():
    """deploy/ needs the [ray] extra: the plain server must run without it, so only `cli.py` (on --ray) imports it."""
    importers = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                       if _part("step1x_edit." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)) != "deploy"
                       and any(_part(name) == "deploy" for name in _imports(path)))
    assert importers == ["cli.py"]
