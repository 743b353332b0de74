"""Faces in an upright RGB image: a box, five landmarks and a score each, from dlib's HOG frontal face detector and
its 5-point shape predictor (the model file of the `face-recognition-models` package; both ship with the serve
extra, and nothing is downloaded at run time).

Coordinates are the image's full-resolution pixels, continuous: pixel (i, j) covers [i, i+1) x [j, j+1), so the
centre of the top-left pixel is (0.5, 0.5); x grows to the right, y downwards. Left and right are as seen in the
image: the image-left eye is the person's right eye.

Cost: the detector sees a copy resized so that its longer side is `detect_size` pixels, whatever the upload's
size; it finds faces of about 80 px and up in that copy (its window is 80x80), i.e. faces whose box spans at least
80/`detect_size` of the image's longer side, and takes time in proportion to the copy's area. The landmarks are
predicted on the full-resolution pixels around each box.

`detect` blocks (call it in a worker thread) and may run in several threads at once: dlib releases the GIL while
it detects, and its detector keeps per-image state, so each thread gets its own copy; the shape predictor is
read-only and shared (dlib documents it as safe to use from several threads at once).
"""
from __future__ import annotations

import copy
import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from .errors import Unavailable

DETECT_SIZE = 1024
# dlib's scores are the detector's SVM margin: 0 is its own cut-off, and it was trained to score faces at +1 or more
# and every other window at -1 or less. Half the margin keeps the confident faces and drops the near-misses.
MIN_SCORE = 0.5

PREDICTOR_FILE = "shape_predictor_5_face_landmarks.dat"


class Landmarks(NamedTuple):
    """Five points, each (x, y). "left" and "right" are as seen in the image; outer corners are away from the nose."""

    left_eye_outer: tuple[float, float]
    left_eye_inner: tuple[float, float]
    right_eye_inner: tuple[float, float]
    right_eye_outer: tuple[float, float]
    nose: tuple[float, float]  # the base of the nose, between the nostrils


# dlib's 5-point model numbers its parts 0, 1: the image-right eye's outer and inner corners; 2, 3: the image-left
# eye's outer and inner corners; 4: the base of the nose.
_DLIB_PARTS = {"left_eye_outer": 2, "left_eye_inner": 3, "right_eye_inner": 1, "right_eye_outer": 0, "nose": 4}


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1), x1 and y1 exclusive; may reach past the image's edges
    landmarks: Landmarks
    score: float  # the detector's, at least the `min_score` it was found with

    def eyes(self) -> np.ndarray:
        """(2, 2): the centres (x, y) of the image-left eye and of the image-right eye, each the mean of its corners."""
        lm = self.landmarks
        return np.array([
            [(lm.left_eye_outer[0] + lm.left_eye_inner[0]) / 2, (lm.left_eye_outer[1] + lm.left_eye_inner[1]) / 2],
            [(lm.right_eye_inner[0] + lm.right_eye_outer[0]) / 2, (lm.right_eye_inner[1] + lm.right_eye_outer[1]) / 2],
        ])


# --- the models: loaded once, on first use --------------------------------------------------------------------------

_lock = threading.Lock()
_models: tuple[Any, Any] | None = None  # (the detector that threads copy, the shape predictor)
_local = threading.local()


def predictor_path() -> Path:
    """The 5-point model's file, found without importing `face_recognition_models` (its __init__ needs
    pkg_resources, which setuptools no longer ships)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package face-recognition-models is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / PREDICTOR_FILE


def _load() -> tuple[Any, Any]:
    global _models
    with _lock:
        if _models is None:
            try:
                import dlib

                path = predictor_path()
                if not path.is_file():
                    raise FileNotFoundError(f"{path} is missing")
                _models = (dlib.get_frontal_face_detector(), dlib.shape_predictor(str(path)))
            except (ImportError, FileNotFoundError) as e:
                raise Unavailable(f"face detection is not installed (dlib-bin and face-recognition-models, the serve "
                                  f"extra): {e}") from None
        return _models


def _detector() -> Any:
    """This thread's detector: a copy of the loaded one (about 4 ms; building one from scratch takes about 1 s)."""
    det = getattr(_local, "detector", None)
    if det is None:
        master, _ = _load()
        with _lock:
            det = _local.detector = copy.deepcopy(master)
    return det


# --- detection --------------------------------------------------------------------------------------------------------


def detect(img: Image.Image, *, detect_size: int = DETECT_SIZE, min_score: float = MIN_SCORE) -> list[Face]:
    """The faces of an upright RGB image scoring at least `min_score`, largest box first (ties: higher score, then
    higher up, then further left)."""
    if img.mode != "RGB":
        raise ValueError(f"detect needs an RGB image, not {img.mode}")
    detector, predictor = _detector(), _load()[1]
    import dlib  # loaded by _load

    w, h = img.size
    scale = detect_size / max(w, h)
    small = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR, reducing_gap=3.0)
    sx, sy = small.width / w, small.height / h  # per axis: rounding the copy's size changes its aspect a little
    rects, scores, _ = detector.run(np.asarray(small), 0, min_score)

    faces = []
    for r, score in zip(rects, scores):
        if score < min_score:
            continue
        # dlib's rectangles are inclusive pixel indices of the copy: the box covers [left, right + 1) there.
        box = (r.left() / sx, r.top() / sy, (r.right() + 1) / sx, (r.bottom() + 1) / sy)
        faces.append(Face(box, _landmarks(img, box, predictor, dlib), float(score)))
    faces.sort(key=lambda f: (-(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]), -f.score, f.box[1], f.box[0]))
    return faces


def _landmarks(img: Image.Image, box: tuple[float, float, float, float], predictor: Any, dlib: Any) -> Landmarks:
    """The five points of the face in `box`, predicted on the full-resolution pixels around it (a margin of one box
    size on every side, more than the predictor reads: a crop instead of the whole upload keeps memory small)."""
    left, top, right, bottom = round(box[0]), round(box[1]), round(box[2]) - 1, round(box[3]) - 1  # inclusive
    m = max(right - left, bottom - top) + 1
    cx, cy = max(0, left - m), max(0, top - m)
    crop = np.asarray(img.crop((cx, cy, min(img.width, right + 1 + m), min(img.height, bottom + 1 + m))))
    shape = predictor(crop, dlib.rectangle(left - cx, top - cy, right - cx, bottom - cy))
    # dlib puts pixel (i, j) at the integer point (i, j): its centre, which is (i + 0.5, j + 0.5) here.
    point = lambda k: (shape.part(k).x + cx + 0.5, shape.part(k).y + cy + 0.5)  # noqa: E731
    return Landmarks(**{name: point(k) for name, k in _DLIB_PARTS.items()})
