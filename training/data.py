"""Real-image training sources: any two image folders, or a CelebA attribute pair (the digit pairs live in
training/digits.py).

Both implement `PairSource`, the only thing the training loop reads. Their batches are resume-exact: the batch of
global step t on rank r is a pure function of (seed, t, r, world_size), computed directly (`StepSampler`), so a
run restarted at step k sees exactly what an uninterrupted run saw, and DDP ranks never share a sample within an
epoch. Decoding happens in DataLoader workers; a file that does not decode is skipped, counted and logged, never
a crash. Pixels go through `models.images`, the same conversions the service and the evaluation use.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Protocol, runtime_checkable

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from models.framing import CELEBA_CROP, Framing
from models.images import Fit, center_crop, fit as fit_image, load_rgb, to_tensor

log = logging.getLogger("did.data")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
CELEBA_SPLITS = {"train": 0, "val": 1, "test": 2}

Key = tuple[int, int, bool]  # (domain 0/1, index into that domain's files, horizontal flip)


@runtime_checkable
class PairSource(Protocol):
    """Endless batches of (domain a, domain b) images; what the training loop consumes."""

    domains: tuple[str, str]
    image_size: int
    framing: Framing  # where its images put a face; the checkpoint's card records it (models.framing)

    def describe(self) -> dict: ...

    def batches(self, batch_size: int, *, seed: int = 0, start_step: int = 0, rank: int = 0, world_size: int = 1,
                device: str | torch.device = "cpu",
                num_workers: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


# ---------------------------------------------------------------------------------------------------------------
# Sampling: which files make up step t on rank r


def _epoch_seed(seed: int, domain: int, epoch: int) -> int:
    """A stable 63-bit seed per (run seed, domain, epoch); Python's hash() is salted per process, so not that."""
    digest = hashlib.blake2b(f"{seed}/{domain}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@lru_cache(maxsize=8)
def _epoch_order(seed: int, domain: int, epoch: int, n: int) -> tuple[list[int], list[bool]]:
    """The shuffled order of one domain for one epoch, and a coin per slot for horizontal flips."""
    g = torch.Generator().manual_seed(_epoch_seed(seed, domain, epoch))
    perm = torch.randperm(n, generator=g).tolist()
    flips = torch.randint(0, 2, (n,), generator=g).bool().tolist()
    return perm, flips


def stream_slot(seed: int, domain: int, pos: int, n: int) -> tuple[int, bool]:
    """Position `pos` of domain `domain`'s endless stream over `n` items: (item index, horizontal-flip coin). The
    stream is the concatenation of one shuffled order per epoch (epoch pos // n), each a function of (seed, domain,
    epoch) alone, so every position is computed directly."""
    epoch, slot = divmod(pos, n)
    perm, flips = _epoch_order(seed, domain, epoch, n)
    return perm[slot], flips[slot]


class StepSampler:
    """A DataLoader batch_sampler: for each step from `start_step` on, forever, the keys of this rank's batch.

    A batch is `batch_size` keys of domain 0 followed by `batch_size` keys of domain 1. Sample j of rank r at step t
    sits at position pos = (t * world_size + r) * batch_size + j of each domain's endless stream; its epoch is
    pos // n and its file is that epoch's permutation at pos % n. Any step is computed without replaying the ones
    before it, and within an epoch every position, hence every file, belongs to one rank only.
    """

    def __init__(self, sizes: tuple[int, int], batch_size: int, *, seed: int = 0, start_step: int = 0, rank: int = 0,
                 world_size: int = 1, hflip: bool = False):
        if batch_size < 1 or start_step < 0 or not 0 <= rank < world_size or min(sizes) < 1:
            raise ValueError(f"bad sampler arguments: sizes={sizes} batch_size={batch_size} "
                             f"start_step={start_step} rank={rank} world_size={world_size}")
        self.sizes, self.batch_size, self.seed, self.hflip = sizes, batch_size, seed, hflip
        self.start_step, self.rank, self.world_size = start_step, rank, world_size

    def keys(self, step: int) -> list[Key]:
        first = (step * self.world_size + self.rank) * self.batch_size
        keys = []
        for domain, n in enumerate(self.sizes):
            for pos in range(first, first + self.batch_size):
                index, flip = stream_slot(self.seed, domain, pos, n)
                keys.append((domain, index, self.hflip and flip))
        return keys

    def __iter__(self) -> Iterator[list[Key]]:
        return map(self.keys, itertools.count(self.start_step))


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def load_image(path: str | Path, size: int, fit: Fit = "crop", pre_crop: int | None = None) -> Image.Image:
    """Open, decode as the service does (`models.images.load_rgb`: first frame, EXIF orientation, RGB) and
    preprocess one file to a `size` x `size` RGB image; raises if the file is broken.

    `pre_crop` takes the central square of that side first (CelebA's 178), then `fit` squares and resizes.
    """
    with Image.open(path) as img:
        img = load_rgb(img)  # decoded inside the `with`, which closes the file (and invalidates `img`) on leaving
        if pre_crop:
            img = center_crop(img, pre_crop)
        return fit_image(img, size, fit)


class _Decode(Dataset):
    """Turns `StepSampler` keys into tensors inside the DataLoader's workers.

    A file that fails to decode is replaced by the next file of the same domain (in file order), so the batch stays
    a pure function of the step; the broken path travels back to the main process to be counted.
    """

    def __init__(self, paths: tuple[list[str], list[str]], size: int, fit: Fit, pre_crop: int | None):
        self.paths, self.size, self.fit, self.pre_crop = paths, size, fit, pre_crop

    def __len__(self) -> int:
        return sum(map(len, self.paths))

    def __getitem__(self, key: Key) -> tuple[int, torch.Tensor, list[tuple[int, str]]]:
        domain, index, flip = key
        files, broken = self.paths[domain], []
        for k in range(len(files)):
            path = files[(index + k) % len(files)]
            try:
                img = load_image(path, self.size, self.fit, self.pre_crop)
                break
            except Exception:  # noqa: BLE001 - Pillow signals a broken file with many exception types
                broken.append((domain, path))
        else:
            raise RuntimeError(f"none of the {len(files)} files of domain {domain} decodes")
        x = to_tensor(img)  # (3, S, S) in [-1, 1]
        return domain, x.flip(-1) if flip else x, broken


def _collate(items: list[tuple[int, torch.Tensor, list]]) -> tuple[torch.Tensor, torch.Tensor, list]:
    a = torch.stack([x for domain, x, _ in items if domain == 0])
    b = torch.stack([x for domain, x, _ in items if domain == 1])
    return a, b, [bad for *_, broken in items for bad in broken]


class _FilePairs:
    """What both real sources share: two lists of files, decoded in workers, served as resume-exact batches."""

    def __init__(self, domains: tuple[str, str], paths: tuple[list[str], list[str]], image_size: int, fit: Fit,
                 pre_crop: int | None, hflip: bool):
        self.domains, self.paths, self.image_size = domains, paths, image_size
        self.hflip = hflip
        self._decode = _Decode(paths, image_size, fit, pre_crop)
        self.unreadable: tuple[set[str], set[str]] = (set(), set())  # found while loading

    def image(self, domain: int | str, index: int) -> torch.Tensor:
        """One preprocessed image (3, S, S) in [-1, 1], for previews and evaluation (broken files substituted)."""
        d = self.domains.index(domain) if isinstance(domain, str) else domain
        _, x, broken = self._decode[(d, index, False)]
        self._count(broken)
        return x

    def batches(self, batch_size: int, *, seed: int = 0, start_step: int = 0, rank: int = 0, world_size: int = 1,
                device: str | torch.device = "cpu",
                num_workers: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless (a, b) batches, each (batch_size, 3, S, S) in [-1, 1] on `device`; see `StepSampler`."""
        device = torch.device(device)
        pin = device.type == "cuda" and torch.cuda.is_available()
        sampler = StepSampler(tuple(map(len, self.paths)), batch_size, seed=seed, start_step=start_step, rank=rank,
                              world_size=world_size, hflip=self.hflip)
        loader = DataLoader(self._decode, batch_sampler=sampler, num_workers=num_workers, collate_fn=_collate,
                            pin_memory=pin)
        for a, b, broken in loader:
            self._count(broken)
            yield a.to(device, non_blocking=pin), b.to(device, non_blocking=pin)

    def _count(self, broken: list[tuple[int, str]]) -> None:
        for domain, path in broken:
            if path not in self.unreadable[domain]:
                self.unreadable[domain].add(path)
                log.warning("skipped unreadable image %s (domain %s)", path, self.domains[domain])

    def _counts(self) -> dict[str, int]:
        return {name: len(files) for name, files in zip(self.domains, self.paths)}


# ---------------------------------------------------------------------------------------------------------------
# Two image folders


def list_images(folder: str | Path) -> list[Path]:
    """Every file under `folder` (recursively) with an image extension, any case, in a stable sorted order."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _readable(path: Path) -> bool:
    """A cheap check at construction: the header parses and Pillow's `verify()` passes (it does not decode)."""
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # noqa: BLE001 - any failure means the file cannot be used
        return False


class ImageFolderPairs(_FilePairs):
    """Domain a is every image under `dir_a`, domain b every image under `dir_b`; domains named after the folders.

    Files that fail the header check are skipped at construction (counted in `describe()`); files that pass it but
    fail to decode later are substituted at load time and counted too.
    """

    framing: Framing = "none"

    def __init__(self, dir_a: str | Path, dir_b: str | Path, image_size: int = 128, fit: Fit = "crop", *,
                 hflip: bool = False):
        dirs = (Path(dir_a), Path(dir_b))
        for folder in dirs:
            if not folder.is_dir():
                raise FileNotFoundError(f"image folder {folder} does not exist")
        if dirs[0].resolve() == dirs[1].resolve():
            raise ValueError(f"both domains are the same folder {dirs[0]}")
        names = tuple(d.resolve().name for d in dirs)
        if names[0] == names[1]:  # e.g. men/train and women/train: keep the parent to tell them apart
            names = tuple(f"{d.resolve().parent.name}_{d.resolve().name}" for d in dirs)

        self.dirs, self.fit = dirs, fit
        self.skipped: list[list[str]] = []
        paths = []
        with ThreadPoolExecutor(max_workers=8) as pool:
            for folder in dirs:
                files = list_images(folder)
                ok = list(pool.map(_readable, files))
                paths.append([str(f) for f, good in zip(files, ok) if good])
                self.skipped.append([str(f) for f, good in zip(files, ok) if not good])
                if self.skipped[-1]:
                    log.warning("skipped %d unreadable images in %s", len(self.skipped[-1]), folder)
                if not paths[-1]:
                    raise ValueError(f"no usable images in {folder}: {len(files)} files with an image extension "
                                     f"({', '.join(sorted(IMAGE_EXTENSIONS))}), {len(self.skipped[-1])} unreadable")
        super().__init__(names, (paths[0], paths[1]), image_size, fit, None, hflip)
        log.info("image folders: %s", self._counts())

    def describe(self) -> dict:
        return {
            "kind": "folders",
            "dirs": {name: str(d) for name, d in zip(self.domains, self.dirs)},
            "domains": list(self.domains),
            "counts": self._counts(),
            "skipped": {name: len(s) + len(u) for name, s, u in zip(self.domains, self.skipped, self.unreadable)},
            "image_size": self.image_size,
            "preprocess": f"center {self.fit} to {self.image_size} px, bicubic",
            "hflip": self.hflip,
        }


# ---------------------------------------------------------------------------------------------------------------
# CelebA


@dataclass(frozen=True)
class Trait:
    """One CelebA attribute as a domain sees it; `rule` is the readable form written into the model card."""

    rule: str
    test: Callable[[Mapping[str, int]], bool]


TRAITS: dict[str, Trait] = {
    "smile": Trait("Smiling", lambda r: r["Smiling"] == 1),
    "glasses": Trait("Eyeglasses", lambda r: r["Eyeglasses"] == 1),
    # As in the published preprocess.py: a goatee or a moustache counts as a beard, not only No_Beard == -1.
    "beard": Trait("(No_Beard == -1 or Goatee or Mustache)",
                   lambda r: r["No_Beard"] == -1 or r["Goatee"] == 1 or r["Mustache"] == 1),
}


@dataclass(frozen=True)
class CelebAPair:
    """Domain a has trait `a` and not trait `b`; domain b the reverse. Images with both or neither are unused.

    `men_only` restricts both domains to Male without 5_o_Clock_Shadow, as the published code does for the beard
    pairs (stubble is a beard the labels disagree about; women would make "no beard" trivially easy).
    """

    a: str
    b: str
    men_only: bool = False

    def rules(self) -> dict[str, str]:
        base = " and Male and not 5_o_Clock_Shadow" if self.men_only else ""
        ta, tb = TRAITS[self.a].rule, TRAITS[self.b].rule
        return {self.a: f"{ta} and not {tb}{base}", self.b: f"{tb} and not {ta}{base}"}


# Same names as the synthetic benchmark's pairs; domain a is the first word.
CELEBA_PAIRS: dict[str, CelebAPair] = {
    "smile_glasses": CelebAPair("smile", "glasses"),
    "beard_smile": CelebAPair("beard", "smile", men_only=True),
    "beard_glasses": CelebAPair("beard", "glasses", men_only=True),
}


def read_attributes(path: str | Path) -> Iterator[tuple[str, dict[str, int]]]:
    """Rows of `list_attr_celeba.txt`: (file name, {attribute: 1 or -1}). Line 1 is a count, line 2 the names."""
    with open(path) as f:
        f.readline()
        names = f.readline().split()
        for lineno, line in enumerate(f, start=3):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != len(names) + 1:
                raise ValueError(f"{path}:{lineno}: expected a file name and {len(names)} values, got {len(parts)}")
            yield parts[0], dict(zip(names, map(int, parts[1:])))


def read_partition(path: str | Path) -> dict[str, int]:
    """`list_eval_partition.txt`: file name -> 0 (train), 1 (val) or 2 (test)."""
    with open(path) as f:
        return {name: int(split) for name, split in (line.split() for line in f if line.strip())}


def celeba_split(attr_rows: Iterable[tuple[str, Mapping[str, int]]], pair: str) -> tuple[list[str], list[str]]:
    """File names of domain a and domain b of `pair` (a key of CELEBA_PAIRS), in the rows' order."""
    if pair not in CELEBA_PAIRS:
        raise ValueError(f"unknown CelebA pair {pair!r}; choose one of {', '.join(CELEBA_PAIRS)}")
    spec = CELEBA_PAIRS[pair]
    has_a, has_b = TRAITS[spec.a].test, TRAITS[spec.b].test
    a, b = [], []
    for name, attrs in attr_rows:
        try:
            if spec.men_only and not (attrs["Male"] == 1 and attrs["5_o_Clock_Shadow"] == -1):
                continue
            in_a, in_b = has_a(attrs), has_b(attrs)
        except KeyError as err:
            raise ValueError(f"CelebA attribute {err} missing (row {name})") from None
        if in_a and not in_b:
            a.append(name)
        elif in_b and not in_a:
            b.append(name)
    return a, b


class CelebAPairs(_FilePairs):
    """One of CELEBA_PAIRS from a CelebA root (`img_align_celeba/`, `list_attr_celeba.txt`, optionally
    `list_eval_partition.txt`), preprocessed as published: central 178 px square, bicubic resize to `image_size`.

    Only file existence is checked up front (200k files); broken files are substituted and counted at load time.
    Without a partition file every image is "train".
    """

    framing: Framing = "celeba"

    def __init__(self, root: str | Path, pair: str, image_size: int = 128, split: str = "train", *,
                 hflip: bool = False):
        if pair not in CELEBA_PAIRS:
            raise ValueError(f"unknown CelebA pair {pair!r}; choose one of {', '.join(CELEBA_PAIRS)}")
        if split not in (*CELEBA_SPLITS, "all"):
            raise ValueError(f"split must be one of train, val, test, all, not {split!r}")
        self.root, self.pair, self.split = Path(root), pair, split
        images, attr_file = self.root / "img_align_celeba", self.root / "list_attr_celeba.txt"
        lacking = [p.name for p in (images, attr_file) if not p.exists()]
        if lacking:
            raise FileNotFoundError(f"CelebA root {self.root} lacks {' and '.join(lacking)}")

        partition_file = self.root / "list_eval_partition.txt"
        self.has_partition = partition_file.exists()
        rows: Iterable[tuple[str, dict[str, int]]] = read_attributes(attr_file)
        if self.has_partition:
            partition = read_partition(partition_file)
            if split != "all":
                rows = (r for r in rows if partition.get(r[0]) == CELEBA_SPLITS[split])
        else:
            log.warning("no %s: every CelebA image counts as train", partition_file)
            if split in ("val", "test"):
                rows = ()
        names_a, names_b = celeba_split(rows, pair)

        present = set(os.listdir(images))
        self.missing = sum(name not in present for name in (*names_a, *names_b))
        if self.missing:
            log.warning("%d images listed in %s are missing from %s", self.missing, attr_file, images)
        paths = tuple([str(images / n) for n in names if n in present] for names in (names_a, names_b))
        spec = CELEBA_PAIRS[pair]
        for name, files in zip((spec.a, spec.b), paths):
            if not files:
                why = "" if self.has_partition or split in ("train", "all") else " (no list_eval_partition.txt)"
                raise ValueError(f"CelebA pair {pair}, split {split}: no usable images for domain {name!r}{why}")
        super().__init__((spec.a, spec.b), paths, image_size, "crop", CELEBA_CROP, hflip)
        log.info("CelebA %s/%s: %s", pair, split, self._counts())

    def describe(self) -> dict:
        return {
            "kind": "celeba",
            "root": str(self.root),
            "pair": self.pair,
            "split": self.split,
            "partition_file": self.has_partition,
            "domains": list(self.domains),
            "rules": CELEBA_PAIRS[self.pair].rules(),
            "counts": self._counts(),
            "missing": self.missing,
            "skipped": {name: len(u) for name, u in zip(self.domains, self.unreadable)},
            "image_size": self.image_size,
            "preprocess": f"center crop {CELEBA_CROP}, bicubic resize to {self.image_size}",
            "hflip": self.hflip,
        }
