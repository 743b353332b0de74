"""Where a model's training images put a face, and the geometry between an upload and the model's square.

A checkpoint's card names its framing (`framing_of`):
- "synthetic": the benchmark renderer's faces (training/synthetic.py), centred in the square;
- "celeba": CelebA's aligned faces (img_align_celeba, 178x218, the eyes at fixed positions) after the published
  preprocessing, the central 178 px square resized to the model's size;
- "none": images as given (folders); nothing is known about where a face sits.

A `Placement` maps the model's square into an upload: model pixel coordinates -> upload pixel coordinates, both
continuous (pixel (i, j) covers [i, i + 1) x [j, j + 1), its centre is (i + 0.5, j + 0.5)). `fit=crop`, `fit=pad`
and an alignment on a face's eyes are each one. `sample` cuts the model's input out of the full-resolution upload
through it; `paste` brings an edit back, warped into the upload and blended over the upload's own pixels by a
weight (a mask model's mask, a plain model's face region), with every pixel the weight does not reach kept as
uploaded, bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, get_args

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import Box, Fit, fit_box, to_tensor

Framing = Literal["synthetic", "celeba", "none"]
FRAMINGS: tuple[str, ...] = get_args(Framing)

CELEBA_SIZE = (178, 218)  # img_align_celeba: width, height
CELEBA_CROP = 178  # the published preprocessing keeps the central 178 x 178 square, then resizes it
# The eyes of img_align_celeba's template (list_landmarks_align_celeba.txt), pixel indices: image-left, image-right.
CELEBA_EYES = ((69, 111), (108, 111))

MIN_WEIGHT = 1 / 255  # a smaller blending weight moves no pixel by a whole level: those pixels stay as uploaded
STRIP_PIXELS = 1 << 20  # `paste` and `warp_mask` work on strips of about this many upload pixels (bounded memory)


def framing_of(card: Mapping[str, Any]) -> Framing:
    """The card's framing; a card that names none was trained on images as given ("none")."""
    value = card.get("framing", "none")
    if value not in FRAMINGS:
        raise ValueError(f"framing must be one of {FRAMINGS}, not {value!r}")
    return value


def canonical_eyes(framing: Framing, size: int) -> np.ndarray:
    """(2, 2): the centres of the image-left and image-right eye in a `size` square of this framing's training
    images, in continuous model pixel coordinates. Only "celeba" fixes them (its faces were aligned on the eyes)."""
    if framing != "celeba":
        raise ValueError(f"framing {framing!r} has no canonical eye positions; only 'celeba' is aligned on the eyes")
    top = (CELEBA_SIZE[1] - CELEBA_CROP) // 2
    scale = size / CELEBA_CROP
    return np.array([[(x + 0.5) * scale, (y + 0.5 - top) * scale] for x, y in CELEBA_EYES])


@dataclass(frozen=True)
class Placement:
    """The model's `size` square inside a `width` x `height` upload: upload = matrix @ (x, y, 1) of a model point."""

    matrix: tuple[tuple[float, float, float], tuple[float, float, float]]
    size: int
    width: int
    height: int

    @classmethod
    def fit(cls, width: int, height: int, size: int, mode: Fit = "crop") -> "Placement":
        """What `models.images.fit` does: its kept box of the upload stretched over its box of the square."""
        src, dst = fit_box(width, height, size, mode)
        sx, sy = (src[2] - src[0]) / (dst[2] - dst[0]), (src[3] - src[1]) / (dst[3] - dst[1])
        return cls(((sx, 0.0, src[0] - dst[0] * sx), (0.0, sy, src[1] - dst[1] * sy)), size, width, height)

    @classmethod
    def align(cls, eyes: np.ndarray, width: int, height: int, size: int, framing: Framing = "celeba") -> "Placement":
        """The similarity (rotation, uniform scale, shift) that puts the framing's canonical eyes on `eyes` (the
        (2, 2) image-left and image-right eye centres found in the upload)."""
        model = canonical_eyes(framing, size)
        found = np.asarray(eyes, dtype=np.float64)
        z = complex(*(found[1] - found[0])) / complex(*(model[1] - model[0]))  # rotation and scale as one number
        if not math.isfinite(abs(z)) or abs(z) == 0:
            raise ValueError("the two eyes must be distinct points")
        rot = np.array([[z.real, -z.imag], [z.imag, z.real]])
        shift = found[0] - rot @ model[0]
        return cls(((rot[0, 0], rot[0, 1], shift[0]), (rot[1, 0], rot[1, 1], shift[1])), size, width, height)

    @property
    def _m(self) -> np.ndarray:
        return np.array(self.matrix, dtype=np.float64)

    @property
    def scale(self) -> float:
        """Upload pixels per model pixel (the geometric mean of the two axes' scales)."""
        return math.sqrt(abs(np.linalg.det(self._m[:, :2])))

    def to_upload(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) model points -> (N, 2) upload points."""
        m = self._m
        return np.asarray(points, dtype=np.float64) @ m[:, :2].T + m[:, 2]

    def to_model(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) upload points -> (N, 2) model points."""
        m = self._m
        return (np.asarray(points, dtype=np.float64) - m[:, 2]) @ np.linalg.inv(m[:, :2]).T

    def bounds(self, margin: float = 0.0) -> Box:
        """The upload's pixels (left, top, right, bottom; ends exclusive) that the square covers, `margin` upload
        pixels wider on every side, clipped to the upload; empty (right <= left) when the square lies outside it."""
        s = self.size
        corners = self.to_upload(np.array([[0, 0], [s, 0], [0, s], [s, s]], dtype=np.float64))
        lo, hi = corners.min(axis=0) - margin, corners.max(axis=0) + margin
        left, top = max(0, math.floor(lo[0])), max(0, math.floor(lo[1]))
        right, bottom = min(self.width, math.ceil(hi[0])), min(self.height, math.ceil(hi[1]))
        return left, top, max(left, right), max(top, bottom)


def sample(img: Image.Image, placement: Placement) -> torch.Tensor:
    """The model's input: (3, S, S) in [-1, 1], each model pixel sampled (bicubic) from the full-resolution upload
    where the placement puts it. Shrinking first resizes the covered region with Pillow's antialiasing filter to
    about the model's scale, so a face many times the model's size is averaged, not aliased; points beyond the
    upload's edge repeat its edge pixels."""
    k = placement.scale
    left, top, right, bottom = placement.bounds(margin=2 * k + 2)
    if right <= left or bottom <= top:
        raise ValueError("the model's square lies outside the upload")
    crop = img.crop((left, top, right, bottom))
    fx = fy = 1.0
    if k > 1:  # bring the region near the model's scale first
        new = (max(1, round(crop.width / k)), max(1, round(crop.height / k)))
        fx, fy = crop.width / new[0], crop.height / new[1]
        crop = crop.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)
    s = placement.size
    centres = np.stack(np.meshgrid(np.arange(s) + 0.5, np.arange(s) + 0.5), axis=-1).reshape(-1, 2)
    at = (placement.to_upload(centres) - (left, top)) / (fx, fy)  # in the (resized) crop's pixels
    grid = torch.from_numpy(at / (crop.width, crop.height) * 2 - 1).float().view(1, s, s, 2)
    out = F.grid_sample(to_tensor(crop)[None], grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out[0].clamp(-1, 1)


def region(framing: Framing, size: int, feather: float | None = None) -> torch.Tensor:
    """(S, S) weights in [0, 1]: where a plain model's answer replaces the upload. The face of the framing's
    training images (an ellipse around the renderer's face, beard and glasses for "synthetic"; around eyes, nose,
    mouth and chin of the aligned CelebA square for "celeba"), or the whole square for "none"; its edge falls to
    zero over `feather` model pixels (default: a 16th of the square)."""
    feather = max(1.0, size / 16 if feather is None else feather)
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # pixel centres in [0, 1]
    y, x = c[:, None], c[None, :]
    if framing == "none":
        return torch.ones(size, size)
    if framing == "synthetic":  # training/synthetic.py: face centred 0.01 below the middle; beard to 0.8 of the half-size
        (cx, cy), (rx, ry) = (0.5, 0.51), (0.34, 0.42)
    elif framing == "celeba":  # eyes at y 0.51, mouth at 0.74 of the 178 px square
        (cx, cy), (rx, ry) = (0.5, 0.58), (0.36, 0.44)
    else:
        raise ValueError(f"framing must be one of {FRAMINGS}, not {framing!r}")
    r = torch.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)  # 1 on the ellipse
    return ((1 - r) * min(rx, ry) * size / feather + 0.5).clamp(0, 1)


def border(size: int, feather: float | None = None) -> torch.Tensor:
    """(S, S) weights that rise from 0 at the square's edge to 1 at `feather` model pixels inside it (default a
    16th of the square): an edit pasted back through them leaves no seam where the square ends."""
    feather = max(1.0, size / 16 if feather is None else feather)
    c = torch.arange(size, dtype=torch.float32) + 0.5
    d = torch.minimum(c, size - c)
    ramp = (d / feather).clamp(0, 1)
    return torch.minimum(ramp[:, None], ramp[None, :])


def _strips(placement: Placement, box: Box):
    """(top, bottom, grid) per strip of the box: `grid` (1, h, w, 2) holds each upload pixel centre's place in
    the model's square, normalised for grid_sample."""
    left, top, right, bottom = box
    rows = max(1, STRIP_PIXELS // max(1, right - left))
    xs = np.arange(left, right) + 0.5
    for y0 in range(top, bottom, rows):
        y1 = min(bottom, y0 + rows)
        pts = np.stack(np.meshgrid(xs, np.arange(y0, y1) + 0.5), axis=-1).reshape(-1, 2)
        q = placement.to_model(pts) / placement.size * 2 - 1
        yield y0, y1, torch.from_numpy(q).float().view(1, y1 - y0, right - left, 2)


def warp_mask(mask: torch.Tensor, placement: Placement) -> np.ndarray:
    """A (1, S, S) or (S, S) mask in [0, 1] -> (height, width) float32 at the upload's size (bilinear; 0 outside
    the square)."""
    m = mask.detach().float().cpu().reshape(1, 1, placement.size, placement.size)
    out = np.zeros((placement.height, placement.width), np.float32)
    box = placement.bounds()
    for y0, y1, grid in _strips(placement, box):
        w = F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out[y0:y1, box[0]:box[2]] = w[0, 0].clamp(0, 1).numpy()
    return out


def paste(upload: Image.Image, edited: torch.Tensor, weight: torch.Tensor, placement: Placement) -> Image.Image:
    """The upload with the model's answer blended in: `edited` (3, S, S) in [-1, 1] warped into the upload
    (bicubic) and mixed over the upload's pixels by `weight` ((S, S) or (1, S, S) in [0, 1], bilinear, 0 outside the
    square). Where the warped weight is below MIN_WEIGHT the upload's bytes are kept exactly."""
    s = placement.size
    out = np.array(upload.convert("RGB"))
    e = edited.detach().float().cpu().reshape(1, 3, s, s)
    wt = weight.detach().float().cpu().reshape(1, 1, s, s)
    box = placement.bounds()
    left, right = box[0], box[2]
    for y0, y1, grid in _strips(placement, box):
        w = F.grid_sample(wt, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0].clamp(0, 1)
        w = torch.where(w < MIN_WEIGHT, torch.zeros_like(w), w).numpy()[..., None]
        if not w.any():
            continue
        new = F.grid_sample(e, grid, mode="bicubic", padding_mode="border", align_corners=False)[0]
        new = ((new.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
        old = out[y0:y1, left:right].astype(np.float32)
        mixed = np.clip(np.rint(old + w * (new - old)), 0, 255).astype(np.uint8)
        out[y0:y1, left:right] = np.where(w > 0, mixed, out[y0:y1, left:right])
    return Image.fromarray(out, "RGB")
