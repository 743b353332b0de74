"""Fixtures of the service tests (tests/test_service*.py): tiny checkpoints, face-like images, app clients, a free
port and a throw-away redis-server."""
from __future__ import annotations

import io
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from PIL import Image, ImageDraw

import models
from models import Disentangler, preset

SERVICE_DOMAINS = ("smile", "glasses")


def pytest_configure(config: pytest.Config) -> None:
    # fastapi.testclient still wraps httpx; Starlette asks for httpx2, which this project does not use
    config.addinivalue_line("filterwarnings", "ignore:Using `httpx` with `starlette.testclient` is deprecated")


def _save_tiny(path: Path, seed: int, **overrides) -> Path:
    torch.manual_seed(seed)
    cfg = preset("tiny", image_size=64, domain_a=SERVICE_DOMAINS[0], domain_b=SERVICE_DOMAINS[1]).replace(**overrides)
    return models.save(Disentangler(cfg), path)


@pytest.fixture(autouse=True)
def _keep_torch_threads(request: pytest.FixtureRequest) -> Iterator[None]:
    """The service sets torch's thread count (DID_TORCH_THREADS) for its process; give other test modules theirs back."""
    if not request.module.__name__.split(".")[-1].startswith("test_service"):
        yield
        return
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def service_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights directory holding one tiny 64 px checkpoint, smile_glasses (random weights)."""
    root = tmp_path_factory.mktemp("service_weights")
    _save_tiny(root / "smile_glasses", seed=0)
    return root


@pytest.fixture(scope="session")
def two_model_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two checkpoints: beard_smile (the default: first by name) and smile_glasses."""
    root = tmp_path_factory.mktemp("two_model_weights")
    _save_tiny(root / "smile_glasses", seed=0)
    _save_tiny(root / "beard_smile", seed=1, domain_a="beard", domain_b="smile")
    return root


@pytest.fixture(scope="session")
def mask_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plain and mask models side by side: smile_glasses (plain) and smile_glasses_mask (the mask variant, the
    default: the service prefers it when loaded), both tiny 64 px with random weights."""
    root = tmp_path_factory.mktemp("mask_weights")
    _save_tiny(root / "smile_glasses", seed=0)
    _save_tiny(root / "smile_glasses_mask", seed=2, variant="mask")
    return root


def draw_face(seed: int, size: int | tuple[int, int] = 96) -> Image.Image:
    """A cartoon face: background, face, eyes; `seed` varies colours and (odd seeds) adds glasses or a smile."""
    w, h = (size, size) if isinstance(size, int) else size
    im = Image.new("RGB", (w, h), (40 + seed * 37 % 200, 90 + seed * 11 % 100, 160))
    d = ImageDraw.Draw(im)
    d.ellipse([w * .2, h * .15, w * .8, h * .9], fill=(230, 190 - seed * 7 % 60, 160))
    for x0 in (.33, .57):
        d.ellipse([w * x0, h * .4, w * (x0 + .1), h * .5], fill=(30, 30, 30))
    if seed % 3 == 1:  # glasses
        for x0 in (.3, .54):
            d.rectangle([w * x0, h * .37, w * (x0 + .16), h * .53], outline=(0, 0, 0), width=max(1, w // 40))
    if seed % 3 == 2:  # smile
        d.arc([w * .35, h * .55, w * .65, h * .78], 20, 160, fill=(120, 20, 20), width=max(1, w // 30))
    return im


def encode_image(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def face_png() -> Callable[..., bytes]:
    """face_png(seed, size=96) -> PNG bytes of `draw_face`."""
    return lambda seed, size=96: encode_image(draw_face(seed, size))


@pytest.fixture
def make_service(service_weights: Path) -> Iterator[Callable[..., object]]:
    """make_service(**settings) -> a started TestClient (lifespan run) of an app with those settings; closed after."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    clients = []

    def make(raise_server_exceptions: bool = True, **overrides):
        settings = Settings(**{"weights": service_weights, **overrides})
        client = TestClient(create_app(settings), raise_server_exceptions=raise_server_exceptions)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def service(make_service):
    """A started TestClient of the app on the tiny checkpoint with default settings."""
    return make_service()


def stop_process(proc: subprocess.Popen, grace_s: float) -> None:
    """Ask a server started by a test to stop; kill it if it has not exited after `grace_s` seconds."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """redis://127.0.0.1:PORT/0 of a redis-server started for this test session (no persistence)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian package redis-server); the Redis latent-store tests need it")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(proc, grace_s=5)
