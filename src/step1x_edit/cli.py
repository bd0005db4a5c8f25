"""`step1x-edit`: serve, edit, check-reference, download, bench.

The parser imports nothing heavy (settings and argparse): each sub-command imports torch and its modules only when
it runs, so `step1x-edit --help` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .cli_args import settings_from_args


def lora_arg(text: str):
    """`--lora NAME[:SCALE]` -> LoraChoice (scale 1 when omitted)."""
    from .pipeline.types import LoraChoice

    name, sep, scale = text.rpartition(":")
    if not sep:
        return LoraChoice(text, 1.0)
    try:
        return LoraChoice(name, float(scale))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME:SCALE (a number), got {text!r}") from None


def _edit(args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError

    from pydantic import ValidationError

    from .models.layouts import resolve_preset

    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        print(f"error: invalid setting: {e}", file=sys.stderr)
        return 2
    if resolve_preset(settings) == "dev":
        print("note: no weights configured: using the dev preset (tiny random weights, the output is noise)",
              file=sys.stderr)
    try:
        image = Image.open(args.image)
        image.load()
    except (OSError, UnidentifiedImageError) as e:
        print(f"error: cannot read image {args.image}: {e}", file=sys.stderr)
        return 2
    from .pipeline.parallel import build_any_pipeline, startup_problems

    bad = startup_problems(settings)
    if bad:
        print("error: " + "\n  ".join(["impossible parallel settings:", *bad]), file=sys.stderr)
        return 2
    try:
        pipe = build_any_pipeline(settings)  # several ranks: the worker ranks start here
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _edit_with(pipe, args, image)
    finally:
        if hasattr(pipe, "close"):  # several ranks: stop the workers
            pipe.close()


def _edit_with(pipe, args: argparse.Namespace, image) -> int:  # noqa: ANN001 - a PipelineLike, a PIL image
    from tqdm import tqdm

    from .pipeline.sampling import start_index
    from .pipeline.types import EditRequest

    req = EditRequest(image=image, prompt=args.instruction, negative_prompt=args.negative, n=args.n,
                      steps=args.steps, guidance_scale=args.guidance, strength=args.strength, seed=args.seed,
                      loras=tuple(args.lora or ()))
    try:
        prepared = pipe.prepare(req)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    steps = req.steps - (start_index(req.steps, req.strength) if req.strength < 1 else 0)  # img2img skips some
    with tqdm(total=steps, unit="step", desc="denoise", file=sys.stderr) as bar:
        def on_step(i: int, total: int) -> None:
            bar.total = total
            bar.update(i - bar.n)

        try:
            (result,) = pipe.run([prepared], on_step=on_step)
        except ValueError as e:  # e.g. a LoRA file whose tensors turn out corrupt
            print(f"error: {e}", file=sys.stderr)
            return 2
    elapsed = time.perf_counter() - start
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(result.images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(result.images))]
    for path, img in zip(paths, result.images):
        img.save(path)
    w, h = result.images[0].size
    info = pipe.info()
    print(f"wrote {', '.join(map(str, paths))}: {w}x{h}, seed {result.seeds[0]}"
          + (f"..{result.seeds[-1]}" if len(result.seeds) > 1 else "")
          + "".join(f", lora {name}:{scale:g}" for name, scale in prepared.loras)
          + f", {elapsed:.1f} s ({info['preset']} preset, {info['device']}"
          + (f", {info['parallel']}" if "parallel" in info else "") + ")")
    return 0


def _check_reference(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .models.parallel import Degrees
    from .reference import main as check, main_parallel

    try:
        degrees = Degrees.from_settings(settings_from_args(args))
    except ValidationError as e:
        print(f"error: invalid setting: {e}", file=sys.stderr)
        return 2
    if degrees.world_size > 1:  # one group of ranks for every directory
        return main_parallel(args.directories, degrees, verbose=args.verbose)
    status = 0
    for d in args.directories:
        print(f"== {d}")
        status |= check(d, verbose=args.verbose)
    return status


def _bench(args: argparse.Namespace) -> int:
    """`bench`, on one device or (parallel flags) as the same program on every rank, rank 0 reporting."""
    from .bench import run_bench

    settings = settings_from_args(args)
    if settings.cfg_parallel * settings.ulysses_degree * settings.ring_degree == 1:
        return run_bench(args)
    import torch

    from .models import presets
    from .models.parallel import Degrees, problems
    from .pipeline.parallel import run_spmd

    degrees = Degrees.from_settings(settings)
    device_type = "cpu" if args.tiny or (args.device or "").startswith("cpu") else "cuda"
    bad = problems(degrees, heads=(presets.DEV_DIT if args.tiny else presets.FULL_DIT).num_heads,
                   device_type=device_type, device_count=torch.cuda.device_count() if device_type == "cuda" else 0,
                   dtype="float32" if args.tiny else "bfloat16")
    if bad:
        print("bench: " + "\n  ".join(["impossible parallel settings:", *bad]), file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m.strip()]
    if "cache" in modes:  # each rank would skip blocks on its own: see models/parallel.py
        print("bench: the cache mode does not run on several ranks; left out", file=sys.stderr)
        args.modes = ",".join(m for m in modes if m != "cache")
    if "http" in args.modes.split(","):  # a server per rank: the multi-rank server is `serve` itself
        print("bench: the http group does not run on several ranks; left out", file=sys.stderr)
        args.modes = ",".join(m for m in args.modes.split(",") if m != "http")
    args.command_line = getattr(args, "command_line", None) or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    return run_spmd(degrees, _bench_rank, (args, degrees), device_type=device_type,
                    timeout_s=settings.parallel_timeout_s)


def _bench_rank(rank: int, mesh, args: argparse.Namespace, degrees) -> int:  # noqa: ANN001
    from .bench import run_bench

    args = argparse.Namespace(**vars(args), mesh=mesh, degrees=degrees)
    if args.device is None or args.device.startswith("cuda"):
        args.device = "cpu" if args.tiny else f"cuda:{rank}"
    if rank:  # rank 0 writes the report and the log
        args.out, args.out_dir, args.log = None, None, os.devnull
    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    from .api.cli_serve import add_serve_arguments
    from .bench_args import add_bench_arguments
    from .cli_args import add_settings_arguments
    from .download import add_download_arguments
    from .pipeline.types import DEFAULT_GUIDANCE, DEFAULT_STEPS, DEFAULT_STRENGTH

    parser = argparse.ArgumentParser(prog="step1x-edit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    add_serve_arguments(serve)  # model flags included, same names as `edit`

    edit = sub.add_parser("edit", help="run one edit locally")
    edit.add_argument("image")
    edit.add_argument("instruction")
    edit.add_argument("-o", "--output", required=True, help="output PNG (with --n > 1: OUT-0.png, OUT-1.png, ...)")
    edit.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    edit.add_argument("--seed", type=int, default=-1, help="-1 = random (the seed used is printed)")
    edit.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    edit.add_argument("--strength", type=float, default=DEFAULT_STRENGTH)
    edit.add_argument("--negative", default="", help="negative prompt")
    edit.add_argument("--n", type=int, default=1)
    edit.add_argument("--lora", type=lora_arg, action="append", metavar="NAME[:SCALE]",
                      help="a LoRA adapter of --lora-dir by name (file stem), scale 1 by default; repeat for more "
                           "(at most 4)")
    add_settings_arguments(edit, ("model", "performance", "parallel"))

    ref = sub.add_parser("check-reference", help="compare against golden tensors of the official code")
    ref.add_argument("directories", nargs="+", metavar="DIR")
    add_settings_arguments(ref, ("parallel",))

    bench = sub.add_parser("bench", help="speed table: full-size model, random weights, GPU (--tiny: CPU smoke run)")
    add_bench_arguments(bench)
    add_settings_arguments(bench, ("parallel",))
    add_download_arguments(sub.add_parser("download", help="fetch the weights from the Hugging Face Hub and verify them"))
    return parser


def _asks_for_ray(args: argparse.Namespace) -> bool:
    """`--ray`, or STEP1X_RAY=1 without `--no-ray` (settings errors are left to the serve command to report)."""
    if args.ray is not None:
        return bool(args.ray)
    try:
        return settings_from_args(args).ray
    except Exception:  # noqa: BLE001 - pydantic's ValidationError: run_serve reports it
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        if _asks_for_ray(args):  # Ray Serve: deploy/ (the [ray] extra), imported only here
            from .deploy.cli import run_serve_ray

            return run_serve_ray(args)
        from .api.cli_serve import run_serve

        return run_serve(args)
    if args.command == "edit":
        return _edit(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "download":
        from .download import run_download

        return run_download(args)
    return _check_reference(args)


if __name__ == "__main__":
    sys.exit(main())
