"""Edits of uploaded images: move an attribute from a guide onto a content image, or remove attributes.

Each is one `edit` job of the batcher: encode (one batched model call for the images of many requests) ->
recombination of each request's codes by the core's `transfer_codes` / `remove_codes` -> decode (one batched call)."""
from __future__ import annotations

import torch
from fastapi import APIRouter
from fastapi.responses import Response

from models import Codes

from .. import imaging
from ..deps import AcceptHeader, RegistryDep, RemoveBody, SettingsDep, TransferBody, output
from ..errors import BadRequest
from ..registry import LoadedModel
from .common import IMAGE_RESPONSES, image_response

router = APIRouter(tags=["edit"], responses=IMAGE_RESPONSES)


def _domain(entry: LoadedModel, name: str, what: str) -> int:
    try:
        return entry.config.domain_index(name)
    except ValueError as e:
        raise BadRequest(f"{what}: {e}") from None


@router.post("/transfer", response_class=Response, summary="Put the guide's attribute on the content image")
async def transfer(form: TransferBody, settings: SettingsDep, registry: RegistryDep, accept: AcceptHeader = None) -> Response:
    """G(E_c(content), E_sA(guide), 0) or G(E_c(content), 0, E_sB(guide)) by the guide's (or `target`'s) domain;
    with guide_a and guide_b, the intersection G(E_c(content), E_sA(guide_a), E_sB(guide_b)).
    Headers X-Detected-Domain (the guide's domain by its codes) and X-Target-Domain (the one transferred)."""
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

    cfg, model = entry.config, entry.model
    x = await imaging.load_images(uploads, cfg.image_size, form.fit, settings.max_upload_bytes, settings.max_pixels)
    strength, keep = form.strength, form.keep

    def recombine(codes: Codes) -> tuple[Codes, int | None]:  # runs in the model's thread, on its device
        c = codes.index(slice(0, 1))
        if intersection:
            # G(E_c(c), s E_sA(guide_a), s E_sB(guide_b)) as two transfers: a's attribute, then b's keeping a's.
            a, b = torch.zeros(1, dtype=torch.long, device=c.common.device), torch.ones(1, dtype=torch.long, device=c.common.device)
            with_a = model.transfer_codes(c, codes.index(slice(1, 2)), a, strength, keep=False)
            return model.transfer_codes(with_a, codes.index(slice(2, 3)), b, strength, keep=True), None
        g = codes.index(slice(1, 2))
        detected = model.detect(g)
        to = detected if wanted is None else torch.full_like(detected, wanted)
        return model.transfer_codes(c, g, to, strength, keep), int(detected[0])

    image, detected = await entry.batcher.edit(x, recombine)
    if intersection:
        meta = {"target_domain": f"{cfg.domain_a}+{cfg.domain_b}"}
    else:
        meta = {"detected_domain": entry.domains[detected], "target_domain": entry.domains[detected if wanted is None else wanted]}
    return await image_response(image[0], out, entry, meta)


@router.post("/remove-attribute", response_class=Response, summary="Remove the separate attribute(s) of an image")
async def remove_attribute(form: RemoveBody, settings: SettingsDep, registry: RegistryDep, accept: AcceptHeader = None) -> Response:
    """G(E_c(x), 0, E_sB(x)) (attribute a), G(E_c(x), E_sA(x), 0) (b), G(E_c(x), 0, 0) (both); header X-Removed."""
    entry = registry.get(form.model)
    out = output(settings, form.format, accept, form.size)
    key = form.attribute.strip().lower()
    which = None if key == "auto" else 2 if key == "both" else _domain(entry, form.attribute, "attribute")
    cfg, model = entry.config, entry.model
    x = await imaging.load_images([("image", form.image)], cfg.image_size, form.fit, settings.max_upload_bytes, settings.max_pixels)

    def recombine(codes: Codes) -> tuple[Codes, tuple[int, int]]:  # runs in the model's thread, on its device
        detected = model.detect(codes)
        dropped = detected if which is None else torch.full_like(detected, which)
        return model.remove_codes(codes, dropped), (int(detected[0]), int(dropped[0]))

    result, (detected, dropped) = await entry.batcher.edit(x, recombine)
    removed = "+".join(entry.domains) if dropped == 2 else entry.domains[dropped]
    return await image_response(result[0], out, entry, {"detected_domain": entry.domains[detected], "removed": removed})
