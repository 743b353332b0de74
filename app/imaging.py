"""The one place where the service turns uploads into model input and model output into answers.

Uploads: read in chunks up to a byte cap (413), opened with a fixed set of decoders, refused above a pixel cap
before any pixel is decoded (decompression bombs: 413), then decoded as training data is (`models.images.load_rgb`:
first frame, EXIF orientation, RGB) and fitted to the model, or kept at full resolution (`decode_rgb`) for face
detection. Anything Pillow cannot decode is a 415.
Outputs: PNG (default), JPEG, WebP, a JSON envelope with base64 PNG; strips and GIF/WebP animations for paths.

Decoding and encoding are blocking Pillow calls; `load_placed`, `load_upright` and the `*_async` helpers run them
in the event loop's default thread pool (Pillow releases the GIL while it codes), so the event loop only moves bytes.
"""
from __future__ import annotations

import asyncio
import base64
import io
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from fastapi import UploadFile
from PIL import Image, ImageFile, UnidentifiedImageError

from models.framing import Framing, Placement, paste, sample, warp_mask
from models.images import Fit, fit, grid, load_rgb, to_pil, to_tensor

from . import metrics
from .errors import NoFace, TooLarge, UnsupportedImage
from .faces import Face

Format = Literal["png", "jpeg", "webp", "json"]
PathFormat = Literal["png", "jpeg", "webp", "gif", "json"]

# Decoders we let near client bytes; everything else is refused as 415 without trying it.
Image.init()
DECODERS = tuple(f for f in ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF", "PPM") if f in Image.OPEN)
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "gif": "image/gif", "json": "application/json"}
_BY_MEDIA_TYPE = {v: k for k, v in MEDIA_TYPES.items()} | {"image/jpg": "jpeg"}
CHUNK = 1 << 16

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated upload is an error, not a grey half-image
# The pixel cap below is ours (a 413 before decoding); Pillow's own warning at 89 M pixels would only add noise.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


# --- uploads ------------------------------------------------------------------------------------------------------


async def read_upload(upload: UploadFile, field: str, max_bytes: int) -> bytes:
    """The upload's bytes, reading at most `max_bytes` + 1 of them: 413 above the cap, 415 when empty."""
    if upload.size is not None and upload.size > max_bytes:
        raise TooLarge(f"'{field}' is {upload.size} bytes; the limit is {max_bytes}")
    parts, total = [], 0
    while chunk := await upload.read(CHUNK):
        total += len(chunk)
        if total > max_bytes:
            raise TooLarge(f"'{field}' is larger than the limit of {max_bytes} bytes")
        parts.append(chunk)
    if not total:
        raise UnsupportedImage(f"'{field}' is empty")
    return b"".join(parts)


def decode_rgb(data: bytes, field: str, max_pixels: int = 40_000_000, draft: int | None = None) -> Image.Image:
    """Encoded image bytes -> the image upright (EXIF orientation applied) as 8-bit RGB, at full resolution unless
    `draft` lets a JPEG's decoder scale it down by 2, 4 or 8 to no fewer than `draft` pixels per side."""
    try:
        img = Image.open(io.BytesIO(data), formats=DECODERS)
    except Image.DecompressionBombError as e:
        raise TooLarge(f"'{field}': {e}") from None
    except UnidentifiedImageError:
        raise UnsupportedImage(f"'{field}' is not an image this service decodes ({', '.join(DECODERS)})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise UnsupportedImage(f"'{field}' is not a readable image: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise TooLarge(f"'{field}' is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    if w < 1 or h < 1:
        raise UnsupportedImage(f"'{field}' has no pixels")
    try:
        if draft is not None:
            img.draft(None, (draft, draft))  # JPEG: let the decoder scale down by 2/4/8 while it decodes
        return load_rgb(img)
    except Image.DecompressionBombError as e:
        raise TooLarge(f"'{field}': {e}") from None
    except Exception as e:  # Pillow raises a zoo of types on malformed data; all of it is the client's file
        raise UnsupportedImage(f"'{field}' could not be decoded: {type(e).__name__}: {e}") from None


def decode(data: bytes, field: str, size: int, mode: Fit = "crop", max_pixels: int = 40_000_000) -> torch.Tensor:
    """Encoded image bytes -> (3, size, size) float tensor in [-1, 1]."""
    return to_tensor(fit(decode_rgb(data, field, max_pixels, draft=size), size, mode))


async def load_upright(upload: UploadFile, field: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """One upload -> its full-resolution upright RGB image (`decode_rgb`), decoded in a worker thread."""
    data = await read_upload(upload, field, max_bytes)
    with metrics.stage("decode"):
        return await asyncio.get_running_loop().run_in_executor(None, decode_rgb, data, field, max_pixels)


# --- uploads placed in the model's square, and edits pasted back -------------------------------------------------


@dataclass
class Placed:
    """One upload made into model input: its rows, where each sits in it (`models.framing.Placement`: the fit, or
    one alignment per chosen face) and the upright full-resolution image, both kept when the answer is at its size
    or aligned."""

    field: str
    rows: int
    placements: list[Placement]
    image: Image.Image | None = None
    faces: int = 0  # faces found in it (aligned uploads)


def choose_faces(faces: Sequence[Face], choice: str, field: str) -> list[Face]:
    """`face=` of an aligned edit: "largest" (the first, as POST /faces orders them), "all", or an index K."""
    if not faces:
        raise NoFace(f"'{field}': no face found (this model edits aligned faces; POST /faces shows what the detector "
                     "finds, and align=none edits the image as it is)")
    if choice == "largest":
        return [faces[0]]
    if choice == "all":
        return list(faces)
    k = int(choice)
    if k >= len(faces):
        raise NoFace(f"'{field}': face {k} asked for, but {len(faces)} found (indices 0-{len(faces) - 1}; POST /faces lists them)")
    return [faces[k]]


def place(data: bytes, field: str, size: int, mode: Fit, max_pixels: int, *, full: bool = False,
          align: Framing | None = None, face: str = "largest", detect: Callable[[Image.Image], list[Face]] | None = None,
          ) -> tuple[torch.Tensor, Placed]:
    """Encoded bytes -> ((k, 3, size, size) model input, Placed). Without `align`, one row fitted as `fit=` says
    (the pixels `decode` gives); with `align` (a framing with canonical eyes), one row per chosen face, aligned on
    its eyes and sampled from the full-resolution upload. `full` keeps the upright upload for an answer at its size."""
    if align is None and not full:
        x = decode(data, field, size, mode, max_pixels)
        return x[None], Placed(field, 1, [])
    img = decode_rgb(data, field, max_pixels)
    if align is None:
        return to_tensor(fit(img, size, mode))[None], Placed(field, 1, [Placement.fit(img.width, img.height, size, mode)], img)
    assert detect is not None
    found = detect(img)
    chosen = choose_faces(found, face, field)
    placements = [Placement.align(f.eyes(), img.width, img.height, size, align) for f in chosen]
    x = torch.stack([sample(img, p) for p in placements])
    return x, Placed(field, len(placements), placements, img if full else None, len(found))


async def load_placed(uploads: Sequence[tuple[str, UploadFile, str]], size: int, mode: Fit, max_bytes: int, max_pixels: int,
                      *, full: bool, align: Framing | None, detect: Callable[[Image.Image], list[Face]] | None = None,
                      ) -> tuple[torch.Tensor, list[Placed]]:
    """(field, upload, face choice) triples -> (all their rows, (N, 3, size, size), and each upload's Placed), decoded
    (and faces detected) in one worker-thread hop."""
    blobs = [(name, await read_upload(up, name, max_bytes), face) for name, up, face in uploads]

    def work() -> tuple[torch.Tensor, list[Placed]]:
        done = [place(data, name, size, mode, max_pixels, full=full, align=align, face=face, detect=detect)
                for name, data, face in blobs]
        return torch.cat([x for x, _ in done]), [p for _, p in done]

    with metrics.stage("decode"):
        return await asyncio.get_running_loop().run_in_executor(None, work)


def pasted(placed: Placed, edited: torch.Tensor, weights: torch.Tensor) -> Image.Image:
    """The upload with each row's edit ((k, 3, S, S)) pasted back where it came from, through its weights
    ((k, S, S) in [0, 1]); pixels no weight reaches are the upload's own."""
    assert placed.image is not None
    img = placed.image
    for p, e, w in zip(placed.placements, edited, weights):
        img = paste(img, e, w, p)
    return img


def encode_pasted(placed: Placed, edited: torch.Tensor, weights: torch.Tensor, fmt: str, png_level: int = 3) -> Encoded:
    """`pasted`, encoded as `encode` does (the answer at the upload's own size)."""
    return encode(pasted(placed, edited, weights), fmt, None, png_level)


def warped_mask(placed: Placed, masks: torch.Tensor) -> torch.Tensor:
    """(k, 1, S, S) masks of an upload's rows -> one (1, H, W) mask at the upload's size (their maximum; 0 where
    no row's square reaches)."""
    out = np.maximum.reduce([warp_mask(m, p) for p, m in zip(placed.placements, masks)])
    return torch.from_numpy(out)[None]


# --- answers ------------------------------------------------------------------------------------------------------


def negotiate(explicit: str | None, accept: str | None, allowed: Sequence[str], default: str = "png") -> str:
    """The answer's format: `format=` when given, else the first allowed type of the Accept header by quality."""
    if explicit:
        return explicit
    if not accept:
        return default
    ranked = []
    for i, part in enumerate(accept.split(",")):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        ranked.append((-q, i, media.lower()))
    for negq, _, media in sorted(ranked):
        if negq == 0:
            break
        if media in ("*/*", "image/*"):
            return default
        fmt = _BY_MEDIA_TYPE.get(media)
        if fmt in allowed:
            return fmt
    return default


@dataclass(frozen=True)
class Encoded:
    body: bytes
    media_type: str
    width: int
    height: int


def _resize(img: Image.Image, size: int | None) -> Image.Image:
    if size is None or img.height == size:
        return img
    return img.resize((round(img.width * size / img.height), size), Image.Resampling.LANCZOS)


def _save(img: Image.Image, fmt: str, png_level: int = 3) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG", compress_level=png_level)
    elif fmt == "jpeg":
        img.save(buf, "JPEG", quality=90)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=90)
    else:
        raise ValueError(f"unknown still format {fmt!r}")
    return buf.getvalue()


def encode(image: torch.Tensor | Image.Image, fmt: str, size: int | None = None, png_level: int = 3) -> Encoded:
    """One (3, H, W) image in [-1, 1] (or an RGB image) -> bytes; json answers carry a PNG. `size` scales the
    height (and width alike)."""
    img = _resize(image if isinstance(image, Image.Image) else to_pil(image), size)
    still = "png" if fmt == "json" else fmt
    return Encoded(_save(img, still, png_level), MEDIA_TYPES[still], img.width, img.height)


def encode_path(frames: torch.Tensor, fmt: str, size: int | None = None, png_level: int = 3, frame_ms: int = 120) -> Encoded:
    """(T, 3, S, S) frames -> a strip (png/jpeg/json: frames side by side) or an animation (gif/webp, looping)."""
    if fmt in ("gif", "webp"):
        pics = [_resize(to_pil(f), size) for f in frames]
        buf = io.BytesIO()
        kw = {"optimize": False} if fmt == "gif" else {"quality": 90, "lossless": False}
        pics[0].save(buf, fmt.upper(), save_all=True, append_images=pics[1:], duration=frame_ms, loop=0, **kw)
        return Encoded(buf.getvalue(), MEDIA_TYPES[fmt], pics[0].width, pics[0].height)
    strip = grid(frames, nrow=frames.shape[0], pad=0)
    return encode(strip, fmt, size, png_level)


def encode_mask(mask: torch.Tensor, fmt: str, size: int | None = None, png_level: int = 3) -> Encoded:
    """One (1, H, W) mask in [0, 1] -> a grayscale image (255 = attribute); json answers carry a PNG."""
    arr = np.clip(np.rint(mask.detach().float().cpu().numpy()[0] * 255), 0, 255).astype(np.uint8)  # numpy: see to_uint8
    img = _resize(Image.fromarray(arr, "L"), size)
    still = "png" if fmt == "json" else fmt
    return Encoded(_save(img, still, png_level), MEDIA_TYPES[still], img.width, img.height)


async def encode_async(fn: Callable[..., Encoded], *args: Any) -> Encoded:
    """fn(*args) (`encode`, `encode_path` or `encode_mask`) in the image threads, timed as the answer's encode."""
    with metrics.stage("encode"):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def mask_extent(mask: torch.Tensor, threshold: float, size: int | None = None) -> tuple[float, list[int] | None]:
    """(area, bbox) of a (1, S, S) mask: the fraction of pixels above `threshold`, and [x0, y0, x1, y1] (ends
    exclusive) of those pixels scaled to an answer of `size` pixels per side (None: S), or None when there are none."""
    over = mask.detach().float()[0] > threshold
    area = float(over.float().mean())
    if not over.any():
        return area, None
    s = over.shape[-1]
    scale = (size or s) / s
    ys, xs = over.any(dim=1).nonzero()[:, 0], over.any(dim=0).nonzero()[:, 0]
    box = (int(xs[0]) * scale, int(ys[0]) * scale, (int(xs[-1]) + 1) * scale, (int(ys[-1]) + 1) * scale)
    return area, [math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3])]


def as_json(enc: Encoded) -> dict[str, object]:
    return {"image": base64.b64encode(enc.body).decode("ascii"), "media_type": enc.media_type, "width": enc.width, "height": enc.height}
