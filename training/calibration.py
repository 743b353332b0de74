"""The images a model card's out-of-domain calibration is measured on, and `calibrate_checkpoint`, which writes it.

The images come from the card's own training data record (`card["training"]["data"]`, what the source's
`describe()` wrote): for the synthetic benchmark, faces of the training seed rendered at the model's size, a block
of domain a, one of domain b and one with neither attribute (three sets of people); for CelebA or two folders, a
deterministic sample of the same files, preprocessed as training preprocessed them; for a digit pair, a sample of
each domain's train split (`training.digits.labelled`). The sample is a function of the record and n alone, so
re-calibrating a checkpoint gives the same numbers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from models import calibration, checkpoint
from models.calibration import Calibration

DEFAULT_N = 2000


def _split(n: int, parts: int) -> list[int]:
    """n as `parts` whole counts differing by at most one, the larger first."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def synthetic_images(data: dict[str, Any], n: int, image_size: int, batch_size: int = 256,
                     device: str | torch.device = "cpu") -> tuple[dict[str, Any], Iterator[torch.Tensor]]:
    """(record, batches) of n faces of the record's pair and seed: indices [0, k) of domain a, [k, 2k) of domain b
    and [2k, 3k) with neither attribute, k about n / 3."""
    from .synthetic import ATTRIBUTES, pair_domain, render, sample_faces

    pair, seed = data["pair"], int(data["seed"])
    groups = {"a": pair_domain(pair, "a"), "b": pair_domain(pair, "b"), "neither": dict.fromkeys(ATTRIBUTES, False)}
    blocks, start = {}, 0
    for name, count in zip(groups, _split(n, len(groups))):
        blocks[name] = (start, start + count)
        start += count
    record = {"kind": "synthetic", "pair": pair, "seed": seed, "image_size": image_size,
              "indices": {name: list(block) for name, block in blocks.items()}}

    def batches() -> Iterator[torch.Tensor]:
        for name, (lo, hi) in blocks.items():
            for idx in _chunks(list(range(lo, hi)), batch_size):
                yield render(sample_faces(idx, seed, groups[name], device=device), image_size)

    return record, batches()


def file_images(data: dict[str, Any], n: int, image_size: int, batch_size: int = 256,
                device: str | torch.device = "cpu") -> tuple[dict[str, Any], Iterator[torch.Tensor]]:
    """(record, batches) of about n images of a CelebA or folders record, half per domain, evenly spaced over each
    domain's files in their order (CelebA: attribute-file order; folders: sorted paths), unflipped."""
    from .data import CelebAPairs, ImageFolderPairs

    if data["kind"] == "celeba":
        source = CelebAPairs(data["root"], data["pair"], image_size=image_size, split=data["split"])
    else:
        source = ImageFolderPairs(*(data["dirs"][name] for name in data["domains"]), image_size=image_size)
    keys = []
    for domain, (files, k) in enumerate(zip(source.paths, _split(n, 2))):
        k = min(k, len(files))
        keys += [(domain, i * len(files) // k) for i in range(k)]
    record = {"kind": data["kind"], "domains": list(source.domains), "image_size": image_size,
              "sample": "per domain, evenly spaced over its files in order",
              "per_domain": {name: sum(d == i for d, _ in keys) for i, name in enumerate(source.domains)}}
    if data["kind"] == "celeba":
        record.update(pair=data["pair"], split=data["split"])

    def batches() -> Iterator[torch.Tensor]:
        for chunk in _chunks(keys, batch_size):
            yield torch.stack([source.image(d, i) for d, i in chunk]).to(device)

    return record, batches()


def digit_images(data: dict[str, Any], n: int, image_size: int, batch_size: int = 256,
                 device: str | torch.device = "cpu") -> tuple[dict[str, Any], Iterator[torch.Tensor]]:
    """(record, batches) of about n digits of a digits record, half per domain: `labelled(domain, "train", n=k)`
    of seed 0 (SynDigits: its train images 0 ... k-1), at most the whole split."""
    from .digits import IMAGE_SIZE, labelled

    if image_size != IMAGE_SIZE:
        raise ValueError(f"a digits model is {IMAGE_SIZE} px, not {image_size}")
    root = data.get("root") or None
    sizes = data.get("counts", {})
    per_domain = {}
    for domain, k in zip(data["domains"], _split(n, 2)):
        held = sizes.get(domain)
        per_domain[domain] = min(k, held) if isinstance(held, int) else k
    record = {"kind": "digits", "pair": data["pair"], "domains": list(data["domains"]), "root": root,
              "image_size": image_size, "sample": "per domain, labelled(domain, 'train', n, seed 0)",
              "per_domain": per_domain}

    def batches() -> Iterator[torch.Tensor]:
        for domain, k in per_domain.items():
            images, _ = labelled(domain, "train", n=k, root=root)
            for i in range(0, k, batch_size):
                yield images[i:i + batch_size].to(device)

    return record, batches()


def card_images(card: dict[str, Any], n: int = DEFAULT_N, batch_size: int = 256,
                device: str | torch.device = "cpu") -> tuple[dict[str, Any], Iterator[torch.Tensor]]:
    """(record, batches) of the calibration images of a card: about n images like its training data, at the
    model's image size, each batch (<= batch_size, 3, S, S) in [-1, 1] on `device`."""
    if n < 2 or batch_size < 1:
        raise ValueError(f"a calibration needs n >= 2 and batch size >= 1, not {n} and {batch_size}")
    data = card.get("training", {}).get("data", {})
    size = int(card["config"]["image_size"])
    if data.get("kind") == "synthetic":
        return synthetic_images(data, n, size, batch_size, device)
    if data.get("kind") in ("celeba", "folders"):
        return file_images(data, n, size, batch_size, device)
    if data.get("kind") == "digits":
        return digit_images(data, n, size, batch_size, device)
    raise ValueError(f"model card {card.get('name')!r} has no training data record to calibrate on "
                     f"(training.data.kind: {data.get('kind')!r})")


def calibrate_checkpoint(path: str | Path, n: int = DEFAULT_N, batch_size: int = 256,
                         device: str | torch.device = "cpu") -> tuple[Path, Calibration]:
    """Measure the calibration of the checkpoint at `path` (in float32 on `device`) on its card's training data
    and write it into the card; returns (the card's path, the calibration)."""
    model = checkpoint.load(path, device=device)
    record, batches = card_images(model.card, n, batch_size, device)
    result = calibration.calibrate(model, batches, record)
    return calibration.write(path, result), result
