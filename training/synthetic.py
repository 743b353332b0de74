"""Procedural cartoon faces with known factors: the embedded dataset and the benchmark of the project.

Every face is a description (`Faces`): common factors (face shape and size, skin, hair, eyes, brows, nose, mouth,
background, pose jitter) and three attributes (glasses, smile, beard), each with its own style parameters and a
presence flag. All factors of image i of seed s come from a counter-based integer hash of (s, i, field), so a face
is the same whatever batch it is drawn in: its factors bit for bit on any device, its pixels bit for bit on one
device (CPU and CUDA float rounding may differ). Torch's global RNG is never touched.

`render` draws a batch of descriptions in one go, on the descriptions' device: layers of signed-distance shapes
with one-pixel linear coverage ramps (the box-filter coverage of an axis-aligned edge), composited back to front.
Each layer is computed only inside a fixed window of the image that holds it for every factor value, and no
per-image Python runs. Because the factors are known, the renderer also draws the ground truth of every edit
(`Faces.edit`: b's face with a's glasses and no smile) and the exact pixel region of each attribute
(`attribute_masks`): an edit changes pixels only where the masks of the edited attributes, before or after, are
non-zero.

Coordinates: the image spans [-1, 1] on both axes (x right, y down), so a face looks the same at 64 and 256 px.
Shapes are placed in the face's local frame (origin at the centre of the face ellipse, unit = half the image),
which is shifted, scaled and rotated a little per face.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Sequence

import torch

ATTRIBUTES: tuple[str, ...] = ("glasses", "smile", "beard")
PAIRS: dict[str, tuple[str, str]] = {
    "smile_glasses": ("smile", "glasses"),
    "beard_smile": ("beard", "smile"),
    "beard_glasses": ("beard", "glasses"),
}
TRAIN_SEED = 0  # training images come from this seed
TEST_SEED = 7919  # evaluation images; never used in training
VALIDATION_SEED = 5003  # for choosing among checkpoints, so the reported test numbers are not chosen on test faces
SIZES = (64, 128, 256)

# ---------------------------------------------------------------------------------------------------------------
# Counter-based hash: splitmix64 on int64 tensors (multiplication wraps; right shifts are made logical by masking)

_U64 = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _U64
    return x - (1 << 64) if x >> 63 else x


_GOLDEN, _M1, _M2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _mix_int(x: int) -> int:
    """splitmix64 on a Python int (as an unsigned 64-bit value), returned as a signed int64."""
    z = (x + 0x9E3779B97F4A7C15) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return _signed(z ^ (z >> 31))


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 on an int64 tensor; bit-identical to `_mix_int` and on every device."""
    z = z + _GOLDEN
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _M1
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _M2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def _key(name: str) -> int:
    """A stable 64-bit key per name (Python's hash() is salted per process)."""
    return _signed(int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little"))


# Uniform draws per face: field name -> how many. Each column has a key of its own name, so adding a field
# changes no other factor.
_FIELDS: dict[str, int] = {
    "pose": 4, "face": 3, "skin": 2, "hair": 4, "eyes": 6, "brows": 4, "nose": 3, "mouth": 4, "background": 7,
    "shirt": 3, "glasses": 8, "smile": 4, "beard": 4, "present": 3,
}
_COLUMNS = {}
_n = 0
for _name, _count in _FIELDS.items():
    _COLUMNS[_name] = slice(_n, _n + _count)
    _n += _count
_FIELD_KEYS = [_key(f"{name}/{j}") for name, count in _FIELDS.items() for j in range(count)]
del _n, _name, _count


@lru_cache(maxsize=16)
def _field_keys(device: torch.device) -> torch.Tensor:
    return torch.tensor(_FIELD_KEYS, dtype=torch.int64, device=device)


def _uniforms(indices: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Field name -> (N, count) float32 in [0, 1): the factors' randomness, a pure function of (seed, index)."""
    h = _mix(indices ^ _mix_int(_key("seed") ^ seed))
    z = _mix(h[:, None] ^ _field_keys(indices.device))
    u = ((z >> 40) & 0xFFFFFF).to(torch.float32) * (1.0 / (1 << 24))  # top 24 bits: exact in float32
    return {name: u[:, cols] for name, cols in _COLUMNS.items()}


# ---------------------------------------------------------------------------------------------------------------
# Factors

# Palettes, RGB in [0, 1].
_SKIN = ((1.00, 0.87, 0.77), (0.98, 0.79, 0.66), (0.91, 0.70, 0.55), (0.78, 0.56, 0.40), (0.62, 0.42, 0.28),
         (0.45, 0.30, 0.20), (0.33, 0.22, 0.15))
_HAIR = ((0.07, 0.06, 0.06), (0.22, 0.13, 0.07), (0.40, 0.24, 0.12), (0.62, 0.42, 0.22), (0.90, 0.76, 0.45),
         (0.68, 0.27, 0.10), (0.58, 0.58, 0.60), (0.86, 0.86, 0.88))
_EYES = ((0.38, 0.22, 0.10), (0.16, 0.10, 0.06), (0.22, 0.45, 0.78), (0.25, 0.55, 0.32), (0.50, 0.42, 0.20),
         (0.45, 0.52, 0.60))
_BEARD = ((0.07, 0.06, 0.06), (0.20, 0.12, 0.06), (0.36, 0.21, 0.10), (0.60, 0.25, 0.08), (0.48, 0.48, 0.50),
          (0.80, 0.66, 0.38))
_FRAME = ((0.05, 0.05, 0.06), (0.28, 0.15, 0.07), (0.75, 0.10, 0.12), (0.10, 0.22, 0.62), (0.85, 0.66, 0.15),
          (0.50, 0.28, 0.55))
_LIPS = (0.62, 0.22, 0.24)
_MOUTH_INSIDE = (0.30, 0.04, 0.07)
_TEETH = (0.97, 0.96, 0.92)
_GREY = {v: (v, v, v) for v in (0.04, 0.12, 0.97, 1.0)}
_TINT = ((0.15, 0.15, 0.17), (0.38, 0.22, 0.08), (0.15, 0.32, 0.65), (0.12, 0.45, 0.25), (0.80, 0.30, 0.48))

# Hair styles: 0 short cap, 1 long, 2 bob with bangs, 3 big curly volume. Per style, in units of the face:
# back ellipse (centre y, extra x radius, extra y radius, bottom cut), front volume (centre y, extra x, extra y),
# hairline y = h0 + h2 * x^2, side locks (from |x| > lock_x * face_w, down to lock_y).
HAIR_STYLES = ("short", "long", "bangs", "curly")
_HAIR_TABLE = (
    # back_cy back_dx back_dy back_bottom front_cy front_dx front_dy h0 h2 lock_x lock_y
    (-0.04, 0.035, 0.055, -0.06, -0.02, 0.030, 0.040, -0.34, 1.05, 9.0, 0.0),
    (0.12, 0.110, 0.270, 0.95, -0.02, 0.050, 0.050, -0.37, 1.30, 0.80, 0.50),
    (0.00, 0.080, 0.090, 0.28, -0.02, 0.050, 0.050, -0.21, 0.35, 0.88, 0.22),
    (-0.10, 0.200, 0.160, 0.22, -0.06, 0.070, 0.070, -0.31, 0.85, 9.0, 0.0),
)

# Parameter ranges (local units, i.e. half the image at scale 1).
POSE_SHIFT = (0.06, 0.05)  # max |x|, |y| shift of the face centre
POSE_ANGLE = 0.14  # max in-plane rotation, radians (8 degrees)
POSE_SCALE = (1.0, 1.14)
FACE_Y = 0.02  # face centre below the image centre
FACE_W, FACE_H, JAW = (0.38, 0.46), (0.50, 0.58), (0.0, 0.55)


def _lerp(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * u


@lru_cache(maxsize=None)
def _const(values: tuple, device: torch.device) -> torch.Tensor:
    """A constant table on a device, made once: a fresh host-to-device copy per call would sync CUDA."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def _pick(u: torch.Tensor, palette: tuple) -> torch.Tensor:
    """One palette colour per face, (N, 3); u in [0, 1) picks the entry."""
    pal = _const(palette, u.device)
    return pal[(u * len(pal)).long().clamp_(0, len(pal) - 1)]


def _ramp(u: torch.Tensor, palette: tuple) -> torch.Tensor:
    """A colour on the piecewise-linear path through the palette, (N, 3)."""
    pal = _const(palette, u.device)
    t = u * (len(pal) - 1)
    lo = t.long().clamp_(0, len(pal) - 2)
    f = (t - lo)[:, None]
    return pal[lo] * (1 - f) + pal[lo + 1] * f


def _shade(color: torch.Tensor, u: torch.Tensor, amount: float) -> torch.Tensor:
    """Brightness jitter of +-amount."""
    return (color * (1 + amount * (2 * u[:, None] - 1))).clamp_(0, 1)


def _common(u: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    pose, face, skin, hair, eyes = u["pose"], u["face"], u["skin"], u["hair"], u["eyes"]
    brows, nose, mouth, bg, shirt = u["brows"], u["nose"], u["mouth"], u["background"], u["shirt"]
    bg_top = 0.45 + 0.5 * bg[:, 0:3]
    return {
        "pos_x": _lerp(pose[:, 0], -POSE_SHIFT[0], POSE_SHIFT[0]),
        "pos_y": _lerp(pose[:, 1], -POSE_SHIFT[1], POSE_SHIFT[1]),
        "angle": _lerp(pose[:, 2], -POSE_ANGLE, POSE_ANGLE),
        "size": _lerp(pose[:, 3], *POSE_SCALE),
        "face_w": _lerp(face[:, 0], *FACE_W),
        "face_h": _lerp(face[:, 1], *FACE_H),
        "jaw": _lerp(face[:, 2], *JAW),
        "skin": _shade(_ramp(skin[:, 0], _SKIN), skin[:, 1], 0.04),
        "hair_color": _shade(_pick(hair[:, 0], _HAIR), hair[:, 1], 0.10),
        "hair_style": (hair[:, 2] * len(HAIR_STYLES)).long().clamp_(0, len(HAIR_STYLES) - 1),
        "hair_volume": _lerp(hair[:, 3], 0.0, 0.03),
        "eye_color": _shade(_pick(eyes[:, 0], _EYES), eyes[:, 1], 0.15),
        "eye_spacing": _lerp(eyes[:, 2], 0.15, 0.20),
        "eye_size": _lerp(eyes[:, 3], 0.058, 0.078),
        "eye_height": _lerp(eyes[:, 4], -0.05, 0.0),
        "gaze": _lerp(eyes[:, 5], -1.0, 1.0),
        "brow_height": _lerp(brows[:, 0], 0.11, 0.145),
        "brow_arch": _lerp(brows[:, 1], 0.005, 0.04),
        "brow_tilt": _lerp(brows[:, 2], -0.03, 0.03),
        "brow_thickness": _lerp(brows[:, 3], 0.024, 0.036),
        "nose_y": _lerp(nose[:, 0], 0.12, 0.16),
        "nose_width": _lerp(nose[:, 1], 0.032, 0.05),
        "nose_length": _lerp(nose[:, 2], 0.022, 0.036),
        "mouth_y": _lerp(mouth[:, 0], 0.29, 0.33),
        "mouth_width": _lerp(mouth[:, 1], 0.08, 0.115),
        "mouth_curve": _lerp(mouth[:, 2], -0.012, 0.010),
        "lip_color": _shade(_const(_LIPS, mouth.device).expand(len(mouth), 3), mouth[:, 3], 0.2),
        "bg_top": bg_top,
        "bg_bottom": bg_top * _lerp(bg[:, 3:4], 0.65, 1.0) + 0.1 * (bg[:, 4:7] - 0.5),
        "shirt": 0.12 + 0.75 * shirt,
    }


def _styles(u: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g, s, b = u["glasses"], u["smile"], u["beard"]
    return {
        "glasses_round": (g[:, 0] < 0.5).float(),  # 1: round lenses, 0: rectangular
        "glasses_size": _lerp(g[:, 1], 1.0, 1.2),
        "glasses_thickness": _lerp(g[:, 2], 0.042, 0.06),
        "glasses_frame_color": _shade(_pick(g[:, 3], _FRAME), g[:, 4], 0.15),
        "glasses_tint": _pick(g[:, 5], _TINT),
        "glasses_opacity": _lerp(g[:, 6], 0.25, 0.8),
        "smile_width": _lerp(s[:, 0], 0.14, 0.19),
        "smile_curve": _lerp(s[:, 1], 0.075, 0.11),
        "smile_teeth": (s[:, 2] < 0.5).float(),  # 1: open smile showing teeth, 0: closed smile
        "smile_open": _lerp(s[:, 3], 0.04, 0.07),
        "beard_color": _shade(_pick(b[:, 0], _BEARD), b[:, 1], 0.12),
        "beard_coverage": b[:, 2].contiguous(),  # 0: chin only ... 1: full lower face with moustache and sideburns
        "beard_volume": _lerp(b[:, 3], 0.015, 0.04),
    }


# The style parameters of each attribute: what `Faces.edit(name=other)` copies.
STYLE_KEYS: dict[str, tuple[str, ...]] = {
    "glasses": ("glasses_round", "glasses_size", "glasses_thickness", "glasses_frame_color", "glasses_tint",
                "glasses_opacity"),
    "smile": ("smile_width", "smile_curve", "smile_teeth", "smile_open"),
    "beard": ("beard_color", "beard_coverage", "beard_volume"),
}


@dataclass
class Faces:
    """A batch of face descriptions (all tensors share the batch dim N and one device)."""

    common: dict[str, torch.Tensor]
    style: dict[str, torch.Tensor]  # style params of all three attributes, always sampled
    present: dict[str, torch.Tensor]  # bool (N,) per attribute

    def __len__(self) -> int:
        return len(self.present[ATTRIBUTES[0]])

    @property
    def device(self) -> torch.device:
        return self.present[ATTRIBUTES[0]].device

    def to(self, device) -> Faces:
        return Faces(*({k: v.to(device) for k, v in d.items()} for d in (self.common, self.style, self.present)))

    def index(self, idx) -> Faces:
        """A sub-batch: idx is an int, a slice, a sequence of ints, or an index/bool tensor."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        elif not isinstance(idx, slice):
            idx = torch.as_tensor(idx, device=self.device)
        return Faces(*({k: v[idx] for k, v in d.items()} for d in (self.common, self.style, self.present)))

    def edit(self, **attrs: Faces | bool | torch.Tensor) -> Faces:
        """A copy with some attributes changed: name=False removes it, True forces it on with this face's own style,
        a bool (N,) tensor sets presence per face, and another Faces of the same length copies that batch's style
        AND presence for the attribute. `faces_b.edit(glasses=faces_a, smile=False)` is the ground truth of
        "b's face with a's glasses and no smile"."""
        style, present = dict(self.style), dict(self.present)
        n = len(self)
        for name, value in attrs.items():
            if name not in ATTRIBUTES:
                raise ValueError(f"unknown attribute {name!r}; expected one of {ATTRIBUTES}")
            if isinstance(value, Faces):
                if len(value) != n:
                    raise ValueError(f"edit {name}=: the other batch has {len(value)} faces, this one {n}")
                for k in STYLE_KEYS[name]:
                    style[k] = value.style[k].to(self.device)
                present[name] = value.present[name].to(self.device)
            elif isinstance(value, bool):
                present[name] = torch.full((n,), value, dtype=torch.bool, device=self.device)
            elif isinstance(value, torch.Tensor) and value.shape == (n,):
                present[name] = value.to(self.device, torch.bool)
            else:
                raise TypeError(f"edit {name}=: expected a bool, a bool tensor of shape ({n},) or a Faces")
        return Faces(dict(self.common), style, present)


def _as_indices(indices: torch.Tensor | Sequence[int], device) -> torch.Tensor:
    if isinstance(indices, torch.Tensor):
        device = indices.device if device is None else device
        return indices.to(device=device, dtype=torch.int64).reshape(-1)
    return torch.as_tensor(list(indices), dtype=torch.int64, device=device).reshape(-1)


def sample_faces(indices: torch.Tensor | Sequence[int], seed: int = TRAIN_SEED,
                 present: dict[str, bool | torch.Tensor] | None = None, device=None) -> Faces:
    """Faces `indices` of `seed`. Each attribute is present with probability 0.5 (from the hash) unless `present`
    sets it (a bool for all faces, or a bool (N,) tensor). On `device`, else the indices' device, else the CPU."""
    idx = _as_indices(indices, device)
    u = _uniforms(idx, seed)
    pres = {name: u["present"][:, i] < 0.5 for i, name in enumerate(ATTRIBUTES)}
    faces = Faces(_common(u), _styles(u), pres)
    return faces.edit(**present) if present else faces


def pair_domain(pair: str, domain: str) -> dict[str, bool]:
    """Presence rule of a domain: for pair (x, y), domain "a" has x and not y, "b" has y and not x; the third
    attribute is absent in both."""
    if pair not in PAIRS:
        raise ValueError(f"unknown pair {pair!r}; expected one of {tuple(PAIRS)}")
    if domain not in ("a", "b"):
        raise ValueError(f"domain must be 'a' or 'b', not {domain!r}")
    x, y = PAIRS[pair]
    on = x if domain == "a" else y
    return {name: name == on for name in ATTRIBUTES}


def sample_domain(pair: str, domain: str, indices, seed: int = TRAIN_SEED, device=None) -> Faces:
    """Faces of one domain of a pair. The same index in domain a and b is the same person (same common factors
    and styles), differing only in presence; draw the two domains from disjoint indices for unpaired data."""
    return sample_faces(indices, seed, pair_domain(pair, domain), device)


# ---------------------------------------------------------------------------------------------------------------
# Rendering

# Windows: for each layer, a box of the face's local frame that holds the layer for every factor value
# (x0, x1, y0, y1); `_window` turns it into the image rows/columns that hold it for every pose.
_BOXES = {
    "hair_back": (-0.71, 0.71, -0.89, 0.97),
    "body": (-1.45, 1.45, 0.28, 2.1),
    "ears": (-0.52, 0.52, -0.11, 0.10),
    "face": (-0.50, 0.50, -0.60, 0.60),
    "eyes": (-0.31, 0.31, -0.27, 0.09),
    "nose": (-0.07, 0.07, 0.07, 0.21),
    "beard": (-0.54, 0.54, -0.25, 0.64),
    "mouth": (-0.21, 0.21, 0.19, 0.49),
    "hair_front": (-0.58, 0.58, -0.76, 0.50),
    "glasses": (-0.49, 0.49, -0.22, 0.18),
}


def _inside(inner: str, outer: str) -> bool:
    return all(_BOXES[outer][i] <= _BOXES[inner][i] for i in (0, 2)) and all(
        _BOXES[inner][i] <= _BOXES[outer][i] for i in (1, 3))


assert _inside("mouth", "beard")  # the beard's mouth hole is cut in the mouth window


@lru_cache(maxsize=None)
def _window(layer: str, size: int) -> tuple[int, int, int, int]:
    """Rows r0:r1 and columns c0:c1 of a `size` image that hold the layer's box for every pose, with a margin."""
    x0, x1, y0, y1 = _BOXES[layer]
    us, vs = [], []
    for t in range(-8, 9):
        a = POSE_ANGLE * t / 8
        c, s = math.cos(a), math.sin(a)
        for sc in POSE_SCALE:
            for x in (x0, x1):
                for y in (y0, y1):
                    us.append(sc * (c * x - s * y))
                    vs.append(sc * (s * x + c * y))
    margin = 0.01 + 3.0 / size  # sampled angles, plus the pixel ramps
    u0, u1 = min(us) - POSE_SHIFT[0] - margin, max(us) + POSE_SHIFT[0] + margin
    v0, v1 = min(vs) + FACE_Y - POSE_SHIFT[1] - margin, max(vs) + FACE_Y + POSE_SHIFT[1] + margin

    def px(t: float) -> int:
        return min(size, max(0, int(math.floor((t + 1) * size / 2))))

    return px(v0), min(size, px(v1) + 1), px(u0), min(size, px(u1) + 1)


_FULL_WINDOWS = False  # tests switch this on to check that no window clips a shape
_SCRATCH = 5  # scratch buffers a layer may use at once
_pools = threading.local()


def _pool(device: torch.device, numel: int) -> list[torch.Tensor]:
    """Scratch buffers for the shapes. Fresh multi-MB CPU allocations cost about as much as the arithmetic done in
    them, so on the CPU the last pool is kept per thread and reused while it is big enough."""
    if device.type != "cpu":
        return [torch.empty(numel, device=device) for _ in range(_SCRATCH)]
    pool = getattr(_pools, "buffers", None)
    if pool is None or pool[0].numel() < numel:
        pool = _pools.buffers = [torch.empty(numel) for _ in range(_SCRATCH)]
    return pool


class _Canvas:
    """The image being drawn and the face frames of a batch.

    Shapes are evaluated per layer window as *ramps*: the signed distance to the shape's edge in pixels (positive
    inside) plus 0.5. Clamped to [0, 1] a ramp is the coverage of a one-pixel linear edge (the box-filter coverage
    of an axis-aligned edge; cheaper than a smoothstep and as smooth to the eye), and min / max of ramps are
    intersection / union. Per-face parameters are (N, 1, 1) tensors, so they broadcast over (N, h, w) windows."""

    def __init__(self, faces: Faces, size: int):
        c = faces.common
        n, dev = len(faces), faces.device
        self.n, self.size, self.device = n, size, dev
        self.grid = (torch.arange(size, device=dev, dtype=torch.float32) + 0.5) * (2.0 / size) - 1.0
        angle, scale = c["angle"].view(n, 1, 1), c["size"].view(n, 1, 1)
        self.cx, self.cy = c["pos_x"].view(n, 1, 1), c["pos_y"].view(n, 1, 1) + FACE_Y
        # Local X = (cos du + sin dv) / scale, Y = (-sin du + cos dv) / scale, with du = u - cx, dv = v - cy.
        self.cos, self.sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        self.k = scale * (size / 2.0)  # pixels per local unit
        self._offsets: dict[tuple[int, int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        wins = [(0, size, 0, size)] if _FULL_WINDOWS else [_window(layer, size) for layer in _BOXES]
        self._pool = _pool(dev, n * max((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in wins))
        # Background: a vertical gradient, (N, 3, S, S). Colours are drawn in [-1, 1] directly.
        top, bottom = c["bg_top"][:, :, None] * 2 - 1, c["bg_bottom"][:, :, None] * 2 - 1
        col = torch.lerp(top, bottom, (self.grid + 1) * 0.5)  # (N, 3, S)
        self.img = col[:, :, :, None].expand(-1, -1, -1, size).contiguous()

    def window(self, layer: str) -> tuple[int, int, int, int]:
        """Rows r0:r1 and columns c0:c1 of the layer."""
        return (0, self.size, 0, self.size) if _FULL_WINDOWS else _window(layer, self.size)

    def scratch(self, win, count: int) -> list[torch.Tensor]:
        """`count` scratch tensors (N, h, w) over the window; their content is garbage, each layer starts afresh."""
        r0, r1, c0, c1 = win
        shape = (self.n, r1 - r0, c1 - c0)
        numel = shape[0] * shape[1] * shape[2]
        return [buf[:numel].view(shape) for buf in self._pool[:count]]

    def lin(self, win, fx, fy, f0, out: torch.Tensor) -> torch.Tensor:
        """out = fx * X + fy * Y + f0 over the window, X and Y the local coordinates of the pixel centres;
        fx, fy, f0 are floats or (N, 1, 1) tensors."""
        if win not in self._offsets:
            r0, r1, c0, c1 = win
            self._offsets[win] = (self.grid[c0:c1].view(1, 1, -1) - self.cx, self.grid[r0:r1].view(1, -1, 1) - self.cy)
        du, dv = self._offsets[win]  # (N, 1, w), (N, h, 1)
        if isinstance(fy, float) and fy == 0.0:
            cu, cv = fx * self.cos, fx * self.sin
        elif isinstance(fx, float) and fx == 0.0:
            cu, cv = -fy * self.sin, fy * self.cos
        else:
            cu, cv = fx * self.cos - fy * self.sin, fx * self.sin + fy * self.cos
        col = torch.addcmul(f0, du, cu) if isinstance(f0, torch.Tensor) else du * cu + f0
        return torch.add(col, dv * cv, out=out)

    def ellipse(self, win, x0, y0, rx, ry, out, tmp, axis=None) -> torch.Tensor:
        """Ramp of the ellipse with centre (x0, y0) and radii (rx, ry), local units. From q = x^2 + y^2 in units of
        the radii, distance ~ (1 - q) r / 2 with r the geometric mean radius: exact at the edge up to the aspect
        ratio, and only the edge matters. With `axis`, two ellipses mirrored about x = axis, at axis +- x0."""
        r = (rx * ry) ** 0.5 * self.k * 0.5
        sx, sy = r.sqrt() / rx, r.sqrt() / ry  # coordinates scaled by sqrt(r): ramp = r + 0.5 - (x^2 + y^2)
        if axis is None:
            self.lin(win, sx, 0.0, -x0 * sx, out)
        else:
            self.lin(win, sx, 0.0, -axis * sx, out).abs_().sub_(x0 * sx)
        self.lin(win, 0.0, sy, -y0 * sy, tmp)
        return torch.sub(r + 0.5, out.mul_(out).addcmul_(tmp, tmp), out=out)

    def paint(self, win, cover: torch.Tensor, color: torch.Tensor) -> None:
        """Composite `color` (N, 3) in [0, 1] with coverage (N, h, w) over the window."""
        r0, r1, c0, c1 = win
        self.img[:, :, r0:r1, c0:c1].lerp_((color * 2 - 1)[:, :, None, None], cover[:, None])


def _face_shape(cv: _Canvas, win, a, b, jaw, out, tmp) -> torch.Tensor:
    """Ramp of the egg-shaped face outline with radii (a, b): x^2 (1 + jaw y) + y^2 = 1 in units of the radii;
    jaw > 0 narrows the chin and widens the temples."""
    cv.lin(win, 1 / a, 0.0, 0.0, out)
    out.mul_(out).mul_(cv.lin(win, 0.0, jaw / b, 1.0, tmp))
    y = cv.lin(win, 0.0, 1 / b, 0.0, tmp)
    r = (a * b) ** 0.5 * cv.k * 0.5
    return out.addcmul_(y, y).mul_(-r).add_(r + 0.5)


def _mouth(cv: _Canvas, win, params, bufs) -> tuple[torch.Tensor, torch.Tensor]:
    """Coverage of a mouth between two parabolas through its corners, and of the teeth at its top. With
    x = X / x_half in [-1, 1]: upper edge y = y0 + cu (1 - x^2) - t/2, lower edge y = y0 + cl (1 - x^2) + t/2."""
    x_half, y0, cu, cl, t, teeth = params
    b0, b1, b2, b3 = bufs
    k = cv.k
    xs = cv.lin(win, 1 / x_half, 0.0, 0.0, b0)
    x2 = torch.mul(xs, xs, out=b1)
    upper = cv.lin(win, 0.0, k, 0.5 - (y0 + cu - t / 2) * k, b2).addcmul_(x2, cu * k)  # below the upper edge
    lower = cv.lin(win, 0.0, -k, 0.5 + (y0 + cl + t / 2) * k, b3).addcmul_(x2, -cl * k)  # above the lower edge
    side = xs.abs_().mul_(-x_half * k).add_(x_half * k + 0.5)  # |X| < x_half
    cover = torch.minimum(torch.minimum(upper, lower, out=b1), side, out=b1).clamp_(0.0, 1.0)
    # Teeth: the top 45% (at the centre) of an open mouth: ramp 0.45 h - (Y - upper) + 0.5 = 0.45 h + 1 - upper.
    tooth = upper.neg_().add_((cl - cu + t) * k * 0.45 + 1.0).clamp_(0.0, 1.0)
    return cover, torch.minimum(tooth, cover, out=b2).mul_(teeth)


def _smile_params(c: dict, s: dict, smiling: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mouth parameters (x_half, y0, cu, cl, t, teeth): the style's smile where `smiling`, else the neutral mouth.
    Closed smile: a thick curve, corners up. Open smile: flat top, deep bottom, teeth."""
    open_, curve = s["smile_teeth"], s["smile_curve"]
    smile = (s["smile_width"], c["mouth_y"] - curve / 2 + 0.012 * open_, curve * (1 - 0.75 * open_),
             curve + open_ * s["smile_open"], 0.045 - 0.02 * open_, open_)
    neutral = (c["mouth_width"], c["mouth_y"], c["mouth_curve"], c["mouth_curve"], torch.full_like(curve, 0.032),
               torch.zeros_like(open_))
    return tuple(torch.where(smiling, a, b) for a, b in zip(smile, neutral))


def _draw(faces: Faces, size: int, want_masks: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    if size not in SIZES:
        raise ValueError(f"image size must be one of {SIZES} (a power of two from 64 to 256), not {size}")
    n = len(faces)
    # Scalar factors as (N, 1, 1), colours stay (N, 3).
    c = {name: v.view(n, 1, 1) if v.dim() == 1 and v.is_floating_point() else v for name, v in faces.common.items()}
    s = {name: v.view(n, 1, 1) if v.dim() == 1 else v for name, v in faces.style.items()}
    on = {name: faces.present[name].to(torch.float32).view(n, 1, 1) for name in ATTRIBUTES}
    cv = _Canvas(faces, size)
    k = cv.k
    a, b, jaw = c["face_w"], c["face_h"], c["jaw"]
    skin, hair, vol = c["skin"], c["hair_color"], c["hair_volume"]
    hs = _const(_HAIR_TABLE, cv.device)[c["hair_style"]].view(n, len(_HAIR_TABLE[0]), 1, 1).unbind(1)
    masks: dict[str, tuple[tuple[int, int, int, int], torch.Tensor]] = {}

    # Hair behind the head: an ellipse cut straight at the bottom.
    w = cv.window("hair_back")
    b0, b1 = cv.scratch(w, 2)
    cv.ellipse(w, 0.0, hs[0], a + hs[1] + vol, b + hs[2] + vol, b0, b1)
    torch.minimum(b0, cv.lin(w, 0.0, -k, hs[3] * k + 0.5, b1), out=b0)
    cv.paint(w, b0.clamp_(0.0, 1.0), hair * 0.8)

    # Neck and shoulders.
    w = cv.window("body")
    b0, b1 = cv.scratch(w, 2)
    cv.lin(w, k, 0.0, 0.0, b0).abs_().mul_(-1.0).add_(0.37 * a * k + 0.5)
    torch.minimum(b0, cv.lin(w, 0.0, k, 0.5 - 0.3 * k, b1), out=b0)
    cv.paint(w, b0.clamp_(0.0, 1.0), skin * 0.82)
    cv.paint(w, cv.ellipse(w, 0.0, 1.42, 0.95, 0.56, b0, b1).clamp_(0.0, 1.0), c["shirt"])

    # Ears, then the face.
    w = cv.window("ears")
    b0, b1 = cv.scratch(w, 2)
    cv.paint(w, cv.ellipse(w, a - 0.01, -0.005, 0.055, 0.09, b0, b1, axis=0.0).clamp_(0.0, 1.0), skin * 0.92)
    w = cv.window("face")
    b0, b1 = cv.scratch(w, 2)
    cv.paint(w, _face_shape(cv, w, a, b, jaw, b0, b1).clamp_(0.0, 1.0), skin)

    # Nose: a shaded tip.
    w = cv.window("nose")
    b0, b1 = cv.scratch(w, 2)
    nose = cv.ellipse(w, 0.0, c["nose_y"], c["nose_width"], c["nose_length"], b0, b1)
    cv.paint(w, nose.clamp_(0.0, 1.0), skin * 0.84)

    # Eyes: dark rim, white, iris, pupil, highlight; then the brows.
    w = cv.window("eyes")
    b0, b1, b2 = cv.scratch(w, 3)
    ex, ey, er = c["eye_spacing"], c["eye_height"], c["eye_size"]
    ery = er * 0.78
    cv.ellipse(w, ex, ey, er, ery, b0, b1, axis=0.0)
    white = torch.clamp(b0, 0.0, 1.0, out=b2)
    cv.paint(w, b0.add_(0.018 * k).clamp_(0.0, 1.0), _const(_GREY[0.12], cv.device).expand(n, 3))
    cv.paint(w, white, _const(_GREY[0.97], cv.device).expand(n, 3))
    ri = ery * 0.82
    gaze = c["gaze"] * (er - ri) * 0.6  # both irises look the same way: mirror them about x = gaze
    cv.ellipse(w, ex, ey, ri, ri, b0, b1, axis=gaze)
    cv.paint(w, torch.minimum(torch.clamp(b0, 0.0, 1.0, out=b1), white, out=b1), c["eye_color"])
    cv.paint(w, b0.sub_(ri * 0.5 * k).clamp_(0.0, 1.0), _const(_GREY[0.04], cv.device).expand(n, 3))
    cv.ellipse(w, ex, ey - ri * 0.35, ri * 0.3, ri * 0.3, b0, b1, axis=gaze + ri * 0.35)
    cv.paint(w, b0.clamp_(0.0, 1.0), _const(_GREY[1.0], cv.device).expand(n, 3))
    # Brows: arcs y = yb - arch (1 - xb^2) + tilt xb over |xb| < 1, xb = (|X| - ex) / half length.
    bl = er * 1.25
    xb = cv.lin(w, 1 / bl, 0.0, 0.0, b0).abs_().sub_(ex / bl)
    xb2 = torch.mul(xb, xb, out=b1)
    yb, arch, tilt, bt = ey - c["brow_height"], c["brow_arch"], c["brow_tilt"], c["brow_thickness"]
    dy = cv.lin(w, 0.0, k, -(yb - arch) * k, b2).addcmul_(xb2, -arch * k).addcmul_(xb, -tilt * k)
    dy.abs_().mul_(-1.0).add_(bt * 0.5 * k + 0.5)
    torch.minimum(dy, xb.abs_().mul_(-bl * k).add_(bl * k + 0.5), out=dy)
    cv.paint(w, dy.clamp_(0.0, 1.0), hair * 0.7)

    # Beard: the lower face (grown a little) below a line that rises towards the sideburns, as wide as the
    # coverage says, with a hole for the mouth. Drawn under the mouth so the lips stay visible.
    w = cv.window("beard")
    b0, b1, b2, b3 = cv.scratch(w, 4)
    cov, grow = s["beard_coverage"], s["beard_volume"]
    top, rise, half = 0.42 - 0.27 * cov, 0.6 + 0.8 * cov, 0.13 + 0.55 * cov
    region = _face_shape(cv, w, a + grow, b + grow, jaw, b0, b1)
    ax = cv.lin(w, 1.0, 0.0, 0.0, b1).abs_()
    off = (on["beard"] - 1.0) * 1e4  # ramp pushed far below 0 where there is no beard
    below = cv.lin(w, 0.0, k, 0.5 - top * k + off, b2).addcmul_(torch.mul(ax, ax, out=b3), rise * k)
    torch.minimum(region, below, out=region)
    torch.minimum(region, ax.mul_(-k).add_(half * k + 0.5), out=region)
    # The hole fits the mouth window, which lies inside the beard window: cut it there only.
    wm = cv.window("mouth")
    h0, h1 = cv.scratch(wm, 5)[3:]
    around_mouth = region[:, wm[0] - w[0]:wm[1] - w[0], wm[2] - w[2]:wm[3] - w[2]]
    hole = cv.ellipse(wm, 0.0, c["mouth_y"] + 0.005, c["mouth_width"] + 0.035, 0.05, h0, h1)
    torch.minimum(around_mouth, hole.mul_(-1.0).add_(1.0), out=around_mouth)
    beard = region.clamp_(0.0, 1.0)
    cv.paint(w, beard, faces.style["beard_color"])
    if want_masks:
        masks["beard"] = (w, beard.clone())

    # Mouth: the smile where present, else the neutral mouth; the smile's mask covers both.
    w = cv.window("mouth")
    b0, b1, b2, b3, b4 = cv.scratch(w, 5)
    smiling = faces.present["smile"]
    cover, tooth = _mouth(cv, w, _smile_params(c, s, smiling.view(n, 1, 1)), (b0, b1, b2, b3))
    cv.paint(w, cover, torch.where(smiling[:, None], _const(_MOUTH_INSIDE, cv.device), c["lip_color"]))
    cv.paint(w, tooth, _const(_TEETH, cv.device).expand(n, 3))
    if want_masks:
        other, _ = _mouth(cv, w, _smile_params(c, s, ~smiling.view(n, 1, 1)), (b0, b4, b2, b3))
        masks["smile"] = (w, torch.maximum(cover, other).mul_(on["smile"]))

    # Hair in front: the hair volume above the hairline y = h0 + h2 X^2, plus side locks |X| > lock_x a.
    w = cv.window("hair_front")
    b0, b1, b2, b3 = cv.scratch(w, 4)
    region = cv.ellipse(w, 0.0, hs[4], a + hs[5] + vol, b + hs[6] + vol, b0, b1)
    ax = cv.lin(w, 1.0, 0.0, 0.0, b1).abs_()
    hairline = cv.lin(w, 0.0, -k, hs[7] * k + 0.5, b2).addcmul_(torch.mul(ax, ax, out=b3), hs[8] * k)
    locks = ax.mul_(k).sub_(hs[9] * a * k - 0.5)
    torch.minimum(locks, cv.lin(w, 0.0, -k, hs[10] * k + 0.5, b3), out=locks)
    torch.minimum(region, torch.maximum(hairline, locks, out=hairline), out=region)
    cv.paint(w, region.clamp_(0.0, 1.0), hair)

    # Glasses: lenses around the eyes, circles or squircles (x^4 + y^4 = 1: rounded rectangles), tinted; then the
    # frame: the rims, and one bar at the height of the bridge from temple to temple, cut out of the lenses.
    w = cv.window("glasses")
    b0, b1, b2, b3 = cv.scratch(w, 4)
    rect, th = 1.0 - s["glasses_round"], s["glasses_thickness"]
    lw = torch.minimum((er + 0.04) * s["glasses_size"], ex - 0.035)  # half width; the bridge keeps a gap
    lh = lw * (1.0 - 0.2 * rect)
    ly = ey + 0.005
    off = (on["glasses"] - 1.0) * 1e4  # ramps pushed far below 0 where there are no glasses
    x2 = cv.lin(w, 1 / lw, 0.0, 0.0, b0).abs_().sub_(ex / lw)
    x2.mul_(x2)
    y2 = cv.lin(w, 0.0, 1 / lh, -ly / lh, b1)
    y2.mul_(y2)
    q = torch.add(x2, y2, out=b2)  # circle: q = x^2 + y^2
    q.addcmul_(x2.mul_(x2).addcmul_(y2, y2).sub_(q), rect)  # squircle: q = x^4 + y^4
    # Distance outside the edge ~ (q - 1) h / p for q = |x|^p + |y|^p, h the geometric mean half size.
    d = q.sub_(1.0).mul_((lw * lh) ** 0.5 * k / (2.0 + 2.0 * rect))
    lens = torch.sub(off + 0.5, d, out=b1).clamp_(0.0, 1.0)
    bar = cv.lin(w, 0.0, k, -(ly - 0.32 * lh) * k, b0).abs_().mul_(-1.0).add_(th * 0.38 * k + 0.5 + off)
    torch.minimum(bar, cv.lin(w, k, 0.0, 0.0, b3).abs_().mul_(-1.0).add_((a + 0.01) * k + 0.5), out=bar)
    torch.minimum(bar, torch.add(d, 0.5, out=b3), out=bar)
    frame = d.abs_().mul_(-1.0).add_(th * 0.5 * k + 0.5 + off)
    frame = torch.maximum(frame, bar, out=frame).clamp_(0.0, 1.0)
    cv.paint(w, torch.mul(lens, s["glasses_opacity"], out=b0), faces.style["glasses_tint"])
    cv.paint(w, frame, faces.style["glasses_frame_color"])
    if want_masks:
        masks["glasses"] = (w, torch.maximum(lens, frame))

    if not want_masks:
        return cv.img, None
    full = {}
    for name in ATTRIBUTES:
        (r0, r1, c0, c1), m = masks[name]
        full[name] = torch.zeros(n, 1, size, size, device=cv.device)
        full[name][:, 0, r0:r1, c0:c1] = m
    return cv.img, full


def render(faces: Faces, size: int = 128) -> torch.Tensor:
    """(N, 3, size, size) float32 images in [-1, 1] on the faces' device; size is 64, 128 or 256."""
    return _draw(faces, size, want_masks=False)[0]


def render_with_masks(faces: Faces, size: int = 128) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`render` and `attribute_masks` in one pass."""
    img, masks = _draw(faces, size, want_masks=True)
    assert masks is not None
    return img, masks


def attribute_masks(faces: Faces, size: int = 128) -> dict[str, torch.Tensor]:
    """Attribute name -> (N, 1, size, size) soft coverage in [0, 1] of the attribute's layers, zero where absent.
    An edit of attributes E changes pixels only where the masks of E, of the source or of the edit, are > 0; the
    smile's mask also covers the neutral mouth it replaces, the glasses' mask the tinted lenses."""
    return render_with_masks(faces, size)[1]


def render_domain(pair: str, domain: str, indices, size: int = 128, seed: int = TRAIN_SEED,
                  device=None) -> torch.Tensor:
    """Images of one domain of a pair (see `sample_domain`)."""
    return render(sample_domain(pair, domain, indices, seed, device), size)


# ---------------------------------------------------------------------------------------------------------------
# Training stream


# Pixels rendered per call by `SyntheticPairs.batches`, per device type.
_CALL_PIXELS = {"cpu": 1 << 21, "cuda": 1 << 24}


class SyntheticPairs:
    """Endless training stream of (a, b) batches for one pair, rendered on the training device."""

    framing = "synthetic"

    def __init__(self, pair: str, image_size: int = 128, seed: int = TRAIN_SEED):
        if pair not in PAIRS:
            raise ValueError(f"unknown pair {pair!r}; expected one of {tuple(PAIRS)}")
        if image_size not in SIZES:
            raise ValueError(f"image size must be one of {SIZES} (a power of two from 64 to 256), not {image_size}")
        self.pair, self.image_size, self.seed = pair, image_size, seed
        self.domains: tuple[str, str] = PAIRS[pair]

    def describe(self) -> dict:
        return {"kind": "synthetic", "pair": self.pair, "seed": self.seed, "image_size": self.image_size}

    def indices(self, batch_size: int, step: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                device="cpu", streams: tuple[str, ...] = ("a", "b")) -> tuple[torch.Tensor, ...]:
        """Face indices of domains a and b (or other named `streams`) at `step` on `rank`: positions
        (step * world_size + rank) * batch_size + j of endless streams, each position mapped through a bijective
        hash keyed by (run seed, stream), so ranks and steps never share a face and the streams are different
        people."""
        pos = (step * world_size + rank) * batch_size + torch.arange(batch_size, dtype=torch.int64, device=device)
        return tuple(_mix(pos ^ _mix_int(_key(f"stream/{name}") ^ seed)) for name in streams)

    def batches(self, batch_size: int, *, seed: int = 0, start_step: int = 0, rank: int = 0, world_size: int = 1,
                device="cpu", num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(a, b) batches, each (batch_size, 3, S, S) in [-1, 1] on `device`, for steps start_step, start_step+1,
        ...; a pure function of (self.seed, seed, step, rank, world_size), so a resumed run sees what the original
        saw. `num_workers` is accepted for the `PairSource` protocol and unused: faces are rendered on `device`."""
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        device = torch.device(device)
        # Both domains of several steps go through one render call, which shares the renderer's fixed cost per
        # call (a few hundred small ops, kernel launches on CUDA); each face is the same whatever batch draws it.
        steps = max(1, _CALL_PIXELS.get(device.type, _CALL_PIXELS["cpu"]) // (2 * batch_size * self.image_size ** 2))
        n = steps * batch_size
        present = {name: torch.tensor([on] * n + [pair_domain(self.pair, "b")[name]] * n, device=device)
                   for name, on in pair_domain(self.pair, "a").items()}
        step = start_step
        while True:
            ia, ib = zip(*(self.indices(batch_size, step + j, seed=seed, rank=rank, world_size=world_size,
                                        device=device) for j in range(steps)))
            images = render(sample_faces(torch.cat(ia + ib), self.seed, present), self.image_size)
            for j in range(steps):
                yield images[j * batch_size:(j + 1) * batch_size], images[n + j * batch_size:n + (j + 1) * batch_size]
            step += steps

    def neither_batches(self, batch_size: int, *, seed: int = 0, start_step: int = 0, rank: int = 0,
                        world_size: int = 1, device="cpu") -> Iterator[torch.Tensor]:
        """Batches of faces with neither attribute of the pair (`did train --neither-weight`), for steps start_step,
        start_step+1, ...: a third stream of people, disjoint from both domains' and as resume-exact."""
        absent = {name: False for name in ATTRIBUTES}
        for step in itertools.count(start_step):
            (idx,) = self.indices(batch_size, step, seed=seed, rank=rank, world_size=world_size, device=device,
                                  streams=("neither",))
            yield render(sample_faces(idx, self.seed, absent), self.image_size)
