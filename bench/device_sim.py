"""Build, on the CPU, a Python environment shaped like the GPU machine's: its image's packages and nothing else.

    .venv/bin/python bench/device_sim.py DEST [--with-carried] [--wheel-list FILE]
    PYTHON bench/device_sim.py --check-imports [--wheel-list FILE]

DEST becomes a virtual environment (no pip, no system site-packages) whose site-packages holds links to this
interpreter's installed distributions named in bench/device-image.txt, each with the distributions it requires
(as the image's own versions would come with theirs). With --with-carried, the packages of bench/device-wheels.txt
are linked too, but *without* their requirements: those must be in the image or in that list, which is what the
GPU machine will hold once gpu-check.sh has installed the carried wheels. Without it, gpu-check.sh --wheels DIR
installs real wheels into the environment's view (what .ci/run does).

Then `PYTHON=DEST/bin/python bash bench/gpu-check.sh --tiny ...` runs the GPU check's dry run with only those
packages: an import the lists do not cover fails here, not in the 15 minutes of a GPU lease.

`--check-imports` (run by gpu-check.sh --tiny with the environment's own python) imports every top-level module of
every listed wheel's distribution: a package that fails on import (a torchao built for another torch, a missing
dependency of a carried wheel) is named before the benchmark starts.

Versions are this machine's (the image's own differ: e.g. huggingface_hub 1.33 there), so this checks names, not
version conflicts; the wheel list pins what matters. Written by hand: no tool builds "an environment of exactly
these installed distributions" without downloading them again.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_names(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(norm(re.split(r"[=<>!~ ]", line, maxsplit=1)[0]))
    return out


def installed() -> dict[str, md.Distribution]:
    dists: dict[str, md.Distribution] = {}
    for d in md.distributions():
        name = d.metadata["Name"]
        if name:
            dists.setdefault(norm(name), d)
    return dists


def requirements(dist: md.Distribution) -> list[str]:
    """Names this distribution requires unconditionally (extras and markers that do not apply left out)."""
    from packaging.requirements import Requirement

    out = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        out.append(norm(req.name))
    return out


def closure(names: list[str], dists: dict[str, md.Distribution]) -> set[str]:
    seen: set[str] = set()
    todo = [n for n in names if n in dists]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [r for r in requirements(dists[name]) if r in dists and r not in seen]
    return seen


def top_level(dist: md.Distribution) -> set[str]:
    """The entries a distribution puts directly into site-packages (packages, modules, its .dist-info, .pth)."""
    tops = set()
    for f in dist.files or []:
        parts = Path(str(f)).parts
        if parts and parts[0] not in ("..", "__pycache__") and not parts[0].startswith("/"):
            tops.add(parts[0])
    return tops


def build(dest: Path, with_carried: bool, wheel_list: Path = HERE / "device-wheels.txt") -> Path:
    dists = installed()
    image = read_names(HERE / "device-image.txt")
    names = closure(image, dists)
    if with_carried:
        names |= {n for n in read_names(wheel_list) if n in dists}
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(dest)], check=True)
    py = dest / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    here_site = Path(sysconfig.get_paths()["purelib"])
    for name in sorted(names):
        dist = dists[name]
        base = Path(str(dist.locate_file("")))
        for entry in top_level(dist):
            src = base / entry
            link = site / entry
            if src.exists() and not link.exists() and not src.name.startswith("__editable__"):
                link.symlink_to(src)
    (site / "device_sim.txt").write_text("\n".join(sorted(names)) + "\n")
    print(f"{dest}: {len(names)} distributions linked from {here_site} (image"
          f"{' + carried wheels' if with_carried else ''}); python: {py}")
    return py


def check_imports(wheel_list: Path) -> int:
    """Import the top-level modules of every listed distribution in this interpreter; print and count failures."""
    import importlib

    dists = installed()
    failed = []
    for name in read_names(wheel_list):
        if name not in dists:
            failed.append(f"{name}: not installed")
            continue
        for top in sorted(top_level(dists[name])):
            module = top.removesuffix(".py")
            if top.endswith((".dist-info", ".pth", ".so", ".txt")) or module.startswith("_"):
                continue
            try:
                importlib.import_module(module)
            except Exception as e:  # noqa: BLE001 - every failure is reported
                failed.append(f"{name} ({module}): {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    for f in failed:
        print(f"import check: {f}", file=sys.stderr)
    print(f"import check: {len(read_names(wheel_list)) - len(failed)} of {len(read_names(wheel_list))} listed "
          f"packages import{'; FAILED: ' + str(len(failed)) if failed else ''}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", nargs="?", help="directory of the environment to create (replaced if it exists)")
    parser.add_argument("--with-carried", action="store_true", help="also link the wheel list's packages")
    parser.add_argument("--wheel-list", type=Path, default=HERE / "device-wheels.txt")
    parser.add_argument("--check-imports", action="store_true", help="import every listed package here")
    args = parser.parse_args(argv)
    if args.check_imports:
        return check_imports(args.wheel_list)
    if not args.dest:
        parser.error("DEST is needed (or --check-imports)")
    build(Path(args.dest).resolve(), args.with_carried, args.wheel_list)
    return 0


if __name__ == "__main__":
    sys.exit(main())
