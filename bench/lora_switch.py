"""What switching LoRA adapters between batches costs (models/lora_adapters.py), against a plain DiT step measured
in the same run. Not part of the test suite.

    .venv/bin/python bench/lora_switch.py                      # CPU: the dev preset's DiT, rank-8 adapters
    python bench/lora_switch.py --full --out $OUT/lora.md       # GPU: full-size DiT (random weights, bf16),
                                                                # rank-256 adapters on every block layer

Two official-layout (kohya) adapters on every block layer (double: qkv, proj, mlp.0/2, mod.lin, both streams;
single: linear1, linear2, modulation.lin) are written to a temporary directory, as a fine-tune such as the official
`fix-hand` LoRA would be. Then, for each mode:

- eager (the default): first use of each adapter (read, convert, inject: `load_lora_adapter`), the switch between
  two cached adapters (`set_adapters` + `enable_lora`, then `disable_lora`: what a batch pays when its adapter set
  differs from the last one), and a DiT forward with none, one and two adapters;
- hot-swap (what regional compile uses): preparing the slots, the swap of one adapter into a slot (a copy of its
  weights), the re-use of a slot that holds it already, and a forward with one adapter. (Run without compiling:
  compiled speed is `bench/bench.py`'s business; what hot-swap adds is the copy.)

Times are means over `--iters` (forwards) or `--switches` (switches), after one warm-up call.
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from step1x_edit.bench import build_random, dims, dit_inputs, environment, sync, time_calls  # noqa: E402
from step1x_edit.models.dit import Step1XEditTransformer2DModel  # noqa: E402
from step1x_edit.models.lora_adapters import LoraAdapters, LoraLibrary  # noqa: E402
from step1x_edit.models.weights import DIT_RULES, to_official  # noqa: E402

DOUBLE = ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "img_mod.lin",
          "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2", "txt_mod.lin")
SINGLE = ("linear1", "linear2", "modulation.lin")


def write_loras(directory: Path, cfg, rank: int, names=("a", "b")) -> int:
    """Kohya files with random down/up on every block layer, written one at a time; returns bytes per file."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = Step1XEditTransformer2DModel.from_dit_config(cfg)
    shapes = {k: v.shape for k, v in to_official(model, DIT_RULES).items()}
    layers = ([f"double_blocks.{i}.{n}" for i in range(cfg.depth) for n in DOUBLE]
              + [f"single_blocks.{i}.{n}" for i in range(cfg.depth_single_blocks) for n in SINGLE])
    size = 0
    for seed, name in enumerate(names):
        g = torch.Generator().manual_seed(seed)
        sd = {}
        for layer in layers:
            out_f, in_f = shapes[layer + ".weight"]
            key = "lora_unet_" + layer.replace(".", "_")
            sd[key + ".lora_down.weight"] = (torch.randn(rank, in_f, generator=g) * 0.01).bfloat16()
            sd[key + ".lora_up.weight"] = (torch.randn(out_f, rank, generator=g) * 0.01).bfloat16()
            sd[key + ".alpha"] = torch.tensor(rank / 2, dtype=torch.bfloat16)
        save_file(sd, str(directory / f"{name}.safetensors"))
        size = (directory / f"{name}.safetensors").stat().st_size
        del sd
    return size


def seconds(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def enter_exit(ad: LoraAdapters, choices) -> None:
    """What a batch pays around its denoising: its adapters on, then off."""
    with ad.applied(choices):
        pass


def mean_switch(ad: LoraAdapters, plans: list, device: torch.device, n: int) -> float:
    """Mean seconds to put a batch's adapters on and take them off (no forward), cycling through `plans`."""
    for p in plans:
        enter_exit(ad, p)
    sync(device)
    t0 = time.perf_counter()
    for i in range(n):
        enter_exit(ad, plans[i % len(plans)])
    sync(device)
    return (time.perf_counter() - t0) / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="full-size DiT (needs a GPU with ~40 GB)")
    ap.add_argument("--rank", type=int, default=None, help="adapter rank (default: 256 full, 8 dev)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default: 1024 full, 512 dev)")
    ap.add_argument("--iters", type=int, default=None, help="forwards per measurement (default: 5 full, 10 dev)")
    ap.add_argument("--switches", type=int, default=20, help="switches per measurement")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=None, help="also write the report here (markdown)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    d = dims(tiny=not args.full)
    rank = args.rank or (256 if args.full else 8)
    size = args.size or (1024 if args.full else 512)
    iters = args.iters or (5 if args.full else 10)
    command = "python bench/lora_switch.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows: list[tuple[str, str]] = []

    def dit():
        return build_random(lambda: Step1XEditTransformer2DModel.from_dit_config(d.dit), device, dtype, seed=0)

    with tempfile.TemporaryDirectory(prefix="step1x-lora-bench-") as tmp:
        file_bytes = write_loras(Path(tmp), d.dit, rank)
        x = dit_inputs(size, d, device, dtype, batch=2)

        # --- eager ---------------------------------------------------------------------------------------------
        model = dit()
        ad = LoraAdapters(model, LoraLibrary(tmp, d.dit), cache_size=8, slots=4)
        with torch.no_grad():
            base = time_calls(lambda: x.ours(model), device, iters)
            rows.append(("DiT forward, no adapter (baseline)", f"{base * 1e3:.1f} ms"))
            for name in ("a", "b"):
                t = seconds(lambda: enter_exit(ad, [(name, 1.0)]), device)
                rows.append((f"eager: first use of adapter {name!r} (read, convert, inject)", f"{t * 1e3:.1f} ms"))
            sw = mean_switch(ad, [[("a", 1.0)], [("b", 0.8)]], device, args.switches)
            rows.append(("eager: switch a <-> b (set_adapters + enable_lora + disable_lora)", f"{sw * 1e3:.2f} ms"))
            same = mean_switch(ad, [[("a", 1.0)]], device, args.switches)
            rows.append(("eager: the same adapter as the last batch (enable_lora + disable_lora)",
                         f"{same * 1e3:.2f} ms"))
            sw0 = mean_switch(ad, [[]], device, args.switches)
            rows.append(("eager: a batch without adapters (disable_lora)", f"{sw0 * 1e3:.2f} ms"))
            for plan, label in (([("a", 1.0)], "one adapter"), ([("a", 1.0), ("b", 0.5)], "two adapters")):
                with ad.applied(plan):
                    t = time_calls(lambda: x.ours(model), device, iters)
                rows.append((f"eager: DiT forward, {label}", f"{t * 1e3:.1f} ms ({t / base:.2f}x baseline)"))
            after = time_calls(lambda: x.ours(model), device, iters)
            rows.append(("eager: DiT forward, adapters loaded but off", f"{after * 1e3:.1f} ms ({after / base:.2f}x)"))
            again = time_calls(lambda: x.ours(model), device, iters)
            rows.append(("eager: the same, measured again (run-to-run noise)", f"{again * 1e3:.1f} ms "
                                                                             f"({again / base:.2f}x)"))
        del ad, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

        # --- hot-swap ------------------------------------------------------------------------------------------
        model = dit()
        ad = LoraAdapters(model, LoraLibrary(tmp, d.dit), cache_size=8, slots=4)
        with torch.no_grad():
            t = seconds(ad.prepare_hotswap, device)
            rows.append((f"hot-swap: prepare {ad.slots} slots (rank {ad._slot_rank})", f"{t * 1e3:.1f} ms"))
            for name in ("a", "b"):
                t = seconds(lambda: enter_exit(ad, [(name, 1.0)]), device)
                rows.append((f"hot-swap: first use of {name!r} (read, convert, copy into a slot)", f"{t * 1e3:.1f} ms"))
            sw = mean_switch(ad, [[("a", 1.0)], [("b", 1.0)]], device, args.switches)
            rows.append(("hot-swap: switch a <-> b (copy into slot 0)", f"{sw * 1e3:.2f} ms"))
            same = mean_switch(ad, [[("a", 1.0)]], device, args.switches)
            rows.append(("hot-swap: same adapter again (no copy)", f"{same * 1e3:.2f} ms"))
            with ad.applied([("a", 1.0)]):
                t = time_calls(lambda: x.ours(model), device, iters)
            rows.append(("hot-swap: DiT forward, one adapter (4 slots prepared)", f"{t * 1e3:.1f} ms ({t / base:.2f}x)"))

    env = environment(device)
    lines = [f"# LoRA adapter switching ({'full size' if args.full else 'dev preset DiT'})", "",
             f"Command: `{command.strip()}`", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [f"- machine: {platform.machine()}, {torch.get_num_threads()} torch threads", "",
              f"DiT {d.dit.depth}+{d.dit.depth_single_blocks} blocks, hidden {d.dit.hidden_size}, {dtype}; image "
              f"{size}x{size} (+ reference), batch 2 (CFG), {iters} forwards per row; adapters of rank {rank} on "
              f"every block layer, {file_bytes / 2**20:.1f} MiB each (bf16 file).", "",
              "| what | time |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
