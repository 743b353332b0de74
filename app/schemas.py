"""Request and response bodies (JSON) of the API, declared so the OpenAPI document is exact."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field

from models.images import Fit

from .imaging import Format

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
# One code given inline: a latent id, "zero", or the code's numbers in (C, H, W) row-major order.
CodeSource = Annotated[
    Annotated[str, Field(max_length=128)] | Annotated[list[FiniteFloat], Field(max_length=65536)] | None,
    Field(description='a latent id (that latent\'s code of the same name), "zero" or null (all zeros), or the code\'s '
          "numbers flattened from (C, H, W): H = W = 2, or the common_map of a model whose common code is larger, or 1 "
          "for the separate codes of a model whose separate_map is 1; their count per code is in GET /models"),
]


class Domains(BaseModel):
    a: str
    b: str


class CodeSizes(BaseModel):
    """Numbers in each code (channels x H x W of its map)."""

    common: int
    sep_a: int
    sep_b: int


class ModelInfo(BaseModel):
    name: str
    image_size: int
    domains: Domains
    variant: str
    code_sizes: CodeSizes
    default: bool
    card: dict[str, Any] = Field(description="the checkpoint's model card (config, training, metrics, versions, sha256)")


class ModelsResponse(BaseModel):
    default: str
    models: list[ModelInfo]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    models: list[str]
    device: str


class Latents(BaseModel):
    """The three codes of an image, each flattened from (C, H, W) (`CodeSource`)."""

    common: list[float]
    sep_a: list[float]
    sep_b: list[float]


class EncodeResponse(BaseModel):
    id: str = Field(description="latent id for /decode and /interpolate")
    model: str
    expires_in: int = Field(description="seconds the id stays valid")
    domain_scores: dict[str, float] = Field(description="mean |separate code| per domain name; the larger names the domain")
    detected_domain: str
    detected: str = Field(description="'a' or 'b'")
    domain_score: float | None = Field(None, description="the upload's reconstruction error over the calibration's p99 "
                                       "(1: as far off as the 99th percentile of training images); null: not scored")
    out_of_domain: bool | None = Field(None, description="the error is above the card's calibration threshold")
    latents: Latents | None = None


class DecodeRequest(BaseModel):
    model: str | None = Field(None, description="default: the latents' model, else the service's default model")
    common: CodeSource = None
    sep_a: CodeSource = None
    sep_b: CodeSource = None


class MaskJSON(BaseModel):
    """A mask model's attribute mask: a grayscale PNG (white = attribute) and what it covers."""

    image: str = Field(description="base64 of the grayscale PNG, 255 where the mask is 1")
    media_type: str
    width: int
    height: int
    threshold: float = Field(description="the mask value above which a pixel counts as the attribute's")
    area: float = Field(description="fraction of the pixels whose mask exceeds the threshold")
    bbox: list[int] | None = Field(description="[x0, y0, x1, y1] (x1, y1 exclusive) of those pixels in this PNG's "
                                   "pixel coordinates; null when there are none")


class ImageJSON(BaseModel):
    """An image answered as JSON (format=json or Accept: application/json)."""

    image: str = Field(description="base64 of the encoded image")
    media_type: str
    width: int
    height: int
    model: str
    meta: dict[str, str] = Field(default_factory=dict, description="the same facts as the X-* headers, e.g. detected_domain")
    mask: MaskJSON | None = Field(None, description="with include_mask=true on a mask model: the edit's mask")


class SegmentJSON(MaskJSON):
    """POST /segment answered as JSON."""

    model: str
    meta: dict[str, str] = Field(default_factory=dict, description="the same facts as the X-* headers: detected_domain, attribute")


# --- faces ------------------------------------------------------------------------------------------------------

XY = Annotated[list[float], Field(min_length=2, max_length=2, description="[x, y] in the upload's pixels")]


class FaceLandmarks(BaseModel):
    """Five points of a face; left and right as seen in the image (the image-left eye is the person's right eye)."""

    left_eye_outer: XY
    left_eye_inner: XY
    right_eye_inner: XY
    right_eye_outer: XY
    nose: XY = Field(description="[x, y] of the base of the nose, between the nostrils")


class FaceInfo(BaseModel):
    index: int = Field(description="the face's position in the list: largest box first")
    box: list[float] = Field(min_length=4, max_length=4, description="[x0, y0, x1, y1] (x1, y1 exclusive); it may "
                             "reach past the image's edges")
    landmarks: FaceLandmarks
    score: float = Field(description="the detector's confidence, its SVM margin (0 is the detector's own cut-off); "
                         "faces below DID_FACE_MIN_SCORE are left out")


class FacesResponse(BaseModel):
    """The faces of an upload. Coordinates are the upright image's full-resolution pixels, continuous: pixel (i, j)
    covers [i, i+1) x [j, j+1), so the top-left pixel's centre is [0.5, 0.5]; x grows to the right, y downwards."""

    width: int = Field(description="the upright image's width in pixels (after its EXIF orientation)")
    height: int
    faces: list[FaceInfo]


# --- multipart form bodies --------------------------------------------------------------------------------------


Align = Literal["auto", "none"]
FaceChoice = Annotated[str, Field(pattern=r"^(largest|all|[0-9]{1,4})$")]
Output = Literal["full", "model"]


class _Form(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is a 422, not silently ignored

    model: str | None = Field(None, max_length=128, description="checkpoint name (GET /models); default: the service's default model")
    fit: Fit = Field("crop", description="how an upload becomes square when it is not aligned: crop (default) keeps the "
                     "central square, pad letterboxes it")
    align: Align = Field("auto", description="auto: a model trained on aligned faces (its card's framing is celeba) "
                         "gets the upload's face, found and aligned on its eyes; none: the upload as fit= makes it")
    face: FaceChoice = Field("largest", description="which face an aligned edit works on: largest, all, or K (the "
                             "index POST /faces gives); only for aligned uploads")
    strict: bool = Field(False, description="answer 422 instead of an edit when an upload is out of the model's domain "
                         "(its reconstruction error above the card's calibration threshold; X-Out-Of-Domain)")


class _ImageAnswerForm(_Form):
    format: Format | None = Field(None, description="png (default), jpeg, webp or json (base64 PNG + metadata); else the Accept header decides")
    output: Output | None = Field(None, description="full (the default unless size= is given): the answer at the "
                                  "upload's own size and aspect, the edit pasted back over the upload's pixels; model: "
                                  "the model's square (at size= pixels per side when given)")
    size: int | None = Field(None, ge=16, description="output=model: answer at this many pixels per side (default: the model's resolution)")


Threshold = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class TransferForm(_ImageAnswerForm):
    content: UploadFile = Field(description="the image whose face (common code) is kept")
    guide: UploadFile | None = Field(None, description="the image whose attribute is added")
    guide_a: UploadFile | None = Field(None, description="intersection form: domain a's attribute from this image (with guide_b)")
    guide_b: UploadFile | None = Field(None, description="intersection form: domain b's attribute from this image (with guide_a)")
    target: str | None = Field(None, max_length=128, description="a, b or a domain's name; default: detected from the guide's separate codes")
    strength: float = Field(1.0, ge=0, le=2, description="scales the added code")
    keep: bool = Field(False, description="keep the content's own attribute of the other domain instead of removing it")
    include_mask: bool = Field(False, description="mask models only: also answer the pasted attribute's mask (its pixels "
                               "with format=json; as the X-Mask-Area header otherwise)")


class RemoveForm(_ImageAnswerForm):
    image: UploadFile = Field(description="the image to edit")
    attribute: str = Field("auto", max_length=128, description="a, b, a domain's name, both, or auto (the domain detected from the image)")
    threshold: Threshold | None = Field(None, description="mask models only: replace the pixels whose mask exceeds this "
                                        "(default 0.1, the paper's)")
    soft: bool | None = Field(None, description="mask models only: blend by the mask instead of thresholding it (default false)")
    include_mask: bool = Field(False, description="mask models only: also answer the removed region's mask (its pixels "
                               "with format=json; as the X-Mask-Area header otherwise)")


class SegmentForm(_ImageAnswerForm):
    image: UploadFile = Field(description="the image to segment")
    attribute: str = Field("auto", max_length=128, description="a, b, a domain's name, both, or auto (the domain detected from the image)")
    threshold: Threshold = Field(0.5, description="mask value above which a pixel counts for the JSON answer's area and bbox")


class FacesForm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: UploadFile = Field(description="the image whose faces are found")


class EncodeForm(_Form):
    image: UploadFile = Field(description="the image to encode")
    include_latents: bool = Field(False, description="also return the three codes as numbers")
