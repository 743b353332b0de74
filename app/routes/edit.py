"""Edits of uploaded images: move an attribute from a guide onto a content image, remove attributes, or (mask
models) segment an attribute.

Each is one `render` job of the batcher: encode (one batched call per encoder for the images of many requests,
each image encoded only into the codes its edit reads: the core's `transfer_parts`, `intersect_parts`,
`remove_parts`) -> the core's Edit of each request's codes (`transfer_edit`, `intersect_edit`, `remove_edit`) -> the
core's `render` (one batched call). A plain model decodes the recombined codes; a mask model pastes the new attribute through its mask
onto the uploaded image itself, and answers the masks that /segment and `include_mask` return."""
from __future__ import annotations

from typing import Any

import torch
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from models import Codes, Disentangler, Edit
from models.disentangler import REMOVAL_THRESHOLD

from .. import imaging
from ..deps import AcceptHeader, RegistryDep, RemoveBody, SegmentBody, SettingsDep, TransferBody, output
from ..errors import BadRequest
from ..registry import LoadedModel
from ..schemas import SegmentJSON
from .common import IMAGE_RESPONSES, headers_for, image_response, mask_json

router = APIRouter(tags=["edit"], responses=IMAGE_RESPONSES)

TRANSFER_MASK_THRESHOLD = 0.5  # the area of a pasted attribute's mask counts the pixels mostly the new attribute's


def _domain(entry: LoadedModel, name: str, what: str) -> int:
    try:
        return entry.config.domain_index(name)
    except ValueError as e:
        raise BadRequest(f"{what}: {e}") from None


def _needs_mask(entry: LoadedModel, what: str) -> None:
    """400 for a mask-only option on a plain model."""
    if not entry.config.has_mask:
        raise BadRequest(f"{what} needs a mask-variant model; {entry.name!r} is a {entry.config.variant} model "
                         "(GET /models lists each model's variant)")


def _which(entry: LoadedModel, attribute: str) -> int | None:
    """None for auto (the detected domain), 0 (a), 1 (b) or 2 (both)."""
    key = attribute.strip().lower()
    return None if key == "auto" else 2 if key == "both" else _domain(entry, attribute, "attribute")


def _chosen(model: Disentangler, codes: Codes, which: int | None) -> torch.Tensor:
    """(1,) the domain (or 2: both) an edit of one image works on: `which`, or when None the domain its codes show."""
    if which is None:
        return model.detect(codes)
    return torch.full((1,), which, device=next(t for t in codes if t is not None).device)


@router.post("/transfer", response_class=Response, summary="Put the guide's attribute on the content image")
async def transfer(form: TransferBody, settings: SettingsDep, registry: RegistryDep, accept: AcceptHeader = None) -> Response:
    """G(E_c(content), E_sA(guide), 0) or G(E_c(content), 0, E_sB(guide)) by the guide's (or `target`'s) domain;
    with guide_a and guide_b, the intersection G(E_c(content), E_sA(guide_a), E_sB(guide_b)).
    Headers X-Target-Domain (the one transferred) and, when no target is given, X-Detected-Domain (the guide's
    domain by its codes: detecting it reads the guide's other separate code too)."""
    intersection = form.guide_a is not None or form.guide_b is not None
    if intersection:
        if form.guide is not None:
            raise BadRequest("give either 'guide', or 'guide_a' and 'guide_b' (the intersection form), not both")
        if form.guide_a is None or form.guide_b is None:
            raise BadRequest("'guide_a' and 'guide_b' go together (the intersection form)")
        if form.target is not None:
            raise BadRequest("'target' does not apply to the intersection form (it adds both attributes)")
        uploads = [("content", form.content), ("guide_a", form.guide_a), ("guide_b", form.guide_b)]
    elif form.guide is None:
        raise BadRequest("'guide' is required (or 'guide_a' and 'guide_b' together)")
    else:
        uploads = [("content", form.content), ("guide", form.guide)]
    entry = registry.get(form.model)
    out = output(settings, form.format, accept, form.size)
    wanted = None if form.target is None else _domain(entry, form.target, "target")
    if form.include_mask:
        _needs_mask(entry, "include_mask")

    cfg, model = entry.config, entry.model
    x = await imaging.load_images(uploads, cfg.image_size, form.fit, settings.max_upload_bytes, settings.max_pixels)
    strength, keep = form.strength, form.keep

    parts = model.intersect_parts() if intersection else model.transfer_parts(wanted, keep)

    def plan(codes: list[Codes]) -> tuple[Edit, int | None]:  # runs in the model's thread, on its device
        if intersection:  # G(E_c(c), s E_sA(guide_a), s E_sB(guide_b))
            return model.intersect_edit(*codes, strength), None
        c, g = codes
        to = _chosen(model, g, wanted)
        return model.transfer_edit(c, g, to, strength, keep), None if wanted is not None else int(to[0])

    image, mask, detected = await entry.batcher.render(x, plan, parts)
    if intersection:
        meta = {"target_domain": f"{cfg.domain_a}+{cfg.domain_b}"}
    elif detected is None:
        meta = {"target_domain": entry.domains[wanted]}
    else:
        meta = {"detected_domain": entry.domains[detected], "target_domain": entry.domains[detected]}
    shown = (mask[0], TRANSFER_MASK_THRESHOLD) if form.include_mask and mask is not None else None
    return await image_response(image[0], out, entry, meta, mask=shown)


@router.post("/remove-attribute", response_class=Response, summary="Remove the separate attribute(s) of an image")
async def remove_attribute(form: RemoveBody, settings: SettingsDep, registry: RegistryDep, accept: AcceptHeader = None) -> Response:
    """Plain models: G(E_c(x), 0, E_sB(x)) (attribute a), G(E_c(x), E_sA(x), 0) (b), G(E_c(x), 0, 0) (both).
    Mask models keep the upload's pixels and replace only where the attribute's mask exceeds `threshold` (or blend
    by it with `soft`) with G(E_c(x), 0, 0). Header X-Removed, and X-Detected-Domain for attribute=auto."""
    entry = registry.get(form.model)
    out = output(settings, form.format, accept, form.size)
    which = _which(entry, form.attribute)
    for given, what in ((form.threshold is not None, "threshold"), (form.soft is not None, "soft"), (form.include_mask, "include_mask")):
        if given:
            _needs_mask(entry, what)
    threshold = REMOVAL_THRESHOLD if form.threshold is None else form.threshold
    soft = bool(form.soft)
    cfg, model = entry.config, entry.model
    x = await imaging.load_images([("image", form.image)], cfg.image_size, form.fit, settings.max_upload_bytes, settings.max_pixels)

    def plan(codes: list[Codes]) -> tuple[Edit, int]:  # runs in the model's thread, on its device
        dropped = _chosen(model, codes[0], which)
        return model.remove_edit(codes[0], dropped, threshold, soft), int(dropped[0])

    result, mask, dropped = await entry.batcher.render(x, plan, (model.remove_parts(which),))
    meta = {"detected_domain": entry.domains[dropped]} if which is None else {}
    meta["removed"] = "+".join(entry.domains) if dropped == 2 else entry.domains[dropped]
    # the area of a hard removal counts the pixels it replaced; a soft one's, those mostly replaced
    shown = (mask[0], 0.5 if soft else threshold) if form.include_mask and mask is not None else None
    return await image_response(result[0], out, entry, meta, mask=shown)


SEGMENT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the mask as a grayscale image (PNG unless format= or Accept asks for another), or SegmentJSON",
          "content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}, "application/json": {}}, "model": SegmentJSON},
}


@router.post("/segment", response_class=Response, responses=SEGMENT_RESPONSES, summary="The attribute mask of an image (mask models)")
async def segment(form: SegmentBody, settings: SettingsDep, registry: RegistryDep, accept: AcceptHeader = None) -> Response:
    """The mask model's weakly supervised segmentation: where the image shows the attribute of domain `attribute`
    (auto: the detected domain; both: either). A grayscale image (255 = attribute) at the model's resolution or
    `size`; as JSON (SegmentJSON) the PNG in base64 with the area and bounding box of the pixels above `threshold`.
    Headers X-Attribute, X-Mask-Area, and X-Detected-Domain for attribute=auto. A plain model answers 400."""
    entry = registry.get(form.model)
    _needs_mask(entry, "/segment")
    out = output(settings, form.format, accept, form.size)
    which = _which(entry, form.attribute)
    model = entry.model
    x = await imaging.load_images([("image", form.image)], entry.config.image_size, form.fit, settings.max_upload_bytes,
                                  settings.max_pixels)

    def plan(codes: list[Codes]) -> tuple[Edit, int]:  # the mask of a removal is the attribute's mask
        segmented = _chosen(model, codes[0], which)
        return model.remove_edit(codes[0], segmented), int(segmented[0])

    _, mask, segmented = await entry.batcher.render(x, plan, (model.remove_parts(which),))
    assert mask is not None  # a mask model
    meta = {"detected_domain": entry.domains[segmented]} if which is None else {}
    meta["attribute"] = "+".join(entry.domains) if segmented == 2 else entry.domains[segmented]
    if out.format == "json":
        body = await mask_json(mask[0], form.threshold, out.size, out.png_level)
        meta["mask_area"] = f"{body['area']:.6f}"
        return JSONResponse({**body, "model": entry.name, "meta": meta}, headers=headers_for(entry, meta))
    enc = await imaging.encode_async(imaging.encode_mask, mask[0], out.format, out.size, out.png_level)
    meta["mask_area"] = f"{imaging.mask_extent(mask[0], form.threshold)[0]:.6f}"
    return Response(enc.body, media_type=enc.media_type, headers=headers_for(entry, meta))
