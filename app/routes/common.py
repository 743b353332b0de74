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


def headers_for(entry: LoadedModel, meta: dict[str, str]) -> dict[str, str]:
    """meta {'detected_domain': 'smile'} -> {'X-Detected-Domain': 'smile'}, plus the model's name."""
    headers = {"X-Model": entry.name}
    headers.update({"X-" + "-".join(w.capitalize() for w in k.split("_")): v for k, v in meta.items()})
    return headers


async def mask_json(mask: torch.Tensor, threshold: float, size: int | None, png_level: int) -> dict[str, Any]:
    """A (1, S, S) mask as MaskJSON: grayscale PNG (encoded off the event loop), area and bbox at `threshold`."""
    enc = await imaging.encode_async(imaging.encode_mask, mask, "png", size, png_level)
    area, bbox = imaging.mask_extent(mask, threshold, size)
    return {**imaging.as_json(enc), "threshold": threshold, "area": area, "bbox": bbox}


async def image_response(image: torch.Tensor, out: Output, entry: LoadedModel, meta: dict[str, str] | None = None, *,
                         path: bool = False, mask: tuple[torch.Tensor, float] | None = None,
                         full: tuple[imaging.Placed, torch.Tensor] | None = None) -> Response:
    """Encode (off the event loop) one (3, S, S) image, or (T, 3, S, S) frames when `path`, as the request asked.

    `full` (the upload's Placed and its rows' (k, S, S) weights) answers at the upload's size instead: `image` is
    then the (k, 3, S, S) edits of its rows, pasted back over the upload through the weights.
    `mask` (a mask, (1, S, S), or (k, 1, S, S) with `full`, and the threshold of its area) adds the edit's mask: as
    MaskJSON under "mask" in a JSON answer (at the answer's size); an image answer has room for the image alone, so
    it only gets the area (X-Mask-Area)."""
    meta = dict(meta or {})
    if full is not None:
        placed, weights = full
        enc = await imaging.encode_async(imaging.encode_pasted, placed, image, weights, out.format, out.png_level)
        mask = None if mask is None else (imaging.warped_mask(placed, mask[0]), mask[1])
        size = None
    else:
        enc = await imaging.encode_async(imaging.encode_path if path else imaging.encode, image, out.format, out.size, out.png_level)
        size = out.size
    extra: dict[str, Any] = {}
    if mask is not None:
        if out.format == "json":
            extra["mask"] = await mask_json(mask[0], mask[1], size, out.png_level)
            meta["mask_area"] = f"{extra['mask']['area']:.6f}"
        else:
            meta["mask_area"] = f"{imaging.mask_extent(mask[0], mask[1])[0]:.6f}"
    headers = headers_for(entry, meta)
    if out.format == "json":
        return JSONResponse({**imaging.as_json(enc), "model": entry.name, "meta": meta, **extra}, headers=headers)
    return Response(enc.body, media_type=enc.media_type, headers=headers)
