"""One settings object: environment variables `STEP1X_*`, CLI flags override (see `cli.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STEP1X_", extra="ignore")

    # --- model -------------------------------------------------------------------------------------------------
    # `dev` = tiny random weights built at start-up (outputs are noise); `full` = the real model from the paths below.
    preset: Literal["auto", "dev", "full"] = "auto"
    dit_path: Path | None = None  # step1x-edit-i1258.safetensors / step1x-edit-v1p1-official.safetensors
    vae_path: Path | None = None  # vae.safetensors
    encoder_path: Path | None = None  # Qwen2.5-VL-7B-Instruct directory
    version: Literal["auto", "v1.0", "v1.1"] = "auto"  # detected from the DiT file unless forced
    device: str = "auto"  # auto -> cuda if available else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto -> bf16 on GPU, fp32 on CPU
    # working area ~ size_level^2 pixels; None = the preset's default (full 1024, dev 512)
    size_level: int | None = Field(None, ge=256, le=2048)
    dev_seed: int = 0  # seed of the dev preset's random weights

    # --- weights -----------------------------------------------------------------------------------------------
    # Where `full` finds its weights when the three paths above are not all set (each component separately, first
    # hit wins): the paths > model_dir > the Hugging Face cache > (preset auto) the dev preset. See models/layouts.py.
    # STEP1X_MODEL_DIR: a diffusers-style directory (Step1X-Edit-v1p1-diffusers: transformer/ vae/ text_encoder/
    # processor/) or a folder with the official files (step1x-edit-*.safetensors, vae.safetensors,
    # Qwen2.5-VL-7B-Instruct/), as `step1x-edit download --dir` lays it out.
    model_dir: Path | None = None
    hf_cache: bool = True  # STEP1X_HF_CACHE=0: never look in the Hugging Face cache
    hf_cache_dir: Path | None = None  # None = HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub
    # Keep the DiT blocks' Linear weights in float8_e4m3fn (upcast per matmul): ~14 GB instead of ~25 GB on the GPU.
    # FP8 checkpoints load either way (upcast to `dtype` when this is off); bf16 ones are cast to FP8 when on.
    dit_fp8: bool = False

    def resolved_preset(self) -> str:
        """`auto` -> `full` when a Step1X-Edit DiT is configured or found (STEP1X_DIT_PATH, STEP1X_MODEL_DIR, the
        Hugging Face cache), else `dev`. Cheap: file-system lookups only, no torch import."""
        if self.preset != "auto":
            return self.preset
        from .models.layouts import has_weights

        return "full" if has_weights(self) else "dev"

    # --- server ------------------------------------------------------------------------------------------------
    # Read by `api/`, `engine/` and `storage/` (`step1x-edit serve`); every field is also a `STEP1X_<NAME>` variable.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Bearer keys: comma-separated (STEP1X_API_KEYS) and/or a file with one key a line (`#` comments). None = open.
    api_keys: SecretStr | None = None
    api_keys_file: Path | None = None
    # /metrics needs one of those keys too (when any is set); 1 = open to anyone who can reach it, as before.
    metrics_open: bool = False
    # Admission and batching: jobs waiting for the worker (429 beyond), images per pipeline call (`n` counts),
    # how long an idle worker waits for companions before starting a batch, and the per-request deadline (504).
    queue_depth: int = Field(16, ge=1, le=10_000)  # 0 would refuse every request (429), even on an idle server
    batch_max_images: int = Field(4, ge=1, le=64)
    batch_wait_ms: float = Field(10.0, ge=0, le=10_000)
    request_timeout_s: float = Field(600.0, gt=0)
    shutdown_timeout_s: float = Field(60.0, ge=0)  # graceful shutdown: how long to drain admitted work
    # Input limits: whole request body, one input image's encoded bytes and decoded pixels, and links.
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    # The whole request body must arrive within this many seconds (408 otherwise): a client trickling its upload
    # (slow loris) cannot hold a connection and a buffer for long.
    body_timeout_s: float = Field(60.0, gt=0)
    # A request's line and headers: at most this many bytes (431) and seconds (408), whatever the HTTP parser
    # (api/httpserver.py). Unbounded, one 64 MB header stalled every other request for seconds.
    max_header_bytes: int = Field(64 * 1024, ge=4096, le=16 * 1024 * 1024)
    header_timeout_s: float = Field(10.0, gt=0)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=64)
    image_fetch_timeout_s: float = Field(10.0, gt=0)
    image_fetch_max_redirects: int = Field(3, ge=0, le=10)
    # Links to loopback/private/link-local/metadata addresses are refused unless this is set (tests, trusted LANs).
    allow_private_image_urls: bool = False
    # Outputs: where `url` responses' files live, how long links stay valid, the base URL put in links
    # (None = the base URL the request came in on), and the HMAC key (None = a random key kept in storage_dir).
    storage_dir: Path = Path("data/images")
    url_expiry_s: int = Field(7 * 24 * 3600, ge=1)
    public_base_url: str | None = None
    url_signing_key: SecretStr | None = None
    janitor_interval_s: float = Field(3600.0, gt=0)
    # `b64_json` as plain base64 (OpenAI's form, default) or as `data:image/png;base64,…` (the hosted example's form).
    b64_json_style: Literal["plain", "data_uri"] = "plain"
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    # --- performance -------------------------------------------------------------------------------------------
    # Applied by `models/fastpath.apply_performance` at the end of `build_pipeline`; all off by default.
    # Exact (same function up to bf16 rounding): fused q/k/v projections, regional torch.compile of the DiT blocks
    # (with a warm-up per size level at start-up; None = the size_level, [] = none), the DiT attention kernel
    # (native | cudnn | flash | efficient | math | flash-attn | flash-attn-3 | sage | xformers), VAE channels_last.
    fuse_qkv: bool = False
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    compile_warmup_sizes: list[int] | None = None
    attention_backend: str = "native"
    vae_bf16: bool = False  # VAE in bf16 (official v1.0 decodes in fp32)
    vae_channels_last: bool = False
    # Approximate, opt-in: first-block step cache (skip the rest of the DiT when the first block's residual changed
    # by less than this relative L1 since the last full step; 0 = off) and float8 matmuls (torchao dynamic float8
    # quantisation of the DiT blocks' linears; needs torchao and an fp8-capable GPU; unlike `dit_fp8`, which only
    # stores the weights in float8, this changes the arithmetic; the two combine).
    step_cache_threshold: float = Field(0.0, ge=0.0, le=1.0)
    fp8_dynamic: bool = False
    # Memory: `model` keeps encoder / DiT / VAE on the CPU and moves each to the device only while it runs.
    offload: Literal["none", "model"] = "none"
