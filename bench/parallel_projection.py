"""On paper: one 1024² edit on 2 / 4 / 8 GPUs (CFG-parallel, Ulysses, ring), from the analytic DiT FLOPs and the
bytes each parallel mode moves per step. A PROJECTION, not a measurement: no multi-GPU machine was available.

    PYTHONPATH=src python bench/parallel_projection.py > bench/PARALLEL-table.md

Model (every number it uses is printed with the table):
- DiT FLOPs per step: `step1x_edit.bench.dit_flops` (batch 2 = CFG, 640 text + 8192 image tokens at 1024²).
- Compute per rank: the FLOPs divide over cfg x ulysses x ring ranks (CFG: half the rows; sequence parallel: a slice
  of the tokens for every linear layer and of the queries for attention), except the connector, which every
  sequence rank runs whole on its rows (it needs the whole masked prompt). Same sustained throughput per GPU as
  one GPU (smaller GEMMs would in fact run a little less efficiently: optimistic).
- Bytes per step and rank (bf16, what the code in src/step1x_edit/models/parallel.py and diffusers 0.42 send):
  Ulysses: per attention call, all-to-all of q, k, v before and of the output after: 4 x B x S/U x hidden x 2 bytes,
  (U-1)/U of it leaving the rank. Ring (diffusers' `allgather` rotation): per attention call, all-gather of k and v:
  the rank receives (R-1) x 2 x B x S/R x hidden x 2 bytes. Ulysses x ring: both, on the smaller slices. Per step the
  output projection is gathered over the sequence ranks and, with CFG-parallel, over the two cfg ranks (B x N x 64
  values), plus a 4-byte stop flag. 57 attention calls per step (19 double + 38 single blocks).
- Communication time = bytes / bus bandwidth + collectives x latency; not overlapped with compute (diffusers'
  Ulysses and all-gather ring run their collectives in line): pessimistic.
- An edit = the non-DiT work (text encoder, VAE encode + decode; every rank runs it, so it does not shrink) + 28 steps.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from step1x_edit.bench import BENCH_DIT, TXT_TOKENS, connector_flops, dit_flops, image_tokens  # noqa: E402
from step1x_edit.models.parallel import Degrees  # noqa: E402

SIZE = 1024
STEPS = 28  # the official inference script's default, and its published timings
BATCH = 2  # prompt + negative rows (guidance on)
BYTES = 2  # bf16
CALLS = BENCH_DIT.depth + BENCH_DIT.depth_single_blocks  # attention calls per DiT forward
NON_DIT_S = 1.0  # ASSUMPTION: Qwen2.5-VL encode (prompt + negative) + VAE encode/decode at 1024² on one GPU

# Official Step1X-Edit figures, as issue 12 quotes them (H800, 1024², 28 steps, xDiT for several GPUs)
OFFICIAL_S = {1: 22.0, 2: 12.8, 4: 8.2}


@dataclass(frozen=True)
class Gpu:
    name: str
    tflops: float  # sustained bf16 TFLOP/s on the DiT
    note: str


@dataclass(frozen=True)
class Link:
    name: str
    gbps: float  # achievable bus bandwidth per GPU for all-to-all / all-gather, GB/s
    latency_us: float  # per collective
    note: str


H100 = Gpu("H100 SXM", 989 * 0.45, "ASSUMPTION, not measured: 45 % of the 989 TFLOP/s dense bf16 peak")
H800 = Gpu("H800 SXM", 0.0, "calibrated: the official one-GPU 22 s minus the assumed non-DiT time, over 28 steps")
LINKS = {
    "NVLink 4": Link("NVLink 4", 360.0, 15.0, "H100 SXM: 450 GB/s per direction, ~80 % reached by NCCL"),
    "PCIe 5": Link("PCIe 5", 40.0, 30.0, "x16: 64 GB/s per direction, ~40 GB/s peer to peer through a switch"),
    "H800 NVLink": Link("H800 NVLink", 160.0, 15.0, "H800 SXM: 400 GB/s both directions (200 per direction), ~80 %"),
}
LAYOUTS = {
    1: [Degrees()],
    2: [Degrees(cfg=2), Degrees(ulysses=2), Degrees(ring=2)],
    4: [Degrees(cfg=2, ulysses=2), Degrees(cfg=2, ring=2), Degrees(ulysses=4), Degrees(ring=4)],
    8: [Degrees(cfg=2, ulysses=4), Degrees(cfg=2, ulysses=2, ring=2), Degrees(cfg=2, ring=4), Degrees(ulysses=8)],
}


def tokens() -> tuple[int, int]:
    n_img = image_tokens(SIZE)
    return n_img, n_img + TXT_TOKENS


def flops_per_rank(d: Degrees) -> float:
    n_img, _ = tokens()
    total = dit_flops(BENCH_DIT, n_img, batch=BATCH)
    conn = connector_flops(BENCH_DIT.connector, TXT_TOKENS, BATCH)
    return (total - conn) / d.world_size + conn / d.cfg


def comm_per_rank(d: Degrees) -> tuple[float, int]:
    """(bytes sent or received by one rank per DiT step, collectives per step)."""
    n_img, s = tokens()
    b = BATCH // d.cfg  # rows per rank
    hidden = BENCH_DIT.hidden_size
    nbytes, collectives = 0.0, 0
    if d.ulysses > 1:  # q, k, v and out: all-to-all over the ulysses group, on this rank's S/(U*R) tokens
        local = b * s / d.sequence * hidden * BYTES
        nbytes += CALLS * 4 * local * (d.ulysses - 1) / d.ulysses
        collectives += CALLS * 4
    if d.ring > 1:  # k and v (after Ulysses: S/R tokens, H/U heads) all-gathered over the ring group
        local = b * s / d.ring * hidden / d.ulysses * BYTES
        nbytes += CALLS * 2 * local * (d.ring - 1)
        collectives += CALLS
    out = b * n_img * BENCH_DIT.out_channels * BYTES
    if d.sequence > 1:  # proj_out gathered over the sequence ranks
        nbytes += out * (d.sequence - 1) / d.sequence
        collectives += 1
    if d.cfg > 1:  # the two halves of the batch exchanged
        nbytes += out
        collectives += 1
    if d.world_size > 1:
        collectives += 1  # the stop flag
    return nbytes, collectives


def step_ms(d: Degrees, tflops: float, link: Link) -> tuple[float, float, float]:
    """(compute ms, communication ms, step ms) per rank."""
    compute = flops_per_rank(d) / (tflops * 1e12) * 1e3
    nbytes, collectives = comm_per_rank(d)
    comm = (nbytes / (link.gbps * 1e9) + collectives * link.latency_us * 1e-6) * 1e3 if d.world_size > 1 else 0.0
    return compute, comm, compute + comm


def h800_tflops() -> float:
    n_img, _ = tokens()
    return dit_flops(BENCH_DIT, n_img, batch=BATCH) / ((OFFICIAL_S[1] - NON_DIT_S) / STEPS) / 1e12


def table(gpu: Gpu, tflops: float, links: list[str], official: bool) -> list[str]:
    head = "| GPUs | layout | link | MB / rank / step | collectives / step | compute ms | comm ms | step ms " \
           "| 28-step edit s | speed-up |" + (" official (H800, xDiT) s |" if official else "")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    one = None
    for gpus, layouts in LAYOUTS.items():
        for d in layouts:
            for name in (links if gpus > 1 else links[:1]):
                link = LINKS[name]
                compute, comm, step = step_ms(d, tflops, link)
                edit = NON_DIT_S + STEPS * step / 1e3
                one = one or edit
                nbytes, collectives = comm_per_rank(d)
                row = (f"| {gpus} | {d.describe() if gpus > 1 else 'one GPU'} | {name if gpus > 1 else '-'} "
                       f"| {nbytes / 1e6:,.0f} | {collectives} | {compute:.0f} | {comm:.1f} | {step:.0f} | {edit:.1f} "
                       f"| {one / edit:.2f}x |")
                if official:
                    row += f" {OFFICIAL_S[gpus]:.1f} |" if gpus in OFFICIAL_S and name == links[0] else " |"
                rows.append(row)
    return rows


def main() -> None:
    n_img, s = tokens()
    total = dit_flops(BENCH_DIT, n_img, batch=BATCH)
    print(f"**Projection, not a measurement.** {SIZE}² working size: {n_img} image tokens (target + reference) + "
          f"{TXT_TOKENS} text tokens = {s}; batch {BATCH} (CFG); DiT {total / 1e12:.1f} TFLOP per step "
          f"(`dit_flops`); {CALLS} attention calls per step; bf16; {STEPS} steps; non-DiT work {NON_DIT_S:.1f} s "
          "(assumed, every rank runs it).\n")
    print(f"### {H100.name}: {H100.tflops:.0f} TFLOP/s sustained ({H100.note})\n")
    print("\n".join(table(H100, H100.tflops, ["NVLink 4", "PCIe 5"], official=False)))
    h800 = h800_tflops()
    print(f"\n### {H800.name}: {h800:.0f} TFLOP/s sustained ({H800.note}), next to the official figures\n")
    print("\n".join(table(H800, h800, ["H800 NVLink"], official=True)))
    print("\nLinks (ASSUMPTIONS): " + "; ".join(f"{k}: {v.gbps:.0f} GB/s, {v.latency_us:.0f} µs per collective "
                                                 f"({v.note})" for k, v in LINKS.items()))


if __name__ == "__main__":
    main()
