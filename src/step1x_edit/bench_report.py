"""The benchmark's report: rows, the two files written after every row (markdown and its JSON twin), the summary.

No torch here: `bench/gpu-check.sh` prints the summary from `results.json` with this module after the benchmark has
ended, also when it was killed at the command's time limit (the files then hold every row finished before).

JSON (`results.json`): {"schema", "device", "torch", "command", "env", "ceilings", "attention", "rows": [{"kind",
"mode", "size", "steps", "n", "seconds", "peak_gib", "mfu", "exact", "status", "note", ...}], "baseline_ratio",
"baseline_ratio_mode", "state"}. `kind`: `dit_step` (one DiT call, batch 2 = one guided image, `seconds` per call),
`edit` (a whole edit through the pipeline, `seconds` end to end, `stages` per pipeline stage), `http` (one
request to the server, `seconds` as the client saw it), `vae_decode` (one image), `parity` (bf16 variants against
fp32). `mode` names exactly the options that were on: `eager`, `fused`, `cudnn` (an attention backend), `compile`,
`fp8`, `cache`, joined by `+` (e.g. `fused+cudnn+fp8+compile`); `baseline` is diffusers' FluxTransformer2DModel.
`mfu`: the DiT's analytic matmul FLOPs over time over the ceiling measured in the same run (the fp8 ceiling for
fp8 modes, `mfu_ceiling` says which).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PUBLISHED = (
    "Published reference (official code, one H800, batch 1, CFG, 28 steps, bf16, flash-attention): "
    "512 / 768 / 1024 px: 5 / 11 / 22 s end to end, peak 42.5 / 46.5 / 49.8 GB; FP8 weights 6.8 / 13.5 / 25 s; "
    "TeaCache 16.8 s at 1024."
)
# The targets at 1024x1024, CFG on, one H100/H200 (checked by `summary`).
TARGETS = {"edit_28_s": 17.0, "edit_20_s": 12.0, "dit_mfu": 0.70, "vs_baseline": 1.3, "fp8_vs_exact": 1.4}
APPROXIMATE = ("fp8", "cache")


def is_exact(mode: str) -> bool:
    return not any(part in APPROXIMATE for part in mode.split("+"))


@dataclass
class Row:
    kind: str
    mode: str
    size: int
    steps: int = 1
    n: int = 1
    seconds: float | None = None
    peak_gib: float | None = None
    mfu: float | None = None
    exact: bool = True
    status: str = "ok"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out


@dataclass
class Report:
    command: str = ""
    env: dict[str, str] = field(default_factory=dict)
    ceilings: dict[str, Any] = field(default_factory=dict)
    attention: dict[str, str] = field(default_factory=dict)
    attention_best: str = "native"
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    state: str = "running"  # running -> finished | stopped: ...
    started: float = field(default_factory=time.monotonic)
    tiny: bool = False

    # --- derived ------------------------------------------------------------------------------------------------
    def find(self, kind: str, mode: str | None = None, size: int | None = None, steps: int | None = None,
             n: int | None = None) -> list[Row]:
        return [r for r in self.rows if r.kind == kind and r.status == "ok" and r.seconds is not None
                and (mode is None or r.mode == mode) and (size is None or r.size == size)
                and (steps is None or r.steps == steps) and (n is None or r.n == n)]

    def baseline_ratio(self) -> tuple[float | None, str]:
        """Baseline seconds per DiT call / the fastest exact mode's, at the largest size both measured."""
        for size in sorted({r.size for r in self.find("dit_step", "baseline")}, reverse=True):
            base = self.find("dit_step", "baseline", size)[0].seconds
            exact = [r for r in self.find("dit_step", size=size) if r.exact and r.mode != "baseline"]
            if exact:
                best = min(exact, key=lambda r: r.seconds)
                return base / best.seconds, f"{best.mode} at {size}²"
        return None, ""

    def to_json(self) -> dict[str, Any]:
        ratio, ratio_mode = self.baseline_ratio()
        return {
            "schema": 1,
            "device": self.env.get("device", "?"),
            "torch": self.env.get("torch", "?"),
            "command": self.command,
            "state": self.state,
            "elapsed_s": round(time.monotonic() - self.started, 1),
            "env": self.env,
            "ceilings": self.ceilings,
            "attention": self.attention,
            "attention_best": self.attention_best,
            "rows": [r.to_json() for r in self.rows],
            "baseline_ratio": ratio,
            "baseline_ratio_mode": ratio_mode,
            "notes": self.notes,
            "errors": self.errors,
        }


# --- files -------------------------------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    """Whole file or the previous one: a run killed mid-write never leaves half a table."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Writer:
    """Writes the markdown and the JSON twin; `save()` after every row."""

    def __init__(self, report: Report, markdown_path: Path | None, json_path: Path | None):
        self.report, self.markdown_path, self.json_path = report, markdown_path, json_path
        for p in (markdown_path, json_path):
            if p is not None:
                p.parent.mkdir(parents=True, exist_ok=True)

    def add(self, row: Row) -> Row:
        self.report.rows.append(row)
        self.save()
        return row

    def save(self) -> None:
        if self.json_path is not None:
            _write_atomic(self.json_path, json.dumps(self.report.to_json(), indent=1) + "\n")
        if self.markdown_path is not None:
            _write_atomic(self.markdown_path, markdown(self.report))


# --- markdown ----------------------------------------------------------------------------------------------------


def _f(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


_STATE = {
    "running": "**incomplete**: the run had not finished when this file was last written (it is rewritten after "
               "every row, so a run killed at a time limit leaves every row it finished)",
    "finished": "finished",
}


def markdown(rep: Report) -> str:
    lines = ["# Step1X-Edit speed on one device", ""]
    if rep.tiny:
        lines += ["**CPU dry run (`--tiny`: dev dimensions, fp32, CPU). Not a performance measurement.**", ""]
    lines += [f"State: {_STATE.get(rep.state, rep.state)}; {time.monotonic() - rep.started:.0f} s elapsed.", ""]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rep.env.items()]
    lines += [f"| command | `{rep.command}` |", ""]
    c = rep.ceilings
    if c:
        parts = [f"{k.removesuffix('_tflops')} **{v:.3g} TFLOP/s** ({c.get(k.removesuffix('_tflops') + '_shape', '')})"
                 for k, v in c.items() if k.endswith("_tflops") and isinstance(v, (int, float))]
        parts += [f"{k.removesuffix('_status')}: {v}" for k, v in c.items() if k.endswith("_status")]
        lines += ["Matmul ceilings measured in this run (best over the shapes): " + "; ".join(parts) + ". MFU = "
                  "analytic DiT matmul FLOPs / time / the ceiling of the mode's matmul dtype.", ""]
    if rep.attention:
        lines += ["Attention backends (one call, [2, S, heads, head_dim] at the largest size): "
                  + ", ".join(f"{k} {v}" for k, v in rep.attention.items()) + f"; chosen: **{rep.attention_best}**.",
                  ""]
    ratio, ratio_mode = rep.baseline_ratio()
    if ratio is not None:
        lines += [f"Baseline ratio (diffusers FluxTransformer2DModel per call / fastest exact mode, {ratio_mode}): "
                  f"**{ratio:.2f}x**.", ""]
    tables = {
        "dit_step": ("DiT step (one call, batch 2 = one image with CFG, 640 text + target + reference tokens)",
                     ["mode", "size", "tokens", "s / call", "TFLOP/s", "MFU", "vs baseline", "err vs eager",
                      "warm-up s", "status", "notes"],
                     lambda r: [r.mode, f"{r.size}²", r.extra.get("tokens", "-"), _f(r.seconds, ".4f"),
                                _f(r.extra.get("tflops"), ".3g"), _f(r.mfu, ".1%"), _f(r.extra.get("vs_baseline"), ".2f"),
                                _f(r.extra.get("err_vs_bf16"), ".1e"), _f(r.extra.get("warmup_s"), ".0f"), r.status,
                                r.note]),
        "edit": ("Whole edits through the pipeline (square input = working size, strength 1.0, CFG on; seconds; "
                 "stages synchronised on the device)",
                 ["mode", "size", "steps", "n", "end to end", "encoder", "VAE encode", "denoise", "per step",
                  "VAE decode", "denoise MFU", "peak GiB", "status", "notes"],
                 lambda r: [r.mode, f"{r.size}²", r.steps, r.n, _f(r.seconds, ".2f"),
                            *[_f(r.extra.get("stages", {}).get(k), ".3f") for k in ("encoder", "vae_encode", "denoise")],
                            _f(r.extra.get("per_step"), ".3f"), _f(r.extra.get("stages", {}).get("vae_decode"), ".3f"),
                            _f(r.mfu, ".1%"), _f(r.peak_gib, ".1f"), r.status, r.note]),
        "http": ("HTTP server on this device (one request at a time, b64_json, client-side latency)",
                 ["mode", "size", "steps", "n", "latency s", "peak GiB", "status", "notes"],
                 lambda r: [r.mode, f"{r.size}²", r.steps, r.n, _f(r.seconds, ".2f"), _f(r.peak_gib, ".1f"), r.status,
                            r.note]),
        "vae_decode": ("VAE decode of one image", ["mode", "size", "seconds", "err vs fp32", "status", "notes"],
                       lambda r: [r.mode, f"{r.size}²", _f(r.seconds, ".4f"), _f(r.extra.get("err_vs_fp32"), ".1e"),
                                  r.status, r.note]),
        "parity": ("Parity: bf16 variants against fp32 (full width, 2 double + 4 single blocks; relative Frobenius "
                   "error, exact variants held to 1e-2)", ["mode", "size", "rel. error vs fp32", "status", "notes"],
                   lambda r: [r.mode, f"{r.size}²", _f(r.extra.get("err_vs_fp32"), ".2e"), r.status, r.note]),
    }
    for kind, (title, head, cells) in tables.items():
        rows = [r for r in rep.rows if r.kind == kind]
        if not rows:
            continue
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(str(x) for x in cells(r)) + " |" for r in rows]
        lines += [""]
    lines += [f"- {n}" for n in rep.notes] + [f"- {PUBLISHED}"]
    if rep.errors:
        lines += ["", "Errors:"] + [f"- {e}" for e in rep.errors]
    return "\n".join(lines) + "\n"


# --- summary -----------------------------------------------------------------------------------------------------


def _best(rows: list[dict], **match: Any) -> dict | None:
    found = [r for r in rows if r.get("status") == "ok" and r.get("seconds") is not None
             and all(r.get(k) == v for k, v in match.items())]
    return min(found, key=lambda r: r["seconds"]) if found else None


def _mark(ok: bool | None) -> str:
    return "" if ok is None else (" [met]" if ok else " [MISSED]")


def summary(data: dict[str, Any]) -> str:
    """A few lines for the end of a GPU session's output: what ran, the headline numbers, the targets."""
    rows = data.get("rows", [])
    out = [f"== {data.get('device', '?')} | torch {data.get('torch', '?')} | {len(rows)} rows | state: "
           f"{data.get('state', '?')} | {data.get('elapsed_s', '?')} s"]
    c = data.get("ceilings", {})
    out.append("ceilings: " + ", ".join(f"{k.removesuffix('_tflops')} {v:.3g} TFLOP/s" for k, v in c.items()
                                         if k.endswith("_tflops") and isinstance(v, (int, float))))
    sizes = sorted({r["size"] for r in rows if r.get("kind") == "dit_step"}, reverse=True)
    if sizes:
        size = sizes[0]
        mark = _mark if size == 1024 else (lambda ok: "")  # the targets are for 1024x1024
        steps = [r for r in rows if r.get("kind") == "dit_step" and r.get("size") == size and r.get("status") == "ok"
                 and r.get("seconds")]
        out.append(f"DiT call {size}² batch 2: " + "; ".join(
            f"{r['mode']} {r['seconds']:.3f} s" + (f" (MFU {r['mfu']:.0%})" if r.get("mfu") else "") for r in steps))
        base = _best(rows, kind="dit_step", mode="baseline", size=size)
        exact = [r for r in steps if r.get("exact") and r["mode"] != "baseline"]
        if base and exact:
            best = min(exact, key=lambda r: r["seconds"])
            ratio = base["seconds"] / best["seconds"]
            mfu = best.get("mfu")
            out.append(f"  fastest exact {best['mode']}: {ratio:.2f}x the diffusers baseline"
                       f"{mark(ratio >= TARGETS['vs_baseline'])} (target >= {TARGETS['vs_baseline']}x)"
                       + (f"; MFU {mfu:.0%}{mark(mfu >= TARGETS['dit_mfu'])} (target >= 70 %)" if mfu else ""))
            approx = [r for r in steps if not r.get("exact")]
            if approx:
                fast = min(approx, key=lambda r: r["seconds"])
                gain = best["seconds"] / fast["seconds"]
                out.append(f"  fastest approximate {fast['mode']}: {gain:.2f}x over exact"
                           f"{mark(gain >= TARGETS['fp8_vs_exact'])} (target >= 1.4x), error vs bf16 "
                           f"{fast.get('err_vs_bf16', float('nan')):.1e}")
    for steps in sorted({r.get("steps") for r in rows if r.get("kind") == "edit"}, reverse=True):
        edits = [r for r in rows if r.get("kind") == "edit" and r.get("steps") == steps and r.get("status") == "ok"
                 and r.get("seconds")]
        if edits:
            exact = [r for r in edits if r.get("exact")]
            best = min(exact, key=lambda r: r["seconds"]) if exact else None
            target = TARGETS.get(f"edit_{steps}_s") if edits[0]["size"] == 1024 else None
            out.append(f"edit {edits[0]['size']}² {steps} steps: " + "; ".join(
                f"{r['mode']} {r['seconds']:.1f} s" for r in edits)
                + (f" | fastest exact{_mark(best['seconds'] <= target)} (target <= {target:.0f} s)"
                   if best and target else ""))
    http = [r for r in rows if r.get("kind") == "http"]
    if http:
        out.append("http: " + "; ".join(
            f"n={r['n']} " + (f"{r['seconds']:.1f} s, peak {_f(r.get('peak_gib'), '.1f')} GiB" if r.get("status") == "ok"
                              else r.get("status", "?")) for r in http))
    missing = [r for r in rows if r.get("status") != "ok"]
    if missing:
        out.append(f"not measured: {len(missing)} rows (" + "; ".join(
            sorted({f"{r['kind']} {r['mode']}: {r['status'][:60]}" for r in missing})[:6]) + ")")
    if data.get("errors"):
        out.append("errors: " + "; ".join(data["errors"])[:400])
    dev = re.sub(r"[^a-z0-9]+", "-", str(data.get("device", "gpu")).split(",")[0].lower()).strip("-")
    out.append(f"(commit as bench/results/{dev or 'gpu'}.json)")
    return "\n".join(out)


def failures(data: dict[str, Any]) -> list[str]:
    """What makes a dry run fail: a run that did not finish, errors, rows that failed, a missing module (not rows
    the device cannot run, such as fp8 on a CPU: those say `unavailable` for another reason)."""
    out = [f"state: {data.get('state')}"] if data.get("state") != "finished" else []
    out += [f"error: {e}" for e in data.get("errors", [])]
    out += [f"{r['kind']} {r['mode']} {r['size']}: {r['status']}" for r in data.get("rows", [])
            if str(r.get("status", "")).startswith(("error", "OOM", "FAIL"))
            or any(m in str(r.get("status", "")) for m in ("No module named", "ImportError", "ModuleNotFoundError"))]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_report", description="print the summary of a results.json")
    parser.add_argument("--summary", required=True, help="results.json written by the benchmark")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 unless the run finished with no failed row (the CPU dry run's check)")
    args = parser.parse_args(argv)
    path = Path(args.summary)
    if not path.is_file():
        print(f"no results: {path} was never written (the benchmark did not start)", file=sys.stderr)
        return 1
    data = json.loads(path.read_text())
    print(summary(data))
    bad = failures(data) if args.strict else []
    for line in bad:
        print(f"FAILED {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
