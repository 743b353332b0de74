"""The HTTP floor of POST /transfer, the `floor` row of `bench/http_load.py`: what the service's web layer costs with
no image or model work. The same FastAPI form model (`TransferForm`), problem errors and middlewares (body limit
and deadline, metrics) as the service; the endpoint reads both uploads as the service does and answers one fixed
PNG of the model's size, encoded once at startup.

    uvicorn bench.http_floor:app --port 8002
"""
from __future__ import annotations

import io

from fastapi import FastAPI
from fastapi.responses import Response
from PIL import Image

from app import errors, imaging
from app.deps import TransferBody
from app.limits import LimitsMiddleware
from app.metrics import Metrics, MetricsMiddleware
from app.settings import Settings

settings = Settings()
buf = io.BytesIO()
Image.new("RGB", (64, 64), (128, 96, 64)).save(buf, "PNG")
ANSWER = buf.getvalue()  # a 64 px PNG, the size of the service's answer

app = FastAPI()
errors.install(app)


@app.get("/readyz")
async def ready() -> dict[str, str]:
    return {"status": "ready"}


@app.post("/transfer")
async def transfer(form: TransferBody) -> Response:
    for name, upload in (("content", form.content), ("guide", form.guide)):
        if upload is not None:
            await imaging.read_upload(upload, name, settings.max_upload_bytes)
    return Response(ANSWER, media_type="image/png", headers={"X-Model": "floor", "X-Target-Domain": "b"})


app.add_middleware(LimitsMiddleware, max_bytes=settings.max_request_bytes, timeout_s=settings.request_timeout_s)
app.add_middleware(MetricsMiddleware, metrics=Metrics())
