"""The REST service through an ASGI client: every endpoint, every error code, formats, and that each answer is what
the core's Disentangler computes for the same inputs."""
from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import models
from app import imaging
from models.images import to_uint8

from .conftest import draw_face, encode_image

PROBLEM = "application/problem+json"


def png(seed: int, size: int | tuple[int, int] = 96) -> bytes:
    return encode_image(draw_face(seed, size))


def pixels(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), dtype=np.int16)


def assert_problem(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith(PROBLEM), r.headers["content-type"]
    body = r.json()
    assert body["status"] == status and body["title"] and "type" in body and "detail" in body
    return body


def entry_of(client, name: str | None = None):
    return client.app.state.registry.get(name)


def as_input(client, data: bytes, fit: str = "crop") -> torch.Tensor:
    return imaging.decode(data, "x", entry_of(client).config.image_size, fit).unsqueeze(0)


def same_image(body: bytes, expected: torch.Tensor) -> None:
    """The answer's pixels equal the core's float image after rounding (one level of slack)."""
    got = pixels(body)
    want = to_uint8(expected).numpy().astype(np.int16)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1


def transfer(client, content: bytes, guide: bytes | None = None, files: dict | None = None, **data):
    """POST /transfer; answered at the model's resolution (output=model) unless the test asks otherwise, so the
    answer compares with the core's own output."""
    data.setdefault("output", "model")
    f = {"content": ("c.png", content, "image/png")}
    if guide is not None:
        f["guide"] = ("g.png", guide, "image/png")
    f.update(files or {})
    return client.post("/transfer", files=f, data={k: str(v) for k, v in data.items()})


# --- health, readiness, cards, docs ---------------------------------------------------------------------------------


def test_health_ready_models_and_docs(service):
    assert service.get("/healthz").json() == {"status": "ok"}
    ready = service.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == ["smile_glasses"] and ready.json()["device"] == "cpu"
    cards = service.get("/models").json()
    assert cards["default"] == "smile_glasses"
    (m,) = cards["models"]
    assert m["image_size"] == 64 and m["domains"] == {"a": "smile", "b": "glasses"} and m["default"] is True
    cfg = entry_of(service).config
    assert m["code_sizes"] == {"common": cfg.common_size, "sep_a": cfg.sep_size, "sep_b": cfg.sep_size}
    assert len(m["card"]["tensors"]["sha256"]) == 64
    assert service.get("/docs").status_code == 200
    spec = service.get("/openapi.json").json()
    for path in ("/transfer", "/remove-attribute", "/encode", "/decode", "/interpolate", "/models", "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"], path
    body = spec["paths"]["/transfer"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body
    schema = spec["components"]["schemas"]["TransferForm"]["properties"]
    assert {"content", "guide", "guide_a", "guide_b", "target", "strength", "keep", "fit", "model", "format", "size"} <= set(schema)
    assert spec["paths"]["/encode"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("EncodeResponse")


def test_not_ready_before_startup(service_weights):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    client = TestClient(create_app(Settings(weights=service_weights)))  # no `with`: the lifespan never ran
    r = client.get("/readyz")
    assert_problem(r, 503)
    assert r.headers["retry-after"]
    assert client.get("/healthz").status_code == 200
    assert_problem(transfer(client, png(0), png(1)), 503)
    assert_problem(client.get("/models"), 503)


# --- /transfer ------------------------------------------------------------------------------------------------------


def test_transfer_png_equals_the_core(service):
    content, guide = png(0, (120, 90)), png(1, 150)
    r = transfer(service, content, guide)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)
    model = entry_of(service).model
    c, g = as_input(service, content), as_input(service, guide)
    with torch.inference_mode():
        detected = int(model.detect(model.encode(g))[0])
        expected = model.transfer(c, g, target=None)
    assert r.headers["x-detected-domain"] == ("smile", "glasses")[detected]
    assert r.headers["x-target-domain"] == r.headers["x-detected-domain"]
    assert r.headers["x-model"] == "smile_glasses"
    same_image(r.content, expected[0])


@pytest.mark.parametrize("target,index", [("a", 0), ("b", 1), ("smile", 0), ("GLASSES", 1)])
def test_transfer_target_strength_keep(service, target, index):
    content, guide = png(2), png(4)
    r = transfer(service, content, guide, target=target, strength=0.5, keep="true")
    assert r.status_code == 200, r.text
    assert r.headers["x-target-domain"] == ("smile", "glasses")[index]
    assert "x-detected-domain" not in r.headers  # a given target: the guide's other code is never computed
    model = entry_of(service).model
    with torch.inference_mode():
        expected = model.transfer(as_input(service, content), as_input(service, guide), target=index, strength=0.5, keep=True)
    same_image(r.content, expected[0])


def test_transfer_intersection(service):
    content, ga, gb = png(0), png(2), png(1)
    files = {"guide_a": ("a.png", ga, "image/png"), "guide_b": ("b.png", gb, "image/png")}
    r = transfer(service, content, files=files, strength=1.5)
    assert r.status_code == 200, r.text
    assert r.headers["x-target-domain"] == "smile+glasses"
    model = entry_of(service).model
    with torch.inference_mode():
        expected = model.intersect(as_input(service, content), as_input(service, ga), as_input(service, gb), strength=1.5)
    same_image(r.content, expected[0])


def test_transfer_formats_and_sizes(service):
    content, guide = png(0), png(1)
    r = transfer(service, content, guide, format="jpeg")
    assert r.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(r.content)).format == "JPEG"
    r = transfer(service, content, guide, format="webp")
    assert r.headers["content-type"] == "image/webp" and Image.open(io.BytesIO(r.content)).format == "WEBP"
    r = service.post("/transfer", files={"content": ("c", content), "guide": ("g", guide)}, headers={"accept": "image/webp;q=0.9, image/jpeg"})
    assert r.headers["content-type"] == "image/jpeg"
    r = service.post("/transfer", files={"content": ("c", content), "guide": ("g", guide)}, headers={"accept": "text/html, */*;q=0.1"})
    assert r.headers["content-type"] == "image/png"
    r = transfer(service, content, guide, size=200)
    assert Image.open(io.BytesIO(r.content)).size == (200, 200)
    png_answer = transfer(service, content, guide).content
    for how in ({"format": "json"}, {}):
        headers = {} if how else {"accept": "application/json"}
        r = service.post("/transfer", files={"content": ("c", content), "guide": ("g", guide)}, data={**how, "output": "model"}, headers=headers)
        assert r.headers["content-type"] == "application/json"
        j = r.json()
        assert j["media_type"] == "image/png" and (j["width"], j["height"]) == (64, 64) and j["model"] == "smile_glasses"
        assert j["meta"]["detected_domain"] == r.headers["x-detected-domain"] and "target_domain" in j["meta"]
        assert np.array_equal(pixels(base64.b64decode(j["image"])), pixels(png_answer))
    r = transfer(service, png(0, (200, 100)), guide, fit="pad")
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (64, 64)


def test_transfer_bad_parameters(service):
    content, guide = png(0), png(1)
    assert "target" in assert_problem(transfer(service, content, guide, target="beard"), 400)["detail"]
    assert_problem(transfer(service, content), 400)  # no guide
    assert_problem(transfer(service, content, guide, files={"guide_a": ("a", content, "image/png")}), 400)
    assert_problem(transfer(service, content, files={"guide_a": ("a", content, "image/png")}), 400)
    both = {"guide_a": ("a", content, "image/png"), "guide_b": ("b", guide, "image/png")}
    assert_problem(transfer(service, content, files=both, target="a"), 400)
    for bad in ({"strength": 2.5}, {"strength": -0.1}, {"strength": "lots"}, {"fit": "stretch"}, {"format": "bmp"},
                {"size": 8}, {"keep": "perhaps"}, {"unknown_field": 1}):
        body = assert_problem(transfer(service, content, guide, **bad), 422)
        assert body["errors"], bad
    assert_problem(transfer(service, content, guide, size=5000), 400)
    assert_problem(service.post("/transfer", files={"guide": ("g", guide)}), 422)  # no content
    assert_problem(service.post("/transfer", data={"content": "not a file", "guide": "x"}), 422)
    assert_problem(service.post("/transfer", json={"content": 1}), 422)
    assert_problem(transfer(service, content, guide, model="nope"), 404)


def test_model_selection(make_service, two_model_weights):
    client = make_service(weights=two_model_weights)
    cards = client.get("/models").json()
    assert cards["default"] == "beard_smile" and [m["name"] for m in cards["models"]] == ["beard_smile", "smile_glasses"]
    r = transfer(client, png(0), png(1), target="beard")
    assert r.status_code == 200 and r.headers["x-model"] == "beard_smile" and r.headers["x-target-domain"] == "beard"
    r = transfer(client, png(0), png(1), target="glasses", model="smile_glasses")
    assert r.status_code == 200 and r.headers["x-model"] == "smile_glasses"
    assert_problem(transfer(client, png(0), png(1), target="glasses"), 400)  # beard_smile has no glasses
    other = make_service(weights=two_model_weights, default_model="smile_glasses")
    assert other.get("/models").json()["default"] == "smile_glasses"


@pytest.mark.parametrize("common_map,common_input,separate_map", [(2, "image", 2), (8, "image", 2), (8, "contrast", 1)])
def test_transfer_on_a_32_px_digits_model(make_service, tmp_path, common_map, common_input, separate_map):
    """A digits model (32 px, one encoder layer fewer than 64; its common code a 2x2 or an 8x8 map, read from the
    image or, as the digit recipe's, from its contrast map beside separate codes of the whole image) loads, warms up
    and answers like the core, at its own resolution and at the upload's size; its latents travel at their own
    shapes through /encode and /decode."""
    torch.manual_seed(3)
    cfg = models.preset("tiny", image_size=32, domain_a="mnist", domain_b="syndigits", common_map=common_map,
                        common_input=common_input, separate_map=separate_map)
    models.save(models.Disentangler(cfg), tmp_path / "mnist_syndigits")
    client = make_service(weights=tmp_path)
    assert client.get("/models").json()["models"][0]["image_size"] == 32
    digit = Image.new("L", (28, 28), 0)
    digit.paste(255, (12, 4, 16, 24))  # a "1", white on black like MNIST
    content, guide = encode_image(digit), png(1, 40)
    r = transfer(client, content, guide, target="syndigits")
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(r.content)).size == (32, 32) and r.headers["x-model"] == "mnist_syndigits"
    model = entry_of(client).model
    with torch.inference_mode():
        expected = model.transfer(as_input(client, content), as_input(client, guide), target=1)
    same_image(r.content, expected[0])
    r = transfer(client, content, guide, target="b", output="full")
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (28, 28)
    sizes = client.get("/models").json()["models"][0]["code_sizes"]
    sep = cfg.sep_channels * separate_map**2
    assert sizes == {"common": cfg.common_channels * common_map**2, "sep_a": sep, "sep_b": sep}
    jc, jg = encode(client, content, include_latents="true"), encode(client, guide, include_latents="true")
    assert len(jc["latents"]["common"]) == sizes["common"]
    r = client.post("/decode", json={"common": jc["latents"]["common"], "sep_b": jg["latents"]["sep_b"]})
    assert r.status_code == 200, r.text
    same_image(r.content, expected[0])
    assert_problem(client.post("/decode", json={"common": jc["latents"]["common"][:-1]}), 400)


# --- /remove-attribute ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attribute,which", [("a", 0), ("b", 1), ("both", 2), ("glasses", 1), ("auto", None)])
def test_remove_attribute(service, attribute, which):
    image = png(1)
    r = service.post("/remove-attribute", files={"image": ("x.png", image, "image/png")}, data={"attribute": attribute, "output": "model"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    model = entry_of(service).model
    x = as_input(service, image)
    with torch.inference_mode():
        detected = int(model.detect(model.encode(x))[0])
        auto, which = which is None, detected if which is None else which
        expected = model.remove(x, torch.tensor([which]))
    assert r.headers.get("x-detected-domain") == (("smile", "glasses")[detected] if auto else None)
    assert r.headers["x-removed"] == ("smile", "glasses", "smile+glasses")[which]
    same_image(r.content, expected[0])


def test_remove_attribute_errors(service):
    assert_problem(service.post("/remove-attribute", files={"image": ("x", png(1))}, data={"attribute": "hat"}), 400)
    assert_problem(service.post("/remove-attribute", data={"attribute": "a"}), 422)
    r = service.post("/remove-attribute", files={"image": ("x", png(1))}, data={"format": "json"})
    assert r.json()["meta"]["removed"] in ("smile", "glasses")


# --- /encode, /decode, /interpolate -----------------------------------------------------------------------------------


def encode(client, data: bytes, **form) -> dict:
    r = client.post("/encode", files={"image": ("x.png", data, "image/png")}, data={k: str(v) for k, v in form.items()})
    assert r.status_code == 200, r.text
    return r.json()


def test_encode_returns_id_scores_and_latents(service):
    image = png(1)
    j = encode(service, image, include_latents="true")
    assert len(j["id"]) >= 20 and j["model"] == "smile_glasses" and j["expires_in"] == 3600
    assert set(j["domain_scores"]) == {"smile", "glasses"} and j["detected"] in ("a", "b")
    assert j["detected_domain"] == {"a": "smile", "b": "glasses"}[j["detected"]]
    model = entry_of(service).model
    with torch.inference_mode():
        codes = model.encode(as_input(service, image))
        scores = model.domain_scores(codes)[0]
    for name, t in zip(("common", "sep_a", "sep_b"), codes):
        assert np.allclose(j["latents"][name], t[0].flatten().numpy(), atol=1e-5)
    assert np.allclose([j["domain_scores"]["smile"], j["domain_scores"]["glasses"]], scores.numpy(), atol=1e-6)
    assert encode(service, image)["latents"] is None
    assert encode(service, image)["id"] != j["id"]


def test_decode_recombines_ids_numbers_and_zeros(service):
    a, b = png(0), png(1)
    ja, jb = encode(service, a, include_latents="true"), encode(service, b, include_latents="true")
    model = entry_of(service).model
    with torch.inference_mode():
        ca, cb = model.encode(as_input(service, a)), model.encode(as_input(service, b))
        expected = model.decode(ca.common, cb.sep_a, None)
    r = service.post("/decode", json={"common": ja["id"], "sep_a": jb["id"]})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    same_image(r.content, expected[0])
    r2 = service.post("/decode", json={"common": ja["latents"]["common"], "sep_a": jb["latents"]["sep_a"], "sep_b": "zero"})
    same_image(r2.content, expected[0])
    r = service.post("/decode?format=json&size=32", json={"model": "smile_glasses", "common": None})
    assert r.status_code == 200 and (r.json()["width"], r.json()["height"]) == (32, 32)
    r = service.post("/decode", json={"common": ja["id"]}, headers={"accept": "image/jpeg"})
    assert r.headers["content-type"] == "image/jpeg"


def test_decode_errors(service):
    j = encode(service, png(0))
    assert_problem(service.post("/decode", json={"common": "no-such-id"}), 404)
    assert_problem(service.post("/decode", json={"common": j["id"], "sep_a": [1.0, 2.0]}), 400)
    assert_problem(service.post("/decode", json={}), 400)
    assert_problem(service.post("/decode", json={"model": "nope"}), 404)
    assert_problem(service.post("/decode", json={"common": j["id"], "model": "other"}), 404)
    assert_problem(service.post("/decode", content=b'{"common": [NaN]}', headers={"content-type": "application/json"}), 422)
    assert_problem(service.post("/decode", content=b"{not json", headers={"content-type": "application/json"}), 422)
    assert_problem(service.post("/decode", json={"common": {"id": j["id"]}}), 422)
    assert_problem(service.post("/decode", json={"common": [1e30] * 4}), 400)  # wrong count; huge but finite is fine


def test_decode_refuses_a_latent_of_another_model(make_service, two_model_weights):
    client = make_service(weights=two_model_weights)
    j = encode(client, png(0), model="smile_glasses")
    assert_problem(client.post("/decode", json={"common": j["id"], "model": "beard_smile"}), 400)
    k = encode(client, png(1))  # beard_smile
    assert_problem(client.post("/decode", json={"common": j["id"], "sep_a": k["id"]}), 400)
    assert_problem(client.get(f"/interpolate?start={j['id']}&end={k['id']}"), 400)


@pytest.mark.parametrize("space", ["common", "a", "b", "all"])
def test_interpolate_strip_equals_the_core(service, space):
    a, b = png(0), png(1)
    ja, jb = encode(service, a), encode(service, b)
    r = service.get(f"/interpolate?start={ja['id']}&end={jb['id']}&space={space}&steps=5")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    strip = pixels(r.content)
    assert strip.shape == (64, 5 * 64, 3)
    model = entry_of(service).model
    with torch.inference_mode():
        frames = model.interpolate(model.encode(as_input(service, a)), model.encode(as_input(service, b)), 5, space)[0]
    for i in range(5):
        want = to_uint8(frames[i]).numpy().astype(np.int16)
        assert np.abs(strip[:, i * 64 : (i + 1) * 64] - want).max() <= 1


def test_interpolate_animations_and_errors(service):
    ja, jb = encode(service, png(0)), encode(service, png(1))
    q = f"start={ja['id']}&end={jb['id']}"
    r = service.get(f"/interpolate?{q}&steps=4&format=gif")
    im = Image.open(io.BytesIO(r.content))
    assert r.headers["content-type"] == "image/gif" and im.n_frames == 4 and im.size == (64, 64)
    r = service.get(f"/interpolate?{q}&steps=3&format=webp&size=32")
    im = Image.open(io.BytesIO(r.content))
    assert r.headers["content-type"] == "image/webp" and im.n_frames == 3 and im.size == (32, 32)
    r = service.get(f"/interpolate?{q}&steps=3", headers={"accept": "image/gif"})
    assert r.headers["content-type"] == "image/gif"
    j = service.get(f"/interpolate?{q}&steps=3&format=json").json()
    assert (j["width"], j["height"]) == (192, 64) and j["meta"] == {"space": "all", "steps": "3"}
    assert_problem(service.get(f"/interpolate?{q}&steps=1"), 422)
    assert_problem(service.get(f"/interpolate?{q}&steps=33"), 400)  # above DID_MAX_INTERPOLATE_STEPS (32)
    assert_problem(service.get(f"/interpolate?{q}&steps=1000"), 422)
    assert_problem(service.get(f"/interpolate?{q}&space=hair"), 422)
    assert_problem(service.get(f"/interpolate?start={ja['id']}&end=gone"), 404)
    assert_problem(service.get(f"/interpolate?start={ja['id']}"), 422)
    assert_problem(service.get(f"/interpolate?{q}&model=nope"), 404)


# --- uploads: sizes, bombs, modes, orientation ----------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data is a few bytes: a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_upload_errors(make_service, service):
    guide = png(1)
    assert "not an image" in assert_problem(transfer(service, b"this is not an image at all", guide), 415)["detail"]
    assert_problem(transfer(service, b"", guide), 415)
    assert_problem(transfer(service, png(0)[:200], guide), 415)  # truncated
    assert_problem(transfer(service, b"%PDF-1.4 not an image", guide), 415)
    big = b"\x89PNG\r\n\x1a\n" + bytes(12 * 1024 * 1024)
    assert "limit" in assert_problem(transfer(service, big, guide), 413)["detail"]
    assert "pixels" in assert_problem(transfer(service, png_header_only(8000, 8000), guide), 413)["detail"]
    assert_problem(transfer(service, png_header_only(60000, 60000), guide), 413)  # Pillow's own bomb error
    small = make_service(max_upload_bytes=2000, max_pixels=5000)
    assert_problem(transfer(small, png(0, 400), guide), 413)  # > 2000 bytes
    assert_problem(transfer(small, encode_image(Image.new("RGB", (100, 100))), encode_image(Image.new("RGB", (10, 10)))), 413)
    # the whole body is capped too (4 uploads + 1 MiB), before any parsing
    r = small.post("/transfer", content=b"x" * (4 * 2000 + 2**20 + 10), headers={"content-type": "multipart/form-data; boundary=x"})
    assert_problem(r, 413)
    # ... also when it streams in without a Content-Length
    chunks = (b"y" * 65536 for _ in range(20))
    assert_problem(small.post("/transfer", content=chunks, headers={"content-type": "multipart/form-data; boundary=x"}), 413)
    r = service.post("/transfer", content=b"--x\r\nnonsense", headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code in (400, 422) and r.headers["content-type"] == PROBLEM


def _modes() -> dict[str, bytes]:
    face = draw_face(1, 80)
    rgba = face.convert("RGBA")
    rgba.putalpha(128)
    gray16 = Image.fromarray(np.asarray(face.convert("L"), dtype=np.uint16) * 257)
    assert gray16.mode.startswith("I;16")
    frames = [draw_face(i, 80).convert("P") for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50)
    return {
        "rgba.png": encode_image(rgba),
        "la.png": encode_image(face.convert("LA")),
        "gray.png": encode_image(face.convert("L")),
        "gray16.png": encode_image(gray16),
        "palette.png": encode_image(face.convert("P", palette=Image.Palette.ADAPTIVE)),
        "bilevel.bmp": encode_image(face.convert("1"), "BMP"),
        "cmyk.jpg": encode_image(face.convert("CMYK"), "JPEG"),
        "animated.gif": gif.getvalue(),
        "photo.webp": encode_image(face, "WEBP"),
        "scan.tiff": encode_image(face, "TIFF"),
        "huge.jpg": encode_image(draw_face(1, (1600, 1200)), "JPEG", quality=80),
        "tiny.png": encode_image(draw_face(1, 5)),
    }


def test_every_image_mode_decodes(service):
    for name, data in _modes().items():
        r = transfer(service, data, png(1))
        assert r.status_code == 200, (name, r.text[:200])
        assert Image.open(io.BytesIO(r.content)).size == (64, 64), name
        x = imaging.decode(data, name, 64)
        assert x.shape == (3, 64, 64) and x.min() >= -1 and x.max() <= 1, name


def test_animated_gif_uses_the_first_frame():
    frames = [draw_face(i, 64).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    first = imaging.decode(encode_image(frames[0], "GIF"), "x", 64)
    assert torch.equal(imaging.decode(buf.getvalue(), "x", 64), first)


def test_exif_orientation_is_applied():
    face = draw_face(1, (96, 64))  # landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    tagged = encode_image(face, "PNG", exif=exif)
    upright = encode_image(face.transpose(Image.Transpose.ROTATE_270))
    a, b = imaging.decode(tagged, "x", 64, "pad"), imaging.decode(upright, "x", 64, "pad")
    assert torch.allclose(a, b)
    assert not torch.allclose(imaging.decode(encode_image(face), "x", 64, "pad"), b)


# --- errors that are not the client's ---------------------------------------------------------------------------------


def test_not_found_and_method_problems(service):
    assert_problem(service.get("/nope"), 404)
    assert_problem(service.get("/transfer"), 405)
    assert_problem(service.delete("/models"), 405)


def test_a_bug_is_a_500_problem_and_the_service_lives_on(make_service, monkeypatch):
    client = make_service(raise_server_exceptions=False)
    model = entry_of(client).model

    def broken(codes):
        raise RuntimeError("a bug")

    monkeypatch.setattr(model, "detect", broken)
    body = assert_problem(transfer(client, png(0), png(1)), 500)
    assert "a bug" not in body["detail"]
    monkeypatch.undo()
    assert transfer(client, png(0), png(1)).status_code == 200


def test_no_client_input_gives_a_500(service):
    """A spread of malformed requests: none is a 500; every refusal is a problem body."""
    ok = png(0)
    cases = [
        lambda: service.post("/transfer", content=b"\x00" * 100, headers={"content-type": "multipart/form-data"}),
        lambda: service.post("/transfer", content=b"abc", headers={"content-type": "text/plain"}),
        lambda: service.post("/transfer", files={"content": ("c", ok), "guide": ("g", ok)}, data={"strength": "nan"}),
        lambda: service.post("/transfer", files={"content": ("c", ok), "guide": ("g", ok)}, data={"strength": "inf"}),
        lambda: service.post("/transfer", files={"content": ("c", ok), "guide": ("g", ok), "target": ("t", b"a")}),
        lambda: service.post("/transfer", files={"content": ("c", ok), "guide": ("g", ok)}, data={"target": "\u00e9" * 50}),
        lambda: service.post("/transfer", files=[("content", ("c", ok)), ("content", ("c", ok)), ("guide", ("g", ok))]),
        lambda: service.post("/remove-attribute", files={"image": ("x", png_header_only(0, 0))}),
        lambda: service.post("/remove-attribute", files={"image": ("x", png_header_only(1, 10**6))}),
        lambda: service.post("/encode", files={"image": ("x", b"GIF89a" + bytes(20))}),
        lambda: service.post("/decode", json=[1, 2, 3]),
        lambda: service.post("/decode", json={"common": "x" * 500}),
        lambda: service.post("/decode", json={"common": [0.0] * 70000}),
        lambda: service.get("/interpolate?start=a&end=b&steps=abc"),
        lambda: service.get("/interpolate?start=a&end=b&size=-4"),
        lambda: service.get("/models?model=%00"),
    ]
    for i, case in enumerate(cases):
        r = case()
        assert r.status_code < 500, (i, r.status_code, r.text[:200])
        if r.status_code >= 400:
            assert r.headers["content-type"].startswith(PROBLEM), (i, r.headers["content-type"])


# --- auth ---------------------------------------------------------------------------------------------------------------


def test_api_keys(make_service, service):
    assert service.get("/models").status_code == 200  # no keys configured: open
    client = make_service(api_keys="k1,secret-2")
    r = client.get("/models")
    assert_problem(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert_problem(client.get("/models", headers={"x-api-key": "wrong"}), 401)
    assert_problem(client.get("/models", headers={"authorization": "Bearer nope"}), 401)
    assert_problem(client.get("/models", headers={"authorization": "Basic c2VjcmV0LTI="}), 401)
    assert client.get("/models", headers={"x-api-key": "k1"}).status_code == 200
    assert client.get("/models", headers={"authorization": "Bearer secret-2"}).status_code == 200
    assert_problem(transfer(client, png(0), png(1)), 401)
    r = client.post("/transfer", files={"content": ("c", png(0)), "guide": ("g", png(1))}, headers={"x-api-key": "secret-2"})
    assert r.status_code == 200
    assert_problem(client.post("/decode", json={"common": None, "model": "smile_glasses"}), 401)
    for open_path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert client.get(open_path).status_code == 200, open_path


# --- metrics --------------------------------------------------------------------------------------------------------------


def test_metrics(service):
    transfer(service, png(0), png(1))
    service.get("/nope")
    text = service.get("/metrics").text
    assert 'did_requests_total{method="POST",route="/transfer",status="200"} 1.0' in text
    assert 'route="unmatched",status="404"' in text
    assert 'did_request_duration_seconds_bucket{le="0.002",method="POST",route="/transfer"}' in text
    assert 'did_batch_size_count{kind="encode",model="smile_glasses"}' in text
    assert 'did_queue_depth{model="smile_glasses"}' in text
    assert "did_ready 1.0" in text and "did_models_loaded 1.0" in text


# --- settings --------------------------------------------------------------------------------------------------------------


def test_settings_from_environment(monkeypatch, tmp_path):
    from app.settings import Settings, as_env

    monkeypatch.setenv("DID_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("DID_API_KEYS", " a , b,")
    monkeypatch.setenv("DID_MAX_BATCH", "7")
    monkeypatch.setenv("DID_REDIS_URL", "")
    s = Settings()
    assert s.weights == tmp_path and s.api_keys == ["a", "b"] and s.max_batch == 7 and s.redis_url is None
    assert s.max_upload_bytes == 10 * 2**20 and s.device == "auto" and s.dtype == "float32"
    assert as_env({"weights": tmp_path, "workers": 2, "api_keys": ["x", "y"], "device": None}) == {
        "DID_WEIGHTS": str(tmp_path), "DID_WORKERS": "2", "DID_API_KEYS": "x,y"}
    with pytest.raises(ValueError):
        Settings(device="tpu")


def test_baked_model_equals_the_checkpoint(service, service_weights):
    """The service bakes spectral norm into plain weights; outputs match the checkpoint as the core loads it."""
    served = entry_of(service).model
    plain = models.load(service_weights / "smile_glasses")
    x = as_input(service, png(3))
    with torch.inference_mode():
        assert torch.allclose(served.reconstruct(x), plain.reconstruct(x), atol=1e-5)
    assert not any(hasattr(m, "parametrizations") for m in served.modules())


def test_json_answer_is_valid_json(service):
    r = transfer(service, png(0), png(1), format="json")
    assert json.loads(r.content)["image"]
