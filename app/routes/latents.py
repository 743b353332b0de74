"""Latent ids: encode an image into its three codes, decode any recombination of codes, interpolate between two."""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from fastapi import APIRouter, Query
from fastapi.responses import Response

from models import Codes, Disentangler
from models.calibration import reconstruction_error
from models.disentangler import SPACES

from ..deps import EncodeBody, PathOutput, QueryOutput, RegistryDep, SettingsDep, StoreDep
from ..errors import PROBLEM_RESPONSES, BadRequest
from ..schemas import CodeSource, DecodeRequest, EncodeResponse, Latents
from ..store import Latent
from .common import IMAGE_RESPONSES, PATH_RESPONSES, image_response
from .edit import domain_meta, load, placing, scoring

router = APIRouter(tags=["latents"])

CODE_NAMES = ("common", "sep_a", "sep_b")


@router.post("/encode", response_model=EncodeResponse, responses=PROBLEM_RESPONSES, summary="Encode an image; keep its codes under an id")
async def encode(form: EncodeBody, settings: SettingsDep, registry: RegistryDep, store: StoreDep) -> EncodeResponse:
    """The latent id (valid for DID_LATENT_TTL_S seconds), the domain scores and the detected domain."""
    entry = registry.get(form.model)
    how = placing(entry, form, settings, answers=False)
    if how.face == "all":
        raise BadRequest("face=all: a latent id holds the codes of one face; give face=K (POST /faces lists them)")
    x, placed = await load(entry, how, [("image", form.image)], form, settings)
    codes = await entry.batcher.encode(x)
    verdict = {}
    if scoring(entry, form, settings):
        def error(m: Disentangler) -> torch.Tensor:
            return reconstruction_error(m, x, Codes(*(t.to(m.device, m.dtype) for t in codes)))

        verdict = domain_meta(entry, placed, await entry.batcher.call(error), form.strict)
    scores = entry.model.domain_scores(codes)[0].tolist()
    detected = int(entry.model.detect(codes)[0])
    row = Codes(*(t[0] for t in codes))
    names = entry.domains
    latent_id = await store.put(Latent(entry.name, row, {"detected": "ab"[detected]}))
    return EncodeResponse(
        id=latent_id,
        model=entry.name,
        expires_in=store.ttl_s,
        domain_scores={names[0]: scores[0], names[1]: scores[1]},
        detected_domain=names[detected],
        detected="ab"[detected],
        domain_score=float(verdict["domain_score"]) if verdict else None,
        out_of_domain=verdict["out_of_domain"] == "true" if verdict else None,
        latents=Latents(**{k: t.flatten().tolist() for k, t in zip(CODE_NAMES, row)}) if form.include_latents else None,
    )


@router.post("/decode", response_class=Response, responses=IMAGE_RESPONSES, summary="Decode a recombination of codes")
async def decode(body: DecodeRequest, registry: RegistryDep, store: StoreDep, out: QueryOutput) -> Response:
    """Each code (`common`, `sep_a`, `sep_b`) from a latent id, raw numbers, or zero; returns G(common, sep_a, sep_b)."""
    sources: dict[str, CodeSource] = {k: getattr(body, k) for k in CODE_NAMES}
    ids = {k: v for k, v in sources.items() if isinstance(v, str) and v != "zero"}
    if not body.model and not ids and not any(isinstance(v, list) for v in sources.values()):
        raise BadRequest("name at least one code (a latent id or numbers) or a model")
    latents = {k: await store.get(v) for k, v in ids.items()}
    model_name = body.model or next((lat.model for lat in latents.values()), None)
    entry = registry.get(model_name)
    for k, lat in latents.items():
        if lat.model != entry.name:
            raise BadRequest(f"{k}: latent {ids[k]!r} belongs to model {lat.model!r}, not {entry.name!r}")
    cfg = entry.config
    parts = []
    for k in CODE_NAMES:
        shape = cfg.part_shape(k)
        v = sources[k]
        if k in latents:
            t = getattr(latents[k].codes, k)
        elif isinstance(v, list):
            need = shape[0] * shape[1] * shape[2]
            if len(v) != need:
                raise BadRequest(f"{k}: {len(v)} numbers given; model {entry.name!r} needs {need} (shape {list(shape)})")
            t = torch.tensor(v, dtype=torch.float32).view(shape)
        else:
            t = torch.zeros(shape)
        parts.append(t.unsqueeze(0))
    image = await entry.batcher.decode(Codes(*parts))
    return await image_response(image[0], out, entry)


@router.get("/interpolate", response_class=Response, responses=PATH_RESPONSES, summary="Decode the straight path between two latents")
async def interpolate(
    settings: SettingsDep,
    registry: RegistryDep,
    store: StoreDep,
    out: PathOutput,
    start: Annotated[str, Query(max_length=128, description="latent id of the first frame")],
    end: Annotated[str, Query(max_length=128, description="latent id whose code(s) the last frame takes")],
    space: Annotated[Literal["common", "a", "b", "all"], Query(description="the code that moves; the others stay at start's")] = "all",
    steps: Annotated[int, Query(ge=2, le=256, description="frames, ends included (at most DID_MAX_INTERPOLATE_STEPS)")] = 8,
    model: Annotated[str | None, Query(description="checkpoint name; default: the latents' model")] = None,
) -> Response:
    """Frames of G along start -> end in one code space: side by side (png, jpeg, json) or animated (gif, webp)."""
    assert space in SPACES
    if steps > settings.max_interpolate_steps:
        raise BadRequest(f"steps {steps} is more than the limit of {settings.max_interpolate_steps}")
    a, b = await store.get(start), await store.get(end)
    entry = registry.get(model or a.model)
    for what, lat, lid in (("start", a, start), ("end", b, end)):
        if lat.model != entry.name:
            raise BadRequest(f"{what}: latent {lid!r} belongs to model {lat.model!r}, not {entry.name!r}")

    def path(m) -> torch.Tensor:
        put = lambda codes: Codes(*(t.unsqueeze(0).to(m.device, next(m.parameters()).dtype) for t in codes))  # noqa: E731
        return m.interpolate(put(a.codes), put(b.codes), steps, space)[0].float().cpu()

    frames = await entry.batcher.call(path, rows=steps)
    return await image_response(frames, out, entry, {"space": space, "steps": str(steps)}, path=True)
