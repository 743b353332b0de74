"""Answers at the upload's own size (output=full), and the aligned path of models trained on aligned faces (framing
celeba): the face found, aligned on its eyes, edited, pasted back into the full-resolution photo."""
from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import models
from models import Disentangler, preset
from models.framing import MIN_WEIGHT, Placement, border, region, warp_mask

from .conftest import SERVICE_DOMAINS, encode_image
from .test_service import assert_problem

REPO = Path(__file__).resolve().parents[1]
skimage_data = pytest.importorskip("skimage.data")


def post(client, path: str, files: dict[str, bytes], **data):
    return client.post(path, files={k: (f"{k}.png", v, "image/png") for k, v in files.items()},
                       data={k: str(v) for k, v in data.items()})


def pixels(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def rendered(pair: str, domain: str, index: int, size: int) -> Image.Image:
    from training.synthetic import render_domain

    x = render_domain(pair, domain, [index], size=size, seed=7919)[0]
    return Image.fromarray(((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def bundled_mask(tmp_path_factory) -> Path:
    """A weights directory with the bundled smile_glasses_mask alone (its trained masks mark real regions)."""
    root = tmp_path_factory.mktemp("bundled_mask")
    for ext in ("json", "safetensors"):
        (root / f"smile_glasses_mask.{ext}").symlink_to(REPO / "weights" / f"smile_glasses_mask.{ext}")
    return root


@pytest.fixture(scope="module")
def celeba_weights(tmp_path_factory) -> Path:
    """A tiny random plain model and a tiny mask model whose cards say they were trained on aligned CelebA faces."""
    root = tmp_path_factory.mktemp("celeba_weights")
    for name, seed, variant in (("aligned", 0, "plain"), ("aligned_mask", 1, "mask")):
        torch.manual_seed(seed)
        cfg = preset("tiny", image_size=64, domain_a=SERVICE_DOMAINS[0], domain_b=SERVICE_DOMAINS[1], variant=variant)
        models.save(Disentangler(cfg), root / name, framing="celeba")
    return root


@pytest.mark.parametrize("shape,fit", [((1024, 1024), "crop"), ((1280, 1024), "pad"), ((1024, 1280), "crop")])
def test_mask_model_full_answer_changes_only_the_mask(make_service, bundled_mask, shape, fit):
    """A 256 px rendered face uploaded at 1024 px and more: the answer has the upload's size and aspect, and only
    pixels inside the model's upsampled mask differ from the upload."""
    face = rendered("smile_glasses", "b", 3, 256).resize((1024, 1024), Image.Resampling.BICUBIC)
    upload = Image.new("RGB", shape, (90, 120, 160))
    upload.paste(face, ((shape[0] - 1024) // 2, (shape[1] - 1024) // 2))
    guide = rendered("smile_glasses", "a", 5, 64)
    client = make_service(weights=bundled_mask)
    r = post(client, "/transfer", {"content": encode_image(upload), "guide": encode_image(guide)}, target="smile",
             include_mask="true", format="json", fit=fit)
    assert r.status_code == 200, r.text
    j = r.json()
    assert (j["width"], j["height"]) == shape and j["meta"]["output"] == "full" and r.headers["x-output"] == "full"
    got = pixels(base64.b64decode(j["image"]))
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(j["mask"]["image"]))))
    assert got.shape == (shape[1], shape[0], 3) and mask.shape == (shape[1], shape[0])
    changed = (got != np.asarray(upload)).any(-1)
    assert changed.any() and 0 < changed.mean() < 0.3
    assert not (changed & (mask == 0)).any()  # every changed pixel lies inside the mask


def test_plain_model_full_answer_keeps_what_the_square_does_not_cover(service):
    """fit=crop on a wide upload: the central square is edited, the strips beside it are the upload's bytes."""
    from .conftest import draw_face

    upload = draw_face(3, (150, 90))
    r = post(service, "/remove-attribute", {"image": encode_image(upload)}, attribute="both")
    assert r.status_code == 200 and r.headers["x-output"] == "full"
    got, orig = pixels(r.content), np.asarray(upload)
    assert got.shape == orig.shape
    np.testing.assert_array_equal(got[:, :30], orig[:, :30])
    np.testing.assert_array_equal(got[:, 120:], orig[:, 120:])
    assert (got[:, 40:110] != orig[:, 40:110]).any()
    # size= still scales the model's square; with output=full it is refused
    r = post(service, "/remove-attribute", {"image": encode_image(upload)}, size=128)
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (128, 128)
    assert_problem(post(service, "/remove-attribute", {"image": encode_image(upload)}, size=128, output="full"), 400)
    r = post(service, "/remove-attribute", {"image": encode_image(upload)}, output="model")
    assert Image.open(io.BytesIO(r.content)).size == (64, 64) and r.headers["x-output"] == "model"


def test_face_choice_needs_an_aligned_model(service):
    upload = encode_image(rendered("smile_glasses", "a", 1, 64))
    body = assert_problem(post(service, "/remove-attribute", {"image": upload}, face="1"), 400)
    assert "aligned" in body["detail"]
    assert_problem(post(service, "/remove-attribute", {"image": upload}, face="middle"), 422)


@pytest.fixture
def aligned(make_service, celeba_weights):
    return make_service(weights=celeba_weights)


def _astronaut() -> Image.Image:
    return Image.fromarray(skimage_data.astronaut())


def test_aligned_edit_of_a_photo_end_to_end(aligned):
    """The whole aligned path of a celeba-framed model: /faces finds the face; /remove-attribute aligns it, edits it
    and pastes it back into the 512 px photo; only the face region changes."""
    photo = _astronaut()
    data = encode_image(photo)
    found = post(aligned, "/faces", {"image": data}).json()["faces"]
    assert len(found) == 1
    r = post(aligned, "/remove-attribute", {"image": data}, model="aligned", attribute="both")
    assert r.status_code == 200, r.text
    assert r.headers["x-faces"] == "1" and r.headers["x-faces-edited"] == "1"
    got, orig = pixels(r.content), np.asarray(photo)
    assert got.shape == orig.shape
    from app.faces import detect

    face = detect(photo)[0]
    p = Placement.align(face.eyes(), photo.width, photo.height, 64)
    reach = warp_mask(region("celeba", 64) * border(64), p)
    changed = (got != orig).any(-1)
    assert changed[reach > 0.5].mean() > 0.5  # the face is edited
    assert not (changed & (reach < MIN_WEIGHT)).any()  # nothing else
    x0, y0, x1, y1 = found[0]["box"]
    assert not changed[:, : int(x0) - 60].any() and not changed[int(y1) + 80 :].any()
    # the model's own square, aligned
    r = post(aligned, "/remove-attribute", {"image": data}, model="aligned", output="model")
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (64, 64)


def test_aligned_mask_model_segments_and_transfers_at_the_photo_s_size(aligned):
    data = encode_image(_astronaut())
    r = post(aligned, "/segment", {"image": data}, model="aligned_mask", attribute="both")
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (512, 512)
    r = post(aligned, "/transfer", {"content": data, "guide": data}, model="aligned_mask", target="a")
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (512, 512)
    r = post(aligned, "/encode", {"image": data}, model="aligned_mask")
    assert r.status_code == 200 and r.json()["id"]


def test_face_choices_on_a_photo_with_two_faces(aligned):
    photo = _astronaut()
    pair = Image.new("RGB", (1024, 512))
    pair.paste(photo, (0, 0))
    pair.paste(photo.resize((384, 384)), (600, 64))
    data = encode_image(pair)
    assert len(post(aligned, "/faces", {"image": data}).json()["faces"]) == 2
    r = post(aligned, "/remove-attribute", {"image": data}, model="aligned", face="all", attribute="both")
    assert r.status_code == 200 and r.headers["x-faces-edited"] == "2"
    changed = (pixels(r.content) != np.asarray(pair)).any(-1)
    assert changed[:, :512].any() and changed[:, 600:].any()
    r = post(aligned, "/remove-attribute", {"image": data}, model="aligned", face="1", attribute="both")
    changed = (pixels(r.content) != np.asarray(pair)).any(-1)
    assert r.headers["x-faces-edited"] == "1" and not changed[:, :512].any() and changed[:, 600:].any()
    body = assert_problem(post(aligned, "/remove-attribute", {"image": data}, model="aligned", face="2"), 422)
    assert body["type"].endswith("/no-face") and "2 found" in body["detail"]
    assert_problem(post(aligned, "/remove-attribute", {"image": data}, model="aligned", face="all", output="model"), 400)
    assert_problem(post(aligned, "/encode", {"image": data}, model="aligned", face="all"), 400)


def test_no_face_on_an_aligned_model_is_a_problem_not_a_guess(aligned):
    blank = encode_image(Image.new("RGB", (300, 200), (120, 140, 160)))
    body = assert_problem(post(aligned, "/remove-attribute", {"image": blank}, model="aligned"), 422)
    assert body["type"].endswith("/no-face") and "no face" in body["detail"]
    # align=none edits the image as it is
    r = post(aligned, "/remove-attribute", {"image": blank}, model="aligned", align="none")
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (300, 200)


def test_grace_hopper_jpeg_round_trip(aligned):
    """A real JPEG photo through the aligned path answers at its size; outside the face, the pixels as decoded."""
    matplotlib = pytest.importorskip("matplotlib")
    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    raw = Path(path).read_bytes()
    r = aligned.post("/transfer", files={"content": ("g.jpg", raw, "image/jpeg"), "guide": ("g.jpg", raw, "image/jpeg")},
                     data={"model": "aligned", "target": "b"})
    assert r.status_code == 200, r.text
    with Image.open(path) as img:
        orig = np.asarray(img.convert("RGB"))
    got = pixels(r.content)
    assert got.shape == orig.shape
    from app.faces import detect

    face = detect(Image.fromarray(orig))[0]
    reach = warp_mask(region("celeba", 64) * border(64), Placement.align(face.eyes(), orig.shape[1], orig.shape[0], 64))
    outside = reach < MIN_WEIGHT
    assert outside.mean() > 0.3
    np.testing.assert_array_equal(got[outside], orig[outside])


# --- out of domain ---------------------------------------------------------------------------------------------------


def test_photos_are_flagged_out_of_domain_and_rendered_faces_are_not(make_service, bundled_mask):
    """The bundled (calibrated) model scores every upload: rendered faces pass, a photograph is flagged, and
    strict=true turns the flag into a 422 that names the model, the upload, its score and the threshold."""
    client = make_service(weights=bundled_mask)
    face = encode_image(rendered("smile_glasses", "b", 11, 64))
    guide = encode_image(rendered("smile_glasses", "a", 12, 64))
    photo = encode_image(_astronaut())
    r = post(client, "/transfer", {"content": face, "guide": guide}, target="smile")
    assert r.status_code == 200 and r.headers["x-out-of-domain"] == "false"
    assert float(r.headers["x-domain-score"]) < 2 and r.headers["x-domain-scores"].startswith("content:")
    r = post(client, "/remove-attribute", {"image": photo}, format="json")
    assert r.status_code == 200 and r.headers["x-out-of-domain"] == "true" and float(r.headers["x-domain-score"]) > 3
    assert r.json()["meta"]["out_of_domain"] == "true"
    r = post(client, "/transfer", {"content": face, "guide": photo}, target="smile")
    assert r.headers["x-out-of-domain"] == "true" and float(r.headers["x-domain-scores"].split(",")[1].split(":")[1]) > 3
    body = assert_problem(post(client, "/segment", {"image": photo}, strict="true"), 422)
    assert body["type"].endswith("/out-of-domain") and "smile_glasses_mask" in body["detail"] and "'image'" in body["detail"]
    assert "threshold" in body["detail"]
    assert post(client, "/segment", {"image": face}, strict="true").status_code == 200
    j = post(client, "/encode", {"image": photo}).json()
    assert j["out_of_domain"] is True and j["domain_score"] > 3
    assert post(client, "/encode", {"image": face}).json()["out_of_domain"] is False
    # the check can be switched off: no scores, and strict= is refused
    off = make_service(weights=bundled_mask, domain_check=False)
    r = post(off, "/remove-attribute", {"image": photo})
    assert r.status_code == 200 and "x-domain-score" not in r.headers
    assert_problem(post(off, "/remove-attribute", {"image": photo}, strict="true"), 400)


def test_a_model_without_calibration_reports_no_score(service):
    upload = encode_image(rendered("smile_glasses", "a", 1, 64))
    r = post(service, "/remove-attribute", {"image": upload})
    assert r.status_code == 200 and "x-domain-score" not in r.headers
    body = assert_problem(post(service, "/remove-attribute", {"image": upload}, strict="true"), 400)
    assert "calibrat" in body["detail"]
