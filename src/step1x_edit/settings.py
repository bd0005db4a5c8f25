"""One settings object: environment variables `STEP1X_*`, CLI flags override (see `cli.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
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
    size_level: int = Field(1024, ge=256, le=2048)  # working area ~ size_level^2 pixels
    dev_seed: int = 0  # seed of the dev preset's random weights

    def resolved_preset(self) -> str:
        if self.preset != "auto":
            return self.preset
        return "full" if self.dit_path else "dev"
