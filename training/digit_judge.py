"""Digit classifiers: one per digit domain (MNIST, SynDigits, SVHN), the witnesses of the domain-adaptation test.

The first paper's third result translates an MNIST digit a with any digit b of the other domain into
`G(E_c(a), 0, E_sB(b))`, a's digit drawn in b's domain, and asks a classifier of b's domain which digit it reads.
Each classifier here is trained on its own domain's labelled training images only (augmented, never any model's
output), so it is an independent reader of the translations (`did eval` on a digits model).

A small CNN for 32x32 RGB: conv-BN-ReLU-maxpool blocks down to 4x4, global average pooling, dropout, a linear head.
Checkpoints follow the judge's layout, `NAME.safetensors` (fp16 by default: a few hundred KB) + `NAME.json`, with
a card of format `did-digit-judge/1` that names the domain; the shipped ones are `weights/judge/digits_<domain>`,
beside the face judge, where the service (which loads `weights/*.json`) never sees them.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models import checkpoint
from models.checkpoint import CheckpointError

from .judge import fit, save_classifier

log = logging.getLogger("did.digit_judge")

FORMAT = "did-digit-judge/1"
SEED = 15_485_863  # the classifiers' training stream and augmentation; apart from the models' seeds
INPUT_SIZE = 32  # every image is resized to this before a classifier sees it
CLASSES = 10
STEPS, BATCH = 4000, 64  # `did judge train --data digits` defaults: the shipped classifiers
WEIGHTS = Path("weights/judge")


def default_path(domain: str, weights: str | Path = WEIGHTS) -> Path:
    """Where the shipped classifier of `domain` lives: WEIGHTS/digits_<domain>."""
    return Path(weights) / f"digits_{domain}"


@dataclass(frozen=True)
class DigitJudgeConfig:
    widths: tuple[int, ...] = (32, 64, 128)  # one conv-BN-ReLU-maxpool block each: 32 px -> 4x4
    dropout: float = 0.3


class DigitJudge(nn.Module):
    """Image (N, 3, S, S) in [-1, 1], any S -> digit logits (N, 10), for the digits of one domain."""

    def __init__(self, domain: str, config: DigitJudgeConfig | None = None):
        super().__init__()
        self.domain = domain
        self.config = config or DigitJudgeConfig()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in self.config.widths:
            layers += [nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(self.config.dropout)
        self.head = nn.Linear(c_in, CLASSES)
        self.card: dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.head.weight.dtype)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
        # Each image standardised on its own: the digit's shape, not the domain's brightness or contrast, is read.
        x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) / (x.std(dim=(1, 2, 3), keepdim=True) + 0.05)
        return self.head(self.dropout(self.body(x).mean(dim=(2, 3))))  # (N, C, 4, 4) -> (N, C) -> (N, 10)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
        """(N,) int64 digits, in eval mode, in chunks of `batch` on the classifier's device; answered on the CPU."""
        was_training = self.training
        self.eval()
        dev = self.head.weight.device
        out = torch.cat([self(x[i : i + batch].to(dev)).argmax(1).cpu() for i in range(0, x.shape[0], batch)])
        self.train(was_training)
        return out


# --- augmentation -----------------------------------------------------------------------------------------------


def augment(x: torch.Tensor, generator: torch.Generator, colour: bool = True) -> torch.Tensor:
    """Random geometry and photometry, so that a classifier trained on a few thousand digits reads digits of any
    placement, slant, stroke and colour (translations are softer and less centred than the data).

    Geometry: rotation within +-15 degrees, scale 0.85-1.15, shear within +-0.15, shifts up to 3 px, and a smooth
    elastic jitter (a 4x4 field of displacements up to about 1 px, upsampled). Photometry: contrast 0.6-1.4,
    brightness +-0.25, a blur on a third of the images, pixel noise; with `colour` also per-channel gains, shuffled
    channels and inversion on half the images (SynDigits and SVHN draw light-on-dark and dark-on-light alike)."""
    n, dev = x.shape[0], x.device
    u = lambda *shape: torch.rand(*shape, generator=generator, device=dev)  # noqa: E731
    angle = (u(n) - 0.5) * math.radians(30)
    scale = 0.85 + 0.3 * u(n)
    shear = (u(n) - 0.5) * 0.3
    shift = (u(n, 2) - 0.5) * (2 * 3 / (x.shape[-1] / 2))  # +-3 px in the [-1, 1] coordinates of grid_sample
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (N, H, W, 2)
    field = (u(n, 2, 4, 4) - 0.5) * (2 * 2 / x.shape[-1])  # up to +-1 px
    grid = grid + F.interpolate(field, size=x.shape[-2:], mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    blur = u(n) < 1 / 3
    if blur.any():
        small = F.interpolate(x[blur], scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
        x = x.clone()
        x[blur] = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
    if colour:
        x = x * (0.8 + 0.4 * u(n, 3, 1, 1))
        order = torch.argsort(u(n, 3), dim=1)  # (N, 3) a permutation of the channels per image
        x = torch.gather(x, 1, order[:, :, None, None].expand_as(x))
        x = torch.where((u(n) < 0.5)[:, None, None, None], -x, x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (0.6 + 0.8 * u(n, 1, 1, 1)) + mean + (u(n, 1, 1, 1) - 0.5) * 0.5
    x = x + 0.05 * u(n, 1, 1, 1) * torch.randn(x.shape, generator=generator, device=dev)
    return x.clamp(-1, 1)


# --- training and accuracy --------------------------------------------------------------------------------------


def rate(correct: torch.Tensor) -> dict[str, Any]:
    """A (N,) bool tensor as {"rate", "correct", "n"}, the form of every accuracy the digit evaluation reports."""
    n, k = correct.numel(), int(correct.sum())
    return {"rate": round(k / n, 5) if n else float("nan"), "correct": k, "n": n}


def accuracy(judge: DigitJudge, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """The classifier's accuracy on labelled images, with its counts."""
    return rate(judge.predict(images) == labels.cpu())


def train_digit_judge(domain: str, *, steps: int = STEPS, batch: int = BATCH, lr: float = 3e-3, device: str = "cpu",
                      seed: int = SEED, progress: bool = True, root: str | Path | None = None, batches=None) -> DigitJudge:
    """Train the classifier of `domain` on its labelled training images (`digits.labelled_batches`), augmented;
    AdamW with a one-cycle schedule and label smoothing. `batches` replaces the data stream (an iterator of
    (images, labels)), for tests; `root` holds the user's MNIST / SVHN files. Every batch and its augmentation are functions of (seed, step)."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    judge = DigitJudge(domain).to(dev).train()
    if batches is None:
        from .digits import labelled_batches

        batches = labelled_batches(domain, "train", batch, seed=seed, device=dev, root=root)
    gen = torch.Generator(device=dev)

    def loss_of(step: int) -> torch.Tensor:
        x, y = next(batches)
        gen.manual_seed(seed * 1_000_003 + step)
        return F.cross_entropy(judge(augment(x.to(dev), gen, colour=domain != "mnist")), y.to(dev), label_smoothing=0.05)

    fit(judge, loss_of, steps=steps, lr=lr, weight_decay=5e-4, progress=progress, desc=f"digits {domain}")
    return judge.eval()


# --- checkpoints ------------------------------------------------------------------------------------------------


def save(judge: DigitJudge, path: str | Path, *, training: dict[str, Any], metrics: dict[str, Any],
         dtype: str = "float16") -> Path:
    """`PATH.safetensors` (floating tensors in `dtype`; BN's batch counter stays int64) and the card `PATH.json`;
    returns the card's path."""
    if dtype not in checkpoint.DTYPES:
        raise ValueError(f"dtype must be one of {sorted(checkpoint.DTYPES)}, not {dtype!r}")
    fields = {"domain": judge.domain,
              "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(judge.config).items()},
              "input_size": INPUT_SIZE, "classes": CLASSES}
    return save_classifier(judge, path, FORMAT, fields, training=training, metrics=metrics, dtype=dtype)


def load(path: str | Path, device: str | torch.device = "cpu", domain: str | None = None) -> DigitJudge:
    """The classifier at `PATH` (.json/.safetensors), in float32 and eval mode, checked against its card; with
    `domain`, a classifier of another domain is refused."""
    card_path, _ = checkpoint.paths(path, "judge")
    if not card_path.is_file():
        hint = f" (train it with `did judge train --data digits --domain {domain} --out {card_path.with_suffix('')}`)" if domain else ""
        raise CheckpointError(f"{card_path}: digit classifier card not found{hint}")
    stored = checkpoint.read_checkpoint(card_path, FORMAT, "digit classifier card")
    try:
        raw = stored.card["config"]
        config = DigitJudgeConfig(widths=tuple(int(w) for w in raw["widths"]), dropout=float(raw["dropout"]))
        own = str(stored.card["domain"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{card_path}: invalid digit classifier card ({e})") from None
    if domain is not None and own != domain:
        raise CheckpointError(f"{card_path}: a classifier of {own} digits, not of {domain}")
    judge = DigitJudge(own, config)
    checkpoint.load_state(judge, stored)
    judge.card = stored.card
    return judge.to(device).eval()


def train_and_save(out: Path, domain: str, *, steps: int = STEPS, batch: int = BATCH, device: str = "cpu",
                   seed: int = SEED, progress: bool = True, root: str | Path | None = None) -> Path:
    """`did judge train --data digits`: train the classifier of `domain`, measure it on the domain's whole test
    split (as stored, in fp16), save with the accuracy and its counts in the card."""
    from . import digits

    if domain not in digits.DIGIT_DOMAINS:
        raise ValueError(f"unknown digit domain {domain!r}; expected one of {digits.DIGIT_DOMAINS}")
    start = time.perf_counter()
    judge = train_digit_judge(domain, steps=steps, batch=batch, device=device, seed=seed, progress=progress, root=root)
    minutes = (time.perf_counter() - start) / 60
    training = {"data": f"{domain} train split, labelled", "domain": domain, "steps": steps, "batch_size": batch,
                "seed": seed, "augmentation": "rotation, scale, shear, shift, elastic jitter, blur, contrast, brightness, "
                "noise" + ("" if domain == "mnist" else ", channel gains and order, inversion"),
                "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "minutes": round(minutes, 2)}
    card = save(judge, out, training=training, metrics={})
    judge = load(card, device)  # the accuracy of the tensors as stored
    images, labels = digits.labelled(domain, "test", root=root)
    metrics = {"test_accuracy": accuracy(judge, images, labels), "test_split": "test"}
    card = save(judge, out, training=training, metrics=metrics)
    log.info("digit classifier %s: %s", domain, json.dumps(metrics))
    return card
