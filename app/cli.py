"""`did serve` and `did-serve`: check and load every checkpoint, then serve them with uvicorn.

`did-serve` (`main`) is the service's own command: it imports nothing of `training`, so it runs where only the
`serve` extra is installed (the Docker image); `did serve` hands its arguments to the same `main`.
The flags (`--host --port --workers --weights --device`) override the DID_* environment variables; every other
setting is an environment variable only (app/settings.py, docs/deploy.md's settings table). A checkpoint that cannot be
loaded stops startup with one line, `did serve: error: FILE: REASON`, and exit status 2.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from pydantic import ValidationError

from .settings import Settings, as_env

FLAGS = ("host", "port", "workers", "weights", "device")


def _fail(message: str) -> int:
    print(f"did serve: error: {message}", file=sys.stderr)
    return 2


def serve(args: argparse.Namespace) -> int:
    overrides = {k: getattr(args, k) for k in FLAGS if getattr(args, k, None) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        return _fail("; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors()))
    os.environ.update(as_env(overrides))  # uvicorn's worker processes rebuild the same Settings from the environment
    logging.getLogger("did").setLevel(settings.log_level.upper())

    from models import CheckpointError  # torch loads only once the flags are known to be sound

    from .registry import Registry

    try:
        registry = Registry.load(settings)
    except CheckpointError as e:
        return _fail(str(e))
    except (OSError, ValueError, RuntimeError) as e:  # unreadable files, dtype/device trouble: still one line
        return _fail(f"{settings.weights}: {type(e).__name__}: {e}")

    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    log_config = copy.deepcopy(LOGGING_CONFIG)  # the service's own log lines, in every worker process too
    log_config["loggers"]["did"] = {"handlers": ["default"], "level": settings.log_level.upper(), "propagate": False}
    common = dict(host=settings.host, port=settings.port, log_level=settings.log_level, access_log=settings.access_log,
                  log_config=log_config)
    if settings.workers == 1:
        from .main import create_app

        uvicorn.run(create_app(settings, registry), **common)
    else:
        del registry  # each worker loads its own copy
        # a worker imports torch and loads every model before it answers uvicorn's health check: give it time
        uvicorn.run("app.main:create_app", factory=True, workers=settings.workers, timeout_worker_healthcheck=60, **common)
    return 0


def build_parser(prog: str = "did-serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Serve every checkpoint of a weights directory over HTTP "
                                "(other settings: DID_* variables).")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 8000)")
    p.add_argument("--workers", type=int, help="uvicorn worker processes (default 1)")
    p.add_argument("--weights", type=Path, help="directory of checkpoints to load (default weights)")
    p.add_argument("--device", help="auto (CUDA when present), cuda, cuda:N or cpu")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "did-serve") -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return serve(build_parser(prog).parse_args(argv))
    except KeyboardInterrupt:  # while the models load; once uvicorn runs, it handles Ctrl-C itself
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
