"""The judge: a small attribute classifier (glasses / smile / beard) that scores the models' edits.

It is trained by the project on labelled images (renders of the synthetic benchmark, or CelebA's attribute file)
and never on any model's output, so it is an independent witness of whether an edit added or removed an attribute
(the papers' membership test). Its penultimate features also serve as the feature space of KID/FID and of the
identity similarity when no Inception weights are available offline.

Checkpoints follow the models' layout, `NAME.safetensors` + `NAME.json`, with a card of format `did-judge/1`; the
shipped one lives in `weights/judge/` so the service (which loads `weights/*.json`) never mistakes it for an
editing model.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models import checkpoint
from models.checkpoint import CheckpointError
from models.images import to_tensor

from . import synthetic
from .data import CELEBA_CROP, CELEBA_SPLITS, TRAITS, load_image, read_attributes, read_partition

log = logging.getLogger("did.judge")

FORMAT = "did-judge/1"
JUDGE_SEED = 104_729  # training renders of the judge: disjoint from the models' training (0) and test (7919) seeds
INPUT_SIZE = 64  # every image is resized to this before the judge sees it


@dataclass(frozen=True)
class JudgeConfig:
    attributes: tuple[str, ...] = synthetic.ATTRIBUTES
    widths: tuple[int, ...] = (32, 64, 128, 128, 256)  # stride-2 layers: 64 px -> 2x2

    @property
    def feature_size(self) -> int:
        return self.widths[-1]


class Judge(nn.Module):
    """Image (N, 3, S, S) in [-1, 1], any S -> attribute logits (N, len(attributes)); `features` gives the pooled
    penultimate activations used for KID/FID and similarity."""

    def __init__(self, config: JudgeConfig | None = None):
        super().__init__()
        self.config = config or JudgeConfig()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in self.config.widths:
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, inplace=True)]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(self.config.feature_size, len(self.config.attributes))
        self.card: dict[str, Any] = {}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[-1] != INPUT_SIZE or x.shape[-2] != INPUT_SIZE:
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
        """Attribute -> bool (N,) presence, in eval mode, in chunks of `batch`."""
        logits = torch.cat([self(x[i : i + batch]) for i in range(0, x.shape[0], batch)])
        return {name: logits[:, i] > 0 for i, name in enumerate(self.config.attributes)}


# --- data -------------------------------------------------------------------------------------------------------


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, noise and contrast jitter, so the judge reads attributes from shape and colour rather than from the
    renderer's crisp edges (edited images are softer than renders). Never model outputs."""
    n = x.shape[0]
    dev = x.device
    blur = torch.rand(n, generator=generator, device=dev) < 0.5
    if blur.any():
        small = F.interpolate(x[blur], scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
        x = x.clone()
        x[blur] = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
    gain = 1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=generator, device=dev) - 0.5)
    noise = 0.04 * torch.rand(n, 1, 1, 1, generator=generator, device=dev) * torch.randn(x.shape, generator=generator, device=dev)
    return (x * gain + noise).clamp(-1, 1)


def synthetic_batches(batch: int, image_size: int, seed: int = JUDGE_SEED, device: torch.device | str = "cpu",
                      start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (images, labels) of renders with every attribute on or off at random (labels (N, 3) float)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    index = start
    while True:
        faces = synthetic.sample_faces(torch.arange(index, index + batch, device=device), seed)
        index += batch
        images = synthetic.render(faces, image_size)
        labels = torch.stack([faces.present[a] for a in synthetic.ATTRIBUTES], dim=1).float()
        yield _augment(images, gen), labels


def synthetic_test_set(n: int, image_size: int, seed: int = synthetic.TEST_SEED,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Clean (un-augmented) test renders from the benchmark's test seed, and their labels."""
    faces = synthetic.sample_faces(torch.arange(n, device=torch.device(device)), seed)
    labels = torch.stack([faces.present[a] for a in synthetic.ATTRIBUTES], dim=1)
    return synthetic.render(faces, image_size), labels


class _CelebALabelled(torch.utils.data.Dataset):
    """CelebA files with their three judge labels (glasses, smile, beard by the same rules as the domain pairs)."""

    def __init__(self, items: list[tuple[str, list[float]]], size: int):
        self.items, self.size = items, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, labels = self.items[i]
        try:
            image = to_tensor(load_image(path, self.size, "crop", CELEBA_CROP))
        except Exception:  # a broken file: a grey image labelled "no attribute" rather than a crashed run
            image, labels = torch.zeros(3, self.size, self.size), [0.0, 0.0, 0.0]
        return image, torch.tensor(labels)


def celeba_labelled(root: str | Path, split: str = "train", size: int = INPUT_SIZE) -> _CelebALabelled:
    """Every CelebA image of `split` (train, val, test, all) that exists on disk, labelled for the judge."""
    root = Path(root)
    images, attr_file = root / "img_align_celeba", root / "list_attr_celeba.txt"
    if not attr_file.exists() or not images.is_dir():
        raise FileNotFoundError(f"CelebA root {root} lacks img_align_celeba/ or list_attr_celeba.txt")
    part_file = root / "list_eval_partition.txt"
    partition = read_partition(part_file) if part_file.exists() else None
    present = set(os.listdir(images))
    items = []
    for name, row in read_attributes(attr_file):
        if name not in present:
            continue
        if split != "all" and partition is not None and partition.get(name) != CELEBA_SPLITS[split]:
            continue
        items.append((str(images / name), [float(TRAITS[a].test(row)) for a in synthetic.ATTRIBUTES]))
    if not items:
        raise ValueError(f"CelebA {root}, split {split}: no images")
    return _CelebALabelled(items, size)


def celeba_batches(root: str | Path, batch: int, seed: int = JUDGE_SEED, device: torch.device | str = "cpu",
                   num_workers: int = min(4, os.cpu_count() or 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled (images, labels) batches of CelebA's train split, with the same augmentation."""
    data = celeba_labelled(root, "train")
    gen = torch.Generator().manual_seed(seed)
    aug = torch.Generator(device=torch.device(device)).manual_seed(seed)
    while True:
        loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, generator=gen, drop_last=len(data) > batch,
                                             num_workers=num_workers)
        for x, y in loader:
            yield _augment(x.to(device), aug), y.to(device)


# --- training and accuracy --------------------------------------------------------------------------------------


@torch.no_grad()
def accuracy(judge: Judge, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per-attribute accuracy and `all` (every attribute of an image right) on labelled images."""
    was_training = judge.training
    judge.eval()
    pred = judge.predict(images)
    judge.train(was_training)
    right = torch.stack([pred[a] == labels[:, i].bool() for i, a in enumerate(judge.config.attributes)], dim=1)
    out = {a: right[:, i].float().mean().item() for i, a in enumerate(judge.config.attributes)}
    out["all"] = right.all(dim=1).float().mean().item()
    return out


def train_judge(steps: int = 1500, batch: int = 128, image_sizes: tuple[int, ...] = (64, 128), lr: float = 2e-3,
                device: str = "cpu", seed: int = JUDGE_SEED, progress: bool = True, celeba_root: str | Path | None = None) -> Judge:
    """Train on synthetic renders at each of `image_sizes` in turn (the judge resizes to 64 px, so it sees the
    antialiasing of every size the models produce), or on CelebA's train split with `celeba_root`. One-cycle
    schedule: on renders, accuracy > 99.8% in 1,500 steps."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    judge = Judge().to(dev).train()
    if celeba_root is not None:
        streams = [celeba_batches(celeba_root, batch, seed=seed, device=dev)]
    else:
        streams = [synthetic_batches(batch, s, seed=seed + 17 * i, device=dev) for i, s in enumerate(image_sizes)]

    def loss_of(step: int) -> torch.Tensor:
        x, y = next(streams[step % len(streams)])
        return F.binary_cross_entropy_with_logits(judge(x), y)

    fit(judge, loss_of, steps=steps, lr=lr, weight_decay=1e-4, progress=progress, desc="judge")
    return judge.eval()


def fit(net: nn.Module, loss_of: Callable[[int], torch.Tensor], *, steps: int, lr: float, weight_decay: float,
        progress: bool, desc: str) -> None:
    """The classifiers' training loop: AdamW with a one-cycle schedule over `steps`, `loss_of(step)` the loss of
    step `step`'s batch; a non-finite running loss stops the run."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    bar = tqdm(range(steps), disable=not progress, unit="step", dynamic_ncols=True, desc=desc)
    running = None
    for step in bar:
        loss = loss_of(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
        if not math.isfinite(running):
            raise FloatingPointError(f"{desc} loss is not finite at step {step}")


# --- checkpoints ------------------------------------------------------------------------------------------------


def save(judge: Judge, path: str | Path, *, training: dict[str, Any], metrics: dict[str, Any]) -> Path:
    """`PATH.safetensors` (fp32: the judge is small) and the card `PATH.json`; returns the card's path."""
    return save_classifier(judge, path, FORMAT, {"config": {k: list(v) for k, v in asdict(judge.config).items()},
                                                 "input_size": INPUT_SIZE}, training=training, metrics=metrics)


def save_classifier(net: nn.Module, path: str | Path, card_format: str, fields: dict[str, Any], *,
                    training: dict[str, Any], metrics: dict[str, Any], dtype: str = "float32") -> Path:
    """An evaluation classifier's `PATH.safetensors` (floating tensors in `dtype`, integer buffers as they are)
    and its card `PATH.json` of `card_format` with `fields` (what its loader reads back) after the name; returns
    the card's path."""
    card_path, tensors = checkpoint.paths(path, "judge")
    card_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(checkpoint.DTYPES[dtype]) if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in net.state_dict().items()}
    checkpoint.write_tensors(state, tensors, card_format)
    card = {
        "format": card_format,
        "name": card_path.stem,
        **fields,
        "tensors": {"file": tensors.name, "sha256": checkpoint.sha256(tensors), "dtype": dtype,
                    "parameters": sum(p.numel() for p in net.parameters()), "bytes": tensors.stat().st_size},
        "training": training,
        "metrics": metrics,
        "versions": checkpoint.versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    checkpoint.write_card(card, card_path)
    return card_path


def load(path: str | Path, device: str | torch.device = "cpu") -> Judge:
    """The judge from `PATH` (.json/.safetensors or a directory holding judge.json), checked against its card."""
    card_path, _ = checkpoint.paths(path, "judge")
    if not card_path.is_file():
        raise CheckpointError(f"{card_path}: judge card not found (train one with `did judge train`)")
    stored = checkpoint.read_checkpoint(card_path, FORMAT, "judge card")
    try:
        config = JudgeConfig(**{k: tuple(v) for k, v in stored.card["config"].items()})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{card_path}: invalid judge config ({e})") from None
    judge = Judge(config)
    checkpoint.load_state(judge, stored)
    judge.card = stored.card
    return judge.to(device).eval()


def train_and_save(out: Path, steps: int, batch: int, device: str, test_n: int = 2000, progress: bool = True,
                   celeba_root: str | Path | None = None) -> Path:
    """`did judge train`: train, measure on clean test renders at 64 and 128 px (or CelebA's test split), save with
    the numbers in the card."""
    start = time.perf_counter()
    judge = train_judge(steps=steps, batch=batch, device=device, progress=progress, celeba_root=celeba_root)
    minutes = (time.perf_counter() - start) / 60
    metrics: dict[str, Any] = {}
    if celeba_root is not None:
        test = celeba_labelled(celeba_root, "test")
        loader = torch.utils.data.DataLoader(test, batch_size=256, num_workers=min(4, os.cpu_count() or 1))
        xs, ys = zip(*((x, y) for x, y in loader))
        acc = accuracy(judge, torch.cat(xs).to(device), torch.cat(ys).to(device))
        metrics["test_accuracy_celeba"] = {k: round(v, 5) for k, v in acc.items()}
        metrics["test_images"] = {"n": len(test)}
        rules = ", ".join(f"{a}={TRAITS[a].rule}" for a in synthetic.ATTRIBUTES)
        source, extra = f"CelebA train split of {celeba_root}, labels {rules}", {}
    else:
        for size in (64, 128):
            images, labels = synthetic_test_set(test_n, size, device=device)
            metrics[f"test_accuracy_{size}px"] = {k: round(v, 5) for k, v in accuracy(judge, images, labels).items()}
        metrics["test_images"] = {"n": test_n, "seed": synthetic.TEST_SEED}
        source = (f"synthetic renders, seed {JUDGE_SEED}, each attribute on with probability 0.5, blur/noise/contrast "
                  "augmentation")
        extra = {"image_sizes": [64, 128]}
    training = {"data": source, "steps": steps, "batch_size": batch, **extra,
                "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                "minutes": round(minutes, 2)}
    card = save(judge, out, training=training, metrics=metrics)
    log.info("judge: %s", json.dumps(metrics))
    return card
