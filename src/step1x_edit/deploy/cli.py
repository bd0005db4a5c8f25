"""`step1x-edit serve --ray`: the settings checked here (fast, before Ray starts), then deploy/app.run."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from ..cli_args import settings_from_args
from ..storage import open_store
from . import require_ray


def run_serve_ray(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"step1x-edit serve: invalid setting: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    require_ray()
    try:
        open_store(settings)  # a store that cannot work (S3 without a link key, no bucket) stops us here
        from .app import parse_replicas

        parse_replicas(settings.replicas)
    except (OSError, ValueError) as exc:
        print(f"step1x-edit serve: {exc}", file=sys.stderr)
        return 2
    if settings.storage_url is None and (settings.ray_address or _joins_cluster()):
        logging.getLogger("step1x_edit.deploy").warning(
            "outputs are kept in the local directory %s: with ingress replicas on several machines, links made on "
            "one are not served by another; set STEP1X_STORAGE_URL=s3://... (README, Scaling out)",
            settings.storage_dir)
    from .app import run

    return run(settings)


def _joins_cluster() -> bool:
    import os

    return bool(os.environ.get("RAY_ADDRESS"))
