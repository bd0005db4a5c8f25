"""Scale-out: the server on Ray Serve (`step1x-edit serve --ray`, or `serve run` with a config file).

Imported only when Ray is asked for; nothing else in the package imports it (tests/test_architecture.py). The
HTTP app is the same `api.app.create_app` as the single-process server (auth, validation, OpenAI errors,
streaming), deployed as the ingress; the engine + pipeline are a second deployment whose replicas each own a
device (app.py, replica.py); the ingress reaches them through `remote_engine.RemoteEngine`.
"""

from __future__ import annotations


def require_ray() -> None:
    """ImportError -> a message that names the extra to install."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as exc:
        raise SystemExit("step1x-edit serve --ray needs Ray Serve, which is in the [ray] extra: "
                         "pip install 'step1x-edit-server[ray]' (in the checkout: .venv/bin/pip install -c "
                         f"constraints.txt -e '.[ray]')  ({exc})") from None
