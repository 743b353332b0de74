"""How far an image sits from what a model can reproduce, calibrated on the model's own training images.

A model reproduces images like its training data closely and anything else badly, so the per-image reconstruction
error, the mean squared error of G(E_c(x), E_sA(x), E_sB(x)) against x, tells an upload unlike anything the model
was trained on from one it knows. A `Calibration` holds the percentiles of that error over images of the training
distribution and a verdict threshold; it is stored in the model card under "calibration", beside the tensors it
was measured with, so whoever serves the model can score an upload without the training data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from . import checkpoint
from .disentangler import PARTS, Codes, Disentangler

KEY = "calibration"  # the card's key
MARGIN = 2.0  # the threshold is MARGIN x the p99.9 of the calibration images' errors (see `Calibration`)
ERROR = "per-image mean squared error of G(E_c(x), E_sA(x), E_sB(x)) against x, both in [-1, 1]"
PERCENTILES: dict[str, float] = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "p99.9": 0.999, "max": 1.0}
DECIMALS = 7  # the card's percentiles and threshold, rounded to this many decimals


@torch.no_grad()
def reconstruction_error(model: Disentangler, x: torch.Tensor, codes: Codes | None = None) -> torch.Tensor:
    """(N,) float32 on the CPU: the mean squared error of the model's reconstruction of each image x (N, 3, S, S)
    in [-1, 1].

    The reconstruction is what `Disentangler.reconstruct` returns, decoded from all three codes: a mask model's is
    its composite m * G(c, a, b) + (1 - m) * G(c, 0, 0). `codes` (of x) are reused where given; the ones missing
    are encoded. The networks run in the model's dtype on its device; the error is taken in float32."""
    given = codes if codes is not None else Codes(None, None, None)
    missing = [p for p in PARTS if p not in given.parts]
    if missing:
        encoded = model.encode(x.to(model.device), missing)
        given = Codes(*(g if g is not None else e for g, e in zip(given, encoded)))
    recon = model.decode(*given)
    if recon.shape != x.shape:
        raise ValueError(f"images of shape {tuple(x.shape)} do not match the model's reconstruction {tuple(recon.shape)}")
    diff = recon.float() - x.to(recon.device, torch.float32)
    return diff.square().flatten(1).mean(1).cpu()


@dataclass(frozen=True)
class Calibration:
    """Percentiles of the reconstruction error over `n` images of a model's training distribution, and the verdict.

    `score` is an error relative to the p99: 1.0 is as far off as the 99th percentile of the calibration images.
    An image is out of domain where its error exceeds `threshold` = MARGIN x p99.9 (recorded as `margin`). Why
    that rule: the error of in-distribution images has a short right tail, so the p99.9 sits close to the largest
    error seen, and a factor of 2 in squared error is 3 dB of PSNR: an image is flagged only when the model
    reproduces it 3 dB worse than all but one in a thousand training images. The margin absorbs the sampling error
    of an extreme percentile estimated from a few thousand images and the small shifts an upload of a
    training-like image goes through (resizing, re-encoding, another compute dtype), so images of the training
    distribution pass essentially always; what is flagged is what the model cannot draw. The rule is a property of
    the calibration images alone, never fitted to examples of what should be flagged.
    """

    data: dict[str, Any]  # what the errors were measured on: like the card's training data record
    n: int
    percentiles: dict[str, float]  # p50, p90, p99, p99.9, max of the error
    margin: float  # the threshold's multiple of the p99.9
    threshold: float  # error above which an image is out of domain

    def __post_init__(self) -> None:
        if set(self.percentiles) != set(PERCENTILES):
            raise ValueError(f"a calibration needs the percentiles {', '.join(PERCENTILES)}, not {sorted(self.percentiles)}")
        if not (self.percentiles["p99"] > 0 and self.threshold > 0):
            raise ValueError(f"a calibration's p99 and threshold must be > 0, not {self.percentiles['p99']!r} "
                             f"and {self.threshold!r}")

    @property
    def rule(self) -> str:
        # From the threshold as the card stores it, so a calibration read back from its card states the same rule
        # as the one written: .6g of the unrounded value can round the other way.
        return f"out of domain where the error exceeds {self.margin:g} x p99.9 = {round(self.threshold, DECIMALS):.6g}"

    def score(self, errors: torch.Tensor) -> torch.Tensor:
        """Errors (N,) as multiples of the calibration's p99 (1.0: as far off as the 99th percentile)."""
        return torch.as_tensor(errors, dtype=torch.float32) / self.percentiles["p99"]

    def out_of_domain(self, errors: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the errors above the threshold."""
        return torch.as_tensor(errors, dtype=torch.float32) > self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"error": ERROR, "measured_on": {**self.data, "n": self.n},
                "percentiles": {k: round(v, DECIMALS) for k, v in self.percentiles.items()},
                "margin": self.margin, "threshold": round(self.threshold, DECIMALS), "rule": self.rule,
                "score": "error / p99"}

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> Calibration:
        try:
            data = {k: v for k, v in raw["measured_on"].items() if k != "n"}
            return Calibration(data, int(raw["measured_on"]["n"]), {k: float(raw["percentiles"][k]) for k in PERCENTILES},
                               float(raw["margin"]), float(raw["threshold"]))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a calibration record (missing or malformed {e})") from None

    @staticmethod
    def from_card(card: dict[str, Any]) -> Calibration | None:
        """The card's calibration, or None where it has none; a malformed one is a CheckpointError."""
        raw = card.get(KEY)
        if raw is None:
            return None
        try:
            return Calibration.from_dict(raw)
        except ValueError as e:
            raise checkpoint.CheckpointError(f"model card {card.get('name')!r}: {e}") from None


def calibrate(model: Disentangler, batches: Iterable[torch.Tensor], data: dict[str, Any] | None = None,
              margin: float = MARGIN) -> Calibration:
    """The calibration of `model` on every image of `batches` (each (N, 3, S, S) in [-1, 1]); `data` says what they
    are (recorded with the model's compute dtype)."""
    errors = [reconstruction_error(model, x) for x in batches]
    if sum(map(len, errors)) < 2:
        raise ValueError(f"a calibration needs at least 2 images, got {sum(map(len, errors))}")
    errors = torch.cat(errors).double()
    q = dict(zip(PERCENTILES, torch.quantile(errors, errors.new_tensor(list(PERCENTILES.values()))).tolist()))
    record = {**(data or {}), "dtype": str(model.dtype).removeprefix("torch.")}
    return Calibration(record, len(errors), q, margin, margin * q["p99.9"])


def write(card_path: str | Path, calibration: Calibration) -> Path:
    """Set the card's "calibration" (atomically, through `checkpoint.write_card`); the tensor file and its sha256
    pin are left as they are. Returns the card's path."""
    path, _ = checkpoint.paths(card_path)
    card = checkpoint.read_card(path)
    card[KEY] = calibration.to_dict()
    checkpoint.write_card(card, path)
    return path
