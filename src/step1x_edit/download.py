"""`step1x-edit download`: fetch the weights with huggingface_hub (resumable, with progress bars), then verify them.

What is fetched (`--layout official`, the default):
  stepfun-ai/Step1X-Edit         step1x-edit-v1p1-official.safetensors (v1.1) or step1x-edit-i1258.safetensors
                                 (v1.0), and vae.safetensors
  Qwen/Qwen2.5-VL-7B-Instruct    config, tokenizer, preprocessor and *.safetensors files (the encoder)
`--layout diffusers`: stepfun-ai/Step1X-Edit-v1p1-diffusers (model_index.json, transformer/, vae/, text_encoder/,
processor/, scheduler/). v1.2 is refused (its conditioner is not implemented yet).

Where: by default the Hugging Face cache (HF_HUB_CACHE / HF_HOME, or --cache-dir), where the server looks by
default; with `--dir DIR` the files land in DIR (the encoder in DIR/Qwen2.5-VL-7B-Instruct) and the server needs
STEP1X_MODEL_DIR=DIR. An interrupted download resumes when the command is run again.

Verification, per file (after the download, and all that happens with --offline / HF_HUB_OFFLINE=1):
  - present (a missing file, or a blob still `.incomplete`, is named);
  - its size equals the hub's: from the tree listing huggingface_hub caches beside the snapshot
    (`trees/<commit>.json`, written by snapshot_download), else from the Hub when online; offline with no
    listing there is no hub size to compare with, and only the checks below run;
  - a .safetensors file is complete and self-consistent (header parsed, every tensor's byte range inside the
    file, no bytes left over): catches truncation even without hub metadata;
  - a .json file parses; an index json's shards are all present;
  - with --verify-hash: sha256 of each LFS file against the hub's (slow: reads every byte).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .models.layouts import (
    DIFFUSERS_REPOS,
    ENCODER_DIRNAME,
    ENCODER_PATTERNS,
    ENCODER_REPO,
    OFFICIAL_DIT_FILES,
    OFFICIAL_VAE_FILE,
    STEP1X_REPO,
    V12_REFUSED,
    WeightsError,
    hub_cache_dir,
    human_bytes,
    read_index,
    read_json,
    read_safetensors_header,
    repo_folder,
)

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Job:
    repo_id: str
    patterns: list[str]
    required: list[str]  # files that must be there whatever the listing says
    subdir: str = ""  # under --dir


@dataclass
class Report:
    files: int = 0
    nbytes: int = 0
    problems: list[str] = field(default_factory=list)
    size_source: str = ""


def add_download_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", choices=["v1.0", "v1.1", "v1.2"], default="v1.1",
                        help="model version (default v1.1; v1.2 is not supported yet)")
    parser.add_argument("--layout", choices=["official", "diffusers"], default="official",
                        help="official single files + Qwen2.5-VL-7B-Instruct (default), or the diffusers directory")
    parser.add_argument("--dir", type=Path, default=None,
                        help="download into this folder (then serve with STEP1X_MODEL_DIR=DIR); "
                             "default: the Hugging Face cache, where the server finds the weights by itself")
    parser.add_argument("--cache-dir", dest="cache_dir", type=Path, default=None,
                        help="Hugging Face cache to use (default: HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub)")
    parser.add_argument("--no-encoder", dest="no_encoder", action="store_true",
                        help="skip Qwen2.5-VL-7B-Instruct (~16.6 GB), e.g. when you already have it")
    parser.add_argument("--revision", default=None, help="a branch, tag or commit of the model repo (default main)")
    parser.add_argument("--offline", action="store_true",
                        help="download nothing: only verify what is there (also with HF_HUB_OFFLINE=1)")
    parser.add_argument("--verify-hash", dest="verify_hash", action="store_true",
                        help="also check the sha256 of every large file against the hub's (reads everything once)")


def plan_jobs(version: str, layout: str, with_encoder: bool = True) -> list[Job]:
    if version == "v1.2":
        raise WeightsError(V12_REFUSED)
    if layout == "diffusers":
        if version not in DIFFUSERS_REPOS:
            raise WeightsError(f"there is no diffusers-style repository for {version}: use --layout official")
        parts = ["model_index.json", "transformer/*", "vae/*", "scheduler/*"]
        required = ["model_index.json", "transformer/config.json", "vae/config.json"]
        if with_encoder:
            parts += ["text_encoder/*", "processor/*"]
            required += ["text_encoder/config.json"]
        return [Job(DIFFUSERS_REPOS[version], parts, required)]
    dit = OFFICIAL_DIT_FILES[version]
    jobs = [Job(STEP1X_REPO, [dit, OFFICIAL_VAE_FILE], [dit, OFFICIAL_VAE_FILE])]
    if with_encoder:
        jobs.append(Job(ENCODER_REPO, list(ENCODER_PATTERNS), ["config.json", "tokenizer.json"], ENCODER_DIRNAME))
    return jobs


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _matches(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in patterns)


# --------------------------------------------------------------------------------------------------------------
# expected sizes


@dataclass(frozen=True)
class Expected:
    size: int
    sha256: str | None = None


def _local_dir_commit(local_dir: Path) -> str | None:
    """The commit a `local_dir` download came from (first line of huggingface_hub's per-file .metadata)."""
    meta = local_dir / ".cache" / "huggingface" / "download"
    for f in sorted(meta.rglob("*.metadata")) if meta.is_dir() else []:
        try:
            first = f.read_text().splitlines()[0].strip()
        except (OSError, IndexError):
            continue
        if re.fullmatch(r"[0-9a-f]{40}", first):
            return first
    return None


def _from_tree_json(path: Path) -> dict[str, Expected] | None:
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        return {p: Expected(int(i.get("lfs_size") or i["size"]), i.get("lfs_sha256")) for p, i in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def expected_sizes(repo_id: str, commit: str | None, tree_folder: Path, online: bool,
                   revision: str | None) -> tuple[dict[str, Expected] | None, str]:
    """(path -> Expected, where the numbers came from): the cached tree listing, else the Hub, else None."""
    if commit:
        listing = _from_tree_json(tree_folder / "trees" / f"{commit}.json")
        if listing is not None:
            return listing, "the hub's file listing cached by huggingface_hub"
    else:
        trees = sorted((tree_folder / "trees").glob("*.json")) if (tree_folder / "trees").is_dir() else []
        if len(trees) == 1 and (listing := _from_tree_json(trees[0])) is not None:
            return listing, "the hub's file listing cached by huggingface_hub"
    if online:
        try:
            from huggingface_hub import HfApi
            from huggingface_hub.hf_api import RepoFile

            files = HfApi().list_repo_tree(repo_id, recursive=True, revision=commit or revision)
            return ({f.path: Expected(f.lfs.size if f.lfs else f.size, f.lfs.sha256 if f.lfs else None)
                     for f in files if isinstance(f, RepoFile)}, "the Hub")
        except Exception as e:  # verification still runs its other checks
            print(f"  note: could not list {repo_id} on the Hub ({e.__class__.__name__}): sizes checked against "
                  "the files' own headers only", file=sys.stderr)
    return None, ""


# --------------------------------------------------------------------------------------------------------------
# verification


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _incomplete_note(folder: Path, rel: str, cache_storage: Path | None, local_dir: Path | None) -> str:
    target = folder / rel
    if target.is_symlink():
        blob = Path(os.path.normpath(target.parent / os.readlink(target)))
        partial = blob.with_name(blob.name + ".incomplete")
        if partial.exists():
            return f" (interrupted: {partial} holds {partial.stat().st_size} bytes; run the command again to resume)"
    if local_dir is not None:
        dl = local_dir / ".cache" / "huggingface" / "download"
        parts = sorted(dl.rglob("*.incomplete")) if dl.is_dir() else []
        if parts:
            return f" (interrupted downloads in {dl}: run the command again to resume)"
    if cache_storage is not None and (cache_storage / "blobs").is_dir():
        parts = sorted((cache_storage / "blobs").glob("*.incomplete"))
        if parts:
            return f" (interrupted downloads in {cache_storage / 'blobs'}: run the command again to resume)"
    return ""


def verify_folder(
    folder: Path,
    job: Job,
    expected: dict[str, Expected] | None,
    cache_storage: Path | None = None,
    local_dir: Path | None = None,
    check_hash: bool = False,
) -> Report:
    """Check a snapshot / local folder against the listing (when known) and the files' own structure."""
    report = Report()
    if expected is not None:
        names = sorted(p for p in expected if _matches(p, job.patterns))
        names += [r for r in job.required if r not in names and r not in expected]
    else:
        present = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                         if (p.is_file() or p.is_symlink()) and ".cache" not in p.relative_to(folder).parts)
        names = sorted(set(p for p in present if _matches(p, job.patterns)) | set(job.required))
    for rel in names:
        path = folder / rel
        if not path.is_file():
            report.problems.append(f"{path}: missing{_incomplete_note(folder, rel, cache_storage, local_dir)}")
            continue
        size = path.stat().st_size
        want = expected.get(rel) if expected is not None else None
        if want is not None and size != want.size:
            report.problems.append(f"{path}: {size} bytes, the hub says {want.size}: incomplete or corrupt "
                                   "(delete it and run the command again)")
            continue
        try:
            if rel.endswith(".safetensors"):
                read_safetensors_header(path)
            elif rel.endswith(".safetensors.index.json"):
                read_index(path)
            elif rel.endswith(".json"):
                read_json(path)
        except WeightsError as e:
            report.problems.append(str(e))
            continue
        if check_hash:
            sha = want.sha256 if want is not None else None
            if sha is None and path.is_symlink() and _SHA256.fullmatch(Path(os.readlink(path)).name):
                sha = Path(os.readlink(path)).name  # a cache blob of an LFS file is named by its sha256
            if sha is not None:
                print(f"  sha256 {rel} ...", file=sys.stderr, flush=True)
                got = _sha256(path)
                if got != sha:
                    report.problems.append(f"{path}: sha256 {got}, the hub says {sha}: corrupt (delete it and "
                                           "run the command again)")
                    continue
        report.files += 1
        report.nbytes += size
    return report


# --------------------------------------------------------------------------------------------------------------
# the command


def _snapshot(job: Job, revision: str | None, cache_dir: Path, local_dir: Path | None, offline: bool) -> Path:
    from huggingface_hub import snapshot_download

    kwargs = dict(repo_id=job.repo_id, revision=revision, allow_patterns=job.patterns, local_files_only=offline)
    if local_dir is not None:
        kwargs["local_dir"] = str(local_dir)
    else:
        kwargs["cache_dir"] = str(cache_dir)
    return Path(snapshot_download(**kwargs))


def _error_text(e: Exception, job: Job, offline: bool) -> str:
    name = e.__class__.__name__
    if name == "GatedRepoError":
        return (f"{job.repo_id} is gated: accept its terms on huggingface.co and log in (`hf auth login`) "
                f"or set HF_TOKEN ({e})")
    if offline and isinstance(e, FileNotFoundError):
        return (f"{job.repo_id} is not (completely) in the cache and downloads are off (--offline / "
                f"HF_HUB_OFFLINE=1): run `step1x-edit download` with network access ({e})")
    if isinstance(e, (ConnectionError, OSError)) or "Connect" in name or "Timeout" in name:
        return f"could not reach the Hugging Face Hub for {job.repo_id} ({name}: {e}); run the command again to resume"
    return f"{job.repo_id}: {name}: {e}"


def run_download(args: argparse.Namespace) -> int:
    offline = bool(getattr(args, "offline", False)) or _env_flag("HF_HUB_OFFLINE")
    try:
        jobs = plan_jobs(args.version, args.layout, with_encoder=not getattr(args, "no_encoder", False))
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cache_dir = hub_cache_dir(getattr(args, "cache_dir", None))
    out_dir: Path | None = Path(args.dir).expanduser().resolve() if getattr(args, "dir", None) else None
    status = 0
    for job in jobs:
        local_dir = (out_dir / job.subdir if job.subdir else out_dir) if out_dir is not None else None
        where = local_dir if local_dir is not None else cache_dir
        verb = "checking" if offline else "fetching"
        print(f"{verb} {job.repo_id} [{', '.join(job.patterns)}] -> {where}", file=sys.stderr, flush=True)
        storage = repo_folder(cache_dir, job.repo_id) if local_dir is None else None
        try:
            folder = _snapshot(job, getattr(args, "revision", None), cache_dir, local_dir, offline)
        except Exception as e:
            snap = getattr(e, "snapshot_path", None)
            print(f"error: {_error_text(e, job, offline)}", file=sys.stderr)
            if snap:  # name the files that are missing or partial
                listing, _ = expected_sizes(job.repo_id, Path(snap).name, storage or Path(snap), False, None)
                for p in verify_folder(Path(snap), job, listing, storage, local_dir).problems:
                    print(f"  {p}", file=sys.stderr)
            status = 1
            continue
        if local_dir is not None:
            commit, tree_folder = _local_dir_commit(local_dir), local_dir / ".cache" / "huggingface"
        else:
            commit, tree_folder = folder.name, storage
        listing, source = expected_sizes(job.repo_id, commit, tree_folder, not offline, getattr(args, "revision", None))
        report = verify_folder(folder, job, listing, storage, local_dir, check_hash=getattr(args, "verify_hash", False))
        if report.problems:
            status = 1
            print(f"error: {job.repo_id}: {len(report.problems)} problem(s):", file=sys.stderr)
            for p in report.problems:
                print(f"  {p}", file=sys.stderr)
        else:
            how = f"sizes match {source}" if listing is not None else "no hub sizes available offline"
            print(f"ok: {job.repo_id}: {report.files} files, {human_bytes(report.nbytes)} in {folder} "
                  f"({how}; safetensors headers complete"
                  + ("; sha256 checked" if getattr(args, "verify_hash", False) else "") + ")", file=sys.stderr)
    if status == 0:
        if out_dir is not None:
            print(f"done. Serve with:  STEP1X_MODEL_DIR={out_dir} step1x-edit serve")
        else:
            env = f"HF_HUB_CACHE={cache_dir} " if getattr(args, "cache_dir", None) else ""
            print(f"done. Serve with:  {env}step1x-edit serve   (the weights are found in the Hugging Face cache)")
    return status
