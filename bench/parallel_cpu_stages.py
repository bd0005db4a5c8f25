"""Stage times of one dev-preset edit (512 working size, 6 steps, CFG) in one process and on two CPU ranks (Gloo) in
each mode: the "Measured on this CPU" lines of bench/PARALLEL.md. Best of two timed runs after a warm-up, rank 0's
stage timings (`EditResult.timings`).

    PYTHONPATH=src python bench/parallel_cpu_stages.py      # from the checkout, ../shared/examples beside it
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from step1x_edit.pipeline.parallel import build_any_pipeline
from step1x_edit.pipeline.types import EditRequest
from step1x_edit.settings import Settings

EXAMPLE = Path(__file__).resolve().parents[2] / "shared" / "examples" / "0000.jpg"
MODES = [{}, {"cfg_parallel": 2}, {"ulysses_degree": 2}, {"ring_degree": 2}]


def request() -> EditRequest:
    return EditRequest(image=Image.open(EXAMPLE), prompt="make it snowy", negative_prompt="blurry", steps=6, seed=1,
                       size_level=512)


def main() -> None:
    torch.set_num_threads(2)
    for mode in MODES:
        pipe = build_any_pipeline(Settings(preset="dev", device="cpu", size_level=512, **mode))
        try:
            pipe.run([request()])  # warm-up
            runs = [pipe.run([request()])[0].timings for _ in range(2)]
            best = min(runs, key=lambda t: sum(t.values()))
            print(mode or "one process", {k: round(v, 2) for k, v in best.items()}, "total",
                  round(sum(best.values()), 2), "rank 0 threads", torch.get_num_threads(), flush=True)
        finally:
            if hasattr(pipe, "close"):
                pipe.close()


if __name__ == "__main__":  # (the ranks are spawned: they import this file)
    main()
