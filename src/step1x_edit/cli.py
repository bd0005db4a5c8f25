"""`step1x-edit`: serve, edit, check-reference, download, bench."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (default: STEP1X_* environment, else the dev preset)")
    g.add_argument("--preset", choices=["auto", "dev", "full"], help="dev = tiny random weights (outputs are noise)")
    g.add_argument("--dit-path", dest="dit_path", help="official DiT file (step1x-edit-*.safetensors)")
    g.add_argument("--vae-path", dest="vae_path", help="vae.safetensors")
    g.add_argument("--encoder-path", dest="encoder_path", help="Qwen2.5-VL-7B-Instruct directory")
    g.add_argument("--model-dir", dest="model_dir", help="diffusers-style directory or a folder of official files")
    g.add_argument("--dit-fp8", dest="dit_fp8", action="store_const", const=True,
                   help="keep the DiT's linear weights in float8 (about half the memory)")
    g.add_argument("--version", choices=["auto", "v1.0", "v1.1"], help="override the version detected from the DiT")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default auto)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--size-level", dest="size_level", type=int, help="working area ~ size_level^2 pixels")
    from .models.fastpath import add_performance_arguments

    add_performance_arguments(p)


def settings_from_args(args: argparse.Namespace):
    """Settings from the environment, with every CLI flag that was given taking precedence."""
    from .settings import Settings

    overrides = {k: v for k, v in vars(args).items() if v is not None and k in Settings.model_fields}
    return Settings(**overrides)


def _edit(args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm

    from .pipeline.edit import build_pipeline
    from .pipeline.types import EditRequest

    settings = settings_from_args(args)
    if settings.resolved_preset() == "dev":
        print("note: no weights configured: using the dev preset (tiny random weights, the output is noise)",
              file=sys.stderr)
    try:
        image = Image.open(args.image)
        image.load()
    except (OSError, UnidentifiedImageError) as e:
        print(f"error: cannot read image {args.image}: {e}", file=sys.stderr)
        return 2
    try:
        pipe = build_pipeline(settings)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    req = EditRequest(image=image, prompt=args.instruction, negative_prompt=args.negative, n=args.n,
                      steps=args.steps, guidance_scale=args.guidance, strength=args.strength, seed=args.seed)
    try:
        pipe.validate(req)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .pipeline.sampling import start_index

    start = time.perf_counter()
    steps = req.steps - (start_index(req.steps, req.strength) if req.strength < 1 else 0)  # img2img skips some
    with tqdm(total=steps, unit="step", desc="denoise", file=sys.stderr) as bar:
        def on_step(i: int, total: int) -> None:
            bar.total = total
            bar.update(i - bar.n)

        (result,) = pipe.run([req], on_step=on_step)
    elapsed = time.perf_counter() - start
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(result.images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(result.images))]
    for path, img in zip(paths, result.images):
        img.save(path)
    w, h = result.images[0].size
    print(f"wrote {', '.join(map(str, paths))}: {w}x{h}, seed {result.seeds[0]}"
          + (f"..{result.seeds[-1]}" if len(result.seeds) > 1 else "")
          + f", {elapsed:.1f} s ({pipe.info()['preset']} preset, {pipe.info()['device']})")
    return 0


def _check_reference(args: argparse.Namespace) -> int:
    from .reference import main as check

    status = 0
    for d in args.directories:
        print(f"== {d}")
        status |= check(d, verbose=args.verbose)
    return status


def build_parser() -> argparse.ArgumentParser:
    from .pipeline.types import DEFAULT_GUIDANCE, DEFAULT_STEPS, DEFAULT_STRENGTH

    parser = argparse.ArgumentParser(prog="step1x-edit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    from .api.cli_serve import add_serve_arguments

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
    _add_model_arguments(edit)

    ref = sub.add_parser("check-reference", help="compare against golden tensors of the official code")
    ref.add_argument("directories", nargs="+", metavar="DIR")

    from .bench import add_bench_arguments
    from .download import add_download_arguments

    add_bench_arguments(sub.add_parser("bench", help="speed table: full-size model, random weights, GPU (--tiny: CPU smoke run)"))
    add_download_arguments(sub.add_parser("download", help="fetch the weights from the Hugging Face Hub and verify them"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        from .api.cli_serve import run_serve

        return run_serve(args)
    if args.command == "edit":
        return _edit(args)
    if args.command == "bench":
        from .bench import run_bench

        return run_bench(args)
    if args.command == "download":
        from .download import run_download

        return run_download(args)
    return _check_reference(args)


if __name__ == "__main__":
    sys.exit(main())
