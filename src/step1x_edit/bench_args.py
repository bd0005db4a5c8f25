"""`step1x-edit bench`'s flags, apart from the benchmark itself (which imports torch), so the command-line parser
builds without it."""

from __future__ import annotations

import argparse

MODES = ("eager", "fused", "sdpa", "compile", "cache", "fp8")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true", help="dev dimensions on the CPU in fp32 (smoke test)")
    parser.add_argument("--out", help="write the markdown report here (the log goes to OUT.log)")
    parser.add_argument("--log", help="log file (default: OUT.log, else bench-<time>.log in the current directory)")
    parser.add_argument("--sizes", default=None, help="working sizes, comma-separated (default 512,768,1024; tiny 256)")
    parser.add_argument("--steps", default=None, help="step counts of the edits (default 28,20; tiny 3,2)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)} (applied cumulatively)")
    parser.add_argument("--e2e-modes", default="eager,compile,cache,fp8",
                        help="modes that also run whole edits (the others get DiT step timings only)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the diffusers baseline")
    parser.add_argument("--no-parity", dest="parity", action="store_false", help="skip the bf16-vs-fp32 parity check")
    parser.add_argument("--step-iters", type=int, default=None, help="timed DiT calls per size (default 5; tiny 2)")
    parser.add_argument("--cache-threshold", type=float, default=0.1, help="step cache threshold of the cache mode")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    parser.add_argument("--attention-backends", default="native,cudnn,flash,efficient,flash-attn,flash-attn-3",
                        help="candidates for the attention micro-benchmark (math is always too slow to win)")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="stop starting new measurements after this many seconds (0 = no limit); the table "
                             "is still written")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--seed", type=int, default=0)


