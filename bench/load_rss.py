"""Peak host memory while loading a multi-GB official-layout DiT checkpoint (not part of the test suite).

Writes a synthetic `step1x-edit-*.safetensors` with the full-size widths (hidden 3072, connector 3584 -> 4096)
but fewer blocks (default 2 double + 3 single + 1 connector block: ~2.8 GB in bf16), streamed to disk tensor by
tensor so the writer never holds it. Then, in a fresh process per case, loads it with `weights.load_dit` and
reports peak RSS (VmHWM) against the file size and the loaded model's size, and the peaks of anonymous memory and
of mapped file pages (sampled every 2 ms), so "no second full copy" can be read off directly.

    .venv/bin/python bench/load_rss.py                       # cpu, bf16 model (= file bytes) and fp32 model
    .venv/bin/python bench/load_rss.py --cases cuda:bfloat16  # on a GPU host: host RSS while loading to the GPU
    .venv/bin/python bench/load_rss.py --fp8                  # an FP8 file (float8_e4m3fn matrices)

The file goes to --dir (default /tmp) and is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def write_checkpoint(path: Path, double: int, single: int, connector_depth: int, fp8: bool) -> int:
    """Stream a random official-layout checkpoint to `path`; returns its size."""
    import torch

    from step1x_edit.models import presets
    from step1x_edit.models.dit import Step1XEditTransformer2DModel
    from step1x_edit.models.weights import DIT_RULES, expected_official_shapes, with_version

    from dataclasses import replace

    cfg = replace(presets.FULL_DIT, depth=double, depth_single_blocks=single)
    cfg = replace(cfg, connector=replace(cfg.connector, depth=connector_depth))
    with torch.device("meta"):
        model = Step1XEditTransformer2DModel.from_dit_config(with_version(cfg, "v1.1"))
    shapes = expected_official_shapes(model, DIT_RULES)
    header, offset, plan = {}, 0, []
    for key in sorted(shapes):
        shape = shapes[key]
        numel = 1
        for s in shape:
            numel *= s
        is_fp8 = fp8 and len(shape) == 2
        nbytes = numel * (1 if is_fp8 else 2)
        header[key] = {"dtype": "F8_E4M3" if is_fp8 else "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        plan.append((key, numel, is_fp8))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(0)
    chunk = 16 << 20
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, numel, is_fp8 in plan:
            left = numel
            while left:
                n = min(left, chunk)
                t = torch.randn(n, generator=g) * 0.02
                t = t.to(torch.float8_e4m3fn) if is_fp8 else t.to(torch.bfloat16)
                f.write(t.view(torch.uint8).numpy().tobytes())
                left -= n
    return path.stat().st_size


def child(path: str, device: str, dtype: str, fp8_storage: bool) -> None:
    import torch

    from step1x_edit.models.weights import load_dit

    base = _status()
    peaks = dict(base)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            s = _status()
            for k in ("RssAnon", "RssFile", "VmRSS"):
                peaks[k] = max(peaks[k], s[k])
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    model, _ = load_dit(path, device=device, dtype=getattr(torch, dtype), fp8=fp8_storage)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    stop.set()
    th.join()
    end = _status()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"base": base, "peak": peaks | {"VmHWM": end["VmHWM"]}, "end": end, "model_bytes": model_bytes,
                      "model_on": str(next(model.parameters()).device), "seconds": secs}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=3)
    ap.add_argument("--connector-depth", type=int, default=1)
    ap.add_argument("--fp8", action="store_true", help="write float8_e4m3fn matrices (an FP8 checkpoint)")
    ap.add_argument("--cases", nargs="+", default=["cpu:bfloat16", "cpu:float32"],
                    help="device:dtype[:fp8] to load into, one fresh process each (fp8 = FP8 block storage)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", nargs=4, metavar=("PATH", "DEVICE", "DTYPE", "FP8"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2], args.child[3] == "1")
        return 0

    free = shutil.disk_usage(args.dir).free
    path = args.dir / f"step1x-edit-rss-bench{'-fp8' if args.fp8 else ''}.safetensors"
    print(f"free space in {args.dir}: {free / 2**30:.1f} GiB")
    if free < 6 * 2**30:
        print("need ~6 GiB free (the file is ~2.8 GB); use --dir or fewer blocks", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        size = write_checkpoint(path, args.double, args.single, args.connector_depth, args.fp8)
        print(f"wrote {path}: {size / 2**30:.2f} GiB ({args.double} double + {args.single} single blocks, connector "
              f"depth {args.connector_depth}, full widths) in {time.perf_counter() - t0:.0f} s")
        GiB = 2**30
        for case in args.cases:
            device, dtype, *rest = case.split(":")
            out = subprocess.run([sys.executable, __file__, "--child", str(path), device, dtype,
                                  "1" if rest == ["fp8"] else "0"], capture_output=True, text=True)
            if out.returncode:
                print(f"{case}: failed\n{out.stderr[-2000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            base, peak, end = r["base"], r["peak"], r["end"]
            host_model = r["model_bytes"] if r["model_on"] == "cpu" else 0
            print(f"{case}: loaded in {r['seconds']:.1f} s; model {r['model_bytes'] / GiB:.2f} GiB on {r['model_on']}; "
                  f"file {size / GiB:.2f} GiB\n"
                  f"  peak RSS (VmHWM) {peak['VmHWM'] / GiB:.2f} GiB = {base['VmRSS'] / GiB:.2f} GiB before loading "
                  f"(python+torch) + {(peak['VmHWM'] - base['VmRSS']) / GiB:.2f} GiB "
                  f"(model in host memory {host_model / GiB:.2f} GiB, so {(peak['VmHWM'] - base['VmRSS'] - host_model) / GiB:.2f} GiB "
                  f"above it = {(peak['VmHWM'] - base['VmRSS'] - host_model) / size:.1%} of the file)\n"
                  f"  peaks while loading: anonymous {peak['RssAnon'] / GiB:.2f} GiB, mapped file pages "
                  f"{peak['RssFile'] / GiB:.2f} GiB (base {base['RssFile'] / GiB:.2f}); after: RSS {end['VmRSS'] / GiB:.2f} GiB")
    finally:
        if not args.keep and path.exists():
            path.unlink()
            print(f"deleted {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
