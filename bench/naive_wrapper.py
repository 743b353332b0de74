"""The obvious way to serve a checkpoint, the baseline of `bench/http_load.py`: one synchronous FastAPI endpoint
that decodes both uploads with Pillow, runs `Disentangler.transfer` on them at batch 1 in fp32 (the guide's domain
detected), and answers a PNG. No batching, no queue, no limits: FastAPI runs each call in its thread pool, so
concurrent requests run their model calls side by side on the same cores.

    NAIVE_WEIGHTS=weights/smile_glasses NAIVE_DEVICE=auto uvicorn bench.naive_wrapper:app --port 8001
"""
from __future__ import annotations

import io
import os

import torch
from fastapi import FastAPI, File, UploadFile
from fastapi.responses import Response
from PIL import Image

import models
from models.images import fit, to_pil, to_tensor

model = models.load(os.environ.get("NAIVE_WEIGHTS", "weights/smile_glasses"),
                    device=models.resolve_device(os.environ.get("NAIVE_DEVICE", "auto"))).eval()
app = FastAPI()


@app.get("/readyz")
def ready() -> dict[str, str]:
    return {"status": "ready"}


@app.post("/transfer")
def transfer(content: UploadFile = File(...), guide: UploadFile = File(...)) -> Response:
    size = model.config.image_size
    x = [to_tensor(fit(Image.open(io.BytesIO(f.file.read())), size))[None].to(model.device) for f in (content, guide)]
    with torch.no_grad():
        out = model.transfer(x[0], x[1])
    buf = io.BytesIO()
    to_pil(out[0]).save(buf, "PNG")
    return Response(buf.getvalue(), media_type="image/png")
