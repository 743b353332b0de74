"""Faces of an upload: each face's box, five landmarks and score (app/faces.py), in the upright upload's pixels."""
from __future__ import annotations

import asyncio
from functools import partial

from fastapi import APIRouter

from .. import faces, imaging, metrics
from ..deps import FacesBody, SettingsDep
from ..errors import PROBLEM_RESPONSES
from ..schemas import FaceInfo, FaceLandmarks, FacesResponse

router = APIRouter(tags=["faces"])


@router.post("/faces", response_model=FacesResponse, responses=PROBLEM_RESPONSES, summary="Find the faces of an image and five landmarks of each")
async def find_faces(form: FacesBody, settings: SettingsDep) -> FacesResponse:
    """Every face the detector scores at least DID_FACE_MIN_SCORE, largest box first; none is an empty list."""
    img = await imaging.load_upright(form.image, "image", settings.max_upload_bytes, settings.max_pixels)
    work = partial(faces.detect, img, detect_size=settings.face_detect_size, min_score=settings.face_min_score)
    with metrics.stage("faces"):
        found = await asyncio.get_running_loop().run_in_executor(None, work)
    return FacesResponse(width=img.width, height=img.height, faces=[
        FaceInfo(index=i, box=list(f.box), landmarks=FaceLandmarks(**{k: list(v) for k, v in f.landmarks._asdict().items()}),
                 score=f.score)
        for i, f in enumerate(found)
    ])
