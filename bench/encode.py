"""Encoding the outputs on the CPU, after the GPU is done: PNG's zlib level (size against time), JPEG and WebP for
reference, and an n-image answer encoded one image after another against `api.images.encode_images` (parallel).
Not part of the test suite; it picks `api/images.PNG_LEVEL` and writes the table in bench/ENCODING.md.

    .venv/bin/python bench/encode.py                      # prints the tables (about a minute on 2 cores)
    .venv/bin/python bench/encode.py --out bench/ENCODING.md --repeats 5

The images are the project's example photos (../shared/examples, or STEP1X_SHARED_DIR), resized to 1024x1536
(the README example's output size): real photos, since a generated edit compresses like a photo (the dev preset's
noise would not). The baseline, measured in the same run, is what the server did before: PNG level 4, the n
images one after another. Times are medians over the photos and repeats (the machine may be shared: the load
average is printed). The level is picked by the time to encode and send one image over a 100 Mbit/s link, the
slower end of what reaches a server; at 1 Gbit/s the table shows that too.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import PIL  # noqa: E402
from PIL import Image, features  # noqa: E402

from step1x_edit.api import images as out  # noqa: E402

SIZE = (1024, 1536)
BASELINE_LEVEL = 4  # the server's level before this measurement
LINKS_MBIT = (100, 1000)


def photos() -> list[Image.Image]:
    shared = Path(os.environ.get("STEP1X_SHARED_DIR", REPO.parent / "shared"))
    paths = sorted(p for p in (shared / "examples").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise SystemExit(f"no example photos in {shared / 'examples'}")
    return [Image.open(p).convert("RGB").resize(SIZE, Image.Resampling.LANCZOS) for p in paths]


CPU_PER_WALL: dict = {}  # case name -> this process's CPU seconds / wall seconds (> 1: several cores at once)


def interleaved(cases: dict, repeats: int) -> dict:
    """{name: (median seconds, last result)} of each zero-argument callable in `cases`, run in turn `repeats` times
    (round-robin, so that a busy spell of a shared machine hits every case alike)."""
    times: dict = {name: [] for name in cases}
    cpu: dict = {name: 0.0 for name in cases}
    results: dict = {}
    for _ in range(repeats):
        for name, fn in cases.items():
            c0, t0 = time.process_time(), time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name] += time.process_time() - c0
    for name in cases:
        CPU_PER_WALL[name] = cpu[name] / sum(times[name])
    return {name: (statistics.median(times[name]), results[name]) for name in cases}


def png_at(img: Image.Image, level: int) -> bytes:
    """The server's PNG encode at an explicit level (what `encode_image` does with `PNG_LEVEL`)."""
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    zlib = "zlib-ng " + str(features.version("zlib")) if features.check_feature("zlib_ng") else \
        "zlib " + str(features.version("zlib"))
    return (f"{cpu}, {os.cpu_count()} CPUs visible, Python {platform.python_version()}, Pillow {PIL.__version__} "
            f"({zlib}, libjpeg-turbo {features.version('jpg')}, libwebp {features.version('webp')}), "
            f"{platform.system()} {platform.release()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timings per photo and case (median reported)")
    ap.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = ap.parse_args(argv)

    imgs = photos()
    load0 = os.getloadavg()
    lines = [f"Command: `.venv/bin/python bench/encode.py --repeats {args.repeats}`", "",
             f"Machine: {machine()}", "",
             f"Images: {len(imgs)} example photos at {SIZE[0]}x{SIZE[1]}, RGB; times are medians over photos x "
             f"{args.repeats} repeats (an answer of n: {2 * args.repeats} repeats), cases interleaved; load average at start {load0[0]:.2f}.", ""]

    # --- PNG levels ------------------------------------------------------------------------------------------------
    per_photo = [interleaved({level: (lambda img=img, level=level: png_at(img, level)) for level in range(10)},
                             args.repeats) for img in imgs]
    rows: dict[int, tuple[float, float]] = {
        level: (statistics.median(r[level][0] for r in per_photo), statistics.mean(len(r[level][1]) for r in per_photo) / 1e6)
        for level in range(10)}
    base_t, base_mb = rows[BASELINE_LEVEL]
    best_mb = min(mb for _, mb in rows.values())

    def send_s(mb: float, mbit: int) -> float:
        return mb * 8 / mbit

    lines += ["## PNG: zlib level", "",
              "| level | encode (ms) | vs level 4 | size (MB) | vs smallest | "
              + " | ".join(f"encode + send at {m} Mbit/s (ms)" for m in LINKS_MBIT) + " |",
              "|---|---|---|---|---|" + "---|" * len(LINKS_MBIT)]
    for level, (t, mb) in rows.items():
        sends = " | ".join(f"{1000 * (t + send_s(mb, m)):.0f}" for m in LINKS_MBIT)
        mark = " (baseline)" if level == BASELINE_LEVEL else ""
        lines.append(f"| {level}{mark} | {1000 * t:.0f} | {t / base_t:.2f}x | {mb:.2f} | +{100 * (mb / best_mb - 1):.1f} % "
                     f"| {sends} |")
    pick = min(range(1, 10), key=lambda lv: rows[lv][0] + send_s(rows[lv][1], LINKS_MBIT[0]))
    lines += ["", f"Pick (least encode + send at {LINKS_MBIT[0]} Mbit/s, levels 1-9): **level {pick}**, "
              f"{1000 * rows[pick][0]:.0f} ms and {rows[pick][1]:.2f} MB against the baseline's {1000 * base_t:.0f} ms "
              f"and {base_mb:.2f} MB. The server uses `PNG_LEVEL = {out.PNG_LEVEL}`.", ""]

    # --- JPEG / WebP -----------------------------------------------------------------------------------------------
    lines += ["## JPEG and WebP (`output_format`, `output_compression` = quality)", "",
              "| format | quality | encode (ms) | size (MB) |", "|---|---|---|---|"]
    kinds = [(fmt, quality) for fmt in ("jpeg", "webp") for quality in (100, 90, 75)]
    per_photo = [interleaved({k: (lambda img=img, k=k: out.encode_image(img, *k)) for k in kinds}, args.repeats)
                 for img in imgs]
    for fmt, quality in kinds:
        t = statistics.median(r[(fmt, quality)][0] for r in per_photo)
        mb = statistics.mean(len(r[(fmt, quality)][1]) for r in per_photo) / 1e6
        lines.append(f"| {fmt} | {quality}{' (default)' if quality == out.DEFAULT_QUALITY else ''} | "
                     f"{1000 * t:.0f} | {mb:.2f} |")
    lines.append("")

    # --- an n-image answer -----------------------------------------------------------------------------------------
    out.encode_images(imgs[:2])  # start the pool's threads
    lines += ["## An answer of n PNGs", "",
              f"Baseline: level {BASELINE_LEVEL}, one image after another (the server before). "
              f"Now: `encode_images` (level {out.PNG_LEVEL}, the images on the shared pool).", "",
              f"| n | baseline (ms) | level {out.PNG_LEVEL} serial (ms) | level {BASELINE_LEVEL} parallel (ms) "
              "| now (ms) | now vs baseline | cores busy: baseline / now |", "|---|---|---|---|---|---|---|"]
    pool = out._ENCODERS  # noqa: SLF001 - the server's own pool, to time level 4 in parallel as well
    for n in (1, 2, 4):
        b = (imgs * 4)[:n]
        r = interleaved({"base": lambda: [png_at(img, BASELINE_LEVEL) for img in b],
                         "serial_new": lambda: [png_at(img, out.PNG_LEVEL) for img in b],
                         "par_base": lambda: list(pool.map(lambda img: png_at(img, BASELINE_LEVEL), b)),
                         "now": lambda: out.encode_images(b, "png")}, args.repeats * 2)
        (t_base, serial), (t_serial_new, _), (t_par_base, par), (t_now, now) = (
            r["base"], r["serial_new"], r["par_base"], r["now"])
        assert par == serial, "parallel encoding changed the bytes"
        assert now == [png_at(img, out.PNG_LEVEL) for img in b], "encode_images changed the bytes"
        lines.append(f"| {n} | {1000 * t_base:.0f} | {1000 * t_serial_new:.0f} | {1000 * t_par_base:.0f} | "
                     f"{1000 * t_now:.0f} | {t_base / t_now:.2f}x faster | "
                     f"{CPU_PER_WALL['base']:.2f} / {CPU_PER_WALL['now']:.2f} |")
    load1 = os.getloadavg()
    lines += ["", "Cores busy = this process's CPU time / wall time over the case's runs: 1.0 is one core all the "
              "time; above 1, the encodes ran on several cores at once (which shows in the wall time only when "
              "the cores are free).", "",
              f"Load average at the end: {load1[0]:.2f}. Parallel and serial encodes give identical bytes "
              "(checked in the run)."]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
