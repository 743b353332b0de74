"""Real-data sources: CelebA pair rules and splits, image folders, broken files, resume exactness, DDP sharding."""
from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app import imaging
from models import images
from models.images import fit, to_tensor
from tests.celeba_fixture import PAIRS, make_celeba
from tests.conftest import draw_face
from training.data import (
    CELEBA_PAIRS,
    CelebAPairs,
    ImageFolderPairs,
    PairSource,
    StepSampler,
    celeba_split,
    load_image,
    read_attributes,
)

S = 64


@pytest.fixture(scope="module")
def celeba(tmp_path_factory) -> dict:
    return make_celeba(tmp_path_factory.mktemp("celeba"), corrupt=2)


def _write_folder(folder: Path, n: int, seed: int) -> None:
    """n RGB images of random blocks, alternating PNG and JPEG."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)).resize((80, 100))
        img.save(folder / f"{i:02d}.{'png' if i % 2 else 'jpg'}")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """Domain a: one image of every awkward mode plus a fake; domain b: seven plain images."""
    root = tmp_path_factory.mktemp("folders")
    a, b = root / "glasses", root / "smile"
    _write_folder(a, 3, seed=1)
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (90, 70), dtype=np.uint8), "L").save(a / "gray.png")
    Image.fromarray(rng.integers(0, 256, (70, 90, 4), dtype=np.uint8), "RGBA").save(a / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)).quantize(16).save(a / "palette.png")
    (a / "nested").mkdir()
    Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)).save(a / "nested" / "UPPER.JPG")
    (a / "fake.png").write_text("not an image at all")
    (a / "notes.txt").write_text("ignored: not an image extension")
    _write_folder(b, 7, seed=3)
    return a, b


def _take(it, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(itertools.islice(it, n))


# --- CelebA rules and splits -----------------------------------------------------------------------------------


def test_pairs_have_the_benchmark_names():
    assert tuple(CELEBA_PAIRS) == PAIRS
    assert [(p.a, p.b) for p in CELEBA_PAIRS.values()] == [("smile", "glasses"), ("beard", "smile"), ("beard", "glasses")]


@pytest.mark.parametrize("pair", PAIRS)
def test_celeba_split_function(celeba, pair):
    got = celeba_split(read_attributes(celeba["root"] / "list_attr_celeba.txt"), pair)
    assert got == celeba["expected"][pair]["all"]


@pytest.mark.parametrize("split", ["train", "val", "test", "all"])
@pytest.mark.parametrize("pair", PAIRS)
def test_celeba_source_splits(celeba, pair, split):
    src = CelebAPairs(celeba["root"], pair, image_size=S, split=split)
    assert isinstance(src, PairSource)
    assert src.domains == (CELEBA_PAIRS[pair].a, CELEBA_PAIRS[pair].b)
    names = tuple([Path(p).name for p in paths] for paths in src.paths)
    assert names == celeba["expected"][pair][split]
    card = src.describe()
    assert card["counts"] == {src.domains[0]: len(names[0]), src.domains[1]: len(names[1])}
    assert card["partition_file"] and card["missing"] == 0


def test_no_partition_means_all_train(tmp_path, caplog):
    info = make_celeba(tmp_path, n=33, seed=5, with_partition=False, corrupt=0)
    with caplog.at_level(logging.WARNING, logger="did.data"):
        src = CelebAPairs(tmp_path, "beard_glasses", image_size=S)
    assert "list_eval_partition.txt" in caplog.text
    assert tuple([Path(p).name for p in paths] for paths in src.paths) == info["expected"]["beard_glasses"]["all"]
    assert not src.describe()["partition_file"]
    with pytest.raises(ValueError, match="beard_glasses.*val"):
        CelebAPairs(tmp_path, "beard_glasses", split="val")


def test_missing_files_are_counted(tmp_path):
    info = make_celeba(tmp_path, corrupt=0)
    gone = info["expected"]["smile_glasses"]["train"][1][0]
    (tmp_path / "img_align_celeba" / gone).unlink()
    src = CelebAPairs(tmp_path, "smile_glasses", image_size=S)
    assert src.describe()["missing"] == 1
    assert gone not in [Path(p).name for p in src.paths[1]]


def test_bad_arguments(celeba, tmp_path):
    with pytest.raises(ValueError, match="unknown CelebA pair"):
        CelebAPairs(celeba["root"], "hat_glasses")
    with pytest.raises(ValueError, match="split"):
        CelebAPairs(celeba["root"], "smile_glasses", split="training")
    with pytest.raises(FileNotFoundError, match="list_attr_celeba.txt"):
        CelebAPairs(tmp_path, "smile_glasses")


# --- unreadable files --------------------------------------------------------------------------------------------


def test_celeba_corrupt_files_are_skipped_and_counted(celeba, caplog):
    src = CelebAPairs(celeba["root"], "smile_glasses", image_size=S)
    whole_epoch = max(map(len, src.paths))  # one step of this size visits every file of both domains
    with caplog.at_level(logging.WARNING, logger="did.data"):
        a, b = next(src.batches(whole_epoch, num_workers=0))
    assert a.shape == b.shape == (whole_epoch, 3, S, S)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert sum(src.describe()["skipped"].values()) == len(celeba["corrupt"]) == 2
    assert all(name in caplog.text for name in celeba["corrupt"])


def test_folder_source_handles_modes_and_fakes(folders, caplog):
    with caplog.at_level(logging.WARNING, logger="did.data"):
        src = ImageFolderPairs(*folders, image_size=S)
    assert "skipped 1 unreadable images" in caplog.text
    assert src.domains == ("glasses", "smile")
    card = src.describe()
    assert card["counts"] == {"glasses": 7, "smile": 7} and card["skipped"] == {"glasses": 1, "smile": 0}
    a, b = next(src.batches(5, num_workers=0))
    for x in (a, b):
        assert x.shape == (5, 3, S, S) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
    gray = src.image("glasses", [Path(p).name for p in src.paths[0]].index("gray.png"))
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_folder_without_usable_images_names_it(tmp_path, folders):
    empty = tmp_path / "broken"
    empty.mkdir()
    (empty / "x.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match="no usable images in .*broken"):
        ImageFolderPairs(empty, folders[1])


# --- sampling ----------------------------------------------------------------------------------------------------


def _sources(celeba, folders):
    return [CelebAPairs(celeba["root"], "beard_smile", image_size=S, hflip=True),
            ImageFolderPairs(*folders, image_size=S, hflip=True)]


def test_resume_is_exact(celeba, folders):
    for src in _sources(celeba, folders):
        first = _take(src.batches(3, seed=7, num_workers=0), 4)  # batch 3 over 7-8 files: crosses epochs
        resumed = next(src.batches(3, seed=7, start_step=3, num_workers=0))
        assert torch.equal(resumed[0], first[3][0]) and torch.equal(resumed[1], first[3][1])
        other_seed = next(src.batches(3, seed=8, start_step=3, num_workers=0))
        assert not torch.equal(other_seed[0], first[3][0])


def test_workers_give_the_same_batches(folders):
    src = ImageFolderPairs(*folders, image_size=S)
    inline = _take(src.batches(4, seed=1, num_workers=0), 2)
    workers = _take(src.batches(4, seed=1, num_workers=2), 2)
    for (a0, b0), (a1, b1) in zip(inline, workers):
        assert torch.equal(a0, a1) and torch.equal(b0, b1)


def test_ranks_get_disjoint_samples(celeba, folders):
    for src in _sources(celeba, folders):
        bs = min(map(len, src.paths)) // 2
        r0 = next(src.batches(bs, seed=3, rank=0, world_size=2, num_workers=0))
        r1 = next(src.batches(bs, seed=3, rank=1, world_size=2, num_workers=0))
        for x0, x1 in zip(r0, r1):
            # compare flip-invariant fingerprints: the same file may come out mirrored
            f0 = {tuple(torch.sort(x.sum(-1).flatten()).values.tolist()) for x in x0}
            f1 = {tuple(torch.sort(x.sum(-1).flatten()).values.tolist()) for x in x1}
            assert len(f0) == bs and not f0 & f1


def test_sampler_covers_each_epoch_once_across_ranks():
    n, bs, ws = 12, 3, 2  # one epoch = 2 steps of 2 ranks x 3
    for domain in (0, 1):
        seen = [k[1] for t in range(2) for r in range(ws)
                for k in StepSampler((n, n), bs, seed=4, rank=r, world_size=ws).keys(t) if k[0] == domain]
        assert sorted(seen) == list(range(n))
    a = StepSampler((n, n), bs, seed=4).keys(0)
    assert [k[1] for k in a[:bs]] != [k[1] for k in a[bs:]]  # the two domains are shuffled independently


# --- preprocessing -----------------------------------------------------------------------------------------------


def _red_border(width: int, height: int) -> Image.Image:
    """Blue-green inside the central 178 x 178 square, pure red outside it."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[...] = (255, 0, 0)
    top, left = (height - 178) // 2, (width - 178) // 2
    arr[top : top + 178, left : left + 178] = (20, 150, 200)
    return Image.fromarray(arr)


def _has_red(x: torch.Tensor) -> bool:
    r, g, b = x.add(1).mul(127.5)
    return bool(((r > 150) & (g < 100) & (b < 100)).any())


@pytest.mark.parametrize("size", [(178, 218), (218, 258)])
def test_celeba_center_crop_178(tmp_path, size):
    info = make_celeba(tmp_path, corrupt=0)
    name = info["expected"]["smile_glasses"]["train"][0][0]
    path = tmp_path / "img_align_celeba" / name
    _red_border(*size).save(path, quality=95, subsampling=0)
    assert _has_red(to_tensor(fit(Image.open(path), S))) == (size != (178, 218))  # the test can see red
    src = CelebAPairs(tmp_path, "smile_glasses", image_size=S)
    x = src.image(0, 0)
    assert x.shape == (3, S, S) and not _has_red(x)


# --- decoding: one loader for training and serving ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_reaches_training_as_the_service_decodes_it(tmp_path, fmt):
    """A photo stored landscape with Orientation 6 (display rotated 90 degrees clockwise) trains upright, with the
    very pixels the service decodes from the same bytes."""
    face = draw_face(1, (96, 64))  # under twice S on each side, so the service's JPEG draft mode does not scale
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged, upright, plain = (tmp_path / f"{name}.{fmt.lower()}" for name in ("tagged", "upright", "plain"))
    face.save(tagged, fmt, exif=exif)
    face.transpose(Image.Transpose.ROTATE_270).save(upright, fmt)
    face.save(plain, fmt)
    for mode in ("crop", "pad"):
        x = to_tensor(load_image(tagged, S, mode))
        assert torch.equal(x, imaging.decode(tagged.read_bytes(), "x", S, mode)), mode
    x, up, flat = (to_tensor(load_image(p, S, "pad")) for p in (tagged, upright, plain))
    if fmt == "PNG":
        assert torch.equal(x, up)
    assert (x - up).abs().mean() < 0.05 < (x - flat).abs().mean()  # JPEG: its blocks fall elsewhere once rotated


def test_malformed_exif_keeps_the_stored_pixels(tmp_path, monkeypatch):
    path = tmp_path / "face.png"
    draw_face(2, (96, 64)).save(path)
    expected = to_tensor(load_image(path, S, "pad"))

    def broken(*args, **kwargs):
        raise SyntaxError("bad EXIF")

    monkeypatch.setattr(images.ImageOps, "exif_transpose", broken)
    assert torch.equal(to_tensor(load_image(path, S, "pad")), expected)
    assert torch.equal(imaging.decode(path.read_bytes(), "x", S, "pad"), expected)
