"""Edits of uploaded images: move an attribute from a guide onto a content image, remove attributes, or (mask
models) segment an attribute.

Each is one `render` job of the batcher: encode (one batched call per encoder for the images of many requests,
each image encoded only into the codes its edit reads: the core's `transfer_parts`, `intersect_parts`,
`remove_parts`) -> the core's Edit of the requests' codes (`transfer_edit`, `intersect_edit`, `remove_edit`, one call
for all the requests of a batch that make the same kind of edit: `TransferPlan`, `IntersectPlan`, `RemovePlan`) ->
the core's `render` (one batched call). A plain model decodes the recombined codes; a mask model pastes the new attribute through its mask
onto the uploaded image itself, and answers the masks that /segment and `include_mask` return.

Around that, each request places its uploads in the model's square (`placing`): fitted (`fit=`), or for a model
trained on aligned faces (framing celeba, `align=auto`) aligned on each chosen face's eyes; answers at the upload's
size (`output=full`, the default) paste the edit back over the upload through `weights`. With the domain check on,
every upload is also scored against the card's calibration (`domain_meta`; `strict=true` refuses one out of domain)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from PIL import Image

from models import Codes, Disentangler, Edit
from models.disentangler import REMOVAL_THRESHOLD
from models.framing import Framing, border, framing_of, region

from .. import faces, imaging
from ..deps import AcceptHeader, RegistryDep, RemoveBody, SegmentBody, SettingsDep, TransferBody, output
from ..errors import BadRequest, OutOfDomain
from ..registry import LoadedModel, Registry
from ..settings import Settings
from ..schemas import SegmentJSON
from .common import IMAGE_RESPONSES, headers_for, image_response, mask_json

router = APIRouter(tags=["edit"], responses=IMAGE_RESPONSES)

TRANSFER_MASK_THRESHOLD = 0.5  # the area of a pasted attribute's mask counts the pixels mostly the new attribute's


def _domain(registry: Registry, entry: LoadedModel, name: str, what: str) -> int:
    """0 (a) or 1 (b) for 'a', 'b' or a domain's name; a 400 otherwise, naming the loaded models that have it."""
    try:
        return entry.config.domain_index(name)
    except ValueError:
        key = name.strip().lower()
        others = [e.name for e in registry.entries.values() if key in (d.lower() for d in e.domains)]
        hint = f"; {key} is a domain of {', '.join(others)} (model=NAME)" if others else ""
        raise BadRequest(f"{what}: unknown domain {name!r} for model {entry.name!r} (its domains: 'a' = "
                         f"{entry.domains[0]!r}, 'b' = {entry.domains[1]!r}){hint}") from None


def _needs_mask(entry: LoadedModel, what: str) -> None:
    """400 for a mask-only option on a plain model."""
    if not entry.config.has_mask:
        raise BadRequest(f"{what} needs a mask-variant model; {entry.name!r} is a {entry.config.variant} model "
                         "(GET /models lists each model's variant)")


def _which(registry: Registry, entry: LoadedModel, attribute: str) -> int | None:
    """None for auto (the detected domain), 0 (a), 1 (b) or 2 (both)."""
    key = attribute.strip().lower()
    return None if key == "auto" else 2 if key == "both" else _domain(registry, entry, attribute, "attribute")


# --- the plans of the edits (app.batcher.Plan): each kind planned in one call for all its requests of a batch -------


def _chosen(model: Disentangler, codes: Codes, which: list[int | None]) -> torch.Tensor:
    """(N,) the domain (or 2: both) each image's edit works on: which[i], or where None the domain its codes show."""
    like = next(t for t in codes if t is not None)
    chosen = torch.tensor([-1 if w is None else w for w in which], device=like.device)
    return chosen if all(w is not None for w in which) else torch.where(chosen < 0, model.detect(codes), chosen)


def _rows_of(rows: list[int], like: torch.Tensor) -> torch.Tensor | None:
    """The job of each edited row, for repeating one value per job over its rows (None: one row each)."""
    if all(r == 1 for r in rows):
        return None
    return torch.arange(len(rows), device=like.device).repeat_interleave(torch.tensor(rows, device=like.device))


def _by_row(x: Any, jobs: torch.Tensor | None) -> Any:
    """A value per job (a tensor or Codes, one row each) repeated over each job's edited rows (`_rows_of`)."""
    if jobs is None:
        return x
    return x.index(jobs) if isinstance(x, Codes) else x[jobs]


def _per_row(values: list, jobs: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One value per job as a tensor, one entry per edited row (`_rows_of`)."""
    return _by_row(torch.tensor(values, device=like.device, dtype=dtype), jobs)


def _edited(plans: Sequence[Any], codes: Sequence[list[Codes]]) -> Codes:
    """The codes of every job's edited images (its first plan.rows), in order."""
    return Codes.cat([c for p, cs in zip(plans, codes) for c in cs[:p.rows]])


def _guides(plans: Sequence[Any], codes: Sequence[list[Codes]], offset: int = 0) -> Codes:
    """Each job's guide, its image plan.rows + offset: one row per job."""
    return Codes.cat([cs[p.rows + offset] for p, cs in zip(plans, codes)])


@dataclass(frozen=True)
class TransferPlan:
    """The content's rows (faces) with the guide's attribute: G(E_c(content), s E_sA(guide), 0) or with E_sB. The
    guide image follows the content's rows. Extra: the detected domain (None when `wanted` names it)."""

    rows: int
    wanted: int | None  # the target domain, or None: the guide's, detected from its separate codes
    strength: float
    keep: bool

    @classmethod
    def many(cls, model: Disentangler, plans: Sequence[TransferPlan], codes: Sequence[list[Codes]]) -> tuple[Edit, list[Any]]:
        content, guides = _edited(plans, codes), _guides(plans, codes)
        to = _chosen(model, guides, [p.wanted for p in plans])
        like = content.common
        jobs = _rows_of([p.rows for p in plans], like)
        edit = model.transfer_edit(content, _by_row(guides, jobs), _by_row(to, jobs),
                                   _per_row([p.strength for p in plans], jobs, like, like.dtype),
                                   _per_row([p.keep for p in plans], jobs, like))
        return edit, [None if p.wanted is not None else d for p, d in zip(plans, to.tolist())]


@dataclass(frozen=True)
class IntersectPlan:
    """G(E_c(content), s E_sA(guide_a), s E_sB(guide_b)) of the content's rows; guide_a and guide_b follow them."""

    rows: int
    strength: float

    @classmethod
    def many(cls, model: Disentangler, plans: Sequence[IntersectPlan], codes: Sequence[list[Codes]]) -> tuple[Edit, list[Any]]:
        content = _edited(plans, codes)
        jobs = _rows_of([p.rows for p in plans], content.common)
        strength = _per_row([p.strength for p in plans], jobs, content.common, content.common.dtype)
        guide_a, guide_b = (_by_row(_guides(plans, codes, offset), jobs) for offset in (0, 1))
        return model.intersect_edit(content, guide_a, guide_b, strength), [None] * len(plans)


@dataclass(frozen=True)
class RemovePlan:
    """The removal of attribute `which` (0: a, 1: b, 2: both; None: the domain each row shows) from every row; a
    mask model's removal at `threshold` (or `soft`), whose mask is also the attribute's segmentation. Extra: the
    domain (or 2) each row worked on."""

    rows: int
    which: int | None
    threshold: float = REMOVAL_THRESHOLD
    soft: bool = False

    @classmethod
    def many(cls, model: Disentangler, plans: Sequence[RemovePlan], codes: Sequence[list[Codes]]) -> tuple[Edit, list[Any]]:
        rows = _edited(plans, codes)
        per = [p.rows for p in plans]
        dropped = _chosen(model, rows, [w for p in plans for w in [p.which] * p.rows])
        like = rows.common
        jobs = _rows_of(per, like)
        edit = model.remove_edit(rows, dropped, _per_row([p.threshold for p in plans], jobs, like, like.dtype),
                                 _per_row([p.soft for p in plans], jobs, like))
        return edit, [t.tolist() for t in dropped.split(per)]


@dataclass(frozen=True)
class Placing:
    """How a request's uploads meet the model: aligned on a face (the model's framing, when it has canonical eyes)
    or fitted, and whether the answer is at the upload's size (`full`) or the model's."""

    framing: Framing
    align: Framing | None
    full: bool
    face: str


def placing(entry: LoadedModel, form: Any, settings: Settings, answers: bool = True) -> Placing:
    """align=, face=, output= and size= of a request, checked against the model."""
    framing = framing_of(entry.card)
    align = framing if form.align == "auto" and framing == "celeba" else None
    if align is None and form.face != "largest":
        raise BadRequest(f"face= chooses among the faces of an aligned upload; model {entry.name!r} (framing "
                         f"{framing}) {'is asked for align=none' if framing == 'celeba' else 'does not align uploads'}")
    full = False
    if answers:
        if form.output == "full" and form.size is not None:
            raise BadRequest("size= scales the model-resolution answer; give output=model with it (output=full answers at the upload's size)")
        full = (form.output or ("model" if form.size is not None else "full")) == "full"
        if form.face == "all" and not full:
            raise BadRequest("face=all edits every face of the upload, which only an answer at its size (output=full) can show")
    return Placing(framing, align, full, form.face)


def detector(settings: Settings) -> Callable[[Image.Image], list[faces.Face]]:
    return functools.partial(faces.detect, detect_size=settings.face_detect_size, min_score=settings.face_min_score)


async def load(entry: LoadedModel, how: Placing, uploads: list[tuple[str, Any]], form: Any, settings: Settings,
               ) -> tuple[torch.Tensor, list[imaging.Placed]]:
    """The uploads' model input: the first upload (the image edited) with the face choice, the others (guides) with
    their largest face."""
    named = [(name, up, how.face if i == 0 else "largest") for i, (name, up) in enumerate(uploads)]
    return await imaging.load_placed(named, entry.config.image_size, form.fit, settings.max_upload_bytes, settings.max_pixels,
                                     full=how.full, align=how.align, detect=detector(settings) if how.align else None)


def weights(entry: LoadedModel, how: Placing, masks: torch.Tensor | None, rows: int, threshold: float | None = None) -> torch.Tensor:
    """(rows, S, S): how much of each row's edit replaces the upload when pasted back. A mask model's own masks
    ((rows, 1, S, S); at `threshold` for a hard removal), a plain model's face region of its framing; both fade out
    towards the edge of the model's square."""
    s = entry.config.image_size
    edge = border(s)
    if masks is None:
        return (region(how.framing, s) * edge).expand(rows, s, s)
    m = masks[:, 0].float()
    if threshold is not None:
        m = (m > threshold).float()
    return m * edge


def scoring(entry: LoadedModel, form: Any, settings: Settings) -> bool:
    """Whether this request's uploads are scored against the model's calibration (and strict= is possible)."""
    if form.strict and entry.calibration is None:
        raise BadRequest(f"strict=true needs a calibrated model; the card of {entry.name!r} has no calibration "
                         "(`did calibrate --model` writes one)")
    if form.strict and not settings.domain_check:
        raise BadRequest("strict=true needs the domain check, which this service has off (DID_DOMAIN_CHECK=false)")
    return settings.domain_check and entry.calibration is not None


def domain_meta(entry: LoadedModel, placed: list[imaging.Placed], errors: torch.Tensor | None, strict: bool) -> dict[str, str]:
    """X-Domain-Score (the highest score of the request's uploads), X-Out-Of-Domain and X-Domain-Scores (each
    upload's, per face: "content:0.812,guide:1.030"); with `strict`, an upload out of domain is a 422."""
    cal = entry.calibration
    if errors is None or cal is None:
        return {}
    scores, out = cal.score(errors).tolist(), cal.out_of_domain(errors).tolist()  # Python from here: a few values
    fields = [p.field for p in placed for _ in range(p.rows)]
    if strict and any(out):
        i = max((i for i in range(len(out)) if out[i]), key=scores.__getitem__)
        data = cal.data
        raise OutOfDomain(
            f"'{fields[i]}' is outside what model {entry.name!r} was trained on ({data.get('kind', 'its data')} "
            f"{data.get('pair', '')}".rstrip() + f"): its domain score is {scores[i]:.2f} (reconstruction error "
            f"{float(errors[i]):.4f}), above the threshold {cal.threshold / cal.percentiles['p99']:.2f} ({cal.rule})")
    per, i = [], 0
    for p in placed:
        per.append(f"{p.field}:" + "/".join(f"{v:.3f}" for v in scores[i:i + p.rows]))
        i += p.rows
    return {"domain_score": f"{max(scores):.3f}", "out_of_domain": "true" if any(out) else "false",
            "domain_scores": ",".join(per)}


def _named(entry: LoadedModel, domains: list[int]) -> str:
    """The domains (0, 1, or 2: both) of the edited faces by name, comma-separated (one face: its name alone)."""
    return ",".join("+".join(entry.domains) if d == 2 else entry.domains[d] for d in domains)


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
    how = placing(entry, form, settings)
    wanted = None if form.target is None else _domain(registry, entry, form.target, "target")
    if form.include_mask:
        _needs_mask(entry, "include_mask")

    cfg, model = entry.config, entry.model
    x, placed = await load(entry, how, uploads, form, settings)
    k = placed[0].rows  # the content's rows (faces); one row per guide
    one = model.intersect_parts() if intersection else model.transfer_parts(wanted, form.keep)
    parts = (one[0],) * k + one[1:]
    plan = IntersectPlan(k, form.strength) if intersection else TransferPlan(k, wanted, form.strength, form.keep)
    image, mask, detected, errors = await entry.batcher.render(x, plan, parts, score=scoring(entry, form, settings))
    if intersection:
        meta = {"target_domain": f"{cfg.domain_a}+{cfg.domain_b}"}
    elif detected is None:
        meta = {"target_domain": entry.domains[wanted]}
    else:
        meta = {"detected_domain": entry.domains[detected], "target_domain": entry.domains[detected]}
    meta.update(_placing_meta(how, placed[0]))
    meta.update(domain_meta(entry, placed, errors, form.strict))
    shown = (mask if how.full else mask[0], TRANSFER_MASK_THRESHOLD) if form.include_mask and mask is not None else None
    full = (placed[0], weights(entry, how, mask, k)) if how.full else None
    return await image_response(image if how.full else image[0], out, entry, meta, mask=shown, full=full)


def _placing_meta(how: Placing, placed: imaging.Placed) -> dict[str, str]:
    """X-Faces (faces found) and X-Faces-Edited of an aligned upload; X-Output always."""
    meta = {"output": "full" if how.full else "model"}
    if how.align is not None:
        meta.update(faces=str(placed.faces), faces_edited=str(placed.rows))
    return meta


@router.post("/remove-attribute", response_class=Response, summary="Remove the separate attribute(s) of an image")
async def remove_attribute(form: RemoveBody, settings: SettingsDep, registry: RegistryDep, accept: AcceptHeader = None) -> Response:
    """Plain models: G(E_c(x), 0, E_sB(x)) (attribute a), G(E_c(x), E_sA(x), 0) (b), G(E_c(x), 0, 0) (both).
    Mask models keep the upload's pixels and replace only where the attribute's mask exceeds `threshold` (or blend
    by it with `soft`) with G(E_c(x), 0, 0). Header X-Removed, and X-Detected-Domain for attribute=auto (one value
    per edited face, comma-separated, with face=all)."""
    entry = registry.get(form.model)
    out = output(settings, form.format, accept, form.size)
    how = placing(entry, form, settings)
    which = _which(registry, entry, form.attribute)
    for given, what in ((form.threshold is not None, "threshold"), (form.soft is not None, "soft"), (form.include_mask, "include_mask")):
        if given:
            _needs_mask(entry, what)
    threshold = REMOVAL_THRESHOLD if form.threshold is None else form.threshold
    soft = bool(form.soft)
    model = entry.model
    x, placed = await load(entry, how, [("image", form.image)], form, settings)
    k = placed[0].rows
    result, mask, dropped, errors = await entry.batcher.render(x, RemovePlan(k, which, threshold, soft),
                                                               (model.remove_parts(which),) * k,
                                                               score=scoring(entry, form, settings))
    meta = {"detected_domain": _named(entry, dropped)} if which is None else {}
    meta["removed"] = _named(entry, dropped)
    meta.update(_placing_meta(how, placed[0]))
    meta.update(domain_meta(entry, placed, errors, form.strict))
    # the area of a hard removal counts the pixels it replaced; a soft one's, those mostly replaced
    cut = 0.5 if soft else threshold
    shown = (mask if how.full else mask[0], cut) if form.include_mask and mask is not None else None
    full = (placed[0], weights(entry, how, mask, k, None if soft else threshold)) if how.full else None
    return await image_response(result if how.full else result[0], out, entry, meta, mask=shown, full=full)


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
    how = placing(entry, form, settings)
    which = _which(registry, entry, form.attribute)
    model = entry.model
    x, placed = await load(entry, how, [("image", form.image)], form, settings)
    k = placed[0].rows
    # the mask of a removal is the attribute's mask
    _, masks, segmented, errors = await entry.batcher.render(x, RemovePlan(k, which), (model.remove_parts(which),) * k,
                                                             score=scoring(entry, form, settings))
    assert masks is not None  # a mask model
    meta = {"detected_domain": _named(entry, segmented)} if which is None else {}
    meta["attribute"] = _named(entry, segmented)
    meta.update(_placing_meta(how, placed[0]))
    meta.update(domain_meta(entry, placed, errors, form.strict))
    mask = imaging.warped_mask(placed[0], masks) if how.full else masks[0]
    size = None if how.full else out.size
    if out.format == "json":
        body = await mask_json(mask, form.threshold, size, out.png_level)
        meta["mask_area"] = f"{body['area']:.6f}"
        return JSONResponse({**body, "model": entry.name, "meta": meta}, headers=headers_for(entry, meta))
    enc = await imaging.encode_async(imaging.encode_mask, mask, out.format, size, out.png_level)
    meta["mask_area"] = f"{imaging.mask_extent(mask, form.threshold)[0]:.6f}"
    return Response(enc.body, media_type=enc.media_type, headers=headers_for(entry, meta))
