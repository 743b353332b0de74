"""Mask models in the service: /segment, include_mask, the mask removal's threshold and soft blend, plain and mask
models side by side, and render jobs batched through the dynamic batcher."""
from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

import models
from app import imaging
from app.batcher import Batcher
from app.routes.edit import RemovePlan, TransferPlan

from .conftest import draw_face, encode_image
from .test_service import assert_problem, same_image

MASK = "smile_glasses_mask"


def png(seed: int, size: int = 96) -> bytes:
    return encode_image(draw_face(seed, size))


@pytest.fixture
def client(make_service, mask_weights):
    return make_service(weights=mask_weights)


def model_of(client, name: str = MASK) -> models.Disentangler:
    return client.app.state.registry.get(name).model


def as_input(data: bytes) -> torch.Tensor:
    return imaging.decode(data, "x", 64).unsqueeze(0)


def gray(body: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(body))
    assert im.mode == "L"
    return np.asarray(im, dtype=np.int16)


def post(client, path: str, image: bytes, **data):
    """POST an image; answered at the model's resolution (output=model) unless the test asks otherwise."""
    data.setdefault("output", "model")
    return client.post(path, files={"image": ("x.png", image, "image/png")}, data={k: str(v) for k, v in data.items()})


def test_plain_and_mask_models_side_by_side(client):
    cards = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert cards["smile_glasses"]["variant"] == "plain" and cards[MASK]["variant"] == "mask"
    assert cards[MASK]["card"]["variant"] == "mask"


@pytest.mark.parametrize("attribute,which", [("a", "a"), ("glasses", "b"), ("both", "both"), ("auto", None)])
def test_segment_png_equals_the_core(client, attribute, which):
    image = png(1)
    r = post(client, "/segment", image, model=MASK, attribute=attribute)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.headers["x-model"] == MASK
    got = gray(r.content)
    assert got.shape == (64, 64)
    model = model_of(client)
    x = as_input(image)
    with torch.inference_mode():
        detected = int(model.detect(model.encode(x))[0])
        mask = model.segment(x, which or "ab"[detected])
    want = mask[0, 0].mul(255).round().numpy().astype(np.int16)
    assert np.abs(got - want).max() <= 1
    # detecting the domain reads both separate codes, so only attribute=auto detects (and names) it
    assert r.headers.get("x-detected-domain") == (("smile", "glasses")[detected] if which is None else None)
    expected_attr = {"a": "smile", "b": "glasses", "both": "smile+glasses", None: ("smile", "glasses")[detected]}[which]
    assert r.headers["x-attribute"] == expected_attr
    assert float(r.headers["x-mask-area"]) == pytest.approx(float((mask > 0.5).float().mean()), abs=1e-6)


def test_segment_sizes_formats_and_json(client):
    image = png(4)
    r = post(client, "/segment", image, model=MASK, size=100)
    assert Image.open(io.BytesIO(r.content)).size == (100, 100)
    r = post(client, "/segment", image, model=MASK, format="jpeg")
    assert r.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(r.content)).format == "JPEG"
    model = model_of(client)
    with torch.inference_mode():
        mask = model.segment(as_input(image), "both")[0]
    for how, headers in (({"format": "json"}, {}), ({}, {"accept": "application/json"})):
        r = client.post("/segment", files={"image": ("x.png", image, "image/png")},
                        data={"model": MASK, "attribute": "both", "threshold": "0.3", "output": "model", **how}, headers=headers)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        j = r.json()
        assert {"image", "media_type", "width", "height", "threshold", "area", "bbox", "model", "meta"} <= set(j)
        assert j["media_type"] == "image/png" and (j["width"], j["height"]) == (64, 64) and j["model"] == MASK
        assert j["threshold"] == 0.3 and j["meta"]["attribute"] == "smile+glasses"
        over = (mask[0] > 0.3).numpy()
        assert j["area"] == pytest.approx(over.mean(), abs=1e-6)
        if over.any():
            ys, xs = np.nonzero(over)
            assert j["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        else:
            assert j["bbox"] is None
        assert gray(base64.b64decode(j["image"])).shape == (64, 64)
    # bbox in the coordinates of an answer of size=
    j = post(client, "/segment", image, model=MASK, attribute="both", threshold=0.3, format="json", size=128).json()
    assert (j["width"], j["height"]) == (128, 128)
    if j["bbox"] is not None:
        assert all(0 <= v <= 128 for v in j["bbox"]) and j["bbox"][0] % 2 == 0 and j["bbox"][2] % 2 == 0


def test_mask_extent_of_a_known_mask():
    mask = torch.zeros(1, 64, 64)
    mask[0, 10:20, 30:34] = 0.9
    area, bbox = imaging.mask_extent(mask, 0.5)
    assert area == 40 / 4096 and bbox == [30, 10, 34, 20]
    assert imaging.mask_extent(mask, 0.5, size=128)[1] == [60, 20, 68, 40]
    assert imaging.mask_extent(mask, 0.95) == (0.0, None)


def test_segment_refuses_a_plain_model_and_bad_parameters(client):
    body = assert_problem(post(client, "/segment", png(1), model="smile_glasses"), 400)  # a plain model
    assert "mask" in body["detail"] and "smile_glasses" in body["detail"]
    assert_problem(post(client, "/segment", png(1), model="smile_glasses", format="json"), 400)
    for bad in ("1.5", "-0.1", "lots", "nan", "inf"):
        assert_problem(post(client, "/segment", png(1), model=MASK, threshold=bad), 422)
    assert_problem(post(client, "/segment", png(1), model=MASK, attribute="hat"), 400)
    assert_problem(post(client, "/segment", png(1), model="nope"), 404)
    assert_problem(client.post("/segment", data={"model": MASK}), 422)  # no image


def test_transfer_on_a_mask_model_with_include_mask(client):
    content, guide = png(0), png(1)
    files = {"content": ("c.png", content, "image/png"), "guide": ("g.png", guide, "image/png")}
    r = client.post("/transfer", files=files, data={"model": MASK, "output": "model", "target": "a", "include_mask": "true", "format": "json"})
    assert r.status_code == 200, r.text
    j = r.json()
    model = model_of(client)
    c, g = as_input(content), as_input(guide)
    with torch.inference_mode():
        expected = model.transfer(c, g, target=0)
        cc, gc = model.encode(c), model.encode(g)
        _, mask = model.render(c, model.transfer_edit(cc, gc, torch.tensor([0])))
    same_image(base64.b64decode(j["image"]), expected[0])
    m = j["mask"]
    assert {"image", "media_type", "width", "height", "threshold", "area", "bbox"} <= set(m)
    assert m["threshold"] == 0.5 and m["area"] == pytest.approx(float((mask > 0.5).float().mean()), abs=1e-6)
    want = mask[0, 0].mul(255).round().numpy().astype(np.int16)
    assert np.abs(gray(base64.b64decode(m["image"])) - want).max() <= 1
    # an image answer carries the image and the mask's area as a header; the mask's pixels need JSON
    r = client.post("/transfer", files=files, data={"model": MASK, "output": "model", "target": "a", "include_mask": "true"})
    assert r.headers["content-type"] == "image/png" and float(r.headers["x-mask-area"]) == pytest.approx(m["area"], abs=1e-6)
    same_image(r.content, expected[0])
    # without include_mask: no mask
    r = client.post("/transfer", files=files, data={"model": MASK, "output": "model", "target": "a", "format": "json"})
    assert r.json().get("mask") is None and "x-mask-area" not in r.headers


def test_intersection_on_a_mask_model(client):
    content, ga, gb = png(0), png(2), png(1)
    files = {"content": ("c", content), "guide_a": ("a", ga), "guide_b": ("b", gb)}
    r = client.post("/transfer", files=files, data={"model": MASK, "output": "model"})
    assert r.status_code == 200, r.text
    with torch.inference_mode():
        expected = model_of(client).intersect(as_input(content), as_input(ga), as_input(gb))
    same_image(r.content, expected[0])


def test_remove_attribute_threshold_and_soft(client):
    image = png(1)
    model = model_of(client)
    x = as_input(image)
    for form, kw in (({}, {}), ({"threshold": "0.4"}, {"threshold": 0.4}), ({"soft": "true"}, {"soft": True}),
                     ({"threshold": "1"}, {"threshold": 1.0})):
        r = post(client, "/remove-attribute", image, model=MASK, attribute="both", **form)
        assert r.status_code == 200, r.text
        with torch.inference_mode():
            expected = model.remove(x, "both", **kw)
        same_image(r.content, expected[0])
    # threshold 1 replaces nothing: the upload comes back as it went in (after fitting to the model's size)
    same_image(r.content, x[0])
    r = post(client, "/remove-attribute", image, model=MASK, attribute="a", threshold=0.2, include_mask="true", format="json")
    m = r.json()["mask"]
    with torch.inference_mode():
        mask = model.segment(x, "a")
    assert m["threshold"] == 0.2 and m["area"] == pytest.approx(float((mask > 0.2).float().mean()), abs=1e-6)
    assert r.headers["x-removed"] == "smile"


def test_mask_options_on_a_plain_model_are_400(client):
    image = png(1)
    for form in ({"threshold": "0.3"}, {"soft": "true"}, {"include_mask": "true"}):
        body = assert_problem(post(client, "/remove-attribute", image, model="smile_glasses", **form), 400)
        assert "mask" in body["detail"]
    files = {"content": ("c", image), "guide": ("g", png(2))}
    assert_problem(client.post("/transfer", files=files, data={"include_mask": "true", "model": "smile_glasses"}), 400)
    for bad in ("2", "-1", "nan", "many"):
        assert_problem(post(client, "/remove-attribute", image, model=MASK, threshold=bad), 422)
    assert_problem(post(client, "/remove-attribute", image, model=MASK, soft="perhaps"), 422)
    # the plain model's answers are unchanged by the mask options existing
    assert post(client, "/remove-attribute", image, model="smile_glasses").status_code == 200


def test_render_jobs_batched_equal_alone(mask_weights):
    """Transfers and removals of many requests, rendered in shared model calls, equal each rendered alone."""
    model = models.load(mask_weights / MASK)
    torch.manual_seed(0)
    images = [torch.rand(2, 3, 64, 64) * 2 - 1 for _ in range(6)]

    def plan_for(i: int):
        if i % 2:
            return RemovePlan(1, 2 if i % 3 else 0, threshold=0.1 * i, soft=i == 3)
        return TransferPlan(1, i % 4 // 2, 1.0, keep=i == 4)

    def parts_for(i: int):  # what each edit reads, so the jobs share encoder calls over different images
        return (model.remove_parts("both" if i % 3 else "a"), model.remove_parts(None)) if i % 2 else model.transfer_parts(i % 4 // 2, i == 4)

    async def go():
        b = Batcher("m", model, max_batch=32, max_wait_ms=50, queue_size=64)
        b.start()
        try:
            return await asyncio.gather(*(b.render(x, plan_for(i), parts_for(i)) for i, x in enumerate(images)))
        finally:
            await b.stop()

    results = asyncio.run(go())
    with torch.inference_mode():
        for i, (x, (image, mask, _, _)) in enumerate(zip(images, results)):
            plan = plan_for(i)
            edit, _ = type(plan).many(model, [plan], [[model.encode(x[j : j + 1]) for j in range(2)]])
            want_image, want_mask = model.render(x[:1], edit)
            assert image.shape == (1, 3, 64, 64) and mask.shape == (1, 1, 64, 64)
            torch.testing.assert_close(image, want_image, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mask, want_mask, atol=1e-5, rtol=1e-5)
