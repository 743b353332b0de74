"""`did serve` as a real process: it answers /transfer over real HTTP, and a bad checkpoint stops it with one line."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from PIL import Image

from training.cli import main as did

from .conftest import draw_face, encode_image, free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent


def did_command() -> list[str]:
    script = Path(sys.executable).with_name("did")
    return [str(script)] if script.exists() else [sys.executable, "-m", "training.cli"]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DID_")}
    env["DID_LOG_LEVEL"] = "warning"
    return env


@contextlib.contextmanager
def running_did_serve(weights: Path, env: dict[str, str] | None = None, ready_s: float = 120) -> Iterator[str]:
    """A real `did serve` process on `weights` (a free port, from the repository root, environment `env` or
    clean_env()) until the block ends: yields its base URL once /readyz answers 200."""
    port = free_port()
    proc = subprocess.Popen(did_command() + ["serve", "--host", "127.0.0.1", "--port", str(port), "--weights", str(weights),
                                             "--device", "cpu"], cwd=ROOT, env=env or clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"did serve was not ready within {ready_s:g} s"
            time.sleep(0.2)
        yield base
    finally:
        stop_process(proc, grace_s=15)


@pytest.mark.slow
def test_did_serve_answers_transfer_over_http(service_weights):
    with running_did_serve(service_weights, ready_s=90) as base:
        files = {"content": ("a.png", encode_image(draw_face(0, 200)), "image/png"),
                 "guide": ("b.png", encode_image(draw_face(1, 150)), "image/png")}
        r = httpx.post(base + "/transfer", files=files, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        im = Image.open(io.BytesIO(r.content))
        assert im.format == "PNG" and im.size == (200, 200) and r.headers["x-output"] == "full"  # the content's own size
        assert r.headers["x-detected-domain"] in ("smile", "glasses")
        assert httpx.get(base + "/healthz").json() == {"status": "ok"}


@pytest.mark.slow
def test_corrupt_checkpoint_stops_did_serve_with_one_line(service_weights, tmp_path):
    for src in service_weights.iterdir():
        shutil.copy(src, tmp_path / src.name)
    tensors = tmp_path / "smile_glasses.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-10:] = b"corrupted!"
    tensors.write_bytes(bytes(data))
    r = subprocess.run(did_command() + ["serve", "--weights", str(tmp_path), "--port", str(free_port())], cwd=ROOT, env=clean_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("did serve: error: ") and str(tensors) in lines[0] and "sha256" in lines[0]
    assert "Traceback" not in r.stderr + r.stdout


def _bad(tmp_path: Path, service_weights: Path, how: str) -> Path:
    for src in service_weights.iterdir():
        shutil.copy(src, tmp_path / src.name)
    card = tmp_path / "smile_glasses.json"
    if how == "mismatch":  # a card whose config needs other tensor shapes (sha256 still matches)
        c = json.loads(card.read_text())
        c["config"]["sep_channels"] = 5
        card.write_text(json.dumps(c))
    elif how == "not-json":
        card.write_text("{ nope")
    elif how == "no-tensors":
        (tmp_path / "smile_glasses.safetensors").unlink()
    elif how == "empty":
        card.unlink()
        (tmp_path / "smile_glasses.safetensors").unlink()
    return card


@pytest.mark.parametrize("how,reason", [("mismatch", "do not match"), ("not-json", "not valid JSON"),
                                        ("no-tensors", "not found"), ("empty", "no checkpoints")])
def test_bad_weights_give_one_line_and_exit_2(service_weights, tmp_path, capsys, how, reason):
    card = _bad(tmp_path, service_weights, how)
    assert did(["serve", "--weights", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("did serve: error: ") and reason in err[0], err
    assert str(tmp_path) in err[0] and (how == "empty" or card.name in err[0] or "safetensors" in err[0])


def test_missing_weights_dir_and_bad_flags(tmp_path, capsys):
    assert did(["serve", "--weights", str(tmp_path / "nowhere")]) == 2
    assert "weights directory not found" in capsys.readouterr().err
    assert did(["serve", "--weights", str(tmp_path), "--device", "tpu"]) == 2
    assert "device" in capsys.readouterr().err
    assert did(["serve", "--weights", str(tmp_path), "--workers", "0"]) == 2


def test_other_commands_do_not_import_the_service():
    code = "import sys; from training.cli import build_parser; build_parser(); print(any(m == 'app' or m.startswith('app.') for m in sys.modules), 'fastapi' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
