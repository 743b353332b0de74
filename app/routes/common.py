"""What the image-answering routes share: the OpenAPI description of an image answer and its construction."""
from __future__ import annotations

from typing import Any

import torch
from fastapi.responses import JSONResponse, Response

from .. import imaging
from ..deps import Output
from ..errors import PROBLEM_RESPONSES
from ..registry import LoadedModel
from ..schemas import ImageJSON

IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the image (PNG unless format= or Accept asks for another), or ImageJSON",
        "content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}, "application/json": {}},
        "model": ImageJSON,
    },
    **PROBLEM_RESPONSES,
}
PATH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "a strip of the frames side by side (png, jpeg, json) or an animation (gif, webp)",
        "content": {"image/png": {}, "image/jpeg": {}, "image/gif": {}, "image/webp": {}, "application/json": {}},
        "model": ImageJSON,
    },
    **PROBLEM_RESPONSES,
}


def _headers(entry: LoadedModel, meta: dict[str, str]) -> dict[str, str]:
    """meta {'detected_domain': 'smile'} -> {'X-Detected-Domain': 'smile'}, plus the model's name."""
    headers = {"X-Model": entry.name}
    headers.update({"X-" + "-".join(w.capitalize() for w in k.split("_")): v for k, v in meta.items()})
    return headers


async def image_response(image: torch.Tensor, out: Output, entry: LoadedModel, meta: dict[str, str] | None = None, *, path: bool = False) -> Response:
    """Encode (off the event loop) one (3, S, S) image, or (T, 3, S, S) frames when `path`, as the request asked."""
    meta = meta or {}
    enc = await (imaging.encode_path_async(image, out.format, out.size) if path else imaging.encode_async(image, out.format, out.size))
    headers = _headers(entry, meta)
    if out.format == "json":
        return JSONResponse({**imaging.as_json(enc), "model": entry.name, "meta": meta}, headers=headers)
    return Response(enc.body, media_type=enc.media_type, headers=headers)
