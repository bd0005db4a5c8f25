"""`step1x-edit bench`'s flags, apart from the benchmark itself (which imports torch), so the command-line parser
builds without it."""

from __future__ import annotations

import argparse

# Measurement groups, run in this order (each applies its option on top of the ones before it that ran; the rows'
# `mode` names exactly the options that were on). `cache` is opt-in: with random weights a step cache never skips
# (the first-block residual of a random model changes far more per step than a trained one's), so its rows only
# spend device time.
MODES = ("baseline", "eager", "attention", "fused", "vae", "compile", "http", "fp8", "cache", "parity")
DEFAULT_MODES = tuple(m for m in MODES if m != "cache")
E2E_MODES = ("eager", "compile", "fp8", "cache")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true", help="dev dimensions on the CPU in fp32 (a dry run)")
    parser.add_argument("--out", help="write the markdown report here, and its JSON twin beside it (OUT with "
                                      ".json), after every row; the log goes to OUT.log")
    parser.add_argument("--out-dir", help="write results.md, results.json and results.log into this directory")
    parser.add_argument("--log", help="log file (default: beside the report, else bench-<time>.log)")
    parser.add_argument("--sizes", default=None, help="working sizes, comma-separated (default 1024; tiny 256)")
    parser.add_argument("--steps", default=None, help="step counts of the edits (default 28,20; tiny 3,2)")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help=f"measurement groups, subset of {','.join(MODES)} (run in that order)")
    parser.add_argument("--e2e-modes", default="eager,compile,fp8",
                        help=f"groups that also run whole edits, subset of {','.join(E2E_MODES)}")
    parser.add_argument("--http-n", default="1,4", help="images per HTTP request, one request each (n)")
    parser.add_argument("--http-steps", type=int, default=None, help="steps of the HTTP requests (default 20; tiny 2)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the diffusers baseline")
    parser.add_argument("--no-parity", dest="parity", action="store_false", help="skip the bf16-vs-fp32 parity check")
    parser.add_argument("--step-iters", type=int, default=None, help="timed DiT calls per size (default 5; tiny 2)")
    parser.add_argument("--cache-threshold", type=float, default=0.1, help="step cache threshold of the cache mode")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    parser.add_argument("--attention-backends", default="native,cudnn,flash,efficient,flash-attn,flash-attn-3",
                        help="candidates for the attention micro-benchmark (math is always too slow to win)")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="time budget in seconds (0 = none): a measurement starts only if the longest one so "
                             "far (or its own estimate, e.g. a first compile) still fits; the files are written "
                             "after every row either way")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--seed", type=int, default=0)
