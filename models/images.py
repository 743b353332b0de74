"""Conversions between Pillow images and the tensors the networks read and write.

Everything that turns pixels into model input lives here, so training data, the service's uploads and the
evaluation all normalise images the same way: decoded upright by `load_rgb`, RGB, the model's square resolution,
values in [-1, 1]. The service adds its own guards (byte and pixel caps, allowed formats) in `app/imaging.py`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

Fit = Literal["crop", "pad"]


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any Pillow mode (palette, grayscale, 16-bit, CMYK, alpha) as 8-bit RGB; alpha is composited on `background`."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of letting Pillow clip everything above 255 to white.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(((arr - lo) * scale).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def load_rgb(img: Image.Image) -> Image.Image:
    """An opened image decoded as it is meant to be seen: its first frame, turned upright by its EXIF orientation,
    as 8-bit RGB. Training files and the service's uploads both come through here, so a photo looks the same to both.

    Malformed EXIF keeps the pixels as stored rather than failing a good image. The caller opens the file (the
    service checks its caps on the header first) and closes it after using the result, which may be `img` itself.
    """
    img.load()  # decode now: a truncated file fails here; an animation stays at its first frame
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # noqa: BLE001 - malformed EXIF raises many types, and the pixels are still good
        pass
    return to_rgb(img)


def center_crop(img: Image.Image, side: int) -> Image.Image:
    """The central `side` x `side` square (the published CelebA preprocessing crops 178 px of 178x218)."""
    w, h = img.size
    side = min(side, w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


Box = tuple[int, int, int, int]  # left, top, right, bottom (right and bottom exclusive)


def fit_box(width: int, height: int, size: int, mode: Fit = "crop") -> tuple[Box, Box]:
    """Where `fit` takes an image of width x height from, and where it puts it in the `size` square: (the box of the
    image that is kept, the box of the square it is resized into). `crop` keeps the central square of the image
    and fills the square with it; `pad` keeps the whole image and letterboxes it, centred, its longer side `size`."""
    if mode == "crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return (left, top, left + side, top + side), (0, 0, size, size)
    if mode == "pad":
        if width >= height:
            w, h = size, max(1, round(height / width * size))
        else:
            w, h = max(1, round(width / height * size)), size
        x, y = round((size - w) / 2), round((size - h) / 2)
        return (0, 0, width, height), (x, y, x + w, y + h)
    raise ValueError(f"fit must be 'crop' or 'pad', not {mode!r}")


def scaled(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`img` resized to `size` (width, height). A downscale by a whole factor k in both directions is the mean of
    each k x k block (`Image.reduce`): the area average a supersampling renderer draws, at a fraction of bicubic's
    cost (docs/benchmarks.md, "What a request costs"). Any other scale is bicubic, antialiased, reducing by whole
    factors first where it shrinks three times or more."""
    if img.size == size:
        return img
    k = img.width // size[0]
    if k > 1 and img.size == (k * size[0], k * size[1]):
        return img.reduce(k)
    return img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def fit(img: Image.Image, size: int, mode: Fit = "crop", background: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Square `size` x `size` RGB: `crop` keeps the central square, `pad` letterboxes the whole image (`fit_box`)."""
    img = to_rgb(img)
    src, dst = fit_box(img.width, img.height, size, mode)
    dst_size = (dst[2] - dst[0], dst[3] - dst[1])
    if mode == "crop":
        img = img.crop(src) if src != (0, 0, img.width, img.height) else img
        return scaled(img, dst_size)
    img = scaled(img, dst_size)
    if dst_size == (size, size):
        return img
    out = Image.new("RGB", (size, size), background)
    out.paste(img, dst[:2])
    return out


# Both conversions compute in numpy: they run per image in the service's image threads, where torch's small-tensor
# ops cost several times more (each dispatch, and the intra-op thread pool shared with the model thread's).

def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> float tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(to_rgb(img), dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)
    arr /= 127.5
    arr -= 1.0
    return torch.from_numpy(arr)


def to_uint8(batch: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1], (N, 3, H, W) or (3, H, W) -> uint8 HWC on the CPU, rounded (half to even), clamped."""
    x = batch.detach().float().cpu().numpy()
    x = np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return torch.from_numpy(np.moveaxis(x, -3, -1))


def to_pil(img: torch.Tensor) -> Image.Image:
    """One float image (3, H, W) in [-1, 1] -> Pillow RGB."""
    return Image.fromarray(to_uint8(img).numpy(), "RGB")


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, fill: float = 1.0) -> torch.Tensor:
    """Tile (N, 3, H, W) images into one (3, H', W') image, `nrow` per row, `pad` pixels of `fill` between."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    out = images.new_full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), fill)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[:, y : y + h, x : x + w] = images[i]
    return out


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write (N, 3, H, W) images in [-1, 1] as one PNG grid."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(grid(images.detach().float().cpu(), nrow)).save(path)
    return path
