"""`step1x-edit check-reference DIR`: run every case of a golden directory through the project's own code.

A golden directory (see ../shared/golden/README.md) holds `cases.json` (configs, version, tolerances, scalar
inputs), `cases.safetensors` (input/output tensors named `<case>.<name>`) and the weights in the official
layout (`dit.safetensors`, `vae.safetensors`). Cases are recognised by their content, so directories with other
dimensions, seeds or versions work too; a case of a kind this checker does not know is reported as skipped,
which fails the check.

With parallel degrees (`--cfg-parallel`, `--ulysses-degree`, `--ring-degree`) every case runs on that many ranks
(CPU processes, Gloo; pipeline/parallel.py `run_spmd`): each rank loads the same weights, the DiT's calls become
collective calls (models/parallel.py), and rank 0 reports. The tolerances are the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image
from safetensors.torch import load_file

from .models import vae as vae_ops
from .models.weights import dit_config_from_dict, load_dit, load_vae, vae_config_from_dict
from .pipeline import imaging, sampling


@dataclass
class CaseResult:
    name: str
    max_err: float | None  # None when skipped
    tol: float
    note: str = ""
    details: dict[str, float] | None = None  # max abs error per compared tensor

    @property
    def status(self) -> str:
        if self.max_err is None:
            return "SKIP"
        return "ok" if self.max_err <= self.tol else "FAIL"


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shape {tuple(a.shape)} != reference {tuple(b.shape)}")
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


class _Checker:
    def __init__(self, directory: Path, mesh=None, degrees=None):  # noqa: ANN001 - a DeviceMesh, models.parallel.Degrees
        self.dir = directory
        self.mesh, self.degrees = mesh, degrees
        self.meta = json.loads((directory / "cases.json").read_text())
        self.t = load_file(str(directory / "cases.safetensors"))
        self.version = self.meta.get("version") or ("v1.1" if "v1.1" in str(self.meta.get("dit_params", {})) else "v1.0")
        tols = self.meta.get("tolerances", {})
        self.tol_single = float(tols.get("single_forward_atol", 5e-5))
        self.tol_denoise = float(tols.get("denoise_atol", 1e-4))
        self.results: list[CaseResult] = []
        self._dit = self._vae = None

    # models are loaded lazily through the normal loader
    @property
    def dit(self):
        if self._dit is None:
            cfg = dit_config_from_dict(self.meta["dit_params"], self.meta.get("connector_params"), self.version)
            self._dit, _ = load_dit(self.dir / "dit.safetensors", cfg, version=self.version)
            if self.mesh is not None:
                from .models.parallel import parallelize_dit

                parallelize_dit(self._dit, self.degrees, self.mesh)
        return self._dit

    @property
    def vae(self):
        if self._vae is None:
            self._vae = load_vae(self.dir / "vae.safetensors", vae_config_from_dict(self.meta["vae_params"]))
        return self._vae

    def add(self, name: str, errors: dict[str, float], tol: float, note: str = "") -> None:
        worst = max(errors, key=errors.get)
        detail = "bit-exact" if errors[worst] == 0 else (f"worst: {worst}" if len(errors) > 1 else "")
        self.results.append(CaseResult(name, errors[worst], tol, "; ".join(x for x in (detail, note) if x), errors))

    def has(self, *names: str) -> bool:
        return all(n in self.t for n in names)

    # ---------------------------------------------------------------------------------------------------------
    def connector(self, case: str) -> None:
        p = case + "."
        with torch.no_grad():
            txt, y = self.dit.connector(self.t[p + "llm_embedding"], self.t[p + "t_vec"], self.t[p + "mask"])
        self.add(case, {"txt": _err(txt, self.t[p + "txt"]), "y": _err(y, self.t[p + "y"])}, self.tol_single)

    def dit_forward(self, case: str) -> None:
        p = case + "."
        tgt, ref = self.t[p + "latent_target"], self.t[p + "latent_ref"]
        h, w = tgt.shape[-2:]
        img = torch.cat([sampling.pack(tgt), sampling.pack(ref)], dim=1)
        ids = torch.cat([sampling.image_ids(h, w), sampling.image_ids(h, w, reference=True, version=self.version)])
        errors = {"img (packing)": _err(img, self.t[p + "img"])}
        errors["img_ids"] = _err(ids.expand(img.shape[0], -1, -1), self.t[p + "img_ids"])
        with torch.no_grad():
            pred = self.dit(img, ids, self.t[p + "txt_ids"][0], self.t[p + "timesteps"], self.t[p + "llm_embedding"],
                            self.t[p + "t_vec"], self.t[p + "mask"])
        errors["pred"] = _err(pred, self.t[p + "pred"])
        self.add(case, errors, self.tol_single)

    def schedule(self, case: str) -> None:
        errors = {}
        for key, r in self.meta["cases"][case]["results"].items():
            ours = sampling.get_schedule(r["num_steps"], r["image_seq_len"])
            errors[key] = float(np.max(np.abs(np.array(ours) - np.array(r["timesteps"]))))
            if "rescale_step_indices" in r:
                idx = [i for i, t in enumerate(ours[:-1]) if t > sampling.DEFAULT_TRUNCATE["v1.1"]]
                if idx != r["rescale_step_indices"]:
                    errors[key + " rescale steps"] = float("inf")
        self.add(case, errors, 0.0)

    def resize(self, case: str) -> None:
        info = self.meta["cases"][case]
        wrong = [
            r for r in info["results"]
            if imaging.working_size(r["w"], r["h"], r["size_level"]) != (r["w_new"], r["h_new"])
        ]
        errors = {"sizes": float(len(wrong))}
        note = ""
        test = info.get("resize_test")
        if test and self.has(test["source_tensor"]):
            src = Image.fromarray(self.t[test["source_tensor"]].numpy())
            ours = np.asarray(imaging.resize_for_model(src, test["size_level"], self.version)).astype(np.int64)
            pinned = self.t[test["resized_tensor"]].numpy().astype(np.int64)
            other = test.get("other_pillow", {})
            if PIL.__version__ == test.get("pillow_version"):
                errors["pixels"] = float(np.abs(ours - pinned).max())
            elif PIL.__version__ == other.get("version") and self.has(other.get("tensor", "")):
                errors["pixels"] = float(np.abs(ours - self.t[other["tensor"]].numpy().astype(np.int64)).max())
            else:  # Pillow's LANCZOS bytes differ between versions: report, do not fail (golden/README-v1p1.md)
                note = f"Pillow {PIL.__version__}: max pixel diff {np.abs(ours - pinned).max()} vs Pillow {test.get('pillow_version')} (not compared)"
            note = note or f"Pillow {PIL.__version__}"
        self.add(case, errors, 0.0, note)

    def denoise(self, case: str) -> None:
        info = self.meta["cases"][case]
        common = self.meta["cases"].get("denoise_common", {})
        shared = "denoise."
        p = case + "."
        emb = self.t.get(p + "llm_embedding", self.t.get(shared + "llm_embedding"))
        mask = self.t.get(p + "mask", self.t.get(shared + "mask"))
        noise, ref = self.t[shared + "noise"], self.t[shared + "ref_latent"]
        strength = info.get("image2image_strength")
        init = self.t[shared + "init_latent"] if strength is not None else None
        truncate = info.get("timesteps_truncate", common.get("timesteps_truncate"))
        cond = sampling.Conditioning(emb[:1], mask[:1], emb[1:], mask[1:])
        trace: list[sampling.StepTrace] = []
        with torch.no_grad():
            res = sampling.sample(
                self.dit, noise, ref, cond, info["num_steps"], info["cfg_guidance"], self.version,
                strength=1.0 if strength is None else strength, init_latent=init, truncate=truncate, trace=trace,
            )
            image = vae_ops.decode(self.vae, res.latent).clamp(-1, 1) * 0.5 + 0.5
        h, w = noise.shape[-2:]
        errors = {
            "schedule": float(np.max(np.abs(np.array(res.timesteps) - np.array(info["timesteps_used"])))),
            "step_raw_preds": _err(torch.stack([s.raw_pred for s in trace]), self.t[p + "step_raw_preds"]),
            "out_packed": _err(sampling.pack(res.latent), self.t[p + "out_packed"]),
            "out_latent": _err(res.latent, self.t[p + "out_latent"]),
            "image": _err(image, self.t[p + "image"]),
        }
        if self.has(p + "img_in"):
            img_in = torch.cat([sampling.pack(res.start_x), sampling.pack(ref)], dim=1).expand(2, -1, -1)
            errors["img_in"] = _err(img_in, self.t[p + "img_in"])
        if self.has(p + "img_ids"):
            ids = torch.cat([sampling.image_ids(h, w), sampling.image_ids(h, w, reference=True, version=self.version)])
            errors["img_ids"] = _err(ids.expand(2, -1, -1), self.t[p + "img_ids"])
        if self.has(p + "x_after_init_mix"):
            errors["x_after_init_mix"] = _err(res.start_x, self.t[p + "x_after_init_mix"])
        if self.has(p + "step_x"):
            errors["step_x"] = _err(torch.stack([s.x for s in trace]), self.t[p + "step_x"])
        if self.has(p + "rescale_diff_norm"):
            rescaled = [s for s in trace if s.rescale_norm is not None]
            ref_norm = self.t[p + "rescale_diff_norm"]
            if len(rescaled) != ref_norm.shape[0]:
                errors["rescaled step count"] = float("inf")
            else:
                errors["rescale_diff_norm"] = _err(torch.stack([s.rescale_norm for s in rescaled]), ref_norm)
                errors["rescale_divisor"] = _err(
                    torch.stack([s.rescale_divisor for s in rescaled]), self.t[p + "rescale_divisor"]
                )
        self.add(case, errors, self.tol_denoise, f"{len(trace)} DiT calls")

    def vae_case(self, case: str) -> None:
        errors = {}
        with torch.no_grad():
            if self.has("vae_encode.x"):
                x = self.t["vae_encode.x"]
                moments = vae_ops.encode_moments(self.vae, x)
                mean, logvar = moments.chunk(2, dim=1)
                errors["moments"] = _err(moments, self.t["vae_encode.moments"])
                errors["mean"] = _err(mean, self.t["vae_encode.mean"])
                errors["logvar"] = _err(logvar, self.t["vae_encode.logvar"])
                errors["latent"] = _err(vae_ops.encode(self.vae, x), self.t["vae_encode.latent"])
            if self.has("vae_decode.z"):
                errors["decode"] = _err(vae_ops.decode(self.vae, self.t["vae_decode.z"]), self.t["vae_decode.image"])
        if not errors:
            self.results.append(CaseResult(case, None, self.tol_single, "no vae tensors"))
            return
        self.add(case, errors, self.tol_single)

    # ---------------------------------------------------------------------------------------------------------
    def run(self) -> list[CaseResult]:
        for case, info in self.meta["cases"].items():
            if case == "denoise_common":
                continue
            try:
                if case.startswith("connector") or self.has(case + ".txt", case + ".y"):
                    self.connector(case)
                elif self.has(case + ".pred", case + ".latent_target"):
                    self.dit_forward(case)
                elif case.startswith("schedule"):
                    self.schedule(case)
                elif case.startswith("input_process_image"):
                    self.resize(case)
                elif isinstance(info, dict) and "num_steps" in info and "cfg_guidance" in info:
                    self.denoise(case)
                elif case.startswith("vae"):
                    self.vae_case(case)
                else:
                    self.results.append(CaseResult(case, None, 0.0, "unknown case kind"))
            except Exception as e:  # a broken case is a failure, reported with its reason, never a crash
                self.results.append(CaseResult(case, float("inf"), 0.0, f"error: {type(e).__name__}: {e}"))
        return self.results


def check_reference(directory: str | Path, *, mesh=None, degrees=None) -> list[CaseResult]:  # noqa: ANN001
    """Every case of a golden directory; with `mesh` / `degrees`, as one rank of a parallel group (every rank
    calls this with the same directory)."""
    directory = Path(directory)
    for f in ("cases.json", "cases.safetensors"):
        if not (directory / f).is_file():
            raise FileNotFoundError(f"{directory}: no {f} (not a golden reference directory)")
    return _Checker(directory, mesh, degrees).run()


def _check_on_rank(rank: int, mesh, directories: list[str], degrees) -> list[list[CaseResult]]:  # noqa: ANN001
    return [check_reference(d, mesh=mesh, degrees=degrees) for d in directories]


def check_reference_parallel(directories: list[str | Path], degrees, timeout_s: float = 300.0):  # noqa: ANN001
    """`check_reference` of each directory on `degrees.world_size` CPU ranks (one group; this process is rank 0):
    rank 0's results, per directory."""
    from .models.parallel import problems
    from .pipeline.parallel import run_spmd

    for directory in map(Path, directories):
        if not (directory / "cases.json").is_file():
            raise FileNotFoundError(f"{directory}: no cases.json (not a golden reference directory)")
        heads = int(json.loads((directory / "cases.json").read_text())["dit_params"]["num_heads"])
        bad = problems(degrees, heads=heads, device_type="cpu", device_count=0)
        if bad:
            raise ValueError(f"{directory}: " + "; ".join(bad))
    return run_spmd(degrees, _check_on_rank, ([str(d) for d in directories], degrees), timeout_s=timeout_s)


def main(directory: str, verbose: bool = False) -> int:
    try:
        results = check_reference(directory)
    except (FileNotFoundError, ValueError) as e:
        print(f"check-reference: {e}")
        return 1
    return report(results, verbose)


def main_parallel(directories: list[str], degrees, verbose: bool = False) -> int:  # noqa: ANN001
    """Every directory on several ranks; the same report per directory as `main`."""
    print(f"({degrees.describe()}, CPU processes, Gloo)", flush=True)
    try:
        per_dir = check_reference_parallel(directories, degrees)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"check-reference: {e}")
        return 1
    status = 0
    for d, results in zip(directories, per_dir, strict=True):
        print(f"== {d}")
        status |= report(results, verbose)
    return status


def report(results: list[CaseResult], verbose: bool = False) -> int:
    """Print the table; 1 if any case failed or was skipped."""
    print(f"{'case':<40} {'max abs err':>12} {'tolerance':>10}  status")
    for r in results:
        err = "-" if r.max_err is None else f"{r.max_err:.3g}"
        print(f"{r.name:<40} {err:>12} {r.tol:>10.3g}  {r.status}" + (f"  ({r.note})" if r.note else ""))
        if verbose and r.details and len(r.details) > 1:
            for k, v in r.details.items():
                print(f"  {k:<38} {v:>12.3g}")
    bad = [r for r in results if r.status != "ok"]
    print(f"{len(results) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0
