"""models.framing: placements of the model's square in an upload, aligned crops, and edits pasted back."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from models import framing
from models.framing import MIN_WEIGHT, Placement, border, canonical_eyes, paste, region, sample, warp_mask
from models.images import fit, fit_box, to_tensor


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _smooth(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour field with some structure (sums of low-frequency waves): resampling it loses little."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    chans = []
    for _ in range(3):
        f = rng.uniform(1, 4, size=(3, 2))
        ph = rng.uniform(0, 2 * np.pi, size=3)
        chans.append(sum(np.sin(2 * np.pi * (f[i, 0] * x + f[i, 1] * y) + ph[i]) for i in range(3)))
    arr = np.stack(chans, -1)
    arr = (arr - arr.min()) / (arr.max() - arr.min()) * 235 + 10
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def _photo() -> Image.Image:
    data = pytest.importorskip("skimage.data")
    return Image.fromarray(data.astronaut())


ASTRONAUT_EYES = np.array([[203.0, 100.5], [247.5, 103.5]])  # her eye centres in skimage's astronaut, marked by hand


@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize("wh", [(200, 200), (300, 120), (90, 260)])
def test_fit_placement_is_what_fit_does(mode, wh):
    """Placement.fit maps the square onto the box fit keeps, and sampling through it gives fit's pixels."""
    w, h = wh
    src, dst = fit_box(w, h, 64, mode)
    p = Placement.fit(w, h, 64, mode)
    np.testing.assert_allclose(p.to_upload(np.array([dst[:2], dst[2:]], float)), np.array([src[:2], src[2:]], float), atol=1e-9)
    np.testing.assert_allclose(p.to_model(p.to_upload(np.array([[3.5, 7.25]]))), [[3.5, 7.25]], atol=1e-9)
    img = _smooth(w, h)
    x = sample(img, p)
    want = to_tensor(fit(img, 64, mode))
    if mode == "pad":  # sample repeats the upload's edge where fit letterboxes: compare the image's own box
        x, want = x[:, dst[1]:dst[3], dst[0]:dst[2]], want[:, dst[1]:dst[3], dst[0]:dst[2]]
        x, want = x[:, 1:-1, 1:-1], want[:, 1:-1, 1:-1]  # the box's edge pixels mix in fit's black bars
    assert _psnr(((x + 1) * 127.5).numpy(), ((want + 1) * 127.5).numpy()) > 38


def test_align_puts_the_canonical_eyes_on_the_found_ones():
    eyes = np.array([[120.0, 90.0], [170.0, 110.0]])  # tilted
    p = Placement.align(eyes, 400, 300, 128)
    np.testing.assert_allclose(p.to_upload(canonical_eyes("celeba", 128)), eyes, atol=1e-9)
    gap = np.linalg.norm(eyes[1] - eyes[0]) / np.linalg.norm(np.subtract(*canonical_eyes("celeba", 128)))
    assert p.scale == pytest.approx(gap)
    with pytest.raises(ValueError):
        Placement.align(np.array([[5.0, 5.0], [5.0, 5.0]]), 400, 300, 128)
    with pytest.raises(ValueError):
        canonical_eyes("synthetic", 64)


def test_canonical_eyes_follow_the_published_celeba_crop():
    """img_align_celeba's eye template, with its central 178 px square (20 px off the top) resized to S."""
    eyes = canonical_eyes("celeba", 178)
    np.testing.assert_allclose(eyes, [[69.5, 91.5], [108.5, 91.5]])
    np.testing.assert_allclose(canonical_eyes("celeba", 64), eyes * 64 / 178)


def test_aligned_crop_does_not_depend_on_the_photo_s_rotation():
    """Rotating a photo and its eyes by 25 degrees gives the same aligned crop."""
    img = _photo()
    base = sample(img, Placement.align(ASTRONAUT_EYES, img.width, img.height, 64))
    angle = math.radians(25)
    turned = img.rotate(25, resample=Image.Resampling.BICUBIC, expand=True)
    c_old, c_new = np.array(img.size) / 2, np.array(turned.size) / 2
    rot = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])  # PIL turns counter-clockwise
    eyes = (ASTRONAUT_EYES - c_old) @ rot.T + c_new
    again = sample(turned, Placement.align(eyes, turned.width, turned.height, 64))
    inner = (slice(None), slice(8, 56), slice(8, 56))  # the crop's corners reach past the photo's top edge
    assert _psnr(((base[inner] + 1) * 127.5).numpy(), ((again[inner] + 1) * 127.5).numpy()) > 30


def test_shrinking_is_antialiased():
    """A fine stripe pattern shrunk 8x averages to grey instead of aliasing into coarse stripes."""
    stripes = np.zeros((512, 512, 3), np.uint8)
    stripes[:, ::2] = 255
    x = sample(Image.fromarray(stripes), Placement.fit(512, 512, 64))
    assert float(x.std()) < 0.05 and abs(float(x.mean())) < 0.05


def test_aligned_round_trip_reproduces_the_face_and_keeps_the_rest():
    """An aligned crop pasted back unchanged reproduces the photo where it is pasted (40 dB or better at a
    resolution near the face's own) and leaves every pixel the weight does not reach exactly as it was."""
    img = _photo()
    p = Placement.align(ASTRONAUT_EYES, img.width, img.height, 256)
    weight = region("celeba", 256) * border(256)
    out = paste(img, sample(img, p), weight, p)
    assert out.size == img.size
    a, b = np.asarray(img), np.asarray(out)
    w = warp_mask(weight, p)
    assert _psnr(a[w > 0.99], b[w > 0.99]) >= 40
    untouched = w < MIN_WEIGHT
    assert untouched.mean() > 0.5
    np.testing.assert_array_equal(a[untouched], b[untouched])


def test_paste_changes_only_what_the_weight_reaches():
    img = _smooth(300, 180)
    p = Placement.fit(img.width, img.height, 64, "pad")
    black = -torch.ones(3, 64, 64)
    assert np.array_equal(np.asarray(paste(img, black, torch.zeros(64, 64), p)), np.asarray(img))
    spot = torch.zeros(64, 64)
    spot[20:30, 30:40] = 1.0
    out = np.asarray(paste(img, black, spot, p))
    changed = (out != np.asarray(img)).any(-1)
    reach = warp_mask(spot, p) >= MIN_WEIGHT
    assert changed.any() and not (changed & ~reach).any()
    full = warp_mask(spot, p) > 0.999
    assert (out[full] <= 1).all()  # fully weighted pixels are the edit's (black)


def test_regions_are_soft_and_inside_the_square():
    for name in framing.FRAMINGS:
        r = region(name, 64)
        assert r.shape == (64, 64) and 0 <= float(r.min()) and float(r.max()) == 1.0
    syn = region("synthetic", 64)
    assert float(syn[32, 32]) == 1.0 and float(syn[0, 0]) == 0.0
    assert 0 < float(syn[32, 8]) < 1 or 0 < float(syn[32, 9]) < 1  # a feathered edge, not a cut
    b = border(64)
    assert float(b[0, 32]) < 0.2 and float(b[32, 32]) == 1.0


def test_framing_of_cards(tmp_path):
    from models import Disentangler, ModelConfig, checkpoint

    assert framing.framing_of({}) == "none"
    assert framing.framing_of({"framing": "celeba"}) == "celeba"
    with pytest.raises(ValueError):
        framing.framing_of({"framing": "portrait"})
    model = Disentangler(ModelConfig(image_size=64, base_width=4, max_width=8, code_channels=8, sep_channels=2, disc_hidden=8))
    card = checkpoint.save(model, tmp_path / "m", framing="celeba")
    assert framing.framing_of(checkpoint.read_card(card)) == "celeba"
    with pytest.raises(ValueError):
        checkpoint.save(model, tmp_path / "n", framing="portrait")
