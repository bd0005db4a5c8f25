"""One settings object: environment variables `STEP1X_*`, CLI flags override.

Each setting is declared once here — type, default, bounds and a description — and everything else derives from
it: the `STEP1X_<NAME>` variable (pydantic-settings), the command-line flag `--<name>` of `serve` / `edit` /
`bench` (`cli_args.py`: type, choices, help text, group) and the README's table. Imports nothing of the project.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _opt(group: str, description: str, *, flag: str | None = None, cli: bool = True, **kw: Any) -> Any:
    """`Field(**kw)` with the CLI group, an optional extra flag name (older spelling) and the description."""
    extra = {"group": group, "cli": cli}
    if flag:
        extra["alias_flag"] = flag
    return Field(description=description, json_schema_extra=extra, **kw)


MODEL, SERVER, ENGINE, LIMITS, OUTPUTS, PERF = "model", "server", "engine", "input limits", "outputs", "performance"
PARALLEL = "parallel"
SCALE = "scale-out"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STEP1X_", extra="ignore")

    # --- model -------------------------------------------------------------------------------------------------
    preset: Literal["auto", "dev", "full"] = _opt(
        MODEL, "auto: full when weights are found, else dev; dev = tiny random weights built at start-up (outputs "
               "are noise); full = the real model", default="auto")
    dit_path: Path | None = _opt(MODEL, "DiT checkpoint: official file (step1x-edit-*.safetensors), sharded index "
                                        "json or diffusers transformer/ directory", default=None)
    vae_path: Path | None = _opt(MODEL, "VAE checkpoint (vae.safetensors or a diffusers vae/ directory)", default=None)
    encoder_path: Path | None = _opt(MODEL, "Qwen2.5-VL-7B-Instruct directory", default=None)
    # Where `full` finds its weights when the three paths above are not all set (each component separately, first
    # hit wins): the paths > model_dir > the Hugging Face cache > (preset auto) the dev preset. See models/layouts.py.
    model_dir: Path | None = _opt(MODEL, "a diffusers-style directory (Step1X-Edit-v1p1-diffusers) or a folder of "
                                         "official files, as `download --dir` lays it out", default=None)
    hf_cache: bool = _opt(MODEL, "look for the weights in the Hugging Face cache", default=True)
    hf_cache_dir: Path | None = _opt(MODEL, "Hugging Face cache (default HF_HUB_CACHE, else HF_HOME/hub, else "
                                            "~/.cache/huggingface/hub)", default=None)
    version: Literal["auto", "v1.0", "v1.1"] = _opt(MODEL, "weights version; auto = detected from the DiT file",
                                                    default="auto")
    device: str = _opt(MODEL, "auto (cuda if available) | cpu | cuda | cuda:N", default="auto")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _opt(
        MODEL, "compute dtype; auto = bf16 on GPU, fp32 on CPU", default="auto")
    size_level: int | None = _opt(MODEL, "working area ~ size_level^2 pixels (default: full 1024, dev 512)",
                                  default=None, ge=256, le=2048)
    dev_seed: int = _opt(MODEL, "seed of the dev preset's random weights", default=0)
    dit_fp8: bool = _opt(MODEL, "keep the DiT blocks' linear weights in float8_e4m3fn (~14 GB instead of ~25 GB; "
                                "upcast per matmul); FP8 checkpoints load either way", default=False)
    # LoRA adapters (models/lora_adapters.py): requests choose them by name (`loras`); nothing a client sends is a path.
    lora_dir: Path | None = _opt(MODEL, "directory of LoRA adapters for the DiT, one NAME.safetensors file each "
                                        "(official/kohya or diffusers/PEFT layout); requests pick them by name",
                                 default=None)
    lora_cache_size: int = _opt(MODEL, "LoRA adapters kept loaded at once (least recently used dropped first)",
                                default=8, ge=1, le=1024)

    # --- server ------------------------------------------------------------------------------------------------
    host: str = _opt(SERVER, "interface to listen on", default="127.0.0.1")
    port: int = _opt(SERVER, "port to listen on", default=8000, ge=0, le=65535)
    # No flag on purpose: a key on the command line is visible to every user of the machine (`ps`).
    api_keys: SecretStr | None = _opt(SERVER, "Bearer keys, comma-separated; none = open (with a warning)",
                                      default=None, cli=False)
    api_keys_file: Path | None = _opt(SERVER, "file with one API key a line (`#` comments)", default=None)
    metrics_open: bool = _opt(SERVER, "/metrics open to anyone who can reach it; off = it needs one of the API keys "
                                      "when keys are configured", default=False)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = _opt(SERVER, "log level", default="info")

    # --- engine ------------------------------------------------------------------------------------------------
    queue_depth: int = _opt(ENGINE, "jobs that may wait for the worker (429 beyond; at least 1)", default=16, ge=1,
                            le=10_000)
    batch_max_images: int = _opt(ENGINE, "images per pipeline call, n included", default=4, ge=1, le=64)
    batch_wait_ms: float = _opt(ENGINE, "how long an idle worker waits for batch companions", default=10.0, ge=0,
                                le=10_000)
    request_timeout_s: float = _opt(ENGINE, "seconds before a request gives 504", default=600.0, gt=0,
                                    flag="--request-timeout")
    shutdown_timeout_s: float = _opt(ENGINE, "graceful shutdown: how long admitted work may still run; what is "
                                             "unfinished then is answered with 503", default=60.0, ge=0)

    # --- input limits ------------------------------------------------------------------------------------------
    max_body_bytes: int = _opt(LIMITS, "largest request body (413 beyond)", default=32 * 1024 * 1024, ge=1024)
    body_timeout_s: float = _opt(LIMITS, "the whole request body must arrive within this many seconds (408 "
                                         "otherwise): a trickled upload cannot hold a connection", default=60.0, gt=0,
                                 flag="--body-timeout")
    max_header_bytes: int = _opt(LIMITS, "a request's line and headers: at most this many bytes (431), whatever "
                                         "the HTTP parser", default=64 * 1024, ge=4096, le=16 * 1024 * 1024)
    header_timeout_s: float = _opt(LIMITS, "a request's line and headers must arrive within this many seconds (408)",
                                   default=10.0, gt=0)
    max_image_bytes: int = _opt(LIMITS, "largest input image file", default=20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = _opt(LIMITS, "largest input image in pixels", default=4096 * 4096, ge=64)
    image_fetch_timeout_s: float = _opt(LIMITS, "seconds to fetch an image link", default=10.0, gt=0)
    image_fetch_max_redirects: int = _opt(LIMITS, "redirects followed when fetching an image link", default=3, ge=0,
                                          le=10)
    allow_private_image_urls: bool = _opt(LIMITS, "let image links point at loopback/private/link-local addresses "
                                                  "(tests, trusted networks only)", default=False)

    # --- outputs -----------------------------------------------------------------------------------------------
    storage_dir: Path = _opt(OUTPUTS, "where url outputs are kept", default=Path("data/images"))
    url_expiry_s: int = _opt(OUTPUTS, "seconds a url link stays valid (7 days)", default=7 * 24 * 3600, ge=1,
                             flag="--url-expiry")
    public_base_url: str | None = _opt(OUTPUTS, "base URL put in links (default: the request's own)", default=None)
    url_signing_key: SecretStr | None = _opt(OUTPUTS, "HMAC key of links (default: a random key kept in the storage "
                                                      "directory; with storage_url: required, the same on every "
                                                      "replica, at least 32 characters)", default=None, cli=False)
    janitor_interval_s: float = _opt(OUTPUTS, "seconds between sweeps of expired outputs", default=3600.0, gt=0)
    b64_json_style: Literal["plain", "data_uri"] = _opt(
        OUTPUTS, "b64_json as plain base64 (OpenAI's form) or as a data URI, data:image/png;base64,... (the hosted "
        "example's; the media type follows output_format)",
        default="plain", flag="--b64-style")
    # An object store instead of storage_dir (storage/s3.py; needs the [s3] extra). Credentials: the standard AWS
    # chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance roles); region: AWS_DEFAULT_REGION.
    storage_url: str | None = _opt(OUTPUTS, "s3://BUCKET/PREFIX: keep url outputs in an S3-compatible object store "
                                            "(needs the [s3] extra and STEP1X_URL_SIGNING_KEY unless s3_presigned); "
                                            "unset: storage_dir", default=None,
                                 pattern=r"^s3://[^/?#\s]+(/[^?#\s]*)?$")
    s3_endpoint_url: str | None = _opt(OUTPUTS, "endpoint of a non-AWS S3 server (MinIO, SeaweedFS, Ceph, R2...), "
                                                "e.g. http://127.0.0.1:8333", default=None)
    s3_presigned: bool = _opt(OUTPUTS, "url outputs are S3 presigned GET links (SigV4: url_expiry_s at most 7 days) "
                                       "instead of this server's signed links", default=False)

    # --- scale-out (deploy/: Ray Serve; needs the [ray] extra) ---------------------------------------------------
    ray: bool = _opt(SCALE, "serve through Ray Serve: this HTTP app as the ingress, the engine + pipeline as a "
                            "deployment of `replicas` replicas (one GPU each; CPU replicas where there is no GPU)",
                     default=False)
    replicas: str = _opt(SCALE, "with ray: N replicas, or MIN:MAX to autoscale on ongoing requests", default="1",
                         pattern=r"^[1-9][0-9]{0,3}(:[1-9][0-9]{0,3})?$")
    ray_address: str | None = _opt(SCALE, "with ray: the cluster to join (default RAY_ADDRESS, else a local Ray "
                                          "instance is started)", default=None)
    max_ongoing_requests: int | None = _opt(SCALE, "with ray: requests one replica works on at once (Ray Serve's "
                                                   "max_ongoing_requests; default batch_max_images); queue_depth is "
                                                   "max_queued_requests (429 beyond)", default=None, ge=1, le=1000)

    # --- performance -------------------------------------------------------------------------------------------
    # Applied by `pipeline/edit.build_pipeline` through `models/fastpath.py`; all off by default.
    fuse_qkv: bool = _opt(PERF, "fused q/k/v projections (exact)", default=False)
    compile: bool = _opt(PERF, "torch.compile the repeated DiT blocks, warmed up at start-up (exact; minutes of "
                               "start-up)", default=False)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = _opt(
        PERF, "torch.compile mode (reduce-overhead = CUDA graphs)", default="default")
    compile_warmup_sizes: list[int] | None = _opt(
        PERF, "size levels to warm up at start-up, comma-separated (default: the size level; empty = none)",
        default=None)
    attention_backend: str = _opt(PERF, "DiT attention kernel: native (PyTorch's choice) | cudnn | flash | efficient "
                                        "| math | flash-attn | flash-attn-3 | sage | xformers", default="native")
    vae_bf16: bool = _opt(PERF, "VAE in bf16 (official v1.0 decodes in fp32)", default=False)
    vae_channels_last: bool = _opt(PERF, "VAE in channels_last memory format (exact)", default=False)
    # Approximate, opt-in: diffusers' step-cache hooks on the DiT blocks (see models/fastpath.py).
    step_cache: Literal["none", "first_block", "taylorseer", "magcache"] = _opt(
        PERF, "skip DiT work on some steps (approximate): first_block = skip the other blocks when the first "
              "block's residual changed by less than the threshold; taylorseer = predict block outputs by Taylor "
              "series between full steps; magcache = skip by accumulated magnitude ratios (needs "
              "step_cache_mag_ratios)", default="none")
    step_cache_threshold: float = _opt(PERF, "first_block: relative L1 change below which a step is skipped; "
                                             "magcache: accumulated error bound", default=0.05, gt=0.0, le=1.0)
    step_cache_interval: int = _opt(PERF, "taylorseer: steps between full computations", default=5, ge=1, le=50)
    step_cache_warmup_steps: int = _opt(PERF, "taylorseer: first steps always computed in full", default=3, ge=0,
                                        le=50)
    step_cache_mag_ratios: str | None = _opt(
        PERF, "magcache: the model's per-step magnitude ratios, comma-separated, or `flux` (FLUX.1-dev's, not "
              "calibrated for Step1X-Edit) or `calibrate` (skip nothing, log the ratios of each run)", default=None)
    fp8_dynamic: bool = _opt(PERF, "float8 matmuls: torchao dynamic quantisation of the DiT linears (needs torchao "
                                   "and an fp8 GPU; combines with dit_fp8; approximate)", default=False)
    offload: Literal["none", "model"] = _opt(PERF, "model = encoder/DiT/VAE kept on the CPU, each moved to the GPU "
                                                   "only while it runs", default="none")

    # --- parallel ----------------------------------------------------------------------------------------------
    # One request on several ranks (GPUs of this machine; CPU processes with Gloo): the command starts
    # cfg_parallel x ulysses_degree x ring_degree ranks itself (pipeline/parallel.py, models/parallel.py).
    cfg_parallel: int = _opt(PARALLEL, "CFG-parallel: 2 = the prompt and the negative-prompt rows of each step on two "
                                       "ranks, combined every step (1 = off)", default=1, ge=1, le=2)
    ulysses_degree: int = _opt(PARALLEL, "sequence parallel: ranks that split the tokens, attention by Ulysses "
                                         "all-to-all (must divide the 24 heads)", default=1, ge=1, le=64)
    ring_degree: int = _opt(PARALLEL, "sequence parallel: ranks that split the tokens, attention by ring (key/value "
                                      "blocks passed round; combines with ulysses_degree)", default=1, ge=1, le=64)
    parallel_timeout_s: float = _opt(PARALLEL, "with several ranks: a collective (or a rank's start-up) that takes "
                                               "longer fails, and every rank stops (the jobs get 503)",
                                     default=300.0, gt=0)


PERFORMANCE_FIELDS = tuple(n for n, f in Settings.model_fields.items() if (f.json_schema_extra or {}).get("group") == PERF)
